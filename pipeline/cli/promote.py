"""`gpt3 promote` / `stages/promote.py`: register a trained model, move `champion` if better.

    python stages/promote.py                       # the run params.yaml describes (DVC stage)
    gpt3 promote --run_dir experiments/other-run   # another run directory
    gpt3 promote --force                           # champion regardless of the metric

The run is found through `<run_dir>/model/tracking.json` (else its latest checkpoint); the
metric comes from `<run_dir>/metrics/eval.json` when the evaluate stage wrote it, else from
the run's final MLflow metrics. Prints the decision and both metric values.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.overrides import parse_set
from pipeline.config.loader import load_config


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False),
    help="params.yaml with the tracking and registry settings (default: ./params.yaml if present).",
)
@click.option("--run_dir", help="The experiment directory (default: experiments/<name>).")
@click.option("--run_id", help="Promote this MLflow run instead of the run directory's.")
@click.option("--model_name", help="Registered model name (default: registry.model_name).")
@click.option("--force", is_flag=True, help="Make it the champion even if it is not better.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any config key, e.g. --set registry.metric=val_perplexity.",
)
def promote(
    params_file: str | None,
    run_dir: str | None,
    run_id: str | None,
    model_name: str | None,
    force: bool,
    sets: tuple[str, ...],
) -> int:
    """Register the run's model; champion if it beats the current one, else challenger."""
    from pipeline.registry.promote import promote as run_promotion

    if params_file is None and Path("params.yaml").is_file():
        params_file = "params.yaml"
    flags = {"output_dir": run_dir, "registry.model_name": model_name}
    overrides = {**parse_set(sets), **{k: v for k, v in flags.items() if v is not None}}
    config = load_config(params_file=params_file, overrides=overrides)
    decision = run_promotion(config, run_id=run_id, force=force)
    for line in decision.lines():
        click.echo(line)
    return 0
