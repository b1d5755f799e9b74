"""`gpt3 generate` / `stages/infer.py`: the usage guide's inference command line.

    python3 stages/infer.py --model_checkpoint experiments/tiny/model \
        --config configs/model_configs/tiny.yaml --prompt "Once upon a time" \
        --max_length 100 --temperature 0.7 --top_p 0.8

`--max_length` counts new tokens (the prompt is not included); generation also stops at
`<|endoftext|>`. The text streams to stdout as it is generated. `--model_checkpoint` takes a
model folder, checkpoint, run folder, or an MLflow model URI (`models:/NAME@champion`,
`runs:/RUN_ID/PATH`), whose artifacts are downloaded and searched for a model folder; the
tracking server is `MLFLOW_TRACKING_URI`, else `tracking.uri` from params.yaml.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import click

from pipeline.config.loader import load_config
from pipeline.config.schema import Config
from pipeline.errors import ConfigError


def stream_text(decode: Callable[[list[int]], str], ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; held back while the text ends in a partial character.

    A byte-level token can end in the middle of a UTF-8 character, which decodes to U+FFFD
    until the next token completes it, so the last piece waits for the complete text.
    """
    seen: list[int] = []
    shown = 0
    for token in ids:
        seen.append(token)
        text = decode(seen)
        if text.endswith("\ufffd"):
            continue
        yield text[shown:]
        shown = len(text)
    text = decode(seen)
    if len(text) > shown:
        yield text[shown:]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model_checkpoint", "source",
              help="Model folder, checkpoint (.pt), run folder, or MLflow URI (default: "
                   "experiments/<name>/model from params.yaml).")
@click.option("--config", "model_config", type=click.Path(dir_okay=False),
              help="Model config the checkpoint must match (the checkpoint carries its own).")
@click.option("--params", "params_file", type=click.Path(dir_okay=False),
              help="params.yaml for the default model and tracking URI (default: ./params.yaml).")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max_length", type=click.IntRange(min=0), default=100, show_default=True,
              help="New tokens to generate at most.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="0 is greedy.")
@click.option("--top_k", type=click.IntRange(min=1), help="Sample from the k most likely tokens.")
@click.option("--top_p", type=click.FloatRange(min=0.0, max=1.0, min_open=True),
              help="Sample from the smallest set of tokens holding this probability mass.")
@click.option("--seed", type=int, help="Same seed, same text (default: a fresh seed).")
@click.option("--no_cache", is_flag=True, help="Recompute the whole prefix at every step.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def generate(source: str | None, model_config: str | None, params_file: str | None, prompt: str,
             max_length: int, temperature: float, top_k: int | None, top_p: float | None,
             seed: int | None, no_cache: bool, device: str) -> int:
    """Generate text from a prompt with a trained model."""
    from pipeline.evaluation.model_source import check_model_config, open_model
    from pipeline.evaluation.tracking_hook import resolve_tracking_uri
    from pipeline.generation import iter_generate

    if params_file is None and Path("params.yaml").is_file():
        params_file = "params.yaml"
    config = load_config(params_file=params_file) if params_file else Config()
    if source is None:
        if params_file is None:
            raise ConfigError("no params.yaml here: pass --model_checkpoint")
        source = str(Path(config.run_dir) / "model")
    with open_model(source, device, resolve_tracking_uri(config)) as loaded:
        pass  # weights and tokenizer are in memory now: a download is removed here
    if model_config:
        check_model_config(loaded, model_config)
    tokenizer = loaded.tokenizer
    prompt_ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    tokens = iter_generate(
        loaded.model, prompt_ids, max_length, temperature=temperature, top_k=top_k,
        top_p=top_p, eot_id=tokenizer.eot_id, seed=seed, use_cache=not no_cache,
    )
    click.echo(prompt, nl=False)
    for piece in stream_text(tokenizer.decode, tokens):
        click.echo(piece, nl=False)
    click.echo()
    return 0
