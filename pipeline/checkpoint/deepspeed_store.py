"""DeepSpeed checkpoints with the same guarantees as the single-file ones: atomic, verified,
a `latest` pointer, retention, exact resume.

Layout of `experiments/<name>/checkpoints/` for a DeepSpeed run:

    step_0000100/                       one DeepSpeed tag folder per checkpoint
        mp_rank_00_model_states.pt      DeepSpeed: module weights + client state (our loop state)
        *zero_pp_rank_<r>_*optim_states.pt   DeepSpeed: rank r's shard of the optimizer state
        checksums.sha256                ours: `sha256sum -c` format, every file above
    latest                              text: the tag of the newest complete checkpoint
    zero_to_fp32.py                     DeepSpeed's own consolidation script (reads `latest`)

`latest` is DeepSpeed's own pointer name, so `engine.load_checkpoint(dir)` and
`python checkpoints/zero_to_fp32.py checkpoints/ out/` work on it unchanged.

One save, chosen so a kill at any moment leaves every earlier checkpoint and `latest` intact:
every rank writes its shards into `.step_0000100.tmp/` (DeepSpeed's save_checkpoint with that
tag); each rank hashes and fsyncs a share of the files; rank 0 writes the checksum file,
renames the folder to `step_0000100`, replaces `latest` through a temporary file, prunes old
folders. A folder without `checksums.sha256` is never a checkpoint. The loop state (step, data
position, every rank's RNG, config) is DeepSpeed client state under the key `trainer`, and is
read back weights-only and memory-mapped to check a checkpoint without touching its weights.
No file is handed to DeepSpeed's unpickler before rank 0 has read every file of the folder
weights-only (`inspect_tag_dir`), and DeepSpeed's own loads go through the same safe reader
(`pipeline.checkpoint.deepspeed_safe_load`). Checkpoints must be on a filesystem every rank
sees (as DeepSpeed's own).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from pipeline.checkpoint.deepspeed_safe_load import safe_load, scan_files
from pipeline.checkpoint.files import fsync_directory
from pipeline.checkpoint.layout import CorruptCheckpointError, step_filename
from pipeline.distributed.comm import Collective
from pipeline.errors import CheckpointError

logger = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "checksums.sha256"
CLIENT_KEY = "trainer"
_STEP_DIR_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 20


def tag_for(step: int) -> str:
    """`step_0000100`: the single-file name without `.pt`, so both layouts sort alike."""
    return step_filename(step).removesuffix(".pt")


def _hash_and_sync(path: Path) -> str:
    """SHA-256 of a file, fsyncing it on the way (DeepSpeed's torch.save does not)."""
    digest = hashlib.sha256()
    with open(path, "rb+") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        os.fsync(handle.fileno())
    return digest.hexdigest()


def verify_tag_dir(tag_dir: Path) -> None:
    """Check a checkpoint folder against its manifest; raise CorruptCheckpointError.

    Every file the manifest lists must match its digest, and every file in the folder must be
    listed: DeepSpeed loads shards by name, so an unlisted file is data nobody vouched for.
    """
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpointError(f"{tag_dir} has no {MANIFEST}: an incomplete checkpoint")
    listed: set[str] = set()
    for line in manifest.read_text(encoding="ascii", errors="replace").splitlines():
        expected, _, name = line.partition("  ")
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise CorruptCheckpointError(
                f"{manifest} names {name!r}, which is not inside {tag_dir}"
            )
        listed.add(name)
        path = tag_dir / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is missing from checkpoint {tag_dir}")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise CorruptCheckpointError(f"{path} is corrupt or truncated (SHA-256 mismatch)")
    present = {p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file()}
    unlisted = sorted(present - listed - {MANIFEST})
    if unlisted:
        raise CorruptCheckpointError(
            f"{tag_dir} holds files its {MANIFEST} does not list: {', '.join(unlisted)}"
        )


def complete_tag_dirs(directory: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of the complete checkpoints (with a manifest) in `directory`, oldest first.

    A folder gets its manifest only after all its files are written, and is renamed into place
    after that, so a listed folder is whole (also what MLflow uploads, see checkpoint_uploads).
    """
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_DIR_RE.match(entry.name)
        if match and (entry / MANIFEST).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def is_tag_name(name: str) -> bool:
    """Is `name` a checkpoint folder's name (`step_0000100`)?"""
    return _STEP_DIR_RE.match(name) is not None


def checkpoint_files(tag_dir: Path) -> list[Path]:
    """The checkpoint's own files (every file but the manifest), sorted."""
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def inspect_tag_dir(tag_dir: Path) -> dict[str, Any]:
    """Verify a folder, read every file weights-only (see `deepspeed_safe_load`), return the
    loop state: what rank 0 checks before any rank hands the folder to DeepSpeed."""
    verify_tag_dir(tag_dir)
    scan_files(checkpoint_files(tag_dir))
    return read_client_state(tag_dir)


def read_client_state(tag_dir: Path) -> dict[str, Any]:
    """The loop state saved as client state, without loading the weights beside it."""
    candidates = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    if not candidates:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file")
    state = safe_load(candidates[0], "cpu", mmap=zipfile.is_zipfile(candidates[0]))
    if not isinstance(state, dict) or not isinstance(state.get(CLIENT_KEY), dict):
        raise CheckpointError(f"{tag_dir}: not a checkpoint of this trainer (no {CLIENT_KEY!r})")
    return state[CLIENT_KEY]


class DeepSpeedCheckpoints:
    """The checkpoints folder of a DeepSpeed run; `save`/`restore` are collective."""

    def __init__(self, directory: Path, keep: int, comm: Collective | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.comm = comm or Collective()

    def path_for(self, step: int) -> Path:
        return self.directory / tag_for(step)

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """`(step, folder)` of complete checkpoints (with a manifest), oldest first."""
        return complete_tag_dirs(self.directory)

    def candidates(self) -> list[Path]:
        """Every `step_*` folder, complete or not, best first: `latest`'s, then newest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _STEP_DIR_RE.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        paths = [path for _, path in sorted(found, reverse=True)]
        latest = self.latest_path()
        if latest is not None and latest in paths:
            paths.remove(latest)
            paths.insert(0, latest)
        return paths

    def inspect(self, path: Path) -> dict[str, Any]:
        """The loop state of a verified folder, every file read weights-only."""
        return inspect_tag_dir(path)

    def files_of(self, path: Path) -> list[Path]:
        """A DeepSpeed checkpoint is its folder."""
        return [path]

    def latest_path(self) -> Path | None:
        try:
            tag = (self.directory / LATEST).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return self.directory / tag

    # ------------------------------------------------------------------ rank-local reading
    def resolve(self, which: str | int | Path = "latest") -> Path:
        """A verified checkpoint folder. `latest` falls back to the newest intact one."""
        if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
            tag_dir = self.path_for(int(which))
            if not tag_dir.is_dir():
                raise CheckpointError(f"no checkpoint {tag_dir.name} in {self.directory}")
            verify_tag_dir(tag_dir)
            return tag_dir
        if which != "latest":
            return self._resolve_path(Path(which))
        candidates = [path for _, path in reversed(self.list_checkpoints())]
        latest = self.latest_path()
        if latest is not None and latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
        elif latest is not None:
            logger.warning("%s names %s, which is not a complete checkpoint", LATEST, latest)
        problems = []
        for tag_dir in candidates:
            try:
                verify_tag_dir(tag_dir)
            except CorruptCheckpointError as exc:
                problems.append(str(exc))
                logger.warning("%s; trying an older checkpoint", exc)
                continue
            return tag_dir
        raise CheckpointError(
            f"no intact DeepSpeed checkpoint in {self.directory}"
            + (": " + "; ".join(problems) if problems else "")
        )

    def _resolve_path(self, path: Path) -> Path:
        if path.is_file():
            raise CheckpointError(
                f"{path} is a single-file checkpoint (strategy single or ddp); a DeepSpeed run "
                "resumes from a DeepSpeed checkpoint folder"
            )
        if (path / MANIFEST).is_file() or _STEP_DIR_RE.match(path.name):
            if not path.is_dir():
                raise CheckpointError(f"checkpoint {path} does not exist")
            verify_tag_dir(path)
            return path
        for directory in (path, path / "checkpoints"):
            if (directory / LATEST).is_file() or any(directory.glob("step_*/" + MANIFEST)):
                return DeepSpeedCheckpoints(directory, self.keep).resolve("latest")
        raise CheckpointError(f"no DeepSpeed checkpoint in {path} (nor in {path / 'checkpoints'})")

    def load(self, which: str | int | Path = "latest") -> tuple[dict[str, Any], Path]:
        """`(loop state, folder)` of a verified checkpoint, read on this rank only."""
        tag_dir = self.resolve(which)
        return inspect_tag_dir(tag_dir), tag_dir

    # ------------------------------------------------------------------------ collective
    def save(self, engine: Any, state: dict[str, Any], step: int) -> Path:
        """Every rank: write this rank's shards, then rank 0 publishes the folder atomically."""
        final = self.path_for(step)
        tmp = self.directory / f".{final.name}.tmp"
        self.comm.main_only(lambda: self._clear_leftovers())
        engine.save_checkpoint(
            str(self.directory), tag=tmp.name, client_state={CLIENT_KEY: state}, save_latest=False
        )
        self.comm.barrier()
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        mine = [
            (name, _hash_and_sync(tmp / name))
            for name in files[self.comm.rank :: self.comm.world_size]
        ]
        digests = sorted(pair for share in self.comm.all_gather_object(mine) for pair in share)
        return self.comm.main_only(lambda: self._publish(tmp, final, digests))

    def restore(self, engine: Any, tag_dir: Path) -> dict[str, Any]:
        """Every rank: load weights and this rank's optimizer shard; return the loop state."""
        load_path, client = engine.load_checkpoint(
            str(tag_dir.parent),
            tag=tag_dir.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if load_path is None or CLIENT_KEY not in (client or {}):
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        return client[CLIENT_KEY]

    def _clear_leftovers(self) -> None:
        """Remove temporary folders of saves that were killed (the run lock rules out others)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for entry in self.directory.iterdir():
            if entry.is_dir() and entry.name.startswith(".step_"):
                shutil.rmtree(entry, ignore_errors=True)

    def _publish(self, tmp: Path, final: Path, digests: list[tuple[str, str]]) -> Path:
        manifest = tmp / MANIFEST
        manifest.write_text("".join(f"{d}  {name}\n" for name, d in digests), encoding="ascii")
        _hash_and_sync(manifest)
        fsync_directory(tmp)
        old = final.with_name(f".{final.name}.old")
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_directory(self.directory)
        pointer = self.directory / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n", encoding="utf-8")
        _hash_and_sync(pointer)
        os.replace(pointer, self.directory / LATEST)
        fsync_directory(self.directory)
        shutil.rmtree(old, ignore_errors=True)
        self._prune(keep_also=final)
        return final

    def _prune(self, keep_also: Path) -> None:
        steps = self.list_checkpoints()
        keep = {path for _, path in steps[-self.keep :]} | {keep_also}
        for _, path in steps:
            if path not in keep:
                with contextlib.suppress(OSError):
                    (path / MANIFEST).unlink()  # no longer a checkpoint before its data goes
                    shutil.rmtree(path)
