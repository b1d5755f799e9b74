"""Seeded per-document keys, and choosing documents by them without holding the corpus.

Every document gets two 64-bit keys from the seed and the sha256 of its text: `split` decides
train or validation, `sample` decides whether the BPE learns from it. A document's place in
the corpus (`position`) breaks ties between identical texts. Choices are "the documents with
the smallest (key, position) up to a count or a byte budget": they depend only on the texts,
the seed and the order of the inputs, never on how the work was spread, and are found from
per-task key files in two bounded passes (a histogram of the keys' top bits, then an exact
sort of the one bucket where the limit falls).

The split matches the pipeline's earlier in-memory split, which ranked documents by
sha256(seed, document hash) and sent the first round(n * val_fraction) to validation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

KEY_DTYPE = np.dtype([("split", "<u8"), ("sample", "<u8"), ("bytes", "<u8")])
"""One record per non-empty document, in corpus order, in each task's key file."""

BUCKET_BITS = 16
ALL = (np.iinfo(np.uint64).max, np.iinfo(np.uint64).max)
"""A cut that includes every document."""
NONE = (0, -1)
"""A cut that includes no document (positions are never negative)."""

Cut = tuple[int, int]
"""(key, position): a document is chosen when its (key, position) <= the cut."""


def _prefix(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big")


def split_key(seed: int, doc_sha256: str) -> int:
    """The first 8 bytes of the earlier ranking hash, sha256(f"{seed}:" + hex digest)."""
    return _prefix(hashlib.sha256(f"{seed}:{doc_sha256}".encode()).digest())


def sample_key(seed: int, doc_sha256: str) -> int:
    """Independent of the split key, so the tokenizer sample is a fair draw of train documents."""
    return _prefix(hashlib.sha256(f"tokenizer-sample:{seed}:{doc_sha256}".encode()).digest())


def val_count(documents: int, val_fraction: float) -> int:
    """Validation documents: round(n * fraction), at least one on each side."""
    return min(documents - 1, max(1, int(documents * val_fraction + 0.5)))


def chosen(keys: np.ndarray, positions: np.ndarray, cut: Cut) -> np.ndarray:
    """Mask of (key, position) <= cut, elementwise."""
    key, position = np.uint64(cut[0]), cut[1]
    if position < 0:
        return keys < key
    return (keys < key) | ((keys == key) & (positions <= np.uint64(position)))


@dataclass(frozen=True)
class KeyChunk:
    """One task's documents: keys, corpus positions and weights (0 leaves a document out)."""

    keys: np.ndarray
    positions: np.ndarray
    weights: np.ndarray


def smallest_within(chunks: Callable[[], Iterable[KeyChunk]], budget: int) -> Cut:
    """The cut choosing the longest run of smallest (key, position) whose weights sum <= budget.

    `chunks` is called twice (two passes); each call yields the same chunks. Zero-weight
    documents never count and never matter.
    """
    buckets = np.zeros(1 << BUCKET_BITS, dtype=np.int64)
    for chunk in chunks():
        top = (chunk.keys >> np.uint64(64 - BUCKET_BITS)).astype(np.int64)
        buckets += np.bincount(top, weights=chunk.weights, minlength=len(buckets)).astype(np.int64)
    totals = np.cumsum(buckets)
    if totals[-1] <= budget:
        return ALL
    bucket = int(np.searchsorted(totals, budget, side="right"))
    before = int(totals[bucket - 1]) if bucket else 0

    keys, positions, weights = [], [], []
    for chunk in chunks():
        mask = (chunk.keys >> np.uint64(64 - BUCKET_BITS)) == np.uint64(bucket)
        mask &= chunk.weights > 0
        keys.append(chunk.keys[mask])
        positions.append(chunk.positions[mask])
        weights.append(chunk.weights[mask])
    key_arr, pos_arr = np.concatenate(keys), np.concatenate(positions)
    weight_arr = np.concatenate(weights).astype(np.int64)
    order = np.lexsort((pos_arr, key_arr))
    running = before + np.cumsum(weight_arr[order])
    fits = int(np.searchsorted(running, budget, side="right"))
    if fits == 0:  # only documents in lower buckets fit: cut just below this bucket
        return ((bucket << (64 - BUCKET_BITS)) - 1, np.iinfo(np.uint64).max) if bucket else NONE
    last = order[fits - 1]
    return (int(key_arr[last]), int(pos_arr[last]))


def iter_positions(counts: Iterable[int]) -> Iterator[int]:
    """First corpus position of each task, from the tasks' document counts."""
    start = 0
    for count in counts:
        yield start
        start += count
