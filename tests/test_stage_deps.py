"""`dvc.yaml` lists exactly the code and config files each stage runs and reads.

The rule (also at the top of dvc.yaml), checked for every stage, `foreach` ones included:

- Code: the stage's import closure (tests/stage_closure.py: static, from its `stages/*.py`
  script through `pipeline/`) is covered by its deps, and every dep under `pipeline/` or
  `stages/` is either a module of the closure or a folder at least 3/4 of whose modules
  (recursively) are in the closure. Finer lists are always allowed; a folder the closure uses
  less is not, so an edit to a module the stage never imports reruns nothing.
- Config files: every repository file named by the value of a param the stage lists (e.g.
  `model.config`) and every file its code names by a literal path is a dep, and every dep under
  `configs/` is one of those. One exception: the train stage lists every
  `configs/deepspeed_*.json`, because `distributed.deepspeed_config` may name any of them and
  DVC cannot take a dep through a param that is null by default.

The last test edits modules in a real DVC repo and reads `dvc status`, to show that DVC sees
the deps the way these rules assume (a file dep and a folder dep).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT
from stage_closure import import_closure, path_literals, python_files
from test_dvc_pipeline import _init_repo, _project_files, _run

FOLDER_SHARE = 3 / 4
"""A folder may stand for its modules when the closure uses at least this share of them."""
DEEPSPEED_JSONS = "configs/deepspeed_*.json"
INTERPOLATION = re.compile(r"\$\{([^}]+)\}")


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value[part]
    return value


def _interpolate(text: str, params: dict[str, Any], key: str | None) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(key) if name == "key" else str(_lookup(params, name))

    return INTERPOLATION.sub(replace, text)


def resolved_stages(root: Path = REPO_ROOT) -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages with `${...}` filled in from params.yaml, `foreach` expanded
    (`prepare@main`, ...): name -> {"cmd", "deps", "params"} (params as dotted names)."""
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    stages: dict[str, dict[str, Any]] = {}
    for name, stage in pipeline["stages"].items():
        if "foreach" in stage:
            items = _lookup(params, INTERPOLATION.fullmatch(stage["foreach"]).group(1))
            instances = [(f"{name}@{key}", stage["do"], key) for key in items]
        else:
            instances = [(name, stage, None)]
        for instance, body, key in instances:
            stages[instance] = {
                "cmd": _interpolate(body["cmd"], params, key),
                "deps": [_interpolate(dep, params, key) for dep in body.get("deps", [])],
                "params": [_interpolate(p, params, key) for p in body.get("params", [])],
            }
    return stages


def _entry_point(cmd: str) -> Path:
    script = next(word for word in cmd.split() if word.startswith("stages/"))
    return Path(script)


def _is_code(dep: Path) -> bool:
    return dep.parts[0] in ("pipeline", "stages")


def _code_problems(deps: list[Path], closure: set[Path]) -> list[str]:
    """What is wrong with a stage's code deps under the rule above (empty: nothing)."""
    problems = []
    covered: set[Path] = set()
    for dep in filter(_is_code, deps):
        if (REPO_ROOT / dep).is_dir():
            modules = python_files(REPO_ROOT, dep)
            used = modules & closure
            if len(used) < FOLDER_SHARE * len(modules):
                problems.append(
                    f"lists folder {dep}, but the stage imports only {len(used)} of its "
                    f"{len(modules)} modules: list {sorted(map(str, used))} instead"
                )
            covered |= modules
        elif dep in closure:
            covered.add(dep)
        else:
            problems.append(f"lists {dep}, which the stage never imports")
    problems += [f"misses {module}" for module in sorted(closure - covered)]
    return problems


def _suggested_code_deps(closure: set[Path]) -> list[str]:
    """Deps that satisfy the rule: folders where allowed (outermost first), files for the rest."""
    chosen: list[Path] = []
    folders = {m.parent for m in closure if m.parent != Path("pipeline") and _is_code(m)}
    for folder in sorted(folders, key=lambda f: len(f.parts)):
        if folder.parts[0] == "stages" or any(folder.is_relative_to(c) for c in chosen):
            continue
        modules = python_files(REPO_ROOT, folder)
        if len(modules & closure) >= FOLDER_SHARE * len(modules):
            chosen.append(folder)
    files = [m for m in closure if not any(m.is_relative_to(c) for c in chosen)]
    return [str(p) for p in sorted(files) + sorted(chosen)]


STAGES = resolved_stages()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_the_stage_import_closure(stage: str) -> None:
    entry = _entry_point(STAGES[stage]["cmd"])
    closure = import_closure(REPO_ROOT, entry)
    deps = [Path(dep) for dep in STAGES[stage]["deps"]]
    problems = _code_problems(deps, closure)
    suggestion = "\n".join(f"      - {dep}" for dep in _suggested_code_deps(closure))
    assert problems == [], (
        f"dvc.yaml stage {stage}:\n"
        + "\n".join(problems)
        + (f"\ncode deps that follow the rule:\n{suggestion}")
    )


def _files_named_by(value: Any) -> set[Path]:
    """Repository files a param value names (strings anywhere inside it)."""
    if isinstance(value, dict):
        return set().union(*map(_files_named_by, value.values()))
    if isinstance(value, list):
        return set().union(*map(_files_named_by, value))
    if (
        isinstance(value, str)
        and not value.startswith(("/", ".."))
        and (REPO_ROOT / value).is_file()
    ):
        return {Path(value)}
    return set()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_config_deps_are_the_files_the_stage_reads(stage: str) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    named = set().union(*(_files_named_by(_lookup(params, p)) for p in STAGES[stage]["params"]))
    closure = import_closure(REPO_ROOT, _entry_point(STAGES[stage]["cmd"]))
    reads = named | path_literals(REPO_ROOT, closure)
    if stage == "train":
        reads |= {p.relative_to(REPO_ROOT) for p in REPO_ROOT.glob(DEEPSPEED_JSONS)}
    deps = {Path(dep) for dep in STAGES[stage]["deps"]}
    assert sorted(reads - deps) == [], f"stage {stage} reads these but does not list them"
    listed_configs = {dep for dep in deps if dep.parts[0] == "configs"}
    assert sorted(listed_configs - reads) == [], f"stage {stage} lists these but never reads them"


def test_the_closure_follows_lazy_and_registry_imports() -> None:
    """The closure sees what the issue found missing: the CLI module the script runs, a module
    imported inside a function or by the model, and a strategy named in a registry string."""
    closure = import_closure(REPO_ROOT, Path("stages/train.py"))
    for module in (
        "pipeline/cli/train.py",
        "pipeline/checkpoint/async_writer.py",
        "pipeline/chunked_loss.py",
        "pipeline/distributed/deepspeed_engine.py",  # only as "pipeline...:DeepSpeedStrategy"
        "pipeline/data/__init__.py",
    ):
        assert Path(module) in closure, module
    # ... and not the `gpt3` group's registry: a stage runs one command, never the group.
    assert Path("pipeline/cli/plan.py") not in closure
    promote = import_closure(REPO_ROOT, Path("stages/promote.py"))
    assert Path("pipeline/training/trainer.py") not in promote


def _dvc_status(root: Path, env: dict[str, str]) -> set[str]:
    """Names of the stages `dvc status` reports as changed."""
    out = subprocess.run(
        ["dvc", "status", "--json"], cwd=root, env=env, capture_output=True, text=True, check=True
    ).stdout
    return set(yaml.safe_load(out) or {})


@pytest.mark.slow
def test_an_edit_to_an_imported_module_makes_dvc_status_report_the_stage(tmp_path: Path) -> None:
    """In a copy of the repo, each stage's outputs are stand-ins recorded with `dvc commit`, so
    `dvc status` is clean without running anything. Then one-line edits: to a module listed as
    a file (`pipeline/chunked_loss.py`, imported by the model) and to a module inside a folder
    dep (`pipeline/registry/candidate.py`); exactly the stages that import them are reported."""
    root = tmp_path / "project"
    for name in _project_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, root / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    _init_repo(root, env)
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    for name, stage in pipeline["stages"].items():
        body = stage.get("do", stage)
        keys = list(_lookup(params, stage["foreach"][2:-1])) if "foreach" in stage else [None]
        for key in keys:
            for entry in [*body.get("outs", []), *body.get("metrics", [])]:
                out = next(iter(entry)) if isinstance(entry, dict) else entry
                path = root / _interpolate(out, params, key)
                if path.suffix:  # a metrics file or samples.md
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}\n" if path.suffix == ".json" else f"{name}\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "stand-in").write_text(f"{name} {key}\n")
    _run(["dvc", "commit", "--force", "--quiet"], root, env)
    assert _dvc_status(root, env) == set(), "dvc commit should leave nothing changed"

    for module, expected in (
        ("pipeline/chunked_loss.py", {"train", "evaluate", "promote"}),
        ("pipeline/registry/candidate.py", {"promote"}),
    ):
        importers = {
            name
            for name, stage in STAGES.items()
            if Path(module) in import_closure(REPO_ROOT, _entry_point(stage["cmd"]))
        }
        assert importers == expected, (module, importers)  # the closure agrees with the edit
        original = (root / module).read_text()
        (root / module).write_text(original + "# a deliberate edit\n")
        assert _dvc_status(root, env) == expected, module
        (root / module).write_text(original)
        assert _dvc_status(root, env) == set(), module
