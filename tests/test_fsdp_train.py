"""`distributed.strategy: fsdp` through `stages/train.py` on CPU (gloo), issue 19 items 3 and 5.

Two ranks under FSDP2 train the single-process run's loss curve (same global batch, each rank
its slice); the run's sharded checkpoint of step 4 then resumes on one rank and continues with
the same losses (DCP reshards 2 -> 1), in a new output folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import set_args, tiny_overrides
from test_distributed import assert_close_curves, curve, run_stage

from pipeline.config.loader import load_config
from pipeline.training.run import train

FSDP = {"distributed.strategy": "fsdp"}
STAGE_TIMEOUT = 600  # seconds: tens unloaded, but a shared 2-core box has needed over 300


@pytest.fixture(scope="module")
def reference(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(load_config(overrides=tiny_overrides(prepared_dir, run_dir)), console=False)
    return run_dir


def test_fsdp_on_two_ranks_trains_as_one_and_resumes_on_one(
    prepared_dir: Path, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "fsdp"
    two = ["--gpus_per_node", "2", "--distributed_backend", "gloo"]
    args = [*two, *set_args(tiny_overrides(prepared_dir, run_dir, FSDP))]
    proc = run_stage(args, tmp_path, timeout=STAGE_TIMEOUT)
    assert proc.returncode == 0, proc.stdout
    assert_close_curves(curve(run_dir), curve(reference), rel=1e-5)
    step4 = run_dir / "checkpoints" / "step_0000004"
    assert (step4 / ".metadata").is_file() and len(list(step4.glob("__*_0.distcp"))) == 2

    resumed_dir = tmp_path / "resumed"
    one = ["--resume_from_checkpoint", str(step4)]
    args = [*one, *set_args(tiny_overrides(prepared_dir, resumed_dir, FSDP))]
    proc = run_stage(args, tmp_path, timeout=STAGE_TIMEOUT)
    assert proc.returncode == 0, proc.stdout
    resumed = curve(resumed_dir)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert_close_curves(resumed, {s: v for s, v in curve(run_dir).items() if s > 4}, rel=1e-5)
