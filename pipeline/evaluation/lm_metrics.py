"""Language-model metrics on a token stream: loss, perplexity, bits per byte, next-token accuracy.

The stream is cut into non-overlapping windows of `seq_len` inputs; window `i` predicts tokens
`[i*seq_len + 1, (i+1)*seq_len]`, so every target after the first token is scored exactly once
(the last window may be shorter). Non-overlapping windows give each window's first targets
little context, which makes the loss slightly pessimistic next to a sliding window, but it is
what the training loop's validation measures and costs one forward per `seq_len` tokens.

Bits per byte divides the total negative log-likelihood (in bits) by the UTF-8 bytes of the
text the scored tokens came from, so it compares models with different tokenizers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import DataError

AutocastFactory = Callable[[], contextlib.AbstractContextManager]
"""Returns a fresh autocast context (or a null one) for each forward."""


@dataclass(frozen=True)
class LMMetrics:
    """Totals and the figures derived from them; `tokens` counts scored targets."""

    nll_nats: float
    """Summed negative log-likelihood of every scored target, in nats."""
    correct: int
    """Targets that were the model's argmax prediction."""
    tokens: int
    text_bytes: float
    """UTF-8 bytes of the text behind the scored tokens (pro rata of the split)."""

    @property
    def loss(self) -> float:
        return self.nll_nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / self.text_bytes

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens

    def as_dict(self, prefix: str = "val") -> dict[str, float]:
        """Flat metric names for eval.json and MLflow."""
        return {
            f"{prefix}_loss": self.loss,
            f"{prefix}_perplexity": self.perplexity,
            f"{prefix}_bits_per_byte": self.bits_per_byte,
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_tokens": float(self.tokens),
            f"{prefix}_bytes": float(self.text_bytes),
        }


def window_starts(n_targets: int, seq_len: int) -> list[tuple[int, int]]:
    """`(start, length)` of each window covering targets 1..n_targets once."""
    return [(s, min(seq_len, n_targets - s)) for s in range(0, n_targets, seq_len)]


@torch.inference_mode()
def evaluate_tokens(
    model: nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    split_bytes: int,
    max_tokens: int | None = None,
    autocast: AutocastFactory = contextlib.nullcontext,
) -> LMMetrics:
    """Score `tokens` (a whole split, e.g. a memory map) with `model` in batches.

    `max_tokens` caps the scored targets (the first ones of the split). `split_bytes` is the
    UTF-8 size of the whole split's text; the bytes behind the scored part are taken as the
    same fraction of it as the scored targets are of the split's `len(tokens) - 1` targets.
    """
    available = len(tokens) - 1
    if available < 1:
        raise DataError(f"the split has {len(tokens)} token(s); evaluation needs at least 2")
    n_targets = min(available, max_tokens) if max_tokens is not None else available
    device = next(model.parameters()).device
    was_training = model.training
    model.train(False)
    nll, correct = 0.0, 0
    try:
        windows = window_starts(n_targets, seq_len)
        for first in range(0, len(windows), batch_size):
            batch = windows[first : first + batch_size]
            # Windows of one length per forward: only the last window can be shorter.
            for length in sorted({n for _, n in batch}, reverse=True):
                starts = [s for s, n in batch if n == length]
                rows = np.stack([np.asarray(tokens[s : s + length + 1]) for s in starts])
                ids = torch.from_numpy(rows.astype(np.int64)).to(device)
                with autocast():
                    logits, _ = model(ids[:, :-1])
                batch_nll, batch_correct = _score(logits, ids[:, 1:])
                nll += batch_nll
                correct += batch_correct
    finally:
        model.train(was_training)
    text_bytes = split_bytes * n_targets / available
    return LMMetrics(nll_nats=nll, correct=correct, tokens=n_targets, text_bytes=text_bytes)


def _score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed NLL (fp32 softmax, fp64 sum) and argmax hits of one batch."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    nll = F.cross_entropy(flat, targets.reshape(-1), reduction="none").double().sum()
    correct = (flat.argmax(dim=-1) == targets.reshape(-1)).sum()
    return float(nll), int(correct)


def mixture_metrics(
    per_source: dict[str, LMMetrics], weights: dict[str, float]
) -> dict[str, float]:
    """Validation metrics of one source as before; of a mixture, each source's under
    `val_<name>_*` and the headline `val_*` as the weight-averaged loss, bits per byte and
    accuracy (what the training mixture optimises), perplexity from that loss."""
    if len(per_source) == 1:
        return next(iter(per_source.values())).as_dict("val")
    total = sum(weights[name] for name in per_source)
    share = {name: weights[name] / total for name in per_source}
    loss = sum(share[n] * m.loss for n, m in per_source.items())
    metrics = {
        "val_loss": loss,
        "val_perplexity": math.exp(loss) if loss < 700 else math.inf,
        "val_bits_per_byte": sum(share[n] * m.bits_per_byte for n, m in per_source.items()),
        "val_accuracy": sum(share[n] * m.accuracy for n, m in per_source.items()),
        "val_tokens": float(sum(m.tokens for m in per_source.values())),
        "val_bytes": float(sum(m.text_bytes for m in per_source.values())),
    }
    for name, lm in per_source.items():
        metrics.update(lm.as_dict(f"val_{name}"))
    return metrics
