"""Resharding resume through DCP (issue 19, items 5 and 6): a checkpoint saved in one layout
continues in another with the uninterrupted run's losses (4 -> 2 ranks and 2x2 -> FSDP 4 in the
second test).

The states are what the FSDP strategy checkpoints (model and optimizer through
`torch.distributed.checkpoint`, fused q/k/v stored as `(3, inner, d)` views). Saved halfway by
tensor parallel on 2 ranks, the run continues on one device, under FSDP on 2 ranks and again
under TP 2 (bitwise there: nothing about the layout changed); saved on one device, it continues
under FSDP 2. TP with and without sequence parallelism resume each other's checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from parallel_support import Job, single, spawn

HALF = 3
REL = 1e-5
SEQUENCE_PARALLEL = {"tensor_parallel": 2, "sequence_parallel": True}


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == HALF
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= REL * abs(b), f"step {HALF + step}: {a} vs {b}"


def test_checkpoints_reshard_between_one_device_fsdp_and_tensor_parallel(tmp_path: Path) -> None:
    reference = single(Job(steps=2 * HALF))["loss"]
    tp_ckpt, single_ckpt = str(tmp_path / "tp2"), str(tmp_path / "single")
    sp_ckpt = str(tmp_path / "tp2-sequence-parallel")

    uninterrupted_tp, first_half, sp_first_half = spawn(
        [
            Job(world_size=2, tensor_parallel=2, steps=2 * HALF),
            Job(world_size=2, tensor_parallel=2, steps=HALF, save_dir=tp_ckpt),
            Job(world_size=2, steps=HALF, save_dir=sp_ckpt, **SEQUENCE_PARALLEL),
        ],
        tmp_path / "save",
    )
    assert_close(first_half["loss"], reference[:HALF])
    assert_close(sp_first_half["loss"], reference[:HALF])

    on_one_device = single(Job(steps=HALF, first_step=HALF, load_dir=tp_ckpt))
    assert_close(on_one_device["loss"], reference[HALF:])
    single(Job(steps=HALF, save_dir=single_ckpt))  # the first half again, saved on one device

    resumed = {"first_step": HALF, "steps": HALF, "world_size": 2}
    fsdp_from_tp, tp_from_tp, fsdp_from_single, sp_from_tp, tp_from_sp = spawn(
        [
            Job(tensor_parallel=1, load_dir=tp_ckpt, **resumed),
            Job(tensor_parallel=2, load_dir=tp_ckpt, **resumed),
            Job(tensor_parallel=1, load_dir=single_ckpt, **resumed),
            Job(load_dir=tp_ckpt, **SEQUENCE_PARALLEL, **resumed),
            Job(tensor_parallel=2, load_dir=sp_ckpt, **resumed),
        ],
        tmp_path / "load",
    )
    assert_close(fsdp_from_tp["loss"], reference[HALF:])
    assert_close(fsdp_from_single["loss"], reference[HALF:])
    # Sequence parallelism changes no parameter's placement: its checkpoints are TP's.
    assert_close(sp_from_tp["loss"], reference[HALF:])
    assert_close(tp_from_sp["loss"], reference[HALF:])
    assert tp_from_tp["loss"] == uninterrupted_tp["loss"][HALF:]  # same layout: bitwise


def test_checkpoints_reshard_from_four_ranks_to_two_and_from_fsdp_x_tp_to_fsdp(
    tmp_path: Path,
) -> None:
    """The issue's cases on 4 ranks: FSDP 4 -> FSDP 2, FSDP x TP 2x2 -> FSDP 4, and FSDP 4 ->
    FSDP 4 (bitwise: nothing about the layout changed). Saves and the 4-rank loads share one
    spawn (its jobs run in order); the 2-rank load is a second."""
    reference = single(Job(steps=2 * HALF))["loss"]
    fsdp4_ckpt, both_ckpt = str(tmp_path / "fsdp4"), str(tmp_path / "fsdp2xtp2")
    resumed = {"first_step": HALF, "steps": HALF}
    uninterrupted, fsdp4_half, both_half, fsdp4_from_both, fsdp4_from_fsdp4 = spawn(
        [
            Job(world_size=4, steps=2 * HALF),
            Job(world_size=4, steps=HALF, save_dir=fsdp4_ckpt),
            Job(world_size=4, tensor_parallel=2, steps=HALF, save_dir=both_ckpt),
            Job(world_size=4, load_dir=both_ckpt, **resumed),
            Job(world_size=4, load_dir=fsdp4_ckpt, **resumed),
        ],
        tmp_path / "four",
    )
    assert_close(fsdp4_half["loss"], reference[:HALF])
    assert_close(both_half["loss"], reference[:HALF])
    assert_close(fsdp4_from_both["loss"], reference[HALF:])
    assert fsdp4_from_fsdp4["loss"] == uninterrupted["loss"][HALF:]  # same layout: bitwise

    (fsdp2_from_fsdp4,) = spawn(
        [Job(world_size=2, load_dir=fsdp4_ckpt, **resumed)], tmp_path / "two"
    )
    assert_close(fsdp2_from_fsdp4["loss"], reference[HALF:])
