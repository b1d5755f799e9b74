"""Which checkpoint files go to MLflow, per `tracking.log_checkpoints` (none / latest / every).

Both checkpoint layouts are uploaded, under the run's `checkpoints/` artifact folder:

- single file (strategies single and ddp): `step_*.pt` and `latest_checkpoint.pt`, each with
  its `.sha256` checksum file;
- DeepSpeed: each checkpoint is a folder `step_*/` (weights, one optimizer shard per rank, the
  `checksums.sha256` manifest), uploaded whole, and the `latest` pointer file naming the newest.

Policies:
- `latest`: at the end of the session, the newest checkpoint: `latest_checkpoint.pt` and its
  checksum (a resume overwrites them in the run's artifacts, so the run always holds the
  newest), or the folder `latest` names, then `latest` itself (after the folder, so whoever
  reads the pointer finds the folder).
- `every`: each new checkpoint as it appears (noticed at the next logged step and at the end).
  The checkpoint manager prunes old checkpoints, possibly before a slow upload gets to them,
  so each new file is hard-linked into a staging folder first and the link is deleted once
  uploaded: the bytes stay reachable for exactly as long as the upload needs them.

A DeepSpeed folder is uploaded only once it is complete (it has its manifest, written last,
and it is renamed into place after that): an upload never holds half a checkpoint.
`pipeline.training.mlflow_checkpoint` reads these artifacts back for a resume.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pipeline.checkpoint import LATEST_NAME, checksum_path, list_step_files
from pipeline.checkpoint.folders import LATEST as DEEPSPEED_LATEST
from pipeline.checkpoint.folders import complete_tag_dirs
from pipeline.tracking.mlflow_outbox import ArtifactOp

logger = logging.getLogger("pipeline.tracking")

ARTIFACT_DIR = "checkpoints"
STAGING_DIR = ".mlflow-staging"


class CheckpointUploads:
    """Finds the checkpoints to upload; `scan` during the run, `final` at its end."""

    def __init__(self, directory: Path, policy: str, staging: Path) -> None:
        self.directory = Path(directory)
        self.policy = policy
        self.staging = Path(staging)
        # Checkpoints already there belong to an earlier session, which uploaded them itself.
        self._seen = {path.name for _, path in self._checkpoints()}

    def _checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints of either layout, oldest first."""
        return sorted(list_step_files(self.directory) + complete_tag_dirs(self.directory))

    def scan(self) -> list[ArtifactOp]:
        """Upload operations for checkpoints that appeared since the last scan (`every` only)."""
        if self.policy != "every":
            return []
        ops: list[ArtifactOp | None] = []
        for _, path in self._checkpoints():
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            if path.is_dir():
                ops.append(self._staged_folder(path))
            else:
                ops += [self._staged(file) for file in (path, checksum_path(path))]
        return [op for op in ops if op is not None]

    def final(self) -> list[ArtifactOp]:
        """What to upload when the session ends."""
        pointer = self.directory / DEEPSPEED_LATEST
        if self.policy == "every":
            ops = self.scan()
            return ops + ([ArtifactOp(pointer, ARTIFACT_DIR)] if pointer.is_file() else [])
        if self.policy != "latest":
            return []
        latest = self.directory / LATEST_NAME
        if latest.exists():
            return [
                ArtifactOp(f, ARTIFACT_DIR) for f in (latest, checksum_path(latest)) if f.exists()
            ]
        folders = dict((path.name, path) for _, path in complete_tag_dirs(self.directory))
        named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
        if named not in folders:
            return []
        op = self._staged_folder(folders[named])
        return [op, ArtifactOp(pointer, ARTIFACT_DIR)] if op is not None else []

    def _staged(self, file: Path) -> ArtifactOp | None:
        if not file.exists():
            return None
        self.staging.mkdir(parents=True, exist_ok=True)
        link = self.staging / file.name
        try:
            link.unlink(missing_ok=True)
            os.link(file, link)
        except OSError as exc:  # no hard links here: upload from the original and hope
            logger.warning("cannot stage %s for upload (%s); uploading it in place", file, exc)
            return ArtifactOp(file, ARTIFACT_DIR)
        return ArtifactOp(link, ARTIFACT_DIR, cleanup=True)

    def _staged_folder(self, folder: Path) -> ArtifactOp | None:
        """Hard-link a DeepSpeed checkpoint folder's files into `staging/<name>/`."""
        target = self.staging / folder.name
        try:
            shutil.rmtree(target, ignore_errors=True)
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                link = target / file.relative_to(folder)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(file, link)
        except FileNotFoundError:  # pruned before it could be staged
            shutil.rmtree(target, ignore_errors=True)
            logger.warning("checkpoint %s was removed before it could be uploaded", folder)
            return None
        except OSError as exc:
            shutil.rmtree(target, ignore_errors=True)
            logger.warning("cannot stage %s for upload (%s); uploading it in place", folder, exc)
            return ArtifactOp(folder, ARTIFACT_DIR)
        return ArtifactOp(target, ARTIFACT_DIR, cleanup=True)

    def cleanup(self) -> None:
        """Remove the staging folder (links of uploads that never happened included)."""
        shutil.rmtree(self.staging, ignore_errors=True)
