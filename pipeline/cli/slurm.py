"""`gpt3 slurm script` / `gpt3 slurm submit`: train a run as a SLURM batch job.

    gpt3 slurm script [--params params.yaml] [--set slurm.partition=gpu ...]   # review it
    gpt3 slurm submit [--wait] [same flags]                                     # run it

Both take `gpt3 train`'s config flags (the very same options) and build the config the same
way; `script` prints the batch script and submits nothing, `submit` writes it to
`<run_dir>/slurm/train.sbatch` (or `slurm.log_dir`), runs `sbatch` and prints the job id.
With `--wait` it returns when the job has ended (through any requeues) with the job's exit
code. The job trains whatever the config's `distributed.launcher` says; `slurm.launcher`
decides what starts the processes inside it. See `pipeline/slurm/script.py` for the protocol.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import click

from pipeline.cli.train import config_from_flags
from pipeline.cli.train import train as train_command

CONFIG_FLAGS = set(inspect.signature(config_from_flags).parameters)
"""`gpt3 train`'s options that build the config (not its launch flags such as --node_rank)."""

RESUME = click.Option(
    ["--resume_from_checkpoint"],
    type=click.Choice(["auto", "latest"]),
    default="auto",
    show_default=True,
    help="The first start's resume source; a requeued job always continues from `latest`.",
)


def _config_options() -> list[click.Parameter]:
    return [param for param in train_command.params if param.name in CONFIG_FLAGS]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def slurm() -> None:
    """Train as a SLURM batch job: review the script, submit it, wait for it."""


@slurm.command(params=[*_config_options(), RESUME])
def script(resume_from_checkpoint: str, **flags: Any) -> int:
    """Print the batch script for this config; nothing is written or submitted."""
    from pipeline.slurm.script import cpu_processes_warning, render_script, require_train_stage

    config = config_from_flags(**flags)
    _warn(cpu_processes_warning(config))
    click.echo(render_script(config, resume_from_checkpoint, train_stage=require_train_stage()),
               nl=False)  # fmt: skip
    return 0


@slurm.command(
    params=[
        *_config_options(),
        RESUME,
        click.Option(
            ["--wait"],
            is_flag=True,
            help="Return when the job has ended, with its exit code (`sbatch --wait`).",
        ),
    ]
)
def submit(resume_from_checkpoint: str, wait: bool, **flags: Any) -> int:
    """Write the batch script under the run directory, sbatch it, print the job id."""
    from pipeline.slurm.script import cpu_processes_warning
    from pipeline.slurm.submit import Submitted
    from pipeline.slurm.submit import submit as submit_job

    config = config_from_flags(**flags)
    _warn(cpu_processes_warning(config))

    def announce(job: Submitted) -> None:
        click.echo(job.job_id)  # stdout: the id alone, for `jobid=$(gpt3 slurm submit)`
        click.echo(f"submitted {_relative(job.script)}; output in {_relative(job.output)}",
                   err=True)  # fmt: skip

    job = submit_job(config, resume_from_checkpoint, wait=wait, on_submitted=announce)
    if job.exit_code is None:
        return 0
    click.echo(f"job {job.job_id} ended with exit code {job.exit_code}", err=True)
    return job.exit_code


def _warn(message: str | None) -> None:
    if message:
        click.echo(message, err=True)


def _relative(path: Path) -> str:
    """`path` from the working directory when it lies below it (shorter to read)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
