"""Start an MLflow run, or continue the one a checkpoint names: idempotent, so retryable.

A start can fail half-way (run created, params not yet logged) when the server goes away; the
sender simply calls `open_run` again with the run id it got, and the second call finishes the
job: tags set again, only the missing params logged.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("pipeline.tracking")

MAX_PARAMS_TAGS_PER_BATCH = 100


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def existing_run(client: Any, run_id: str, uri: str) -> Any | None:
    """The run to continue, or None (with a warning) when this store does not have it."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.get_http_status_code() != 404:
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        logger.warning(
            "MLflow run %s (from the checkpoint) is missing or deleted in %s; starting a new run",
            run_id,
            uri,
        )
        return None
    return run


def open_run(
    client: Any,
    uri: str,
    experiment_id: str,
    run_id: str | None,
    run_name: str,
    tags: dict[str, str],
    start_ms: int,
) -> tuple[Any, bool]:
    """(run, created): continue `run_id` when the store has it (set RUNNING again), else create."""
    from mlflow.entities import RunTag

    run = existing_run(client, run_id, uri) if run_id else None
    if run is None:
        run = client.create_run(experiment_id, start_time=start_ms, tags=tags, run_name=run_name)
        logger.info("MLflow run %s (%s) at %s", run.info.run_id, run_name, uri)
        return run, True
    for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run.info.run_id, tags=chunk)
    if run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    logger.info("continuing MLflow run %s at %s", run.info.run_id, uri)
    return run, False


def log_missing_params(
    client: Any, run_id: str, params: dict[str, str], existing: dict[str, str]
) -> None:
    """Log params not yet on the run; MLflow params are immutable, so changes are warned."""
    from mlflow.entities import Param

    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        logger.warning(
            "MLflow params cannot change within a run; run %s keeps its first values of %s "
            "(resolved_config.yaml has this session's)",
            run_id,
            ", ".join(f"{k}={existing[k]!r} (now {params[k]!r})" for k in changed[:10]),
        )
    missing = [Param(k, v) for k, v in params.items() if k not in existing]
    for chunk in _chunks(missing, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    existing.update({p.key: p.value for p in missing})
