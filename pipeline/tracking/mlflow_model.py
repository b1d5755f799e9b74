"""Log the exported model folder to an MLflow run as a pyfunc model, through `MlflowClient` only.

`mlflow.pyfunc.log_model` reads the process-global tracking URI and, without an active fluent
run, files the model under the default experiment. The steps it performs are done here
explicitly against one client, so the model lands beside its run and nothing global changes:
create a LoggedModel, save the pyfunc locally, upload it, mark it READY, link it to the run.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger("pipeline.tracking")

MODEL_NAME = "model"
"""Name of the logged model in its run (`runs:/<run_id>/model`)."""
TRACKING_FILE = "tracking.json"
"""`{"run_id": ...}` in a model folder: the MLflow run that trained it."""
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
REQUIREMENTS = ("torch", "numpy", "safetensors", "tokenizers", "tiktoken", "pyyaml", "pydantic")


def pip_requirements() -> list[str]:
    """The runtime packages at their installed versions (local build labels like +cpu dropped)."""
    pins = [f"mlflow=={metadata.version('mlflow')}"]
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def write_tracking_file(model_dir: Path, run_id: str) -> Path:
    """Record the run id in the model folder, so promotion and evaluation find the run."""
    path = Path(model_dir) / TRACKING_FILE
    path.write_text(json.dumps({"run_id": run_id}) + "\n")
    return path


def read_tracking_file(model_dir: Path) -> str | None:
    path = Path(model_dir) / TRACKING_FILE
    if not path.is_file():
        return None
    try:
        run_id = json.loads(path.read_text()).get("run_id")
    except (ValueError, AttributeError):
        return None
    return str(run_id) if run_id else None


def _save_pyfunc(local: Path, model_dir: Path, model: Any, run_id: str) -> None:
    import mlflow.pyfunc
    from mlflow.models import Model

    from pipeline.tracking.mlflow_pyfunc import MODEL_DIR_ARTIFACT, signature

    info = Model(
        artifact_path=model.artifact_location,
        run_id=run_id,
        model_id=model.model_id,
        model_uuid=model.model_id,
    )
    with warnings.catch_warnings():
        # An input example would make MLflow run the model at log time; the signature suffices.
        warnings.filterwarnings("ignore", message=".*input example.*")
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=str(ENTRY_FILE),
            artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
            signature=signature(),
            pip_requirements=pip_requirements(),
            metadata={"requires": "the gpt3-pipeline package (pip install -e .)"},
            mlflow_model=info,
        )
    copied = local / "artifacts" / Path(model_dir).name
    if copied.is_dir():
        write_tracking_file(copied, run_id)


def log_pyfunc_model(
    client: Any, run_id: str, experiment_id: str, model_dir: Path, step: int
) -> Any:
    """Log `model_dir` as run `run_id`'s model `model`; returns the LoggedModel."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    model = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="gpt3-mlflow-model-") as tmp:
            local = Path(tmp) / MODEL_NAME
            _save_pyfunc(local, Path(model_dir), model, run_id)
            client.log_model_artifacts(model.model_id, str(local))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    except Exception:
        try:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        except Exception as exc:  # the server may be gone; the model just stays PENDING
            logger.debug("could not mark logged model %s FAILED: %s", model.model_id, exc)
        raise
    return model


def find_logged_model(client: Any, run_id: str, experiment_id: str) -> Any | None:
    """The newest READY model `model` logged by run `run_id`, or None."""
    from mlflow.entities import LoggedModelStatus

    models = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
    )
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return max(ready, key=lambda m: m.creation_timestamp, default=None)
