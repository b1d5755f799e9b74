"""`gpt3 plots [REV ...]`: `dvc plots show|diff`, rendered to HTML that works offline."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.plots import dvc_plot_specs, render_html


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("revisions", nargs=-1)
@click.option(
    "--out",
    "out_dir",
    default="dvc_plots",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for index.html and one page per plot.",
)
def plots(revisions: tuple[str, ...], out_dir: str) -> int:
    """Render the pipeline's loss curves (workspace, or REVISIONS/experiments compared)."""
    index = render_html(dvc_plot_specs(list(revisions)), Path(out_dir))
    click.echo(f"wrote {index}")
    return 0
