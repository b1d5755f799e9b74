"""Shared by the evaluation, generation and export tests: a tiny trained run and test models.

The test models are real `nn.Module`s with the GPT forward signature whose predictions are
known exactly, so task metrics can be checked against 1.0 (the oracle) and chance (the
constant model) without trusting a trained network.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_overrides
from torch import nn

from pipeline.config.loader import load_config
from pipeline.config.schema import Config

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def tiny_run(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Config:
    """Train the tiny model once per session (reused by every module that asks) -> its config."""
    run_dir = tmp_path_factory.getbasetemp() / "tiny-eval-run"
    config = load_config(
        overrides=tiny_overrides(
            prepared_dir,
            run_dir,
            {
                "training.max_steps": 16,
                "training.lr": 3e-3,
                "training.decay_tokens": None,
                "evaluation.sample_prompts": ["ROMEO:", ""],
                "evaluation.sample_max_tokens": 8,
            },
        )
    )
    if not (run_dir / "model" / "model.safetensors").is_file():
        from pipeline.training.run import train

        train(config, console=False)
    return config


MLFLOW_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
)
"""Variables `log_to_tracking` sets for its process (setdefault); tests keep them local."""


@pytest.fixture
def mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pre-set MLflow's request variables so a test's settings do not leak into later tests."""
    for name, default in zip(MLFLOW_ENV, ("0", "5", "false"), strict=True):
        monkeypatch.setenv(name, os.environ.get(name, default))


class ConstantLM(nn.Module):
    """Uniform next-token distribution everywhere: every token costs ln(vocab) nats."""

    def __init__(self, vocab_size: int, n_ctx: int = 512) -> None:
        super().__init__()
        self.config = SimpleNamespace(n_ctx=n_ctx)
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the scorers a device

    def forward(self, idx, targets=None, kv_cache=None, start_pos=0, last_only=False):
        assert idx.shape[1] <= self.config.n_ctx, "more positions than the model's context"
        return torch.zeros(*idx.shape, self.vocab_size), None


class OracleLM(ConstantLM):
    """Puts (almost) all probability on the next token of any known sequence it is inside."""

    def __init__(self, sequences: Iterable[Sequence[int]], vocab_size: int, n_ctx: int = 512):
        super().__init__(vocab_size, n_ctx)
        self.next_token: dict[tuple[int, ...], int] = {}
        for seq in sequences:
            for t in range(1, len(seq)):
                self.next_token[tuple(seq[:t])] = seq[t]

    def forward(self, idx, targets=None, kv_cache=None, start_pos=0, last_only=False):
        logits, _ = super().forward(idx)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                token = self.next_token.get(tuple(row[: t + 1]))
                if token is not None:
                    logits[b, t, token] = 40.0
        return logits, None
