"""HOOK for the MLflow integration: send evaluation numbers to the training run's record.

=============================================================================================
This is the only place evaluation talks to a tracking server. It is deliberately minimal: the
MLflow integration (tracking URI resolution, retries, queued metrics) lives with the tracking
code, which may replace the body of `log_to_tracking` with a call into it. Contract:
- called once per evaluation with the same flat numbers as `metrics/eval.json`;
- does nothing (returns False) when tracking is disabled or no run id is known, so an
  evaluation of a model that was never tracked never creates a stray run;
- never raises: a tracking failure is a warning, the metrics file is the source of truth.
=============================================================================================

It uses `MlflowClient.log_batch` on the existing run rather than `mlflow.start_run(run_id=...)`:
the client holds no global "active run" and leaves the run's status (set by training) alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

from pipeline.config.schema import Config
from pipeline.redact import redact
from pipeline.tracking import mlflow_setup

logger = logging.getLogger("pipeline.evaluate")


def resolve_tracking_uri(config: Config) -> str:
    """The tracking store the training run used (see `pipeline.tracking.mlflow_setup`)."""
    return mlflow_setup.resolve_tracking_uri(config.tracking.uri)


def log_to_tracking(
    metrics: Mapping[str, float], config: Config, run_id: str | None, step: int = 0
) -> bool:
    """Log `metrics` to MLflow run `run_id`; True when they were sent."""
    if not config.tracking.enabled or not run_id:
        return False
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        uri = resolve_tracking_uri(config)
        mlflow_setup.configure_environment(config.tracking.request_timeout_s, uri)  # no retries
        client = MlflowClient(tracking_uri=uri)
        now = int(time.time() * 1000)
        batch = [
            Metric(key=name, value=float(value), timestamp=now, step=step)
            for name, value in metrics.items()
            if math.isfinite(value)
        ]
        client.log_batch(run_id, metrics=batch)
    except Exception as exc:  # any tracking failure: warn, never fail the evaluation
        logger.warning(
            "could not log evaluation metrics to MLflow run %s: %s", run_id, redact(str(exc))
        )
        return False
    return True
