"""Several token shards read as one flat array, without loading any of them.

Shards are cuts of one split's token stream, so a training window may start in one shard and
end in the next: slicing hides the cut. Training therefore sees exactly the windows it would
see in one file, whatever the shard size (which is why resharding changes no result).

Given the vocabulary size, every slice read is checked to hold only ids below it: a damaged or
foreign shard is then a one-line `DataError` naming the file, not an `IndexError` deep in the
embedding (or a device assert on CUDA). The check costs one `max` over the tokens read, which
are the tokens a step uses anyway, so it adds no pass over the data at start.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import DataError


class TokenStream:
    """Read-only concatenation of 1-D arrays (memory maps) supporting `len` and slices."""

    def __init__(
        self,
        shards: Sequence[np.ndarray],
        vocab_size: int | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        if not shards:
            raise ValueError("a token stream needs at least one shard")
        self.shards = list(shards)
        self.dtype = self.shards[0].dtype
        self._starts = np.cumsum([0] + [len(shard) for shard in self.shards])
        self.vocab_size = vocab_size
        """Ids must be below this (None: unchecked)."""
        self.names = (
            list(names) if names is not None else [f"shard {i}" for i in range(len(shards))]
        )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, key: slice | int) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"token {key} out of range for {len(self)} tokens")
            shard = int(np.searchsorted(self._starts, index, side="right")) - 1
            value = self.shards[shard][index - self._starts[shard]]
            self._check(np.asarray([value]), shard, index - int(self._starts[shard]))
            return value
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("token streams are sliced contiguously")
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop - 1, side="right")) - 1
        if first == last:
            base = int(self._starts[first])
            piece = np.asarray(self.shards[first][start - base : stop - base])
            self._check(piece, first, start - base)
            return piece
        pieces = []
        for shard in range(first, last + 1):
            base = int(self._starts[shard])
            lo = max(start, base) - base
            hi = min(stop, int(self._starts[shard + 1])) - base
            pieces.append(np.asarray(self.shards[shard][lo:hi]))
            self._check(pieces[-1], shard, lo)
        return np.concatenate(pieces)

    def _check(self, piece: np.ndarray, shard: int, offset: int) -> None:
        """DataError if `piece` (read at `offset` in `shard`) holds an id outside the vocabulary."""
        if self.vocab_size is None or not piece.size or int(piece.max()) < self.vocab_size:
            return
        at = int(np.argmax(piece >= self.vocab_size))
        raise DataError(
            f"{self.names[shard]}: token id {int(piece[at])} at token {offset + at} is outside "
            f"the vocabulary of {self.vocab_size} (meta.json): the file is damaged or from "
            "another tokenizer; prepare the data again"
        )
