"""`--resume_from_checkpoint auto` (the DVC train stage): continue, or start afresh, never destroy.

Rank 0 reads the run's checkpoints best first (`latest`'s, then newest step first) exactly as a
resume would read them (checksums, weights-only, the loop state's shape) until one loads:

- none at all: nothing to resume, start afresh;
- the first that loads belongs to this config's interrupted run: resume from it. Newer ones
  that did not load are moved aside first (training would otherwise save over their names);
- it belongs to another config, a finished run of this config (so `dvc repro --force` really
  retrains), or data with another tokenizer, or none loads: the whole checkpoint folder is
  moved aside and training starts afresh.

"Aside" is a new folder `<run_dir>/checkpoints.<why>-<YYYYmmdd-HHMMSS>-<random>`, unique, so a
second move never meets the first; nothing is deleted, and the log says where it went.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config.output import public_values
from pipeline.config.schema import Config
from pipeline.errors import CheckpointError
from pipeline.training.loop_state import check_compatible, check_loop_state

logger = logging.getLogger("pipeline.train")

RESUME_AUTO = "auto"
"""Resume when the run directory holds a checkpoint of this exact config, else start afresh."""

_NOT_COMPARED = {
    "tracking",
    "evaluation",
    "registry",
    "storage",
    "slurm",
    "output_dir",
    "output_root",
    "name",
}
"""Where and how a run is observed: changing these continues the same run."""


def same_run(saved: dict[str, Any], config: Config) -> bool:
    """Does a checkpoint's config describe this run (ignoring where and how it is observed)?

    With an explicit `training.decay_tokens` the schedule does not depend on the run's length,
    so a longer max_steps/max_tokens extends the same run instead of starting a new one.
    """
    current = public_values(config)  # as checkpoints record it
    saved = {**saved, "training": dict(saved.get("training", {}))}
    if config.training.decay_tokens is not None:
        for key in ("max_steps", "max_tokens"):
            saved["training"].pop(key, None)
            current["training"].pop(key, None)
    return all(saved.get(k) == v for k, v in current.items() if k not in _NOT_COMPARED)


def finished(progress: dict[str, Any], config: Config) -> bool:
    """Had the checkpointed run already reached this config's end?"""
    t = config.training
    steps_done = t.max_steps is not None and progress.get("step", 0) >= t.max_steps
    tokens_done = t.max_tokens is not None and progress.get("tokens_seen", 0) >= t.max_tokens
    return steps_done or tokens_done


def aside_folder(run_dir: Path, why: str) -> Path:
    """A new, empty, uniquely named folder `<run_dir>/checkpoints.<why>-<date>-<random>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkdtemp(prefix=f"checkpoints.{why}-{stamp}-", dir=run_dir))


def move_directory_aside(directory: Path, why: str) -> Path:
    """Rename the whole checkpoint folder to a fresh aside name and recreate it empty."""
    destination = aside_folder(directory.parent, why)
    os.replace(directory, destination)  # onto the new empty folder: atomic, nothing copied
    directory.mkdir()
    return destination


def move_files_aside(paths: list[Path], run_dir: Path, why: str) -> Path:
    """Move checkpoint files or folders into one fresh aside folder."""
    destination = aside_folder(run_dir, why)
    for path in paths:
        os.replace(path, destination / path.name)
    return destination


def resolve_auto(config: Config, store: Any, vocab_size: int, tokenizer_id: str) -> str | None:
    """The checkpoint to resume from, or None to start afresh (see the module docstring).

    `store` is the run's checkpoint store (`candidates`, `inspect`, `files_of`, `directory`).
    Runs on rank 0 under the run lock, before any rank loads anything.
    """
    candidates = store.candidates()
    if not candidates:
        return None
    directory = Path(store.directory)
    unusable: list[Path] = []
    for path in candidates:
        try:
            state = store.inspect(path)
            check_loop_state(state, path)
        except CheckpointError as exc:
            logger.warning("auto-resume: cannot use %s: %s", path, exc)
            unusable.append(path)
            continue
        why = _other_run(state, config, vocab_size, tokenizer_id, path)
        if why is None:
            if unusable:
                files = [file for bad in unusable for file in store.files_of(bad)]
                aside = move_files_aside(files, directory.parent, "unusable")
                logger.warning(
                    "auto-resume: %d newer checkpoint(s) could not be loaded; moved to %s",
                    len(unusable),
                    aside,
                )
            return str(path)
        aside = move_directory_aside(directory, "previous")
        logger.warning(
            "auto-resume: checkpoints in %s belong to %s; moved to %s, starting afresh",
            directory,
            why,
            aside,
        )
        return None
    aside = move_directory_aside(directory, "unusable")
    logger.warning(
        "auto-resume: no checkpoint in %s could be loaded (see above); moved to %s, "
        "starting afresh",
        directory,
        aside,
    )
    return None


def _other_run(
    state: dict[str, Any], config: Config, vocab_size: int, tokenizer_id: str, path: Path
) -> str | None:
    """Why a loadable checkpoint is not one to continue (None: continue it)."""
    if not same_run(state["config"], config):
        return "a different config"
    if finished(state["progress"], config):
        return "a finished run of this config"
    try:
        check_compatible(state, config, vocab_size, tokenizer_id, path)
    except CheckpointError as exc:
        return f"other data ({exc})"
    return None
