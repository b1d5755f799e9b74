"""`gpt3 prepare` (and the DVC stages `stages/prepare.py`): text -> tokenizer -> token shards.

Flags override `params.yaml` (the last layer of the config precedence); the library does the
work and raises, and `run_command` turns its errors into one line and exit code 2. `--input`
prepares those files as one source (whatever `data.sources` says); with a mixture in
params.yaml, `--tokenizer_only` and `--source NAME` run the DVC stages' parts on their own.
"""

from __future__ import annotations

import click

from pipeline.config.loader import load_config
from pipeline.config.schema import DataConfig
from pipeline.data.prepare import prepare_data
from pipeline.data.tokenizer import TOKENIZER_KINDS
from pipeline.errors import ConfigError


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
    help="A glob of .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files or save_to_disk folders "
    "(repeatable): prepares them as one source (data.source=files), ignoring data.sources.",
)
@click.option("--jsonl_field", help="The JSONL field / Parquet column of each document's text.")
@click.option("--source", "source_name", help="Prepare only this source of data.sources.")
@click.option(
    "--tokenizer_only",
    is_flag=True,
    help="Build only a mixture's shared tokenizer (data.tokenizer_dir).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "datatrove", "datatrove_slurm"]),
    help="Who runs the tasks: a local process pool, DataTrove here, or DataTrove on SLURM.",
)
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
    source_name: str | None,
    tokenizer_only: bool,
    executor: str | None,
    tiktoken_file: str | None,
    prepared_dir: str | None,
    progress: bool,
) -> None:
    """Split documents into train/val, build the tokenizer, write the token shards."""
    overrides = {
        "seed": seed,
        "data.tokenizer": tokenizer,
        "data.vocab_size": vocab_size,
        "data.val_fraction": val_fraction,
        "data.num_workers": num_workers,
        "data.executor": executor,
        "data.jsonl_field": jsonl_field,
        "data.tiktoken_file": tiktoken_file,
        "data.prepared_dir": prepared_dir,
    }
    config = load_config(params_file=params_file, overrides=overrides)
    if inputs:  # one source from these files, in place of whatever params.yaml names
        values = config.data.model_dump()
        values.update(sources={}, source="files", inputs=list(inputs))
        config.data = DataConfig.model_validate(values)
    if (source_name or tokenizer_only) and not config.data.sources:
        raise ConfigError("--source/--tokenizer_only: data.sources names no mixture")
    summaries = prepare_data(
        config, progress=progress, source=source_name, tokenizer_only=tokenizer_only
    )
    if tokenizer_only:
        click.echo(f"tokenizer ({config.data.tokenizer}) -> {config.data.tokenizer_dir}")
    for summary in summaries:
        click.echo(summary.line())
