"""The `Store` interface over named states, the single-file store behind it (today's format,
both ways), and the package's one atomic-write helper."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import (
    LATEST_NAME,
    CheckpointManager,
    CorruptCheckpointError,
    SingleFileStore,
    Store,
    atomic_write,
    load_verified,
)
from pipeline.checkpoint.dcp_store import DCPStore
from pipeline.checkpoint.deepspeed_store import DeepSpeedStore
from pipeline.errors import CheckpointError


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_every_store_offers_the_one_interface(tmp_path: Path) -> None:
    for store in (
        SingleFileStore(tmp_path / "a", keep=2),
        DeepSpeedStore(tmp_path / "b", keep=2),
        DCPStore(tmp_path / "c", keep=2),
    ):
        assert isinstance(store, Store), type(store).__name__


@pytest.mark.parametrize("async_write", [False, True])
def test_single_file_store_writes_and_reads_todays_format(
    tmp_path: Path, async_write: bool
) -> None:
    store = SingleFileStore(tmp_path, keep=2, async_write=async_write)
    model, optimizer = _model_and_optimizer(0)
    loop = {"step": 5, "rng": {"torch": torch.get_rng_state()}}
    states = {"model": model, "optimizer": optimizer, "trainer": loop}
    path = store.save_states(states, 5)
    assert store.wait() == (path if async_write else None)
    # the flat dict every existing checkpoint holds, loadable by hand
    on_disk = torch.load(tmp_path / LATEST_NAME, weights_only=True)
    assert sorted(on_disk) == ["model", "optimizer", "rng", "step"]
    assert torch.equal(on_disk["model"]["weight"], model.weight)

    fresh, fresh_opt = _model_and_optimizer(1)
    assert not torch.equal(fresh.weight, model.weight)
    resolved = store.resolve("latest")
    loop_back = store.restore_states({"model": fresh, "optimizer": fresh_opt}, resolved)
    assert loop_back["step"] == 5 and torch.equal(loop_back["rng"]["torch"], loop["rng"]["torch"])
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )


def test_a_checkpoint_written_the_old_way_restores_through_the_store(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    old = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3}
    CheckpointManager(tmp_path, keep=1).save(old, 3)
    store = SingleFileStore(tmp_path, keep=1)
    fresh, fresh_opt = _model_and_optimizer(1)
    loop = store.restore_states({"model": fresh, "optimizer": fresh_opt}, store.resolve(3))
    assert loop == {"step": 3}
    assert torch.equal(fresh.bias, model.bias)
    with pytest.raises(CheckpointError, match="no 'scaler' state"):
        store.restore_states({"scaler": torch.amp.GradScaler("cpu")}, store.resolve("latest"))
    with pytest.raises(TypeError, match="reuses the names"):
        store.save_states({"model": model, "trainer": {"model": 1}}, 4)
    assert load_verified(store.path_for(3))["step"] == 3


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "latest"
    atomic_write(target, "step_0000001\n")
    atomic_write(target, b"step_0000002\n")
    assert target.read_text() == "step_0000002\n"
    blocked = tmp_path / "a_folder"
    (blocked / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        atomic_write(blocked, "text")  # os.replace cannot put a file over a folder
    assert sorted(os.listdir(tmp_path)) == ["a_folder", "latest"]  # no temporary file left


def test_single_file_resolve_falls_back_by_checksum_without_loading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SingleFileStore(tmp_path, keep=3)
    model, _ = _model_and_optimizer(0)
    for step in (1, 2):
        store.save_states({"model": model, "trainer": {"step": step}}, step)
    assert store.resolve("latest") == store.path_for(2)
    data = bytearray(store.path_for(2).read_bytes())  # `latest` is a hard link to it
    data[-5] ^= 0xFF
    store.path_for(2).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert store.resolve("latest") == store.path_for(1)
        assert store.resolve(tmp_path) == store.path_for(1)  # a directory means its latest
    assert "trying an older one" in caplog.text
    with pytest.raises(CorruptCheckpointError, match=r"step_0000002\.pt is corrupt"):
        store.resolve(2)
    with pytest.raises(CheckpointError, match=r"no checkpoint step_0000007\.pt .*present: 1, 2"):
        store.resolve(7)


def test_the_deepspeed_store_takes_the_engine_and_the_loop_state_only(tmp_path: Path) -> None:
    """DeepSpeed saves model, optimizer and scaler itself: named states other than the engine
    and the loop state would be silently dropped, so they are refused before anything runs."""
    store = DeepSpeedStore(tmp_path, keep=2)
    model, optimizer = _model_and_optimizer(0)
    with pytest.raises(TypeError, match=r"got keys \['engine', 'optimizer', 'trainer'\]"):
        store.save_states({"engine": object(), "optimizer": optimizer, "trainer": {}}, 1)
    with pytest.raises(TypeError, match=r"got keys \['model'\]"):
        store.restore_states({"model": model}, tmp_path / "step_0000001")
    assert not any(tmp_path.iterdir())
