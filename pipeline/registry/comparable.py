"""Promotion compares like with like, or leaves the champion where it is.

A validation loss means something only next to another measured the same way: on the same
validation tokens (the data hash, which also changes with the tokenizer's output), with the
same tokenizer (a loss per token over 333 tokens is not one over 4096), and with the same
evaluation settings (the evaluate stage's token budget and benchmarks, or the training run's
own val/loss over `training.eval_iters` batches). Each registered version carries these three
as tags; a candidate whose tags differ from the champion's, or a champion without them
(registered before they existed), cannot take the champion alias without `--force`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.config.schema import EvaluationConfig
from pipeline.registry.candidate import DATA_HASH_TAG, Candidate

TOKENIZER_TAG = "tokenizer.sha256"
EVALUATION_TAG = "evaluation.settings"
META_FILE = "meta.json"


def tokenizer_fingerprint(model_dir: Path) -> str | None:
    """sha256 of the model folder's tokenizer description (meta.json's `tokenizer` entry) and
    of the file it names; None when the folder has no meta.json."""
    meta_file = model_dir / META_FILE
    if not meta_file.is_file():
        return None
    entry = json.loads(meta_file.read_text()).get("tokenizer") or {}
    entry = {k: v for k, v in entry.items() if k != "vocab_size_requested"}  # what came out
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode())
    name = entry.get("file")
    if isinstance(name, str) and (model_dir / name).is_file():
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()


def evaluation_settings(candidate: Candidate, evaluation: EvaluationConfig) -> str:
    """The settings the candidate's metrics were measured with, as canonical JSON."""
    if candidate.from_eval_file:
        settings = {
            "measured_by": "evaluate stage",
            "max_tokens": evaluation.max_tokens,
            "benchmarks": sorted(evaluation.benchmarks),
            "benchmark_limit": evaluation.benchmark_limit,
        }
    else:
        settings = {"measured_by": "training run", "eval_iters": candidate.eval_iters}
    return json.dumps(settings, sort_keys=True)


def comparison_tags(
    candidate: Candidate, evaluation: EvaluationConfig, model_dir: Path
) -> dict[str, str]:
    """The tags a version carries so later promotions can compare against it."""
    values = {
        DATA_HASH_TAG: candidate.data_hash,
        TOKENIZER_TAG: tokenizer_fingerprint(model_dir),
        EVALUATION_TAG: evaluation_settings(candidate, evaluation),
    }
    return {key: value for key, value in values.items() if value}


def differences(mine: dict[str, str], champion_tags: dict[str, str]) -> list[str]:
    """What makes the two incomparable, one phrase each (empty: comparable)."""
    labels = {
        DATA_HASH_TAG: "validation data (data hash)",
        TOKENIZER_TAG: "tokenizer",
        EVALUATION_TAG: "evaluation settings",
    }
    found = []
    for tag, label in labels.items():
        theirs, ours = champion_tags.get(tag), mine.get(tag)
        if theirs is None or ours is None:
            side = "the champion" if theirs is None else "this run"
            found.append(f"{side} records no {label}")
        elif theirs != ours:
            width = None if tag == EVALUATION_TAG else 12  # hashes: a prefix is enough to tell
            found.append(f"other {label}: {ours[:width]} vs the champion's {theirs[:width]}")
    return found
