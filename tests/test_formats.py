"""pipeline.data.formats: every input format read back exactly, pieces that add up to the whole
input, one-line errors that name the file and the position, and bounded memory."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.formats import (
    FORMAT_NAMES,
    TEXT_FIELD_SETTING,
    Piece,
    RawDocument,
    detect_format,
    is_dataset_folder,
    plan_pieces,
    read_input,
    read_piece,
)
from pipeline.errors import DataError

TEXTS = [
    "plain text",
    "windows\r\nline ends\r\n",
    "unicode: é ß 中文 🎉 \u2028 end",
    "has <|endoftext|> inside",
    "",
    "  \n\n trailing blank lines \n\n",
    "\ttabs\tand a lone \r",
]
"""What the round trips write; the empty text must come back too (the caller skips it)."""

JSONL_FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst")


def jsonl_bytes(texts: list[str], field: str = "text", ascii_only: bool = False) -> bytes:
    lines = [json.dumps({"id": i, field: t}, ensure_ascii=ascii_only) for i, t in enumerate(texts)]
    return "\n".join(lines).encode() + b"\n"


def compress(fmt: str, data: bytes) -> bytes:
    """Two gzip members / two zstd frames, so multi-member and multi-frame files are covered."""
    half = len(data) // 2
    if fmt == "jsonl.gz":
        return gzip.compress(data[:half]) + gzip.compress(data[half:])
    if fmt == "jsonl.zst":
        zstd = zstandard.ZstdCompressor(write_checksum=True)
        return zstd.compress(data[:half]) + zstd.compress(data[half:])
    return data


def write_jsonl(path: Path, data: bytes) -> Path:
    fmt = "jsonl.gz" if path.name.endswith(".gz") else "jsonl.zst" if ".zst" in path.name else ""
    path.write_bytes(compress(fmt, data))
    return path


def write_parquet(path: Path, texts: list, row_group_size: int = 2, **columns) -> Path:
    table = pa.table({"text": texts, "n": list(range(len(texts))), **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_dataset(folder: Path, texts: list, num_shards: int = 2) -> Path:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder), num_shards=num_shards)
    return folder


def write_input(fmt: str, folder: Path, texts: list[str]) -> Path:
    if fmt == "txt":
        path = folder / "doc.txt"
        path.write_bytes("".join(texts).encode())
        return path
    if fmt in JSONL_FORMATS:
        return write_jsonl(folder / f"docs.{fmt}", jsonl_bytes(texts))
    if fmt == "parquet":
        return write_parquet(folder / "docs.parquet", texts)
    return write_dataset(folder / "dataset", texts)


def texts_of(documents) -> list[str]:
    return [document.text for document in documents]


def pieces_texts(path: Path, target_bytes: int, field: str = "text") -> list[str]:
    return [d.text for piece in plan_pieces(path, target_bytes) for d in read_piece(piece, field)]


def expect_error(call: Callable[[], object], *parts: str) -> str:
    """`call` raises one DataError of one line holding every part, with no chained traceback."""
    with pytest.raises(DataError) as caught:
        result = call()
        if not isinstance(result, (list, RawDocument)):
            list(result)  # an iterator: consume it
    message = str(caught.value)
    assert "\n" not in message, message
    assert caught.value.__suppress_context__ or caught.value.__context__ is None, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# -- formats and round trips -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.txt", "txt"),
        ("a.jsonl", "jsonl"),
        ("a.jsonl.gz", "jsonl.gz"),
        ("a.jsonl.zst", "jsonl.zst"),
        ("a.jsonl.zstd", "jsonl.zst"),
        ("a.parquet", "parquet"),
    ],
)
def test_detect_format_from_the_name(tmp_path: Path, name: str, fmt: str) -> None:
    assert detect_format(tmp_path / name) == fmt
    assert fmt in FORMAT_NAMES
    assert not is_dataset_folder(tmp_path / name)


@pytest.mark.parametrize("name", ["a.csv", "a.json", "a.gz", "a.txt.gz", "plain_folder"])
def test_unsupported_inputs_are_named(tmp_path: Path, name: str) -> None:
    if name == "plain_folder":
        (tmp_path / name).mkdir()
    expect_error(
        lambda: detect_format(tmp_path / name),
        f"{tmp_path / name}: unsupported input type (expected .txt, .jsonl, .jsonl.gz, "
        ".jsonl.zst, .parquet or a datasets.save_to_disk folder)",
    )


def test_dataset_folders_and_dataset_dicts(tmp_path: Path) -> None:
    import datasets

    folder = write_dataset(tmp_path / "one", ["a", "b"])
    assert is_dataset_folder(folder) and detect_format(folder) == "hf_dataset"
    assert FORMAT_NAMES == ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf_dataset")

    split = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(tmp_path / "dd")
    assert is_dataset_folder(tmp_path / "dd")
    for call in (detect_format, lambda p: plan_pieces(p, 100), read_input):
        expect_error(
            lambda call=call: call(tmp_path / "dd"),
            str(tmp_path / "dd"),
            "DatasetDict",
            "train, validation",
            "one split's folder",
            str(tmp_path / "dd" / "train"),
        )
    assert texts_of(read_input(tmp_path / "dd" / "validation")) == ["a", "b"]


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_round_trip_keeps_every_text_exactly(tmp_path: Path, fmt: str) -> None:
    path = write_input(fmt, tmp_path, TEXTS)
    documents = list(read_input(path))
    expected = ["".join(TEXTS)] if fmt == "txt" else TEXTS
    assert texts_of(documents) == expected
    assert detect_format(path) == fmt
    assert all(isinstance(d, RawDocument) and str(path) in d.where for d in documents)


def test_positions(tmp_path: Path) -> None:
    txt = write_input("txt", tmp_path, ["x"])
    assert [d.where for d in read_input(txt)] == [str(txt)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", b'{"text": "a"}\n\n  \n{"text": "b"}')
    assert [d.where for d in read_input(jsonl)] == [f"{jsonl}:1", f"{jsonl}:4"]
    gz = write_jsonl(tmp_path / "a.jsonl.gz", b'{"text": "a"}\n\n  \n{"text": "b"}')
    assert [d.where for d in read_input(gz)] == [f"{gz}:1", f"{gz}:4"]
    parquet = write_parquet(tmp_path / "a.parquet", ["a", "b", "c"])
    assert [d.where for d in read_input(parquet)] == [
        f"{parquet}:row-group 0 row 0",
        f"{parquet}:row-group 0 row 1",
        f"{parquet}:row-group 1 row 0",
    ]
    folder = write_dataset(tmp_path / "ds", ["a", "b", "c"])
    first, second = (folder / "data-00000-of-00002.arrow", folder / "data-00001-of-00002.arrow")
    wheres = [d.where for d in read_input(folder)]
    assert wheres == [f"{first}:batch 0 row 0", f"{first}:batch 0 row 1", f"{second}:batch 0 row 0"]


def test_jsonl_bom_blank_lines_and_other_fields(tmp_path: Path) -> None:
    data = b'\xef\xbb\xbf{"body": "first", "text": 1}\n\n \r\n{"body": "a\\r\\nb"}\n'
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst"):
        path = write_jsonl(tmp_path / name, data)
        assert texts_of(read_input(path, "body")) == ["first", "a\r\nb"]


def test_txt_keeps_a_bom_and_a_non_json_text(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbf{not json}\r\n")
    assert texts_of(read_input(path)) == ["\ufeff{not json}\r\n"]


# -- pieces ------------------------------------------------------------------------------------

TRICKY = (
    '\ufeff{"text": "first \u00e9\u4e2d\U0001f389"}\n'  # a BOM, 2-, 3- and 4-byte characters
    "\n"
    '{"text": "crlf\\r\\n", "x": "\u00e9\u00e9\u00e9"}\r\n'
    '   \n{"text": ""}\n'
    '{"text": "<|endoftext|>\u4e2d"}\n'
    '{"text": "no trailing newline \U0001f389"}'
).encode()


@pytest.mark.parametrize("target", [1, 2, 3, 5, 7, 13, 64, 100, 10**9])
def test_jsonl_pieces_add_up_to_the_whole_file(tmp_path: Path, target: int) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", TRICKY)
    whole = texts_of(read_input(path))
    assert whole == ["first é中🎉", "crlf\r\n", "", "<|endoftext|>中", "no trailing newline 🎉"]
    pieces = plan_pieces(path, target)
    assert pieces == plan_pieces(path, target)  # deterministic
    assert pieces_texts(path, target) == whole
    # Contiguous byte ranges that cover the file, each of about `target` bytes.
    assert pieces[0].start == 0 and (pieces[-1].stop in (None, len(TRICKY)))
    assert all(a.stop == b.start for a, b in itertools.pairwise(pieces))
    assert sum(piece.size for piece in pieces) == len(TRICKY)
    assert all(piece.size <= target and piece.format == "jsonl" for piece in pieces)
    if len(pieces) > 1:  # split reads name byte offsets, which are where the lines start
        for piece in pieces:
            for document in read_piece(piece):
                offset = int(document.where.rsplit(":byte ", 1)[1])
                assert offset == 0 or TRICKY[offset - 1 : offset] == b"\n"


@settings(max_examples=60, deadline=None, database=None)
@given(
    texts=st.lists(st.text(max_size=12), max_size=8),
    blank=st.lists(st.booleans(), max_size=8),
    trailing_newline=st.booleans(),
    ascii_only=st.booleans(),
    targets=st.lists(st.integers(1, 300), min_size=1, max_size=4),
)
def test_jsonl_pieces_property(
    texts: list[str],
    blank: list[bool],
    trailing_newline: bool,
    ascii_only: bool,
    targets: list[int],
) -> None:
    lines = []
    for index, text in enumerate(texts):
        if index < len(blank) and blank[index]:
            lines.append(" ")
        lines.append(json.dumps({"text": text}, ensure_ascii=ascii_only))
    data = "\n".join(lines).encode() + (b"\n" if trailing_newline else b"")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.jsonl"
        path.write_bytes(data)
        assert texts_of(read_input(path)) == texts
        for target in targets:
            assert pieces_texts(path, target) == texts


@pytest.mark.parametrize("target", [1, 50, 200, 400, 10**9])
def test_parquet_pieces_are_runs_of_row_groups(tmp_path: Path, target: int) -> None:
    texts = [f"row {i} " + "é" * (i % 5) for i in range(11)]
    path = write_parquet(tmp_path / "a.parquet", texts, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 6
    pieces = plan_pieces(path, target)
    assert pieces == plan_pieces(path, target)
    assert pieces_texts(path, target) == texts == texts_of(read_input(path))
    if target == 1:
        assert [(p.start, p.stop) for p in pieces] == [(g, g + 1) for g in range(6)]
    if target == 10**9:
        assert pieces == [Piece(str(path), "parquet", 0, None, pieces[0].size)]
    meta = pq.ParquetFile(path).metadata
    on_disk = sum(
        meta.row_group(g).column(c).total_compressed_size
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
    )
    assert sum(p.size for p in pieces) == on_disk
    assert all(p.size <= target for p in pieces if p.stop is not None and p.stop - p.start > 1)


def test_dataset_pieces_are_runs_of_data_files(tmp_path: Path) -> None:
    texts = [f"doc {i}\r\n" for i in range(9)]
    folder = write_dataset(tmp_path / "ds", texts, num_shards=3)
    assert [(p.start, p.stop) for p in plan_pieces(folder, 1)] == [(0, 1), (1, 2), (2, 3)]
    assert [(p.start, p.stop) for p in plan_pieces(folder, 10**9)] == [(0, None)]
    for target in (1, 3000, 10**9):
        assert pieces_texts(folder, target) == texts


@pytest.mark.parametrize("fmt", ["txt", "jsonl.gz", "jsonl.zst"])
def test_compressed_jsonl_and_txt_are_one_piece(tmp_path: Path, fmt: str) -> None:
    path = write_input(fmt, tmp_path, TEXTS * 20)
    size = path.stat().st_size
    assert plan_pieces(path, 1) == [Piece(str(path), fmt, 0, None, size)]
    with pytest.raises(ValueError, match="target_bytes"):
        plan_pieces(path, 0)


# -- errors ------------------------------------------------------------------------------------


def corrupt_in_the_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 16]) + data[middle + 16 :]


def big_jsonl(n: int = 3000) -> bytes:
    rng = random.Random(1)
    return jsonl_bytes([" ".join(rng.choice(["ab", "cde", "fg", "é"]) for _ in range(30))] * n)


def test_corrupt_and_truncated_gzip(tmp_path: Path) -> None:
    text = big_jsonl(30_000)  # several MB: more than the reader's buffer
    data = gzip.compress(text)
    cases = {
        "truncated": (data[: len(data) - 100], "Compressed file ended"),
        "bad_crc": (data[:-8] + bytes(b ^ 1 for b in data[-8:-4]) + data[-4:], "CRC check failed"),
        "not_gzip": (b"plain text, not gzip\n" * 10, "Not a gzipped file"),
    }
    for name, (blob, reason) in cases.items():
        path = tmp_path / f"{name}.jsonl.gz"
        path.write_bytes(blob)
        message = expect_error(
            lambda path=path: read_input(path), f"{path}: corrupt gzip data after ", reason
        )
        after = int(message.split(" after ")[1].split()[0])  # decompressed bytes before the fault
        if name == "not_gzip":
            assert after == 0
        else:
            assert 1_000_000 < after <= len(text), message
    # Damage inside the deflate stream: bad data or bad text, whichever is found first.
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(corrupt_in_the_middle(data))
    expect_error(lambda: read_input(path), f"{path}:")


def test_corrupt_and_truncated_zstd(tmp_path: Path) -> None:
    data = zstandard.ZstdCompressor(write_checksum=True).compress(big_jsonl())
    two_frames = data + zstandard.ZstdCompressor().compress(b'{"text": "x"}\n')
    cases = {
        "truncated": (data[: len(data) - 100], "ends inside the frame at byte 0"),
        "cut_second_frame": (two_frames[:-3], f"ends inside the frame at byte {len(data)}"),
        "cut_magic": (data + data[:2], f"ends inside the frame at byte {len(data)}"),
        "corrupt": (corrupt_in_the_middle(data), "corrupt zstd data after "),
        "not_zstd": (b"plain text, not zstd\n" * 10, "no zstd frame at byte 0"),
        "trailing_garbage": (data + b"garbage!", f"no zstd frame at byte {len(data)}"),
    }
    for name, (blob, part) in cases.items():
        path = tmp_path / f"{name}.jsonl.zst"
        path.write_bytes(blob)
        expect_error(lambda path=path: read_input(path), str(path), part)
    path = tmp_path / "good.jsonl.zst"
    path.write_bytes(two_frames + b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"abc")
    assert len(list(read_input(path))) == 3001  # a trailing skippable frame is fine


def test_bad_parquet_footer(tmp_path: Path) -> None:
    good = write_parquet(tmp_path / "good.parquet", TEXTS).read_bytes()
    cases = {"tiny": b"PAR1", "not_parquet": b"hello world" * 100, "cut": good[:-30]}
    for name, blob in cases.items():
        path = tmp_path / f"{name}.parquet"
        path.write_bytes(blob)
        for call in (lambda p=path: plan_pieces(p, 1000), lambda p=path: read_input(p)):
            expect_error(call, f"{path}: bad Parquet footer")


def test_corrupt_parquet_data(tmp_path: Path) -> None:
    texts = [os.urandom(200).hex() for _ in range(40)]
    path = write_parquet(tmp_path / "a.parquet", texts, row_group_size=10)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 3 : len(blob) // 3 + 300] = b"\xff" * 300
    path.write_bytes(bytes(blob))
    expect_error(lambda: read_input(path), f"{path}:row-group ", "corrupt Parquet data")


def test_arrow_column_errors(tmp_path: Path) -> None:
    missing = write_parquet(tmp_path / "missing.parquet", ["a"])
    expect_error(
        lambda: read_input(missing, "body"),
        f"{missing}: schema: no column 'body' ({TEXT_FIELD_SETTING})",
        "columns here: 'text', 'n'",
    )
    nulls = write_parquet(tmp_path / "nulls.parquet", ["a", "b", "c", None])
    expect_error(
        lambda: read_input(nulls), f"{nulls}:row-group 1 row 1: column 'text' is null, not a string"
    )
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers, row_group_size=2)
    expect_error(lambda: read_input(numbers), f"{numbers}:row-group 0: column 'text' holds int64")

    folder = write_dataset(tmp_path / "ds", ["a", None, "c"], num_shards=1)
    data_file = folder / "data-00000-of-00001.arrow"
    expect_error(
        lambda: read_input(folder),
        f"{data_file}:batch 0 row 1: column 'text' is null, not a string",
    )
    expect_error(lambda: read_input(folder, "body"), f"{data_file}: schema: no column 'body'")


def test_broken_dataset_folders(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "ds", ["a", "b", "c"], num_shards=2)
    first = folder / "data-00000-of-00002.arrow"
    first.write_bytes(first.read_bytes()[:-40])
    expect_error(lambda: read_input(folder), str(first), "Arrow")
    first.unlink()
    expect_error(lambda: plan_pieces(folder, 10), f"{first}: cannot read (No such file")
    expect_error(lambda: read_input(folder), f"{first}: cannot read (No such file")
    (folder / "state.json").write_text('{"_data_files": "nope"}')
    expect_error(lambda: read_input(folder), f'{folder / "state.json"}: expected "_data_files"')
    (folder / "state.json").write_text("{nope")
    expect_error(lambda: read_input(folder), f"{folder / 'state.json'}: not valid JSON")


JSONL_ERRORS = [
    (b'{"text": "ok"}\n{"text": "bad \xff byte"}\n', ":2: not UTF-8 text (byte 0xff at offset 29"),
    (b'{"text": "ok"}\n\n{"text": "ok"\n', ":3: not valid JSON (Expecting ',' delimiter, column"),
    (b'{"text": "ok"}\n["text"]\n', ":2: expected a JSON object, got array"),
    (b'"just a string"\n', ":1: expected a JSON object, got string"),
    (
        b'{"text": "ok"}\n{"body": "x", "id": 3}\n',
        f":2: no field 'text' ({TEXT_FIELD_SETTING}); fields here: 'body', 'id'",
    ),
    (b'{"text": null}\n', ":1: field 'text' is null, not a string"),
    (b'{"text": 12}\n', ":1: field 'text' is number, not a string"),
    (b'{"text": "ok"}\n{"text": "a \\ud800 b"}\n', ":2: text holds a lone surrogate"),
]


@pytest.mark.parametrize(("data", "part"), JSONL_ERRORS)
@pytest.mark.parametrize("fmt", JSONL_FORMATS)
def test_jsonl_errors_name_the_line(tmp_path: Path, fmt: str, data: bytes, part: str) -> None:
    path = write_jsonl(tmp_path / f"bad.{fmt}", data)
    if fmt != "jsonl" and "offset" in part:
        part += " of the decompressed text"
    expect_error(lambda: read_input(path), f"{path}{part}")


def test_split_reads_name_the_byte_offset(tmp_path: Path) -> None:
    data = b'{"text": "ok"}\n' * 10 + b'{"text": 5}\n' + b'{"text": "ok"}\n' * 10
    path = write_jsonl(tmp_path / "a.jsonl", data)
    expect_error(lambda: read_input(path), f"{path}:11: field 'text' is number")
    expect_error(lambda: pieces_texts(path, 40), f"{path}:byte 150: field 'text' is number")


def test_txt_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"line one\nline \xc3\x28 two\n")
    expect_error(lambda: read_input(path), f"{path}:2: not UTF-8 text (byte 0xc3 at offset 14)")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_unreadable_inputs(tmp_path: Path, fmt: str) -> None:
    if fmt == "hf_dataset":  # a folder that is not there is just a name without a suffix
        path = tmp_path / "dataset"
        expect_error(lambda: read_input(path), f"{path}: unsupported input type")
        return
    path = tmp_path / f"missing.{fmt}"
    expect_error(lambda: plan_pieces(path, 100), f"{path}: cannot read (No such file or directory)")
    expect_error(lambda: read_input(path), f"{path}: cannot read (No such file or directory)")
    path.mkdir()
    expect_error(lambda: read_input(path), f"{path}: unsupported input type")


# -- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_streaming_holds_one_document_at_a_time(tmp_path: Path, fmt: str) -> None:
    """~50 MB of JSONL, compressed: peak traced memory while reading stays far below it."""
    rng = random.Random(0)
    words = [os.urandom(rng.randint(2, 6)).hex() for _ in range(4000)]
    block = " ".join(rng.choice(words) for _ in range(1500))  # ~10 KB of text
    path = tmp_path / f"big.{fmt}"
    total = 0
    with open(path, "wb") as raw:
        if fmt == "jsonl.gz":
            sink = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1)
        else:
            sink = zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False)
        with sink:
            for i in range(5000):
                line = json.dumps({"text": f"{i} {block[i % 1000 :]}"}).encode() + b"\n"
                total += len(line)
                sink.write(line)
    assert total > 45_000_000
    tracemalloc.start()
    try:
        count = n_bytes = 0
        for document in read_input(path):
            count += 1
            n_bytes += len(document.text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 5000 and n_bytes > 45_000_000
    assert peak < 10_000_000, f"peak traced memory {peak / 1e6:.1f} MB"
