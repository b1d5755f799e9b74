"""Put checkpoints on disk and get them back safely: atomic writes, checksums, retention.

This is the public face; the work is split by job:
- `pipeline.checkpoint_format`: the on-disk layout (step files, `latest_checkpoint.pt`, their
  `.sha256` checksum files) and reading it back verified (`load_verified`, `load_latest`).
- `pipeline.checkpoint_manager`: `CheckpointManager`, which saves in an order that a kill at
  any moment cannot hurt, keeps the newest `keep`, and sweeps up after killed writers.
- `pipeline.checkpoint_io`: the low-level file operations a save is built from.
- `pipeline.hashing`: SHA-256 of files and streams.
Import from here; the modules behind it may move.
"""

from __future__ import annotations

from pipeline.checkpoint_format import (
    CHECKSUM_SUFFIX,
    LATEST_NAME,
    CorruptCheckpointError,
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
    verify_checkpoint,
)
from pipeline.checkpoint_manager import CheckpointManager
from pipeline.errors import CheckpointError
from pipeline.hashing import file_sha256

__all__ = [
    "CHECKSUM_SUFFIX",
    "LATEST_NAME",
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpointError",
    "MapLocation",
    "check_state",
    "checkpoint_directory",
    "checksum_path",
    "file_sha256",
    "latest_target",
    "list_step_files",
    "load_latest",
    "load_verified",
    "read_checksums",
    "step_filename",
    "verify_checkpoint",
]
