"""Read a run's record back from MLflow: the run itself and chosen artifacts, as untrusted input.

Resume (`--resume_from_checkpoint runs:/...`), rerun (`gpt3 rerun runs:/...`) and `gpt3 dvc-exp`
all start from a run URI:

    runs:/<run_id>                       the run
    runs:/<run_id>/<artifact path>       one artifact (file or folder) of it
    mlflow-artifacts:/<...>/<run_id>/artifacts/<artifact path>
                                         the same, as a shared server's UI shows an artifact

Why a reader of its own rather than `mlflow.artifacts.download_artifacts(uri)`:
- A server that is down must be one line within `tracking.request_timeout_s`, not minutes of
  MLflow's own retries: the client gets the tracker's short timeouts (`configure_environment`).
- Each failure is one `CheckpointError` line naming the URI: no such run, a deleted run, no such
  artifact, a server that does not answer.
- What the store lists is not trusted: every artifact path is checked (relative, no `..`, no
  backslash) before a byte is written, files are fetched one by one, and each must land inside
  the destination folder as a plain file (checked again after the download).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import CheckpointError
from pipeline.redact import redact
from pipeline.tracking.mlflow_setup import configure_environment

RUNS_SCHEME = "runs:/"
PROXY_SCHEME = "mlflow-artifacts:"
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_PROXY_RE = re.compile(
    r"^mlflow-artifacts:/+(?:[^/]+/)*?(?P<run>[0-9a-f]{32})/artifacts(?P<path>/.*)?$"
)
_NO_RUN_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] [^'\")]+")


@dataclass(frozen=True)
class RunUri:
    """A parsed run URI: the run and an artifact path inside it ('' for the run itself)."""

    run_id: str
    path: str
    text: str
    """As the user wrote it, for messages."""


def is_run_uri(value: object) -> bool:
    """Does `value` name an MLflow run or one of its artifacts (not a local path)?"""
    return isinstance(value, str) and value.startswith((RUNS_SCHEME, PROXY_SCHEME))


def parse_run_uri(text: str) -> RunUri:
    """`runs:/<id>[/<path>]` or a proxied `mlflow-artifacts:` URI -> `RunUri` (CheckpointError)."""
    if text.startswith(RUNS_SCHEME):
        run_id, _, path = text[len(RUNS_SCHEME) :].strip("/").partition("/")
    else:
        match = _PROXY_RE.match(text)
        if match is None:
            raise CheckpointError(
                f"{text}: not an artifact URI of a run (expected mlflow-artifacts:/.../<run id>/"
                "artifacts/<path>); or write runs:/<run id>/<path>"
            )
        run_id, path = match.group("run"), (match.group("path") or "")
    if not RUN_ID_RE.match(run_id):
        raise CheckpointError(
            f"{text}: {run_id!r} is not an MLflow run id (32 hex digits, as the MLflow UI shows)"
        )
    return RunUri(run_id, safe_artifact_path(path.strip("/"), text) if path else "", text)


def safe_artifact_path(path: str, where: str) -> str:
    """`path` if it is a plain relative artifact path, else a CheckpointError (before any write)."""
    parts = PurePosixPath(path).parts
    if (
        "\\" in path
        or "\x00" in path
        or path.startswith("/")
        or not parts
        or any(part in ("..", ".") for part in parts)
    ):
        raise CheckpointError(f"{where}: refusing the artifact path {path!r} (not a plain path)")
    return "/".join(parts)


def _reason(exc: BaseException) -> str:
    """A short reason: the OS error when there is one (connection refused), else the first line."""
    text = str(exc)
    found = _ERRNO_RE.search(text)
    if found:
        return found.group(0).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


class RunReader:
    """One tracking store, read: runs, artifact listings and downloads, one-line errors."""

    def __init__(self, tracking_uri: str, timeout_s: float) -> None:
        from mlflow import MlflowClient

        self.uri = tracking_uri
        configure_environment(timeout_s, tracking_uri)  # no retries, short timeouts
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _failed(self, what: str, exc: BaseException) -> CheckpointError:
        reason = _reason(exc)
        if _ERRNO_RE.search(str(exc)) or "timed out" in str(exc).lower():
            return CheckpointError(
                f"{what}: MLflow at {redact(self.uri)} does not answer ({reason})"
            )
        return CheckpointError(f"{what}: MLflow at {redact(self.uri)} failed: {reason}")

    def run(self, uri: RunUri) -> Any:
        """The run `uri` names; an unknown or deleted run, or no answer, is a CheckpointError."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(uri.run_id)
        except MlflowException as exc:
            if exc.error_code in _NO_RUN_CODES:
                raise CheckpointError(
                    f"{uri.text}: no MLflow run {uri.run_id} at {redact(self.uri)}"
                ) from None
            raise self._failed(uri.text, exc) from None
        except Exception as exc:  # the HTTP stack's own errors: the server does not answer
            raise self._failed(uri.text, exc) from None
        if run.info.lifecycle_stage == "deleted":
            raise CheckpointError(
                f"{uri.text}: MLflow run {uri.run_id} is deleted (restore it first: "
                f"mlflow runs restore --run-id {uri.run_id})"
            )
        return run

    def listing(self, uri: RunUri, folder: str) -> dict[str, bool]:
        """{artifact path: is a folder} directly inside `folder` of the run ('' for the top)."""
        try:
            found = self.client.list_artifacts(uri.run_id, folder or None)
        except Exception as exc:
            raise self._failed(uri.text, exc) from None
        items = {}
        for info in found:
            path = safe_artifact_path(info.path, uri.text)
            parent = str(PurePosixPath(path).parent)
            if (parent if parent != "." else "") != folder:
                raise CheckpointError(f"{uri.text}: the store listed {path!r} inside {folder!r}")
            items[path] = bool(info.is_dir)
        return items

    def files_under(self, uri: RunUri, folder: str) -> list[str]:
        """Every file path below artifact folder `folder`, sorted."""
        files: list[str] = []
        for path, is_dir in sorted(self.listing(uri, folder).items()):
            files += self.files_under(uri, path) if is_dir else [path]
        return files

    def download(self, uri: RunUri, paths: list[str], destination: Path) -> None:
        """Fetch each artifact file into `destination/<path>`; nothing lands anywhere else."""
        import mlflow.artifacts

        root = destination.resolve()
        for path in paths:
            safe_artifact_path(path, uri.text)
            folder = (root / path).parent  # MLflow puts a file into dst_path by its name alone
            folder.mkdir(parents=True, exist_ok=True)
            try:
                local = mlflow.artifacts.download_artifacts(
                    run_id=uri.run_id,
                    artifact_path=path,
                    dst_path=str(folder),
                    tracking_uri=self.uri,
                )
            except Exception as exc:
                raise self._failed(f"{uri.text}: downloading {path}", exc) from None
            landed = Path(local)
            expected = root / path
            if (
                landed.is_symlink()
                or not landed.is_file()
                or landed.resolve() != expected.resolve()
                or not expected.resolve().is_relative_to(root)
            ):
                raise CheckpointError(f"{uri.text}: the download of {path} is not a plain file")
