"""SHA-256 of files and open streams, read in 1 MiB chunks (one helper for every stage)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO

CHUNK = 1 << 20


def stream_sha256(handle: IO[bytes]) -> str:
    """Hex SHA-256 of what is left to read in an open binary file."""
    digest = hashlib.sha256()
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as handle:
        return stream_sha256(handle)
