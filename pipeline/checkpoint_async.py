"""Checkpoint without stopping training for the disk: snapshot to host memory, write behind.

A 1.3B-parameter run's state is ~16 GB (fp32 weights + Adam moments). Writing that takes tens
of seconds; copying it to host memory takes well under one. So a save is split in two:

1. `snapshot`: every tensor of the state is copied into host buffers that are allocated once
   and reused (page-locked when the source is on a GPU, so the copies run at full PCIe speed).
   The training step waits only for this copy.
2. a background thread hands the host copy to `CheckpointManager.save`, which keeps all of its
   guarantees (temporary file, checksum, atomic rename, `latest` moved last). A kill during the
   write leaves the previous checkpoint and `latest` intact, exactly as a synchronous save.

One write is in flight at a time: the next snapshot first waits for the previous write (the
buffers are reused). `wait()` is called before anything reads checkpoints back (resume,
rollback) and before training returns, so "fit returned" still means "checkpoint on disk". An
error in the background write (a full disk) is raised by the next `wait()`/`save()`.

The host copy needs as much memory as the state (16 bytes per parameter: 107 GB at 6.7B).
When that is more than half the host memory available, saves are written directly (a
blocking save streams one tensor at a time) and the log says so once.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint_format import check_state
from pipeline.checkpoint_manager import CheckpointManager

logger = logging.getLogger("pipeline.checkpoint")

HOST_MEMORY_SHARE = 0.5
"""A host copy may take at most this share of the memory available when it is made."""


def tensor_bytes(state: Any) -> int:
    """Bytes of all tensors in a nested state."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(tensor_bytes(v) for v in state)
    return 0


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class HostSnapshot:
    """Reusable host copies of a nested state (dicts, lists, tuples, tensors, plain values)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def copy(self, state: Any) -> Any:
        """A structure equal to `state` whose tensors live in this snapshot's host buffers."""
        copied = self._copy(state, ())
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non_blocking device->host copies have landed
        return copied

    def allocate(self, state: Any, path: tuple[Any, ...] = ()) -> None:
        """Create the buffers `copy(state)` will need, without copying (page-locking 16 GB
        of host memory takes seconds: done ahead, in the background, it stalls nothing)."""
        if isinstance(state, torch.Tensor):
            self._buffer_for(state, path)
        elif isinstance(state, dict):
            for key, item in state.items():
                self.allocate(item, (*path, key))
        elif isinstance(state, list | tuple):
            for i, item in enumerate(state):
                self.allocate(item, (*path, i))

    def _copy(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, path)
        if isinstance(value, dict):
            return {key: self._copy(item, (*path, key)) for key, item in value.items()}
        if isinstance(value, list):
            return [self._copy(item, (*path, i)) for i, item in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(self._copy(item, (*path, i)) for i, item in enumerate(value))
        return value  # ints, floats, strings, None: immutable or rebuilt by state_dict()

    def _copy_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        buffer = self._buffer_for(tensor, path)
        buffer.copy_(tensor.detach(), non_blocking=tensor.device.type == "cuda")
        return buffer

    def _buffer_for(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = tensor.device.type == "cuda"
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buffer
        return buffer


class AsyncCheckpointWriter:
    """Saves through a `CheckpointManager` from a background thread, one save at a time."""

    def __init__(self, manager: CheckpointManager, host_budget: int | None = None) -> None:
        """`host_budget`: bytes a host copy may take (None: half the memory available then)."""
        self.manager = manager
        self.host_budget = host_budget
        self._snapshot = HostSnapshot()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._written: Path | None = None
        self._fits: bool | None = None
        """Does a host copy of the state fit in memory? Decided once, at the first use."""

    def _host_copy_fits(self, state: dict[str, Any]) -> bool:
        if self._fits is None:
            needed = tensor_bytes(state)
            budget = self.host_budget
            if budget is None:
                budget = int(HOST_MEMORY_SHARE * available_host_bytes())
            self._fits = needed <= budget
            if not self._fits:
                logger.warning(
                    "checkpoints are written without a host copy (blocking): the state's "
                    "%.2f GiB exceed the %.2f GiB a copy may take (half the host memory "
                    "available)",
                    needed / 2**30,
                    budget / 2**30,
                )
        return self._fits

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Snapshot `state` (blocking), start writing it; return the path it will have."""
        if self._thread is not None and self._thread.is_alive():
            logger.warning(
                "step %d: the previous checkpoint is still being written; training waits for it "
                "(checkpoint_interval is shorter than one write takes on this disk)",
                step,
            )
        self.wait()
        check_state(state)  # a bad state fails here, in the training thread, not in the writer
        if not self._host_copy_fits(state):
            self._written = self.manager.save(state, step)
            return self._written
        host_state = self._snapshot.copy(state)
        self._thread = threading.Thread(
            target=self._write, args=(host_state, step), name=f"checkpoint-{step}", daemon=False
        )
        self._thread.start()
        return self.manager.path_for(step)

    def preallocate(self, state: dict[str, Any]) -> None:
        """Allocate the host buffers for a state like `state` in the background."""
        self.wait()
        if not self._host_copy_fits(state):
            return
        self._thread = threading.Thread(
            target=self._snapshot.allocate, args=(state,), name="checkpoint-buffers"
        )
        self._thread.start()

    def _write(self, state: dict[str, Any], step: int) -> None:
        try:
            self._written = self.manager.save(state, step)
        except BaseException as exc:  # re-raised in the training thread by wait()
            self._error = exc

    def wait(self) -> Path | None:
        """Block until the write in flight is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._written
