"""Several token shards read as one flat array, without loading any of them.

Shards are cuts of one split's token stream, so a training window may start in one shard and
end in the next: slicing hides the cut. Training therefore sees exactly the windows it would
see in one file, whatever the shard size (which is why resharding changes no result).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TokenStream:
    """Read-only concatenation of 1-D arrays (memory maps) supporting `len` and slices."""

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        if not shards:
            raise ValueError("a token stream needs at least one shard")
        self.shards = list(shards)
        self.dtype = self.shards[0].dtype
        self._starts = np.cumsum([0] + [len(shard) for shard in self.shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, key: slice | int) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"token {key} out of range for {len(self)} tokens")
            shard = int(np.searchsorted(self._starts, index, side="right")) - 1
            return self.shards[shard][index - self._starts[shard]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("token streams are sliced contiguously")
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop - 1, side="right")) - 1
        if first == last:
            base = self._starts[first]
            return np.asarray(self.shards[first][start - base : stop - base])
        pieces = []
        for shard in range(first, last + 1):
            base = int(self._starts[shard])
            lo = max(start, base) - base
            hi = min(stop, int(self._starts[shard + 1])) - base
            pieces.append(np.asarray(self.shards[shard][lo:hi]))
        return np.concatenate(pieces)
