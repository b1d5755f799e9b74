"""The low-level file operations a checkpoint save is built from, and how they fail.

Owned temporary names (`.name.<pid>@<host>.tmp`) and whether their writer still lives,
exclusive creation, a writer that hashes as it writes, directory fsync, `atomic_write` (the one
way this package replaces a small file: checksum files, the `latest` pointer, a manifest) and
turning an OSError into a `CheckpointError` that says whether the disk is full. The order in
which `CheckpointManager` combines them is in `pipeline.checkpoint.manager`'s docstring.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
from pathlib import Path
from typing import IO

from pipeline.checkpoint.layout import LATEST_NAME
from pipeline.errors import CheckpointError

TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)@(?P<host>[^@/]+)\.tmp$")
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def temp_path(final: Path, host: str) -> Path:
    """`.name.<pid>@<host>.tmp` beside `final`: hidden, same filesystem, owner recorded."""
    return final.with_name(f".{final.name}.{os.getpid()}@{host}.tmp")


def writer_alive(pid: int, host: str, own_host: str) -> bool:
    """Whether the writer that owns a temporary file may still be running."""
    if host != own_host:
        return True  # a process on another machine: cannot tell, so leave its files
    if pid == os.getpid():
        return False  # our own leftovers: this process is not inside a save now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HashingWriter:
    """Hands torch.save's bytes to a file and a SHA-256 at once (no second read).

    torch.save turns an OSError from `write` into an opaque RuntimeError, so the first OSError
    is kept here and re-raised by the caller (that is how a full disk is recognised).
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def create_new(path: Path) -> IO[bytes]:
    """Open a fresh file for writing, never an existing one.

    A leftover temporary name may be a hard link to a real checkpoint; opening it with "wb"
    would truncate that checkpoint, so the name is unlinked and created exclusively.
    """
    path.unlink(missing_ok=True)
    return open(path, "xb")


def fsync_directory(directory: Path) -> None:
    """Make renames durable across a power loss (a kill alone needs only rename atomicity)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    """fsync a file that was written by someone else (DeepSpeed's or DCP's writers)."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write(final: Path, data: bytes | str, sync_directory: bool = True) -> None:
    """Replace `final` by `data` so that a reader (or a kill) sees the old bytes or the new.

    Written under an owned temporary name beside `final` (see `temp_path`, swept by
    `CheckpointManager` when its writer is dead), fsynced, then `os.replace`d; the temporary
    file never outlives a failed call. `sync_directory=False` leaves the directory fsync to a
    caller that renames more in the same directory right after.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = temp_path(final, socket.gethostname())
    try:
        with create_new(tmp) as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_directory:
        fsync_directory(final.parent)


def write_error(exc: OSError, target: Path) -> CheckpointError:
    """The error to raise when writing the checkpoint `target` failed with `exc`."""
    reason = exc.strerror or str(exc)
    if exc.filename and Path(exc.filename) != target:
        reason += f": {exc.filename}"
    if exc.errno in DISK_FULL_ERRNOS:
        return CheckpointError(
            f"disk full while writing {target} ({reason}); earlier checkpoints and "
            f"{LATEST_NAME} are untouched; free space or keep fewer checkpoints"
        )
    return CheckpointError(f"cannot write checkpoint {target} ({reason})")
