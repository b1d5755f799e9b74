"""Reading documents out of input files, streaming, in bounded memory.

Formats, detected from the path: `.txt` (the whole file is one document), `.jsonl` (one JSON
object per line, its text in a field), `.jsonl.gz`, `.jsonl.zst`/`.jsonl.zstd`, `.parquet` (one
text column) and a folder written by `datasets.Dataset.save_to_disk` (Arrow IPC stream files).
The readers hold at most one document, one JSON line, one Parquet row group or one Arrow record
batch at a time, and every problem is a `DataError` of one line that names the file and the
position. Texts are kept exactly as stored: files are read as bytes and decoded here, and JSONL
lines are split only on b"\\n".

Large inputs split into `Piece`s, the unit of parallel work (`plan_pieces`); reading the pieces
of an input one after the other gives exactly the documents of reading it whole.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

from pipeline.data.pieces import TEXT_FIELD_SETTING, Piece, RawDocument, cannot_read, type_name
from pipeline.errors import DataError

FORMAT_NAMES: tuple[str, ...] = ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf_dataset")

_SUFFIXES = (
    (".jsonl.gz", "jsonl.gz"),
    (".jsonl.zst", "jsonl.zst"),
    (".jsonl.zstd", "jsonl.zst"),
    (".jsonl", "jsonl"),
    (".txt", "txt"),
    (".parquet", "parquet"),
)
_BUFFER = 1 << 20
_BOM = b"\xef\xbb\xbf"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def is_dataset_folder(path: Path) -> bool:
    """A `save_to_disk` folder: a Dataset (`state.json`) or a DatasetDict (`dataset_dict.json`)."""
    path = Path(path)
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def _dataset_dict_error(path: Path) -> DataError:
    try:
        splits = json.loads((path / "dataset_dict.json").read_bytes())["splits"]
        splits = [str(split) for split in splits]
    except (OSError, ValueError, KeyError, TypeError):
        splits = sorted(p.parent.name for p in path.glob("*/state.json"))
    example = f" (e.g. {path / splits[0]})" if splits else ""
    return DataError(
        f"{path}: a datasets DatasetDict folder (splits: {', '.join(splits) or 'none'}); "
        f"point at one split's folder instead{example}"
    )


def detect_format(path: Path) -> str:
    """The input's format, from its name (a file) or its contents (a save_to_disk folder)."""
    path = Path(path)
    if path.is_dir():
        if (path / "state.json").is_file():
            return "hf_dataset"
        if (path / "dataset_dict.json").is_file():
            raise _dataset_dict_error(path)
    else:
        for suffix, name in _SUFFIXES:
            if path.name.endswith(suffix):
                return name
    raise DataError(
        f"{path}: unsupported input type (expected .txt, .jsonl, .jsonl.gz, .jsonl.zst, "
        ".parquet or a datasets.save_to_disk folder)"
    )


def plan_pieces(path: Path, target_bytes: int) -> list[Piece]:
    """Split an input into pieces of about `target_bytes`, deterministically.

    Uncompressed JSONL splits by byte ranges (a line belongs to the piece holding its first
    byte), Parquet by row groups, a save_to_disk folder by data files; compressed JSONL and
    .txt are always one piece.
    """
    if target_bytes < 1:
        raise ValueError(f"target_bytes must be at least 1, got {target_bytes}")
    path = Path(path)
    fmt = detect_format(path)
    if fmt in ("parquet", "hf_dataset"):
        from pipeline.data import formats_arrow

        return formats_arrow.plan_pieces(path, fmt, target_bytes)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise cannot_read(path, exc) from None
    if fmt != "jsonl" or size <= target_bytes:
        return [Piece(str(path), fmt, 0, None, size)]
    starts = range(0, size, target_bytes)
    return [
        Piece(str(path), fmt, s, min(s + target_bytes, size), min(target_bytes, size - s))
        for s in starts
    ]


def read_piece(piece: Piece, text_field: str = "text") -> Iterator[RawDocument]:
    """Every document of the piece in file order, empty texts included."""
    if piece.format == "txt":
        yield _read_txt(piece.path)
    elif piece.format in ("jsonl", "jsonl.gz", "jsonl.zst"):
        yield from _read_jsonl(piece, text_field)
    elif piece.format in ("parquet", "hf_dataset"):
        from pipeline.data import formats_arrow

        yield from formats_arrow.read_piece(piece, text_field)
    else:
        raise ValueError(f"unknown format {piece.format!r} (expected one of {FORMAT_NAMES})")


def read_input(path: Path, text_field: str = "text") -> Iterator[RawDocument]:
    """Every document of one input, in order (the whole input as one piece)."""
    yield from read_piece(Piece(str(path), detect_format(Path(path))), text_field)


def _read_txt(path: str) -> RawDocument:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise cannot_read(path, exc) from None
    try:
        return RawDocument(raw.decode("utf-8"), path)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None


def _check_zstd_frames(path: str, fh: BinaryIO) -> None:
    """Walk the frame and block headers (no decompression): a file cut inside a frame is an
    error, where the streaming decompressor would end silently at the cut."""
    size = os.fstat(fh.fileno()).st_size
    pos = 0
    while pos < size:
        frame = pos
        fh.seek(pos)
        head = fh.read(18)  # the longest frame header
        magic = int.from_bytes(head[:4], "little")
        if len(head) >= 4 and 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame
            pos += 8 + int.from_bytes(head[4:8], "little") if len(head) >= 8 else size + 1
        elif len(head) >= 5 and head[:4] == _ZSTD_MAGIC:
            descriptor = head[4]
            single_segment = descriptor >> 5 & 1
            pos += 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
            pos += (single_segment, 2, 4, 8)[descriptor >> 6]
            last = 0
            while not last and pos < size:
                fh.seek(pos)
                header = int.from_bytes(fh.read(3).ljust(3, b"\0"), "little")
                last, kind, length = header & 1, header >> 1 & 3, header >> 3
                if kind == 3:
                    raise DataError(f"{path}: corrupt zstd data (bad block header at byte {pos})")
                pos += 3 + (1 if kind == 1 else length)
            pos += 4 * (descriptor >> 2 & 1)  # the content checksum
            if not last:
                pos = size + 1
        elif _ZSTD_MAGIC.startswith(head):  # cut inside the magic number or just after it
            pos = size + 1
        else:
            raise DataError(f"{path}: corrupt zstd data (no zstd frame at byte {frame})")
        if pos > size:
            raise DataError(
                f"{path}: corrupt zstd data (the file ends inside the frame at byte {frame}: "
                "truncated?)"
            )


class _Counted(io.RawIOBase):
    """A decompressing reader that counts the bytes it gave out, to say where bad data began."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.n_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        n = self.inner.readinto(buffer)
        self.n_bytes += n
        return n


def _read_jsonl(piece: Piece, field: str) -> Iterator[RawDocument]:
    path = piece.path
    by_line = piece.start == 0 and piece.stop is None
    compressed = piece.format != "jsonl"
    try:
        fh = open(path, "rb", buffering=_BUFFER)  # noqa: SIM115 -- closed by the with below
    except OSError as exc:
        raise cannot_read(path, exc) from None
    with fh:
        offset = 0
        counted = None
        try:
            if piece.format == "jsonl.gz":
                counted = _Counted(gzip.GzipFile(fileobj=fh))
            elif piece.format == "jsonl.zst":
                _check_zstd_frames(path, fh)
                fh.seek(0)
                dctx = zstandard.ZstdDecompressor()
                counted = _Counted(dctx.stream_reader(fh, read_across_frames=True))
            elif piece.start > 0:  # the line holding byte `start - 1` belongs to the piece before
                fh.seek(piece.start - 1)
                offset = piece.start - 1 + len(fh.readline())
        except OSError as exc:
            raise cannot_read(path, exc) from None
        stream = fh if counted is None else io.BufferedReader(counted, _BUFFER)
        number = 0
        try:
            for line in stream:
                start = offset
                offset += len(line)
                number += 1
                if piece.stop is not None and start >= piece.stop:
                    break
                where = f"{path}:{number}" if by_line else f"{path}:byte {start}"
                document = _jsonl_document(line, start, where, field, compressed)
                if document is not None:
                    yield document
        except (OSError, EOFError, zlib.error) as exc:
            if isinstance(exc, OSError) and exc.errno and not isinstance(exc, gzip.BadGzipFile):
                raise cannot_read(path, exc) from None  # a read error, not bad gzip data
            if piece.format != "jsonl.gz":
                raise
            raise DataError(
                f"{path}: corrupt gzip data after {counted.n_bytes} bytes of text ({exc})"
            ) from None
        except zstandard.ZstdError as exc:
            reason = str(exc).removeprefix("zstd decompress error: ")
            raise DataError(
                f"{path}: corrupt zstd data after {counted.n_bytes} bytes of text ({reason})"
            ) from None


def _jsonl_document(
    line: bytes, start: int, where: str, field: str, compressed: bool
) -> RawDocument | None:
    """The line's document, or None for a blank line."""
    bom = 3 if start == 0 and line.startswith(_BOM) else 0
    try:
        text = line[bom:].decode("utf-8") if bom else line.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = start + bom + exc.start
        of = " of the decompressed text" if compressed else ""
        raise DataError(
            f"{where}: not UTF-8 text (byte 0x{line[bom + exc.start]:02x} at offset {at}{of})"
        ) from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(record)}")
    if field not in record:
        present = ", ".join(map(repr, list(record)[:8])) or "none"
        raise DataError(
            f"{where}: no field {field!r} ({TEXT_FIELD_SETTING}); fields here: {present}"
        )
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type_name(value)}, not a string")
    if "\\u" in text:  # only JSON escapes can produce lone surrogates
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: text holds a lone surrogate (not valid Unicode)") from None
    return RawDocument(value, where)
