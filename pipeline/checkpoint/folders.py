"""Checkpoints that are folders of files written by several ranks (DeepSpeed, DCP): the layout,
its manifest, and publishing and choosing folders with the guarantees of the single-file store.

Layout of a checkpoint directory (`experiments/<name>/checkpoints/`):

    step_0000100/               one folder per checkpoint, named like the single-file steps
        ...                     the writer's files (DeepSpeed's or DCP's shards, loop state)
        checksums.sha256        `sha256sum -c` format: every other file of the folder
    latest                      text: the folder name of the newest complete checkpoint
    .step_0000200.tmp/          a save in progress (or killed): never read, swept on save

Guarantees, shared by every folder store:
- atomic publish: the ranks write into `.step_N.tmp/`; only when every file is written does
  rank 0 write the manifest into it, rename it to `step_N/` and replace `latest`
  (`atomic_write`). A folder without a manifest is never a checkpoint; a kill at any moment
  leaves every earlier checkpoint and `latest` intact.
- checksums: the manifest lists every file with its SHA-256 (`pipeline.hashing`), is written
  after the data is fsynced, and is checked before anything is loaded. A file that is missing,
  changed or not listed makes the folder corrupt (`CorruptCheckpointError`).
- fallback: `resolve("latest")` takes the folder `latest` names, else (or if it is corrupt,
  with a warning) the newest intact one; a folder named explicitly never falls back.
- retention: the newest `keep` complete folders (and the one just written) stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

from pipeline.checkpoint.files import atomic_write, fsync_directory
from pipeline.checkpoint.layout import CorruptCheckpointError, step_filename
from pipeline.distributed.comm import Collective
from pipeline.errors import CheckpointError
from pipeline.hashing import file_sha256, stream_sha256

logger = logging.getLogger("pipeline.checkpoint")

LATEST = "latest"
MANIFEST = "checksums.sha256"
_STEP_DIR_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    """`step_0000100`: the single-file name without `.pt`, so both layouts sort alike."""
    return step_filename(step).removesuffix(".pt")


def is_tag_name(name: str) -> bool:
    """Is `name` a checkpoint folder's name (`step_0000100`)?"""
    return _STEP_DIR_RE.match(name) is not None


def hash_and_sync(path: Path) -> str:
    """SHA-256 of a file, fsyncing it on the way (DeepSpeed's and DCP's writers may not)."""
    with open(path, "rb+") as handle:
        digest = stream_sha256(handle)
        os.fsync(handle.fileno())
    return digest


def folder_files(tag_dir: Path) -> list[str]:
    """Every file of a folder but its manifest, as sorted POSIX paths relative to it."""
    return sorted(
        p.relative_to(tag_dir).as_posix()
        for p in tag_dir.rglob("*")
        if p.is_file() and p.relative_to(tag_dir).as_posix() != MANIFEST
    )


def verify_tag_dir(tag_dir: Path) -> None:
    """Check a checkpoint folder against its manifest; raise CorruptCheckpointError.

    Every file the manifest lists must match its digest, and every file in the folder must be
    listed: the readers load shards by name, so an unlisted file is data nobody vouched for.
    """
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpointError(f"{tag_dir} has no {MANIFEST}: an incomplete checkpoint")
    listed: set[str] = set()
    for line in manifest.read_text(encoding="ascii", errors="replace").splitlines():
        expected, _, name = line.partition("  ")
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise CorruptCheckpointError(
                f"{manifest} names {name!r}, which is not inside {tag_dir}"
            )
        listed.add(name)
        path = tag_dir / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is missing from checkpoint {tag_dir}")
        if file_sha256(path) != expected:
            raise CorruptCheckpointError(f"{path} is corrupt or truncated (SHA-256 mismatch)")
    unlisted = sorted(set(folder_files(tag_dir)) - listed)
    if unlisted:
        raise CorruptCheckpointError(
            f"{tag_dir} holds files its {MANIFEST} does not list: {', '.join(unlisted)}"
        )


def complete_tag_dirs(directory: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of the complete checkpoints (with a manifest) in `directory`, oldest first.

    A folder gets its manifest only after all its files are written, and is renamed into place
    after that, so a listed folder is whole (also what MLflow uploads, see checkpoint_uploads).
    """
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_DIR_RE.match(entry.name)
        if match and (entry / MANIFEST).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


class FolderCheckpoints:
    """A directory of checkpoint folders: listing, choosing (verified), publishing, pruning.

    Reading is rank-local (rank 0 resolves, then shares the path); publishing runs on rank 0
    once every rank's files are on disk. Subclasses add how their files are written and read.
    """

    kind = "folder"
    """Named in errors: which layout this store expected."""

    def __init__(self, directory: Path, keep: int, comm: Collective | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.comm = comm or Collective()

    def path_for(self, step: int) -> Path:
        return self.directory / tag_for(step)

    def temp_path_for(self, step: int) -> Path:
        """Where the ranks write the folder of `step` before it is published."""
        return self.directory / f".{tag_for(step)}.tmp"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """`(step, folder)` of complete checkpoints (with a manifest), oldest first."""
        return complete_tag_dirs(self.directory)

    def latest_path(self) -> Path | None:
        """The folder `latest` names (not verified); None when there is no `latest`."""
        return _read_latest(self.directory)

    def candidates(self) -> list[Path]:
        """Every `step_*` folder, complete or not, best first: `latest`'s, then newest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _STEP_DIR_RE.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        paths = [path for _, path in sorted(found, reverse=True)]
        latest = self.latest_path()
        if latest is not None and latest in paths:
            paths.remove(latest)
            paths.insert(0, latest)
        return paths

    def files_of(self, path: Path) -> list[Path]:
        """A folder checkpoint is its folder."""
        return [path]

    # ------------------------------------------------------------------ rank-local reading
    def resolve(self, which: str | int | Path = "latest") -> Path:
        """A verified checkpoint folder. `latest` falls back to the newest intact one."""
        if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
            tag_dir = self.path_for(int(which))
            if not tag_dir.is_dir():
                raise CheckpointError(f"no checkpoint {tag_dir.name} in {self.directory}")
            verify_tag_dir(tag_dir)
            return tag_dir
        if which != "latest":
            return self._resolve_path(Path(which))
        return self._resolve_latest(self.directory)

    def _resolve_latest(self, directory: Path) -> Path:
        candidates = [path for _, path in reversed(complete_tag_dirs(directory))]
        latest = _read_latest(directory)
        if latest is not None and latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
        elif latest is not None:
            logger.warning("%s names %s, which is not a complete checkpoint", LATEST, latest)
        problems = []
        for tag_dir in candidates:
            try:
                verify_tag_dir(tag_dir)
            except CorruptCheckpointError as exc:
                problems.append(str(exc))
                logger.warning("%s; trying an older checkpoint", exc)
                continue
            return tag_dir
        raise CheckpointError(
            f"no intact {self.kind} checkpoint in {directory}"
            + (": " + "; ".join(problems) if problems else "")
        )

    def _resolve_path(self, path: Path) -> Path:
        if path.is_file():
            raise CheckpointError(
                f"{path} is a single-file checkpoint (strategy single or ddp); a {self.kind} "
                "run resumes from a checkpoint folder"
            )
        if (path / MANIFEST).is_file() or _STEP_DIR_RE.match(path.name):
            if not path.is_dir():
                raise CheckpointError(f"checkpoint {path} does not exist")
            verify_tag_dir(path)
            return path
        for directory in (path, path / "checkpoints"):
            if (directory / LATEST).is_file() or any(directory.glob("step_*/" + MANIFEST)):
                return self._resolve_latest(directory)
        raise CheckpointError(
            f"no {self.kind} checkpoint in {path} (nor in {path / 'checkpoints'})"
        )

    # ------------------------------------------------------------------- rank 0, publishing
    def clear_leftovers(self) -> None:
        """Remove temporary folders of saves that were killed (the run lock rules out others)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for entry in self.directory.iterdir():
            if entry.is_dir() and entry.name.startswith(".step_"):
                shutil.rmtree(entry, ignore_errors=True)

    def publish(self, tmp: Path, final: Path, digests: list[tuple[str, str]]) -> Path:
        """Manifest into `tmp`, `tmp` renamed to `final`, `latest` moved, old folders pruned.

        `digests`: `(relative name, sha256)` of every file in `tmp`, hashed after it was
        fsynced (`hash_and_sync`).
        """
        written = set(folder_files(tmp))
        named = {name for name, _ in digests}
        if written != named:
            raise CheckpointError(
                f"{tmp}: the files hashed ({len(named)}) are not the files written "
                f"({len(written)}); not publishing {final.name}"
            )
        manifest = "".join(f"{digest}  {name}\n" for name, digest in sorted(digests))
        atomic_write(tmp / MANIFEST, manifest.encode("ascii"))
        old = final.with_name(f".{final.name}.old")
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_directory(self.directory)
        atomic_write(self.directory / LATEST, final.name + "\n")
        shutil.rmtree(old, ignore_errors=True)
        self.prune(keep_also=final)
        return final

    def prune(self, keep_also: Path) -> None:
        steps = self.list_checkpoints()
        keep = {path for _, path in steps[-self.keep :]} | {keep_also}
        for _, path in steps:
            if path not in keep:
                with contextlib.suppress(OSError):
                    (path / MANIFEST).unlink()  # no longer a checkpoint before its data goes
                    shutil.rmtree(path)


def _read_latest(directory: Path) -> Path | None:
    try:
        tag = (directory / LATEST).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return directory / tag
