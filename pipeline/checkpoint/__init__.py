"""Put checkpoints on disk and get them back safely: atomic writes, checksums, retention.

This is the public face; the work is split by job:
- `pipeline.checkpoint.layout`: the on-disk layout (step files, `latest_checkpoint.pt`, their
  `.sha256` checksum files) and reading it back verified (`load_verified`, `load_latest`).
- `pipeline.checkpoint.manager`: `CheckpointManager`, which saves in an order that a kill at
  any moment cannot hurt, keeps the newest `keep`, and sweeps up after killed writers.
- `pipeline.checkpoint.async_writer`: `AsyncCheckpointWriter`, a host snapshot written by a
  background thread so training goes on during the write.
- `pipeline.checkpoint.files`: the low-level file operations a save is built from.
- `pipeline.checkpoint.deepspeed_store`, `pipeline.checkpoint.deepspeed_safe_load`: DeepSpeed's
  checkpoint folders, verified and read weights-only (imported by path: they need DeepSpeed).
- `pipeline.hashing`: SHA-256 of files and streams (shared with the data and tracking code).
Import from here where a name is exported; the modules behind it may move.
"""

from __future__ import annotations

from pipeline.checkpoint.async_writer import AsyncCheckpointWriter
from pipeline.checkpoint.layout import (
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
from pipeline.checkpoint.manager import CheckpointManager
from pipeline.errors import CheckpointError
from pipeline.hashing import file_sha256

__all__ = [
    "CHECKSUM_SUFFIX",
    "LATEST_NAME",
    "AsyncCheckpointWriter",
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
