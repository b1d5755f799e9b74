"""Tests that catch what they claim (issue 18, item 9): two mutations of the trainer that every
earlier test let through now fail here.

- Dropping the fp16 loss-scaler restore on resume: an fp16 run whose loss scale has changed is
  resumed from a real checkpoint; every later step's loss scale (and loss, LR, gradient norm)
  must equal the uninterrupted run's, and so must the scaler's saved state.
- Shifting the learning rate by one step: each step's logged LR is checked against the
  warm-up/cosine formula written out here, from the tokens seen before that step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides

from pipeline.config.loader import load_config
from pipeline.training.trainer import Trainer

KEYS = ("train/loss", "train/lr", "train/grad_norm", "train/loss_scale")


class Recorder:
    """A tracker keeping each step's numbers as `float.hex` (exact comparison)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, str]] = {}

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if "train/loss" in metrics:
            self.steps[step] = {key: float(metrics[key]).hex() for key in KEYS}


def test_fp16_resume_after_the_loss_scale_changed(prepared_dir: Path, tmp_path: Path) -> None:
    extra = {"training.precision": "fp16", "training.max_steps": 6,
             "training.checkpoint_interval": 3, "training.keep_checkpoints": 3}  # fmt: skip
    reference = Trainer(load_config(overrides=tiny_overrides(prepared_dir, tmp_path / "a", extra)))
    # A scale that grows after every good step (and halves on an overflow): it changes at once.
    reference.parts.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10,
                                                            growth_interval=1)  # fmt: skip
    full = Recorder()
    reference.fit(full)
    scales = [float.fromhex(full.steps[step]["train/loss_scale"]) for step in (1, 2, 3, 4)]
    assert len(set(scales)) > 1, f"the loss scale never changed: {scales}"

    resumed = Trainer(load_config(overrides=tiny_overrides(prepared_dir, tmp_path / "b", extra)))
    assert resumed.parts.precision.loss_scale() == 2.0**16  # the default, before the resume
    resumed.resume(tmp_path / "a" / "checkpoints" / "step_0000003.pt")
    rest = Recorder()
    resumed.fit(rest)
    assert rest.steps == {step: full.steps[step] for step in (4, 5, 6)}
    a, b = (torch.load(tmp_path / run / "checkpoints" / "latest_checkpoint.pt", weights_only=True)
            for run in ("a", "b"))  # fmt: skip
    assert a["scaler"] == b["scaler"], "the saved scaler states differ"
    assert a["scaler"]["scale"] == float.fromhex(full.steps[6]["train/loss_scale"])


def _expected_lr(tokens: int, peak: float, warmup: int, decay: int, ratio: float) -> float:
    """GPT-3's schedule by tokens: linear warm-up, cosine to peak * ratio at `decay`."""
    if tokens < warmup:
        return peak * (tokens + 1) / warmup
    floor = peak * ratio
    if tokens >= decay:
        return floor
    progress = (tokens - warmup) / (decay - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def test_each_steps_lr_is_the_warmup_cosine_formula(prepared_dir: Path, tmp_path: Path) -> None:
    tokens_per_step = 8 * 64  # tiny_overrides: 8 sequences of 64 tokens
    peak, ratio = 1e-3, 0.1
    extra = {"training.max_steps": 12, "training.lr": peak, "training.min_lr_ratio": ratio,
             "training.warmup_tokens": 3 * tokens_per_step,
             "training.decay_tokens": 10 * tokens_per_step}  # fmt: skip
    trainer = Trainer(load_config(overrides=tiny_overrides(prepared_dir, tmp_path, extra)))
    recorder = Recorder()
    trainer.fit(recorder)
    assert sorted(recorder.steps) == list(range(1, 13))
    for step, numbers in recorder.steps.items():
        before = (step - 1) * tokens_per_step  # the LR of a step follows the tokens before it
        want = _expected_lr(before, peak, 3 * tokens_per_step, 10 * tokens_per_step, ratio)
        assert float.fromhex(numbers["train/lr"]) == pytest.approx(want, rel=1e-12), step
