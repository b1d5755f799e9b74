"""Config sections for running on shared infrastructure: the SLURM job and the DVC remote.

Neither changes what a run computes (no DVC stage lists them, and auto-resume ignores them);
they say where and how it is scheduled and where its outputs are shared.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.schema_base import CrossFieldError, Section


class StorageConfig(Section):
    """The DVC remote `gpt3 remote` configures and `dvc push` / `dvc pull` use.

    No stage lists this section in its params: where the data is shared is not what the
    pipeline computes, so changing it never reruns a stage.
    """

    remote: str = Field(default="local", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Name of the remote in `.dvc/config` (made the default remote)."""
    url: str = Field(default="../gpt3-dvc-storage", min_length=1)
    """A folder (a relative path is relative to the folder of params.yaml, the repository
    root) or any URL DVC supports: `/shared/dvc`, `s3://bucket/path`, `ssh://host/path`."""


_UNLIMITED = ("unlimited", "infinite")


def _slurm_seconds(text: str) -> int | None:
    """Seconds in a SLURM time limit (`90`, `02:00:00`, `1-12:00:00`); None for unlimited.

    SLURM's forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes, days-hours:minutes:seconds.
    """
    if text.strip().lower() in _UNLIMITED:
        return None
    days_text, dash, rest = text.strip().rpartition("-") if "-" in text else ("", "", text)
    parts = rest.split(":")
    numbers = [days_text, *parts] if dash else parts
    if not all(n.isdigit() for n in numbers) or len(parts) > 3:
        raise ValueError(
            f"{text!r} is not a SLURM time limit; e.g. 02:00:00, 1-12:00:00 or 90 (minutes)"
        )
    values = [int(n) for n in parts]
    if dash:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = [*values, 0, 0][:3]
        return ((int(days_text) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(values) == 3:
        return (values[0] * 60 + values[1]) * 60 + values[2]
    return values[0] * 60 + (values[1] if len(values) == 2 else 0)


class SlurmConfig(Section):
    """The batch job that `distributed.launcher: slurm` submits (`gpt3 slurm script` shows it).

    Nodes and processes per node come from `distributed`; this section holds what the scheduler
    needs besides. It changes where and how the run is scheduled, not what it computes.
    """

    partition: str | None = None
    """`--partition`; None: the cluster's default partition."""
    account: str | None = None
    """`--account` to charge; None: the user's default account."""
    time_limit: str | None = None
    """`--time`, e.g. `02:00:00` or `1-12:00:00`; None: the partition's default limit."""
    cpus_per_task: int | None = Field(default=None, ge=1)
    """CPUs of each node's one task, shared by that node's training processes; None: the
    cluster's default (often 1: set it, e.g. 8 per GPU)."""
    log_dir: str | None = None
    """Folder of the batch script and the job's output files; None: `<run_dir>/slurm`."""
    signal_seconds: int = Field(default=120, ge=1, le=65535)
    """SLURM sends the batch shell USR1 this long before the time limit; the training processes
    then checkpoint and the job requeues itself. Must cover one step plus a checkpoint save."""
    max_requeues: int = Field(default=10, ge=0)
    """How often the job may requeue itself (SLURM_RESTART_COUNT), so a job that never gets
    anywhere does not come back forever."""
    extra_sbatch: list[str] = Field(default_factory=list)
    """More `#SBATCH` options, one per item, e.g. `--qos=high` or `--constraint=a100`."""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    """What starts the training processes in the job: `srun torchrun` on every node, or the
    deepspeed launcher with a hostfile of the job's nodes."""
    port: int | None = Field(default=None, ge=1024, le=65535)
    """Rendezvous port on the first node; None: 29500 + job id % 1000, so jobs that share a
    node do not collide."""

    @field_validator("time_limit", mode="before")
    @classmethod
    def _time_limit_format(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(
                f"YAML read {value!r} as a number (unquoted 2:00:00 is 7200); quote the time "
                'limit: "02:00:00", "1-12:00:00" or "90" (minutes)'
            )
        if isinstance(value, str):
            _slurm_seconds(value)
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _extra_lines_are_options(cls, lines: list[str]) -> list[str]:
        cleaned = []
        for line in lines:
            option = line.strip().removeprefix("#SBATCH").strip()
            if not option.startswith("-") or "\n" in option:
                raise ValueError(f"{line!r} is not one sbatch option, e.g. --qos=high")
            cleaned.append(option)
        return cleaned

    @model_validator(mode="after")
    def _warning_fits_the_time_limit(self) -> SlurmConfig:
        limit = _slurm_seconds(self.time_limit) if self.time_limit else None
        if limit is not None and self.signal_seconds >= limit:
            raise CrossFieldError(
                f"signal_seconds ({self.signal_seconds}) must be shorter than time_limit "
                f"({self.time_limit} = {limit} s): the checkpoint warning would come at the start",
                "signal_seconds",
                "time_limit",
            )
        return self
