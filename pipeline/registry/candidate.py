"""The model a promotion is about: which MLflow run trained it, its logged model, its numbers.

The run comes from the experiment directory the pipeline wrote: `model/tracking.json`
(written at the end of training), else the latest checkpoint's `tracking.run_id`. Its numbers
come from the evaluate stage's `metrics/eval.json` when present (the better measurement),
else from the run's own final metrics, with `/` read as `_` (`val/loss` -> `val_loss`), so
`registry.metric: val_loss` means the same thing either way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.tracking.mlflow_model import find_logged_model, log_pyfunc_model, read_tracking_file

EVAL_FILE = Path("metrics") / "eval.json"
DATA_HASH_TAG = "data.hash"


@dataclass
class Candidate:
    """A trained model ready to be registered."""

    run_id: str
    experiment_id: str
    model_id: str
    model_location: str
    """The logged model's artifact location: the registry version's source."""
    metrics: dict[str, float]
    metric_source: str
    """Where `metrics` came from, for the printed decision."""
    data_hash: str | None = None
    notes: list[str] = field(default_factory=list)
    from_eval_file: bool = False
    """`metrics` are the evaluate stage's (eval.json), not the training run's own."""
    eval_iters: str | None = None
    """The run's `training.eval_iters` param: how its own val/loss was measured."""


def find_run_id(run_dir: Path) -> str:
    """The MLflow run of an experiment directory; a UserError says why there is none."""
    run_id = read_tracking_file(run_dir / "model")
    if run_id:
        return run_id
    from pipeline.checkpoint import checkpoint_directory, load_latest
    from pipeline.errors import CheckpointError

    try:
        state, _ = load_latest(checkpoint_directory(run_dir))
    except CheckpointError as exc:
        raise UserError(
            f"{run_dir}: no MLflow run id (no model/tracking.json and no usable checkpoint: "
            f"{exc}); train with tracking.enabled: true first"
        ) from None
    run_id = (state.get("tracking") or {}).get("run_id")
    if not run_id:
        raise UserError(
            f"{run_dir}: the run was trained without MLflow tracking (no run id in its "
            "checkpoint); train with tracking.enabled: true, or pass --run_id"
        )
    return str(run_id)


def _finite(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and math.isfinite(value):
            out[key] = float(value)
    return out


def read_metrics(run_dir: Path, run: Any) -> tuple[dict[str, float], str]:
    """Evaluation metrics of `run_dir` when evaluated, else the run's final metrics."""
    eval_file = run_dir / EVAL_FILE
    if eval_file.is_file():
        try:
            values = json.loads(eval_file.read_text())
        except ValueError as exc:
            raise UserError(f"{eval_file}: not valid JSON ({exc})") from None
        if not isinstance(values, dict):
            raise UserError(f"{eval_file}: expected a JSON object of metrics")
        return _finite(values), str(eval_file)
    return run_metrics(run), f"MLflow run {run.info.run_id} metrics"


def run_metrics(run: Any) -> dict[str, float]:
    """A run's final metrics, `/` read as `_`; exact names (evaluation's `val_loss`) win."""
    metrics = {key.replace("/", "_"): value for key, value in run.data.metrics.items()}
    metrics.update(run.data.metrics)
    return _finite(metrics)


def load_candidate(client: Any, run_dir: Path, run_id: str | None = None) -> Candidate:
    """Look the run up and find (or, if training could not, log) its MLflow model."""
    from mlflow.exceptions import MlflowException

    run_dir = Path(run_dir)
    run_id = run_id or find_run_id(run_dir)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise UserError(
            f"MLflow run {run_id} (of {run_dir}) cannot be read: {str(exc).splitlines()[0]}"
        ) from None
    experiment_id = run.info.experiment_id
    metrics, source = read_metrics(run_dir, run)
    notes = []
    model = find_logged_model(client, run_id, experiment_id)
    if model is None:
        model_dir = run_dir / "model"
        if not (model_dir / "model.safetensors").is_file():
            raise UserError(
                f"MLflow run {run_id} has no logged model and {model_dir} holds none to log"
            )
        model = log_pyfunc_model(client, run_id, experiment_id, model_dir, step=0)
        notes.append(f"run {run_id} had no logged model; logged {model_dir} to it now")
    return Candidate(
        run_id=run_id,
        experiment_id=experiment_id,
        model_id=model.model_id,
        model_location=model.artifact_location,
        metrics=metrics,
        metric_source=source,
        data_hash=run.data.tags.get(DATA_HASH_TAG),
        notes=notes,
        from_eval_file=source == str(run_dir / EVAL_FILE),
        eval_iters=run.data.params.get("training.eval_iters"),
    )
