"""DVC backend: per-step curves as CSV (for `dvc plots`) and a final summary JSON (a DVC metric).

On resume the curves are cut back to the resumed step, so a step never appears twice.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

CURVES = {"train/loss": "train_loss", "val/loss": "val_loss"}
"""Metric name -> curve name; each curve is `<plots_dir>/<curve>.csv` with columns step,<curve>."""


class DvcMetricsTracker:
    """Appends loss curves row by row and writes `train.json` with the latest values at close."""

    def __init__(self, metrics_file: Path, plots_dir: Path, resume_step: int = 0) -> None:
        self.metrics_file = metrics_file
        self.plots_dir = plots_dir
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        self.latest: dict[str, float] = {}
        for curve in CURVES.values():
            self._truncate(self.plots_dir / f"{curve}.csv", curve, resume_step)

    @staticmethod
    def _truncate(path: Path, curve: str, resume_step: int) -> None:
        rows: list[list[str]] = []
        if resume_step > 0 and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= resume_step]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", curve])
            writer.writerows(rows)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.latest[name.replace("/", "_")] = value
            curve = CURVES.get(name)
            if curve is not None:
                with (self.plots_dir / f"{curve}.csv").open("a", newline="") as f:
                    csv.writer(f).writerow([step, f"{value:.6f}"])
        self.latest["step"] = step

    def close(self, status: str = "FINISHED") -> None:
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.metrics_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.latest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.metrics_file)
