"""`distributed.strategy: fsdp` through `stages/train.py` on CPU (gloo), issue 19 items 3 and 5.

Two ranks under FSDP2 train the single-process run's loss curve (same global batch, each rank
its slice). Then both directions of "single device -> FSDP 2 and back", each in a new output
folder: the sharded checkpoint of step 4 resumes as a plain single-device run (DCP gathers the
shards into one model), and the single-device run's one-file checkpoint of step 4 resumes under
FSDP on 2 ranks; both continue with the uninterrupted run's losses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import set_args, tiny_overrides
from test_distributed import assert_close_curves, curve, run_stage

from pipeline.config.loader import load_config
from pipeline.distributed.data_parallel import sharded_checkpoint
from pipeline.distributed.fsdp_strategy import newer_single_file
from pipeline.errors import CheckpointError
from pipeline.training.run import train

FSDP = {"distributed.strategy": "fsdp"}
COMPILED_FOUR_STEPS = {
    "training.compile": True,
    "training.compile_scope": "blocks",
    "training.gradient_checkpointing": True,
    "training.max_steps": 4,
}
"""Each block compiled in place (inductor) and recomputed in the backward, for 4 steps."""
STAGE_TIMEOUT = 600  # seconds: tens unloaded, but a shared 2-core box has needed over 300


@pytest.fixture(scope="module")
def reference(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(load_config(overrides=tiny_overrides(prepared_dir, run_dir)), console=False)
    return run_dir


def test_fsdp_on_two_ranks_trains_as_one_and_resumes_on_one_device_and_back(
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
    later = {s: v for s, v in curve(reference).items() if s > 4}

    on_one_device = tmp_path / "single"  # strategy auto: one process, one plain model
    overrides = tiny_overrides(prepared_dir, on_one_device)
    train(load_config(overrides=overrides), console=False, resume=str(step4))
    assert_close_curves(curve(on_one_device), later, rel=1e-5)
    assert list((on_one_device / "checkpoints").glob("step_0000008.pt"))  # its own format

    back_to_fsdp = tmp_path / "fsdp_again"
    one_file = reference / "checkpoints" / "step_0000004.pt"
    args = [*two, "--resume_from_checkpoint", str(one_file)]
    args += set_args(tiny_overrides(prepared_dir, back_to_fsdp, FSDP))
    proc = run_stage(args, tmp_path, timeout=STAGE_TIMEOUT)
    assert proc.returncode == 0, proc.stdout
    assert_close_curves(curve(back_to_fsdp), later, rel=1e-5)

    # A run that changed strategy midway holds both layouts: whoever resumes takes the newest.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copytree(step4, mixed / step4.name)
    for name in ("step_0000008.pt", "step_0000008.pt.sha256"):
        shutil.copy(reference / "checkpoints" / name, mixed / name)
    assert sharded_checkpoint(mixed, "single") is None  # step 8's file, not step 4's folder
    assert newer_single_file(mixed, mixed) == mixed / "step_0000008.pt"
    shutil.copytree(run_dir / "checkpoints" / "step_0000008", mixed / "step_0000008")
    # A tie goes to the resuming strategy's own layout.
    assert sharded_checkpoint(mixed, "single") is None
    assert newer_single_file("latest", mixed) is None
    (mixed / "step_0000008.pt").rename(mixed / "step_0000002.pt")  # the folder is newer now
    assert sharded_checkpoint(mixed, "single") == mixed
    (mixed / "step_0000008" / ".metadata").unlink()  # what a DeepSpeed folder looks like
    with pytest.raises(CheckpointError, match="is a DeepSpeed checkpoint folder"):
        sharded_checkpoint(mixed / "step_0000008", "single")


def test_fsdp_composes_with_per_block_compile_and_activation_checkpointing(
    prepared_dir: Path, reference: Path, tmp_path: Path
) -> None:
    """Each block compiled in place (inductor, before `fully_shard` wraps it) and recomputed in
    the backward, on 2 ranks: the same losses as the plain single-device run, within the
    reordering of float sums that compiled kernels bring."""
    run_dir = tmp_path / "compiled"
    extra = {
        **FSDP,
        **COMPILED_FOUR_STEPS,
    }
    _assert_four_compiled_steps_match(prepared_dir, reference, run_dir, extra)


def test_tensor_parallel_with_sequence_parallel_compiled_through_the_stage(
    prepared_dir: Path, reference: Path, tmp_path: Path
) -> None:
    """The README's TP launch on 2 ranks: one tensor-parallel group (heads, MLP and the tied
    head split two ways, norms sequence-parallel), each block compiled and recomputed, trains
    the single-device losses (within compiled kernels' reordering of float sums), and its
    checkpoint is a DCP folder like FSDP's."""
    run_dir = tmp_path / "tp"
    extra = {
        **FSDP,
        "distributed.tensor_parallel": 2,
        "distributed.sequence_parallel": True,
        **COMPILED_FOUR_STEPS,
    }
    _assert_four_compiled_steps_match(prepared_dir, reference, run_dir, extra)
    assert (run_dir / "checkpoints" / "step_0000004" / ".metadata").is_file()


def _assert_four_compiled_steps_match(
    prepared_dir: Path, reference: Path, run_dir: Path, extra: dict[str, object]
) -> None:
    """Train `extra` on 2 ranks through the stage; its 4 losses must be the single-device run's
    within the reordering of float sums that compiled kernels bring."""
    two = ["--gpus_per_node", "2", "--distributed_backend", "gloo"]
    proc = run_stage([*two, *set_args(tiny_overrides(prepared_dir, run_dir, extra))],
                     run_dir.parent, timeout=STAGE_TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    first = {step: loss for step, loss in curve(reference).items() if step <= 4}
    assert_close_curves(curve(run_dir), first, rel=1e-4)
