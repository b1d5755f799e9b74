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

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.layout import check_state
from pipeline.checkpoint.manager import CheckpointManager

logger = logging.getLogger("pipeline.checkpoint")

HOST_MEMORY_SHARE = 0.5
CGROUP_MEMORY_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
    ),
)
"""A host copy may take at most this share of the memory available when it is made."""


def tensor_bytes(state: Any) -> int:
    """Bytes of all tensors in a nested state, memory shared between tensors counted once."""
    sizes: dict[tuple[Any, ...], int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            sizes[_alias_key(value)] = value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    visit(state)
    return sum(sizes.values())


def available_host_bytes() -> int:
    """Host memory this process may still use: MemAvailable, or less under a cgroup limit
    (a SLURM job's `--mem`, a container): the OOM killer goes by the limit, not the machine."""
    available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    for limit_file, usage_file in CGROUP_MEMORY_FILES:
        with contextlib.suppress(OSError, ValueError):
            limit = Path(limit_file).read_text().strip()
            if limit.isdigit():
                usage = int(Path(usage_file).read_text().strip())
                available = min(available, max(int(limit) - usage, 0))
    return available


class HostSnapshot:
    """Reusable host copies of a nested state (dicts, lists, tuples, tensors, plain values).

    Tensors that share memory in the state (a tied embedding and output layer) share one host
    buffer in the copy, so the file holds them once, as a blocking save would; dict types
    (`OrderedDict` with its `_metadata`, which `load_state_dict` reads) are kept.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def copy(self, state: Any) -> Any:
        """A structure equal to `state` whose tensors live in this snapshot's host buffers."""
        copied = self._walk(state, (), {}, copy=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non_blocking device->host copies have landed
        return copied

    def allocate(self, state: Any) -> None:
        """Create the buffers `copy(state)` will need, without copying (page-locking 16 GB
        of host memory takes seconds: done ahead, in the background, it stalls nothing)."""
        self._walk(state, (), {}, copy=False)

    def held_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def _walk(self, value: Any, path: tuple[Any, ...], seen: dict, copy: bool) -> Any:
        if isinstance(value, torch.Tensor):
            alias = _alias_key(value)
            if alias not in seen:
                seen[alias] = self._copy_tensor(value, path, copy)
            return seen[alias]
        if isinstance(value, dict):
            out = type(value)()
            for key, item in value.items():
                out[key] = self._walk(item, (*path, key), seen, copy)
            if hasattr(value, "_metadata"):
                out._metadata = value._metadata  # type: ignore[attr-defined]
            return out
        if isinstance(value, list):
            return [self._walk(item, (*path, i), seen, copy) for i, item in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(self._walk(item, (*path, i), seen, copy) for i, item in enumerate(value))
        return value  # ints, floats, strings, None: immutable or rebuilt by state_dict()

    def _copy_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...], copy: bool) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = tensor.device.type == "cuda"
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buffer
        if copy:
            buffer.copy_(tensor.detach(), non_blocking=tensor.device.type == "cuda")
        return buffer


def _alias_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two tensors that view the same memory the same way (tied weights)."""
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


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
        """Does a host copy of the state fit in memory? (for a state of `_decided_for` bytes)"""
        self._decided_for = 0
        self._kind = "write"
        """What the background thread does: `write` a checkpoint or `allocate` buffers."""

    def _host_copy_fits(self, state: dict[str, Any]) -> bool:
        """Decided again whenever the state has grown (Adam's moments appear at the first
        step); the buffers this writer already holds count as available to it."""
        needed = tensor_bytes(state)
        if self._fits is not None and needed <= self._decided_for:
            return self._fits
        budget = self.host_budget
        if budget is None:
            held = self._snapshot.held_bytes()
            budget = int(HOST_MEMORY_SHARE * (available_host_bytes() + held))
        self._fits, self._decided_for = needed <= budget, needed
        if not self._fits:
            logger.warning(
                "checkpoints are written without a host copy (blocking): the state's "
                "%.2f GiB exceed the %.2f GiB a copy may take (half the host memory available)",
                needed / 2**30,
                budget / 2**30,
            )
        return self._fits

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Snapshot `state` (blocking), start writing it; return the path it will have."""
        if self._thread is not None and self._thread.is_alive() and self._kind == "write":
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
        self._kind = "write"
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
        self._kind = "allocate"
        self._thread = threading.Thread(
            target=self._run, args=(self._snapshot.allocate, state), name="checkpoint-buffers"
        )
        self._thread.start()

    def _write(self, state: dict[str, Any], step: int) -> None:
        self._run(lambda: setattr(self, "_written", self.manager.save(state, step)))

    def _run(self, work: Any, *args: Any) -> None:
        try:
            work(*args)
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
