"""Solve micro-batch x accumulation x world size from the run's global batch.

The global batch (in tokens or sequences) is a property of the run, not of the hardware: the
same config trains the same way on 1 CPU or 64 GPUs, only the accumulation changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.schema import TrainingConfig
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split across ranks and micro-steps."""

    global_sequences: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    seq_len: int

    @property
    def global_tokens(self) -> int:
        return self.global_sequences * self.seq_len

    @property
    def sequences_per_rank(self) -> int:
        return self.micro_batch_size * self.accumulation_steps


def global_batch_sequences(training: TrainingConfig, seq_len: int) -> int:
    """The full global batch in sequences (global_batch_size wins over global_batch_tokens)."""
    if training.global_batch_size is not None:
        return training.global_batch_size
    assert training.global_batch_tokens is not None  # guaranteed by the schema
    if training.global_batch_tokens % seq_len != 0:
        raise ConfigError(
            f"training.global_batch_tokens ({training.global_batch_tokens}) is not a multiple of "
            f"the sequence length ({seq_len})"
        )
    return training.global_batch_tokens // seq_len


def plan_batch(
    global_sequences: int, micro_batch_size: int, world_size: int, seq_len: int
) -> BatchPlan:
    """Split a global batch; an impossible split is a ConfigError that says what would work."""
    per_step = micro_batch_size * world_size
    if global_sequences % per_step != 0:
        raise ConfigError(
            f"global batch of {global_sequences} sequences cannot be split into micro-batches of "
            f"{micro_batch_size} on {world_size} rank(s): it must be a multiple of {per_step} "
            "(change training.micro_batch_size or the global batch)"
        )
    return BatchPlan(
        global_sequences=global_sequences,
        micro_batch_size=micro_batch_size,
        accumulation_steps=global_sequences // per_step,
        world_size=world_size,
        seq_len=seq_len,
    )


def ramped_sequences(
    training: TrainingConfig, full: int, tokens_seen: int, quantum: int, seq_len: int
) -> int:
    """GPT-3's batch ramp: grow linearly from `start_tokens` to `full`, rounded to `quantum`.

    `quantum` is micro_batch_size * world_size, so every ramped batch still splits evenly.
    """
    ramp = training.batch_ramp
    if ramp is None or tokens_seen >= ramp.ramp_tokens:
        return full
    start = max(ramp.start_tokens // seq_len, 1)
    frac = tokens_seen / ramp.ramp_tokens
    sequences = start + (full - start) * frac
    rounded = max(quantum, int(sequences) // quantum * quantum)
    return min(rounded, full)
