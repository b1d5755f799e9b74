"""A password in the tracking URI is never written or logged (issue 18, item 4).

A real `mlflow server` on 127.0.0.1 is reached as `http://alice:<password>@host`, both through
`MLFLOW_TRACKING_URI` and `tracking.uri`. After a real run through the command line (which
also logs the model and the latest checkpoint to MLflow) the password is in none of the bytes
of any file the run wrote, nor in the server's database and artifact store, nor in the console
output, nor in the sbatch script `gpt3 slurm script` prints; the redacted form is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import set_args, tiny_overrides, train_cli
from mlflow_support import MlflowServer

from pipeline.errors import ConfigError
from pipeline.redact import redact
from pipeline.tracking.mlflow_setup import resolve_tracking_uri

PASSWORD = "S3cret-Pw-18"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_no_file_log_or_store_of_a_run_holds_the_password(
    prepared_dir: Path, tmp_path: Path, server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"http://alice:{PASSWORD}@127.0.0.1:{server.port}"
    work = tmp_path / "work"
    work.mkdir()
    run_dir = work / "run"
    overrides = tiny_overrides(prepared_dir, run_dir, {
        "training.max_steps": 2, "training.checkpoint_interval": 2, "tracking.enabled": True,
        "tracking.uri": uri, "tracking.log_checkpoints": "latest", "tracking.experiment": "s",
    })  # fmt: skip
    proc = train_cli(set_args(overrides), work, MLFLOW_TRACKING_URI=uri)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]

    # It really talked to the server: the run, its params and its logged model are there.
    client = MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    assert run.data.params["tracking.uri"] == f"http://alice:***@127.0.0.1:{server.port}"
    assert client.get_metric_history(run.info.run_id, "train/loss")
    assert (run_dir / "model" / "tracking.json").is_file()
    assert "alice:***@127.0.0.1" in (run_dir / "resolved_config.yaml").read_text()

    needle = PASSWORD.encode()
    assert PASSWORD not in output
    written = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    assert {"run/logs/training.log", "run/checkpoints/latest_checkpoint.pt"} <= set(written)
    assert _files_holding(work, needle) == [], "the password was written by the run"
    assert _files_holding(server.root, needle) == [], "the password reached the MLflow store"

    # The SLURM batch script shows the redacted form and no password.
    script_args = [*set_args({**overrides, "distributed.launcher": "slurm"})]
    done = subprocess.run(
        [str(Path(sys.executable).with_name("gpt3")), "slurm", "script", *script_args],
        cwd=work, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert PASSWORD not in done.stdout + done.stderr
    assert "alice:***@127.0.0.1" in done.stdout and "MLFLOW_TRACKING_URI" in done.stdout


def test_redaction_rules_and_a_redacted_uri_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert redact("http://u:p@ss@h:1/x?q=a@b") == "http://u:***@h:1/x?q=a@b"
    assert redact("see https://tok@github.com/a") == "see https://***@github.com/a"
    assert redact("ssh://git@host/repo sqlite:///a@b.db") == "ssh://git@host/repo sqlite:///a@b.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"has '\*\*\*' where its password was"):
        resolve_tracking_uri("http://alice:***@127.0.0.1:5000")
