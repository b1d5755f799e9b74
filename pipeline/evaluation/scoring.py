"""Score continuations by log-likelihood: the one primitive every zero-shot task is built on.

A request is a context and a continuation (token ids). Its score is the summed log-probability
of the continuation's tokens given everything before them, and whether greedy decoding would
have produced the continuation exactly (LAMBADA's accuracy). This is how the GPT-3 paper and
EleutherAI's lm-evaluation-harness evaluate multiple choice and cloze tasks zero-shot.

A request longer than the model's context keeps its last `n_ctx + 1` tokens: the context is cut
from the left, and a continuation longer than `n_ctx` is scored on its last `n_ctx` tokens.
Rows of one batch are padded on the right, which a causal model never attends to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.evaluation.lm_metrics import AutocastFactory

PAD_ID = 0
"""Right padding: any valid id works, causal attention never looks right."""


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]
    """At least one token (tasks put the end-of-text id before an empty context)."""
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    loglik: float
    """Summed natural-log probability of the scored continuation tokens."""
    greedy: bool
    """Every scored continuation token was the argmax prediction."""
    tokens: int
    """Continuation tokens scored."""


def _row(request: Request, n_ctx: int) -> tuple[list[int], int]:
    """Input ids and how many of the last targets belong to the continuation."""
    if not request.context or not request.continuation:
        raise ValueError("a request needs a non-empty context and continuation")
    seq = [*request.context, *request.continuation][-(n_ctx + 1) :]
    n_cont = min(len(request.continuation), len(seq) - 1)
    return seq, n_cont


@torch.inference_mode()
def score_requests(
    model: nn.Module,
    requests: Sequence[Request],
    n_ctx: int,
    batch_size: int = 8,
    autocast: AutocastFactory = contextlib.nullcontext,
) -> list[Score]:
    """Score every request, in batches of similar length; results in the requests' order."""
    rows = [_row(r, n_ctx) for r in requests]
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    device = next(model.parameters()).device
    scores: list[Score | None] = [None] * len(rows)
    was_training = model.training
    model.train(False)
    try:
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            width = max(len(rows[i][0]) for i in chunk) - 1
            ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
            for b, i in enumerate(chunk):
                seq = rows[i][0]
                ids[b, : len(seq) - 1] = torch.tensor(seq[:-1])
            with autocast():
                logits, _ = model(ids.to(device))
            for b, i in enumerate(chunk):
                seq, n_cont = rows[i]
                end = len(seq) - 1
                # Only the continuation's positions: the full (B, T, vocab) softmax is large.
                logprobs = torch.log_softmax(logits[b, end - n_cont : end].float(), dim=-1)
                scores[i] = _score_row(logprobs, seq[-n_cont:])
    finally:
        model.train(was_training)
    return [s for s in scores if s is not None]


def _score_row(logprobs: torch.Tensor, targets: list[int]) -> Score:
    target = torch.tensor(targets, device=logprobs.device)
    picked = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return Score(loglik=float(picked.double().sum()), greedy=greedy, tokens=len(targets))
