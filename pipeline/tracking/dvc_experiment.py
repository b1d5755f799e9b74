"""From an MLflow run back to a DVC experiment: `dvc exp apply`, or a `dvc exp run -S ...` line.

A run trained by `dvc exp run` carries the experiment's name (`dvc.exp_name`, see
`run_metadata`). While the experiment exists, `dvc exp apply <name>` brings it back into the
workspace. When it is gone (deleted, garbage-collected, never pulled), or the run never was a
DVC experiment, the experiment is made again from the run's resolved config: `dvc exp run`
with one `-S` per value that this checkout's params.yaml would otherwise get wrong.

How the `-S` values are chosen, so that params.yaml after them resolves to the run's config:
1. the record's `model.config`/`training.config` files are taken first (they are the layers
   below params.yaml; a value not given with `-S` comes from them);
2. every leaf of the record that differs from that resolution is set: `key=value` when
   params.yaml has the key, `+key=value` (Hydra's "add") when it does not;
3. a mapping entry params.yaml has and the record does not (a data source) is deleted with
   `~key`.
Values are written in Hydra's override grammar (what `dvc exp run -S` parses) and quoted for a
POSIX shell. Not carried over: `output_dir` (a DVC run writes to `<output_root>/<name>`, which
its stages' outputs name), `tracking.uri` (the environment's store decides) and values that
were redacted (`***`, a password).
"""

from __future__ import annotations

import copy
import math
import shlex
import subprocess
from pathlib import Path
from typing import Any

from pipeline.config.layers import Layer, deep_merge, resolve
from pipeline.config.loader import load_config
from pipeline.config.output import public_values
from pipeline.config.yaml_reader import read_yaml_mapping
from pipeline.errors import ConfigError
from pipeline.redact import has_redacted_secret

NOT_CARRIED = ("output_dir", "tracking.uri")
FILE_SECTIONS = ("model", "training")
FILE_KEYS = tuple(f"{section}.config" for section in FILE_SECTIONS)
_MISSING = object()


def leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a nested mapping (lists and scalars are leaves; `{}` has none)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _lookup(values: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return _MISSING
        values = values[part]
    return values


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar (YAML-like: null, true, 3e-4, 'text', [a,b], {k:v})."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else "inf")
    if isinstance(value, str):
        if "'" not in value:
            return f"'{value}'"
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"no Hydra form for {type(value).__name__}")


def _without_file_keys(params: dict[str, Any]) -> dict[str, Any]:
    return {
        section: {k: v for k, v in content.items() if k != "config"}
        if section in FILE_SECTIONS and isinstance(content, dict)
        else content
        for section, content in params.items()
    }


def _files(params: dict[str, Any]) -> dict[str, str | None]:
    named = {section: _lookup(params, f"{section}.config") for section in FILE_SECTIONS}
    return {
        section: (None if value is _MISSING else value) or None for section, value in named.items()
    }


def _resolution(params: dict[str, Any]) -> dict[str, Any]:
    """Leaves of the config DVC trains with `params` as params.yaml (ConfigError if invalid)."""
    files = _files(params)
    config = load_config(
        model_config=files["model"],
        training_config=files["training"],
        overrides=_without_file_keys(params),  # the top layer: merges as params.yaml's does
    )
    return leaves(public_values(config))


def _explicit(params: dict[str, Any]) -> dict[str, Any]:
    """Leaves that `params` or the config files it names set themselves (no defaults)."""
    merged: dict[str, Any] = {}
    for path in _files(params).values():
        if path is not None:
            merged = deep_merge(merged, read_yaml_mapping(path))
    return leaves(deep_merge(merged, _without_file_keys(params)))


def _applied(raw: dict[str, Any], sets: dict[str, Any], deletions: set[str]) -> dict[str, Any]:
    """`raw` after `~key` deletions and `key=value` sets (what DVC's -S does to params.yaml)."""
    out = copy.deepcopy(raw)
    for key in deletions:
        *parents, leaf = key.split(".")
        node = _lookup(out, ".".join(parents)) if parents else out
        if isinstance(node, dict):
            node.pop(leaf, None)
    for key, value in sets.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    return out


def param_overrides(record: dict[str, Any], params_file: Path) -> tuple[list[str], list[str]]:
    """(the `-S` overrides that make `params_file` resolve to `record`, keys left out).

    Each round resolves params.yaml with the overrides so far and adds what still differs; a
    round that cannot resolve (the run's config files leave a section incomplete) sets every
    value that params.yaml and those files do not set themselves. The last round must match.
    """
    raw = read_yaml_mapping(params_file)
    target = leaves(public_values(resolve([Layer("record", record)])))  # every key, validated
    left_out = [
        key
        for key, value in target.items()
        if key in NOT_CARRIED or (isinstance(value, str) and has_redacted_secret(value))
    ]
    wanted = {key: value for key, value in target.items() if key not in left_out}
    sets = {key: wanted[key] for key in FILE_KEYS if _files(raw)[key.split(".")[0]] != wanted[key]}
    deletions: set[str] = set()
    problem = ""
    for _ in range(4):
        params = _applied(raw, sets, deletions)
        try:
            current = _resolution(params)
        except ConfigError as exc:
            problem = str(exc)
            explicit = _explicit(params)
            sets.update({k: v for k, v in wanted.items() if explicit.get(k, _MISSING) != v})
            continue
        differing = {k: v for k, v in wanted.items() if current.get(k, _MISSING) != v}
        extra = {_first_missing(key, target) for key in current if key not in target}
        stuck = sorted(key for key in extra if _lookup(raw, key) is _MISSING)
        if not differing and extra <= deletions | set(stuck):
            left_out += [
                f"~{key} (set in a config file, not in {params_file.name})" for key in stuck
            ]
            return _as_flags(raw, sets, deletions), left_out
        sets.update(differing)
        deletions |= extra - set(stuck)
    raise ConfigError(
        f"{params_file}: cannot express the run's config as -S values for it"
        + (f" ({problem})" if problem else "")
    )


def _first_missing(key: str, target: dict[str, Any]) -> str:
    """The shortest prefix of `key` that the record does not have (the entry to delete)."""
    parts = key.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if not any(t == prefix or t.startswith(prefix + ".") for t in target):
            return prefix
    return key


def _as_flags(raw: dict[str, Any], sets: dict[str, Any], deletions: set[str]) -> list[str]:
    """Hydra overrides: `~key`, then `key=value` (`+key=value` where params.yaml lacks it)."""
    flags = [f"~{key}" for key in sorted(deletions)]
    for key, value in sets.items():
        present = _lookup(raw, key) is not _MISSING
        flags.append(f"{'' if present else '+'}{key}={hydra_value(value)}")
    return flags


def experiment_exists(name: str, cwd: Path | None = None) -> bool:
    """Does this repository hold a DVC experiment named `name` (a ref under refs/exps/)?"""
    try:
        done = subprocess.run(
            ["git", "for-each-ref", "--format=%(refname)", "refs/exps/"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and any(
        line.rsplit("/", 1)[-1] == name for line in done.stdout.splitlines()
    )


def recreate_lines(
    run_id: str, tags: dict[str, str], record: dict[str, Any], params_file: Path, head: str | None
) -> list[str]:
    """What `gpt3 dvc-exp` prints: comments (`#`) and the shell commands to run."""
    name = tags.get("dvc.exp_name")
    commit = tags.get("git.commit")
    overrides, left_out = param_overrides(record, params_file)
    lines = [f"# MLflow run {run_id}" + (f": DVC experiment {name!r}" if name else "")]
    if commit and head and commit != head:
        lines.append(f"# trained at commit {commit[:12]}; this checkout is at {head[:12]}:")
        lines.append(f"git checkout {commit}")
    elif not commit:
        lines.append("# (the run records no git commit: the code may differ)")
    exists = bool(name) and experiment_exists(name)
    if name and exists:
        lines.append("# the experiment is in this repository; bring it into the workspace:")
        lines.append(f"dvc exp apply {shlex.quote(name)}")
        lines.append("# or run it again from the run's params:")
    elif name:
        lines.append(
            f"# the experiment is not in this repository (deleted, or not pulled: dvc exp pull "
            f"<remote> {name}); run it again from the run's params:"
        )
    else:
        lines.append("# not a DVC experiment (no dvc.exp_name tag); run its params as one:")
    command = ["dvc", "exp", "run"]
    if name and not exists:
        command += ["-n", name]
    for override in overrides:
        command += ["-S", override]
    lines.append(shlex.join(command))
    if left_out:
        lines.append(f"# not carried over: {', '.join(left_out)}")
    return lines
