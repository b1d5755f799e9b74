"""Writing token shards: files of little-endian ids of at most `max_tokens`, hashed as written.

A shard is a cut of its split's token stream (training reads the shards as one stream), so
a shard may end in the middle of a document: the cut depends only on the stream and the
maximum size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np


@dataclass(frozen=True)
class WrittenShard:
    file: str
    tokens: int
    sha256: str


@dataclass
class ShardWriter:
    """Appends id arrays to `<folder>/<prefix>-NNN.bin`, starting a new file at `max_tokens`."""

    folder: Path
    prefix: str
    max_tokens: int
    written: list[WrittenShard] = field(default_factory=list)
    _handle: BinaryIO | None = None
    _hash: hashlib._Hash | None = None
    _tokens: int = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.written):03d}.bin"
        self._handle = (self.folder / name).open("wb")
        self._hash = hashlib.sha256()
        self._tokens = 0

    def _close_current(self) -> None:
        if self._handle is None:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        assert self._hash is not None
        name = Path(self._handle.name).name
        self.written.append(WrittenShard(name, self._tokens, self._hash.hexdigest()))
        self._handle, self._hash = None, None

    def write(self, ids: np.ndarray) -> None:
        start = 0
        while start < len(ids):
            if self._handle is None:
                self._open()
            room = self.max_tokens - self._tokens
            piece = ids[start : start + room]
            view = memoryview(np.ascontiguousarray(piece)).cast("B")
            assert self._handle is not None and self._hash is not None
            self._handle.write(view)
            self._hash.update(view)
            self._tokens += len(piece)
            start += len(piece)
            if self._tokens >= self.max_tokens:
                self._close_current()

    def close(self) -> list[WrittenShard]:
        """Finish the last shard; returns every shard written, in order."""
        self._close_current()
        return self.written
