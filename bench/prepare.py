"""Throughput of the prepare stage's tokenizers on the default corpus (Shakespeare, about 5 MB).

Settings come from params.yaml (seed, val_fraction, ...) with the flags below on top. For each
tokenizer kind it prints encoding speed in one process (MB/s of text and tokens/s,
best of --repeat passes) and the whole prepare stage end to end (reading, the BPE's training,
--num_workers tokenizing processes, hashing, the atomic swap). gpt2 runs when its file is
available (--tiktoken_file, or tiktoken's cache); otherwise the line says why it was skipped.

    .venv/bin/python bench/prepare.py [--vocab_size 4096] [--num_workers 2] [--tiktoken_file F]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.loader import load_config
from pipeline.config.schema import Config
from pipeline.data.corpus import Document, read_corpus
from pipeline.data.prepare import prepare_data
from pipeline.data.tokenizer import TOKENIZER_KINDS, Tokenizer, load_tokenizer
from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def encode_speed(
    tokenizer: Tokenizer, documents: tuple[Document, ...], repeat: int
) -> tuple[int, float]:
    """(tokens, best seconds) to encode every document in this process."""
    best = float("inf")
    tokens = 0
    for _ in range(repeat):
        started = time.perf_counter()
        tokens = sum(len(tokenizer.encode(doc.text)) for doc in documents)
        best = min(best, time.perf_counter() - started)
    return tokens, best


def bench_kind(kind: str, config: Config, documents: tuple[Document, ...], repeat: int) -> str:
    """One line of figures for one tokenizer kind."""
    megabytes = sum(doc.n_bytes for doc in documents) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "prepared"
        settings = {"tokenizer": kind, "prepared_dir": str(folder)}
        run = config.model_copy(update={"data": config.data.model_copy(update=settings)})
        try:
            summary = prepare_data(run, progress=False)
        except UserError as exc:
            return f"{kind:5s} skipped: {exc}"
        tokens, seconds = encode_speed(load_tokenizer(folder), documents, repeat)
    return (
        f"{kind:5s} vocab {summary.meta.vocab_size:>6}: encode in 1 process "
        f"{megabytes / seconds:6.2f} MB/s, {tokens / seconds:>9,.0f} tokens/s "
        f"({tokens:,} tokens, {tokens / (megabytes * 1e6):.3f} tokens/byte) | prepare end to end "
        f"(num_workers={config.data.num_workers}) {summary.mb_per_s:5.2f} MB/s, "
        f"{summary.tokens / summary.seconds:>9,.0f} tokens/s ({summary.seconds:.1f} s)"
    )


@click.command()
@click.option("--vocab_size", default=4096, show_default=True, help="Vocabulary of the BPE.")
@click.option("--num_workers", default=2, show_default=True, help="Tokenizing processes.")
@click.option("--tiktoken_file", default=None, help="A local r50k_base.tiktoken for gpt2.")
@click.option("--repeat", default=2, show_default=True, help="Encoding passes (best counts).")
def main(vocab_size: int, num_workers: int, tiktoken_file: str | None, repeat: int) -> None:
    """Print MB/s and tokens/s of each tokenizer on the default corpus."""
    os.chdir(REPO_ROOT)  # params.yaml names its config files relative to the repo root
    overrides = {
        "data.source": "shakespeare",
        "data.inputs": [],
        "data.vocab_size": vocab_size,
        "data.num_workers": num_workers,
        "data.tiktoken_file": tiktoken_file,
    }
    config = load_config(params_file="params.yaml", overrides=overrides)
    documents = read_corpus(config.data).documents
    megabytes = sum(doc.n_bytes for doc in documents) / 1e6
    click.echo(f"default corpus: {len(documents)} documents, {megabytes:.2f} MB of text")
    for kind in TOKENIZER_KINDS:
        click.echo(bench_kind(kind, config, documents, repeat))


if __name__ == "__main__":
    main()
