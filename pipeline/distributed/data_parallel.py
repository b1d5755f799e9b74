"""The replicated strategies: one device (`single`) and DistributedDataParallel (`ddp`).

Both step through `MixedPrecision.unscale_clip_step` (autocast, fp16 loss scaling, clipping)
and write single-file checkpoints from rank 0, holding every rank's RNG state (gathered, in
rank order). `CollectiveStrategy` is the part any strategy over a `Collective` shares (rank,
world size, the loop's collectives, the run lock); other strategies build on it.
See `pipeline.distributed.strategy` for the protocol.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.checkpoint import CheckpointManager
from pipeline.checkpoint.async_writer import AsyncCheckpointWriter
from pipeline.checkpoint.dcp_store import (
    DCPStore,
    ModelState,
    OptimizerState,
    is_dcp_folder,
    newest_steps,
)
from pipeline.checkpoint.folders import MANIFEST
from pipeline.config.schema import Config
from pipeline.distributed.comm import Collective
from pipeline.distributed.strategy import CompatibilityCheck, StepResult, Wrapped
from pipeline.distributed.tensor_parallel import checkpoint_states
from pipeline.errors import CheckpointError
from pipeline.model import GPT
from pipeline.run_lock import RunLock
from pipeline.training.components import compiled_forward, with_attention_backend
from pipeline.training.precision import MixedPrecision

logger = logging.getLogger("pipeline.train")
T = TypeVar("T")

WEIGHT_STATES = ("model", "optimizer", "scaler")
"""The named states a single-file checkpoint holds besides the trainer's loop state."""


class CollectiveStrategy:
    """Rank, world size and the collectives of the loop, over one `Collective`."""

    name = "base"

    def __init__(self, comm: Collective | None = None, *, config: Config) -> None:
        self.comm = comm or Collective()
        self.config = config

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

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
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

    def with_rank_rng(self, loop_state: dict[str, Any], always: bool = False) -> dict[str, Any]:
        """`loop_state` plus `rng_ranks`: every rank's RNG state, gathered in rank order
        (collective). One process adds it only when `always` (today's single-file format)."""
        ranks = self.comm.all_gather_object(loop_state["rng"])
        if always or self.comm.distributed:
            return {**loop_state, "rng_ranks": ranks}
        return loop_state

    def close(self) -> None:
        """Release what the strategy holds before the process group goes away."""


class SingleDevice(CollectiveStrategy):
    """One process on one device: the plain (or compiled) model and single-file checkpoints."""

    name = "single"

    def __init__(self, comm: Collective | None = None, *, config: Config) -> None:
        super().__init__(comm, config=config)
        self.writer: AsyncCheckpointWriter | None = None
        """Background checkpoint writer (rank 0) when training.async_checkpoint is on."""
        self.model: GPT | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.precision: MixedPrecision | None = None
        self.store: CheckpointManager | None = None

    # ------------------------------------------------------------------------- the step
    def wrap(
        self, model: GPT, optimizer: torch.optim.Optimizer, precision: MixedPrecision
    ) -> Wrapped:
        """Compile as training.compile says; nothing else to wrap on one device."""
        self.model, self.optimizer, self.precision = model, optimizer, precision
        t = self.config.training
        forward = with_attention_backend(compiled_forward(model, t), t.attention_backend)
        return Wrapped(forward=forward, optimizer=optimizer, precision=precision)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        assert self.precision is not None, "wrap() first"
        self.precision.scale(loss).backward()

    def step(self) -> StepResult:
        assert self.precision is not None and self.optimizer is not None, "wrap() first"
        result = self.precision.unscale_clip_step(self.optimizer, self.config.training.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        return result

    # ----------------------------------------------------------------------- checkpoints
    def checkpoint_store(self, directory: Path, keep: int) -> CheckpointManager:
        self.store = CheckpointManager(directory, keep=keep)
        if self.config.training.async_checkpoint and self.is_main:
            self.writer = AsyncCheckpointWriter(self.store)
        return self.store

    def _full_state(self, loop_state: dict[str, Any]) -> dict[str, Any]:
        assert self.model is not None and self.optimizer is not None and self.precision
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.state_dict(),
            **loop_state,
        }

    def save(self, loop_state: dict[str, Any], step: int) -> Path:
        """Rank 0 writes one file holding every rank's RNG state (gathered, in rank order)."""
        state = self._full_state(self.with_rank_rng(loop_state))
        store, writer = self.store, self.writer
        assert store is not None, "checkpoint_store() first"
        if writer is not None:  # snapshot to host now, write in the background
            return self.main_only(lambda: writer.save(state, step))
        return self.main_only(lambda: store.save(state, step))

    def prepare_checkpoint_buffers(self, loop_state: dict[str, Any]) -> None:
        """After the first step (the optimizer state exists): allocate the host buffers of the
        background writer ahead of the first save, so that save stalls only for the copy."""
        assert self.model is not None
        device = next(self.model.parameters()).device
        if self.writer is not None and device.type == "cuda":
            self.writer.preallocate(self._full_state(loop_state))

    def flush_checkpoints(self, collective: bool = True) -> None:
        """Wait until the checkpoint being written in the background is on disk.

        Collective by default: a failed write on rank 0 ends every rank with the same error
        (exit code 2 for a `CheckpointError`). `collective=False` only waits here, for a rank
        that is already failing and must not block in a collective on its way out.
        """
        writer = self.writer
        if not collective:
            if writer is not None:
                writer.wait()
            return
        self.main_only(lambda: writer.wait() if writer is not None else None)

    def load(self, which: str | Path, check: CompatibilityCheck) -> tuple[dict[str, Any], Path]:
        """Rank 0 resolves `which` (e.g. `latest`) to one file; every rank then loads that file,
        checks it fits this run and restores model, optimizer and loss scaler from it."""
        self.flush_checkpoints()
        store = self.store
        assert store is not None, "checkpoint_store() first"
        sharded = sharded_checkpoint(Path(which), self.name)
        if sharded is not None:
            return self._load_sharded(sharded, check)
        loaded: dict[str, Any] = {}

        def resolve() -> Path:
            loaded["state"], path = store.load(which)
            return path

        path = self.main_only(resolve)
        state = loaded["state"] if self.is_main else store.load(path)[0]
        check(state, path)
        self._restore_weights(state, path)
        return state, path

    def _load_sharded(self, source: Path, check: CompatibilityCheck) -> tuple[dict, Path]:
        """Resume from a sharded (`fsdp`, any layout) run's DCP folder: every rank reads the
        whole model and optimizer state from the shards (DCP reshards to one plain copy).

        The folder is verified (manifest checksums, restricted index) on rank 0 before any
        shard is read; nothing is written into the source's directory.
        """
        assert self.model is not None and self.optimizer is not None and self.precision
        reader = DCPStore(source.parent, keep=1, comm=self.comm, async_save=False)
        try:
            path = self.main_only(lambda: reader.resolve(source))  # verified (checksums)
            loop = self.comm.broadcast_object(reader.loop_state(path) if self.is_main else None)
            check(loop, path)
            states = checkpoint_states(
                {
                    "model": ModelState(self.model),
                    "optimizer": OptimizerState(self.model, self.optimizer),
                }
            )
            states["scaler"] = self.precision
            restored = reader.restore_states(states, path)
        finally:
            reader.close()
        return restored, path

    def _restore_weights(self, state: dict[str, Any], source: Path) -> None:
        missing = [key for key in WEIGHT_STATES if key not in state]
        if missing:
            raise CheckpointError(f"{source}: not a full training checkpoint (no {missing})")
        assert self.model is not None and self.optimizer is not None and self.precision
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.precision.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{source}: cannot restore it: {first}") from exc

    def export_model(self, model: GPT) -> GPT | None:
        return model if self.is_main else None


class DataParallel(SingleDevice):
    """DistributedDataParallel: gradients averaged over ranks once per global batch."""

    name = "ddp"

    def __init__(self, comm: Collective | None = None, *, config: Config) -> None:
        super().__init__(comm, config=config)
        self.module: DistributedDataParallel | None = None

    def wrap(
        self, model: GPT, optimizer: torch.optim.Optimizer, precision: MixedPrecision
    ) -> Wrapped:
        self.model, self.optimizer, self.precision = model, optimizer, precision
        t = self.config.training
        if t.compile and t.compile_scope == "blocks":
            compiled_forward(model, t)  # each block compiled in place, before DDP wraps them
        seed_rank(self.config.seed, self.rank)
        device = next(model.parameters()).device
        device_ids = None
        if device.type == "cuda":
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
        # gradient_as_bucket_view: gradients live in DDP's buckets, no second copy.
        self.module = DistributedDataParallel(
            model, device_ids=device_ids, gradient_as_bucket_view=True
        )
        whole = t.compile and t.compile_scope == "model"
        forward = torch.compile(self.module) if whole else self.module
        forward = with_attention_backend(forward, t.attention_backend)
        return Wrapped(forward=forward, optimizer=optimizer, precision=precision)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """All-reduce on the last micro-batch only; the others accumulate locally (no_sync)."""
        assert self.module is not None, "wrap() first"
        return contextlib.nullcontext() if last else self.module.no_sync()

    def close(self) -> None:
        """Drop the DDP wrapper while the process group is still registered.

        DDP's C++ Reducer holds a reference to the group, and Python frees the Reducer with the
        GIL held. Were that the group's last reference (the group already destroyed, DDP freed
        later with the caller's locals), gloo's destructor would join its worker thread, which
        may need the GIL to free the tensors of its last collective: a rank hung at exit after
        "done" (seen in CI). Freed here, the Reducer only lets go of its reference, and
        `destroy_process_group` frees the group with the GIL released.
        """
        self.module = None
        gc.collect()  # a reference cycle through the wrapper must not free it later
        super().close()


def sharded_checkpoint(which: Path, strategy: str) -> Path | None:
    """The DCP folder (or directory of them) `which` names, if the newest checkpoint it names is
    one: a `step_*` folder written by the fsdp strategy, or a run's (checkpoints) directory
    whose newest checkpoint is such a folder (a newer `step_*.pt` there wins). None for
    everything else (`latest` of this run, a step number, a one-file checkpoint: today's paths).
    A DeepSpeed folder is refused here, with what `strategy` does read."""
    text = str(which)
    if text == "latest" or text.isdigit():
        return None
    if is_dcp_folder(which):
        return which
    if (which / MANIFEST).is_file():
        raise CheckpointError(
            f"{which} is a DeepSpeed checkpoint folder, which only DeepSpeed resumes "
            f"(--deepspeed_config); strategy {strategy} reads a one-file checkpoint (.pt) or a "
            "sharded (fsdp) checkpoint folder"
        )
    for directory in (which, which / "checkpoints"):
        folder_step, file_step = newest_steps(directory)
        if folder_step is not None and (file_step is None or folder_step > file_step):
            return directory
    return None


def seed_rank(seed: int, rank: int) -> None:
    """Give each rank its own torch stream (dropout masks) once the identical model is built.

    Without this every rank would draw the same dropout masks for different data. The stream
    is derived from (seed, rank), so it is reproducible and independent of the world size.
    """
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
