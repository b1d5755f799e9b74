"""The data-order ledger: which token windows every optimizer step consumed.

With `training.data_ledger: true`, rank 0 appends one JSON line per step to
`<run_dir>/logs/data_order.jsonl`: `{"step": 7, "windows": [...]}`, the global batch's ids in
the order the sampler gave them (for a mixture, source and window packed as the sampler packs
them). It is an audit trail for "no window skipped, none seen twice": across kills, resumes and a
change of the number of ranks, the steps of the finished run must have consumed exactly the
stream's positions 0, 1, 2, ... once each.

A run that starts (afresh or resumed at step s) first appends `{"resume_from": s}`; the steps a
killed run logged past its last checkpoint are redone and logged again, and `read_ledger` keeps
only what the run that got furthest along actually kept. Lines are flushed, not fsynced: a
`kill -9` loses nothing the OS has; a half-written last line (a power cut) is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import numpy as np

LEDGER_FILE = "data_order.jsonl"


class DataLedger:
    """Appends a run's steps to its ledger file (rank 0 only, opened for the run's length)."""

    def __init__(self, path: Path, start_step: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self._write({"resume_from": start_step})

    def record(self, step: int, windows: np.ndarray) -> None:
        self._write({"step": step, "windows": [int(w) for w in windows]})

    def _write(self, entry: dict) -> None:
        self._handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_ledger(path: Path) -> dict[int, list[int]]:
    """Step -> windows consumed, as the finished run kept them (see the module docstring)."""
    steps: dict[int, list[int]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if "resume_from" in entry:
            start = int(entry["resume_from"])
            steps = {step: ids for step, ids in steps.items() if step <= start}
        else:
            steps[int(entry["step"])] = list(entry["windows"])
    return steps
