"""Put checkpoints on disk and get them back safely: atomic writes, checksums, retention.

On-disk layout of a checkpoint directory (`experiments/<name>/checkpoints/`):

    step_0000100.pt                 torch.save of the state dict (tensors and primitives only)
    step_0000100.pt.sha256          its checksum, in `sha256sum` format: "<hex>  step_0000100.pt"
    step_0000200.pt
    step_0000200.pt.sha256
    latest_checkpoint.pt            a hard link to the newest step file saved (same bytes)
    latest_checkpoint.pt.sha256     its own checksum file, so `latest` verifies on its own

Why this shape:
- `torch.load("checkpoints/latest_checkpoint.pt", weights_only=True)` works for a user, and
  `sha256sum -c *.sha256` checks the directory by hand.
- `latest_checkpoint.pt` is a hard link, not a symlink or a pointer file: it costs no space, it
  is a real file that survives `cp`, MLflow artifact upload and DVC (which caches by content, so
  the two names share one cache entry; a checkout may turn them into two copies, which is why
  `latest` carries its own checksum file instead of relying on being the same inode as a step
  file). Where hard links are unsupported it falls back to a copy, with a warning.
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
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

from pipeline.errors import CheckpointError

logger = logging.getLogger(__name__)

LATEST_NAME = "latest_checkpoint.pt"
CHECKSUM_SUFFIX = ".sha256"
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)@(?P<host>[^@/]+)\.tmp$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_CHUNK = 1 << 20

MapLocation = str | torch.device | dict[str, str] | None
_PRIMITIVES = (str, int, float, bool, type(None))
_TENSORS = (torch.Tensor, torch.nn.Parameter)
_ALLOWED = ("a checkpoint holds only tensors, dict/list/tuple, str, int, float, bool and None, "
            "so that it loads with torch.load(weights_only=True); convert it first")


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's bytes do not match its checksum file, or the checksum file is missing."""


def step_filename(step: int) -> str:
    """`step_0000100.pt`: zero-padded so names sort like steps."""
    return f"step_{step:07d}.pt"


def checksum_path(path: Path) -> Path:
    """The checksum file that sits beside a checkpoint file."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def check_state(state: Any, where: str = "state") -> None:
    """Fail fast if `state` holds anything `torch.load(weights_only=True)` would refuse.

    Only type checks, no tensor data is touched, so it is cheap enough for every save. Runs
    before anything is written, and names the offending key, e.g. `state['rng']['numpy'][1]`.
    A bad state is a bug in the caller, hence `TypeError` (it keeps its traceback).
    """
    if isinstance(state, _TENSORS):
        if type(state) not in _TENSORS:
            raise TypeError(f"{where} is a tensor subclass {type(state).__qualname__}; {_ALLOWED}")
        return
    if type(state) in (dict, OrderedDict):
        for key, value in state.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; "
                                "checkpoint keys must be str or int")
            check_state(value, f"{where}[{key!r}]")
        return
    if type(state) in (list, tuple):
        for index, value in enumerate(state):
            check_state(value, f"{where}[{index}]")
        return
    if type(state) not in _PRIMITIVES:
        kind = f"{type(state).__module__}.{type(state).__qualname__}"
        raise TypeError(f"{where} is a {kind}; {_ALLOWED}")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as handle:
        return _stream_sha256(handle)


def _stream_sha256(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def read_checksums(path: Path) -> set[str] | None:
    """Digests a checksum file accepts (normally one); None when the file does not exist."""
    try:
        text = checksum_path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return set()
    digests = set()
    for line in text.splitlines():
        fields = line.split(maxsplit=1)
        if fields and _DIGEST_RE.match(fields[0]):
            digests.add(fields[0])
    return digests


def verify_checkpoint(path: Path) -> str:
    """Check a checkpoint file against its checksum file; return its digest.

    Raises `CorruptCheckpointError` naming the file when the checksum file is missing or
    malformed, or the bytes differ (flipped bits, a file cut short).
    """
    with _open_checkpoint(path) as handle:
        return _verify_open(path, handle)


def _open_checkpoint(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from exc


def _verify_open(path: Path, handle: IO[bytes]) -> str:
    """Verify through an open handle, so what is verified is what is then loaded."""
    expected = read_checksums(path)
    if expected is None:
        raise CorruptCheckpointError(
            f"checkpoint {path} has no checksum file {checksum_path(path).name}; "
            "refusing to load a checkpoint that cannot be verified")
    if not expected:
        raise CorruptCheckpointError(
            f"checksum file {checksum_path(path)} is unreadable or malformed; "
            f"cannot verify checkpoint {path}")
    actual = _stream_sha256(handle)
    if actual not in expected:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or truncated: its SHA-256 {actual[:16]}... does not "
            f"match {checksum_path(path).name}")
    return actual


def load_verified(path: Path, map_location: MapLocation = "cpu") -> dict[str, Any]:
    """Verify one checkpoint file, then load it with `weights_only=True` (no pickled code)."""
    with _open_checkpoint(path) as handle:
        _verify_open(path, handle)
        handle.seek(0)
        try:
            state = torch.load(handle, map_location=map_location, weights_only=True)
        except MemoryError:
            raise
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise CheckpointError(
                f"cannot load checkpoint {path} (checksum is fine, so it was written this way): "
                f"{type(exc).__name__}: {first_line}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def list_step_files(directory: Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every `step_*.pt` in a directory, oldest step first."""
    if not directory.is_dir():
        return []
    found = []
    for entry in os.scandir(directory):
        match = _STEP_RE.match(entry.name)
        if match:
            found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def checkpoint_directory(path: Path) -> Path:
    """A run directory (holding `checkpoints/`) or a checkpoint directory -> the latter."""
    if (path / LATEST_NAME).exists() or list_step_files(path):
        return path
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    raise CheckpointError(f"no checkpoints in {path} (nor in {path / 'checkpoints'})")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def latest_target(directory: Path) -> tuple[int, Path] | None:
    """The step file `latest_checkpoint.pt` points at, told by inode or by recorded checksum.

    Reads only checksum files and inodes, never hashes data. None when `latest` is missing or
    matches no step file (e.g. that step file was deleted by hand).
    """
    latest = directory / LATEST_NAME
    if not latest.exists():
        return None
    latest_digests = read_checksums(latest) or set()
    for step, path in reversed(list_step_files(directory)):
        if _same_file(latest, path) or (latest_digests & (read_checksums(path) or set())):
            return step, path
    return None


def load_latest(directory: Path, map_location: MapLocation = "cpu") -> tuple[dict[str, Any], Path]:
    """Load `latest_checkpoint.pt`, or else the newest intact step file, with a warning.

    Only checksum problems (corrupt, truncated, unverifiable, missing) fall back; a file whose
    checksum is right but which `weights_only` refuses is an error, not something to skip.
    Returns the state and the step file loaded (or `latest_checkpoint.pt` when no step file is
    identical to it).
    """
    latest = directory / LATEST_NAME
    steps = list_step_files(directory)
    problems: list[str] = []
    if latest.exists():
        try:
            state = load_verified(latest, map_location)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
            logger.warning("%s; falling back to the newest intact checkpoint in %s", exc, directory)
        else:
            target = latest_target(directory)
            return state, target[1] if target else latest
    elif steps:
        problems.append(f"{latest} is missing")
        logger.warning("%s is missing; falling back to the newest intact checkpoint", latest)
    else:
        raise CheckpointError(f"no checkpoint in {directory}")
    for _, path in reversed(steps):
        try:
            state = load_verified(path, map_location)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
            logger.warning("%s; trying an older one", exc)
            continue
        logger.warning("loaded %s instead of %s", path, latest)
        return state, path
    raise CheckpointError(f"no intact checkpoint in {directory}: " + "; ".join(problems))


class _HashingWriter:
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


class CheckpointManager:
    """Saves `step_XXXXXXX.pt` checkpoints atomically with checksums, keeps the newest `keep`.

    One writer per directory (the run lock sees to that); any number of readers. Holds no
    open files between calls. The layout and the write order are in the module docstring.
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
            data_tmp = self._temp_path(target)
            created.append(data_tmp)
            digest = self._write_state(state, data_tmp)
            self._publish(data_tmp, target, digest, created)
        except OSError as exc:
            raise self._write_error(exc, target) from exc
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
        self._replace_verified(target, digest, lambda: os.replace(data_tmp, target), created)
        latest = self.latest_path
        link_tmp = self._temp_path(latest)
        created.append(link_tmp)
        self._link_or_copy(target, link_tmp)  # before its checksum file (see _sweep)
        self._replace_verified(latest, digest, lambda: os.replace(link_tmp, latest), created)

    def _replace_verified(self, path: Path, digest: str, replace: Callable[[], None],
                          created: list[Path]) -> None:
        """Swap the bytes at `path` so that they match its checksum file at every moment."""
        old = read_checksums(path) if path.exists() else None
        if old and digest not in old:
            self._write_checksums(path, [*sorted(old), digest], created)
        else:
            self._write_checksums(path, [digest], created)
        replace()
        _fsync_directory(self.directory)
        if old and old != {digest}:
            self._write_checksums(path, [digest], created)

    def _write_checksums(self, path: Path, digests: Iterable[str], created: list[Path]) -> None:
        text = "".join(f"{digest}  {path.name}\n" for digest in digests)
        final = checksum_path(path)
        tmp = self._temp_path(final)
        created.append(tmp)
        with _create_new(tmp) as handle:
            handle.write(text.encode("ascii"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)

    def _write_state(self, state: dict[str, Any], tmp: Path) -> str:
        with _create_new(tmp) as handle:
            writer = _HashingWriter(handle)
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
            if exc.errno in _DISK_FULL_ERRNOS:
                raise
            logger.warning("cannot hard-link in %s (%s); %s will be a copy", self.directory,
                           exc.strerror, LATEST_NAME)
        with open(source, "rb") as src, _create_new(link) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())

    def _write_error(self, exc: OSError, target: Path) -> CheckpointError:
        reason = exc.strerror or str(exc)
        if exc.filename and Path(exc.filename) != target:
            reason += f": {exc.filename}"
        if exc.errno in _DISK_FULL_ERRNOS:
            return CheckpointError(
                f"disk full while writing {target} ({reason}); earlier checkpoints and "
                f"{LATEST_NAME} are untouched; free space or keep fewer checkpoints")
        return CheckpointError(f"cannot write checkpoint {target} ({reason})")

    def _temp_path(self, final: Path) -> Path:
        """`.name.<pid>@<host>.tmp` beside `final`: hidden, same filesystem, owner recorded."""
        return final.with_name(f".{final.name}.{os.getpid()}@{self._host}.tmp")

    # ------------------------------------------------------------------- housekeeping
    def _prune(self, keep_also: Path) -> None:
        """Delete step files beyond the newest `keep`; data before checksum file."""
        steps = self.list_checkpoints()
        keep = {path for _, path in steps[-self.keep:]} | {keep_also}
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

    def _writer_alive(self, pid: int, host: str) -> bool:
        """Whether the writer that owns a temporary file may still be running."""
        if host != self._host:
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
                match = _TEMP_RE.match(entry.name)
                if not match:
                    continue
                if self._writer_alive(int(match.group("pid")), match.group("host")):
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
            created: list[Path] = []
            try:
                self._write_checksums(data, [actual], created)
            finally:
                for path in created:
                    path.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------- loading
    def load(self, which: str | int | Path = "latest",
             map_location: MapLocation = "cpu") -> tuple[dict[str, Any], Path]:
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
            raise CheckpointError(f"no checkpoint {step_path.name} in {self.directory} "
                                  f"(steps present: {have})")
        return load_verified(step_path, map_location), step_path


def _create_new(path: Path) -> IO[bytes]:
    """Open a fresh file for writing, never an existing one.

    A leftover temporary name may be a hard link to a real checkpoint; opening it with "wb"
    would truncate that checkpoint, so the name is unlinked and created exclusively.
    """
    path.unlink(missing_ok=True)
    return open(path, "xb")


def _fsync_directory(directory: Path) -> None:
    """Make renames durable across a power loss (a kill alone needs only rename atomicity)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
