"""Submit a run's batch script with `sbatch`, and optionally wait for the job's end.

`sbatch --wait` follows the job through its requeues (a requeued job is pending, not done)
and exits with the exit code of its last start, which is what DVC's train stage needs: the
stage ends when training does, with the same outputs as a local run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from pipeline.config.schema import Config
from pipeline.errors import UserError
from pipeline.redact import redact
from pipeline.slurm.script import (
    SCRIPT_NAME,
    check_resume,
    job_dir,
    job_name,
    render_script,
    require_train_stage,
)


@dataclass(frozen=True)
class Submitted:
    """A submitted job; `exit_code` is the job's own once `sbatch --wait` returned."""

    job_id: str
    script: Path
    output: Path
    """The job's stdout (`%j` filled in); stderr is beside it as `.err`."""
    exit_code: int | None = None


def sbatch_executable() -> str:
    """`sbatch` on PATH, or one clear error (this is not a SLURM login node)."""
    found = shutil.which("sbatch")
    if found is None:
        raise UserError(
            "sbatch not found on PATH: submit from a SLURM login node (or load the cluster's "
            "slurm module), or train here with distributed.launcher none/torchrun"
        )
    return found


def write_script(config: Config, resume: str | None = "auto") -> Path:
    """Render the job and write it to `<job dir>/train.sbatch` (the folder the job logs to).

    The folder must exist before the job starts: SLURM opens the output files first.
    """
    require_train_stage()
    text = render_script(config, check_resume(resume))
    folder = job_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / SCRIPT_NAME
    partial = script.with_name(f".{SCRIPT_NAME}.{os.getpid()}")
    partial.write_text(text)
    partial.chmod(0o755)
    os.replace(partial, script)  # a script being read by sbatch is never half-written
    return script


def submit(
    config: Config,
    resume: str | None = "auto",
    wait: bool = False,
    on_submitted: Callable[[Submitted], None] | None = None,
) -> Submitted:
    """Write the script and `sbatch` it; with `wait`, return once the job has ended.

    `on_submitted` hears of the job id as soon as SLURM has it (before a long wait).
    """
    sbatch = sbatch_executable()
    script = write_script(config, resume)
    command = [sbatch, "--parsable", *(["--wait"] if wait else []), str(script)]
    env = job_environment(config)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # `--parsable`: "<job id>[;<cluster>]" at submission
        job_id = first.strip().split(";")[0]
        if not job_id.isdigit():
            _, err = proc.communicate()
            message = (err.strip().splitlines() or [first.strip() or "no output"])[-1]
            raise UserError(f"sbatch could not submit {script}: {message}")
        submitted = Submitted(job_id, script, job_dir(config) / f"{job_name(config)}-{job_id}.out")
        if on_submitted is not None:
            on_submitted(submitted)
        try:
            proc.communicate()
        except KeyboardInterrupt:
            proc.kill()
            click.echo(f"job {job_id} keeps running; `scancel {job_id}` stops it", err=True)
            raise
    return Submitted(job_id, script, submitted.output, proc.returncode if wait else None)


def job_environment(config: Config) -> dict[str, str]:
    """sbatch's environment, which the job inherits: with the real tracking URI when the
    script could only carry it redacted (credentials never go into the script file)."""
    env = dict(os.environ)
    uri = config.tracking.uri
    if redact(uri) != uri and not env.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def submit_and_wait(config: Config, resume: str | None = None) -> int:
    """The DVC train stage with `launcher: slurm`: submit, wait, and exit as the job did."""

    def announce(job: Submitted) -> None:
        click.echo(
            f"submitted SLURM job {job.job_id} ({job.script}); waiting for it to end, "
            f"output in {job.output}",
            err=True,
        )
        sys.stderr.flush()

    job = submit(config, resume, wait=True, on_submitted=announce)
    assert job.exit_code is not None
    click.echo(f"SLURM job {job.job_id} ended with exit code {job.exit_code}", err=True)
    return job.exit_code
