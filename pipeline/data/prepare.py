"""The prepare stage: documents -> seeded train/val split -> tokenizer -> flat token files.

`prepare_data` checks everything first (config, inputs, tokenizer availability, the output
folder), then writes `train.bin`, `val.bin`, `meta.json` and the tokenizer file into a
temporary sibling folder and swaps it into `data.prepared_dir` by rename. An interrupted or
failed run therefore leaves the previous outputs as they were. The same inputs, seed and
settings give byte-identical outputs, whatever `num_workers`.

Later stages read the result through `load_meta` and `open_tokens` (and
`pipeline.data.tokenizer.load_tokenizer`), which turn a missing or damaged folder into a
`DataError` that says what to do.

This module is the stage and the public face of the modules behind it:
`pipeline.data.prepared` (the meta.json schema and the readers),
`pipeline.data.prepared_writer` (tokenizing into the token files and writing meta.json) and
`pipeline.data.atomic_swap` (putting the finished folder in place). Import from here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.schema import Config
from pipeline.data.atomic_swap import check_target, recover_stale_siblings, swap_into_place
from pipeline.data.corpus import Document, read_corpus
from pipeline.data.prepared import (
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    InputMeta,
    PreparedMeta,
    Split,
    SplitMeta,
    TokenizerMeta,
    data_hash,
    load_meta,
    open_tokens,
    token_dtype,
    verify_prepared,
)
from pipeline.data.prepared_writer import (
    MAX_BATCH_BYTES,
    MIN_BATCH_BYTES,
    TASKS_PER_WORKER,
    encode_documents,
    write_prepared,
)
from pipeline.data.tokenizer import tokenizer_kind
from pipeline.errors import DataError
from pipeline.hashing import file_sha256 as sha256_file

__all__ = [
    "FORMAT_VERSION",
    "MAX_BATCH_BYTES",
    "META_FILE",
    "MIN_BATCH_BYTES",
    "SPLITS",
    "TASKS_PER_WORKER",
    "InputMeta",
    "PrepareSummary",
    "PreparedMeta",
    "Split",
    "SplitMeta",
    "TokenizerMeta",
    "data_hash",
    "encode_documents",
    "load_meta",
    "open_tokens",
    "prepare_data",
    "sha256_file",
    "split_documents",
    "token_dtype",
    "verify_prepared",
]


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
    check_target(target)
    kind = tokenizer_kind(data.tokenizer)
    corpus = read_corpus(data)
    split = split_documents(corpus.documents, config.seed, data.val_fraction)
    build = kind.plan(data)

    target.parent.mkdir(parents=True, exist_ok=True)
    recover_stale_siblings(target)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        folder.chmod(0o755)  # mkdtemp makes it private; the outputs are ordinary data
        meta = write_prepared(folder, corpus, split, build, config, progress)
        swap_into_place(folder, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone already after a successful swap
    return PrepareSummary(Path(data.prepared_dir), meta, time.perf_counter() - started)
