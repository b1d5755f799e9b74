"""Download a model logged to MLflow, from a `runs:/` or `models:/` URI, with an explicit client.

MLflow 3 logs models as LoggedModels linked to their run, and its own URI resolution
(`mlflow.artifacts.download_artifacts("models:/...")`) looks them up through the process-wide
tracking URI, ignoring its `tracking_uri` argument (measured with MLflow 3.17: "Logged model
... not found"). Setting the global URI would leak into the rest of the process (MLflow also
exports it as `MLFLOW_TRACKING_URI`), so the URI is resolved here to the storage location with
a client bound to the right store, and only that location is downloaded.

Understood: `runs:/RUN_ID/NAME` (the run's logged model NAME, else its artifact path NAME),
`models:/NAME@ALIAS`, `models:/NAME/VERSION` and `models:/m-MODEL_ID`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import CheckpointError

SCHEMES = ("models:/", "runs:/")


def is_mlflow_uri(source: object) -> bool:
    return isinstance(source, str) and source.startswith(SCHEMES)


def storage_uri(uri: str, tracking_uri: str | None) -> str:
    """Where the artifacts behind `uri` are stored (a file:, s3:, mlflow-artifacts: ... URI)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    scheme, _, rest = uri.partition(":/")
    rest = rest.strip("/")
    if scheme == "runs":
        run_id, _, name = rest.partition("/")
        run = client.get_run(run_id)
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
        )
        if models:
            return max(models, key=lambda m: m.creation_timestamp).artifact_location
        return f"{run.info.artifact_uri.rstrip('/')}/{name}"
    if rest.startswith("m-"):
        return client.get_logged_model(rest).artifact_location
    name, at, alias = rest.partition("@")
    if at:
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = rest.partition("/")
    return client.get_model_version_download_uri(name, version)


def download(uri: str, tracking_uri: str | None, destination: Path) -> Path:
    """Download the artifacts behind `uri` into `destination`; return the local folder."""
    import mlflow.artifacts

    try:
        location = storage_uri(uri, tracking_uri)
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=str(destination), tracking_uri=tracking_uri
            )
        )
    except Exception as exc:  # MLflow raises its own and network exception types
        raise CheckpointError(f"{uri}: cannot download from MLflow ({exc})") from None
