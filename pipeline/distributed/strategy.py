"""How the plain model is wrapped, stepped and checkpointed: one small class per strategy.

The trainer calls the same hooks whatever runs underneath:

    prepare(parts, config)       wrap the model (DDP, a DeepSpeed engine) into `parts.forward`
    micro_step(last)             context for one micro-batch; gradients sync only on the last
    backward(parts, loss)        loss -> gradients (scaled for fp16 where the strategy owns it)
    step(trainer) -> grad norm   clip and update once per global batch
    save(trainer) / load(trainer, which) / flush_checkpoints()
    export_model(parts)          the full fp32 model on rank 0 (None elsewhere)

`single` and `ddp` share the trainer's own clipping/loss scaling and its single-file checkpoints
(written by rank 0; each rank's RNG state is gathered into them); `deepspeed` hands stepping,
precision and sharded checkpoints to the DeepSpeed engine. Strategies are chosen by name from
`STRATEGIES`, never by a chain of ifs in the loop.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.checkpoint import CheckpointManager
from pipeline.checkpoint.async_writer import AsyncCheckpointWriter
from pipeline.config.schema import Config
from pipeline.distributed.comm import Collective
from pipeline.errors import ConfigError
from pipeline.model import GPT
from pipeline.rng import restore_rng_state
from pipeline.run_lock import RunLock
from pipeline.training.components import with_attention_backend

if TYPE_CHECKING:
    from pipeline.training.components import TrainingComponents
    from pipeline.training.trainer import Trainer

logger = logging.getLogger("pipeline.train")
T = TypeVar("T")


class SingleDevice:
    """One process on one device: the trainer's own step and single-file checkpoints."""

    name = "single"

    def __init__(self, comm: Collective | None = None, config: Config | None = None) -> None:
        self.comm = comm or Collective()
        self.config = config
        self.writer: AsyncCheckpointWriter | None = None
        """Background checkpoint writer (rank 0) when training.async_checkpoint is on."""

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def is_main(self) -> bool:
        return self.comm.is_main

    def main_only(self, fn: Callable[[], T]) -> T:
        return self.comm.main_only(fn)

    def any_rank(self, flag: bool) -> bool:
        return self.comm.any(flag)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.comm.mean(value)

    @contextlib.contextmanager
    def run_lock(self, directory: Path) -> Iterator[None]:
        """Rank 0 holds the output directory's lock for the job; a refusal ends every rank."""
        held: list[RunLock] = []
        self.main_only(lambda: held.append(RunLock(directory).acquire()))
        try:
            yield
        finally:
            for lock in held:
                lock.release()

    def prepare(self, parts: TrainingComponents, config: Config) -> None:
        """Nothing to wrap on one device."""

    def checkpoint_store(self, directory: Path, keep: int) -> Any:
        manager = CheckpointManager(directory, keep=keep)
        if self.config is not None and self.config.training.async_checkpoint and self.is_main:
            self.writer = AsyncCheckpointWriter(manager)
        return manager

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, parts: TrainingComponents, loss: torch.Tensor) -> None:
        parts.precision.scale(loss).backward()

    def step(self, trainer: Trainer) -> float:
        return trainer._clip_and_step()

    def save(self, trainer: Trainer) -> Path:
        """Rank 0 writes one file holding every rank's RNG state (gathered, in rank order)."""
        state = trainer.state_dict()
        ranks = self.comm.all_gather_object(state["rng"])
        if self.comm.distributed:
            state["rng_ranks"] = ranks
        step = trainer.progress.step
        if self.writer is not None:  # snapshot to host now, write in the background
            return self.main_only(lambda: self.writer.save(state, step))
        return self.main_only(lambda: trainer.checkpoints.save(state, step))

    def prepare_checkpoint_buffers(self, trainer: Trainer) -> None:
        """After the first step (the optimizer state exists): allocate the host buffers of the
        background writer ahead of the first save, so that save stalls only for the copy."""
        if self.writer is not None and trainer.parts.device.type == "cuda":
            self.writer.preallocate(trainer.state_dict())

    def flush_checkpoints(self, collective: bool = True) -> None:
        """Wait until the checkpoint being written in the background is on disk.

        Collective by default: a failed write on rank 0 ends every rank with the same error
        (exit code 2 for a `CheckpointError`). `collective=False` only waits here, for a rank
        that is already failing and must not block in a collective on its way out.
        """
        if not collective:
            if self.writer is not None:
                self.writer.wait()
            return
        self.main_only(lambda: self.writer.wait() if self.writer is not None else None)

    def load(self, trainer: Trainer, which: str | Path) -> Path:
        """Rank 0 resolves `which` (e.g. `latest`) to one file; every rank then loads that file."""
        self.flush_checkpoints()
        loaded: dict[str, Any] = {}

        def resolve() -> Path:
            loaded["state"], path = trainer.checkpoints.load(which)
            return path

        path = self.main_only(resolve)
        state = loaded["state"] if self.is_main else trainer.checkpoints.load(path)[0]
        trainer.load_state_dict(state, path)
        restore_rank_rng(state, self.rank, self.world_size)
        return path

    def export_model(self, parts: TrainingComponents) -> GPT | None:
        return parts.model if self.is_main else None

    def close(self) -> None:
        """Release what the strategy holds before the process group goes away."""


class DataParallel(SingleDevice):
    """DistributedDataParallel: gradients averaged over ranks once per global batch."""

    name = "ddp"

    def __init__(self, comm: Collective | None = None, config: Config | None = None) -> None:
        super().__init__(comm, config)
        self.module: DistributedDataParallel | None = None

    def prepare(self, parts: TrainingComponents, config: Config) -> None:
        seed_rank(config.seed, self.rank)
        device = parts.device
        device_ids = None
        if device.type == "cuda":
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
        # gradient_as_bucket_view: gradients live in DDP's buckets, no second copy.
        self.module = DistributedDataParallel(
            parts.model, device_ids=device_ids, gradient_as_bucket_view=True
        )
        t = config.training
        # compile_scope blocks: build_components already compiled the blocks in place.
        whole = t.compile and t.compile_scope == "model"
        forward = torch.compile(self.module) if whole else self.module
        parts.forward = with_attention_backend(forward, t.attention_backend)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """All-reduce on the last micro-batch only; the others accumulate locally (no_sync)."""
        assert self.module is not None, "prepare() first"
        return contextlib.nullcontext() if last else self.module.no_sync()


def seed_rank(seed: int, rank: int) -> None:
    """Give each rank its own torch stream (dropout masks) once the identical model is built.

    Without this every rank would draw the same dropout masks for different data. The stream
    is derived from (seed, rank), so it is reproducible and independent of the world size.
    """
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def restore_rank_rng(state: dict[str, Any], rank: int, world_size: int) -> None:
    """Restore this rank's own RNG state from a checkpoint that holds every rank's."""
    ranks = state.get("rng_ranks")
    if ranks is None:
        if world_size > 1:
            logger.warning("the checkpoint holds one RNG state; every rank restores it")
        return
    if len(ranks) != world_size:
        logger.warning(
            "the checkpoint has RNG states of %d rank(s), this run has %d: random draws "
            "(dropout) will not match the original run",
            len(ranks),
            world_size,
        )
    restore_rng_state(ranks[rank % len(ranks)])


STRATEGIES: dict[str, str] = {
    "single": "pipeline.distributed.strategy:SingleDevice",
    "ddp": "pipeline.distributed.strategy:DataParallel",
    "deepspeed": "pipeline.distributed.deepspeed_engine:DeepSpeedStrategy",
}
"""Strategy name -> "module:class", imported on use (DeepSpeed takes seconds to import)."""


def choose_strategy(config: Config, world_size: int) -> str:
    """Resolve `distributed.strategy` (auto picks by DeepSpeed config and world size)."""
    d = config.distributed
    name = d.strategy
    if name == "auto":
        name = "deepspeed" if d.deepspeed_config else "ddp" if world_size > 1 else "single"
    if name == "fsdp":
        raise ConfigError("distributed.strategy fsdp is not implemented; use ddp or deepspeed")
    if name == "deepspeed" and not d.deepspeed_config:
        raise ConfigError(
            "distributed.strategy deepspeed needs a DeepSpeed JSON: --deepspeed_config PATH"
        )
    if name != "deepspeed" and d.deepspeed_config:
        raise ConfigError(
            f"--deepspeed_config {d.deepspeed_config} contradicts distributed.strategy {name}"
        )
    if name == "single" and world_size > 1:
        raise ConfigError(
            f"distributed.strategy single cannot train on {world_size} processes; use ddp"
        )
    return name


def build_strategy(name: str, comm: Collective, config: Config) -> SingleDevice:
    """Instantiate a strategy by its registry name."""
    module_name, attribute = STRATEGIES[name].split(":")
    cls = getattr(importlib.import_module(module_name), attribute)
    return cls(comm, config)
