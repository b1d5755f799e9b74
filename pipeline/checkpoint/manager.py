"""Save checkpoints atomically with their checksums, keep the newest few, clean up after kills.

The files it writes are described in `pipeline.checkpoint.layout`. How they are written:
- No file is ever modified in place. Every file is written under a temporary name in the same
  directory, flushed and fsynced, then `os.replace`d over its final name. That keeps a kill at
  any moment harmless and never writes through a DVC cache link (DVC's hardlink/symlink cache
  types make workspace files point into the cache).
- Order of one save, chosen so that a kill at any moment leaves every earlier checkpoint and
  `latest` intact and verifiable:
    1. write `.step_N.pt.<pid>@<host>.tmp`, hashing the bytes as they are written; fsync.
    2. write the step's checksum file. If `step_N.pt` already exists (a step saved again after
       a resume), the checksum file first lists both the old and the new digest, so whichever
       bytes the name holds verify.
    3. `os.replace` the temporary file onto `step_N.pt`; fsync the directory.
    4. same two-phase for `latest`: its checksum file lists old+new digests, a hard link made
       under a temporary name replaces `latest_checkpoint.pt`, then the checksum file lists only
       the new digest.
    5. delete step files beyond the newest `keep` (data before checksum file), never the one
       `latest` points at.
  A kill between 3 and 4 leaves `latest` at the previous checkpoint (a resume repeats one
  interval). Temporary files of dead writers and checksum files without their data file are
  removed on the next manager init or save.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.files import (
    DISK_FULL_ERRNOS,
    TEMP_RE,
    HashingWriter,
    atomic_write,
    create_new,
    fsync_directory,
    temp_path,
    write_error,
    writer_alive,
)
from pipeline.checkpoint.layout import (
    CHECKSUM_SUFFIX,
    LATEST_NAME,
    MapLocation,
    check_state,
    checkpoint_directory,
    checksum_path,
    latest_target,
    list_step_files,
    load_latest,
    load_verified,
    read_checksums,
    step_filename,
)
from pipeline.errors import CheckpointError
from pipeline.hashing import file_sha256

logger = logging.getLogger("pipeline.checkpoint")  # the public module's name, as before the split

_CHUNK = 1 << 20


class CheckpointManager:
    """Saves `step_XXXXXXX.pt` checkpoints atomically with checksums, keeps the newest `keep`.

    One writer per directory (the run lock sees to that); any number of readers. Holds no
    open files between calls. The layout is in `pipeline.checkpoint.layout`'s docstring, the
    write order in this module's.
    """

    def __init__(self, directory: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self._host = socket.gethostname()
        self._sweep(collapse=False)

    @property
    def latest_path(self) -> Path:
        return self.directory / LATEST_NAME

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of `step` lives (whether or not it exists)."""
        return self.directory / step_filename(step)

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """`(step, path)` of the step files present, oldest first (not verified)."""
        return list_step_files(self.directory)

    def candidates(self) -> list[Path]:
        """Every checkpoint here, best first: the one `latest` points at, then newest step first.

        `latest_checkpoint.pt` itself is listed only when it matches no step file.
        """
        paths = [path for _, path in reversed(self.list_checkpoints())]
        target = latest_target(self.directory)
        if target is not None:
            paths.remove(target[1])
            paths.insert(0, target[1])
        elif self.latest_path.exists():
            paths.insert(0, self.latest_path)
        return paths

    def inspect(self, path: Path) -> dict[str, Any]:
        """The verified state of one checkpoint file (CheckpointError if it cannot be used)."""
        return load_verified(path)

    def files_of(self, path: Path) -> list[Path]:
        """The files that make up checkpoint `path`: it, its checksum file, and `latest` (with
        its checksum file) when `latest` is that checkpoint."""
        files = [path, checksum_path(path)]
        target = latest_target(self.directory)
        if path != self.latest_path and target is not None and target[1] == path:
            files += [self.latest_path, checksum_path(self.latest_path)]
        return [file for file in files if file.exists()]

    def latest_step(self) -> int | None:
        """The step `latest_checkpoint.pt` points at (not verified); None if there is none."""
        target = latest_target(self.directory)
        return target[0] if target else None

    # ----------------------------------------------------------------------------- saving
    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write the checkpoint of `step`, point `latest` at it, prune; return its path.

        Raises TypeError (before writing anything) if `state` holds a non-tensor object, and
        CheckpointError if the disk is full or the directory cannot be written; in both cases
        earlier checkpoints and `latest` are untouched and no temporary file is left behind.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        check_state(state)
        target = self.path_for(step)
        created: list[Path] = []
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._sweep(collapse=True)
            data_tmp = temp_path(target, self._host)
            created.append(data_tmp)
            digest = self._write_state(state, data_tmp)
            self._publish(data_tmp, target, digest, created)
        except OSError as exc:
            raise write_error(exc, target) from exc
        finally:
            for path in created:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            if not target.exists():
                with contextlib.suppress(OSError):
                    checksum_path(target).unlink(missing_ok=True)
        self._prune(keep_also=target)
        return target

    def _publish(self, data_tmp: Path, target: Path, digest: str, created: list[Path]) -> None:
        """Steps 2-4 of the module docstring: checksum, rename, then move `latest`."""
        self._replace_verified(target, digest, lambda: os.replace(data_tmp, target))
        latest = self.latest_path
        link_tmp = temp_path(latest, self._host)
        created.append(link_tmp)
        self._link_or_copy(target, link_tmp)  # before its checksum file (see _sweep)
        self._replace_verified(latest, digest, lambda: os.replace(link_tmp, latest))

    def _replace_verified(self, path: Path, digest: str, replace: Callable[[], None]) -> None:
        """Swap the bytes at `path` so that they match its checksum file at every moment."""
        old = read_checksums(path) if path.exists() else None
        if old and digest not in old:
            self._write_checksums(path, [*sorted(old), digest])
        else:
            self._write_checksums(path, [digest])
        replace()
        fsync_directory(self.directory)
        if old and old != {digest}:
            self._write_checksums(path, [digest])

    def _write_checksums(self, path: Path, digests: Iterable[str]) -> None:
        text = "".join(f"{digest}  {path.name}\n" for digest in digests)
        atomic_write(checksum_path(path), text.encode("ascii"), sync_directory=False)

    def _write_state(self, state: dict[str, Any], tmp: Path) -> str:
        with create_new(tmp) as handle:
            writer = HashingWriter(handle)
            try:
                torch.save(state, writer)
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise
            if writer.error is not None:
                raise writer.error
            handle.flush()
            os.fsync(handle.fileno())
        return writer.sha256.hexdigest()

    def _link_or_copy(self, source: Path, link: Path) -> None:
        link.unlink(missing_ok=True)
        try:
            os.link(source, link)
            return
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise
            logger.warning(
                "cannot hard-link in %s (%s); %s will be a copy",
                self.directory,
                exc.strerror,
                LATEST_NAME,
            )
        with open(source, "rb") as src, create_new(link) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())

    # ------------------------------------------------------------------- housekeeping
    def _prune(self, keep_also: Path) -> None:
        """Delete step files beyond the newest `keep`; data before checksum file."""
        steps = self.list_checkpoints()
        keep = {path for _, path in steps[-self.keep :]} | {keep_also}
        target = latest_target(self.directory)
        if target:
            keep.add(target[1])
        for _, path in steps:
            if path in keep:
                continue
            try:
                path.unlink(missing_ok=True)
                checksum_path(path).unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("could not delete old checkpoint %s: %s", path, exc.strerror)

    def _sweep(self, collapse: bool) -> None:
        """Remove what killed writers left: temp files, checksum files without their data.

        A checksum file is only ever written while its writer's temporary data file (or link)
        exists, so a checksum file with neither data nor a live temporary file is an orphan.
        With `collapse` (only in save, under the run lock), a checksum file left listing two
        digests by a kill mid-swap is reduced to the one that matches the file.
        """
        if not self.directory.is_dir():
            return
        try:
            live: set[str] = set()
            for entry in os.scandir(self.directory):
                match = TEMP_RE.match(entry.name)
                if not match:
                    continue
                if writer_alive(int(match.group("pid")), match.group("host"), self._host):
                    live.add(match.group("target").removesuffix(CHECKSUM_SUFFIX))
                    continue
                Path(entry.path).unlink(missing_ok=True)
                logger.info("removed %s left by a killed writer", entry.path)
            for sidecar in self.directory.glob("*.pt" + CHECKSUM_SUFFIX):
                data = sidecar.with_name(sidecar.name.removesuffix(CHECKSUM_SUFFIX))
                if data.name in live:
                    continue
                if not data.exists():
                    sidecar.unlink(missing_ok=True)
                    logger.info("removed %s whose checkpoint does not exist", sidecar)
                elif collapse and len(read_checksums(data) or ()) > 1:
                    self._collapse_checksums(data)
        except OSError as exc:
            logger.warning("could not clean up %s: %s", self.directory, exc)

    def _collapse_checksums(self, data: Path) -> None:
        actual = file_sha256(data)
        if actual in (read_checksums(data) or set()):
            self._write_checksums(data, [actual])

    # ----------------------------------------------------------------------------- loading
    def load(
        self, which: str | int | Path = "latest", map_location: MapLocation = "cpu"
    ) -> tuple[dict[str, Any], Path]:
        """Load a verified checkpoint; return its state and the file it came from.

        `which`: "latest" (this directory's latest, falling back to the newest intact step file
        with a warning), a step number (int or digits), or a path: a checkpoint file, or a
        checkpoint / run directory meaning its latest. An explicitly named file or step never
        falls back: a corrupt one is an error naming it.
        """
        if isinstance(which, str) and which == "latest":
            return load_latest(self.directory, map_location)
        if isinstance(which, int) and not isinstance(which, bool):
            step_path = self.path_for(which)
        elif isinstance(which, str) and which.isdigit():
            step_path = self.path_for(int(which))
        else:
            path = Path(which)
            if path.is_dir():
                return load_latest(checkpoint_directory(path), map_location)
            if not path.exists():
                raise CheckpointError(f"checkpoint {path} does not exist")
            return load_verified(path, map_location), path
        if not step_path.exists():
            have = ", ".join(str(step) for step, _ in self.list_checkpoints()) or "none"
            raise CheckpointError(
                f"no checkpoint {step_path.name} in {self.directory} (steps present: {have})"
            )
        return load_verified(step_path, map_location), step_path
