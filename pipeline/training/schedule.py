"""Learning-rate schedule as a function of tokens seen (GPT-3 schedules by tokens, not steps).

Scheduling by tokens keeps the schedule right when the batch size ramps or the world size
changes, and makes it a pure function of a counter the checkpoint already holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up to `peak`, then cosine decay to `peak * min_ratio` at `decay_tokens`."""

    peak: float
    warmup_tokens: int
    decay_tokens: int
    min_ratio: float

    def __call__(self, tokens_seen: int) -> float:
        if self.warmup_tokens > 0 and tokens_seen < self.warmup_tokens:
            return self.peak * (tokens_seen + 1) / self.warmup_tokens
        floor = self.peak * self.min_ratio
        span = self.decay_tokens - self.warmup_tokens
        if span <= 0 or tokens_seen >= self.decay_tokens:
            return floor
        progress = (tokens_seen - self.warmup_tokens) / span
        return floor + 0.5 * (self.peak - floor) * (1.0 + math.cos(math.pi * progress))
