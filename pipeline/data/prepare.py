"""The prepare stage: documents -> seeded train/val split -> tokenizer -> flat token files.

`prepare_data` checks everything first (config, inputs, tokenizer availability, the output
folder), then writes `train.bin`, `val.bin`, `meta.json` and the tokenizer file into a
temporary sibling folder and swaps it into `data.prepared_dir` by rename. An interrupted or
failed run therefore leaves the previous outputs as they were. The same inputs, seed and
settings give byte-identical outputs, whatever `num_workers`.

Later stages read the result through `load_meta` and `open_tokens` (and
`pipeline.data.tokenizer.load_tokenizer`), which turn a missing or damaged folder into a
`DataError` that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm import tqdm

from pipeline.config.schema import Config
from pipeline.data.corpus import Corpus, Document, read_corpus
from pipeline.data.tokenizer import Builder, Tokenizer, open_tokenizer, tokenizer_kind
from pipeline.errors import DataError

META_FILE = "meta.json"
FORMAT_VERSION = 1
Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")
TASKS_PER_WORKER = 4
"""Batches per worker: enough to balance uneven documents and move the progress bar."""
MIN_BATCH_BYTES = 1 << 16
MAX_BATCH_BYTES = 1 << 23


# --------------------------------------------------------------------------- meta.json


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitMeta(_Strict):
    """One split's token file and what went into it."""

    file: str
    documents: int = Field(ge=1)
    tokens: int = Field(ge=1)
    text_bytes: int = Field(ge=0)
    """UTF-8 bytes of the split's text, end-of-text tokens not counted: for bits per byte."""


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

    format_version: Literal[1] = FORMAT_VERSION
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
    splits: dict[Split, SplitMeta]
    empty_documents_skipped: int = Field(ge=0)
    inputs: list[InputMeta]
    outputs: dict[str, str]
    """sha256 of every output file but meta.json itself, by file name."""

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


def _dtype_name(dtype: np.dtype) -> Literal["uint16", "uint32"]:
    return "uint16" if dtype.itemsize == 2 else "uint32"


# --------------------------------------------------------------------------- splitting


def split_documents(
    documents: Sequence[Document], seed: int, val_fraction: float
) -> tuple[list[int], list[int]]:
    """Indices of the train and val documents, each list in corpus order.

    Documents are ranked by sha256(seed, document hash), so the split depends only on the seed
    and the texts, not on paths, file order or the Python version; the first
    round(n * val_fraction) go to val, with at least one document on each side.
    """
    n = len(documents)
    if n < 2:
        raise DataError(
            f"the corpus has {n} document; a split by document needs at least 2 (one train, "
            "one val): add documents, or split the text into several .txt files or jsonl lines"
        )
    n_val = min(n - 1, max(1, int(n * val_fraction + 0.5)))
    salt = f"{seed}:".encode()
    ranked = sorted(
        range(n), key=lambda i: (hashlib.sha256(salt + documents[i].sha256.encode()).digest(), i)
    )
    val = set(ranked[:n_val])
    return [i for i in range(n) if i not in val], sorted(val)


# --------------------------------------------------------------------------- tokenizing


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], dtype: np.dtype) -> np.ndarray:
    """The ids of `texts`, each document followed by the end-of-text id."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eot_id)
    return np.asarray(ids, dtype=dtype)


@dataclass(frozen=True)
class _EncodeTask:
    """What a worker process needs: it reopens the tokenizer from the folder being written."""

    kind: str
    folder: str
    dtype: str
    texts: tuple[str, ...]


def _encode_task(task: _EncodeTask) -> np.ndarray:
    tokenizer = open_tokenizer(task.kind, task.folder)
    return encode_documents(tokenizer, task.texts, np.dtype(task.dtype))


def _batches(documents: Sequence[Document], target_bytes: int) -> list[list[Document]]:
    """Consecutive runs of documents of about `target_bytes` each (order kept)."""
    batches: list[list[Document]] = []
    current: list[Document] = []
    size = 0
    for doc in documents:
        current.append(doc)
        size += doc.n_bytes
        if size >= target_bytes:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


@contextmanager
def _encoded(
    batches: Sequence[Sequence[Document]], tokenizer: Tokenizer, dtype: np.dtype, workers: int
) -> Iterator[Iterator[np.ndarray]]:
    """The id arrays of `batches`, in order, from `workers` processes (spawned, not forked:
    HF tokenizers' thread pool may already be running in this process)."""
    if workers == 1 or len(batches) <= 1:
        yield (encode_documents(tokenizer, [d.text for d in batch], dtype) for batch in batches)
        return
    tasks = [
        _EncodeTask(
            tokenizer.kind, str(tokenizer.file.parent), dtype.str, tuple(doc.text for doc in batch)
        )
        for batch in batches
    ]
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=min(workers, len(tasks))) as pool:
        yield pool.imap(_encode_task, tasks)


def _write_tokens(
    docs: dict[Split, list[Document]],
    tokenizer: Tokenizer,
    folder: Path,
    dtype: np.dtype,
    workers: int,
    progress: bool,
) -> tuple[dict[Split, SplitMeta], dict[str, str]]:
    """Tokenize both splits into `<split>.bin`, hashing as it writes; returns metas and hashes."""
    total = sum(doc.n_bytes for split in SPLITS for doc in docs[split])
    target = min(MAX_BATCH_BYTES, max(MIN_BATCH_BYTES, total // (workers * TASKS_PER_WORKER)))
    jobs = [(split, batch) for split in SPLITS for batch in _batches(docs[split], target)]
    files = {split: (folder / f"{split}.bin").open("wb") for split in SPLITS}
    hashes = {split: hashlib.sha256() for split in SPLITS}
    tokens = dict.fromkeys(SPLITS, 0)
    try:
        with (
            tqdm(
                total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress
            ) as bar,
            _encoded([batch for _, batch in jobs], tokenizer, dtype, workers) as results,
        ):
            for (split, batch), ids in zip(jobs, results, strict=True):
                view = memoryview(ids).cast("B")
                files[split].write(view)
                hashes[split].update(view)
                tokens[split] += len(ids)
                bar.update(sum(doc.n_bytes for doc in batch))
        for handle in files.values():
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        for handle in files.values():
            handle.close()
    metas = {
        split: SplitMeta(
            file=f"{split}.bin",
            documents=len(docs[split]),
            tokens=tokens[split],
            text_bytes=sum(doc.n_bytes for doc in docs[split]),
        )
        for split in SPLITS
    }
    return metas, {f"{split}.bin": hashes[split].hexdigest() for split in SPLITS}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_prepared(
    folder: Path,
    corpus: Corpus,
    split: tuple[list[int], list[int]],
    build: Builder,
    config: Config,
    progress: bool,
) -> PreparedMeta:
    data = config.data
    docs: dict[Split, list[Document]] = {
        "train": [corpus.documents[i] for i in split[0]],
        "val": [corpus.documents[i] for i in split[1]],
    }
    tokenizer = build([doc.text for doc in docs["train"]], folder, progress)
    dtype = token_dtype(tokenizer.vocab_size)
    splits, outputs = _write_tokens(docs, tokenizer, folder, dtype, data.num_workers, progress)
    outputs = {tokenizer.file.name: sha256_file(tokenizer.file), **outputs}
    meta = PreparedMeta(
        data_hash=data_hash(
            _dtype_name(dtype), tokenizer.vocab_size, tokenizer.eot_id, tokenizer.kind, outputs
        ),
        vocab_size=tokenizer.vocab_size,
        dtype=_dtype_name(dtype),
        eot_id=tokenizer.eot_id,
        tokenizer=TokenizerMeta(
            kind=tokenizer.kind,
            file=tokenizer.file.name,
            vocab_size_requested=data.vocab_size if tokenizer.kind == "bpe" else None,
        ),
        seed=config.seed,
        val_fraction=data.val_fraction,
        source=data.source,
        splits=splits,
        empty_documents_skipped=corpus.empty_skipped,
        inputs=[InputMeta(path=f.path, sha256=f.sha256, bytes=f.bytes) for f in corpus.inputs],
        outputs=outputs,
    )
    with (folder / META_FILE).open("w", encoding="utf-8") as handle:
        handle.write(meta.model_dump_json(indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return meta


# --------------------------------------------------------------------------- atomic output


def _check_target(target: Path) -> None:
    """Refuse to replace anything that is not earlier prepared data (e.g. `data/` itself)."""
    if target.exists() and not target.is_dir():
        raise DataError(f"data.prepared_dir: {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / META_FILE).is_file():
        raise DataError(
            f"data.prepared_dir: {target} holds files but no {META_FILE}; refusing to replace a "
            "folder that is not prepared data (empty it or choose another data.prepared_dir)"
        )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_stale_siblings(target: Path) -> None:
    """Clear what a killed prepare left beside `target`: its temporary folder is deleted, and
    a previous output set aside for the swap is put back if the new one never arrived."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-")
    for sibling in sorted(target.parent.iterdir()):
        found = pattern.match(sibling.name)
        if found is None or _pid_alive(int(found.group(2))):
            continue
        if found.group(1) == "old" and not target.exists():
            os.rename(sibling, target)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename `new` to `target`, setting the old `target` aside first and deleting it after.

    Between the two renames `target` is briefly absent; a run killed right there leaves the
    old outputs beside it, and the next run's `_recover_stale_siblings` puts them back.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old)


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class PrepareSummary:
    """What `prepare_data` did, for the closing line and for callers (bench, tests)."""

    prepared_dir: Path
    meta: PreparedMeta
    seconds: float

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.meta.splits.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.meta.splits.values())

    @property
    def text_bytes(self) -> int:
        return sum(s.text_bytes for s in self.meta.splits.values())

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    def line(self) -> str:
        """One summary line: documents, tokens, throughput, where and which data."""
        train, val = self.meta.splits["train"], self.meta.splits["val"]
        skipped = self.meta.empty_documents_skipped
        return (
            f"prepared {self.documents} documents (train {train.documents}, val {val.documents})"
            f", {self.tokens:,} tokens (train {train.tokens:,}, val {val.tokens:,}) from "
            f"{self.text_bytes / 1e6:.2f} MB of text in {self.seconds:.1f} s "
            f"({self.mb_per_s:.2f} MB/s); {self.meta.tokenizer.kind} vocab {self.meta.vocab_size}"
            f" {self.meta.dtype} -> {self.prepared_dir} [data_hash {self.meta.data_hash[:12]}]"
            + (f"; {skipped} empty documents skipped" if skipped else "")
        )


def prepare_data(config: Config, progress: bool = True) -> PrepareSummary:
    """Run the prepare stage for `config`; see the module docstring for the guarantees."""
    started = time.perf_counter()
    data = config.data
    target = Path(data.prepared_dir).absolute()

    # Everything that can be wrong with the inputs is found before anything is written.
    _check_target(target)
    kind = tokenizer_kind(data.tokenizer)
    corpus = read_corpus(data)
    split = split_documents(corpus.documents, config.seed, data.val_fraction)
    build = kind.plan(data)

    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_stale_siblings(target)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        folder.chmod(0o755)  # mkdtemp makes it private; the outputs are ordinary data
        meta = _write_prepared(folder, corpus, split, build, config, progress)
        _swap_into_place(folder, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone already after a successful swap
    return PrepareSummary(Path(data.prepared_dir), meta, time.perf_counter() - started)


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


def open_tokens(
    prepared_dir: str | Path, split: str, meta: PreparedMeta | None = None
) -> np.memmap:
    """A read-only memory map of one split's token ids, checked against meta.json."""
    folder = Path(prepared_dir)
    meta = meta if meta is not None else load_meta(folder)
    if split not in meta.splits:
        raise DataError(f"{folder}: no split {split!r}; splits are {', '.join(meta.splits)}")
    info = meta.splits[split]  # type: ignore[index]
    path = folder / info.file
    if not path.is_file():
        raise DataError(f"{path}: token file missing; prepare again")
    dtype = np.dtype(meta.dtype).newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {meta.dtype} tokens (truncated or "
            "corrupt); prepare again"
        )
    if size // dtype.itemsize != info.tokens:
        raise DataError(
            f"{path}: holds {size // dtype.itemsize} tokens but meta.json says {info.tokens}; "
            "prepare again"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def verify_prepared(prepared_dir: str | Path) -> PreparedMeta:
    """Re-hash every output file against meta.json (reads all of it: for audits and tests)."""
    folder = Path(prepared_dir)
    meta = load_meta(folder)
    for name, expected in meta.outputs.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing; prepare again")
        if sha256_file(path) != expected:
            raise DataError(f"{path}: sha256 differs from meta.json (modified?); prepare again")
    recomputed = data_hash(
        meta.dtype, meta.vocab_size, meta.eot_id, meta.tokenizer.kind, meta.outputs
    )
    if recomputed != meta.data_hash:
        raise DataError(f"{folder / META_FILE}: data_hash does not match its contents")
    return meta
