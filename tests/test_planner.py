"""`gpt3 plan`: memory per GPU from the config alone, through DeepSpeed's own ZeRO estimators."""

from __future__ import annotations

import resource

import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT

from pipeline.cli.plan import plan as plan_command
from pipeline.config.loader import load_config
from pipeline.distributed.planner import (
    GIB,
    SETUPS,
    activation_bytes,
    find_setup,
    make_plan,
    verdict,
)

VOCAB = 50257
LARGE = "configs/training_configs/large_scale.yaml"


def _model(size: str):
    return load_config(model_size=size, training_config=LARGE).model


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)  # model sizes are looked up in configs/model_configs


def _states(size: str, gpus: int, setup_name: str) -> int:
    result = make_plan(_model(size), VOCAB, gpus, min(gpus, 8), 1, 2048)
    return next(row.model_states for row in result.rows if row.setup.name == setup_name)


def test_zero3_model_states_per_gpu_shrink_with_more_gpus() -> None:
    per_gpu = [_states("13B", gpus, "ZeRO-3") for gpus in (8, 16, 64, 256)]
    assert per_gpu == sorted(per_gpu, reverse=True) and len(set(per_gpu)) == 4
    assert per_gpu[0] / per_gpu[-1] > 10  # 18 B/param spread over 8 vs 256 GPUs
    ddp = [_states("13B", gpus, "DDP (fp32 weights, autocast)") for gpus in (8, 256)]
    assert ddp[0] == ddp[1] == 16 * make_plan(_model("13B"), VOCAB, 8, 8, 1, 2048).parameters


def test_175b_is_planned_without_building_the_model() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = make_plan(_model("175B"), VOCAB, 1024, 8, 1, 2048, zero3_init=True)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024, "planning must not allocate the model"
    assert result.parameters == pytest.approx(175e9, rel=0.01)
    zero3 = next(row for row in result.rows if row.setup.name == "ZeRO-3")
    assert zero3.model_states < 8 * GIB  # 18 B/param over 1024 GPUs + the largest layer
    # The trainer builds ZeRO-3 under deepspeed.zero.Init: its partitions (650 GiB / 1024) and
    # the embedding (617M parameters) twice in fp32, so the sharded states fit an 80 GiB GPU.
    largest = 4 * result.largest_layer
    assert zero3.build == 4 * (result.parameters // 1024) + 2 * largest < 6 * GIB
    assert verdict(zero3, 80 * GIB, None) in ("yes", "ckpt")
    whole = make_plan(_model("175B"), VOCAB, 1024, 8, 1, 2048, zero3_init=False)
    zero3_whole = next(row for row in whole.rows if row.setup.name == "ZeRO-3")
    assert zero3_whole.build == 4 * result.parameters  # the old build: a whole fp32 replica
    assert verdict(zero3_whole, 80 * GIB, None) == "no (build)"
    fsdp = next(row for row in result.rows if row.setup.name == "FSDP x TP 8")
    assert fsdp.build < 10 * GIB and verdict(fsdp, 80 * GIB, None) == "yes"  # micro-batch 1


def test_gradient_checkpointing_cuts_activations_and_changes_the_verdict() -> None:
    model = _model("1.3B")
    full = activation_bytes(model, VOCAB, 8, 2048, checkpointing=False)
    ckpt = activation_bytes(model, VOCAB, 8, 2048, checkpointing=True)
    assert ckpt < full / 3
    result = make_plan(model, VOCAB, 1, 1, 8, 2048)
    ddp = result.rows[0]
    memory = (ddp.with_checkpointing + ddp.with_activations) // 2
    assert verdict(ddp, memory, None) == "ckpt"
    assert verdict(ddp, ddp.with_activations, None) == "yes"
    assert verdict(ddp, ddp.with_activations, host_memory=1) == "no (host)"
    assert find_setup(3, "cpu") in SETUPS and find_setup(None, "none").zero is None


def test_gpt3_plan_command_prints_the_table() -> None:
    runner = CliRunner()
    args = ["--model_size", "13B", "--gpus", "16", "--zero", "3", "--offload", "cpu"]
    result = runner.invoke(plan_command, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "12,853,386,240 parameters" in out and "2 node(s) x 8" in out
    assert "micro-batch 4 x 2048" in out  # large_scale.yaml's micro-batch
    chosen = [line for line in out.splitlines() if "<- chosen" in line]
    assert len(chosen) == 1 and chosen[0].startswith("ZeRO-3 + offload optimizer ")
    bad = runner.invoke(
        plan_command, ["--model_size", "13B", "--gpus", "12", "--gpus_per_node", "8"]
    )
    assert bad.exit_code != 0 and "not a multiple" in str(bad.exception)


MEASURED = REPO_ROOT / "bench" / "results" / "h200-2026-11-26.jsonl"


def _measured_rows() -> list[dict]:
    import json

    return [json.loads(line) for line in MEASURED.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("row", _measured_rows(), ids=lambda row: row["case"])
def test_activation_model_predicts_measured_gpu_peaks_within_ten_percent(row: dict) -> None:
    """Peak GPU memory measured by bench/train.py on an H200 (the project's own train command,
    bf16, torch.compile) vs the planner's single-GPU figure: weights, gradients and Adam in
    fp32 (16 bytes per parameter) plus activations, with full, partial or no checkpointing."""
    from pipeline.model import count_parameters

    model = _model(row["model"])
    settings = row["settings"]
    params = count_parameters(model, 50304)
    acts = activation_bytes(
        model,
        50304,
        row["micro_batch"],
        row["seq"],
        bool(settings.get("training.gradient_checkpointing")),
        settings.get("training.gradient_checkpointing_blocks"),
    )
    predicted = (16 * params + acts) / GIB
    assert predicted == pytest.approx(row["peak_gpu_gib"], rel=0.10)


def test_partial_checkpointing_sits_between_none_and_full() -> None:
    model = _model("2.7B")
    full = activation_bytes(model, VOCAB, 8, 2048, checkpointing=True)
    none = activation_bytes(model, VOCAB, 8, 2048, checkpointing=False)
    partial = activation_bytes(model, VOCAB, 8, 2048, True, checkpointed_layers=20)
    assert full < partial < none
    assert activation_bytes(model, VOCAB, 8, 2048, True, checkpointed_layers=32) == full


def test_partial_optimizer_offload_fits_6_7b_next_to_an_80_gb_gpu() -> None:
    """6.7B on one 80 GB GPU and 128 GiB of host: whole-optimizer offload needs more host memory
    than that (as measured on such a machine: 121 GiB in use, then killed), no offload more GPU
    memory; offloading 55% of the optimizer (configs/deepspeed_zero3_partial_offload.json) sits
    between and fits both, with gradient checkpointing."""
    result = make_plan(_model("6.7B"), 50304, 1, 1, 4, 2048)
    rows = {row.setup.name: row for row in result.rows}
    partial = rows["ZeRO-3 + offload 55% of optimizer"]
    none, whole = rows["ZeRO-3"], rows["ZeRO-3 + offload optimizer"]
    assert whole.model_states < partial.model_states < none.model_states
    assert none.host_per_node < partial.host_per_node < whole.host_per_node
    gpu, host = 80 * GIB, 125 * GIB
    assert verdict(partial, gpu, host) == "ckpt"
    assert verdict(whole, gpu, host).startswith("no") and verdict(none, gpu, host) == "no"


def test_the_partial_offload_config_resolves() -> None:
    from pipeline.distributed.deepspeed_config import read_deepspeed_json, resolve_deepspeed_config

    path = REPO_ROOT / "configs" / "deepspeed_zero3_partial_offload.json"
    config = load_config(
        model_size="6.7B",
        training_config=LARGE,
        overrides={"training.precision": "bf16", "training.micro_batch_size": 4},
    )
    ds = resolve_deepspeed_config(read_deepspeed_json(path), config, 1, str(path), cuda=True)
    offload = ds["zero_optimization"]["offload_optimizer"]
    assert (ds["zero_optimization"]["stage"], offload["device"], offload["ratio"]) == (
        3,
        "cpu",
        0.55,
    )
    assert ds["bf16"]["enabled"] is True and ds["train_micro_batch_size_per_gpu"] == 4
