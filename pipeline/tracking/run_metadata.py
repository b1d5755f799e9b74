"""What an MLflow run says about itself: its name, tags that link it to git and DVC, its params.

The tags make either side lead to the other: from a DVC experiment to its MLflow run
(`dvc.exp_name`), from an MLflow run to the code (`git.commit`, `git.dirty`, and
`git.uncommitted`: a fingerprint of the uncommitted code changes, which `gpt3 rerun` compares)
and the data (`data.hash`). Params are the flattened resolved config with stable dotted keys,
so runs line up column by column in the UI's compare view. A data mixture also gets one column
per source weight (`data.sources.<name>.weight`; `data.sources` itself is one JSON value) and a
`data.mixture` tag with the normalised shares, readable at a glance in the runs list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from pipeline.config.loader import flatten_config
from pipeline.config.schema import Config
from pipeline.hashing import file_sha256

logger = logging.getLogger("pipeline.tracking")

MAX_PARAM_VALUE = 6000
"""MLflow's limit on a param value (`mlflow.utils.validation.MAX_PARAM_VAL_LENGTH`)."""
MAX_TAG_VALUE = 8000
TRUNCATED = "...[truncated]"
GIT_TIMEOUT_S = 5.0
UNCOMMITTED_EXCLUDED = ("params.yaml", "dvc.lock")
HASHED_CHANGE_BYTES = 16 << 20
"""A changed or untracked file larger than this counts by its size, so that a big data file
left untracked does not make every run's start hash it (code files are far smaller)."""


def run_name(config: Config) -> str:
    """`DVC_EXP_NAME` under `dvc exp run`, else the run directory's name."""
    return os.environ.get("DVC_EXP_NAME") or Path(config.run_dir).resolve().name


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_head(where: Path | None = None) -> str | None:
    """The commit checked out at `where` (the working directory); None outside a repository."""
    return _git(["rev-parse", "HEAD"], where or Path.cwd())


def _git_names(args: list[str], cwd: Path) -> list[str] | None:
    """The NUL-separated path names a git command prints (None when it fails)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return [name for name in os.fsdecode(done.stdout).split("\0") if name]


def uncommitted_changes(where: Path) -> str | None:
    """A fingerprint of the code's uncommitted changes: `none` when there are none, else a
    SHA-256 over each changed or untracked (not ignored) file's path and content (its size, past
    `HASHED_CHANGE_BYTES`); None when git cannot tell.

    Content, not `git diff` text, so the fingerprint does not depend on anyone's git config.
    `UNCOMMITTED_EXCLUDED` files do not count: under `dvc exp run` params.yaml holds the
    experiment's values (which resolved_config.yaml records) and dvc.lock the stages' hashes.
    """
    top_text = _git(["rev-parse", "--show-toplevel"], where)
    if not top_text:
        return None
    top = Path(top_text)
    excluded = [f":(top,exclude){name}" for name in UNCOMMITTED_EXCLUDED]
    changed = _git_names(
        ["diff", "HEAD", "--name-only", "--no-renames", "-z", "--", *excluded], top
    )
    untracked = _git_names(
        ["ls-files", "--others", "--exclude-standard", "-z", "--", *excluded], top
    )
    if changed is None or untracked is None:
        return None
    names = sorted(set(changed) | set(untracked))
    if not names:
        return "none"
    digest = hashlib.sha256()
    for name in names:
        path = top / name
        try:
            if not path.is_file():
                content = "absent"
            elif path.stat().st_size > HASHED_CHANGE_BYTES:  # data left untracked, not code
                content = f"size {path.stat().st_size}"
            else:
                content = file_sha256(path)
        except OSError as exc:
            content = f"unreadable ({exc.strerror})"
        digest.update(os.fsencode(f"{name}\0{content}\n"))
    return digest.hexdigest()


def git_state(cwd: Path | None = None) -> dict[str, str]:
    """Commit, dirty flag and uncommitted-changes fingerprint of the code that runs; empty
    (logged, not raised) outside a repo.

    The working directory is asked, not `DVC_ROOT`: under `dvc exp run --temp` the code that
    runs is the throwaway copy, whose state is the experiment's.
    """
    where = cwd or Path.cwd()
    commit = git_head(where)
    if not commit:
        logger.info("no git commit tag: %s is not in a git repository (or git is missing)", where)
        return {}
    status = _git(["status", "--porcelain"], where)
    tags = {"git.commit": commit, "mlflow.source.git.commit": commit}
    if status is not None:
        tags["git.dirty"] = "true" if status else "false"
    changes = uncommitted_changes(where)
    if changes is not None:
        tags["git.uncommitted"] = changes
    return tags


def run_tags(
    config: Config, data_hash: str | None, world_size: int, strategy: str
) -> dict[str, str]:
    """The run's tags (see the module docstring)."""
    tags = {
        **git_state(),
        "model.size": config.model.name,
        "training.precision": config.training.precision,
        "distributed.world_size": str(world_size),
        "distributed.strategy": strategy,
        "run_dir": str(Path(config.run_dir).resolve()),
    }
    if data_hash:
        tags["data.hash"] = data_hash
    if config.data.sources:
        total = sum(source.weight for source in config.data.sources.values())
        tags["data.mixture"] = ",".join(
            f"{name}:{source.weight / total:.4g}" for name, source in config.data.sources.items()
        )
    for variable, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"),
    ):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return {key: truncate(value, MAX_TAG_VALUE) for key, value in tags.items()}


def truncate(value: str, limit: int) -> str:
    """`value` cut to `limit` characters, marked so nobody mistakes it for the whole value."""
    return value if len(value) <= limit else value[: limit - len(TRUNCATED)] + TRUNCATED


def param_value(value: Any) -> str:
    """One param as text: JSON for lists and mappings (stable, readable), str otherwise."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return truncate(text, MAX_PARAM_VALUE)


def run_params(config: Config) -> dict[str, str]:
    """The flattened resolved config, every value a string within MLflow's length limit."""
    params = {key: param_value(value) for key, value in flatten_config(config).items()}
    for name, source in config.data.sources.items():
        key = re.sub(r"\.{2,}", lambda match: "_" * len(match.group()), name)  # MLflow: no ".."
        params[f"data.sources.{key}.weight"] = param_value(source.weight)
    return params
