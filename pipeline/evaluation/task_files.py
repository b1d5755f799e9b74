"""Read zero-shot task files (JSONL) so that every problem names the file and the line.

Public task releases are hand-made JSONL; a truncated download, a test split without labels or
a field renamed by a converter should end with `path:line: what is wrong`, not a KeyError deep
inside the scoring loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DataError


@dataclass(frozen=True)
class Record:
    """One JSON object of a task file and where it came from."""

    fields: dict[str, Any]
    where: str
    """`path:line`, for error messages."""

    def error(self, message: str) -> DataError:
        return DataError(f"{self.where}: {message}")

    def string(self, key: str, allow_empty: bool = False) -> str:
        """A string field; missing, non-string or (unless allowed) blank is an error."""
        if key not in self.fields:
            raise self.error(f"missing field {key!r} (fields: {', '.join(self.fields) or 'none'})")
        value = self.fields[key]
        if not isinstance(value, str):
            raise self.error(f"field {key!r} must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.error(f"field {key!r} is empty")
        return value

    def strings(self, key: str, minimum: int = 2) -> list[str]:
        """A list of at least `minimum` non-empty strings."""
        value = self.fields.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"field {key!r} must be a list of strings, got {value!r:.80}")
        if len(value) < minimum:
            raise self.error(f"field {key!r} needs at least {minimum} entries, got {len(value)}")
        if any(not v.strip() for v in value):
            raise self.error(f"field {key!r} holds an empty string")
        return value

    def label(self, key: str, n_choices: int) -> int:
        """An index into the choices: an int or a numeric string, as public releases have it."""
        value = self.fields.get(key)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(
                f"field {key!r} must be an integer or a numeric string, got {value!r:.40} "
                "(a test split without labels cannot be scored)"
            )
        if not 0 <= value < n_choices:
            raise self.error(f"field {key!r} is {value}, outside 0..{n_choices - 1}")
        return value


def read_records(path: str | Path, limit: int | None = None) -> Iterator[Record]:
    """The JSON objects of a JSONL file, blank lines skipped; at most `limit` of them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: task file not found")
    count = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and count >= limit:
                return
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                problem = f"{exc.msg} at column {exc.colno}"
                raise DataError(f"{where}: not valid JSON ({problem})") from None
            if not isinstance(value, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
            count += 1
            yield Record(value, where)
    if count == 0:
        raise DataError(f"{path}: no examples (the file is empty)")
