"""Tokenizer speed per core: the pipeline's encode path against tiktoken's own batch encoder.

Offline there is no `r50k_base.tiktoken`, so GPT-2's BPE is stood in for by an encoding of the
same shape: GPT-2's regex, a byte-level BPE with GPT-2's vocabulary size learned here, through
the same `TiktokenTokenizer` class the pipeline uses (`--tiktoken_file` gives the real one).
Speed depends on the regex, the vocabulary size and the text, not on which merges were learned,
so the figures stand for GPT-2's. Also measured: the trained BPE (HF tokenizers) the default
pipeline uses, and the prepare passes other than tokenizing (reading, parsing, hashing), whose
speed bounds what a whole prepare can reach per core.

    python bench/tokenize_speed.py [--tiktoken_file r50k_base.tiktoken] [--mb 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # one core: HF tokenizers must not fan out
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from pipeline.data.inputs import shakespeare_files
from pipeline.data.tokenizer import (
    R50K_N_VOCAB,
    TiktokenTokenizer,
    gpt2_style_encoding,
    load_r50k,
    train_bpe,
)

GPT2_BYTES = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (what byte-level BPE vocabularies are written in)."""
    bs, cs = list(GPT2_BYTES), list(GPT2_BYTES)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def proxy_gpt2(texts: list[str]) -> TiktokenTokenizer:
    """A GPT-2-shaped tiktoken encoding: GPT-2's regex, a BPE of GPT-2's size learned on `texts`."""
    model = tokenizers.Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=R50K_N_VOCAB - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(texts, trainer)
    decode = _byte_decoder()
    ranks = {
        bytes(decode[ch] for ch in token): rank
        for token, rank in sorted(model.get_vocab().items(), key=lambda item: item[1])
    }
    return TiktokenTokenizer(gpt2_style_encoding("gpt2-proxy", ranks), Path("proxy"))


def corpus(megabytes: float) -> list[str]:
    """The default corpus's plays cut into ~4 KB documents, repeated to `megabytes`."""
    plays = [path.read_text(encoding="utf-8") for path in shakespeare_files()]
    documents = []
    for play in plays:
        lines = play.splitlines(keepends=True)
        for start in range(0, len(lines), 100):
            documents.append("".join(lines[start : start + 100]))
    out, size = [], 0
    while size < megabytes * 1e6:
        for document in documents:
            out.append(document)
            size += len(document.encode())
            if size >= megabytes * 1e6:
                break
    return out


def speed(label: str, encode, texts: list[str], total: int) -> float:
    started = time.perf_counter()
    encode(texts)
    rate = total / 1e6 / (time.perf_counter() - started)
    print(f"{label:<58} {rate:7.2f} MB/s")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiktoken_file", help="the real r50k_base.tiktoken, if you have it")
    parser.add_argument("--mb", type=float, default=20.0, help="MB of text to encode")
    args = parser.parse_args()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    texts = corpus(args.mb)
    total = sum(len(text.encode()) for text in texts)
    print(f"{total / 1e6:.1f} MB of text in {len(texts):,} documents; one core each\n")

    if args.tiktoken_file:
        gpt2 = load_r50k(Path(args.tiktoken_file))
        name = "GPT-2 r50k_base"
    else:
        gpt2 = proxy_gpt2(texts[: len(texts) // 4])
        name = f"GPT-2-shaped proxy ({gpt2.vocab_size} ids)"
    encoding = gpt2._encoding
    ceiling = speed(
        f"{name}: tiktoken encode_ordinary_batch (ceiling)",
        lambda batch: encoding.encode_ordinary_batch(batch, num_threads=1),
        texts,
        total,
    )
    ours = speed(
        f"{name}: the pipeline's encode (+ end of text)",
        lambda batch: [gpt2.encode(text) for text in batch],
        texts,
        total,
    )
    print(f"{'':<58} {ours / ceiling:7.0%} of the ceiling")
    with tempfile.TemporaryDirectory() as tmp:
        bpe = train_bpe(texts[: len(texts) // 8], 4096, Path(tmp) / "tokenizer.json")
        speed(
            "trained BPE 4096 (HF tokenizers): the pipeline's encode",
            lambda batch: [bpe.encode(text) for text in batch],
            texts,
            total,
        )


if __name__ == "__main__":
    main()
