"""The single-device trainer: exact resume, precision, checkpointing and the seed command line.

Real data (a prepared slice of Shakespeare), real models, real optimizer steps on the CPU.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, set_args, tiny_overrides, train_cli

from pipeline.config.loader import load_config
from pipeline.errors import CheckpointError
from pipeline.training.run import train
from pipeline.training.trainer import Trainer


def _config(prepared: Path, run_dir: Path, extra: dict | None = None):
    return load_config(overrides=tiny_overrides(prepared, run_dir, extra))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "latest_checkpoint.pt", weights_only=True)
    return state["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bitwise_exact(prepared_dir: Path, tmp_path: Path, precision: str) -> None:
    extra = {"training.precision": precision, "model.dropout": 0.1}
    full = train(_config(prepared_dir, tmp_path / "full", extra), console=False)
    half = train(
        _config(prepared_dir, tmp_path / "split", {**extra, "training.max_steps": 4}),
        console=False,
    )
    assert half.progress.step == 4
    rest = train(_config(prepared_dir, tmp_path / "split", extra), resume="latest", console=False)
    assert rest.progress.step == 8
    resumed = {**half.losses, **rest.losses}
    assert resumed == full.losses, "losses differ step by step after a resume"
    assert sorted(full.losses) == list(range(1, 9))
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "split"))


def test_loss_decreases_and_outputs_are_written(prepared_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    extra = {
        "training.max_steps": 60,
        "training.lr": 3e-3,
        "training.decay_tokens": None,
        "training.eval_interval": 30,
        "training.checkpoint_interval": 20,
    }
    result = train(_config(prepared_dir, run_dir, extra), console=False)
    assert result.losses[60] < result.losses[1] - 1.0, result.losses
    assert result.val_losses[60] < result.val_losses[30] + 0.1
    for path in (
        "logs/training.log",
        "resolved_config.yaml",
        "metrics/train.json",
        "plots/train_loss.csv",
        "plots/val_loss.csv",
        "model/model.safetensors",
        "model/config.yaml",
        "model/tokenizer.json",
        "model/meta.json",
        "checkpoints/latest_checkpoint.pt",
    ):
        assert (run_dir / path).is_file(), path
    assert list((run_dir / "logs").glob("tb/*/events.out.tfevents.*")), "no TensorBoard events"
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert steps == ["step_0000040.pt", "step_0000060.pt"], "keep_checkpoints=2 not applied"
    log = (run_dir / "logs" / "training.log").read_text()
    assert "step 60: loss" in log and "val loss" in log


def test_gradient_checkpointing_gives_the_same_losses(prepared_dir: Path, tmp_path: Path) -> None:
    extra = {"training.max_steps": 3}
    plain = train(_config(prepared_dir, tmp_path / "a", extra), console=False)
    ckpt = train(
        _config(prepared_dir, tmp_path / "b", {**extra, "training.gradient_checkpointing": True}),
        console=False,
    )
    for step, loss in plain.losses.items():
        assert ckpt.losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(
    prepared_dir: Path, tmp_path: Path
) -> None:
    config = _config(prepared_dir, tmp_path / "fp16", {"training.precision": "fp16"})
    trainer = Trainer(config)
    trainer.parts.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    before = {k: v.clone() for k, v in trainer.parts.model.state_dict().items()}
    trainer.train_step()
    assert trainer.progress.skipped_steps == 1
    assert trainer.parts.precision.loss_scale() < 2.0**100
    _assert_same_weights(before, trainer.parts.model.state_dict())
    # The scaler halves the scale on each overflow until a step goes through.
    for _ in range(120):
        skipped = trainer.progress.skipped_steps
        trainer.train_step()
        if trainer.progress.skipped_steps == skipped:
            break
    else:
        pytest.fail("the loss scale never came down far enough for a step to succeed")
    assert trainer.parts.precision.loss_scale() < 2.0**30
    changed = trainer.parts.model.state_dict()
    assert any(not torch.equal(before[k], changed[k]) for k in before), "no update applied"


def test_resume_with_a_different_shape_is_refused(prepared_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(_config(prepared_dir, run_dir, {"training.max_steps": 4}), console=False)
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    wider = _config(prepared_dir, run_dir, {"model.n_layer": 3})
    with pytest.raises(CheckpointError, match=r"model\.n_layer: checkpoint 2 != config 3"):
        train(wider, resume="latest", console=False)
    after = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    assert before == after


def test_auto_resume_continues_only_an_interrupted_run(prepared_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    extra = {"training.max_steps": 4}
    first = train(_config(prepared_dir, run_dir, {"training.max_steps": 2}), console=False)
    assert sorted(first.losses) == [1, 2]
    # Same config but a longer run: the checkpoint at step 2 is an interrupted run -> continue.
    continued = train(_config(prepared_dir, run_dir, extra), resume="auto", console=False)
    assert sorted(continued.losses) == [3, 4]
    # A changed config must not resume.
    changed = {**extra, "training.lr": 1e-4}
    again = train(_config(prepared_dir, run_dir, changed), resume="auto", console=False)
    assert sorted(again.losses) == [1, 2, 3, 4]
    (previous,) = run_dir.glob("checkpoints.previous-*")
    assert (previous / "latest_checkpoint.pt").is_file()
    # A finished run of the same config is retrained from scratch, identically.
    rerun = train(_config(prepared_dir, run_dir, changed), resume="auto", console=False)
    assert rerun.losses == again.losses


def test_sigterm_checkpoints_and_resume_continues_exactly(
    prepared_dir: Path, tmp_path: Path
) -> None:
    extra = {
        "training.max_steps": 400,
        "training.decay_tokens": 400 * 8 * 64,
        "training.checkpoint_interval": 1000,
        "training.log_interval": 1,
    }
    reference = train(
        _config(prepared_dir, tmp_path / "ref", {**extra, "training.max_steps": 30}),
        console=False,
    )
    run_dir = tmp_path / "run"
    args = set_args(tiny_overrides(prepared_dir, run_dir, extra))
    proc = train_cli(args, tmp_path)
    log = run_dir / "logs" / "training.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "step 5: loss" in log.read_text()):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "training did not start"
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    stopped = torch.load(run_dir / "checkpoints" / "latest_checkpoint.pt", weights_only=True)
    stop_step = stopped["progress"]["step"]
    assert 5 <= stop_step < 400
    assert "resume with --resume_from_checkpoint latest" in output
    # Resume to step 30 and compare with the uninterrupted reference.
    if stop_step < 30:
        resumed = train(
            _config(prepared_dir, run_dir, {**extra, "training.max_steps": 30}),
            resume="latest",
            console=False,
        )
        for step, loss in resumed.losses.items():
            assert loss == reference.losses[step], f"step {step}"
        _assert_same_weights(_weights(tmp_path / "ref"), _weights(run_dir))


def test_seed_command_line_flags(prepared_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "flags"
    overrides = tiny_overrides(prepared_dir, run_dir, {"training.max_steps": 2})
    overrides.pop("output_dir")
    args = [
        "--config",
        str(REPO_ROOT / "configs/model_configs/tiny.yaml"),
        "--training_config",
        str(REPO_ROOT / "configs/training_configs/cpu_debug.yaml"),
        "--seed",
        "7",
        "--output_dir",
        str(run_dir),
        "--fp16",
        "--gradient_checkpointing",
        "--distributed_backend",
        "gloo",
        "--num_nodes",
        "1",
        "--gpus_per_node",
        "1",
        "--local_rank=0",
        *set_args(overrides),
    ]
    proc = train_cli(args, tmp_path)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    resolved = (run_dir / "resolved_config.yaml").read_text()
    for expected in (
        "seed: 7",
        "precision: fp16",
        "gradient_checkpointing: true",
        "backend: gloo",
        "config: " + str(REPO_ROOT / "configs/model_configs/tiny.yaml"),
    ):
        assert expected in resolved, expected
    proc = train_cli([*args, "--max_steps", "3", "--resume_from_checkpoint", "latest"], tmp_path)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    state = torch.load(run_dir / "checkpoints" / "latest_checkpoint.pt", weights_only=True)
    assert state["progress"]["step"] == 3


def test_bad_flags_exit_2_and_write_nothing() -> None:
    experiments = REPO_ROOT / "experiments"
    before = sorted(experiments.iterdir()) if experiments.exists() else []
    for args, message in [
        (["--model_size", "1.4B"], "did you mean '1.3B'"),
        (["--fp16", "--bf16"], "mutually exclusive"),
        (["--set", "training.lrr=1"], "did you mean 'training.lr'"),
        (["--config", "nope.yaml"], "config file nope.yaml not found"),
    ]:
        proc = train_cli(args, REPO_ROOT)
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 2, output
        assert message in output and "Traceback" not in output, output
    after = sorted(experiments.iterdir()) if experiments.exists() else []
    assert after == before
