"""Check `--resume_from_checkpoint` before the run directory is touched.

The checkpoint store resolves and verifies a resume source only once the run directory exists,
is locked and has its log file. A typo in the path, or `latest` where nothing was saved yet,
would then leave an empty `experiments/<name>/` behind. These cheap checks catch those cases
first. They only test whether files exist; checksums and shapes stay the store's job.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import checksum_path
from pipeline.errors import CheckpointError

NO_CHECK = (None, "auto")
"""`auto` starts afresh when there is nothing to resume, so it needs no check."""


def _has_checkpoint_names(directory: Path) -> bool:
    """Anything named like a checkpoint (`latest*`, `step_*`), in either checkpoint layout."""
    if not directory.is_dir():
        return False
    return any(entry.name.startswith(("latest", "step_")) for entry in directory.iterdir())


def check_resume_source(which: str | Path | None, checkpoint_dir: Path) -> None:
    """Raise `CheckpointError` if `which` obviously names no checkpoint. Writes nothing.

    `which`: None or `auto` (never an error), `latest` or a step number (this run's
    `checkpoint_dir` must hold a checkpoint), or a path: a checkpoint file (which must exist
    with its checksum file beside it), a DeepSpeed checkpoint folder, or a checkpoints or run
    directory that holds checkpoints.
    """
    if which in NO_CHECK:
        return
    text = str(which)
    if text == "latest" or text.isdigit():
        if not _has_checkpoint_names(checkpoint_dir):
            raise CheckpointError(
                f"cannot resume from {text!r}: no checkpoint in {checkpoint_dir} (nothing was "
                "saved there yet); start without resuming, or name a checkpoint path"
            )
        return
    path = Path(text)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        if not checksum_path(path).is_file():
            raise CheckpointError(
                f"checkpoint {path} has no checksum file {checksum_path(path).name}; refusing "
                "to load a checkpoint that cannot be verified"
            )
        return
    if path.name.startswith("step_"):
        return  # one checkpoint folder (DeepSpeed's layout)
    if not (_has_checkpoint_names(path) or _has_checkpoint_names(path / "checkpoints")):
        raise CheckpointError(f"no checkpoints in {path} (nor in {path / 'checkpoints'})")
