"""Resume from a checkpoint logged to MLflow, through a real `mlflow server` (proxied artifacts).

"Another machine" is a fresh run directory that shares nothing with the original but the
server's URL. Exactness is checked on the exported weights' bytes against an uninterrupted
run, and the MLflow side on the server itself: which run the session logged into, its tags.
Bad input goes through the real command line (in this process): one line, exit 2, and neither
the run directory nor anything in the temporary folder left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, tiny_overrides
from mlflow_support import MlflowServer, free_port, poll
from test_distributed import curve

from pipeline.cli import run_command
from pipeline.cli.train import train as train_command
from pipeline.config.loader import load_config
from pipeline.errors import CheckpointError
from pipeline.training.components import build_components
from pipeline.training.mlflow_checkpoint import fetch_checkpoint
from pipeline.training.run import train

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

pytestmark = pytest.mark.slow

ZERO2 = str(REPO_ROOT / "configs" / "deepspeed_zero2_cpu.json")
WEIGHTS = Path("model") / "model.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    instance = MlflowServer(tmp_path_factory.mktemp("resume-server"))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(autouse=True)
def _own_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Downloads are staged under a temporary folder of the test's own, to see it left empty.

    The command line runs in the test's folder: the checkout's params.yaml must not join in.
    """
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    return staging


def _tracking(server: MlflowServer, extra: dict | None = None) -> dict:
    values = {
        "tracking.enabled": True,
        "tracking.uri": server.url,
        "tracking.experiment": "resume",
        "tracking.flush_timeout_s": 60,
    }
    return {**values, **(extra or {})}


def _sets(overrides: dict) -> list[str]:
    flags = []
    for key, value in overrides.items():
        flags += ["--set", f"{key}={json.dumps(value)}"]
    return flags


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`gpt3 train ARGS` in this process: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_command(train_command, args)
    return int(done.value.code or 0), capsys.readouterr().err


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "model" / "tracking.json").read_text())["run_id"]


def _history(client: MlflowClient, run_id: str, key: str = "train/loss") -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def logged_run(
    server: MlflowServer, prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """8 steps, every checkpoint uploaded (steps 4 and 8): the uninterrupted reference."""
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    extra = _tracking(server, {"tracking.log_checkpoints": "every"})
    train(load_config(overrides=tiny_overrides(prepared_dir, run_dir, extra)), console=False)
    return run_dir


def test_resume_a_finished_run_from_a_named_checkpoint_in_a_nested_run(
    server: MlflowServer,
    prepared_dir: Path,
    logged_run: Path,
    tmp_path: Path,
    _own_tmpdir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    """runs:/<id>/checkpoints/step_0000004.pt on another machine: steps 5-8 give the same bytes."""
    original = _run_id(logged_run)
    resumed = tmp_path / "elsewhere" / "run"
    overrides = tiny_overrides(prepared_dir, resumed, _tracking(server))
    uri = f"runs:/{original}/checkpoints/step_0000004.pt"
    code, err = _cli(["--resume_from_checkpoint", uri, *_sets(overrides)], capsys)
    assert code == 0, err[-3000:]
    assert (resumed / WEIGHTS).read_bytes() == (logged_run / WEIGHTS).read_bytes()

    kept = resumed / "from-mlflow" / original / "checkpoints" / "step_0000004.pt"
    assert kept.read_bytes() == (logged_run / "checkpoints" / "step_0000004.pt").read_bytes()
    assert kept.with_name("step_0000004.pt.sha256").is_file()
    assert not list(_own_tmpdir.glob("gpt3-from-mlflow-*")), "the temporary download folder is gone"

    client = MlflowClient(server.url)
    child = client.get_run(_run_id(resumed))
    assert child.info.run_id != original and child.info.status == "FINISHED"
    assert child.data.tags["resumed_from"] == original
    assert child.data.tags["resumed_from.artifact"] == "checkpoints/step_0000004.pt"
    assert child.data.tags["mlflow.parentRunId"] == original
    reference = _history(client, original)
    assert _history(client, child.info.run_id) == {s: reference[s] for s in range(5, 9)}
    finished = client.get_run(original)
    assert finished.info.status == "FINISHED" and "resumed_from" not in finished.data.tags
    assert len(client.get_metric_history(original, "train/loss")) == 8, "the record is untouched"


def test_resume_an_interrupted_run_from_its_newest_checkpoint_in_the_same_run(
    server: MlflowServer,
    prepared_dir: Path,
    tmp_path: Path,
    _own_tmpdir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    """A run stopped by SIGTERM (KILLED) continues from runs:/<id> in the same MLflow run."""
    first = tmp_path / "first" / "run"
    extra = {
        "training.max_steps": 1_000_000,  # open-ended: the stop comes from the signal
        "training.checkpoint_interval": 1000,
        "training.eval_interval": 1000,
    }
    overrides = tiny_overrides(prepared_dir, first, _tracking(server, extra))
    log = first / "logs" / "training.log"

    def stop_after_step_3() -> None:
        poll(lambda: log.is_file() and "step 3: loss" in log.read_text(), 120, "step 3")
        os.kill(os.getpid(), signal.SIGTERM)  # the loop checkpoints, uploads `latest`, stops

    stopper = threading.Thread(target=stop_after_step_3, daemon=True)
    stopper.start()
    stopped = train(load_config(overrides=overrides), console=False)
    stopper.join()
    assert stopped.preempted
    client = MlflowClient(server.url)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("resume").experiment_id],
        filter_string=f"tags.run_dir = '{first.resolve()}'",
    )
    assert run.info.status == "KILLED"
    end = stopped.progress.step + 2

    reference = tmp_path / "reference"
    steps = {"training.max_steps": end}
    train(load_config(overrides=tiny_overrides(prepared_dir, reference, steps)), console=False)

    resumed = tmp_path / "elsewhere" / "run"
    more = {**overrides, "output_dir": str(resumed), "training.max_steps": end}
    code, err = _cli(["--resume_from_checkpoint", f"runs:/{run.info.run_id}", *_sets(more)], capsys)
    assert code == 0, err[-3000:]
    assert (resumed / WEIGHTS).read_bytes() == (reference / WEIGHTS).read_bytes()
    assert (
        resumed / "from-mlflow" / run.info.run_id / "checkpoints" / "latest_checkpoint.pt"
    ).is_file()
    assert _run_id(resumed) == run.info.run_id, "logged into the interrupted run itself"
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == run.info.run_id
    assert "mlflow.parentRunId" not in run.data.tags
    assert sorted(_history(client, run.info.run_id)) == list(range(1, end + 1))
    assert not list(_own_tmpdir.glob("gpt3-from-mlflow-*"))


def _train_deepspeed(run_dir: Path, prepared: Path, extra: dict, *flags: str) -> str:
    return _train_stage(run_dir, prepared, extra, "--deepspeed_config", ZERO2, *flags)


def _train_stage(run_dir: Path, prepared: Path, extra: dict, *flags: str) -> str:
    """`stages/train.py` as its own process (plain launch), gloo for any process group."""
    command = [sys.executable, str(REPO_ROOT / "stages" / "train.py"),
               "--distributed_backend", "gloo", *flags,
               *_sets(tiny_overrides(prepared, run_dir, extra))]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "RANK"))}
    # DeepSpeed's compiled comm op, cached in the checkout (a relative setting made absolute:
    # the runs start in their own folders, and would each compile it again, a minute apiece).
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", ".torch_extensions")
    env["TORCH_EXTENSIONS_DIR"] = str(REPO_ROOT / extensions)
    proc = subprocess.run(command, cwd=run_dir.parent, env={**env, "PYTHONUNBUFFERED": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_deepspeed_checkpoint_folders_are_logged_and_resume_exactly(
    server: MlflowServer, prepared_dir: Path, tmp_path: Path
) -> None:
    """ZeRO-2 on CPU: each checkpoint folder goes to MLflow whole; the proxied URI of step 4
    resumes a fresh folder to the same exported weights as the uninterrupted 8 steps."""
    original = tmp_path / "a" / "run"
    original.parent.mkdir()
    _train_deepspeed(
        original, prepared_dir, _tracking(server, {"tracking.log_checkpoints": "every"})
    )
    run_id = _run_id(original)
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    step4 = _logged_folders_are_whole(client, run_id, original)
    assert "checksums.sha256" in step4
    assert not (original / ".mlflow-staging").exists()

    resumed = tmp_path / "b" / "run"
    resumed.parent.mkdir()
    uri = f"{run.info.artifact_uri}/checkpoints/step_0000004"
    assert uri.startswith("mlflow-artifacts:")
    _train_deepspeed(resumed, prepared_dir, _tracking(server), "--resume_from_checkpoint", uri)
    assert (resumed / WEIGHTS).read_bytes() == (original / WEIGHTS).read_bytes()
    child = client.get_run(_run_id(resumed))
    assert child.data.tags["resumed_from"] == run_id
    assert child.data.tags["resumed_from.artifact"] == "checkpoints/step_0000004"


def _logged_folders_are_whole(client: MlflowClient, run_id: str, original: Path) -> set[str]:
    """Checkpoint folders of steps 4 and 8 and `latest` were logged, step 4 with every file
    the run wrote locally; returns step 4's file names."""
    listed = {item.path for item in client.list_artifacts(run_id, "checkpoints")}
    assert {"checkpoints/step_0000004", "checkpoints/step_0000008", "checkpoints/latest"} <= listed
    step4 = {
        item.path.rsplit("/", 1)[1]
        for item in client.list_artifacts(run_id, "checkpoints/step_0000004")
    }
    assert step4 == {p.name for p in (original / "checkpoints" / "step_0000004").iterdir()}
    return step4


def test_sharded_checkpoint_folders_are_logged_and_resume_on_one_device(
    server: MlflowServer, prepared_dir: Path, tmp_path: Path
) -> None:
    """An fsdp run's DCP folders go to MLflow whole; a plain one-device run resumes from the
    logged step 4 (gathering the shards) and continues with the original's losses. DeepSpeed,
    which cannot read DCP folders, is refused before anything is downloaded."""
    original = tmp_path / "a" / "run"
    original.parent.mkdir()
    sharded = {"distributed.strategy": "fsdp", "tracking.log_checkpoints": "every"}
    _train_stage(original, prepared_dir, _tracking(server, sharded))
    run_id = _run_id(original)
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    step4 = _logged_folders_are_whole(client, run_id, original)
    assert {".metadata", "trainer.pt", "checksums.sha256"} <= step4

    resumed = tmp_path / "b" / "run"
    uri = f"runs:/{run_id}/checkpoints/step_0000004"
    config = load_config(overrides=tiny_overrides(prepared_dir, resumed, _tracking(server)))
    train(config, resume=uri, console=False)
    want = {step: loss for step, loss in curve(original).items() if step > 4}
    got = curve(resumed)
    assert sorted(got) == sorted(want)
    assert all(got[s] == pytest.approx(want[s], rel=1e-5) for s in want), (got, want)
    child = client.get_run(_run_id(resumed))
    assert child.data.tags["resumed_from.artifact"] == "checkpoints/step_0000004"

    parts = build_components(config)
    newest = fetch_checkpoint(f"runs:/{run_id}", config, parts.vocab_size, parts.tokenizer_id,
                              "single")  # fmt: skip
    newest.cleanup()
    assert newest.artifact == "checkpoints/step_0000008"  # no single file: the newest folder
    for which in (f"runs:/{run_id}", uri):
        with pytest.raises(CheckpointError, match="a sharded \\(DCP\\) folder"):
            fetch_checkpoint(which, config, parts.vocab_size, parts.tokenizer_id, "deepspeed")

    # One MLflow run holding both layouts (a run resumed under another strategy logs into the
    # same run): the newest step wins whatever the layout; a folder still uploading (no
    # manifest yet) is passed over.
    mixed = client.create_run(run.info.experiment_id).info.run_id
    client.log_artifacts(mixed, str(original / "checkpoints" / "step_0000004"),
                         "checkpoints/step_0000004")  # fmt: skip
    for name in ("step_0000008.pt", "step_0000008.pt.sha256"):
        client.log_artifact(mixed, str(resumed / "checkpoints" / name), "checkpoints")
    partial = tmp_path / "step_0000012"
    shutil.copytree(original / "checkpoints" / "step_0000008", partial)
    (partial / "checksums.sha256").unlink()
    client.log_artifacts(mixed, str(partial), "checkpoints/step_0000012")
    client.set_terminated(mixed)
    for strategy in ("fsdp", "single"):
        chosen = fetch_checkpoint(f"runs:/{mixed}", config, parts.vocab_size,
                                  parts.tokenizer_id, strategy)  # fmt: skip
        chosen.cleanup()
        assert chosen.artifact == "checkpoints/step_0000008.pt", strategy


def test_bad_sources_are_one_line_and_write_nothing(
    server: MlflowServer,
    prepared_dir: Path,
    logged_run: Path,
    tmp_path: Path,
    _own_tmpdir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    client = MlflowClient(server.url)
    bare = client.create_run(client.get_experiment_by_name("resume").experiment_id).info.run_id
    client.set_terminated(bare)
    original = _run_id(logged_run)
    run_dir = tmp_path / "never"
    overrides = tiny_overrides(prepared_dir, run_dir, _tracking(server))
    down = f"http://127.0.0.1:{free_port()}"
    cases = [
        (f"runs:/{'0' * 32}", {}, f"no MLflow run {'0' * 32} at {server.url}"),
        ("runs:/not-a-run", {}, "'not-a-run' is not an MLflow run id"),
        (f"runs:/{bare}", {}, f"MLflow run {bare} has no logged checkpoints"),
        (f"runs:/{original}/checkpoints/step_0000005.pt", {}, "has no checkpoint"),
        (f"runs:/{original}", {"model.n_layer": 3}, "model.n_layer: checkpoint 2 != config 3"),
        (f"runs:/{original}", {"tracking.uri": down}, f"MLflow at {down} does not answer ("),
    ]
    experiment = client.get_experiment_by_name("resume").experiment_id
    runs_before = len(client.search_runs([experiment]))
    for uri, extra, expected in cases:
        code, err = _cli(["--resume_from_checkpoint", uri, *_sets({**overrides, **extra})], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (uri, err)
        assert expected in lines[0], (uri, lines[0])
        assert not run_dir.exists() and not list(_own_tmpdir.glob("gpt3-from-mlflow-*")), uri
    assert len(client.search_runs([experiment])) == runs_before, "no run was started"
