"""`gpt3 rerun runs:/<run_id>`: train an MLflow run again from its record.

The same as `gpt3 train --rerun runs:/<run_id>`, under the name a user looks for; what it
checks and where it writes is in `pipeline/training/rerun.py`.
"""

from __future__ import annotations

import click

from pipeline.cli.train import train


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", metavar="runs:/RUN_ID")
@click.option(
    "--force",
    is_flag=True,
    help="Go on when the code or the prepared data differ from the run's (tagged rerun.forced).",
)
@click.option("--output_dir", help="Run directory (default <output_root>/<name>-rerun-<id>).")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change a key of the run's config (repeatable; tagged rerun.overrides).",
)
@click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False),
    help="params.yaml whose tracking.uri holds the run (default: ./params.yaml; "
    "MLFLOW_TRACKING_URI wins).",
)
@click.pass_context
def rerun(
    ctx: click.Context,
    run: str,
    force: bool,
    output_dir: str | None,
    sets: tuple[str, ...],
    params_file: str | None,
) -> int:
    """Train RUN again from its MLflow record: same config, same code, same data."""
    return ctx.invoke(
        train, rerun=run, force=force, output_dir=output_dir, sets=sets, params_file=params_file
    )
