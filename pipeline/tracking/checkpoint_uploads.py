"""Which checkpoint files go to MLflow, per `tracking.log_checkpoints` (none / latest / every).

- `latest`: at the end of the session, `latest_checkpoint.pt` and its checksum (a resume
  overwrites them in the run's artifacts, so the run always holds the newest).
- `every`: each new `step_*.pt` as it appears (noticed at the next logged step and at the end).
  The checkpoint manager prunes old step files, possibly before a slow upload gets to them,
  so each new file is hard-linked into a staging folder first and the link is deleted once
  uploaded: the bytes stay reachable for exactly as long as the upload needs them.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pipeline.checkpoint import LATEST_NAME, checksum_path, list_step_files
from pipeline.tracking.mlflow_outbox import ArtifactOp

logger = logging.getLogger("pipeline.tracking")

ARTIFACT_DIR = "checkpoints"
STAGING_DIR = ".mlflow-staging"


class CheckpointUploads:
    """Finds the checkpoint files to upload; `scan` during the run, `final` at its end."""

    def __init__(self, directory: Path, policy: str, staging: Path) -> None:
        self.directory = Path(directory)
        self.policy = policy
        self.staging = Path(staging)
        # Files already there belong to an earlier session, which uploaded them itself.
        self._seen = {path.name for _, path in list_step_files(self.directory)}

    def scan(self) -> list[ArtifactOp]:
        """Upload operations for step files that appeared since the last scan (`every` only)."""
        if self.policy != "every":
            return []
        ops: list[ArtifactOp] = []
        for _, path in list_step_files(self.directory):
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            for file in (path, checksum_path(path)):
                ops.append(self._staged(file))
        return [op for op in ops if op is not None]

    def final(self) -> list[ArtifactOp]:
        """What to upload when the session ends."""
        if self.policy == "every":
            return self.scan()
        if self.policy == "latest":
            latest = self.directory / LATEST_NAME
            return [
                ArtifactOp(f, ARTIFACT_DIR) for f in (latest, checksum_path(latest)) if f.exists()
            ]
        return []

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

    def cleanup(self) -> None:
        """Remove the staging folder (links of uploads that never happened included)."""
        shutil.rmtree(self.staging, ignore_errors=True)
