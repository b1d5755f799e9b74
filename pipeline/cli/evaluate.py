"""`gpt3 evaluate` / `stages/evaluate.py`: the usage guide's evaluation command line.

    python3 stages/evaluate.py --model_checkpoint experiments/tiny/model \
        --config configs/model_configs/tiny.yaml --benchmark lambada:data/lambada.jsonl

With no flags it evaluates what `params.yaml` describes (this is how DVC runs it): the model
`experiments/<name>/model`, the validation split of `data.prepared_dir`, the benchmarks in
`evaluation.benchmarks`. Without a params file, the run's own saved config is used.
Outputs: `<run_dir>/metrics/eval.json` (a DVC metric) and `<run_dir>/metrics/samples.md`, and
the numbers in the training run's MLflow record. That is the pipeline stage; evaluating any other
model (`--model_checkpoint` naming something else) writes beside that model or to `--output`,
and never to a run's tracked outputs or MLflow record (see `pipeline.evaluation.placement`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import click

from pipeline.config.loader import load_config
from pipeline.config.schema import Config
from pipeline.errors import ConfigError


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """`config` with dotted-key overrides applied, validated again."""
    values = config.model_dump(mode="json")
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        values[section][field] = value
    try:
        return Config.model_validate(values)
    except ValueError as exc:
        raise ConfigError(f"invalid evaluation settings: {exc}") from None


def format_metrics(metrics: dict[str, float]) -> str:
    """One `name  value` line per metric, aligned, for the terminal."""
    width = max(map(len, metrics), default=0)
    lines = []
    for name, value in metrics.items():
        if not math.isfinite(value):
            shown = str(value)
        elif value == int(value) and abs(value) >= 1:
            shown = f"{value:.0f}"
        else:
            shown = f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", "params_file", type=click.Path(dir_okay=False),
              help="params.yaml with the evaluation settings (default: ./params.yaml if present).")
@click.option("--model_checkpoint", "source",
              help="A model folder, checkpoint (.pt), run folder, or MLflow URI "
                   "(default: experiments/<name>/model from params).")
@click.option("--config", "model_config", type=click.Path(dir_okay=False),
              help="Model config the checkpoint must match (the checkpoint carries its own).")
@click.option("--benchmark", "benchmarks", multiple=True, metavar="NAME[:PATH]",
              help="Zero-shot task: lambada, hellaswag or multiple_choice, with a local JSONL "
                   "file (default <evaluation.benchmark_dir>/NAME.jsonl). Repeatable; replaces "
                   "evaluation.benchmarks.")
@click.option("--max_tokens", type=click.IntRange(min=1),
              help="Validation tokens to score (default: evaluation.max_tokens, else all).")
@click.option("--benchmark_limit", type=click.IntRange(min=1),
              help="Score only the first N examples of each benchmark.")
@click.option("--device", help="cpu, cuda, cuda:N or auto (default: training.device).")
@click.option("--output", type=click.Path(file_okay=False),
              help="Folder for eval.json and samples.md of an ad-hoc evaluation (default: beside "
                   "the evaluated model, e.g. <model folder>-eval).")
@click.option("--harness", type=click.Choice(["lm-eval"]),
              help="Score the benchmarks with lm-evaluation-harness on the model's HF export "
                   "instead (prints its numbers, writes nothing): the extra 'harness'.")
def evaluate(params_file: str | None, source: str | None, model_config: str | None,
             benchmarks: tuple[str, ...], max_tokens: int | None, benchmark_limit: int | None,
             device: str | None, output: str | None, harness: str | None) -> int:
    """Evaluate a trained model: validation metrics, zero-shot tasks and samples."""
    from pipeline.evaluation.model_source import check_model_config, open_model
    from pipeline.evaluation.placement import adhoc_output, check_adhoc_source, is_own_stage
    from pipeline.evaluation.run import METRICS_FILE, default_source, evaluate_run, metrics_dir
    from pipeline.evaluation.tracking_hook import resolve_tracking_uri

    logging.basicConfig(format="%(message)s", level=logging.WARNING)  # no-op if configured
    logging.getLogger("pipeline").setLevel(logging.INFO)  # progress lines go to stderr
    if harness:
        from pipeline.evaluation.harness import require_lm_eval

        require_lm_eval()  # before any model time
    if params_file is None and Path("params.yaml").is_file():
        params_file = "params.yaml"
    overrides: dict[str, Any] = {
        "evaluation.max_tokens": max_tokens,
        "evaluation.benchmark_limit": benchmark_limit,
        "evaluation.benchmarks": list(benchmarks) or None,
        "training.device": device,
    }
    base = load_config(params_file=params_file) if params_file else None
    where = source or (str(default_source(base)) if base else None)
    if where is None:
        raise ConfigError("no params.yaml here: pass --model_checkpoint (or --params)")
    own = is_own_stage(base, source) and output is None
    if not own:
        check_adhoc_source(where, output)  # before any model time
    target = base or Config()
    device_name = device or target.training.device
    with open_model(where, device_name, resolve_tracking_uri(target)) as loaded:
        if model_config:
            check_model_config(loaded, model_config)
        config = with_overrides(base or loaded.config, overrides)
        if harness:
            from pipeline.evaluation.harness import harness_metrics

            click.echo(format_metrics(harness_metrics(config, loaded)))
            return 0
        out = metrics_dir(config) if own else Path(output) if output else adhoc_output(loaded)
        metrics = evaluate_run(config, loaded, out_dir=out, track=own)
    click.echo(format_metrics(metrics))
    click.echo(f"wrote {out / METRICS_FILE}", err=True)
    return 0
