"""`gpt3 plan`'s cost block: training FLOPs against GPT-3's own table, GPU-hours from a measured
MFU, and the Slurm time limit, all computed from the config alone.

GPT-3 (Brown et al. 2020), Appendix D, Table D.1 "Total compute used to train language models",
300B training tokens for every GPT-3 size, 6 FLOPs per parameter per token, attention left out:

    model   PF-days   FLOPs      params (M)
    Small   2.60E+00  2.25E+20   125
    Medium  7.42E+00  6.41E+20   356
    Large   1.58E+01  1.37E+21   760
    XL      2.75E+01  2.38E+21   1,320
    2.7B    5.52E+01  4.77E+21   2,650
    6.7B    1.39E+02  1.20E+22   6,660
    13B     2.68E+02  2.31E+22   12,850
    175B    3.64E+03  3.14E+23   174,600
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT

from pipeline.cli import run_command
from pipeline.cli.plan import plan as plan_command
from pipeline.config.loader import load_config
from pipeline.distributed.cost import (
    PF_DAY,
    estimate_cost,
    load_measured_mfu,
    nearest_measured,
    parse_tokens,
    slurm_request,
    slurm_time,
    time_limit_hours,
)
from pipeline.errors import USER_ERROR_EXIT_CODE, ConfigError
from pipeline.model import count_parameters, flops_per_token

VOCAB = 50257
TOKENS = 300 * 10**9
TABLE_D1_FLOPS = {
    "125M": 2.25e20,
    "350M": 6.41e20,
    "760M": 1.37e21,
    "1.3B": 2.38e21,
    "2.7B": 4.77e21,
    "6.7B": 1.20e22,
    "13B": 2.31e22,
    "175B": 3.14e23,
}
"""GPT-3 Table D.1, total train compute in FLOPs (300B tokens, 6N per token)."""


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)  # model sizes and bench/measured_mfu.json are repo-relative


def _model(size: str):
    return load_config(model_size=size, training_config="configs/training_configs/large_scale.yaml")


def _cost(size: str, tokens: int = TOKENS, gpu: str = "H100", gpus: int = 8, mfu: float = 0.5):
    return estimate_cost(_model(size).model, VOCAB, 2048, tokens, gpu, gpus, mfu)


@pytest.mark.parametrize("size", sorted(TABLE_D1_FLOPS))
def test_6n_flops_match_gpt3_table_d1(size: str) -> None:
    # The paper's count is 6N x 300B tokens; our N (no position embedding) lands within 1.5%.
    assert _cost(size).dense_flops == pytest.approx(TABLE_D1_FLOPS[size], rel=0.015)


def test_175b_on_300b_tokens_is_the_papers_3_14e23_flops_with_attention() -> None:
    cost = _cost("175B")
    # With attention (12 x 96 x 12288 x 2048 per token) the total is within 3% of Table D.1...
    assert cost.total_flops == pytest.approx(3.14e23, rel=0.03)
    assert cost.total_flops > 3.14e23  # ...and above it: the paper leaves attention out.
    assert cost.pf_days == pytest.approx(3.64e3, rel=0.03)  # 3.64E+03 petaflop/s-days
    assert cost.dense_flops / PF_DAY == pytest.approx(3.64e3, rel=0.003)
    assert cost.attention_flops == 12 * 96 * 12288 * 2048 * TOKENS


def test_125m_attention_is_a_third_on_top_of_the_papers_2_25e20() -> None:
    cost = _cost("125M")
    assert cost.dense_flops / PF_DAY == pytest.approx(2.60, rel=0.015)  # 2.60E+00 PF-days
    assert cost.dense_flops == pytest.approx(2.25e20, rel=0.015)
    # At 125M and 2048-token sequences attention is ~30% extra, which Table D.1 ignores.
    n = count_parameters(_model("125M").model, VOCAB, include_position_embedding=False)
    assert cost.attention_flops / cost.dense_flops == pytest.approx(
        12 * 12 * 768 * 2048 / (6 * n), rel=1e-9
    )
    assert 0.25 < cost.attention_flops / cost.dense_flops < 0.35
    # The total is exactly the MFU numerator the trainer uses.
    assert cost.total_flops == flops_per_token(_model("125M").model, VOCAB, 2048) * TOKENS


def test_gpu_hours_and_wall_clock_follow_flops_mfu_and_peak() -> None:
    base = _cost("1.3B", gpus=8, mfu=0.5)
    assert base.peak_tflops == 989.0
    assert base.gpu_hours == pytest.approx(base.total_flops / (0.5 * 989e12 * 3600))
    assert base.wall_hours == pytest.approx(base.gpu_hours / 8)
    twice_the_gpus = _cost("1.3B", gpus=16, mfu=0.5)
    assert twice_the_gpus.gpu_hours == pytest.approx(base.gpu_hours)
    assert twice_the_gpus.wall_hours == pytest.approx(base.wall_hours / 2)
    assert _cost("1.3B", mfu=0.25).gpu_hours == pytest.approx(2 * base.gpu_hours)
    a100 = _cost("1.3B", gpu="a100", mfu=0.5)  # case does not matter; 312 TFLOP/s dense bf16
    assert a100.gpu == "A100" and a100.gpu_hours == pytest.approx(base.gpu_hours * 989 / 312)
    # By hand: 1e9 tokens of 125M (9.68e8 FLOPs/token) at 50% of 989 TFLOP/s is ~0.54 GPU-hours.
    small = _cost("125M", tokens=10**9, gpus=1)
    assert small.gpu_hours == pytest.approx(9.68e17 / 494.5e12 / 3600, rel=0.01)
    for bad in ({"mfu": 45.0}, {"mfu": 0.0}, {"gpu": "B200"}, {"gpus": 0}):
        with pytest.raises(ConfigError):
            _cost("125M", **bad)


def test_time_limit_is_the_estimate_plus_margin_in_whole_hours() -> None:
    assert time_limit_hours(10.0, 0.1) == 11  # 10 x 1.1 is 11.000000000000002 in floats
    assert time_limit_hours(10.01, 0.1) == 12
    assert time_limit_hours(0.01, 0.2) == 1  # never zero
    assert time_limit_hours(100.0, 0.0) == 100
    with pytest.raises(ConfigError):
        time_limit_hours(1.0, -0.1)
    assert slurm_time(1) == "01:00:00"
    assert slurm_time(23) == "23:00:00"
    assert slurm_time(24) == "1-00:00:00"
    assert slurm_time(49) == "2-01:00:00"
    assert slurm_time(240) == "10-00:00:00"
    cost = _cost("1.3B", gpus=16)
    request = slurm_request(cost, gpus_per_node=8, cpus_per_gpu=12, margin=0.2)
    assert (request.nodes, request.gpus_per_node, request.cpus_per_task) == (2, 8, 96)
    assert request.hours == time_limit_hours(cost.wall_hours, 0.2)
    assert request.lines()[-1] == f"#SBATCH --time={slurm_time(request.hours)}"
    with pytest.raises(ConfigError, match="do not split"):
        slurm_request(cost, gpus_per_node=6)


def test_measured_mfu_file_is_read_and_the_nearest_size_is_picked(tmp_path: Path) -> None:
    entries = load_measured_mfu()
    assert len(entries) == 8
    h100 = [entry for entry in entries if entry.gpu == "H100"]
    h200 = [entry for entry in entries if entry.gpu == "H200"]
    # H100: the reference trainer's figures; H200: this project's own bench/train.py runs.
    assert all(entry.source == "reference trainer, ../shared/gpu/README.md" for entry in h100)
    assert all(entry.source == "bench/train.py" and entry.command for entry in h200)
    assert nearest_measured(entries, "H100", 13 * 10**9).model == "1.3B"
    assert nearest_measured(entries, "H100", 400 * 10**6).mfu == 0.467  # 350M
    assert nearest_measured(entries, "h200", 175 * 10**9).model == "6.7B"
    assert nearest_measured(entries, "H200", 2_650_000_000).model == "2.7B"
    with pytest.raises(ConfigError, match="no measured MFU for A100"):
        nearest_measured(entries, "A100", 10**9)
    broken = tmp_path / "measured.json"
    data = json.loads(Path("bench/measured_mfu.json").read_text())
    del data["entries"][0]["date"]
    broken.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"entries\[0\]: missing \['date'\]"):
        load_measured_mfu(broken)
    data["entries"][0]["date"] = "2026-11-26"
    data["entries"].append(data["entries"][0])
    broken.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="a second entry for H100 125M"):
        load_measured_mfu(broken)
    with pytest.raises(ConfigError, match="pass --mfu"):
        load_measured_mfu(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("300e9", 3 * 10**11), ("300B", 3 * 10**11), ("300b", 3 * 10**11), ("3e11", 3 * 10**11),
     ("300_000_000_000", 3 * 10**11), ("1.5T", 15 * 10**11), ("500M", 5 * 10**8)],
)  # fmt: skip
def test_token_counts_are_read_with_suffixes(text: str, tokens: int) -> None:
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["300X", "abc", "-5", "0", "", "nan", "inf", "3e", "B"])
def test_bad_token_counts_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--tokens"):
        parse_tokens(text)


def test_gpt3_plan_prints_the_cost_and_the_sbatch_request() -> None:
    runner = CliRunner()
    args = ["--model_size", "125M", "--gpus", "16", "--tokens", "300B", "--gpu", "H200"]
    result = runner.invoke(plan_command, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "cost of 300B tokens (sequences of 2048) on 16 x H200" in out
    assert "measured on H200 125M at seq 1024 x micro-batch 64" in out  # the entry it used
    assert "bench/train.py" in out
    mfu = next(e.mfu for e in load_measured_mfu() if (e.gpu, e.model) == ("H200", "125M"))
    expected = estimate_cost(_model("125M").model, VOCAB, 2048, TOKENS, "H200", 16, mfu)
    assert f"{expected.total_flops:.3e}" in out and f"{expected.gpu_hours:,.0f}" in out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gpus-per-node=8" in out
    assert "#SBATCH --cpus-per-task=64" in out
    hours = time_limit_hours(expected.wall_hours, 0.2)
    assert f"#SBATCH --time={slurm_time(hours)}" in out
    assert re.search(r"memory per GPU +\d+\.\d GiB, DDP", out)

    overridden = runner.invoke(plan_command, [*args, "--mfu", "0.45", "--time_margin", "0"])
    assert overridden.exit_code == 0, overridden.output
    assert "45.0% (--mfu)" in overridden.output and "measured on" not in overridden.output
    far = runner.invoke(plan_command, ["--model_size", "13B", "--gpus", "16"])  # 300B from config
    assert "measured on H100 1.3B" in far.output and "extrapolated" in far.output


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tokens", "300X"], "--tokens '300X' is not a token count; write e.g. 300e9 or 300B"),
        (["--mfu", "45"], "--mfu 45: a fraction in (0, 1]"),
        (["--gpu", "B200"], "--gpu 'B200': no peak known"),
        (["--gpu", "A100"], "no measured MFU for A100"),
    ],
)
def test_bad_cost_inputs_are_one_line_and_exit_2(
    flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        run_command(plan_command, ["--model_size", "125M", "--gpus", "1", *flags])
    assert info.value.code == USER_ERROR_EXIT_CODE
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing of the plan is printed before the error
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert expected in captured.err
