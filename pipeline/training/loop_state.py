"""The trainer's own named states in a checkpoint (everything but model, optimizer and scaler),
and the checks a checkpoint must pass before any of it is restored.

Kept apart from the loop so that the non-finite policy, auto-resume and the strategies' stores
can read the same definitions without importing the trainer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.schema import Config
from pipeline.errors import CheckpointError
from pipeline.rng import restore_rng_state

logger = logging.getLogger("pipeline.train")

CHECKPOINT_FORMAT = 1


@dataclass
class Progress:
    """The loop's own counters; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    """Steps whose update was dropped: fp16 overflow or non-finite gradients."""
    nonfinite_steps: int = 0


LOOP_STATE = {
    "sampler": dict,
    "progress": dict,
    "rng": dict,
    "config": dict,
    "data": dict,
}
"""Keys of the loop state and their types: checked before anything is restored from it."""


def check_loop_state(state: Any, source: Path) -> None:
    """A checkpoint's loop state has the shape this trainer writes; else a CheckpointError.

    A file can verify against its checksum and load weights-only and still not be one of ours
    (or be one whose keys were edited): that must be a one-line error, never a KeyError.
    """
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source}: not a training checkpoint of format {CHECKPOINT_FORMAT}")
    bad = [key for key, kind in LOOP_STATE.items() if not isinstance(state.get(key), kind)]
    if not bad and not isinstance(state["config"].get("model"), dict):
        bad.append("config.model")
    if bad:
        raise CheckpointError(f"{source}: damaged training checkpoint (bad {', '.join(bad)})")


def check_compatible(
    state: dict[str, Any], config: Config, vocab_size: int, tokenizer_id: str, source: Path
) -> None:
    """A checkpoint must match the model's shape and the tokenizer; the error names the mismatch."""
    check_loop_state(state, source)
    saved_model = state["config"]["model"]
    mismatches = [
        f"model.{key}: checkpoint {saved_model.get(key)} != config {getattr(config.model, key)}"
        for key in ("n_layer", "d_model", "n_head", "d_head", "d_ff", "n_ctx")
        if saved_model.get(key) != getattr(config.model, key)
    ]
    data = state.get("data", {})
    if data.get("vocab_size") != vocab_size:
        mismatches.append(f"vocab_size: checkpoint {data.get('vocab_size')} != data {vocab_size}")
    if data.get("tokenizer") != tokenizer_id:
        mismatches.append(f"tokenizer: checkpoint {data.get('tokenizer')} != data {tokenizer_id}")
    if mismatches:
        raise CheckpointError(f"{source} does not match this run: " + "; ".join(mismatches))


def restore_rank_rng(state: dict[str, Any], rank: int, world_size: int) -> None:
    """Restore this rank's own RNG state from a checkpoint that holds every rank's."""
    ranks = state.get("rng_ranks")
    if ranks is None:
        if world_size > 1:
            logger.warning("the checkpoint holds one RNG state; every rank restores it")
        return
    if len(ranks) != world_size:
        logger.warning(
            "the checkpoint has RNG states of %d rank(s), this run has %d: random draws "
            "(dropout) will not match the original run",
            len(ranks),
            world_size,
        )
    restore_rng_state(ranks[rank % len(ranks)])
