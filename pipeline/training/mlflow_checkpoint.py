"""`--resume_from_checkpoint runs:/<run_id>[/<artifact path>]`: continue a run from MLflow.

Which checkpoint (among the run's `checkpoints/` artifacts, see `tracking.checkpoint_uploads`):
- `runs:/<id>` (or `runs:/<id>/checkpoints`): the newest the run logged, in the layout this
  run's strategy prefers: a single file (`latest_checkpoint.pt` when it has one, else its
  highest `step_*.pt`) for single and ddp; a folder (the one its `latest` file names, else its
  highest complete `step_*/`) for deepspeed and fsdp. Layouts a strategy also reads are taken
  when the preferred one was not logged: single/ddp read an fsdp run's sharded (DCP) folders,
  fsdp reads single files; DeepSpeed reads only its own folders;
- `runs:/<id>/checkpoints/step_0000400.pt` or `.../step_0000400` (a folder): that one;
- a proxied `mlflow-artifacts:/.../<id>/artifacts/checkpoints/...` URI, as a shared server's UI
  shows it: the same as its `runs:/` form.

Where the bytes go, and when:
1. Before the run directory exists (rank 0): the run is looked up, the checkpoint downloaded
   into a new temporary folder (under $TMPDIR), verified against its checksum file (single
   file) or manifest (folders) before anything is unpickled, read weights-only (the same rules
   as a local resume: `load_verified`, `inspect_tag_dir`, `inspect_dcp_folder`) and checked
   against this run's model shape, tokenizer and strategy. Any failure is one line and removes
   the temporary folder: the run directory is never created.
2. Under the run lock: the verified files move to `<run_dir>/from-mlflow/<run_id>/<artifact
   path>` (a rename when $TMPDIR is on the run directory's filesystem, else a copy; set TMPDIR
   there for large checkpoints), and the resume loads them from there like a local checkpoint,
   verifying again. They are kept deliberately, as the exact bytes this run started from;
   a later resume from the same MLflow run replaces them. `--resume_from_checkpoint latest`
   afterwards means the run's own `checkpoints/`, never this folder.

Which MLflow run the new session logs into:
- the original run is unfinished (RUNNING, KILLED by a stop signal, FAILED): that same run, as
  a local resume would (its metrics continue from the checkpoint's step);
- it FINISHED: a new run, nested under the original in the UI (`mlflow.parentRunId`), so the
  finished record stays as it was.
Either way the session tags its run `resumed_from=<run_id>` and `resumed_from.artifact=<path>`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.checkpoint import CHECKSUM_SUFFIX, LATEST_NAME, load_verified
from pipeline.checkpoint.dcp_store import METADATA, inspect_dcp_folder
from pipeline.checkpoint.deepspeed_store import LATEST as DEEPSPEED_LATEST
from pipeline.checkpoint.deepspeed_store import MANIFEST, inspect_tag_dir, is_tag_name
from pipeline.config.schema import Config
from pipeline.errors import CheckpointError
from pipeline.tracking.checkpoint_uploads import ARTIFACT_DIR
from pipeline.tracking.mlflow_setup import resolve_tracking_uri
from pipeline.tracking.run_reader import RunReader, RunUri, parse_run_uri
from pipeline.training.loop_state import check_compatible

logger = logging.getLogger("pipeline.train")

DOWNLOAD_DIR = "from-mlflow"
"""`<run_dir>/from-mlflow/<run_id>/`: where a resume from MLflow keeps what it started from."""
FINISHED = "FINISHED"

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
FILE, DCP, DEEPSPEED = "a single-file checkpoint", "a sharded (DCP) folder", "a DeepSpeed folder"
READS = {"deepspeed": (DEEPSPEED,), "fsdp": (DCP, FILE), "single": (FILE, DCP), "ddp": (FILE, DCP)}
"""The checkpoint layouts each strategy resumes from, the one it writes first."""


@dataclass
class FetchedCheckpoint:
    """A checkpoint downloaded and verified in a temporary folder, not yet in the run directory.

    Picklable: rank 0 fetches it and shares it with the other ranks, which only read `path`.
    """

    uri: str
    run_id: str
    artifact: str
    """The checkpoint's artifact path: `checkpoints/step_0000004.pt` or `.../step_0000004`."""
    status: str
    """The original run's status when fetched (RUNNING, KILLED, FAILED, FINISHED)."""
    staging: Path
    installed: Path | None = field(default=None)

    @property
    def same_run(self) -> bool:
        """Log into the original run (unfinished), rather than a new one linked to it?"""
        return self.status != FINISHED

    def install(self, run_dir: Path) -> Path:
        """Move the verified files to `<run_dir>/from-mlflow/<run_id>/`; return the checkpoint."""
        destination = run_dir / DOWNLOAD_DIR / self.run_id
        partial = destination.with_name(f".{self.run_id}.partial")
        shutil.rmtree(partial, ignore_errors=True)  # a copy cut short by a kill
        partial.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.staging), str(partial))  # a rename on one filesystem
        if destination.exists():
            shutil.rmtree(destination)  # this run's own earlier download from the same run
        os.replace(partial, destination)
        self.installed = destination / self.artifact
        logger.info(
            "resuming from %s: MLflow run %s (%s), downloaded and verified into %s",
            self.uri,
            self.run_id,
            self.status,
            destination,
        )
        return self.installed

    def tags(self) -> dict[str, str]:
        """Tags of the session's MLflow run: where it resumed from, and the nesting if new."""
        tags = {"resumed_from": self.run_id, "resumed_from.artifact": self.artifact}
        if not self.same_run:
            tags["mlflow.parentRunId"] = self.run_id
        return tags

    def tracking_run_id(self) -> str | None:
        """The MLflow run the session continues (None: a new run is created)."""
        if self.same_run:
            if self.status == "RUNNING":
                logger.warning(
                    "MLflow run %s is RUNNING: if it still trains somewhere, both sessions "
                    "now log to it",
                    self.run_id,
                )
            return self.run_id
        logger.info("MLflow run %s is FINISHED: logging to a new run nested under it", self.run_id)
        return None

    def cleanup(self) -> None:
        """Remove the temporary folder (empty once installed)."""
        shutil.rmtree(self.staging, ignore_errors=True)


def fetch_checkpoint(
    text: str, config: Config, vocab_size: int, tokenizer_id: str, strategy: str
) -> FetchedCheckpoint:
    """Step 1 of the module docstring. Raises CheckpointError; leaves nothing behind then."""
    uri = parse_run_uri(text)
    if uri.path and not (uri.path == ARTIFACT_DIR or uri.path.startswith(ARTIFACT_DIR + "/")):
        raise CheckpointError(
            f"{text}: checkpoints are logged under {ARTIFACT_DIR}/ (e.g. runs:/{uri.run_id}/"
            f"{ARTIFACT_DIR}/step_0000100.pt), or give runs:/{uri.run_id} for the newest"
        )
    reader = RunReader(resolve_tracking_uri(config.tracking.uri), config.tracking.request_timeout_s)
    run = reader.run(uri)
    staging = Path(tempfile.mkdtemp(prefix="gpt3-from-mlflow-"))
    try:
        artifact, layout, files = _choose(reader, uri, strategy, staging)
        reader.download(uri, files, staging)
        local = staging / artifact
        try:
            state = _inspect(local, layout)
            check_compatible(state, config, vocab_size, tokenizer_id, local)
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(str(local), _display(uri, artifact))) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FetchedCheckpoint(text, uri.run_id, artifact, run.info.status, staging)


def _display(uri: RunUri, artifact: str) -> str:
    return f"runs:/{uri.run_id}/{artifact}"


def _inspect(local: Path, layout: str) -> dict:
    """The verified loop state of a downloaded checkpoint, read as its layout says."""
    if layout == FILE:
        return load_verified(local)
    if layout == DCP:
        return inspect_dcp_folder(local)
    return inspect_tag_dir(local)


def _choose(
    reader: RunReader, uri: RunUri, strategy: str, staging: Path
) -> tuple[str, str, list[str]]:
    """(the checkpoint's artifact path, its layout, the files to download) for `strategy`."""
    listed = reader.listing(uri, ARTIFACT_DIR)
    if not listed:
        raise CheckpointError(
            f"{uri.text}: MLflow run {uri.run_id} has no logged checkpoints (no {ARTIFACT_DIR}/ "
            "artifacts: it trained with tracking.log_checkpoints none, or logged none yet)"
        )
    reads = READS.get(strategy, READS["single"])
    if uri.path in ("", ARTIFACT_DIR):
        artifact, layout = _newest(reader, uri, listed, reads, staging)
    else:
        artifact = uri.path
        if artifact not in listed:
            have = ", ".join(_name(p) for p in sorted(listed)) or "nothing"
            raise CheckpointError(
                f"{uri.text}: MLflow run {uri.run_id} has no checkpoint {artifact} "
                f"({ARTIFACT_DIR}/ holds {have})"
            )
        layout = FILE
        if listed[artifact]:
            layout = _folder_layout(artifact, reader.listing(uri, artifact))
            if layout is None:
                raise CheckpointError(
                    f"{uri.text}: {artifact} is not a complete checkpoint folder (no manifest, "
                    "or neither a DCP index nor DeepSpeed model states): still uploading?"
                )
        if layout not in reads:
            raise CheckpointError(
                f"{uri.text} is {layout}, which strategy {strategy} cannot resume from (it "
                f"reads {' or '.join(reads)})"
            )
    if layout != FILE:
        return artifact, layout, reader.files_under(uri, artifact)
    sidecar = artifact + CHECKSUM_SUFFIX
    if sidecar not in listed:
        raise CheckpointError(
            f"{uri.text}: {artifact} was logged without its checksum file {_name(sidecar)}; "
            "refusing to load a checkpoint that cannot be verified"
        )
    return artifact, layout, [artifact, sidecar]


def _newest(
    reader: RunReader, uri: RunUri, listed: dict[str, bool], reads: tuple[str, ...], staging: Path
) -> tuple[str, str]:
    """The newest logged checkpoint among the layouts in `reads`: the highest step wins (a run
    resumed under another strategy logs both layouts into one MLflow run), a tie goes to the
    layout `reads` names first."""
    found: list[tuple[int, int, str, str]] = []  # (step, -preference, artifact, layout)
    if FILE in reads:
        newest = _newest_file(listed)
        if newest is not None:
            found.append((newest[0], -reads.index(FILE), newest[1], FILE))
    if any(layout != FILE for layout in reads):
        floor = max((item[0] for item in found), default=-1)
        folder = _newest_folder(reader, uri, listed, reads, floor, staging)
        if folder is not None:
            step, artifact, layout = folder
            found.append((step, -reads.index(layout), artifact, layout))
    if not found:
        logged = [FILE] if FILE not in reads and _newest_file(listed) is not None else []
        other = tuple(layout for layout in (DCP, DEEPSPEED) if layout not in reads)
        folder = _newest_folder(reader, uri, listed, other, -1, staging) if other else None
        logged += [folder[2]] if folder is not None else []
        raise CheckpointError(
            f"{uri.text}: this run's strategy resumes from {' or '.join(reads)}, but MLflow run "
            f"{uri.run_id} logged "
            + (f"only {' and '.join(logged)}" if logged else "no complete checkpoint")
        )
    _, _, artifact, layout = max(found)
    return artifact, layout


def _newest_file(listed: dict[str, bool]) -> tuple[int, str] | None:
    """(step, artifact) of the newest logged one-file checkpoint: `latest_checkpoint.pt` (the
    newest step's copy) when logged, else the highest `step_*.pt`."""
    steps = sorted(
        (int(match.group(1)), path)
        for path, is_dir in listed.items()
        if not is_dir and (match := _STEP_FILE.match(_name(path)))
    )
    latest = f"{ARTIFACT_DIR}/{LATEST_NAME}"
    newest_step = steps[-1][0] if steps else -1
    if latest in listed and not listed[latest]:
        return newest_step, latest
    return steps[-1] if steps else None


def _newest_folder(
    reader: RunReader,
    uri: RunUri,
    listed: dict[str, bool],
    reads: tuple[str, ...],
    floor: int,
    staging: Path,
) -> tuple[int, str, str] | None:
    """(step, artifact, layout) of the newest complete logged folder in a layout of `reads`
    above step `floor`: the one the logged `latest` pointer names first, then newest first.
    A folder without its manifest (still uploading) or of another layout is passed over."""
    folders = sorted(
        (int(_name(path).split("_")[1]), path)
        for path, is_dir in listed.items()
        if is_dir and is_tag_name(_name(path))
    )
    order = [path for _, path in reversed(folders)]
    named = _pointer_folder(reader, uri, listed, staging)
    if named is not None and named in order:
        order.remove(named)
        order.insert(0, named)
    for folder in order:
        step = int(_name(folder).split("_")[1])
        if step < floor:
            continue
        contents = reader.listing(uri, folder)
        layout = _folder_layout(folder, contents)
        if layout is None:
            logger.warning("%s: %s is not a complete checkpoint folder; skipped", uri.text, folder)
        elif layout in reads:
            return step, folder, layout
    return None


def _pointer_folder(
    reader: RunReader, uri: RunUri, listed: dict[str, bool], staging: Path
) -> str | None:
    """The folder the logged `latest` pointer names (read as text), if it names one."""
    pointer = f"{ARTIFACT_DIR}/{DEEPSPEED_LATEST}"
    if pointer not in listed or listed[pointer]:
        return None
    reader.download(uri, [pointer], staging / ".pointer")
    named = (staging / ".pointer" / pointer).read_text(encoding="utf-8", errors="replace")
    shutil.rmtree(staging / ".pointer")
    if is_tag_name(named.strip()):
        return f"{ARTIFACT_DIR}/{named.strip()}"
    logger.warning("%s: its %s names no folder; taking the highest step", uri.text, pointer)
    return None


def _folder_layout(folder: str, contents: dict[str, bool]) -> str | None:
    """A logged folder's layout by what it holds: DCP's index, or DeepSpeed's model states;
    None when its manifest (uploaded last) is missing or it holds neither."""
    if f"{folder}/{MANIFEST}" not in contents:
        return None
    if f"{folder}/{METADATA}" in contents:
        return DCP
    if any(path.endswith("model_states.pt") for path in contents):
        return DEEPSPEED
    return None


def _name(path: str) -> str:
    return PurePosixPath(path).name
