"""The few collective operations the loop and the checkpoint code need, in one place.

Every method is also correct for one process without a process group (each is then a no-op or
the identity), so the single-device path runs the same code as the distributed one.

`main_only` is how a rank-0 action that can fail (taking the run lock, resolving `latest`,
writing a checkpoint) stays safe: rank 0 runs it and shares either the result or the error, so
a user error on rank 0 ends every rank with the same message instead of leaving the others
waiting in the next collective until a timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import UserError

T = TypeVar("T")


class RankFailedError(RuntimeError):
    """Rank 0 failed with a programming error; the other ranks stop with this one."""


class Collective:
    """Rank, world size and the collectives over the default process group (if any)."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: str = "cpu") -> None:
        if world_size > 1 and not dist.is_initialized():
            raise RuntimeError("a Collective over several ranks needs an initialized process group")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks (SUM then divide: gloo has no AVG)."""
        if not self.distributed:
            return value
        out = value.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / self.world_size).to(value.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on at least one (e.g. a stop signal)."""
        if not self.distributed:
            return flag
        out = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return bool(out.item())

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order (picklable objects; small ones only)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box: list[Any] = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_only(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 and return its result on every rank; its error ends every rank.

        A `UserError` is re-raised on every rank with its own type and message (so each exits
        with code 2); any other exception keeps its traceback on rank 0 and becomes a
        `RankFailedError` elsewhere.
        """
        if not self.distributed:
            return fn()
        result: Any = None
        failure: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # shared first, then re-raised below
                failure = exc
        shared = self.broadcast_object((result, _portable(failure)))
        if failure is not None:
            raise failure
        result, error = shared
        if error is not None:
            raise error
        return result


def _portable(exc: BaseException | None) -> BaseException | None:
    """What the other ranks raise for rank 0's exception (user errors keep type and message)."""
    if exc is None:
        return None
    if isinstance(exc, UserError):
        try:
            return type(exc)(*exc.args)
        except TypeError:
            return UserError(str(exc))
    return RankFailedError(f"rank 0 failed: {type(exc).__name__}: {exc}")
