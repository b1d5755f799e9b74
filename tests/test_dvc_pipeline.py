"""The product as users meet it: `dvc repro` and `dvc exp run -S` on a fresh copy of this repo.

A real git repo, a real DVC pipeline, a real MLflow SQLite store, real training; only the
budget is cut (a few dozen steps) so it runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

RUN = Path("experiments/tiny-shakespeare")


def _project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a fresh clone would hold, with this
    checkout's edits. Never `dvc.lock`: it records this checkout's outputs (after `make run`),
    which a copy does not have, so a copy always starts as a clone before any run does."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        f for f in out.split("\0") if f and f != "dvc.lock" and (REPO_ROOT / f).is_file()
    ]


def _init_repo(root: Path, env: dict[str, str]) -> None:
    """Make the copy at `root` a git + DVC repo with one commit, as a clone is. `.dvc/` comes
    with the copy where the checkout commits it; `dvc init` only runs where it does not."""
    _run(["git", "init", "-q"], root, env)
    if not (root / ".dvc").is_dir():
        _run(["dvc", "init", "-q"], root, env)
        _run(["dvc", "config", "core.analytics", "false"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "fresh clone"], root, env)


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the repo as a fresh git + DVC repo, with a budget cut to seconds."""
    root = tmp_path_factory.mktemp("box") / "project"
    for name in _project_files():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["training"].update(max_steps=150)
    params["evaluation"].update(max_tokens=8192, sample_max_tokens=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    home = root.parent / "home"  # an empty home: `make run` must leave it empty
    home.mkdir()
    env.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    _init_repo(root, env)
    return root, env


def _readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with `prefix`, up to `&&` or a comment."""
    lines = [line for line in (REPO_ROOT / "README.md").read_text().splitlines()
             if line.startswith(prefix)]
    assert len(lines) == 1, f"README has {len(lines)} lines starting {prefix!r}"
    return shlex.split(lines[0].split(" && ")[0], comments=True)


def _mlflow_client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _unigram_entropy_nats(prepared: Path) -> float:
    meta = json.loads((prepared / "meta.json").read_text())
    shards = [prepared / shard["file"] for shard in meta["splits"]["train"]["shards"]]
    tokens = np.concatenate([np.fromfile(shard, dtype=meta["dtype"]) for shard in shards])
    counts = np.bincount(tokens, minlength=meta["vocab_size"]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_repro_then_experiment_then_noop(project: tuple[Path, dict[str, str]]) -> None:
    """`make run`'s script in a clone, then an experiment, then a no-op `dvc repro`.

    The script changes nothing git tracks except `dvc.lock` (a new file), pushes nothing and
    writes nothing outside the clone: the box around it holds only the clone and an empty home.
    """
    root, env = project
    _run(["bash", "scripts/run_pipeline.sh"], root, env)
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], root, env)
    assert status.splitlines() == ["?? dvc.lock"], status
    assert sorted(p.name for p in root.parent.iterdir()) == ["home", "project"]
    assert list((root.parent / "home").iterdir()) == []
    for path in (
        "data/tokenizer/tokenizer.json",
        "data/prepared/main/train-00000-000.bin",
        "data/prepared/main/meta.json",
        RUN / "model/model.safetensors",
        RUN / "checkpoints/latest_checkpoint.pt",
        RUN / "metrics/eval.json",
        RUN / "metrics/samples.md",
        RUN / "plots/train_loss.csv",
    ):
        assert (root / path).is_file(), path
    evaluation = json.loads((root / RUN / "metrics/eval.json").read_text())
    assert evaluation["val_loss"] < _unigram_entropy_nats(root / "data/prepared/main") - 0.3, (
        "150 steps should already beat the unigram distribution"
    )
    client = _mlflow_client(root)
    champion = client.get_model_version_by_alias("gpt3-tiny", "champion")
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "baseline"], root, env)

    _run(["dvc", "exp", "run", "-S", "training.lr=3e-4", "-n", "low-lr"], root, env)
    proc = subprocess.run(
        ["dvc", "exp", "show", "--json"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    table = json.loads(proc.stdout)
    names_with_eval = []
    for entry in table:
        for exp in [entry, *[e for group in entry.get("experiments") or [] for e in group["revs"]]]:
            data = exp.get("data") or {}
            metrics = data.get("metrics") or {}
            if any("val_loss" in (m.get("data") or {}) for m in metrics.values()):
                names_with_eval.append(exp.get("name") or data.get("rev"))
    assert "low-lr" in names_with_eval and len(names_with_eval) >= 2, table

    # The README's table command shows the evaluation's val_loss (not only train.json's).
    shown = _run(_readme_command("dvc exp show --md"), root, env)
    header = shown.splitlines()[0]
    for column in ("eval.json:val_loss", "val_bits_per_byte", "training.lr"):
        assert column in header, shown
    assert "low-lr" in shown and "train.json" not in header, shown
    # ... and its sweep queues one experiment per value.
    _run(_readme_command("dvc exp run --queue"), root, env)
    queued = _run(["dvc", "queue", "status"], root, env)
    assert queued.count("Queued") == 2, queued
    _run(["dvc", "queue", "remove", "--queued"], root, env)

    experiment = client.get_experiment_by_name("gpt3-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert "low-lr" in {r.info.run_name for r in runs}
    assert any(
        r.data.tags.get("dvc.experiment") == "low-lr" or "low-lr" in r.data.tags.values()
        for r in runs
    )
    # The lower learning rate learns less in 150 steps: the champion must not move.
    assert client.get_model_version_by_alias("gpt3-tiny", "champion").version == champion.version

    started = time.monotonic()
    output = _run(["dvc", "repro"], root, env)
    assert "didn't change" in output or "up to date" in output, output
    assert time.monotonic() - started < 60


def test_forced_repro_is_bit_identical(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    snapshots = []
    for _ in range(2):
        _run(["dvc", "repro", "--force", "train", "evaluate"], root, env)
        snapshots.append(
            (
                (root / RUN / "metrics/eval.json").read_bytes(),
                (root / RUN / "model/model.safetensors").read_bytes(),
                (root / RUN / "resolved_config.yaml").read_text(),
            )
        )
    assert snapshots[0] == snapshots[1]
    client = _mlflow_client(root)
    experiment = client.get_experiment_by_name("gpt3-pipeline")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    latest, previous = runs[0], runs[1]
    assert latest.data.params == previous.data.params
    hashes = {
        r.data.tags.get("data_hash") or r.data.tags.get("data.hash") for r in (latest, previous)
    }
    assert len(hashes) == 1 and None not in hashes


def _out_files(root: Path) -> dict[str, bytes]:
    """Every file of every output dvc.lock records (metrics included): what DVC shares."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    files = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = root / out["path"]
            for file in [path] if path.is_file() else sorted(path.rglob("*")):
                if file.is_file():
                    files[str(file.relative_to(root))] = file.read_bytes()
    return files


def test_a_colleague_pulls_instead_of_rerunning(project: tuple[Path, dict[str, str]]) -> None:
    """`gpt3 remote && dvc push`; a fresh clone's `dvc pull` gets the same bytes, nothing reruns.

    Uses the default `storage.url` (a folder beside the repository), so the colleague's clone
    sits beside it too, as two checkouts on one machine or one shared filesystem would.
    """
    root, env = project
    _run(["dvc", "repro"], root, env)  # a no-op after the tests above; the pipeline if alone
    _run(["gpt3", "remote"], root, env)
    _run(["dvc", "push"], root, env)
    storage = root.parent / "gpt3-dvc-storage"
    assert any(p.is_file() for p in storage.rglob("*")), "dvc push wrote nothing"
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "results, dvc.lock and the remote"], root, env)

    clone = root.parent / "colleague"
    _run(["git", "clone", "-q", str(root), str(clone)], root.parent, env)
    _run(["gpt3", "remote"], clone, env)  # the same remote, from the same params.yaml
    assert _run(["git", "status", "--porcelain"], clone, env) == "", "remote config differs"
    _run(["dvc", "pull"], clone, env)
    status = subprocess.run(
        ["dvc", "status", "--json"], cwd=clone, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(status.stdout) == {}, status.stdout
    output = _run(["dvc", "repro"], clone, env)
    assert "Running stage" not in output and "up to date" in output, output
    assert _run(["git", "status", "--porcelain"], clone, env) == "", "repro changed dvc.lock"

    shared, pulled = _out_files(root), _out_files(clone)
    assert RUN.joinpath("model", "model.safetensors").as_posix() in pulled
    assert RUN.joinpath("metrics", "eval.json").as_posix() in pulled
    assert sorted(pulled) == sorted(shared)
    assert [name for name in shared if pulled[name] != shared[name]] == []


def test_changing_one_source_re_prepares_that_source_only(tmp_path: Path) -> None:
    """A two-source mixture whose BPE learns from `web`: new `books` inputs rerun
    prepare@books, while the tokenizer's bytes and so prepare@web stay as they were; a weight
    change reruns no prepare stage at all."""
    root = tmp_path / "project"
    for name in _project_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, root / name)
    for source, plays in (("web", 3), ("books", 2)):
        folder = root / "data" / "raw" / source
        folder.mkdir(parents=True)
        for number in range(plays):
            text = f"{source} document {number}\n" + f"words of {source} {number} " * 400
            (folder / f"{number}.txt").write_text(text)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["sources"] = {
        name: {
            "kind": "files",
            "inputs": [f"data/raw/{name}/*.txt"],
            "text_field": "text",
            "weight": weight,
        }
        for name, weight in (("web", 0.7), ("books", 0.3))
    }
    params["data"].update(tokenizer_sources=["web"], vocab_size=300, val_fraction=0.34)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
    )
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t")
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    _init_repo(root, env)
    stages = ["prepare@web", "prepare@books"]
    first = _run(["dvc", "repro", *stages], root, env)
    assert "Running stage 'prepare@web'" in first and "Running stage 'prepare@books'" in first
    web_meta = (root / "data/prepared/web/meta.json").read_bytes()

    (root / "data/raw/books/9.txt").write_text("a new book\n" + "new words " * 300)
    params["data"]["sources"]["books"]["inputs"].append("data/raw/books/9.txt")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = _run(["dvc", "repro", *stages], root, env)
    assert "Running stage 'prepare@books'" in second, second
    assert "Running stage 'prepare@web'" not in second, second
    assert (root / "data/prepared/web/meta.json").read_bytes() == web_meta
    books = json.loads((root / "data/prepared/books/meta.json").read_text())
    assert books["splits"]["train"]["documents"] + books["splits"]["val"]["documents"] == 3

    params["data"]["sources"]["books"]["weight"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro", *stages], root, env)
    assert "Running stage 'prepare@" not in third, third
