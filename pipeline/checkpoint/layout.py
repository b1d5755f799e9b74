"""The checkpoint format on disk, and reading it back verified.

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

How files get there safely is `pipeline.checkpoint.manager`'s job; `pipeline.checkpoint` is the
public face of both.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import torch

from pipeline.errors import CheckpointError
from pipeline.hashing import stream_sha256

logger = logging.getLogger("pipeline.checkpoint")  # the public module's name, as before the split

LATEST_NAME = "latest_checkpoint.pt"
CHECKSUM_SUFFIX = ".sha256"
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")

MapLocation = str | torch.device | dict[str, str] | None
T = TypeVar("T")
_PRIMITIVES = (str, int, float, bool, type(None))
_TENSORS = (torch.Tensor, torch.nn.Parameter)
_ALLOWED = (
    "a checkpoint holds only tensors, dict/list/tuple, str, int, float, bool and None, "
    "so that it loads with torch.load(weights_only=True); convert it first"
)


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
                raise TypeError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; "
                    "checkpoint keys must be str or int"
                )
            check_state(value, f"{where}[{key!r}]")
        return
    if type(state) in (list, tuple):
        for index, value in enumerate(state):
            check_state(value, f"{where}[{index}]")
        return
    if type(state) not in _PRIMITIVES:
        kind = f"{type(state).__module__}.{type(state).__qualname__}"
        raise TypeError(f"{where} is a {kind}; {_ALLOWED}")


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
            "refusing to load a checkpoint that cannot be verified"
        )
    if not expected:
        raise CorruptCheckpointError(
            f"checksum file {checksum_path(path)} is unreadable or malformed; "
            f"cannot verify checkpoint {path}"
        )
    actual = stream_sha256(handle)
    if actual not in expected:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or truncated: its SHA-256 {actual[:16]}... does not "
            f"match {checksum_path(path).name}"
        )
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
                f"{type(exc).__name__}: {first_line}"
            ) from exc
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
    return pick_latest(directory, lambda path: load_verified(path, map_location))


def resolve_latest(directory: Path) -> Path:
    """What `load_latest` would load, found by checksums alone (nothing is unpickled)."""
    return pick_latest(directory, verify_checkpoint)[1]


def pick_latest(directory: Path, read: Callable[[Path], T]) -> tuple[T, Path]:
    """`read` `latest_checkpoint.pt`, else the newest step file it reads, with a warning.

    `read` raises `CorruptCheckpointError` for a file to skip (any other error propagates).
    """
    latest = directory / LATEST_NAME
    steps = list_step_files(directory)
    problems: list[str] = []
    if latest.exists():
        try:
            value = read(latest)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
            logger.warning("%s; falling back to the newest intact checkpoint in %s", exc, directory)
        else:
            target = latest_target(directory)
            return value, target[1] if target else latest
    elif steps:
        problems.append(f"{latest} is missing")
        logger.warning("%s is missing; falling back to the newest intact checkpoint", latest)
    else:
        raise CheckpointError(f"no checkpoint in {directory}")
    for _, path in reversed(steps):
        try:
            value = read(path)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
            logger.warning("%s; trying an older one", exc)
            continue
        logger.warning("loaded %s instead of %s", path, latest)
        return value, path
    raise CheckpointError(f"no intact checkpoint in {directory}: " + "; ".join(problems))
