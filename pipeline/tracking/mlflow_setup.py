"""Where MLflow lives and how to reach it: URI resolution, artifact location, network timeouts.

Shared by the training tracker and registry promotion so both always talk to the same store.

- `MLFLOW_TRACKING_URI` in the environment wins over `tracking.uri`.
- A relative local store (`sqlite:///mlflow.db`, `file:mlruns`) is project-global state, so it
  is anchored at the project root: `DVC_ROOT` when set (under `dvc exp run --temp/--queue` the
  working directory is a throwaway copy and the run would vanish with it), else the cwd.
- A new experiment on a local store keeps its artifacts beside the database, in
  `<db folder>/mlartifacts/<experiment>`: MLflow would otherwise put them in `./mlruns` of
  whatever the working directory happens to be.
- MLflow's HTTP defaults (7 retries with exponential backoff, 120 s timeout) turn an outage into
  minutes per request; the tracker retries on its own, so one request gets no retries and a
  short timeout (unless the user set those variables).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.errors import ConfigError
from pipeline.redact import has_redacted_secret, redact

SQLITE_PREFIX = "sqlite:///"
ARTIFACTS_DIR = "mlartifacts"
"""Folder beside a local database that holds its experiments' artifacts (git/dvc-ignored)."""

RETRYABLE_HTTP = {408, 429}
"""4xx answers that mean "try again later" rather than "this request is wrong"."""


def project_root() -> Path:
    """`DVC_ROOT` when DVC runs the stage (the real repository), else the working directory."""
    root = os.environ.get("DVC_ROOT")
    return Path(root).resolve() if root else Path.cwd().resolve()


def resolve_tracking_uri(configured: str) -> str:
    """The URI to use: the environment's, else `configured`; relative local paths made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if has_redacted_secret(uri):
        raise ConfigError(
            f"tracking URI {uri} has '***' where its password was (configs the pipeline writes "
            "are redacted): set MLFLOW_TRACKING_URI, or MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, in the environment"
        )
    if uri.startswith(SQLITE_PREFIX):
        path = unquote(uri[len(SQLITE_PREFIX) :])
        if path and path != ":memory:" and not Path(path).is_absolute():
            return SQLITE_PREFIX + str(project_root() / path)
        return uri
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        path = unquote(parsed.path if parsed.netloc == "" else parsed.netloc + parsed.path)
        if not Path(path).is_absolute():
            return (project_root() / path).as_uri()
        return uri
    if "://" not in uri:  # a bare path is a file store in MLflow's book
        path = Path(uri)
        return (path if path.is_absolute() else project_root() / path).resolve().as_uri()
    return uri


def local_store_dir(uri: str) -> Path | None:
    """The folder of a local sqlite database or file store; None for a server."""
    if uri.startswith(SQLITE_PREFIX):
        path = unquote(uri[len(SQLITE_PREFIX) :])
        return Path(path).parent if path and path != ":memory:" else None
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    return None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact root for a new experiment: beside a local store; a server decides for itself."""
    store = local_store_dir(uri)
    if store is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("._") or "experiment"
    return (store / ARTIFACTS_DIR / slug).as_uri()


def configure_environment(timeout_s: float, uri: str = "") -> None:
    """Short MLflow HTTP timeouts and no progress bars for this process, unless the user chose.

    MLflow reads these variables on every request, so setting them before the first client
    call is enough; `setdefault` leaves an explicit user choice alone. The artifact progress
    bars would otherwise interleave with the training log on stderr. When `uri` carries
    credentials, MLflow's "View run at <uri>" lines are switched off: they print the password.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout_s))))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, created with a project-rooted artifact location if new."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name))
        except MlflowException as exc:  # created by a concurrent run in between
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise exc from None
    if experiment.lifecycle_stage == "deleted":
        raise PermanentTrackingError(
            f"MLflow experiment {name!r} is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) "
            "or set tracking.experiment to another name"
        )
    return experiment.experiment_id


class PermanentTrackingError(RuntimeError):
    """A tracking problem that retrying cannot fix (a deleted experiment, a rejected value)."""


def is_transient(exc: BaseException, remote: bool) -> bool:
    """Could the same request succeed later? Connection failures and 5xx: yes; 4xx: no.

    Over HTTP only an MLflow server's own error answer (`RestException`, a JSON body with an
    error code) is believed: a bare 404 or 502 comes from whatever stands in front of a server
    that is restarting (a proxy, a gateway) and may pass. An unreachable server is an
    `MlflowException` with status 500. A local store's 4xx (`remote` False) is a real refusal.
    Anything that is not an MLflow exception (socket errors, a locked sqlite file) may pass.
    """
    if isinstance(exc, PermanentTrackingError):
        return False
    from mlflow.exceptions import MlflowException, RestException

    if not isinstance(exc, MlflowException):
        return True
    if remote and not isinstance(exc, RestException):
        return True
    status = exc.get_http_status_code()
    return not (400 <= status < 500) or status in RETRYABLE_HTTP
