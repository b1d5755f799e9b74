"""The DCP store: sharded (FSDP2) states saved on N ranks load on M, with the guarantees of the
single-file store (checksums, fallback to the newest intact checkpoint, `latest`, keep-N, atomic
publish) and a write that runs behind training.

The multi-rank halves run as 2 spawned gloo processes; the one-rank halves run in the test
process itself, without a process group (how a single-device run uses the store).
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.utils._pytree import tree_map

from pipeline.checkpoint.dcp_store import LOOP_FILE, DCPStore, ModelState, OptimizerState
from pipeline.checkpoint.folders import LATEST, MANIFEST, hash_and_sync
from pipeline.checkpoint.layout import CorruptCheckpointError
from pipeline.distributed.comm import Collective
from pipeline.errors import CheckpointError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Net(torch.nn.Module):
    """Two blocks and a head: enough for per-block `fully_shard` plus the root."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh()) for _ in range(2)]
        )
        self.blocks[1][0] = torch.nn.Linear(10, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(seed: int, shard: bool) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = Net()
    if shard:
        from torch.distributed.fsdp import fully_shard

        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
    return net, torch.optim.AdamW(net.parameters(), lr=0.1)


def train_step(net: Net, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    loss = net(torch.randn(4, 6, generator=g)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def states(net: Net, optimizer: torch.optim.Optimizer, step: int) -> dict:
    return {
        "model": ModelState(net),
        "optimizer": OptimizerState(net, optimizer),
        "trainer": {"step": step, "note": f"saved at {step}"},
    }


def full(net: Net, optimizer: torch.optim.Optimizer) -> dict:
    """Copies of the whole tensors of model and optimizer (gathered when sharded; on one
    process the state dict's tensors are the parameters themselves, hence the clone)."""
    state = {
        "model": get_model_state_dict(net, options=FULL),
        "optimizer": get_optimizer_state_dict(net, optimizer, options=FULL),
    }
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, state)


def assert_same(a: object, b: object, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(a), sorted(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where  # type: ignore[arg-type]
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _worker(rank: int, world: int, init_file: str, directory: str) -> None:
    """One FSDP2 rank: resume the 1-rank checkpoint, then train and save steps 2 and 3."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        comm = Collective(rank, world)
        store = DCPStore(Path(directory), keep=2, comm=comm)
        net, optimizer = build(seed=99, shard=True)
        train_step(net, optimizer, seed=99)  # optimizer state exists, and differs
        path = comm.main_only(lambda: store.resolve("latest"))
        loop = store.restore_states(states(net, optimizer, 0), path)
        record = {"resumed": full(net, optimizer), "loop": loop, "path": str(path)}
        for step in (2, 3):
            train_step(net, optimizer, seed=step)
            store.save_states(states(net, optimizer, step), step)
            record[f"saved_{step}"] = full(net, optimizer)
        record["flushed"] = str(store.flush())
        if rank == 0:
            torch.save(record, Path(directory).parent / "ranks.pt")
        store.close()
    finally:
        dist.destroy_process_group()


def test_sharded_states_reshard_1_to_2_to_1_ranks_and_a_corrupt_shard_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1 rank (plain model, this process) -> 2 FSDP2 ranks (gloo) -> 1 rank, exactly."""
    directory = tmp_path / "checkpoints"
    store = DCPStore(directory, keep=2)
    net, optimizer = build(seed=0, shard=False)
    train_step(net, optimizer, seed=1)
    store.save_states(states(net, optimizer, 1), 1)
    assert store.wait() == directory / "step_0000001"
    saved_here = full(net, optimizer)

    init_file = tmp_path / "rendezvous"
    mp.spawn(_worker, args=(2, str(init_file), str(directory)), nprocs=2, join=True)
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    assert ranks["path"] == str(directory / "step_0000001")
    assert ranks["loop"] == {"step": 1, "note": "saved at 1"}
    assert_same(ranks["resumed"], saved_here)  # 1 -> 2
    assert ranks["flushed"] == str(directory / "step_0000003")
    assert sorted(p.name for p in directory.iterdir()) == [LATEST, "step_0000002", "step_0000003"]
    assert (directory / LATEST).read_text() == "step_0000003\n"

    # 2 -> 1: a plain model in this process gets the gathered tensors exactly.
    path = store.resolve("latest")
    assert path == directory / "step_0000003"
    assert store.inspect(path) == {"step": 3, "note": "saved at 3"}
    loop = store.restore_states(states(net, optimizer, 0), path)
    assert loop == {"step": 3, "note": "saved at 3"}
    assert_same(full(net, optimizer), ranks["saved_3"])

    # A flipped byte in a shard: refused by name; `latest` falls back to the previous one.
    shard = next((directory / "step_0000003").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name} is corrupt"):
        store.resolve(3)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert store.resolve("latest") == directory / "step_0000002"
    assert "trying an older checkpoint" in caplog.text
    store.restore_states(states(net, optimizer, 0), directory / "step_0000002")
    assert_same(full(net, optimizer), ranks["saved_2"])


def test_the_write_runs_behind_training_and_publishes_atomically(tmp_path: Path) -> None:
    """`save_states` returns once the state is copied: changing the weights right after does
    not reach the file; until the write is published there is no `step_N`, and a killed save's
    folder is swept, never read."""
    directory = tmp_path / "checkpoints"
    store = DCPStore(directory, keep=1)
    net, optimizer = build(seed=0, shard=False)
    train_step(net, optimizer, seed=1)
    before = full(net, optimizer)
    killed = store.temp_path_for(5)
    killed.mkdir(parents=True)
    (killed / "__0_0.distcp").write_bytes(b"half a shard")
    final = store.save_states(states(net, optimizer, 5), 5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # the next step changes the weights while the write may still run
    assert store.wait() == final == directory / "step_0000005"
    assert not killed.exists()
    restored, opt2 = build(seed=3, shard=False)
    train_step(restored, opt2, seed=3)
    store.restore_states(states(restored, opt2, 0), final)
    assert_same(full(restored, opt2), before)
    listed = (final / MANIFEST).read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in listed) == sorted(
        p.name for p in final.iterdir() if p.name != MANIFEST
    )
    assert LOOP_FILE in {line.split("  ")[1] for line in listed}

    # keep=1: the next save replaces the folder and `latest` names the new one.
    store.save_states(states(net, optimizer, 6), 6)
    store.wait()
    assert sorted(p.name for p in directory.iterdir()) == [LATEST, "step_0000006"]


def test_a_crafted_index_or_loop_state_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """DCP unpickles `.metadata` without restriction; the store reads it first with one that
    only builds DCP's index, even when the manifest was rewritten to match."""
    directory = tmp_path / "checkpoints"
    store = DCPStore(directory, keep=2, async_save=False)
    net, optimizer = build(seed=0, shard=False)
    path = store.save_states(states(net, optimizer, 1), 1)
    metadata = path / ".metadata"
    metadata.write_bytes(pickle.dumps(os.getcwd))  # a callable: what a payload would reach
    digests = [(p.name, hash_and_sync(p)) for p in sorted(path.iterdir()) if p.name != MANIFEST]
    (path / MANIFEST).write_text("".join(f"{d}  {n}\n" for n, d in digests))
    with pytest.raises(CheckpointError, match=r"refusing DCP checkpoint .*posix\.getcwd"):
        store.inspect(store.resolve("latest"))
    with pytest.raises(CheckpointError, match="refusing"):
        store.restore_states(states(net, optimizer, 0), path)


def test_a_checkpoint_of_another_layout_is_a_clear_error(tmp_path: Path) -> None:
    store = DCPStore(tmp_path / "checkpoints", keep=2)
    with pytest.raises(CheckpointError, match="no intact DCP checkpoint"):
        store.resolve("latest")
    single = tmp_path / "step_0000001.pt"
    single.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a single-file checkpoint"):
        store.resolve(single)
    net, optimizer = build(seed=0, shard=False)
    with pytest.raises(TypeError, match=r"trainer.*object"):
        store.save_states({**states(net, optimizer, 1), "trainer": {"bad": object()}}, 1)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_failed_background_write_is_raised_and_leaves_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    """A file size limit (what a full disk looks like to `write`) fails the write in DCP's
    thread; `wait` raises it, `latest` still names the previous checkpoint, and the next save
    sweeps the unpublished folder."""
    directory = tmp_path / "checkpoints"
    store = DCPStore(directory, keep=3)
    net, optimizer = build(seed=0, shard=False)
    store.save_states(states(net, optimizer, 1), 1)
    store.wait()
    big = {"model": ModelState(torch.nn.Linear(512, 512)), "trainer": {"step": 2}}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, hard))  # 1 MiB of weights do not fit
    try:
        store.save_states(big, 2)
        with pytest.raises(
            CheckpointError, match=r"writing a DCP checkpoint in .* failed .* untouched"
        ):
            store.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert (directory / LATEST).read_text() == "step_0000001\n"
    assert store.resolve("latest") == directory / "step_0000001"
    assert store.temp_path_for(2).exists()  # unpublished, never listed
    assert [step for step, _ in store.list_checkpoints()] == [1]
    store.save_states(states(net, optimizer, 3), 3)
    assert store.wait() == directory / "step_0000003"
    assert not store.temp_path_for(2).exists()
