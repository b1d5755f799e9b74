"""What the kill loop found: each kill, the counters, and the final comparison."""

from __future__ import annotations

from dataclasses import dataclass, field


class ChaosError(RuntimeError):
    """The loop itself could not go on: a child failed or hung. The message has its output."""


@dataclass
class Kill:
    """One injected fault and what it left behind."""

    index: int
    kind: str
    """`random` (SIGKILL from outside after a progress point) or `checkpoint-write`."""
    started_from: int | None
    """The step the child resumed from (0 after a fresh start), from its log; None if unknown."""
    aimed_at: str
    """Where the kill was aimed, in words."""
    last_step: int | None
    """The last step the child logged before it died."""
    partial_write: list[str] = field(default_factory=list)
    """What the kill left half-written in the checkpoints folder (new since the child started)."""


@dataclass
class ChaosReport:
    """The outcome of `run_chaos`."""

    kills: list[Kill]
    resumes: int
    """Starts with `--resume_from_checkpoint latest` (the final one included)."""
    fresh_starts: int
    """Starts without a checkpoint to resume from (the first, and after kills before one)."""
    fallbacks: int
    """Resumes that found `latest` unusable and loaded an older intact checkpoint instead."""
    steps: int
    final_step: int
    weights_identical: bool
    optimizer_identical: bool
    differing: list[str]
    seconds: float

    @property
    def identical(self) -> bool:
        return self.weights_identical and self.optimizer_identical

    @property
    def kills_in_checkpoint_writes(self) -> int:
        """Kills that left a half-written checkpoint (or were aimed into a save's file calls)."""
        return sum(1 for k in self.kills if k.partial_write or k.kind == "checkpoint-write")

    def summary(self) -> str:
        lines = [
            f"{'#':>3}  {'kind':<16} {'from':>5} {'died':>5}  aimed at / left behind",
        ]
        for k in self.kills:
            left = f"; left {', '.join(k.partial_write)}" if k.partial_write else ""
            lines.append(
                f"{k.index:>3}  {k.kind:<16} {_num(k.started_from):>5} {_num(k.last_step):>5}"
                f"  {k.aimed_at}{left}"
            )
        by_kind = {kind: sum(k.kind == kind for k in self.kills) for kind in _KINDS}
        lines += [
            f"faults injected: {len(self.kills)} SIGKILLs ({by_kind['random']} at random moments "
            f"after progress lines, {by_kind['checkpoint-write']} inside checkpoint file calls)",
            f"kills that landed inside a checkpoint write: {self.kills_in_checkpoint_writes}",
            f"restarts: {self.resumes} resumed from latest, {self.fresh_starts} fresh (no "
            f"checkpoint yet); {self.fallbacks} resume(s) fell back to an older intact checkpoint",
            f"final step: {self.final_step} of {self.steps}",
            f"final weights bitwise identical to the uninterrupted run: "
            f"{'yes' if self.weights_identical else 'NO'}; optimizer state: "
            f"{'yes' if self.optimizer_identical else 'NO'}"
            + (f" (differ: {', '.join(self.differing[:5])})" if self.differing else ""),
            f"wall time: {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


_KINDS = ("random", "checkpoint-write")


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


# ------------------------------------------------------------------------------ the child
