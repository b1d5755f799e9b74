"""What every format reader shares: a document as read, a piece of an input (the unit of
parallel work), grouping items into pieces, and the wording of read errors.

Kept apart from `formats` so that the Arrow readers (`formats_arrow`, imported lazily by
`formats` so that reading JSONL never pays for pyarrow) need not import `formats` back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError

TEXT_FIELD_SETTING = "data.sources.<name>.text_field, or data.jsonl_field for one source"
"""The setting that names the text field or column, for messages."""

_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
}


@dataclass(frozen=True)
class RawDocument:
    """One document as read: its text and where it was, for messages."""

    text: str
    where: str
    """`path:LINE` for whole-file JSONL reads, `path:byte OFFSET` for split JSONL reads,
    `path:row-group G row R` for Parquet, `path:batch B row R` for Arrow (the data file's path),
    `path` for .txt."""


@dataclass(frozen=True)
class Piece:
    """A contiguous part of one input that one worker reads: the unit of parallel work."""

    path: str
    """The input's path as given."""
    format: str
    """One of FORMAT_NAMES."""
    start: int = 0
    """JSONL (uncompressed only): byte offset; Parquet: first row group; hf_dataset: first data
    file index."""
    stop: int | None = None
    """Exclusive end in the same unit; None = to the end."""
    size: int = 0
    """Approximate input bytes of this piece (bytes on disk; for grouping pieces into tasks)."""


def type_name(value: object) -> str:
    """The JSON name of a value's type (`null`, `number`, ...), else the Python one."""
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def cannot_read(path: object, exc: OSError) -> DataError:
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    return DataError(f"{path}: cannot read ({reason})")


def group_runs(sizes: list[int], target_bytes: int) -> list[tuple[int, int, int]]:
    """Consecutive runs of items of about `target_bytes` each, as (start, stop, bytes): a run is
    closed before the item that would take it past the target (an item alone may exceed it)."""
    runs: list[tuple[int, int, int]] = []
    start = total = 0
    for index, size in enumerate(sizes):
        if index > start and total + size > target_bytes:
            runs.append((start, index, total))
            start, total = index, 0
        total += size
    runs.append((start, len(sizes), total))
    return runs


def pieces_from_runs(path: Path, fmt: str, runs: list[tuple[int, int, int]]) -> list[Piece]:
    if len(runs) == 1:
        return [Piece(str(path), fmt, 0, None, runs[0][2])]
    return [Piece(str(path), fmt, start, stop, size) for start, stop, size in runs]
