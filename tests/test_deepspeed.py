"""DeepSpeed ZeRO on CPU (gloo, 2 ranks, bf16 and fp32) through the `deepspeed` launcher.

Exact resume is checked across real process restarts for ZeRO-2 bf16 (the command line) and
ZeRO-1 fp32 (params.yaml, as `dvc repro` runs it), ZeRO-3 fp32 (built under
`deepspeed.zero.Init`), and for the other stage/precision pairs in one launch of this file as a
worker (engines rebuilt from the checkpoints on disk). The first
DeepSpeed run compiles a communication op into TORCH_EXTENSIONS_DIR (about a minute, once).

Run as a script under the launcher, this file is that worker:
    deepspeed --num_gpus 2 tests/test_deepspeed.py PREPARED_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, tiny_overrides
from safetensors.torch import load_file

from pipeline.config.loader import load_config
from pipeline.distributed.deepspeed_config import read_deepspeed_json, resolve_deepspeed_config
from pipeline.errors import ConfigError
from pipeline.training.run import train

CONFIGS = REPO_ROOT / "configs"
ZERO1 = str(CONFIGS / "deepspeed_zero1_cpu.json")
ZERO2 = str(CONFIGS / "deepspeed_zero2_cpu.json")
MATRIX = {"zero1-bf16": (ZERO1, "bf16"), "zero2-fp32": (ZERO2, "fp32")}
"""Stage/precision pairs the in-launch worker checks (the others run as separate launches)."""


def _sets(overrides: dict) -> list[str]:
    out: list[str] = []
    for key, value in overrides.items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        out += ["--set", f"{key}={text}"]
    return out


def _plain_env() -> dict[str, str]:
    launcher_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    # DeepSpeed's compiled comm op is cached in the checkout (git-ignored), as the Makefile does.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
    return env | {"PYTHONUNBUFFERED": "1"}


def _deepspeed(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    from pipeline.distributed.launch import free_port

    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    command += ["--master_port", str(free_port()), *args]
    return subprocess.run(
        command, cwd=cwd, env=_plain_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=600,
    )  # fmt: skip


def _curve(run_dir: Path) -> dict[int, str]:
    """Train losses as rank 0 wrote them (6 decimals; exactness is also checked on weights)."""
    lines = (run_dir / "plots" / "train_loss.csv").read_text().splitlines()[1:]
    return {int(step): loss for step, loss in (line.split(",") for line in lines)}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = (
        load_file(a / "model" / "model.safetensors"),
        load_file(b / "model" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].dtype == wb[key].dtype and (wa[key] == wb[key]).all(), f"{key} differs"


# ---------------------------------------------------------------------- config resolution
def _config(prepared: Path, tmp: Path, extra: dict | None = None):
    return load_config(overrides=tiny_overrides(prepared, tmp, extra))


def test_auto_values_come_from_the_project(prepared_dir: Path, tmp_path: Path) -> None:
    config = _config(prepared_dir, tmp_path, {"training.precision": "bf16"})
    data = read_deepspeed_json(CONFIGS / "deepspeed_config.json")
    ds = resolve_deepspeed_config(data, config, world_size=2, source="x.json", cuda=True)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    offload = resolve_deepspeed_config(
        read_deepspeed_json(CONFIGS / "deepspeed_zero3_offload.json"), config, 1, "z3", cuda=True
    )
    assert offload["optimizer"]["params"] == {
        "lr": config.training.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1
    }  # fmt: skip
    assert offload["gradient_accumulation_steps"] == 2
    fp32 = resolve_deepspeed_config(read_deepspeed_json(ZERO1), _config(prepared_dir, tmp_path),
                                    2, "z1", cuda=False)  # fmt: skip
    assert fp32["bf16"]["enabled"] is False and "fp16" not in fp32


def test_a_json_that_contradicts_the_project_is_one_clear_error(
    prepared_dir: Path, tmp_path: Path
) -> None:
    config = _config(prepared_dir, tmp_path, {"training.precision": "bf16"})
    data = {
        "train_batch_size": 16,
        "fp16": {"enabled": True},
        "scheduler": {"type": "WarmupLR"},
        "zero_optimization": {"stage": 3, "sub_group_size": "auto"},
    }
    with pytest.raises(ConfigError) as error:
        resolve_deepspeed_config(data, config, 2, "my.json", cuda=False)
    message = str(error.value)
    for expected in (
        "train_batch_size=16 in my.json contradicts the project's global batch (sequences)=8",
        "fp16.enabled=true in my.json contradicts training.precision=bf16",
        "scheduler in my.json",
        "zero_optimization.sub_group_size in my.json: 'auto' has no project value",
    ):
        assert expected in message, message
    with pytest.raises(ConfigError, match="no fp16 on the CPU"):
        resolve_deepspeed_config(
            {}, _config(prepared_dir, tmp_path, {"training.precision": "fp16"}), 2, "x", False
        )
    with pytest.raises(ConfigError, match="cannot be split into micro-batches of 4 on 3 rank"):
        resolve_deepspeed_config({}, config, 3, "x", cuda=False)
    with pytest.raises(ConfigError, match=r"missing\.json: file not found"):
        read_deepspeed_json(tmp_path / "missing.json")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match=r"binary\.json: not UTF-8 text"):
        read_deepspeed_json(binary)


# ----------------------------------------------------------------------------- launches
def test_zero2_bf16_under_the_deepspeed_launcher_resumes_exactly(
    prepared_dir: Path, tmp_path: Path
) -> None:
    """`deepspeed stages/train.py --deepspeed_config ... --bf16`: 8 steps, then 4 resumed."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    script = [str(REPO_ROOT / "stages" / "train.py"), "--deepspeed_config", ZERO2, "--bf16"]
    proc = _deepspeed([*script, *_sets(tiny_overrides(prepared_dir, full))], tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:]
    checkpoints = full / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000008"
    step4 = checkpoints / "step_0000004"
    shards = sorted(p.name for p in step4.glob("*optim_states.pt"))
    assert len(shards) == 2, "one optimizer shard per rank"
    manifest = (step4 / "checksums.sha256").read_text()
    assert all(name in manifest for name in shards) and "mp_rank_00_model_states.pt" in manifest
    assert not list(checkpoints.glob(".*")), "no temporary folders left"
    assert json.loads((full / "deepspeed_config.json").read_text())["bf16"]["enabled"] is True

    resume = ["--resume_from_checkpoint", str(step4)]
    proc = _deepspeed([*script, *resume, *_sets(tiny_overrides(prepared_dir, resumed))], tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:]
    want = {step: loss for step, loss in _curve(full).items() if step > 4}
    assert _curve(resumed) == want
    _assert_same_weights(full, resumed)  # the exported fp32 master weights, bit for bit


def test_params_yaml_launches_deepspeed_zero1_fp32_and_auto_resumes(
    prepared_dir: Path, tmp_path: Path
) -> None:
    """DVC's one-line command re-launches itself through the deepspeed launcher from params.

    4 steps, then params raised to 8: `--resume_from_checkpoint auto` continues the same run
    (the schedule is fixed by decay_tokens). ZeRO-1 in fp32 matches one process without DeepSpeed.
    `distributed.strategy` is left at `auto`: the MLflow run is tagged with the strategy that
    ran (deepspeed), not the one `auto` means without a DeepSpeed config (ddp).
    """
    run_dir = tmp_path / "run"
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for dotted, value in tiny_overrides(prepared_dir, run_dir).items():
        section, _, key = dotted.rpartition(".")
        (params.setdefault(section, {}) if section else params)[key] = value
    for key in ("model", "training"):
        params[key].pop("config", None)
    params["distributed"] = {
        "launcher": "deepspeed",
        "gpus_per_node": 2,
        "backend": "gloo",
        "deepspeed_config": ZERO1,
    }
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params["tracking"].update(enabled=True, uri=store, experiment="ds", log_checkpoints="none")
    command = [sys.executable, str(REPO_ROOT / "stages" / "train.py")]
    command += ["--resume_from_checkpoint", "auto"]
    run = dict(cwd=tmp_path, env=_plain_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
               text=True, timeout=600)  # fmt: skip
    for steps in (4, 8):
        params["training"]["max_steps"] = steps
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        proc = subprocess.run(command, **run)
        assert proc.returncode == 0, proc.stdout[-5000:]
        assert "starting workers: deepspeed --num_gpus 2" in proc.stdout
    log = (run_dir / "logs" / "training.log").read_text()
    assert "step_0000004 at step 4" in log, log[-2000:]
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["zero_optimization"] == {
        "stage": 1
    }
    reference = tmp_path / "reference"
    single = load_config(
        params_file=tmp_path / "params.yaml",
        overrides={"output_dir": str(reference), "tracking.enabled": False},
    )
    train(single, console=False)  # one process, no DeepSpeed (the strategy defaults to single)
    got, want = _curve(run_dir), _curve(reference)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        assert float(got[step]) == pytest.approx(float(want[step]), rel=1e-5), step

    from mlflow import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("ds").experiment_id])
    tags = [
        (r.data.tags["distributed.strategy"], r.data.tags["distributed.world_size"]) for r in runs
    ]
    assert tags and set(tags) == {("deepspeed", "2")}, tags


ZERO3 = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
    },
}
"""ZeRO-3 on the CPU: no offload, no overlap (the CPU configs' choices for stages 1-2)."""


def test_zero3_built_partitioned_trains_like_one_device_and_resumes(
    prepared_dir: Path, tmp_path: Path
) -> None:
    """`deepspeed stages/train.py` with a ZeRO-3 JSON: the model is built under
    `deepspeed.zero.Init` (each rank holds only its partitions), trains 8 steps with the losses
    of one process without DeepSpeed, and 4 steps resumed from step 4 repeat steps 5-8 exactly."""
    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps(ZERO3))
    full, resumed, single = tmp_path / "full", tmp_path / "resumed", tmp_path / "single"
    script = [str(REPO_ROOT / "stages" / "train.py"), "--deepspeed_config", str(ds_json)]
    proc = _deepspeed([*script, *_sets(tiny_overrides(prepared_dir, full))], tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:]
    resolved = json.loads((full / "deepspeed_config.json").read_text())
    assert resolved["zero_optimization"]["stage"] == 3

    train(load_config(overrides=tiny_overrides(prepared_dir, single)), console=False)
    got, want = _curve(full), _curve(single)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        assert float(got[step]) == pytest.approx(float(want[step]), rel=1e-5), step

    resume = ["--resume_from_checkpoint", str(full / "checkpoints" / "step_0000004")]
    proc = _deepspeed([*script, *resume, *_sets(tiny_overrides(prepared_dir, resumed))], tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert _curve(resumed) == {step: loss for step, loss in got.items() if step > 4}
    _assert_same_weights(full, resumed)


def test_zero_stages_and_precisions_resume_exactly_in_one_launch(
    prepared_dir: Path, tmp_path: Path
) -> None:
    proc = _deepspeed([__file__, str(prepared_dir), str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:]
    for name in MATRIX:
        results = json.loads((tmp_path / f"{name}.json").read_text())
        assert sorted(results["full"], key=int) == [str(s) for s in range(1, 9)]
        split = {**results["first"], **results["resumed"]}
        assert split == results["full"], name
        _assert_same_weights(tmp_path / name / "full", tmp_path / name / "split")


def _matrix_worker(prepared: Path, out: Path) -> None:
    """Under the launcher: each MATRIX pair trains 8 steps, then 4 + 4 resumed from disk."""
    from pipeline.distributed.environment import process_group, read_environment
    from pipeline.distributed.strategy import build_strategy

    with process_group(read_environment(), "gloo", cuda=False) as comm:
        for name, (json_path, precision) in MATRIX.items():
            extra = {"distributed.deepspeed_config": json_path, "training.precision": precision}
            losses = {}
            for phase, folder, steps, resume in (
                ("full", "full", 8, None),
                ("first", "split", 4, None),
                ("resumed", "split", 8, "latest"),
            ):
                overrides = {**extra, "training.max_steps": steps}
                config = load_config(
                    overrides=tiny_overrides(prepared, out / name / folder, overrides)
                )
                strategy = build_strategy("deepspeed", comm, config)
                try:
                    result = train(config, resume=resume, console=False, strategy=strategy)
                finally:
                    strategy.close()
                losses[phase] = result.losses
            if comm.is_main:
                (out / f"{name}.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    _matrix_worker(*(Path(arg) for arg in sys.argv[1:] if not arg.startswith("--local_rank")))
