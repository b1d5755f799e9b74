"""Checkpoints written in the background, partial gradient checkpointing, the attention backend.

Real trainers on the CPU; the background writer goes through the real CheckpointManager.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from pipeline.checkpoint import CheckpointManager
from pipeline.checkpoint.async_writer import AsyncCheckpointWriter, HostSnapshot, tensor_bytes
from pipeline.config.loader import load_config
from pipeline.errors import CheckpointError
from pipeline.training.run import train
from pipeline.training.trainer import Trainer


def _config(prepared: Path, run_dir: Path, extra: dict | None = None):
    return load_config(overrides=tiny_overrides(prepared, run_dir, extra))


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "latest_checkpoint.pt", weights_only=True)


def _assert_same_tensors(a: object, b: object, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")


def test_background_checkpoints_equal_blocking_ones_and_resume_exactly(
    prepared_dir: Path, tmp_path: Path
) -> None:
    blocking = train(
        _config(prepared_dir, tmp_path / "sync", {"training.async_checkpoint": False}),
        console=False,
    )
    background = train(_config(prepared_dir, tmp_path / "async"), console=False)
    assert background.losses == blocking.losses
    for step in (4, 8):  # every checkpoint is on disk when train() returns, and identical
        name = f"checkpoints/step_{step:07d}.pt"
        sync_state = torch.load(tmp_path / "sync" / name, weights_only=True)
        async_state = torch.load(tmp_path / "async" / name, weights_only=True)
        for key in ("model", "optimizer", "sampler", "progress", "rng"):
            _assert_same_tensors(sync_state[key], async_state[key], key)
    # A run stopped at step 4 and resumed from its background-written checkpoint ends the same.
    split = tmp_path / "split"
    train(_config(prepared_dir, split, {"training.max_steps": 4}), console=False)
    rest = train(_config(prepared_dir, split), resume="latest", console=False)
    assert rest.losses == {s: v for s, v in blocking.losses.items() if s > 4}
    _assert_same_tensors(_checkpoint(tmp_path / "sync")["model"], _checkpoint(split)["model"])


def test_snapshot_reuses_its_buffers_and_is_independent_of_the_source() -> None:
    snapshot = HostSnapshot()
    weights = torch.arange(6, dtype=torch.float32)
    state = {"model": {"w": weights}, "optimizer": [weights * 2, 3], "step": 7}
    first = snapshot.copy(state)
    weights.add_(100)  # training goes on after the snapshot
    assert first["model"]["w"].tolist() == [0, 1, 2, 3, 4, 5]
    assert first["optimizer"][1] == 3 and first["step"] == 7
    second = snapshot.copy(state)
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr(), "buffer reused"
    assert second["model"]["w"].tolist() == [100, 101, 102, 103, 104, 105]
    assert tensor_bytes(state) == 2 * 6 * 4


def test_a_failed_background_write_is_raised_by_the_next_wait(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep=2)
    writer = AsyncCheckpointWriter(manager)
    writer.save({"model": {"w": torch.ones(3)}}, 1)
    assert writer.wait() == manager.path_for(1)
    with pytest.raises(TypeError, match="bad"):  # a bad state fails before any copy or thread
        writer.save({"model": {"w": torch.ones(3)}, "bad": object()}, 2)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the checkpoint folder should be")
    writer = AsyncCheckpointWriter(CheckpointManager(blocked / "ckpt", keep=2))
    writer.save({"model": {"w": torch.ones(3)}}, 3)  # returns at once; the write fails behind
    with pytest.raises(CheckpointError):
        writer.wait()
    assert writer.wait() is None, "the error is raised once"


def test_a_state_too_big_for_host_memory_is_saved_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep=2)
    writer = AsyncCheckpointWriter(manager, host_budget=8)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        path = writer.save({"model": {"w": torch.ones(3)}}, 5)
    assert path.is_file(), "written before save() returned"
    assert "without a host copy (blocking)" in caplog.text


def _block_calls(trainer: Trainer) -> list[int]:
    """Forward calls of each block during one optimizer step (recomputation included)."""
    calls = [0] * len(trainer.parts.model.h)
    hooks = [
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(trainer.parts.model.h)
    ]
    trainer.train_step()
    for hook in hooks:
        hook.remove()
    return calls


def test_checkpointing_the_first_blocks_recomputes_only_those(
    prepared_dir: Path, tmp_path: Path
) -> None:
    def calls(extra: dict) -> list[int]:
        return _block_calls(Trainer(_config(prepared_dir, tmp_path / str(len(extra)), extra)))

    ckpt = {"training.gradient_checkpointing": True}
    # 2 blocks, 2 micro-batches per step: each block runs twice, recomputed blocks twice more.
    assert calls({}) == [2, 2]
    assert calls(ckpt) == [4, 4]
    assert calls({**ckpt, "training.gradient_checkpointing_blocks": 1}) == [4, 2]


def test_checkpointing_some_blocks_changes_nothing_but_memory(
    prepared_dir: Path, tmp_path: Path
) -> None:
    runs = {
        name: train(_config(prepared_dir, tmp_path / name, extra), console=False)
        for name, extra in {
            "none": {},
            "all": {"training.gradient_checkpointing": True},
            "first": {
                "training.gradient_checkpointing": True,
                "training.gradient_checkpointing_blocks": 1,
            },
        }.items()
    }
    assert runs["all"].losses == runs["none"].losses == runs["first"].losses
    _assert_same_tensors(
        _checkpoint(tmp_path / "none")["model"], _checkpoint(tmp_path / "first")["model"]
    )


def test_tied_weights_are_copied_and_saved_once(tmp_path: Path) -> None:
    from collections import OrderedDict

    from pipeline.model import GPT

    config = load_config(
        model_size="tiny", overrides={"training.max_steps": 1, "training.global_batch_size": 1}
    )
    state = GPT(config.model, 512).state_dict()
    assert isinstance(state, OrderedDict) and hasattr(state, "_metadata")
    copied = HostSnapshot().copy({"model": state})["model"]
    assert copied["wte.weight"] is copied["lm_head.weight"], "one buffer for the tied weight"
    assert type(copied) is OrderedDict and copied._metadata == state._metadata
    torch.save(state, tmp_path / "direct.pt")
    torch.save(copied, tmp_path / "snapshot.pt")
    tied = state["wte.weight"].numel() * 4
    difference = (tmp_path / "snapshot.pt").stat().st_size - (tmp_path / "direct.pt").stat().st_size
    assert abs(difference) < tied / 10, "the tied weight is written once (only metadata differs)"
    assert tensor_bytes(state) == sum(
        t.numel() * t.element_size() for k, t in state.items() if k != "lm_head.weight"
    )


def test_the_math_attention_kernel_trains_like_the_default(
    prepared_dir: Path, tmp_path: Path
) -> None:
    default = train(
        _config(prepared_dir, tmp_path / "auto", {"training.max_steps": 3}), console=False
    )
    extra = {"training.max_steps": 3, "training.attention_backend": "math"}
    math_kernel = train(_config(prepared_dir, tmp_path / "math", extra), console=False)
    for step, loss in default.losses.items():
        assert math_kernel.losses[step] == pytest.approx(loss, rel=1e-4)
