"""The one interface every checkpoint store offers, and the single-file store behind it.

A checkpoint is a dict of named states, e.g.

    {"model": model, "optimizer": optimizer, "scaler": precision, "trainer": loop_state}

where a value is either `Stateful` (has `state_dict()` / `load_state_dict()`: restored in place)
or, under `LOOP_STATE` (`"trainer"`), the loop state: a plain nested dict of tensors and
primitives (step, sampler position, every rank's RNG, config) that is returned by `inspect` and
`restore_states` rather than restored into anything. How the states reach the disk is the
store's business: one file (`SingleFileStore`), DeepSpeed's folders (`DeepSpeedStore`: the
engine under `"engine"`), or DCP shards (`DCPStore`, sharded/DTensor states that reshard on
load). See the package docstring for which to use when.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pipeline.checkpoint.async_writer import AsyncCheckpointWriter
from pipeline.checkpoint.layout import (
    MapLocation,
    checkpoint_directory,
    load_verified,
    resolve_latest,
    verify_checkpoint,
)
from pipeline.checkpoint.manager import CheckpointManager
from pipeline.errors import CheckpointError

LOOP_STATE = "trainer"
"""The named state that holds the loop state (the key DeepSpeed's client state always used)."""


@runtime_checkable
class Stateful(Protocol):
    """What a named state other than the loop state is (model, optimizer, scaler, sampler)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@runtime_checkable
class Store(Protocol):
    """The checkpoints of one run in one directory. See the package docstring.

    Listing and choosing are rank-local (the trainer's rank 0 resolves and shares the path);
    `save_states` and `restore_states` are called on every rank of the strategy that owns the
    store (collective where the store is sharded); `wait` is rank-local.
    """

    directory: Path

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of `step` lives (whether or not it exists)."""
        ...

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """`(step, path)` of the checkpoints present, oldest first (not verified)."""
        ...

    def candidates(self) -> list[Path]:
        """Every checkpoint, best first (the one `latest` names, then newest first)."""
        ...

    def files_of(self, path: Path) -> list[Path]:
        """The files or folders that make up checkpoint `path` (to move it aside)."""
        ...

    def resolve(self, which: str | int | Path = "latest") -> Path:
        """A verified checkpoint: `latest` (falling back to the newest intact one, with a
        warning), a step, or a path. Raises CheckpointError when there is none."""
        ...

    def inspect(self, path: Path) -> dict[str, Any]:
        """The verified loop state of checkpoint `path`, restoring nothing."""
        ...

    def save_states(self, states: dict[str, Any], step: int) -> Path:
        """Write the named states as the checkpoint of `step`; return its final path. May
        return before the bytes are on disk (an async store): `wait` says when they are."""
        ...

    def restore_states(self, states: dict[str, Any], path: Path) -> dict[str, Any]:
        """Load verified checkpoint `path` into the `Stateful` entries of `states` in place;
        return its loop state."""
        ...

    def wait(self) -> Path | None:
        """Block until the save in flight is published; raise its error; return its path."""
        ...


def state_of(value: Any) -> Any:
    """A named state's value to save: `state_dict()` of a Stateful, else the value itself."""
    return value.state_dict() if isinstance(value, Stateful) else value


class SingleFileStore(CheckpointManager):
    """Today's format behind the `Store` interface: one `step_N.pt` holding every named state.

    The file is the flat dict `{"model": ..., "optimizer": ..., "scaler": ..., **loop_state}`
    that every existing checkpoint holds, so old checkpoints load and new ones load in older
    code. With `async_write`, saves go through an `AsyncCheckpointWriter` (host copy, write in
    a background thread); only the rank that writes should own one.
    """

    def __init__(self, directory: Path, keep: int, async_write: bool = False) -> None:
        super().__init__(directory, keep)
        self.writer = AsyncCheckpointWriter(self) if async_write else None

    def resolve(self, which: str | int | Path = "latest") -> Path:
        """The verified checkpoint file `which` names (as `load` would pick it, by checksums
        alone: nothing is unpickled until `inspect` or `restore_states`)."""
        if isinstance(which, str) and which == "latest":
            return resolve_latest(self.directory)
        if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
            path = self.path_for(int(which))
            if not path.exists():
                have = ", ".join(str(step) for step, _ in self.list_checkpoints()) or "none"
                raise CheckpointError(
                    f"no checkpoint {path.name} in {self.directory} (steps present: {have})"
                )
        else:
            path = Path(which)
            if path.is_dir():
                return resolve_latest(checkpoint_directory(path))
        verify_checkpoint(path)
        return path

    def save_states(self, states: dict[str, Any], step: int) -> Path:
        flat = flatten(states)
        if self.writer is not None:
            return self.writer.save(flat, step)
        return self.save(flat, step)

    def restore_states(
        self, states: dict[str, Any], path: Path, map_location: MapLocation = "cpu"
    ) -> dict[str, Any]:
        full = load_verified(path, map_location)
        restore_named(states, full, path)
        return {key: value for key, value in full.items() if key not in states}

    def wait(self) -> Path | None:
        return self.writer.wait() if self.writer is not None else None


def flatten(states: dict[str, Any]) -> dict[str, Any]:
    """Named states -> the single-file dict: each state by name, the loop state's keys on top."""
    loop = states.get(LOOP_STATE, {})
    if not isinstance(loop, dict):
        raise TypeError(f"the {LOOP_STATE!r} state must be a dict, got {type(loop).__name__}")
    flat = {name: state_of(value) for name, value in states.items() if name != LOOP_STATE}
    clash = sorted(set(flat) & set(loop))
    if clash:
        raise TypeError(f"the loop state reuses the names of named states: {clash}")
    flat.update(loop)
    return flat


def restore_named(states: dict[str, Any], saved: dict[str, Any], source: Path) -> None:
    """`load_state_dict` every Stateful entry of `states` from `saved[name]`."""
    for name, target in states.items():
        if name == LOOP_STATE or not isinstance(target, Stateful):
            continue
        if name not in saved:
            raise CheckpointError(f"{source}: no {name!r} state in this checkpoint")
        try:
            target.load_state_dict(saved[name])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{source}: cannot restore {name!r}: {first}") from exc
