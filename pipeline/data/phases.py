"""The three passes of prepare over a source's tasks; each task is one call, on any machine.

- scan: hash every document; write its split key, sample key and size to a key file.
- sample (trained BPE only): write out the train documents the tokenizer sample chose.
- encode: tokenize every document into its split's token shards, in corpus order.

A `PhaseJob` is plain data (it pickles for a process pool, DataTrove or SLURM), and a task
writes only its own files, each through a temporary name and a rename, so a task that is
run again (a retry, a requeued array task) simply replaces what it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.doc_keys import KEY_DTYPE, Cut, chosen, sample_key, split_key
from pipeline.data.formats import RawDocument, read_piece
from pipeline.data.inputs import InputFile, Task, input_sha256
from pipeline.data.shards import ShardWriter
from pipeline.data.tokenizer import open_tokenizer
from pipeline.errors import DataError

ENCODE_BATCH_BYTES = 1 << 20
"""Text tokenized per batch before its ids are written."""
ENCODE_BATCH_IDS = 1 << 20
"""Ids held at most before writing, however long one document is."""
SAMPLE_PIECE_CHARS = 1 << 20
"""The BPE learns from sampled documents in pieces of about this size (cut where GPT-2's
pre-tokenizer always cuts, so the word counts, and the BPE, are those of whole documents)."""
ERRORS = "errors"
"""Folder of the work dir where a task that met bad input leaves its one-line message."""


@dataclass(frozen=True)
class Cuts:
    """What the scan decided, for the later passes."""

    positions: tuple[int, ...]
    """Corpus position of each task's first document."""
    val: Cut
    sample: Cut | None
    sample_offset: int = 0
    """Added to positions for the sample cut, which ranks the documents of every source."""


@dataclass(frozen=True)
class PhaseJob:
    """Everything a worker needs to run one task of one pass (picklable, no open files)."""

    phase: str
    """`scan`, `sample` or `encode`."""
    tasks: tuple[Task, ...]
    inputs: tuple[InputFile, ...]
    text_field: str
    seed: int
    work_dir: str
    """This source's scratch folder (shared by every machine)."""
    cuts: Cuts | None = None
    tokenizer_kind: str = ""
    tokenizer_dir: str = ""
    out_dir: str = ""
    dtype: str = "<u2"
    shard_max_tokens: int = 1 << 29

    def __call__(self, rank: int) -> None:
        try:
            {"scan": _scan, "sample": _sample, "encode": _encode}[self.phase](self, rank)
        except DataError as exc:
            _write_atomically(
                Path(self.work_dir) / ERRORS / f"{self.phase}-{rank:05d}.txt", str(exc).encode()
            )
            raise

    def narrowed(self, rank: int) -> tuple[PhaseJob, int]:
        """This job with only task `rank`'s task and inputs filled in (the rest None): what one
        worker needs, so dispatching N tasks does not pickle N copies of every task."""
        task = self.tasks[rank]
        tasks = tuple(t if i == rank else None for i, t in enumerate(self.tasks))
        needed = set(task.first_pieces)
        inputs = tuple(item if i in needed else None for i, item in enumerate(self.inputs))
        return replace(self, tasks=tasks, inputs=inputs), rank  # type: ignore[arg-type]

    def path(self, kind: str, rank: int, suffix: str) -> Path:
        return Path(self.work_dir) / kind / f"{rank:05d}{suffix}"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with partial.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _documents(task: Task, text_field: str) -> Iterator[tuple[RawDocument, bytes]]:
    """The task's non-empty documents with their UTF-8 bytes; empty ones yield b""."""
    for piece in task.pieces:
        for document in read_piece(piece, text_field):
            try:
                yield document, document.text.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(
                    f"{document.where}: text holds a lone surrogate (not valid Unicode)"
                ) from None


def _scan(job: PhaseJob, rank: int) -> None:
    task = job.tasks[rank]
    records: list[tuple[int, int, int]] = []
    empty = 0
    for _, data in _documents(task, job.text_field):
        if not data:
            empty += 1
            continue
        digest = hashlib.sha256(data).hexdigest()
        records.append((split_key(job.seed, digest), sample_key(job.seed, digest), len(data)))
    keys = np.array(records, dtype=KEY_DTYPE)
    hashes = {str(i): input_sha256(job.inputs[i].path) for i in task.first_pieces}
    _write_atomically(job.path("scan", rank, ".keys"), keys.tobytes())
    summary = {"documents": len(keys), "empty": empty, "input_sha256": hashes}
    _write_atomically(job.path("scan", rank, ".json"), json.dumps(summary).encode())


def read_keys(work_dir: str | Path, rank: int) -> np.ndarray:
    return np.fromfile(Path(work_dir) / "scan" / f"{rank:05d}.keys", dtype=KEY_DTYPE)


def read_scan_summary(work_dir: str | Path, rank: int) -> dict[str, Any]:
    return json.loads((Path(work_dir) / "scan" / f"{rank:05d}.json").read_text())


def _choices(job: PhaseJob, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Per non-empty document of the task: is it validation; is it in the tokenizer sample."""
    assert job.cuts is not None
    keys = read_keys(job.work_dir, rank)
    positions = np.arange(len(keys), dtype=np.uint64) + np.uint64(job.cuts.positions[rank])
    val = chosen(keys["split"], positions, job.cuts.val)
    if job.cuts.sample is None:
        return val, np.zeros(len(keys), dtype=bool)
    offset = positions + np.uint64(job.cuts.sample_offset)
    return val, ~val & chosen(keys["sample"], offset, job.cuts.sample)


def _sample(job: PhaseJob, rank: int) -> None:
    _, in_sample = _choices(job, rank)
    out = bytearray()
    index = 0
    for _, data in _documents(job.tasks[rank], job.text_field):
        if not data:
            continue
        if in_sample[index]:
            out += struct.pack("<Q", len(data)) + data
        index += 1
    _write_atomically(job.path("sample", rank, ".bin"), bytes(out))


def read_sample(work_dir: str | Path, ranks: int) -> Iterator[str]:
    """The sampled texts of every task, in corpus order, one at a time."""
    for rank in range(ranks):
        with (Path(work_dir) / "sample" / f"{rank:05d}.bin").open("rb") as handle:
            while header := handle.read(8):
                (size,) = struct.unpack("<Q", header)
                yield handle.read(size).decode("utf-8")


def _encode(job: PhaseJob, rank: int) -> None:
    is_val, _ = _choices(job, rank)
    scanned = read_keys(job.work_dir, rank)["split"]
    tokenizer = open_tokenizer(job.tokenizer_kind, job.tokenizer_dir)
    dtype = np.dtype(job.dtype)
    out = Path(job.out_dir)
    writers = {
        split: ShardWriter(out, f"{split}-{rank:05d}", job.shard_max_tokens)
        for split in ("train", "val")
    }
    stats = {split: {"documents": 0, "text_bytes": 0} for split in writers}
    batches: dict[str, list[str]] = {"train": [], "val": []}
    pending = dict.fromkeys(writers, 0)

    def flush(split: str) -> None:
        ids: list[int] = []
        for text in batches[split]:
            for piece_ids in tokenizer.encode_pieces(text):
                ids.extend(piece_ids)
                if len(ids) >= ENCODE_BATCH_IDS:  # a huge document: write as it goes
                    writers[split].write(np.asarray(ids, dtype=dtype))
                    ids = []
            ids.append(tokenizer.eot_id)
        writers[split].write(np.asarray(ids, dtype=dtype))
        batches[split], pending[split] = [], 0

    task = job.tasks[rank]
    index = 0
    for document, data in _documents(task, job.text_field):
        if not data:
            continue
        digest = hashlib.sha256(data).hexdigest()
        if index >= len(scanned) or split_key(job.seed, digest) != int(scanned[index]):
            raise DataError(
                f"{document.where}: the input changed while preparing (this document differs "
                "from what the scan read); prepare again once the inputs stay put"
            )
        split = "val" if is_val[index] else "train"
        index += 1
        batches[split].append(document.text)
        pending[split] += len(data)
        stats[split]["documents"] += 1
        stats[split]["text_bytes"] += len(data)
        if pending[split] >= ENCODE_BATCH_BYTES:
            flush(split)
    if index != len(scanned):
        raise DataError(
            f"{task.pieces[0].path}: the input changed while preparing ({index} documents "
            f"now, {len(scanned)} when scanned); prepare again once the inputs stay put"
        )
    result: dict[str, Any] = {}
    for split, writer in writers.items():
        flush(split)
        shards = writer.close()
        result[split] = {
            **stats[split],
            "shards": [{"file": s.file, "tokens": s.tokens, "sha256": s.sha256} for s in shards],
        }
    _write_atomically(job.path("encode", rank, ".json"), json.dumps(result).encode())


def read_encode_result(work_dir: str | Path, rank: int) -> dict[str, Any]:
    return json.loads((Path(work_dir) / "encode" / f"{rank:05d}.json").read_text())
