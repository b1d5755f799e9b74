"""The GPT-2 tokenizer path with a ranks file made here (issue 18, item 9).

GPT-2's `r50k_base.tiktoken` is not on an offline machine, so the end-to-end test beside
`test_prepare.py`'s always skipped. Here a small GPT-2-style ranks file (GPT-2's regex, a BPE
of 300 tokens learned from the corpus, `<|endoftext|>` after them) goes through the same code
the `gpt2` kind runs: `load_gpt2_style` (what `load_r50k` is with r50k's digest), encoding whole
documents into a prepared folder of kind `gpt2`, real training steps on it, generation and
decoding. The production check stays as it is and is shown to hold: the small file is refused
as r50k_base when preparing, and the trained model does not reopen as a GPT-2 model.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides

from pipeline.config.loader import load_config
from pipeline.data.prepare import prepare_data
from pipeline.data.prepared import (
    PreparedMeta,
    ShardMeta,
    SplitMeta,
    TokenizerMeta,
    data_hash,
    load_meta,
    open_stream,
)
from pipeline.data.tokenizer import R50K_FILE, load_gpt2_style, load_r50k
from pipeline.errors import UserError
from pipeline.evaluation.model_source import load_model
from pipeline.generation import iter_generate
from pipeline.hashing import file_sha256
from pipeline.model_artifact import load_model_dir
from pipeline.training.run import train


def _ranks_file(path: Path, corpus: str, n_vocab: int = 300) -> None:
    from tiktoken._educational import bpe_train
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = bpe_train(corpus, n_vocab, r50k_pat_str, visualise=None)
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ordered))


def _prepare_by_hand(folder: Path, ranks: Path, documents: list[str]) -> PreparedMeta:
    """A prepared folder of kind `gpt2` written with the tokenizer `load_gpt2_style` returns."""
    folder.mkdir(parents=True)
    (folder / R50K_FILE).write_bytes(ranks.read_bytes())
    digest = hashlib.sha256(ranks.read_bytes()).hexdigest()
    tokenizer = load_gpt2_style(folder / R50K_FILE, "small", digest)
    splits, outputs = {}, {R50K_FILE: digest}
    for split, docs in (("train", documents[:-1]), ("val", documents[-1:])):
        ids = [i for doc in docs for i in [*tokenizer.encode(doc), tokenizer.eot_id]]
        name = f"{split}-00000-000.bin"
        np.asarray(ids, dtype="<u2").tofile(folder / name)
        outputs[name] = file_sha256(folder / name)
        splits[split] = SplitMeta(
            shards=[ShardMeta(file=name, tokens=len(ids))], documents=len(docs),
            tokens=len(ids), text_bytes=sum(len(d.encode()) for d in docs),
        )  # fmt: skip
    meta = PreparedMeta(
        data_hash=data_hash("uint16", tokenizer.vocab_size, tokenizer.eot_id, "gpt2", outputs),
        vocab_size=tokenizer.vocab_size, dtype="uint16", eot_id=tokenizer.eot_id,
        tokenizer=TokenizerMeta(kind="gpt2", file=R50K_FILE), seed=0, val_fraction=0.2,
        source="files", splits=splits, empty_documents_skipped=0, inputs=[], outputs=outputs,
    )  # fmt: skip
    (folder / "meta.json").write_text(meta.model_dump_json(indent=2))
    return meta


def test_gpt2_path_with_a_small_ranks_file(small_corpus_dir: Path, tmp_path: Path) -> None:
    plays = [p.read_text() for p in sorted(small_corpus_dir.glob("*.txt"))]
    ranks = tmp_path / "small.tiktoken"
    _ranks_file(ranks, plays[0][:20_000])

    # The production check: the `gpt2` kind takes r50k_base and nothing else.
    with pytest.raises(UserError, match="not tiktoken's r50k_base"):
        load_r50k(ranks)
    refused = tmp_path / "refused"
    config = load_config(overrides={
        "data.sources": {}, "data.source": "files", "data.inputs": [str(small_corpus_dir / "*")],
        "data.tokenizer": "gpt2", "data.tiktoken_file": str(ranks),
        "data.prepared_dir": str(refused), "training.max_steps": 1,
        "training.global_batch_size": 8,
    })  # fmt: skip
    with pytest.raises(UserError, match="not tiktoken's r50k_base"):
        prepare_data(config)
    assert not refused.exists(), "prepare wrote something before refusing the file"

    # The same code with the small file's own digest: prepare, train, generate, decode.
    prepared = tmp_path / "prepared"
    meta = _prepare_by_hand(prepared, ranks, plays)
    assert (meta.vocab_size, meta.eot_id) == (301, 300) and load_meta(prepared) == meta
    tokenizer = load_gpt2_style(prepared / R50K_FILE, "small", meta.outputs[R50K_FILE])
    val = open_stream(prepared, "val").shards[0]
    assert tokenizer.decode(val[:-1].tolist()) == plays[-1], "encode/decode do not round-trip"

    run_dir = tmp_path / "run"
    result = train(load_config(overrides=tiny_overrides(prepared, run_dir,
                                                        {"training.max_steps": 4})),
                   console=False)  # fmt: skip
    assert sorted(result.losses) == [1, 2, 3, 4] and result.losses[4] < result.losses[1]
    model, _ = load_model_dir(run_dir / "model")  # weights and config: no tokenizer reopened
    assert model.vocab_size == 301
    ids = list(iter_generate(model, tokenizer.encode("ROMEO:"), 12, temperature=1.0, seed=0,
                             eot_id=tokenizer.eot_id))  # fmt: skip
    assert ids and all(0 <= i < 301 for i in ids)
    assert isinstance(tokenizer.decode(ids), str)
    # The trained model's folder carries the small file as r50k_base: it does not reopen as one.
    with pytest.raises(UserError, match="not tiktoken's r50k_base"):
        load_model(run_dir / "model")
