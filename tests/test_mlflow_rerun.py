"""Rerun a run from its MLflow record, through a real `mlflow server` on 127.0.0.1.

The runs start in a small git checkout of the test's own, so the commit and uncommitted-changes
checks meet a real repository whose state the test controls (the code that runs is this one;
what the check compares is the checkout's git state, as for any run). Every command goes
through the real command line in this process: `gpt3 train` for the original, `gpt3 rerun` and
`gpt3 train --rerun` for the reruns.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from conftest import REPO_ROOT, tiny_overrides
from dvc.utils.hydra import apply_overrides
from mlflow_support import MlflowServer, free_port

from pipeline.cli import run_command
from pipeline.cli.dvc_exp import dvc_exp as dvc_exp_command
from pipeline.cli.rerun import rerun as rerun_command
from pipeline.cli.train import train as train_command
from pipeline.config.loader import load_config, read_yaml_mapping
from pipeline.config.output import public_values
from pipeline.data.prepared import load_meta
from pipeline.tracking.dvc_experiment import experiment_exists, leaves

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

pytestmark = pytest.mark.slow

WEIGHTS = Path("model") / "model.safetensors"
EXPERIMENT = "rerun"
EXP_NAME = "exp-tiny-1"


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def _sets(overrides: dict) -> list[str]:
    flags = []
    for key, value in overrides.items():
        flags += ["--set", f"{key}={json.dumps(value)}"]
    return flags


def _cli(command: click.Command, args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`gpt3 <command> ARGS` in this process: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_command(command, args)
    return int(done.value.code or 0), capsys.readouterr().err


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "model" / "tracking.json").read_text())["run_id"]


def _metrics(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    """Every metric's history but timings (perf/*), by step."""
    keys = [key for key in client.get_run(run_id).data.metrics if not key.startswith("perf/")]
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    instance = MlflowServer(tmp_path_factory.mktemp("rerun-server"))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository with one committed file; run folders are git-ignored, as in a project."""
    repo = tmp_path_factory.mktemp("checkout")
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("STEP = 1\n")
    (repo / ".gitignore").write_text("runs/\n")
    _git(repo, "add", "code.py", ".gitignore")
    _git(repo, "commit", "-q", "-m", "first")
    return repo


@pytest.fixture
def env(checkout: Path, server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Commands run in the checkout and find the server through MLFLOW_TRACKING_URI."""
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return checkout


def _overrides(prepared: Path, **extra: object) -> dict:
    values = tiny_overrides(
        prepared, Path("unused"), {"tracking.enabled": True, "tracking.experiment": EXPERIMENT}
    )
    del values["output_dir"]
    return {**values, **extra}


@pytest.fixture(scope="module")
def original(checkout: Path, server: MlflowServer, prepared_dir: Path) -> str:
    """The run to rerun: `gpt3 train` in the clean checkout, named as `dvc exp run -n` names a
    run (DVC_EXP_NAME); returns its MLflow run id."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(checkout)
        patch.setenv("MLFLOW_TRACKING_URI", server.url)
        patch.setenv("DVC_EXP_NAME", EXP_NAME)
        with pytest.raises(SystemExit) as done:
            run_command(
                train_command, ["--output_dir", "runs/original", *_sets(_overrides(prepared_dir))]
            )
    assert done.value.code == 0
    return _run_id(checkout / "runs" / "original")


def test_a_rerun_reproduces_the_run_bit_for_bit(
    env: Path, original: str, server: MlflowServer, capsys: pytest.CaptureFixture
) -> None:
    code, err = _cli(rerun_command, [f"runs:/{original}", "--output_dir", "runs/again"], capsys)
    assert code == 0, err[-3000:]
    again = env / "runs" / "again"
    assert (again / WEIGHTS).read_bytes() == (env / "runs" / "original" / WEIGHTS).read_bytes()

    client = MlflowClient(server.url)
    rerun_id = _run_id(again)
    assert rerun_id != original
    tags = client.get_run(rerun_id).data.tags
    assert tags["rerun_of"] == original and "rerun.forced" not in tags
    assert tags["git.commit"] == client.get_run(original).data.tags["git.commit"]
    reference = _metrics(client, original)
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss"} <= set(reference)
    assert _metrics(client, rerun_id) == reference  # every value, every step, exactly


def test_other_code_or_data_is_refused_in_one_line_and_force_is_recorded(
    env: Path,
    original: str,
    server: MlflowServer,
    prepared_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    uri = f"runs:/{original}"
    target = env / "runs" / "refused"

    def refused(args: list[str], expected: str) -> None:
        code, err = _cli(train_command, ["--rerun", uri, "--output_dir", str(target), *args],
                         capsys)  # fmt: skip
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert expected in lines[0], lines[0]
        assert not target.exists()

    refused(["--seed", "3"], "--rerun takes its config from the run's record; --seed would")
    unknown = "0" * 32
    code, err = _cli(rerun_command, [f"runs:/{unknown}", "--output_dir", str(target)], capsys)
    expected = f"error: runs:/{unknown}: no MLflow run {unknown} at {server.url}"
    assert code == 2 and err.strip() == expected and not target.exists()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
        refused([], "does not answer (")
    (env / "code.py").write_text("STEP = 2\n")
    refused([], "this checkout has uncommitted changes the run did not have; --force")
    _git(env, "commit", "-q", "-am", "second")
    head = _git(env, "rev-parse", "HEAD")[:12]
    first = _git(env, "rev-parse", "HEAD~1")[:12]
    refused([], f"git commit: the run's {first}, this checkout's {head}; --force reruns it")

    other = tmp_path / "other-prepared"
    shutil.copytree(prepared_dir, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["data_hash"] = "0" * 64  # prepared from other inputs, as far as the record can tell
    (other / "meta.json").write_text(json.dumps(meta))
    recorded = load_meta(prepared_dir).data_hash[:12]
    refused(
        ["--set", f"data.prepared_dir={other}"],
        f"this checkout's {head}; data.hash: the run's {recorded}, the prepared data's "
        f"{'0' * 12} ({other}); --force",
    )

    forced = ["--rerun", uri, "--force", "--output_dir", str(target)]
    code, err = _cli(train_command, [*forced, "--set", "training.max_steps=2"], capsys)
    assert code == 0, err[-3000:]
    assert "warning: --force: git commit: the run's" in err
    tags = MlflowClient(server.url).get_run(_run_id(target)).data.tags
    assert tags["rerun_of"] == original
    assert tags["rerun.forced"].startswith("git commit: the run's")
    assert json.loads(tags["rerun.overrides"]) == {"training.max_steps": 2}
    assert tags["git.commit"].startswith(head)


def test_dvc_exp_prints_a_dvc_exp_run_line_that_recreates_the_runs_params(
    env: Path,
    original: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The printed `-S` values, applied by DVC's own parser to this project's params.yaml,
    resolve to the run's config (all but where it wrote and its store)."""
    params = tmp_path / "params.yaml"
    shutil.copy(REPO_ROOT / "params.yaml", params)
    monkeypatch.chdir(REPO_ROOT)  # params.yaml names its config files from the project root
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_command(dvc_exp_command, [f"runs:/{original}", "--params", str(params)])
    printed = capsys.readouterr()
    out = printed.out.splitlines()
    assert done.value.code == 0, printed.err
    assert out[0] == f"# MLflow run {original}: DVC experiment {EXP_NAME!r}"
    assert any(line.startswith("# the experiment is not in this repository") for line in out)
    assert "git checkout " + _git(env, "rev-list", "--max-parents=0", "HEAD") in out
    (line,) = [line for line in out if line.startswith("dvc exp run ")]
    args = shlex.split(line)
    assert args[3:5] == ["-n", EXP_NAME]
    apply_overrides(params, [args[i + 1] for i, arg in enumerate(args) if arg == "-S"])
    rebuilt = leaves(public_values(load_config(params_file=params)))
    record = leaves(read_yaml_mapping(env / "runs" / "original" / "resolved_config.yaml"))
    for key in ("output_dir", "tracking.uri"):
        rebuilt.pop(key), record.pop(key)
    assert rebuilt == record
    assert out[-1] == "# not carried over: output_dir, tracking.uri"

    # While the experiment exists, `dvc exp apply` is the way back (DVC keeps it as a git ref).
    assert not experiment_exists(EXP_NAME, env)
    _git(env, "update-ref", f"refs/exps/00/000000/{EXP_NAME}", "HEAD")
    assert experiment_exists(EXP_NAME, env)
