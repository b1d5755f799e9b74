"""`gpt3 prepare` (and the DVC stage `stages/prepare.py`): text -> tokenizer -> token files.

Flags override `params.yaml` (the last layer of the config precedence); the library does the
work and raises, and `run_command` turns its errors into one line and exit code 2.
"""

from __future__ import annotations

import click

from pipeline.config.loader import load_config
from pipeline.data.prepare import prepare_data
from pipeline.data.tokenizer import TOKENIZER_KINDS


@click.command("prepare")
@click.option(
    "--params",
    "params_file",
    default="params.yaml",
    show_default=True,
    help="The parameters file (its data section and seed are used).",
)
@click.option("--seed", type=int, help="Seed of the train/val split (overrides `seed`).")
@click.option(
    "--tokenizer",
    type=click.Choice(sorted(TOKENIZER_KINDS)),
    help="bpe: train a byte-level BPE on the train split; gpt2: tiktoken's r50k_base.",
)
@click.option("--vocab_size", type=int, help="Vocabulary size of the trained BPE.")
@click.option("--val_fraction", type=float, help="Fraction of documents held out for val.")
@click.option("--num_workers", type=int, help="Processes that tokenize in parallel.")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="GLOB",
    help="A .txt/.jsonl glob (repeatable); implies data.source=files.",
)
@click.option("--jsonl_field", help="The JSONL field that holds each document's text.")
@click.option("--tiktoken_file", help="A local r50k_base.tiktoken for --tokenizer gpt2.")
@click.option("--prepared_dir", help="Where train.bin, val.bin, meta.json and the tokenizer go.")
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Show progress bars on stderr.",
)
def prepare(
    params_file: str,
    seed: int | None,
    tokenizer: str | None,
    vocab_size: int | None,
    val_fraction: float | None,
    num_workers: int | None,
    inputs: tuple[str, ...],
    jsonl_field: str | None,
    tiktoken_file: str | None,
    prepared_dir: str | None,
    progress: bool,
) -> None:
    """Split documents into train/val, build the tokenizer, write the token files."""
    overrides = {
        "seed": seed,
        "data.tokenizer": tokenizer,
        "data.vocab_size": vocab_size,
        "data.val_fraction": val_fraction,
        "data.num_workers": num_workers,
        "data.source": "files" if inputs else None,
        "data.inputs": list(inputs) if inputs else None,
        "data.jsonl_field": jsonl_field,
        "data.tiktoken_file": tiktoken_file,
        "data.prepared_dir": prepared_dir,
    }
    config = load_config(params_file=params_file, overrides=overrides)
    summary = prepare_data(config, progress=progress)
    click.echo(summary.line())
