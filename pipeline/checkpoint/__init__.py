"""Put checkpoints on disk and get them back safely: atomic writes, checksums, retention.

One interface, `Store` (`pipeline.checkpoint.store`), over a dict of named states:

    states = {"model": ..., "optimizer": ..., "scaler": ..., "trainer": loop_state}
    path = store.save_states(states, step)      # every rank; may return before the write ends
    store.wait()                                # this rank: the save in flight is published
    path = store.resolve("latest")              # rank 0: verified, falls back to newest intact
    loop_state = store.inspect(path)            # rank 0: verified loop state, nothing restored
    loop_state = store.restore_states(states, path)  # every rank: Stateful entries in place

`states["trainer"]` (`LOOP_STATE`) is the loop state, a plain dict of tensors and primitives;
every other entry is `Stateful` (`state_dict()`/`load_state_dict()`). Listing for the trainer:
`directory`, `path_for(step)`, `list_checkpoints()`, `candidates()`, `files_of(path)`.

The stores, one per layout, all with checksums verified before load, `latest`, fallback to the
newest intact checkpoint, keep-N and atomic publish:
- `SingleFileStore` (here): `step_N.pt` + `latest_checkpoint.pt`, today's format (every existing
  checkpoint loads), optional background write (`AsyncCheckpointWriter`). Single device, DDP.
- `DeepSpeedStore` (`pipeline.checkpoint.deepspeed_store`, needs DeepSpeed): the engine under
  `"engine"` saves and restores model, optimizer and scaler; ZeRO partitions per rank.
- `DCPStore` (`pipeline.checkpoint.dcp_store`): sharded states (FSDP2 / tensor-parallel
  DTensors) through `torch.distributed.checkpoint`, `dcp.async_save` with pinned staging where
  CUDA exists, saved on N ranks and loaded on M (DCP reshards). Wrap a sharded model and its
  optimizer as `ModelState(model)` / `OptimizerState(model, optimizer)` so keys are FQNs. From
  an FSDP strategy: build it on every rank (`DCPStore(dir, keep, comm)`: it makes its own gloo
  group for the background write), `save_states` every rank, `flush()` (collective) before
  reading back, `comm.main_only(lambda: store.resolve(which))` then `restore_states` on every
  rank. Its `inspect` reads only `trainer.pt`, so rank 0 checks compatibility cheaply.
The two folder stores share `pipeline.checkpoint.folders` (manifest, publish, fallback).

Modules, split by job:
- `layout`: the single-file layout and reading it back verified (`load_verified`, `load_latest`).
- `manager`: `CheckpointManager`, which saves in an order that a kill at any moment cannot
  hurt, keeps the newest `keep`, and sweeps up after killed writers.
- `async_writer`: `AsyncCheckpointWriter`, a host snapshot written by a background thread.
- `files`: the low-level file operations, including `atomic_write`, the one way this package
  replaces a small file (checksum files, `latest`, manifests).
- `folders`, `deepspeed_store`, `deepspeed_safe_load`, `dcp_store`: the folder layouts.
- `pipeline.hashing`: SHA-256 of files and streams (shared with the data and tracking code).
Import from here where a name is exported; the modules behind it may move.
"""

from __future__ import annotations

from pipeline.checkpoint.async_writer import AsyncCheckpointWriter
from pipeline.checkpoint.files import atomic_write
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
from pipeline.checkpoint.store import LOOP_STATE, SingleFileStore, Stateful, Store
from pipeline.errors import CheckpointError
from pipeline.hashing import file_sha256

__all__ = [
    "CHECKSUM_SUFFIX",
    "LATEST_NAME",
    "LOOP_STATE",
    "AsyncCheckpointWriter",
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpointError",
    "MapLocation",
    "SingleFileStore",
    "Stateful",
    "Store",
    "atomic_write",
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
