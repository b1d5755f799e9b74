"""Training data drawn from a weighted mixture of sources (GPT-3 Table 2.2), state still one int.

Why this shape:
- Each position of the global sequence stream gets its source by weight, drawn from the seed in
  blocks of `BLOCK` positions (block b from `default_rng([seed, MIX_TAG, b])`). Any position's
  source is known without replaying the stream, so the whole data position is still one
  integer, `cursor`: a checkpoint holds it exactly, and assigning it (resume, nonfinite
  rollback) is exact too.
- Within a source, sequences come from that source's own `SequenceSampler` in its order: the
  k-th sequence drawn from source s is position k of s's stream (its count in earlier blocks,
  cached per block, plus its rank within the block). A small source therefore repeats (epochs
  above 1) and a large one is partly seen, as in GPT-3.
- Exactly one source is today's `SequenceSampler` with the run's own seed: the same ids, the
  same windows, so a one-source run trains bitwise as before and its checkpoints still resume.
- A global id is `(source index << 48) | window id`: the trainer still slices one global batch
  per rank, so the data order does not depend on the world size.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pipeline.training.sampler import SequenceSampler

BLOCK = 2**16
"""Positions whose sources are drawn together (and whose per-source counts are cached)."""
MIX_TAG = 0x4D4958
"""Part of each block's seed ("MIX"), so source choices never reuse a permutation's stream."""
SOURCE_SHIFT = 48
WINDOW_MASK = (1 << SOURCE_SHIFT) - 1
MAX_SOURCES = 1 << 14


@dataclass(frozen=True)
class MixtureSource:
    """One source of the mixture: its name, relative weight and its own window sampler."""

    name: str
    weight: float
    sampler: SequenceSampler


def source_seed(seed: int, name: str, count: int) -> int:
    """The seed of a source's permutations: the run's seed for one source (today's order), else
    one derived from (seed, name), so adding a source does not reshuffle the others."""
    if count == 1:
        return seed
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def metric_name(name: str) -> str:
    """A source name as a metric path part (MLflow refuses `..` in metric names)."""
    return re.sub(r"\.{2,}", lambda match: "_" * len(match.group()), name)


class MixtureSampler:
    """`SequenceSampler`'s interface over several sources, each sequence's source drawn by weight.

    Also serves validation: `sources` gives each source's sampler for a per-source evaluation,
    and `weighted_mean` combines their losses.
    """

    def __init__(self, sources: Sequence[MixtureSource], seed: int, cursor: int = 0) -> None:
        if not sources:
            raise ValueError("a data mixture needs at least one source")
        if len(sources) > MAX_SOURCES:
            raise ValueError(f"{len(sources)} sources; at most {MAX_SOURCES} are supported")
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique: {names}")
        for source in sources:
            if not (math.isfinite(source.weight) and source.weight > 0):
                raise ValueError(f"source {source.name!r}: weight {source.weight} is not positive")
            if source.sampler.seq_len != sources[0].sampler.seq_len:
                raise ValueError("all sources must sample sequences of one length")
        self.sources = list(sources)
        self.seed = seed
        self.seq_len = sources[0].sampler.seq_len
        self.cursor = cursor
        weights = np.array([source.weight for source in sources], dtype=np.float64)
        self.shares = weights / weights.sum()
        self._cumulative = np.cumsum(self.shares)
        self._cumulative[-1] = 1.0
        self._prefix: list[np.ndarray] = [np.zeros(len(sources), dtype=np.int64)]
        """_prefix[b]: sequences each source got in blocks before b."""
        self._choices = lru_cache(maxsize=4)(self._draw)

    @classmethod
    def from_tokens(
        cls, named_tokens: Sequence[tuple[str, float, Any]], seq_len: int, seed: int
    ) -> MixtureSampler:
        """One `SequenceSampler` per (name, weight, tokens), seeded by `source_seed`."""
        count = len(named_tokens)
        return cls(
            [
                MixtureSource(
                    name, weight, SequenceSampler(tokens, seq_len, source_seed(seed, name, count))
                )
                for name, weight, tokens in named_tokens
            ],
            seed,
        )

    # ------------------------------------------------------------------------- positions
    @property
    def names(self) -> list[str]:
        return [source.name for source in self.sources]

    @property
    def num_windows(self) -> int:
        """Windows over all sources (one source: its own count, as before)."""
        return sum(source.sampler.num_windows for source in self.sources)

    @property
    def epoch(self) -> int:
        """Whole passes finished over the most-repeated source (one source: as before)."""
        counts = self._counts_before(self.cursor)
        return max(
            int(n) // source.sampler.num_windows
            for n, source in zip(counts, self.sources, strict=True)
        )

    def _draw(self, block: int) -> np.ndarray:
        """Source index of each position in `block`."""
        uniform = np.random.default_rng([self.seed, MIX_TAG, block]).random(BLOCK)
        choice = np.searchsorted(self._cumulative, uniform, side="right")
        return np.minimum(choice, len(self.sources) - 1).astype(np.int64)

    def _prefix_at(self, block: int) -> np.ndarray:
        n = len(self.sources)
        while len(self._prefix) <= block:
            done = len(self._prefix) - 1
            counts = np.bincount(self._choices(done), minlength=n)
            self._prefix.append(self._prefix[-1] + counts)
        return self._prefix[block]

    def _counts_before(self, position: int) -> np.ndarray:
        """Sequences each source got at global positions [0, position)."""
        if len(self.sources) == 1:
            return np.array([position], dtype=np.int64)
        block, offset = divmod(position, BLOCK)
        head = np.bincount(self._choices(block)[:offset], minlength=len(self.sources))
        return self._prefix_at(block) + head

    def _sources_of(self, start: int, count: int) -> np.ndarray:
        """Source index of each global position in [start, start + count)."""
        first, last = start // BLOCK, (start + count - 1) // BLOCK
        choices = np.concatenate([self._choices(b) for b in range(first, last + 1)])
        offset = start - first * BLOCK
        return choices[offset : offset + count]

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """Global ids (source << 48 | window) of stream positions [start, start + count)."""
        if len(self.sources) == 1:
            return self.sources[0].sampler.window_ids(start, count)
        out = np.empty(count, dtype=np.int64)
        if count == 0:
            return out
        chosen = self._sources_of(start, count)
        before = self._counts_before(start)
        for index, source in enumerate(self.sources):
            where = np.flatnonzero(chosen == index)
            if len(where):
                # A source's positions in a contiguous global range are contiguous in its stream.
                local = source.sampler.window_ids(int(before[index]), len(where))
                out[where] = (index << SOURCE_SHIFT) | local
        return out

    def global_batch(self, sequences: int) -> np.ndarray:
        """Global ids of the next global batch; advances the cursor past it."""
        ids = self.window_ids(self.cursor, sequences)
        self.cursor += sequences
        return ids

    def gather(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets for the given global ids, rows in the given order."""
        if len(self.sources) == 1:
            return self.sources[0].sampler.gather(ids)
        ids = np.asarray(ids, dtype=np.int64)
        which, windows = ids >> SOURCE_SHIFT, ids & WINDOW_MASK
        if len(ids) and (which.min() < 0 or which.max() >= len(self.sources)):
            raise ValueError(f"ids name sources outside 0..{len(self.sources) - 1}")
        inputs = torch.empty((len(ids), self.seq_len), dtype=torch.int64)
        targets = torch.empty((len(ids), self.seq_len), dtype=torch.int64)
        for index in np.unique(which):
            mask = torch.from_numpy(which == index)
            x, y = self.sources[int(index)].sampler.gather(windows[which == index])
            inputs[mask], targets[mask] = x, y
        return inputs, targets

    # --------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The cursor and what the order depends on; one source adds today's keys, so old code
        reads it and it reads old checkpoints."""
        state: dict[str, Any] = {
            "cursor": self.cursor,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "sources": [
                {
                    "name": source.name,
                    "weight": source.weight,
                    "seed": source.sampler.seed,
                    "seq_len": source.sampler.seq_len,
                    "num_windows": source.sampler.num_windows,
                }
                for source in self.sources
            ],
        }
        if len(self.sources) == 1:
            state["num_windows"] = self.sources[0].sampler.num_windows
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the cursor of a checkpoint of the same mixture; a difference is a ValueError."""
        if "sources" not in state:
            self._load_single_source_state(state)
            return
        saved = list(state["sources"])
        if [s["name"] for s in saved] != self.names:
            raise ValueError(
                f"data sources differ: checkpoint has {[s['name'] for s in saved]}, "
                f"this run has {self.names}"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"data sampler mismatch: checkpoint has seed={state['seed']}, this run has "
                f"{self.seed}"
            )
        for entry, source in zip(saved, self.sources, strict=True):
            mine = {
                "weight": source.weight,
                "seed": source.sampler.seed,
                "seq_len": source.sampler.seq_len,
                "num_windows": source.sampler.num_windows,
            }
            for key, value in mine.items():
                if entry[key] != value:
                    raise ValueError(
                        f"data source {source.name!r} differs: checkpoint has {key}={entry[key]}, "
                        f"this run has {value}"
                    )
        self.cursor = int(state["cursor"])

    def _load_single_source_state(self, state: Mapping[str, Any]) -> None:
        """A checkpoint from before mixtures: `SequenceSampler.state_dict()` of one source."""
        if len(self.sources) != 1:
            raise ValueError(
                f"data sources differ: checkpoint has one source, this run mixes {self.names}"
            )
        sampler = self.sources[0].sampler
        for key in ("seed", "seq_len", "num_windows"):
            if state[key] != getattr(sampler, key):
                raise ValueError(
                    f"data sampler mismatch: checkpoint has {key}={state[key]}, "
                    f"this run has {getattr(sampler, key)}"
                )
        self.cursor = int(state["cursor"])

    # ----------------------------------------------------------------------- reporting
    def source_counts(self, cursor: int | None = None) -> dict[str, int]:
        """Sequences each source has given by `cursor` (default: the current one)."""
        counts = self._counts_before(self.cursor if cursor is None else cursor)
        return {name: int(n) for name, n in zip(self.names, counts, strict=True)}

    def source_tokens(self, cursor: int | None = None) -> dict[str, int]:
        """Tokens trained on per source: sequences x seq_len."""
        return {name: n * self.seq_len for name, n in self.source_counts(cursor).items()}

    def source_epochs(self, cursor: int | None = None) -> dict[str, float]:
        """Passes over each source's windows (GPT-3 Table 2.2's "epochs elapsed")."""
        return {
            source.name: n / source.sampler.num_windows
            for source, n in zip(self.sources, self.source_counts(cursor).values(), strict=True)
        }

    def data_metrics(self, cursor: int | None = None) -> dict[str, float]:
        """`data/<source>/tokens` and `data/<source>/epochs`; none for one source."""
        if len(self.sources) == 1:
            return {}
        tokens, epochs = self.source_tokens(cursor), self.source_epochs(cursor)
        metrics: dict[str, float] = {}
        for name in self.names:
            metrics[f"data/{metric_name(name)}/tokens"] = float(tokens[name])
            metrics[f"data/{metric_name(name)}/epochs"] = epochs[name]
        return metrics

    def weighted_mean(self, values: Mapping[str, float]) -> float:
        """Sources' values averaged by weight (one source: its value, untouched)."""
        if len(self.sources) == 1:
            return values[self.sources[0].name]
        return float(
            sum(share * values[name] for share, name in zip(self.shares, self.names, strict=True))
        )
