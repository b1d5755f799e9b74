"""DeepSpeed checkpoints with the same guarantees as the single-file ones: atomic, verified,
a `latest` pointer, retention, exact resume.

Layout of `experiments/<name>/checkpoints/` for a DeepSpeed run:

    step_0000100/                       one DeepSpeed tag folder per checkpoint
        mp_rank_00_model_states.pt      DeepSpeed: module weights + client state (our loop state)
        *zero_pp_rank_<r>_*optim_states.pt   DeepSpeed: rank r's shard of the optimizer state
        checksums.sha256                ours: `sha256sum -c` format, every file above
    latest                              text: the tag of the newest complete checkpoint
    zero_to_fp32.py                     DeepSpeed's own consolidation script (reads `latest`)

`latest` is DeepSpeed's own pointer name, so `engine.load_checkpoint(dir)` and
`python checkpoints/zero_to_fp32.py checkpoints/ out/` work on it unchanged.

One save, chosen so a kill at any moment leaves every earlier checkpoint and `latest` intact:
every rank writes its shards into `.step_0000100.tmp/` (DeepSpeed's save_checkpoint with that
tag); each rank hashes and fsyncs a share of the files; rank 0 publishes the folder as every
folder store does (`pipeline.checkpoint.folders`: manifest, rename, `latest`, pruning). A folder
without `checksums.sha256` is never a checkpoint. The loop state (step, data
position, every rank's RNG, config) is DeepSpeed client state under the key `trainer`, and is
read back weights-only and memory-mapped to check a checkpoint without touching its weights.
No file is handed to DeepSpeed's unpickler before rank 0 has read every file of the folder
weights-only (`inspect_tag_dir`), and DeepSpeed's own loads go through the same safe reader
(`pipeline.checkpoint.deepspeed_safe_load`). Checkpoints must be on a filesystem every rank
sees (as DeepSpeed's own).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from pipeline.checkpoint.deepspeed_safe_load import safe_load, scan_files
from pipeline.checkpoint.folders import (
    LATEST,
    MANIFEST,
    FolderCheckpoints,
    complete_tag_dirs,
    folder_files,
    hash_and_sync,
    is_tag_name,
    tag_for,
    verify_tag_dir,
)
from pipeline.checkpoint.store import LOOP_STATE
from pipeline.errors import CheckpointError

__all__ = [
    "CLIENT_KEY",
    "LATEST",
    "MANIFEST",
    "DeepSpeedCheckpoints",
    "DeepSpeedStore",
    "checkpoint_files",
    "complete_tag_dirs",
    "inspect_tag_dir",
    "is_tag_name",
    "read_client_state",
    "tag_for",
    "verify_tag_dir",
]

CLIENT_KEY = LOOP_STATE
"""DeepSpeed client state key of the loop state (`trainer`, as in every store)."""
ENGINE = "engine"
"""The named state a `DeepSpeedStore` expects: the engine holds model, optimizer and scaler."""


def checkpoint_files(tag_dir: Path) -> list[Path]:
    """The checkpoint's own files (every file but the manifest), sorted."""
    return [tag_dir / name for name in folder_files(tag_dir)]


def inspect_tag_dir(tag_dir: Path) -> dict[str, Any]:
    """Verify a folder, read every file weights-only (see `deepspeed_safe_load`), return the
    loop state: what rank 0 checks before any rank hands the folder to DeepSpeed."""
    verify_tag_dir(tag_dir)
    scan_files(checkpoint_files(tag_dir))
    return read_client_state(tag_dir)


def read_client_state(tag_dir: Path) -> dict[str, Any]:
    """The loop state saved as client state, without loading the weights beside it."""
    candidates = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    if not candidates:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file")
    state = safe_load(candidates[0], "cpu", mmap=zipfile.is_zipfile(candidates[0]))
    if not isinstance(state, dict) or not isinstance(state.get(CLIENT_KEY), dict):
        raise CheckpointError(f"{tag_dir}: not a checkpoint of this trainer (no {CLIENT_KEY!r})")
    return state[CLIENT_KEY]


class DeepSpeedCheckpoints(FolderCheckpoints):
    """The checkpoints folder of a DeepSpeed run; `save`/`restore` are collective."""

    kind = "DeepSpeed"

    def inspect(self, path: Path) -> dict[str, Any]:
        """The loop state of a verified folder, every file read weights-only."""
        return inspect_tag_dir(path)

    def load(self, which: str | int | Path = "latest") -> tuple[dict[str, Any], Path]:
        """`(loop state, folder)` of a verified checkpoint, read on this rank only."""
        tag_dir = self.resolve(which)
        return inspect_tag_dir(tag_dir), tag_dir

    # ------------------------------------------------------------------------ collective
    def save(self, engine: Any, state: dict[str, Any], step: int) -> Path:
        """Every rank: write this rank's shards, then rank 0 publishes the folder atomically."""
        final = self.path_for(step)
        tmp = self.temp_path_for(step)
        self.comm.main_only(self.clear_leftovers)
        engine.save_checkpoint(
            str(self.directory), tag=tmp.name, client_state={CLIENT_KEY: state}, save_latest=False
        )
        self.comm.barrier()
        files = folder_files(tmp)
        mine = [
            (name, hash_and_sync(tmp / name))
            for name in files[self.comm.rank :: self.comm.world_size]
        ]
        digests = sorted(pair for share in self.comm.all_gather_object(mine) for pair in share)
        return self.comm.main_only(lambda: self.publish(tmp, final, digests))

    def restore(self, engine: Any, tag_dir: Path) -> dict[str, Any]:
        """Every rank: load weights and this rank's optimizer shard; return the loop state."""
        load_path, client = engine.load_checkpoint(
            str(tag_dir.parent),
            tag=tag_dir.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if load_path is None or CLIENT_KEY not in (client or {}):
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        return client[CLIENT_KEY]


class DeepSpeedStore(DeepSpeedCheckpoints):
    """`DeepSpeedCheckpoints` behind the package's `Store` interface (named states).

    `states` holds the engine under `engine` (DeepSpeed saves and restores model, optimizer
    and loss scaler itself) and the loop state under `trainer`; nothing else is accepted.
    """

    def save_states(self, states: dict[str, Any], step: int) -> Path:
        engine, loop_state = _split(states)
        return self.save(engine, loop_state, step)

    def restore_states(self, states: dict[str, Any], path: Path) -> dict[str, Any]:
        engine, _ = _split(states, need_loop=False)
        return self.restore(engine, path)

    def wait(self) -> Path | None:
        """DeepSpeed writes synchronously: nothing is in flight."""
        return None


def _split(states: dict[str, Any], need_loop: bool = True) -> tuple[Any, dict[str, Any]]:
    other = sorted(set(states) - {ENGINE, LOOP_STATE})
    if ENGINE not in states or other or (need_loop and LOOP_STATE not in states):
        raise TypeError(
            f"a DeepSpeed checkpoint holds {{{ENGINE!r}: engine, {LOOP_STATE!r}: loop state}}; "
            f"got keys {sorted(states)}"
        )
    return states[ENGINE], states.get(LOOP_STATE, {})
