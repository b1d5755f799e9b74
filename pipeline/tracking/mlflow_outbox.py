"""The queue between the training thread and the MLflow sender, bounded and accounted.

The training thread only ever appends here (microseconds, never network), so a slow or dead
server cannot block a training step. Metric batches are bounded by `tracking.queue_size`: when
the queue is full the oldest batch not being sent right now is dropped, counted and reported.
Other operations (params, artifacts, the model, the final status) are few and never dropped.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("pipeline.tracking")


@dataclass
class MetricBatch:
    """One `log_metrics` call. `step` None: stepped by seconds since the run started (system)."""

    metrics: dict[str, float]
    step: int | None
    timestamp_ms: int


@dataclass
class ParamsOp:
    params: dict[str, str]


@dataclass
class ArtifactOp:
    path: Path
    artifact_path: str | None = None
    cleanup: bool = False
    """Delete `path` once uploaded (a hard link staged so pruning cannot remove it first)."""


@dataclass
class ModelOp:
    model_dir: Path
    step: int


@dataclass
class TerminateOp:
    status: str


Op = ParamsOp | ArtifactOp | ModelOp | TerminateOp


@dataclass
class StepRange:
    """Count and step span of some metric batches, for reports."""

    batches: int = 0
    first: int | None = None
    last: int | None = None

    def add(self, batch: MetricBatch) -> None:
        self.batches += 1
        if batch.step is not None:
            self.first = batch.step if self.first is None else min(self.first, batch.step)
            self.last = batch.step if self.last is None else max(self.last, batch.step)

    def describe(self) -> str:
        span = f", steps {self.first}-{self.last}" if self.first is not None else ""
        return f"{self.batches} metric batches{span}"


class Outbox:
    """Thread-safe FIFO of metric batches and other operations; see the module docstring."""

    def __init__(self, max_metric_batches: int) -> None:
        self.max_metric_batches = max_metric_batches
        self._cond = threading.Condition()
        self._metrics: deque[MetricBatch] = deque()
        self._other: deque[Op] = deque()
        self._inflight = 0
        self._closed = False
        self.dropped = StepRange()

    def put_metrics(self, batch: MetricBatch) -> None:
        with self._cond:
            if len(self._metrics) - self._inflight >= self.max_metric_batches:
                victim = self._metrics[self._inflight]
                del self._metrics[self._inflight]
                if self.dropped.batches == 0:
                    logger.warning(
                        "MLflow queue full (tracking.queue_size=%d metric batches): dropping "
                        "the oldest (from step %s); the local logs keep every step",
                        self.max_metric_batches,
                        victim.step,
                    )
                self.dropped.add(victim)
            self._metrics.append(batch)
            self._cond.notify_all()

    def put(self, op: Op) -> None:
        with self._cond:
            self._other.append(op)
            self._cond.notify_all()

    def peek_metrics(self, max_values: int) -> list[MetricBatch]:
        """Batches from the head holding at most `max_values` values (at least one batch)."""
        with self._cond:
            taken: list[MetricBatch] = []
            count = 0
            for batch in self._metrics:
                if taken and count + len(batch.metrics) > max_values:
                    break
                taken.append(batch)
                count += len(batch.metrics)
            self._inflight = len(taken)
            return taken

    def done_metrics(self) -> None:
        """The batches of the last `peek_metrics` were sent (or rejected for good)."""
        with self._cond:
            for _ in range(self._inflight):
                self._metrics.popleft()
            self._inflight = 0

    def release_metrics(self) -> None:
        """Sending failed; the peeked batches stay queued."""
        with self._cond:
            self._inflight = 0

    def peek_other(self) -> Op | None:
        with self._cond:
            return self._other[0] if self._other else None

    def done_other(self) -> None:
        with self._cond:
            self._other.popleft()

    def wait(self, timeout: float | None) -> None:
        """Block until something is queued, `close` is called, or `timeout` passes."""
        with self._cond:
            if not self._metrics and not self._other and not self._closed:
                self._cond.wait(timeout)

    def wait_closed(self, timeout: float) -> None:
        """Block until `close` is called or `timeout` passes (new items do not wake it)."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed, timeout)

    def close(self) -> None:
        """Nothing more will be put; a waiting sender wakes up to drain and finish."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def pending(self) -> tuple[StepRange, list[Op]]:
        """What is still queued: metric batches (counted) and the other operations."""
        with self._cond:
            queued = StepRange()
            for batch in self._metrics:
                queued.add(batch)
            return queued, list(self._other)

    def empty(self) -> bool:
        with self._cond:
            return not self._metrics and not self._other
