"""The background thread that owns the MLflow client: start or continue the run, then drain.

Why a thread: a training step must never wait on the network. The training thread appends to
the `Outbox`; this thread sends. When a request fails for a reason that may pass (connection
refused, timeout, 5xx) it waits (1 s, doubling to 30 s; at most 2 s once the run is closing) and
retries the same request, so nothing is lost or reordered while the queue holds it. A request the
server rejects for good (4xx) is dropped with a warning instead of blocking the queue, and so is
one that keeps failing while the server answers other requests (a "poison" request: dropped
after `POISON_AFTER` failures in a row, once a cheap probe shows the server is up).

The run is created (or, on resume, looked up and set RUNNING again) on the first successful
contact; if the server is down at start, that happens whenever it comes back.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.tracking.mlflow_model import log_pyfunc_model
from pipeline.tracking.mlflow_outbox import (
    ArtifactOp,
    ModelOp,
    Op,
    Outbox,
    ParamsOp,
    StepRange,
    TerminateOp,
)
from pipeline.tracking.mlflow_run import log_missing_params, open_run
from pipeline.tracking.mlflow_setup import (
    PermanentTrackingError,
    get_or_create_experiment,
    is_transient,
    local_store_dir,
)

logger = logging.getLogger("pipeline.tracking")

MAX_METRICS_PER_BATCH = 1000
BACKOFF_FIRST_S, BACKOFF_MAX_S, BACKOFF_CLOSING_S = 1.0, 30.0, 2.0
POISON_AFTER = 5
SEND_INTERVAL_S = 2.0
"""Pause after each request while training runs. Every request costs the sender CPU time that
the training step competes for (a sqlite `log_batch` costs about as much for 1 metric as for
70), so sending what gathered in 2 s at once keeps tracking's share of the CPU small."""


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


class MlflowSender(threading.Thread):
    """Sends everything queued in `outbox` to run `run_id` (created when None)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        outbox: Outbox,
        *,
        run_id: str | None,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, str],
        on_run_id: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name="mlflow-sender", daemon=True)
        self.uri, self.experiment, self.outbox = uri, experiment, outbox
        self.remote = local_store_dir(uri) is None
        self.run_id, self.run_name = run_id, run_name
        self.tags, self.params = tags, params
        self.on_run_id = on_run_id
        self.created_ms = int(time.time() * 1000)
        self.experiment_id: str | None = None
        self.run_start_ms: int | None = None
        self.first_contact = threading.Event()
        """Set after the first attempt to start the run, whether it worked or not."""
        self.disabled: str | None = None
        """Why this run's tracking stopped for good (a permanent error), else None."""
        self.rejected = 0
        self._client: Any = None
        self._ready = False
        self._offline_since: float | None = None
        self._backoff = BACKOFF_FIRST_S
        self._failures = 0
        """Consecutive transient failures of the request at the head of the queue."""
        self._deadline: float | None = None
        self._abandon = threading.Event()
        self._wake = threading.Event()

    # ------------------------------------------------------------------------------ control
    def finish(self, timeout_s: float) -> None:
        """Drain the queue, retrying for up to `timeout_s`; then give up (see `abandon`)."""
        self._deadline = time.monotonic() + timeout_s
        self._wake.set()
        self.outbox.close()
        self.join(timeout_s + 1.0)
        self._abandon.set()

    # --------------------------------------------------------------------------------- loop
    def run(self) -> None:
        while not self._abandon.is_set() and self.disabled is None:
            closing = self._deadline is not None
            if closing and time.monotonic() > self._deadline:
                break
            backlog = self.outbox.pending() if self._offline_since is not None else None
            try:
                if not self._ready:
                    self._start_run()
                    self.first_contact.set()
                sent = self._send_next()
            except Exception as exc:
                self.first_contact.set()
                if not is_transient(exc, self.remote):
                    self.disabled = _short(exc)
                    logger.warning("MLflow tracking stops for this run: %s", self.disabled)
                    break
                self._went_offline(exc)
                if not self._drop_poison(exc):
                    self._pause()
                continue
            self._came_back(backlog)
            if not sent:
                if closing:
                    break
                self.outbox.wait(timeout=None)
            elif not closing:
                self.outbox.wait_closed(SEND_INTERVAL_S)  # let batches gather: fewer requests
        self.first_contact.set()

    def _pause(self) -> None:
        delay = self._backoff
        if self._deadline is not None:
            delay = min(delay, BACKOFF_CLOSING_S, max(0.0, self._deadline - time.monotonic()))
        self._wake.wait(delay)
        self._wake.clear()
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _went_offline(self, exc: BaseException) -> None:
        if self._offline_since is None:
            self._offline_since = time.monotonic()
            logger.warning(
                "MLflow at %s unreachable (%s); training goes on, metrics are queued "
                "(up to %d batches) and sent when it is back",
                self.uri,
                _short(exc),
                self.outbox.max_metric_batches,
            )

    def _drop_poison(self, exc: BaseException) -> bool:
        """Drop the head request if it failed POISON_AFTER times while the server answers."""
        self._failures += 1
        if not self._ready or self._failures < POISON_AFTER:
            return False
        try:
            self.client.get_run(self.run_id)  # a cheap request: is the server there at all?
        except Exception:
            return False
        if self.outbox.peek_metrics(MAX_METRICS_PER_BATCH):
            self.outbox.done_metrics()
        elif self.outbox.peek_other() is not None:
            self.outbox.done_other()
        self._reject(f"a request that failed {self._failures} times", exc)
        self._failures = 0
        return True

    def _came_back(self, backlog: tuple[StepRange, list[Op]] | None) -> None:
        self._backoff = BACKOFF_FIRST_S
        self._failures = 0
        if self._offline_since is not None:
            queued, others = backlog or (StepRange(), [])
            logger.warning(
                "MLflow at %s reachable again after %.1f s; sending the %s and %d other items "
                "queued meanwhile",
                self.uri,
                time.monotonic() - self._offline_since,
                queued.describe(),
                len(others),
            )
            self._offline_since = None

    # ------------------------------------------------------------------------------- sending
    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _start_run(self) -> None:
        """Create the run or continue `run_id` (see `mlflow_run`); retried until it works."""
        client = self.client
        self.experiment_id = get_or_create_experiment(client, self.experiment, self.uri)
        run, created = open_run(
            client,
            self.uri,
            self.experiment_id,
            self.run_id,
            self.run_name,
            self.tags,
            self.created_ms,
        )
        if created:
            self.run_id = run.info.run_id
            if self.on_run_id is not None:
                self.on_run_id(self.run_id)
        self.run_start_ms = run.info.start_time or self.created_ms
        log_missing_params(client, self.run_id, self.params, run.data.params)
        self._ready = True

    def _send_next(self) -> bool:
        """Send the next metric batches or operation; False when nothing is queued."""
        batches = self.outbox.peek_metrics(MAX_METRICS_PER_BATCH)
        if batches:
            try:
                self._send_metrics(batches)
            except Exception as exc:
                if is_transient(exc, self.remote):
                    self.outbox.release_metrics()
                    raise
                self._reject(f"{len(batches)} metric batches", exc)
            self.outbox.done_metrics()
            return True
        op = self.outbox.peek_other()
        if op is None:
            return False
        try:
            self._apply(op)
        except Exception as exc:
            if is_transient(exc, self.remote):
                raise
            self._reject(type(op).__name__, exc)
        self.outbox.done_other()
        return True

    def _reject(self, what: str, exc: BaseException) -> None:
        self.rejected += 1
        logger.warning("MLflow rejected %s for good, dropped: %s", what, _short(exc))

    def _send_metrics(self, batches: list[Any]) -> None:
        from mlflow.entities import Metric

        assert self.run_start_ms is not None
        metrics = [
            Metric(
                key,
                float(value),
                batch.timestamp_ms,
                batch.step
                if batch.step is not None
                else max(0, (batch.timestamp_ms - self.run_start_ms) // 1000),
            )
            for batch in batches
            for key, value in batch.metrics.items()
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def _apply(self, op: Op) -> None:
        client, run_id = self.client, self.run_id
        if isinstance(op, ParamsOp):
            log_missing_params(client, run_id, op.params, client.get_run(run_id).data.params)
        elif isinstance(op, ArtifactOp):
            self._upload(op)
        elif isinstance(op, ModelOp):
            assert self.experiment_id is not None
            model = log_pyfunc_model(client, run_id, self.experiment_id, op.model_dir, op.step)
            logger.info("logged the model to MLflow run %s (model %s)", run_id, model.model_id)
        elif isinstance(op, TerminateOp):
            client.set_terminated(run_id, status=op.status)

    def _upload(self, op: ArtifactOp) -> None:
        if not Path(op.path).exists():
            raise PermanentTrackingError(f"artifact {op.path} no longer exists")
        self.client.log_artifact(self.run_id, str(op.path), op.artifact_path)
        if op.cleanup:  # a staged link, or a staged folder of links (a DeepSpeed checkpoint)
            if Path(op.path).is_dir():
                shutil.rmtree(op.path, ignore_errors=True)
            else:
                Path(op.path).unlink(missing_ok=True)
