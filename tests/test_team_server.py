"""The team setup: one `mlflow server` with a database and proxied artifacts, clients over HTTP.

The server keeps runs in SQLite and artifacts in its `--artifacts-destination` folder, and
serves them through its own HTTP proxy (`--serve-artifacts`), so a client needs the server's
URL and nothing else: no storage path, no cloud credentials. The client here is what a team
member runs, as separate processes in a folder of its own whose environment names no store:
`stages/train.py` with `tracking.uri: http://...` (checkpoints uploaded) and `gpt3 promote`.
The test then checks that every file went through the proxy (URIs `mlflow-artifacts:`, the
bytes in the server's folder) and that `models:/<name>@champion` downloads and loads over HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_overrides
from mlflow_support import MlflowServer

from pipeline.evaluation.mlflow_source import download

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

pytestmark = pytest.mark.slow

PROXY_SCHEME = "mlflow-artifacts:"
MODEL_NAME = "team-tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    instance = MlflowServer(tmp_path_factory.mktemp("team-server"))
    instance.start()
    yield instance
    instance.stop()


def _client_env(home: Path) -> dict[str, str]:
    """A client's environment: no MLflow or DVC store named; temporary files in its own folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
        PYTHONUNBUFFERED="1",
        TMPDIR=str(home / "tmp"),
    )
    return env


def _client(args: list[str], home: Path) -> str:
    proc = subprocess.run(
        args, cwd=home, env=_client_env(home), capture_output=True, text=True, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args[:3])} failed:\n{output[-4000:]}"
    return output


def _sets(overrides: dict[str, object]) -> list[str]:
    flags = []
    for key, value in overrides.items():
        flags += ["--set", f"{key}={json.dumps(value)}"]
    return flags


def _on_server(server: MlflowServer, uri: str) -> Path:
    """The folder under the server's artifacts destination that a proxied URI stands for."""
    assert uri.startswith(PROXY_SCHEME), f"{uri} is not a proxied artifact URI"
    return server.artifacts / uri.removeprefix(PROXY_SCHEME).lstrip("/")


def test_train_promote_and_serve_through_the_proxy(
    server: MlflowServer, prepared_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "client"
    run_dir = home / "run"
    overrides = tiny_overrides(
        prepared_dir,
        run_dir,
        {
            "tracking.enabled": True,
            "tracking.uri": server.url,
            "tracking.experiment": "team",
            "tracking.log_checkpoints": "every",
            "registry.model_name": MODEL_NAME,
        },
    )
    del overrides["output_dir"]
    train = [sys.executable, str(REPO_ROOT / "stages" / "train.py"), "--output_dir", str(run_dir)]
    _client([*train, *_sets(overrides)], home)
    gpt3 = str(Path(sys.executable).parent / "gpt3")
    promoted = _client([gpt3, "promote", "--run_dir", str(run_dir), *_sets(overrides)], home)
    assert "decision: champion -> version 1" in promoted, promoted

    client = MlflowClient(server.url)
    run_id = json.loads((run_dir / "model" / "tracking.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    for uri in (experiment.artifact_location, run.info.artifact_uri):
        assert uri.startswith(PROXY_SCHEME), uri

    # The checkpoints reached the server's folder byte for byte, through the proxy.
    uploaded = _on_server(server, run.info.artifact_uri) / "checkpoints"
    local = run_dir / "checkpoints"
    names = sorted(p.name for p in local.glob("step_*.pt*"))
    assert names == [
        "step_0000004.pt",
        "step_0000004.pt.sha256",
        "step_0000008.pt",
        "step_0000008.pt.sha256",
    ]
    for name in names:
        assert (uploaded / name).read_bytes() == (local / name).read_bytes(), name
    assert not (run_dir / ".mlflow-staging").exists()

    # The registered model's files too; its source is a proxied URI, not a server path.
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert (version.version, version.run_id) == ("1", run_id)
    (logged,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert version.source == logged.artifact_location
    stored = _on_server(server, version.source)
    assert (stored / "MLmodel").is_file()
    weights = (run_dir / "model" / "model.safetensors").read_bytes()
    assert (stored / "artifacts" / "model" / "model.safetensors").read_bytes() == weights

    # Nothing the client was told, printed or kept names the server's folder: it could not
    # have written there itself.
    secret = str(server.artifacts)
    told = [experiment.artifact_location, run.info.artifact_uri, version.source, promoted]
    assert not any(secret in text for text in told)
    for path in home.rglob("*"):
        if path.is_file() and path.suffix in {".log", ".json", ".yaml", ".txt"}:
            assert secret not in path.read_text(errors="replace"), path

    # A colleague's machine: the champion downloads and loads over HTTP alone.
    champion = f"models:/{MODEL_NAME}@champion"
    fetched = download(champion, server.url, tmp_path / "download")
    assert (fetched / "artifacts" / "model" / "model.safetensors").read_bytes() == weights
    (tmp_path / "load").mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", server.url)
        model = mlflow.pyfunc.load_model(champion, dst_path=str(tmp_path / "load"))
    texts = model.predict(["ROMEO:"], params={"max_new_tokens": 8, "temperature": 0.0})
    assert len(texts) == 1 and texts[0].startswith("ROMEO:") and len(texts[0]) > len("ROMEO:")
    state = torch.load(uploaded / "step_0000008.pt", weights_only=True)
    assert state["tracking"]["run_id"] == run_id
