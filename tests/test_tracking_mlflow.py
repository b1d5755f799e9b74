"""MLflow tracking against real stores: a SQLite file, and a real `mlflow server` that dies.

No mocks: tiny models really train, MLflow really stores. Waiting is always polling for a
condition with a deadline, never a sleep standing in for synchronisation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_overrides
from mlflow_support import MlflowServer
from mlflow_support import free_port as _free_port
from mlflow_support import poll as _poll

from pipeline.config.loader import flatten_config, load_config
from pipeline.config.schema import TrackingConfig
from pipeline.data.prepare import load_meta
from pipeline.errors import PREEMPTED_EXIT_CODE
from pipeline.tracking.mlflow_setup import artifact_location, resolve_tracking_uri
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.run_metadata import MAX_PARAM_VALUE, TRUNCATED, run_params
from pipeline.training.run import train

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

TRAIN_METRICS = (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/loss_scale",
    "train/tokens_seen",
    "perf/tokens_per_s",
)


def _config(prepared: Path, run_dir: Path, uri: str, experiment: str, extra: dict | None = None):
    tracking = {"tracking.enabled": True, "tracking.uri": uri, "tracking.experiment": experiment}
    return load_config(overrides=tiny_overrides(prepared, run_dir, {**tracking, **(extra or {})}))


def _only_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run, got {[r.info.run_name for r in runs]}"
    return runs[0]


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its schema costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


# --------------------------------------------------------------------------- SQLite store
def test_run_records_params_metrics_tags_and_artifacts(
    prepared_dir: Path, tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "exp-tiny-1")
    run_dir = tmp_path / "run"
    config = _config(prepared_dir, run_dir, store, "records", {"tracking.log_checkpoints": "every"})
    result = train(config, console=False)

    client = MlflowClient(store)
    run = _only_run(client, "records")
    run_id = run.info.run_id
    assert run.info.run_name == "exp-tiny-1"
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["dvc.exp_name"] == "exp-tiny-1"
    assert tags["data.hash"] == load_meta(prepared_dir).data_hash
    assert (tags["model.size"], tags["training.precision"]) == ("custom", "fp32")
    assert (tags["distributed.world_size"], tags["distributed.strategy"]) == ("1", "single")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["git.commit"] == head.stdout.strip()
        assert tags["git.dirty"] in ("true", "false")

    assert set(run.data.params) == set(flatten_config(config))
    assert run.data.params == run_params(config)
    for key in TRAIN_METRICS:
        assert _steps(client, run_id, key) == list(range(1, 9)), key
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert losses == pytest.approx(result.losses)
    assert _steps(client, run_id, "val/loss") == [4, 8]

    def listing(path: str | None = None) -> set[str]:
        found = set()
        for item in client.list_artifacts(run_id, path):
            found |= listing(item.path) if item.is_dir else {item.path}
        return found

    artifacts = listing()
    for expected in (
        "resolved_config.yaml",
        "logs/training.log",
        "data/meta.json",
        "checkpoints/step_0000004.pt",
        "checkpoints/step_0000004.pt.sha256",
        "checkpoints/step_0000008.pt",
    ):
        assert expected in artifacts, f"{expected} not in {sorted(artifacts)}"
    store_dir = Path(store.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((store_dir / "mlartifacts").as_uri())

    # The run id travels with the checkpoint and the exported model.
    state = torch.load(run_dir / "checkpoints" / "latest_checkpoint.pt", weights_only=True)
    assert state["tracking"]["run_id"] == run_id
    assert json.loads((run_dir / "model" / "tracking.json").read_text())["run_id"] == run_id
    assert not (run_dir / ".mlflow-staging").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    texts = model.predict(["ROMEO:"], params={"max_new_tokens": 8, "temperature": 0.0})
    assert len(texts) == 1 and texts[0].startswith("ROMEO:") and len(texts[0]) > len("ROMEO:")


def test_resume_continues_the_same_run(prepared_dir: Path, tmp_path: Path, store: str) -> None:
    """Steps 5-6 ran before the "crash"; the resume from step 4 re-logs them, then 7-8."""
    run_dir = tmp_path / "run"
    extra = {"training.checkpoint_interval": 2, "training.max_steps": 6}
    first = train(_config(prepared_dir, run_dir, store, "resume", extra), console=False)
    client = MlflowClient(store)
    run_id = _only_run(client, "resume").info.run_id

    extra["training.max_steps"] = 8
    checkpoint = run_dir / "checkpoints" / "step_0000004.pt"
    second = train(
        _config(prepared_dir, run_dir, store, "resume", extra),
        resume=str(checkpoint),
        console=False,
    )
    run = _only_run(client, "resume")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"

    history = client.get_metric_history(run_id, "train/loss")
    in_order = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    assert in_order == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8], "each session logs in step order"
    distinct = {(m.step, m.value) for m in history}
    assert sorted(step for step, _ in distinct) == list(range(1, 9)), "exact resume: same values"
    latest = {}
    for m in sorted(history, key=lambda m: m.timestamp):
        latest[m.step] = m.value
    assert latest == pytest.approx({**first.losses, **second.losses})
    # Params are immutable in MLflow: the first session's value stays, with a warning.
    assert run.data.params["training.max_steps"] == "6"
    assert "params cannot change" in (run_dir / "logs" / "training.log").read_text()

    # Resuming the finished run from `latest` trains nothing
    # and logs no second copy of the same weights, but keeps the run id beside the model.
    def models() -> int:
        return len(client.search_logged_models([run.info.experiment_id]))

    assert models() == 2  # one per session that trained
    train(_config(prepared_dir, run_dir, store, "resume", extra), resume="latest", console=False)
    assert models() == 2 and _only_run(client, "resume").info.run_id == run_id
    assert json.loads((run_dir / "model" / "tracking.json").read_text())["run_id"] == run_id


def test_unreachable_server_never_stops_training(prepared_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    extra = {"tracking.flush_timeout_s": 1.0, "tracking.queue_size": 3}
    started = time.monotonic()
    result = train(
        _config(prepared_dir, run_dir, f"http://127.0.0.1:{_free_port()}", "down", extra),
        console=False,
    )
    elapsed = time.monotonic() - started
    assert result.progress.step == 8 and (run_dir / "model" / "model.safetensors").is_file()
    log = (run_dir / "logs" / "training.log").read_text()
    assert log.count("unreachable (") == 1, "one warning, not one per step"
    # 12 batches (8 steps, 2 validations, 2 checkpoint stalls) through a queue of 3: the last 3
    # (step 8's loss, validation and checkpoint stall) are kept.
    assert "NOT SENT" in log and "3 metric batches, steps 8-8" in log
    assert "DROPPED 9 metric batches, steps 1-7" in log
    assert not (run_dir / "model" / "tracking.json").exists()
    assert elapsed < 60, f"an unreachable server cost {elapsed:.0f} s"


def test_bad_metric_names_are_dropped_alone(
    store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A name MLflow would reject is dropped (with one warning), not the batch around it."""
    settings = TrackingConfig(uri=store, experiment="names")
    tracker = MlflowTracker(settings, run_name="names", tags={}, params={"a": "1"})
    with caplog.at_level("WARNING", logger="pipeline.tracking"):
        for step in (1, 2, 3):
            tracker.log_metrics({"train/loss": 1.0 / step, "mfu(%)": 5.0}, step)
        tracker.close()
    assert caplog.text.count("'mfu(%)' is not valid") == 1
    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}
    assert _steps(client, tracker.run_id, "train/loss") == [1, 2, 3]
    assert set(run.data.metrics) == {"train/loss"}


def test_system_metrics_go_through_the_same_queue(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "3600")  # we sample by hand
    settings = TrackingConfig(uri=store, experiment="system", system_metrics=True)
    tracker = MlflowTracker(settings, run_name="system", tags={}, params={})
    assert tracker.sampler is not None
    tracker.sampler.sample()
    tracker.close()
    client = MlflowClient(store)
    metrics = client.get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(root))  # dvc exp run --temp: cwd is a throwaway copy
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{root}/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{root}/other.db"
    assert artifact_location(f"sqlite:///{root}/mlflow.db", "my exp") == (
        (root / "mlartifacts" / "my_exp").as_uri()
    )
    assert artifact_location("http://127.0.0.1:5000", "x") is None


def test_long_param_values_are_truncated(prepared_dir: Path, tmp_path: Path) -> None:
    config = load_config(
        overrides=tiny_overrides(
            prepared_dir, tmp_path, {"evaluation.sample_prompts": ["x" * 7000]}
        )
    )
    value = run_params(config)["evaluation.sample_prompts"]
    assert len(value) == MAX_PARAM_VALUE and value.endswith(TRUNCATED)


# ------------------------------------------------------------------------- a real server
def _http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    instance = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    instance.start()
    yield instance
    if instance.proc is not None and instance.proc.poll() is None:
        instance.kill()


def test_rest_search_finds_two_runs_with_the_same_param_keys(
    prepared_dir: Path, tmp_path: Path, server: MlflowServer
) -> None:
    """What the UI's compare view does: search an experiment's runs over the REST API."""
    configs = [
        _config(
            prepared_dir,
            tmp_path / f"run{i}",
            server.url,
            "compare",
            {"training.max_steps": 4, "training.lr": lr},
        )
        for i, lr in enumerate((1e-3, 2e-3))
    ]
    for config in configs:
        train(config, console=False)
    experiment = _http_json(
        f"{server.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=compare"
    )["experiment"]
    found = _http_json(
        f"{server.url}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [experiment["experiment_id"]], "max_results": 10},
    )["runs"]
    assert len(found) == 2
    keys = [{p["key"] for p in run["data"]["params"]} for run in found]
    assert keys[0] == keys[1] == set(flatten_config(configs[0]))
    lrs = sorted(
        float(p["value"])
        for run in found
        for p in run["data"]["params"]
        if p["key"] == "training.lr"
    )
    assert lrs == [1e-3, 2e-3]
    # Artifacts went through the server's artifact proxy.
    run_id = found[0]["info"]["run_id"]
    listed = _http_json(f"{server.url}/api/2.0/mlflow/artifacts/list?run_id={run_id}")
    assert "resolved_config.yaml" in {f["path"] for f in listed.get("files", [])}


def _train_command(run_dir: Path, overrides: dict, *flags: str) -> list[str]:
    command = [sys.executable, str(REPO_ROOT / "stages" / "train.py"), "--output_dir", str(run_dir)]
    for key, value in overrides.items():
        if key != "output_dir":
            command += ["--set", f"{key}={json.dumps(value)}"]
    return [*command, *flags]


def test_server_killed_mid_run_loses_no_metric(
    prepared_dir: Path, tmp_path: Path, server: MlflowServer
) -> None:
    """Kill the server mid-run, restart it, and find every step in MLflow.

    A machine can train the tiny model at 5 or at 60 steps/s, so no step count guarantees the
    run is still going when the server comes back. Instead the run is open-ended and, once
    training.log shows the server reachable again, stopped with SIGTERM (checkpoint, exit
    143, the run KILLED); a resume then trains it to its end in the same MLflow run.
    """
    run_dir = tmp_path / "run"
    log = run_dir / "logs" / "training.log"
    overrides = tiny_overrides(
        prepared_dir,
        run_dir,
        {
            "tracking.enabled": True,
            "tracking.experiment": "outage",
            "tracking.flush_timeout_s": 120,
            "training.max_steps": 1_000_000,
            "training.eval_interval": 20,
            "training.checkpoint_interval": 1000,
            "training.log_level": "INFO",
        },
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    out = tmp_path / "train.out"
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            _train_command(run_dir, overrides),
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    client = MlflowClient(server.url)
    try:

        def some_steps_arrived() -> bool:
            assert proc.poll() is None, out.read_text()[-3000:]
            exp = client.get_experiment_by_name("outage")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            history = client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []
            return len(history) >= 3

        _poll(some_steps_arrived, 120, "the first metrics to reach the server")
        server.kill()
        _poll(lambda: "unreachable (" in log.read_text(), 60, "the outage warning in training.log")
        server.start()
        _poll(lambda: "reachable again" in log.read_text(), 120, "the tracker to reconnect")
        assert proc.poll() is None, "training must still be running after the reconnect"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    stopped_at = json.loads((run_dir / "metrics" / "train.json").read_text())["step"]
    text = log.read_text()
    assert "NOT SENT" not in text and "DROPPED" not in text
    run = _only_run(client, "outage")
    assert run.info.status == "KILLED"
    for key in TRAIN_METRICS:
        assert _steps(client, run.info.run_id, key) == list(range(1, stopped_at + 1)), key
    assert _steps(client, run.info.run_id, "val/loss") == list(range(20, stopped_at + 1, 20))

    # Train it to the end: same MLflow run, FINISHED, every step there.
    final = stopped_at + 3
    done = subprocess.run(
        _train_command(
            run_dir,
            {**overrides, "training.max_steps": final},
            "--resume_from_checkpoint",
            "latest",
        ),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = _only_run(client, "outage")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, final + 1))
    assert len(history) == final, "no step logged twice: the SIGTERM checkpoint was the last step"
