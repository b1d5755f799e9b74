"""The one interface the training loop talks to, and a fan-out that survives failing backends.

A backend that raises (an MLflow server that went away, a full disk under the event files) is
reported once in the log and skipped; it must never end a week-long run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("pipeline.tracking")


class Tracker(Protocol):
    """A metrics sink. Metric names use `[A-Za-z0-9_./-]` only (MLflow rejects others)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class TrackerGroup:
    """Sends every call to each backend; a failing backend is logged, not raised."""

    def __init__(self, backends: list[Any]) -> None:
        self.backends = list(backends)
        self._reported: set[tuple[str, str]] = set()

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for backend in self.backends:
            fn = getattr(backend, method, None)
            if fn is None:
                continue
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # a tracker must not end the run
                key = (type(backend).__name__, method)
                if key not in self._reported:
                    self._reported.add(key)
                    logger.warning("tracker %s.%s failed: %s", key[0], method, exc)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._each("log_metrics", metrics, step)

    def log_params(self, params: dict[str, Any]) -> None:
        self._each("log_params", params)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._each("log_artifact", path, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)
