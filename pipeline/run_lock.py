"""One training process per output directory.

Two runs writing the same `experiments/<name>/` would interleave checkpoints and logs. The lock
is `fcntl.flock` on `<dir>/.run.lock`: the kernel drops it when the holder exits in any way,
kill -9 included, so a crashed run never leaves it stuck. The file's contents (pid, host, start
time) only make the refusal message useful; the lock is the flock, not the file's existence.
Deleting the file by hand while a run holds it lets a second run in, so do not.

On release the file is unlinked while still locked, so a finished run leaves nothing in its
output directory; a process that opened the old file just before is caught by re-checking,
after locking, that the locked file is still the one at the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from pipeline.errors import UserError

LOCK_FILE_NAME = ".run.lock"


class RunLockedError(UserError):
    """Another live process holds the output directory."""


class RunLock:
    """Exclusive, crash-safe claim on an output directory; use as a context manager:

        with RunLock(output_dir):
            train(...)
    """

    def __init__(self, directory: Path, name: str = LOCK_FILE_NAME) -> None:
        self.directory = Path(directory)
        self.path = self.directory / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise `RunLockedError` naming the holder and the lock file."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = self._lock_current_file()
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except OSError as exc:
            raise UserError(f"cannot lock output directory {self.directory}: "
                            f"{exc.strerror}: {exc.filename or self.path}") from exc
        self._fd = fd
        return self

    def _lock_current_file(self) -> int:
        """Open and flock the file at `self.path`, retrying if it was swapped under us."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                message = self._refusal(fd)
                os.close(fd)
                raise RunLockedError(message) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder released and unlinked it between our open and flock

    def _refusal(self, fd: int) -> str:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            holder = {}
        if holder.get("pid") is not None:
            who = (f"pid {holder['pid']} on host {holder.get('host', '?')}"
                   f" (since {holder.get('since', '?')})")
        else:
            who = "a process that has not yet written its pid"
        return (f"output directory {self.directory} is in use by another training run: {who} "
                f"holds the lock {self.path}; wait for it to finish, stop it, or choose another "
                "output directory")

    def release(self) -> None:
        """Unlink the lock file, then drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    os.unlink(self.path)  # only our file, never one a later run created
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
