"""Ad-hoc evaluation stays out of the pipeline's outputs and other runs (issue 18, item 6).

Two real runs tracked in one real MLflow SQLite store: `pipeline` (what params.yaml names,
with its evaluate stage's eval.json and samples.md) and `other`. Evaluating `other` from the
pipeline's project once overwrote the pipeline's metrics (which `promote` reads) and logged
into `other`'s MLflow run; `export` ignored params.yaml's tracking URI, and every `runs:/` load
left a full model copy in the temporary folder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from pipeline.cli import cli, run_command
from pipeline.config.loader import load_config
from pipeline.training.run import train

EVAL_METRIC = "val_loss"


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_command(cli, args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def project(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("adhoc")
    store = f"sqlite:///{root / 'mlflow.db'}"
    runs = {}
    for name in ("pipeline", "other"):
        extra = {"training.max_steps": 2, "tracking.enabled": True, "tracking.uri": store,
                 "tracking.experiment": "adhoc", "evaluation.max_tokens": 256}  # fmt: skip
        config = load_config(overrides=tiny_overrides(prepared_dir, root / name, extra))
        train(config, console=False)
        runs[name] = root / name
    params = root / "project" / "params.yaml"
    params.parent.mkdir()
    params.write_text((runs["pipeline"] / "resolved_config.yaml").read_text())
    return {"root": root, "store": store, "params": params, **runs}


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "model" / "tracking.json").read_text())["run_id"]


def _logged(store: str, run_dir: Path) -> set[str]:
    from mlflow.tracking import MlflowClient

    return set(MlflowClient(store).get_run(_run_id(run_dir)).data.metrics)


def test_evaluating_another_model_writes_beside_it_and_logs_nowhere(
    project: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project["params"].parent)
    pipeline, other = project["pipeline"], project["other"]
    code, err = _run(["evaluate"], capsys)  # the pipeline's own stage: its metrics, its run
    assert code == 0, err
    own = {name: (pipeline / "metrics" / name).read_bytes() for name in ("eval.json", "samples.md")}
    assert EVAL_METRIC in _logged(project["store"], pipeline)

    code, err = _run(["evaluate", "--model_checkpoint", str(other / "model")], capsys)
    assert code == 0, err
    beside = other / "model-eval"
    assert f"wrote {beside / 'eval.json'}" in err
    assert json.loads((beside / "eval.json").read_text())[EVAL_METRIC] > 0
    assert (beside / "samples.md").is_file()
    for name, data in own.items():
        assert (pipeline / "metrics" / name).read_bytes() == data, f"the pipeline's {name} changed"
    assert not (other / "metrics" / "eval.json").exists()
    assert EVAL_METRIC not in _logged(project["store"], other), "logged into another run"

    # A checkpoint: beside the checkpoints folder, never inside it; --output: exactly there.
    code, err = _run(["evaluate", "--model_checkpoint", str(other / "checkpoints")], capsys)
    assert code == 0, err
    assert (other / "step_0000002-eval" / "eval.json").is_file()
    assert sorted(p.name for p in (other / "checkpoints").iterdir() if "eval" in p.name) == []
    out = project["root"] / "spot-check"
    code, err = _run(["evaluate", "--model_checkpoint", str(pipeline / "model"), "--output",
                      str(out)], capsys)  # fmt: skip
    assert code == 0 and (out / "eval.json").is_file(), err
    assert (pipeline / "metrics" / "eval.json").read_bytes() == own["eval.json"]


def test_mlflow_uris_use_params_tracking_uri_and_leave_no_download(
    project: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project["params"].parent)  # params.yaml names the store; no env variable
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    uri = f"runs:/{_run_id(project['other'])}/model"
    assert yaml.safe_load(project["params"].read_text())["tracking"]["uri"] == project["store"]

    code, err = _run(["export", "--model_checkpoint", uri, "--output", str(tmp_path / "hf")],
                     capsys)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    code, err = _run(["generate", "--model_checkpoint", uri, "--prompt", "A", "--max_length",
                      "2", "--seed", "1"], capsys)  # fmt: skip
    assert code == 0, err
    code, err = _run(["evaluate", "--model_checkpoint", uri], capsys)
    assert code == 2 and "pass --output FOLDER" in err
    code, err = _run(["evaluate", "--model_checkpoint", uri, "--output", str(tmp_path / "ev")],
                     capsys)  # fmt: skip
    assert code == 0 and (tmp_path / "ev" / "eval.json").is_file(), err
    assert list(temp.iterdir()) == [], "a downloaded model copy was left behind"
