"""`gpt3 remote`: params.yaml's `storage` section becomes the default DVC remote, and only that.

A real DVC repository and the real `gpt3` and `dvc` commands; the push and a colleague's pull
are tested end to end in test_dvc_pipeline.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

GPT3 = str(Path(sys.executable).parent / "gpt3")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env.update(DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """params.yaml and the config files it names, in a fresh DVC repository (no git needed)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO_ROOT / "configs", root / "configs")
    assert _run(["dvc", "init", "--no-scm", "-q"], root).returncode == 0
    return root


def _remotes(root: Path) -> tuple[dict[str, str], str]:
    """({remote: resolved url}, the default remote), as DVC reads its config."""
    listed = _run(["dvc", "remote", "list"], root)
    default = _run(["dvc", "config", "core.remote"], root)
    assert listed.returncode == 0 and default.returncode == 0, listed.stderr + default.stderr
    words = [w for w in listed.stdout.split() if w != "(default)"]  # it wraps long lines
    return dict(zip(words[::2], words[1::2], strict=True)), default.stdout.strip()


def test_the_default_remote_comes_from_params(repo: Path) -> None:
    done = _run([GPT3, "remote"], repo)
    assert done.returncode == 0, done.stderr
    # The default url is relative to params.yaml's folder: a folder beside the repository.
    assert _remotes(repo) == ({"local": str(repo.parent / "gpt3-dvc-storage")}, "local")
    config = (repo / ".dvc" / "config").read_text()
    assert _run([GPT3, "remote"], repo).returncode == 0
    assert (repo / ".dvc" / "config").read_text() == config, "a second run changes nothing"

    shared = repo.parent / "shared"
    flags = ["--set", "storage.remote=team", "--set", f"storage.url={shared}"]
    assert _run([GPT3, "remote", *flags], repo).returncode == 0
    remotes, default = _remotes(repo)
    assert (remotes["team"], default) == (str(shared), "team")


def test_bad_settings_and_places_are_one_line_errors(repo: Path, tmp_path: Path) -> None:
    bad = _run([GPT3, "remote", "--set", "storage.remote=a/b"], repo)
    assert bad.returncode == 2 and "storage.remote" in bad.stderr, bad.stderr
    plain = tmp_path / "not-dvc"
    shutil.copytree(repo, plain, ignore=shutil.ignore_patterns(".dvc"))
    outside = _run([GPT3, "remote"], plain)
    assert outside.returncode == 2 and "not inside a dvc repo" in outside.stderr.lower()
    assert len(outside.stderr.strip().splitlines()) == 1, outside.stderr
