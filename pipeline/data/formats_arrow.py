"""The Arrow side of `pipeline.data.formats`: Parquet files, one row group at a time, and
`datasets.Dataset.save_to_disk` folders (Arrow IPC stream files), one record batch at a time.

Imported lazily, so that reading JSONL does not pay for importing pyarrow. `datasets` itself is
never imported: `state.json` lists the data files, and they are plain Arrow streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.pieces import (
    TEXT_FIELD_SETTING,
    Piece,
    RawDocument,
    cannot_read,
    group_runs,
    pieces_from_runs,
    type_name,
)
from pipeline.errors import DataError


def plan_pieces(path: Path, fmt: str, target_bytes: int) -> list[Piece]:
    """Parquet by runs of row groups, a save_to_disk folder by runs of data files."""
    if fmt == "parquet":
        meta = _open_parquet(str(path)).metadata
        sizes = []
        for group in range(meta.num_row_groups):
            row_group = meta.row_group(group)
            columns = range(row_group.num_columns)
            sizes.append(sum(row_group.column(c).total_compressed_size for c in columns))
    else:
        sizes = []
        for file in _data_files(path):
            try:
                sizes.append(file.stat().st_size)
            except OSError as exc:
                raise cannot_read(file, exc) from None
    return pieces_from_runs(path, fmt, group_runs(sizes, target_bytes))


def read_piece(piece: Piece, field: str) -> Iterator[RawDocument]:
    if piece.format == "parquet":
        yield from _read_parquet(piece, field)
    else:
        files = _data_files(Path(piece.path))
        for file in files[piece.start : piece.stop]:
            yield from _read_arrow_stream(str(file), field)


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except OSError as exc:
        if exc.errno:
            raise cannot_read(path, exc) from None
        raise DataError(
            f"{path}: bad Parquet footer, not a Parquet file or cut short ({_first_line(exc)})"
        ) from None
    except pa.ArrowException as exc:
        raise DataError(
            f"{path}: bad Parquet footer, not a Parquet file or cut short ({_first_line(exc)})"
        ) from None


def _missing_column(where: str, field: str, names: list[str]) -> DataError:
    present = ", ".join(map(repr, names[:8])) + (", ..." if len(names) > 8 else "")
    return DataError(
        f"{where}: no column {field!r} ({TEXT_FIELD_SETTING}); columns here: {present or 'none'}"
    )


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    string_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or string_view(kind)


def _texts(column: pa.Array | pa.ChunkedArray, where: str, field: str) -> Iterator[RawDocument]:
    """The column's strings, each with `where row R`; a null or non-string is an error."""
    if not _is_text(column.type):
        raise DataError(f"{where}: column {field!r} holds {column.type} values, not strings")
    try:
        values = column.to_pylist()
    except (pa.ArrowException, UnicodeDecodeError) as exc:
        reason = _first_line(exc)
        raise DataError(f"{where}: column {field!r} is not UTF-8 text ({reason})") from None
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(
                f"{where} row {row}: column {field!r} is {type_name(value)}, not a string"
            )
        yield RawDocument(value, f"{where} row {row}")


def _read_parquet(piece: Piece, field: str) -> Iterator[RawDocument]:
    path = piece.path
    parquet = _open_parquet(path)
    try:
        names = parquet.schema_arrow.names
        if field not in names:
            raise _missing_column(f"{path}: schema", field, names)
        stop = parquet.num_row_groups if piece.stop is None else piece.stop
        for group in range(piece.start, stop):
            where = f"{path}:row-group {group}"
            try:
                column = parquet.read_row_group(group, columns=[field]).column(0)
            except OSError as exc:
                if exc.errno:
                    raise cannot_read(path, exc) from None
                raise DataError(f"{where}: corrupt Parquet data ({_first_line(exc)})") from None
            except pa.ArrowException as exc:
                raise DataError(f"{where}: corrupt Parquet data ({_first_line(exc)})") from None
            yield from _texts(column, where, field)
            del column
    finally:
        parquet.close()


def _data_files(folder: Path) -> list[Path]:
    """The data files that the folder's `state.json` lists, in order."""
    state_path = folder / "state.json"
    try:
        state = json.loads(state_path.read_bytes())
    except OSError as exc:
        raise cannot_read(state_path, exc) from None
    except ValueError as exc:
        raise DataError(f"{state_path}: not valid JSON ({_first_line(exc)})") from None
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not all(
        isinstance(item, dict) and isinstance(item.get("filename"), str) for item in files
    ):
        raise DataError(
            f'{state_path}: expected "_data_files": a list of {{"filename": ...}} '
            "(a folder written by datasets.Dataset.save_to_disk)"
        )
    return [folder / item["filename"] for item in files]


def _read_arrow_stream(path: str, field: str) -> Iterator[RawDocument]:
    try:
        source = pa.OSFile(path)
    except OSError as exc:
        raise cannot_read(path, exc) from None
    with source:
        try:
            reader = pa.ipc.open_stream(source)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not an Arrow IPC stream ({_first_line(exc)})") from None
        names = reader.schema.names
        if field not in names:
            raise _missing_column(f"{path}: schema", field, names)
        index = names.index(field)
        batch_number = 0
        while True:
            where = f"{path}:batch {batch_number}"
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{where}: corrupt Arrow data ({_first_line(exc)})") from None
            column = batch.column(index)
            del batch
            yield from _texts(column, where, field)
            batch_number += 1
