"""Write evaluation outputs atomically, as DVC metrics must be: whole or not at all.

A DVC metric that a killed process left half-written breaks `dvc metrics show` and every
experiment comparison after it; writing aside and renaming keeps the previous file until the
new one is complete.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, fsync, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_safe(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Non-finite numbers become null: JSON has no infinity, and DVC would refuse `Infinity`."""
    return {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}


def write_metrics(path: Path, metrics: Mapping[str, float]) -> Path:
    """A flat JSON object of numbers, keys sorted so diffs and DVC tables are stable."""
    text = json.dumps(json_safe(metrics), indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_text_atomic(path, text)
    return path
