"""TensorBoard backend: scalar events under `experiments/<name>/logs/tb/<run start>/`.

One folder per run, named by the UTC time it started: runs of one experiment name used to
share `logs/`, and TensorBoard, seeing steps start again at 1, dropped the earlier run's
curves. A resumed run continues its own folder, the newest one (a fresh start always makes a
newer one, and only the newest run has checkpoints to resume from).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

RUNS_FOLDER = "tb"


def run_folder(logs_dir: Path, resumed: bool) -> Path:
    """The TensorBoard folder of this run: the newest one when resuming, else a new one."""
    runs = logs_dir / RUNS_FOLDER
    existing = sorted(p for p in runs.glob("*") if p.is_dir()) if runs.is_dir() else []
    if resumed and existing:
        return existing[-1]
    started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")  # sorts as it happened
    return runs / started


class TensorBoardTracker:
    """Writes each metric as a scalar; `purge_step` drops events past a resume point."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()
