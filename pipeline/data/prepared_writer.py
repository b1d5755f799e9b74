"""Write one prepared folder's contents: the tokenizer, `<split>.bin` token files and meta.json.

Tokenizing runs in `data.num_workers` spawned processes over batches of whole documents; the
batches are written in corpus order, so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config.schema import Config
from pipeline.data.corpus import Corpus, Document
from pipeline.data.prepared import (
    META_FILE,
    SPLITS,
    InputMeta,
    PreparedMeta,
    Split,
    SplitMeta,
    TokenizerMeta,
    data_hash,
    dtype_name,
    token_dtype,
)
from pipeline.data.tokenizer import Builder, Tokenizer, open_tokenizer
from pipeline.hashing import file_sha256

TASKS_PER_WORKER = 4
"""Batches per worker: enough to balance uneven documents and move the progress bar."""
MIN_BATCH_BYTES = 1 << 16
MAX_BATCH_BYTES = 1 << 23


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


# --------------------------------------------------------------------------- the folder


def write_prepared(
    folder: Path,
    corpus: Corpus,
    split: tuple[list[int], list[int]],
    build: Builder,
    config: Config,
    progress: bool,
) -> PreparedMeta:
    """Fill `folder` (empty, temporary) with the tokenizer, token files and meta.json."""
    data = config.data
    docs: dict[Split, list[Document]] = {
        "train": [corpus.documents[i] for i in split[0]],
        "val": [corpus.documents[i] for i in split[1]],
    }
    tokenizer = build([doc.text for doc in docs["train"]], folder, progress)
    dtype = token_dtype(tokenizer.vocab_size)
    splits, outputs = _write_tokens(docs, tokenizer, folder, dtype, data.num_workers, progress)
    outputs = {tokenizer.file.name: file_sha256(tokenizer.file), **outputs}
    meta = PreparedMeta(
        data_hash=data_hash(
            dtype_name(dtype), tokenizer.vocab_size, tokenizer.eot_id, tokenizer.kind, outputs
        ),
        vocab_size=tokenizer.vocab_size,
        dtype=dtype_name(dtype),
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
