"""Sharded checkpoints over `torch.distributed.checkpoint` (DCP): each rank writes its shards,
and a run saved on N ranks loads on M (DCP reshards on load, DTensor or plain tensors alike).

Layout: the folder layout of `pipeline.checkpoint.folders` (manifest, `latest`, atomic publish,
fallback, retention), one folder per step holding

    .metadata                   DCP's index of every shard (read with a restricted unpickler)
    __<rank>_<n>.distcp         each rank's shards (DCP reads them weights-only)
    trainer.pt                  the loop state, written by rank 0 (torch.save, weights-only)
    checksums.sha256            every file above, hashed after the save completed

A save (`save_states`, every rank):
1. wait for the previous save; rank 0 sweeps killed saves' folders and writes the loop state
   into `.step_N.tmp/` (shared with the other ranks: `main_only` is also the barrier);
2. `dcp.async_save` into `.step_N.tmp/`: the state is staged into host memory (pinned where
   CUDA exists, so the copy runs at full speed and the GPU memory is free to change) before
   the call returns; the files are written by a background thread, over a gloo group of its
   own so its collectives never interleave with the training step's;
3. rank 0's upload finishes only after DCP wrote `.metadata`, i.e. after every rank's files are
   written and fsynced; a thread on rank 0 then hashes every file and publishes the folder.
`wait()` (rank-local) joins that work and raises its error; `flush()` (collective) gives rank
0's publishing error to every rank. On one process (no process group) the same code runs with
`no_dist`. The write runs in a thread, not a process: DCP's process mode needs a process group,
and the staging copy, the part that holds training, is the same in both.

A load (`restore_states`, every rank) takes a folder that `resolve` verified on rank 0: DCP
loads into the `Stateful` entries (`ModelState`, `OptimizerState`) in place, resharding to the
current layout; the loop state is returned from `trainer.pt`.
"""

from __future__ import annotations

import io
import logging
import pickle
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pipeline.checkpoint.files import write_error
from pipeline.checkpoint.folders import (
    LATEST,
    FolderCheckpoints,
    complete_tag_dirs,
    folder_files,
    hash_and_sync,
    verify_tag_dir,
)
from pipeline.checkpoint.layout import check_state, list_step_files
from pipeline.checkpoint.store import LOOP_STATE
from pipeline.distributed.comm import Collective
from pipeline.errors import CheckpointError

logger = logging.getLogger("pipeline.checkpoint")

LOOP_FILE = "trainer.pt"
METADATA = ".metadata"


class ModelState:
    """A (possibly FSDP2/TP-sharded) model as a DCP `Stateful`: FQN keys, DTensor values."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))


class OptimizerState:
    """An optimizer over a (sharded) model as a DCP `Stateful`, keyed by parameter FQN (not by
    position), so its state reshards to another layout like the weights do."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class DCPStore(FolderCheckpoints):
    """Checkpoint folders written by every rank through DCP; see the module docstring.

    Construct it on every rank at the same point (it creates its gloo group, a collective).
    """

    kind = "DCP"

    def __init__(
        self,
        directory: Path,
        keep: int,
        comm: Collective | None = None,
        *,
        async_save: bool = True,
    ) -> None:
        super().__init__(directory, keep, comm)
        self.async_save = async_save
        self._distributed = dist.is_available() and dist.is_initialized()
        self._group = dist.new_group(backend="gloo") if self._distributed and async_save else None
        cuda = torch.cuda.is_available()
        self._stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda,
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=cuda,
            )
        )
        self._upload: Future | None = None
        self._publisher: threading.Thread | None = None
        self._error: BaseException | None = None
        self._written: Path | None = None

    # ----------------------------------------------------------------------------- saving
    def save_states(self, states: dict[str, Any], step: int) -> Path:
        """Every rank: stage the states, write them behind training, publish on rank 0."""
        self.wait()
        loop = states.get(LOOP_STATE)
        if loop is not None:
            check_state(loop, LOOP_STATE)  # fails before anything is written
        sharded = {name: value for name, value in states.items() if name != LOOP_STATE}
        final, tmp = self.path_for(step), self.temp_path_for(step)
        self.comm.main_only(lambda: self._prepare(tmp, loop))
        if not self.async_save:
            dcp.save(sharded, checkpoint_id=tmp, no_dist=not self._distributed)
            self._written = self.comm.main_only(lambda: self._publish_written(tmp, final))
            return final
        upload = dcp.async_save(
            sharded,
            checkpoint_id=tmp,
            process_group=self._group,
            async_stager=self._stager,
            no_dist=not self._distributed,
        )
        assert isinstance(upload, Future), "synchronous staging returns the upload's future"
        self._upload = upload
        if self.comm.is_main:
            self._publisher = threading.Thread(
                target=self._publish_when_written,
                args=(upload, tmp, final),
                name=f"checkpoint-publish-{step}",
            )
            self._publisher.start()
        return final

    def _prepare(self, tmp: Path, loop: dict[str, Any] | None) -> None:
        self.clear_leftovers()
        tmp.mkdir()
        if loop is not None:
            with open(tmp / LOOP_FILE, "xb") as handle:
                torch.save(loop, handle)

    def _publish_when_written(self, upload: Future, tmp: Path, final: Path) -> None:
        try:
            upload.result()
            self._written = self._publish_written(tmp, final)
        except BaseException as exc:  # re-raised in the training thread by wait()
            self._error = exc

    def _publish_written(self, tmp: Path, final: Path) -> Path:
        digests = [(name, hash_and_sync(tmp / name)) for name in folder_files(tmp)]
        return self.publish(tmp, final, digests)

    def wait(self) -> Path | None:
        """This rank: block until its write (and on rank 0, the publishing) is done."""
        upload, self._upload = self._upload, None
        failure: BaseException | None = None
        if upload is not None:
            try:
                upload.result()
            except BaseException as exc:
                failure = exc
        if self._publisher is not None:
            self._publisher.join()
            self._publisher = None
        if self._error is not None:
            failure, self._error = self._error, None
        if failure is None:
            return self._written
        if isinstance(failure, CheckpointError):
            raise failure
        cause = first_failure(failure)
        if cause is None:
            raise failure  # an interrupt stays an interrupt
        if isinstance(cause, OSError):
            raise write_error(cause, self.directory) from failure
        raise CheckpointError(
            f"writing a DCP checkpoint in {self.directory} failed ({type(cause).__name__}: "
            f"{_first_line(cause)}; torch.save reports a full disk this way too); earlier "
            f"checkpoints and {LATEST} are untouched"
        ) from failure

    def flush(self) -> Path | None:
        """Every rank: `wait`; any rank's failure (rank 0's publishing) is raised on all."""
        local: CheckpointError | None = None
        try:
            self.wait()
        except CheckpointError as exc:
            local = exc
        messages = self.comm.all_gather_object(None if local is None else str(local))
        if local is not None:
            raise local
        failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
        if failed:
            rank, text = failed[0]
            raise CheckpointError(f"rank {rank}: {text}")
        self._written = self.comm.broadcast_object(self._written)  # rank 0 publishes
        return self._written

    def close(self) -> None:
        """Finish the save in flight and release the staging buffers."""
        try:
            self.wait()
        finally:
            self._stager.close()

    # ---------------------------------------------------------------------------- loading
    def inspect(self, path: Path) -> dict[str, Any]:
        """The loop state of a verified DCP folder (its index checked, no shard read)."""
        return inspect_dcp_folder(path)

    def loop_state(self, path: Path) -> dict[str, Any]:
        """The loop state of a folder `resolve` has just verified: its index checked, its
        files not hashed a second time (a large checkpoint takes minutes to hash)."""
        check_metadata(path)
        return read_loop_state(path)

    def restore_states(self, states: dict[str, Any], path: Path) -> dict[str, Any]:
        """Every rank: load `path` (verified by `resolve` on rank 0) into the Stateful entries
        in place, resharding to this run's layout; return the loop state."""
        self.wait()
        check_metadata(path)
        sharded = {name: value for name, value in states.items() if name != LOOP_STATE}
        try:
            with warnings.catch_warnings():  # one process, chosen on purpose: not news
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(sharded, checkpoint_id=path, no_dist=not self._distributed)
        except (CheckpointException, KeyError, RuntimeError, ValueError) as exc:
            cause = first_failure(exc) or exc
            raise CheckpointError(
                f"cannot restore DCP checkpoint {path}: {type(cause).__name__}: "
                f"{_first_line(cause)}"
            ) from exc
        return read_loop_state(path)


def first_failure(exc: BaseException) -> Exception | None:
    """The error behind a failed DCP call: DCP reports every rank's error in one
    `CheckpointException` (a BaseException); None for an interrupt or exit."""
    if isinstance(exc, CheckpointException):
        for _, (cause, _trace) in sorted(exc.failures.items()):
            if isinstance(cause, Exception):
                return cause
        return None
    return exc if isinstance(exc, Exception) else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [repr(exc)])[0][:300]


def inspect_dcp_folder(path: Path) -> dict[str, Any]:
    """Verify a DCP folder against its manifest, check its index, return its loop state."""
    verify_tag_dir(path)
    check_metadata(path)
    return read_loop_state(path)


def is_dcp_folder(path: Path) -> bool:
    """Does `path` hold a DCP checkpoint (rather than a DeepSpeed one)? Not verified."""
    return (path / METADATA).is_file()


def newest_steps(directory: Path) -> tuple[int | None, int | None]:
    """(newest complete DCP folder's step, newest `step_*.pt` file's step) in `directory`.

    A run that changed strategy midway (fsdp, then one device, in one output folder) holds
    both layouts; whoever resumes it takes the higher step. Names only: nothing is verified.
    """
    folders = [step for step, path in complete_tag_dirs(directory) if is_dcp_folder(path)]
    files = list_step_files(directory)
    return (folders[-1] if folders else None), (files[-1][0] if files else None)


def read_loop_state(path: Path) -> dict[str, Any]:
    """`trainer.pt` of a DCP folder, weights-only."""
    loop_file = path / LOOP_FILE
    if not loop_file.is_file():
        raise CheckpointError(f"{path} has no {LOOP_FILE}: not a DCP checkpoint of this trainer")
    try:
        state = torch.load(loop_file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [repr(exc)])[0]
        raise CheckpointError(f"cannot read {loop_file}: {first[:300]}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{loop_file} holds a {type(state).__name__}, not a dict")
    return state


_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP reads `.metadata` with plain `pickle.load`; this reads it first allowing only DCP's
    own index classes, torch dtypes/sizes/layouts and paths, so a crafted index runs nothing."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def check_metadata(path: Path) -> None:
    """Refuse a DCP folder whose `.metadata` would build anything but DCP's index."""
    metadata = path / METADATA
    try:
        data = metadata.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {METADATA}: not a DCP checkpoint") from None
    try:
        _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing DCP checkpoint {path}: its {METADATA} holds {exc} (only DCP's index is "
            "loaded); it was not written by this trainer"
        ) from None
    except (EOFError, ValueError, AttributeError, ImportError, TypeError) as exc:
        raise CheckpointError(f"cannot read {metadata}: {exc}") from exc


__all__ = [
    "LOOP_FILE",
    "DCPStore",
    "ModelState",
    "OptimizerState",
    "check_metadata",
    "inspect_dcp_folder",
    "is_dcp_folder",
    "newest_steps",
    "read_loop_state",
]
