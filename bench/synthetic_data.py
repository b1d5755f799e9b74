"""Synthetic prepared data for benchmarks: uniform random tokens in the prepare stage's format.

Random tokens keep the benchmarks independent of any corpus and make GPT-3 shapes (vocabulary
50304, as the reference figures use) possible without a tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.prepared import META_FILE, PreparedMeta


def synthetic_prepared(folder: Path, vocab: int, tokens: int, seed: int = 0) -> Path:
    """train.bin/val.bin of uniform random tokens plus a meta.json that the loaders accept."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    splits = {}
    for split, count in (("train", tokens), ("val", max(tokens // 10, 4096))):
        rng.integers(0, vocab, count, dtype=np.int64).astype(dtype).tofile(folder / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "documents": 1, "tokens": count, "text_bytes": 0}
    meta = PreparedMeta(
        data_hash="synthetic",
        vocab_size=vocab,
        dtype=dtype,
        eot_id=0,
        tokenizer={"kind": "bpe", "file": "tokenizer.json"},
        seed=seed,
        val_fraction=0.1,
        source="synthetic",
        splits=splits,
        empty_documents_skipped=0,
        inputs=[],
        outputs={},
    )
    (folder / META_FILE).write_text(meta.model_dump_json(indent=2))
    return folder
