"""`gpt3 dvc-exp runs:/<run_id>`: how to get a run's DVC experiment back (see
`pipeline/tracking/dvc_experiment.py`). Prints commands; runs nothing and writes nothing."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", metavar="runs:/RUN_ID")
@click.option(
    "--params",
    "params_file",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The params.yaml that `dvc exp run -S` will edit (its tracking.uri finds the run "
    "unless MLFLOW_TRACKING_URI is set).",
)
def dvc_exp(run: str, params_file: str) -> int:
    """Print `dvc exp apply NAME` and a `dvc exp run -S ...` line that recreate RUN's experiment."""
    from pipeline.errors import ConfigError
    from pipeline.tracking.dvc_experiment import recreate_lines
    from pipeline.tracking.run_metadata import git_head
    from pipeline.tracking.run_reader import parse_run_uri
    from pipeline.training.rerun import fetch_record, record_tracking_uri

    uri = parse_run_uri(run)
    if uri.path:
        raise ConfigError(f"gpt3 dvc-exp takes a run, runs:/{uri.run_id}, not an artifact ({run})")
    record, values = fetch_record(uri, record_tracking_uri(params_file))
    head = git_head()
    for line in recreate_lines(uri.run_id, record.data.tags, values, Path(params_file), head):
        click.echo(line)
    return 0
