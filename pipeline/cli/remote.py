"""`gpt3 remote`: make params.yaml's `storage` section the repository's default DVC remote.

    gpt3 remote                                   # storage.remote -> storage.url, then:
    dvc push                                      # share data, checkpoints, model, metrics
    gpt3 remote --set storage.url=/shared/dvc     # another place, this once

params.yaml stays the one place that names the remote; this writes it into `.dvc/config`
(`dvc remote add --default --force`, so running it again changes nothing). Commit
`.dvc/config` and a colleague's `git clone && dvc pull` needs no setup. A relative folder is
taken relative to the folder of params.yaml (the repository root), as DVC reads paths
relative to the working directory and then stores them relative to `.dvc/`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from pipeline.cli.overrides import parse_set
from pipeline.config.loader import load_config
from pipeline.config.schema import StorageConfig
from pipeline.errors import UserError


def remote_add_command(storage: StorageConfig) -> list[str]:
    """The DVC command that makes `storage` the default remote (this interpreter's DVC)."""
    return [
        sys.executable,
        "-m",
        "dvc",
        "remote",
        "add",
        "--default",
        "--force",
        storage.remote,
        storage.url,
    ]


def configure_remote(storage: StorageConfig, root: Path) -> None:
    """Write `storage` into the DVC repository at `root`; a DVC refusal is a UserError."""
    proc = subprocess.run(remote_add_command(storage), cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(
            f"dvc remote add {storage.remote} {storage.url} (in {root}) failed: "
            f"{why[-1] if why else f'exit code {proc.returncode}'}"
        )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--params",
    "params_file",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="params.yaml with the storage section; its folder is the DVC repository.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set storage.url=/shared/dvc.",
)
def remote(params_file: str, sets: tuple[str, ...]) -> int:
    """Make params.yaml's storage.remote (at storage.url) the default DVC remote."""
    if not Path(params_file).is_file():
        raise UserError(f"{params_file}: no such file (run this in the repository root)")
    storage = load_config(params_file=params_file, overrides=parse_set(sets)).storage
    configure_remote(storage, Path(params_file).resolve().parent)
    click.echo(f"DVC remote {storage.remote!r} -> {storage.url} (the default; now `dvc push`)")
    return 0
