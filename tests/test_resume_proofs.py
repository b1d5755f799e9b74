"""Resume proofs stricter than Megatron's functional resume test (issue 18, item 8).

One uninterrupted reference run saves a checkpoint after every step. Resumed from five points
it must give every later step's loss, learning rate and gradient norm equal to the reference
as `float.hex`, and the same final weights:

- mid-accumulation: a run killed inside step 6's gradient accumulation, resumed from step 5;
- the end of the warm-up (step 3), a checkpoint interval (step 4), the LR milestone where the
  cosine decay reaches its floor (step 7) and the last step (step 9, one step left).

On one device here, and with 2 DDP ranks (gloo) in one `torch.distributed.run` launch of this
file as a worker. The data-order ledger then shows that across a kill mid-accumulation on 2
ranks, a resume on 1 rank, a `kill -9` and a last resume, the finished run consumed the
stream's windows 0..N-1 once each: none skipped, none twice.

Run as a script under torch.distributed.run, this file is that worker:
    python -m torch.distributed.run --nproc_per_node 2 tests/test_resume_proofs.py PREPARED OUT
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT, set_args, tiny_overrides, train_cli
from mlflow_support import poll

from pipeline.checkpoint import CheckpointManager
from pipeline.config.loader import load_config
from pipeline.config.schema import Config
from pipeline.distributed.data_parallel import SingleDevice
from pipeline.training.data_ledger import LEDGER_FILE, read_ledger
from pipeline.training.trainer import Trainer

STEPS, SEQ, BATCH = 10, 64, 16
TOKENS_PER_STEP = SEQ * BATCH
POINTS = {"end of warm-up": 3, "checkpoint interval": 4, "LR milestone": 7, "last step": 9}
KILLED_IN_STEP = 6


def _config(prepared: Path, run_dir: Path, extra: dict | None = None) -> Config:
    values = {
        "model.dropout": 0.1,  # dropout draws random numbers: the RNG state must resume too
        "training.global_batch_size": BATCH,
        "training.max_steps": STEPS,
        "training.warmup_tokens": 3 * TOKENS_PER_STEP,
        "training.decay_tokens": 7 * TOKENS_PER_STEP,
        "training.checkpoint_interval": 1,
        "training.keep_checkpoints": STEPS + 1,
        "training.eval_interval": 100,
        **(extra or {}),
    }
    return load_config(overrides=tiny_overrides(prepared, run_dir, values))


class Recorder:
    """A tracker that keeps each step's loss, LR and gradient norm as `float.hex`."""

    def __init__(self) -> None:
        self.steps: dict[int, list[str]] = {}

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if "train/loss" in metrics:
            keys = ("train/loss", "train/lr", "train/grad_norm")
            self.steps[step] = [float(metrics[key]).hex() for key in keys]


class Killed(BaseException):
    """Raised from inside a forward pass: the process dies there as far as training knows."""


def _kill_in_forward(trainer: Trainer, forward_number: int) -> None:
    count = [0]

    def hook(module: torch.nn.Module, args: Any) -> None:
        count[0] += 1
        if count[0] == forward_number:
            raise Killed

    trainer.parts.model.register_forward_pre_hook(hook)


def _fit(config: Config, make: Callable[[Config], SingleDevice], resume: Path | str | None = None,
         kill_at_forward: int | None = None) -> dict[int, list[str]]:  # fmt: skip
    trainer = Trainer(config, strategy=make(config))
    try:
        if resume is not None:
            trainer.resume(resume)
        if kill_at_forward is not None:
            _kill_in_forward(trainer, kill_at_forward)
        recorder = Recorder()
        with contextlib.suppress(Killed):
            trainer.fit(recorder)
        return recorder.steps
    finally:
        trainer.strategy.close()


def proofs(prepared: Path, out: Path, make: Callable[[Config], SingleDevice], world: int) -> dict:
    """Reference run, the five resumes, and the ledger's first leg (2 ranks when `world` is 2)."""
    reference_dir = out / "reference"
    reference = _fit(_config(prepared, reference_dir), make)
    results: dict[str, Any] = {"reference": reference, "resumed": {}}
    for name, step in POINTS.items():
        checkpoint = reference_dir / "checkpoints" / f"step_{step:07d}.pt"
        results["resumed"][name] = _fit(_config(prepared, out / name), make, resume=checkpoint)
    accumulation = BATCH // (4 * world)
    mid = (KILLED_IN_STEP - 1) * accumulation + accumulation // 2 + 1  # before this forward
    killed = _config(prepared, out / "mid-accumulation")
    before = _fit(killed, make, kill_at_forward=mid)
    assert sorted(before) == list(range(1, KILLED_IN_STEP)), sorted(before)
    results["resumed"]["mid-accumulation"] = _fit(killed, make, resume="latest")
    ledger = _config(prepared, out / "ledger", {"training.data_ledger": True,
                                                "training.checkpoint_interval": 2})  # fmt: skip
    inside_step_4 = 3 * accumulation + accumulation // 2 + 1  # latest checkpoint: step 2
    _fit(ledger, make, kill_at_forward=inside_step_4)
    return results


def _check(results: dict, out: Path) -> None:
    reference = {int(k): v for k, v in results["reference"].items()}
    assert sorted(reference) == list(range(1, STEPS + 1))
    lrs = [float.fromhex(reference[s][1]) for s in range(1, STEPS + 1)]
    # Step 4 is the first at the peak (warm-up ended with step 3); from step 8 the floor.
    assert lrs[2] < lrs[3] == max(lrs) and lrs[7] == lrs[9] < lrs[6], "points not as planned"
    starts = {**POINTS, "mid-accumulation": KILLED_IN_STEP - 1}
    for name, start in starts.items():
        resumed = {int(k): v for k, v in results["resumed"][name].items()}
        want = {step: reference[step] for step in range(start + 1, STEPS + 1)}
        assert resumed == want, f"resumed at {name} (step {start}): {resumed} != {want}"
        final = CheckpointManager(out / name / "checkpoints", keep=1).load("latest")[0]["model"]
        expected = torch.load(out / "reference" / "checkpoints" / "latest_checkpoint.pt",
                              weights_only=True)["model"]  # fmt: skip
        assert all(torch.equal(final[k], expected[k]) for k in expected), name


def test_five_resume_points_on_one_device(prepared_dir: Path, tmp_path: Path) -> None:
    _check(proofs(prepared_dir, tmp_path, lambda c: SingleDevice(config=c), 1), tmp_path)


@pytest.fixture(scope="module")
def ddp_launch(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This file as a worker on 2 gloo ranks; its results and run folders."""
    from pipeline.distributed.launch import free_port

    out = tmp_path_factory.mktemp("resume-ddp")
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), __file__, str(prepared_dir), str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out


def test_five_resume_points_on_two_ddp_ranks(ddp_launch: Path) -> None:
    _check(json.loads((ddp_launch / "results.json").read_text()), ddp_launch)


def test_the_data_order_ledger_has_no_gap_and_no_repeat(
    ddp_launch: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    """2 ranks killed inside step 4 (latest: step 2), then 1 rank from there, `kill -9`-ed,
    then a last resume to the end: every window of stream positions 0..N-1 exactly once."""
    run_dir = ddp_launch / "ledger"
    extra = {"training.data_ledger": True, "training.checkpoint_interval": 2,
             "training.max_steps": 30, "training.log_interval": 1}  # fmt: skip
    proc = train_cli([*set_args(tiny_overrides(prepared_dir, run_dir, _ledger_values(extra))),
                      "--resume_from_checkpoint", "latest"], tmp_path)  # fmt: skip
    ledger = run_dir / "logs" / LEDGER_FILE

    def far_enough() -> bool:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        return max(read_ledger(ledger), default=0) >= 6

    poll(far_enough, 300, "the resumed run to reach step 6")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(read_ledger(ledger))
    assert killed_at < 30, "the run finished before the kill"
    config = load_config(overrides=tiny_overrides(prepared_dir, run_dir, _ledger_values(extra)))
    trainer = Trainer(config)
    trainer.resume("latest")
    assert trainer.progress.step <= killed_at
    trainer.fit(Recorder())

    steps = read_ledger(ledger)
    assert sorted(steps) == list(range(1, 31))
    consumed = [window for step in sorted(steps) for window in steps[step]]
    expected = trainer.parts.sampler.window_ids(0, 30 * BATCH).tolist()
    assert len(consumed) == len(set(consumed)) == 30 * BATCH, "a window was consumed twice"
    assert consumed == expected, "a window was skipped or the order changed"
    text = ledger.read_text()
    assert text.count('"step":3,') == 2, "the kill inside step 4 did not make step 3 redone"


def _ledger_values(extra: dict) -> dict:
    values = {
        "model.dropout": 0.1,
        "training.global_batch_size": BATCH,
        "training.warmup_tokens": 3 * TOKENS_PER_STEP,
        "training.decay_tokens": 7 * TOKENS_PER_STEP,
        "training.keep_checkpoints": 2,
        "training.eval_interval": 100,
    }
    return {**values, **extra}


def _worker(prepared: Path, out: Path) -> None:
    from pipeline.distributed.environment import process_group, read_environment
    from pipeline.distributed.strategy import build_strategy

    with process_group(read_environment(), "gloo", cuda=False) as comm:
        results = proofs(prepared, out, lambda c: build_strategy("ddp", comm, c), comm.world_size)
        if comm.is_main:
            (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(*(Path(arg) for arg in sys.argv[1:3]))
