"""Runs stay where they belong and delete nothing they did not make (issue 18, item 3).

`--set name=../../elsewhere` once wrote a run outside the project and deleted an existing
`elsewhere/model/`. Now a name or path that escapes is one error line before anything is
written, and a model folder the pipeline did not write is moved aside, never deleted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import set_args, tiny_overrides, train_cli

from pipeline.config.loader import load_config
from pipeline.errors import ConfigError
from pipeline.training.run import train


def test_a_name_that_escapes_output_root_is_refused_before_anything_is_written(
    prepared_dir: Path, tmp_path: Path
) -> None:
    project = tmp_path / "a" / "project"
    project.mkdir(parents=True)
    victim = tmp_path / "elsewhere" / "model"
    victim.mkdir(parents=True)
    (victim / "notes.txt").write_text("mine")
    overrides = tiny_overrides(prepared_dir, project / "unused", {"training.max_steps": 1})
    overrides.pop("output_dir")
    args = [*set_args(overrides), "--set", "name=../../elsewhere"]
    proc = train_cli(args, project)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, output
    assert output.strip().splitlines()[-1].startswith("error: invalid config: name: name ")
    assert "Traceback" not in output
    assert list(project.iterdir()) == [], "something was written"
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["model"]
    assert (victim / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"name": ".."}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": "a\\b"}, "name"),
        ({"output_root": "../outside"}, "output_root"),
        ({"output_dir": "runs/../../outside"}, "output_dir"),
    ],
)
def test_escaping_names_and_paths_are_config_errors(overrides: dict, key: str) -> None:
    base = {"training.max_steps": 1, "training.global_batch_size": 8}
    with pytest.raises(ConfigError, match=rf"^invalid config: {key}: "):
        load_config(overrides={**base, **overrides})
    # An explicit absolute place, or a name that only labels a run with an output_dir, is fine.
    load_config(overrides={**base, "output_dir": "/tmp/elsewhere", "name": "a/b"})
    load_config(overrides={**base, "output_root": "/tmp/runs", "name": "run-1.b"})


def test_a_model_folder_not_written_by_the_pipeline_is_moved_aside(
    prepared_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = load_config(overrides=tiny_overrides(prepared_dir, run_dir, {"training.max_steps": 2}))
    foreign = run_dir / "model"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("a folder someone else put here")
    train(config, console=False)
    assert (run_dir / "model" / "model.safetensors").is_file()
    (aside,) = run_dir.glob("model.previous-*")
    assert (aside / "notes.txt").read_text() == "a folder someone else put here"
    assert f"moved to {aside}" in (run_dir / "logs" / "training.log").read_text()

    # The pipeline's own unchanged folder is replaced; one that was edited is kept aside.
    train(config, resume="auto", console=False)
    assert len(list(run_dir.glob("model.previous-*"))) == 1
    with open(run_dir / "model" / "config.yaml", "a") as handle:
        handle.write("# edited by hand\n")
    train(config, resume="auto", console=False)
    edited = [p for p in run_dir.glob("model.previous-*") if p != aside]
    assert len(edited) == 1 and "# edited by hand" in (edited[0] / "config.yaml").read_text()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".model")], "temporaries left"
