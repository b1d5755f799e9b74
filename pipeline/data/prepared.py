"""The prepared folder's format (`meta.json`, token files) and the readers later stages use.

Later stages read the result through `load_meta` and `open_tokens` (and
`pipeline.data.tokenizer.load_tokenizer`), which turn a missing or damaged folder into a
`DataError` that says what to do. `verify_prepared` re-hashes everything, for audits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.data.token_stream import TokenStream
from pipeline.errors import DataError
from pipeline.hashing import file_sha256

META_FILE = "meta.json"
FORMAT_VERSION = 2
"""2: each split is a list of token shards. 1 (one `<split>.bin` per split) is still read."""
Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")


# --------------------------------------------------------------------------- meta.json


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardMeta(_Strict):
    """One token shard of a split: a file of little-endian ids, documents never cut."""

    file: str
    tokens: int = Field(ge=1)


class SplitMeta(_Strict):
    """One split's token shards and what went into them.

    Format 1 named one `file`; it is read as a split of one shard, so folders prepared before
    sharding keep working (and keep their data_hash, which checkpoints record).
    """

    shards: list[ShardMeta]
    documents: int = Field(ge=1)
    tokens: int = Field(ge=1)
    text_bytes: int = Field(ge=0)
    """UTF-8 bytes of the split's text, end-of-text tokens not counted: for bits per byte."""

    @model_validator(mode="before")
    @classmethod
    def _format_1(cls, value: Any) -> Any:
        if isinstance(value, dict) and "file" in value and "shards" not in value:
            value = dict(value)
            value["shards"] = [{"file": value.pop("file"), "tokens": value.get("tokens")}]
        return value

    @model_validator(mode="after")
    def _tokens_add_up(self) -> SplitMeta:
        if sum(shard.tokens for shard in self.shards) != self.tokens:
            raise ValueError("the shards' tokens do not add up to the split's tokens")
        return self


class SampleMeta(_Strict):
    """What the trained BPE learned from: a seeded sample of the train split."""

    documents: int = Field(ge=0)
    text_bytes: int = Field(ge=0)
    limit_bytes: int = Field(ge=1)
    """`data.tokenizer_sample_bytes` at the time."""


class InputMeta(_Strict):
    path: str
    sha256: str
    bytes: int = Field(ge=0)


class TokenizerMeta(_Strict):
    kind: str
    """A name in `pipeline.data.tokenizer.TOKENIZER_KINDS`."""
    file: str
    """Its file in the prepared folder."""
    vocab_size_requested: int | None = None
    """`data.vocab_size` for a trained BPE (a small corpus can yield fewer tokens)."""


class PreparedMeta(_Strict):
    """The contents of meta.json: everything later stages need to read the token files."""

    format_version: Literal[1, 2] = FORMAT_VERSION
    data_hash: str
    """sha256 over the output files' hashes, dtype, vocab and tokenizer kind: names this data."""
    vocab_size: int = Field(ge=2)
    dtype: Literal["uint16", "uint32"]
    """Of the token files, little-endian."""
    eot_id: int = Field(ge=0)
    tokenizer: TokenizerMeta
    seed: int
    val_fraction: float
    source: str
    """The source's name (one source: `shakespeare` or `files`)."""
    splits: dict[Split, SplitMeta]
    empty_documents_skipped: int = Field(ge=0)
    inputs: list[InputMeta]
    outputs: dict[str, str]
    """sha256 of every output file but meta.json itself, by file name."""
    tokenizer_sample: SampleMeta | None = None
    """A trained BPE's sample (format 2)."""
    task_bytes: int | None = None
    """`data.task_bytes` at the time: it decides the shard layout (format 2)."""

    @model_validator(mode="after")
    def _complete(self) -> PreparedMeta:
        missing = [split for split in SPLITS if split not in self.splits]
        if missing:
            raise ValueError(f"splits {missing} missing")
        return self


def data_hash(dtype: str, vocab_size: int, eot_id: int, kind: str, outputs: dict[str, str]) -> str:
    """One hash for the prepared data: equal hashes mean interchangeable token files."""
    canonical = json.dumps(
        {
            "dtype": dtype,
            "vocab_size": vocab_size,
            "eot_id": eot_id,
            "tokenizer": kind,
            "outputs": outputs,
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves the files and the memory map), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> Literal["uint16", "uint32"]:
    """The name meta.json records for a `token_dtype`."""
    return "uint16" if dtype.itemsize == 2 else "uint32"


# --------------------------------------------------------------------------- readers


def load_meta(prepared_dir: str | Path) -> PreparedMeta:
    """The prepared folder's meta.json, validated; a missing or damaged one is a DataError."""
    folder = Path(prepared_dir)
    file = folder / META_FILE
    if not folder.is_dir():
        raise DataError(f"{folder}: no prepared data; run `gpt3 prepare` (the DVC stage) first")
    if not file.is_file():
        raise DataError(f"{file}: missing, so {folder} is not prepared data; run prepare again")
    try:
        return PreparedMeta.model_validate_json(file.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "top level"
        raise DataError(
            f"{file}: corrupt or from another version ({where}: {first['msg']}); prepare again"
        ) from None


def _open_shard(folder: Path, shard: ShardMeta, dtype_name_: str) -> np.memmap:
    path = folder / shard.file
    if not path.is_file():
        raise DataError(f"{path}: token file missing; prepare again")
    dtype = np.dtype(dtype_name_).newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {dtype_name_} tokens (truncated or "
            "corrupt); prepare again"
        )
    if size // dtype.itemsize != shard.tokens:
        raise DataError(
            f"{path}: holds {size // dtype.itemsize} tokens but meta.json says {shard.tokens}; "
            "prepare again"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _split_meta(folder: Path, split: str, meta: PreparedMeta) -> SplitMeta:
    if split not in meta.splits:
        raise DataError(f"{folder}: no split {split!r}; splits are {', '.join(meta.splits)}")
    return meta.splits[split]  # type: ignore[index]


def open_stream(
    prepared_dir: str | Path, split: str, meta: PreparedMeta | None = None
) -> TokenStream:
    """One split's token ids as one array-like stream over memory-mapped shards."""
    folder = Path(prepared_dir)
    meta = meta if meta is not None else load_meta(folder)
    info = _split_meta(folder, split, meta)
    return TokenStream(
        [_open_shard(folder, shard, meta.dtype) for shard in info.shards],
        vocab_size=meta.vocab_size,
        names=[str(folder / shard.file) for shard in info.shards],
    )


def open_tokens(
    prepared_dir: str | Path, split: str, meta: PreparedMeta | None = None
) -> TokenStream | np.memmap:
    """A split's token ids: the memory map itself for one shard, else a `TokenStream`."""
    stream = open_stream(prepared_dir, split, meta)
    return stream.shards[0] if len(stream.shards) == 1 else stream


def verify_prepared(prepared_dir: str | Path) -> PreparedMeta:
    """Re-hash every output file against meta.json (reads all of it: for audits and tests)."""
    folder = Path(prepared_dir)
    meta = load_meta(folder)
    for name, expected in meta.outputs.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing; prepare again")
        if file_sha256(path) != expected:
            raise DataError(f"{path}: sha256 differs from meta.json (modified?); prepare again")
    recomputed = data_hash(
        meta.dtype, meta.vocab_size, meta.eot_id, meta.tokenizer.kind, meta.outputs
    )
    if recomputed != meta.data_hash:
        raise DataError(f"{folder / META_FILE}: data_hash does not match its contents")
    return meta
