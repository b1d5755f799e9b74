"""Training data order: sequences sampled without replacement from a seeded permutation.

The whole position in the data is one integer, `cursor` (sequences consumed since the start),
so a checkpoint holds it exactly. Epoch e uses the permutation seeded by (seed, e); sequence k of
the global stream is `perm[k // n][k % n]`. A global batch is a contiguous range of the stream and
each rank takes a disjoint slice of it, so the data seen does not depend on the world size.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


class SequenceSampler:
    """Non-overlapping windows of `seq_len + 1` tokens from a flat token array, in seeded order."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, cursor: int = 0) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.cursor = cursor
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"{len(tokens)} tokens are too few for one sequence of {seq_len} (+1) tokens"
            )
        self._permutation = lru_cache(maxsize=2)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        """`Generator.permutation(n)` exactly (the same draws shuffle any dtype the same way),
        in int32 when it fits: half the memory for a GPT-3-sized source (150M windows)."""
        dtype = np.int32 if self.num_windows < 2**31 else np.int64
        order = np.arange(self.num_windows, dtype=dtype)
        np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order

    @property
    def epoch(self) -> int:
        return self.cursor // self.num_windows

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """Window ids of stream positions [start, start + count)."""
        positions = np.arange(start, start + count)
        epochs = positions // self.num_windows
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[positions[mask] % self.num_windows]
        return out

    def gather(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets for the given windows, as int64 CPU tensors."""
        starts = window_ids * self.seq_len
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def global_batch(self, sequences: int) -> np.ndarray:
        """Window ids of the next global batch; advances the cursor past it."""
        ids = self.window_ids(self.cursor, sequences)
        self.cursor += sequences
        return ids

    def state_dict(self) -> dict[str, int]:
        return {
            "cursor": self.cursor,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "seq_len", "num_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data sampler mismatch: checkpoint has {key}={state[key]}, "
                    f"this run has {getattr(self, key)}"
                )
        self.cursor = int(state["cursor"])


def evaluation_windows(num_windows: int, count: int) -> np.ndarray:
    """Evenly spaced, fixed windows for periodic validation (no RNG, same every time)."""
    count = min(count, num_windows)
    return np.linspace(0, num_windows - 1, count).round().astype(np.int64)
