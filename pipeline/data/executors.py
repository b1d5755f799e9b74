"""Run one pass's tasks: here in a process pool, or through DataTrove locally or on SLURM.

The work itself (`PhaseJob`) is the same whichever runs it, and every task writes its own
files, so the result does not depend on the executor, the number of workers or machines.
DataTrove brings what a corpus job across machines needs and this project should not rebuild:
SLURM array jobs (bounded by `num_workers` at once) and per-task logs. Each prepare starts
from a clean work folder: tasks are not skipped across runs (a rerun redoes every pass).
"""

from __future__ import annotations

import multiprocessing
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config.schema import DataConfig
from pipeline.config.schema_cluster import SlurmConfig
from pipeline.data.phases import ERRORS, PhaseJob
from pipeline.errors import ConfigError, DataError


class LocalPool:
    """Spawned worker processes kept for every pass of one prepare (starting a pool of spawned
    interpreters costs about a second, per pass if made anew). Spawned, not forked: HF
    tokenizers' threads and fork do not mix.

    Workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and a worker
    killed by it while holding the pool's queue lock would hang `Pool.terminate`. Only the
    coordinator handles the interrupt, and on any error it terminates the pool.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None

    def imap(self, job: PhaseJob, ranks: range) -> Any:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(processes=self.workers, initializer=_ignore_sigint)
        return self._pool.imap(_RankRunner(), (job.narrowed(rank) for rank in ranks))

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: object) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if exc[0] is None:
            pool.close()
        else:
            pool.terminate()  # safe: no worker dies of SIGINT holding the queue's lock
        pool.join()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_phase(
    job: PhaseJob,
    data: DataConfig,
    slurm: SlurmConfig,
    on_done: Callable[[int], None] | None = None,
    pool: LocalPool | None = None,
) -> None:
    """Run every task of `job`; the first task's bad-input error is raised as a DataError.

    `pool` (local executor) is reused across passes; without one, a pool lives for this call.
    """
    count = len(job.tasks)
    try:
        if data.executor == "local":
            if pool is None:
                with LocalPool(data.num_workers) as own:
                    _run_local(job, count, own, on_done)
            else:
                _run_local(job, count, pool, on_done)
        elif data.executor == "datatrove":
            _run_datatrove_local(job, count, data.num_workers)
        else:
            _run_datatrove_slurm(job, count, data.num_workers, slurm)
    except DataError:
        raise
    except Exception as exc:
        _raise_task_error(job)
        raise DataError(
            f"prepare: a {job.phase} task failed ({type(exc).__name__}: {exc}); logs are under "
            f"{Path(job.work_dir) / 'logs'}"
        ) from exc
    _raise_task_error(job)
    missing = [r for r in range(count) if not _done_marker(job, r)]
    if missing:
        raise DataError(
            f"prepare: {len(missing)} of {count} {job.phase} tasks did not finish (first: task "
            f"{missing[0]}); logs are under {Path(job.work_dir) / 'logs'}"
        )


def _done_marker(job: PhaseJob, rank: int) -> bool:
    suffix = {"scan": ".json", "sample": ".bin", "encode": ".json"}[job.phase]
    return job.path(job.phase, rank, suffix).is_file()


def _raise_task_error(job: PhaseJob) -> None:
    folder = Path(job.work_dir) / ERRORS
    found = sorted(folder.glob(f"{job.phase}-*.txt")) if folder.is_dir() else []
    if found:
        raise DataError(found[0].read_text())


def _run_local(
    job: PhaseJob, count: int, pool: LocalPool, on_done: Callable[[int], None] | None
) -> None:
    """In this process for one worker or one task; else in the pool's processes."""
    if pool.workers == 1 or count == 1:
        for rank in range(count):
            job(rank)
            if on_done:
                on_done(rank)
        return
    for rank in pool.imap(job, range(count)):
        if on_done:
            on_done(rank)


class _RankRunner:
    """Runs one (job, rank) and returns the rank (a pool needs a picklable callable); each
    task is sent only its own part of the job (`PhaseJob.narrowed`)."""

    def __call__(self, narrowed: tuple[PhaseJob, int]) -> int:
        job, rank = narrowed
        job(rank)
        return rank


class DatatroveStep:
    """A DataTrove pipeline step that runs task `rank` of our job (DataTrove calls steps as
    `step(data, rank, world_size)`)."""

    def __init__(self, job: PhaseJob) -> None:
        self.job = job

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> Any:
        self.job(rank)
        return data


def _datatrove() -> Any:
    try:
        import datatrove.executor as executors
    except ImportError:
        raise ConfigError(
            "data.executor: datatrove needs the package: pip install 'gpt3-pipeline[corpus]'"
        ) from None
    return executors


def _logs(job: PhaseJob) -> str:
    return str(Path(job.work_dir) / "logs" / job.phase)


def _run_datatrove_local(job: PhaseJob, count: int, workers: int) -> None:
    executors = _datatrove()
    executor = executors.LocalPipelineExecutor(
        pipeline=[DatatroveStep(job)],
        tasks=count,
        workers=min(workers, count),
        logging_dir=_logs(job),
        start_method="spawn",
    )
    executor.run()


def _job_path_command() -> str:
    """The job script's first line: the folder of DataTrove's `launch_pickled_pipeline` first on
    PATH, so the array tasks find it (and with it this environment's Python and packages).

    sbatch passes on the submitting environment, but `.venv/bin/gpt3 prepare` runs without the
    venv activated, so PATH need not hold that folder, and every array task then failed at
    once (srun found no such command). Preferred: the script beside this interpreter (the
    environment this code runs in); else the one PATH finds.
    """
    beside = Path(sys.executable).parent / "launch_pickled_pipeline"
    found = str(beside) if beside.is_file() else shutil.which("launch_pickled_pipeline")
    if found is None:
        return "true"
    return f'export PATH={shlex.quote(str(Path(found).parent))}:"$PATH"'


def _run_datatrove_slurm(job: PhaseJob, count: int, workers: int, slurm: SlurmConfig) -> None:
    """One SLURM array job per pass; waits for it with `sbatch --wait` on a job that depends
    on it, so nothing here polls."""
    executors = _datatrove()

    class Executor(executors.SlurmPipelineExecutor):  # type: ignore[misc,name-defined]
        def launch_merge_stats(self) -> None:
            """DataTrove's stats summary job is not needed (and asks for 1 GB per CPU)."""

        def get_sbatch_args(self, max_array: int = 1) -> dict:
            """Without the options left unset (DataTrove writes `--partition` with no value)
            and without DataTrove's fixed 2 GB per CPU: the site's default memory applies, or
            `slurm.extra_sbatch`-style options the user gives."""
            args = super().get_sbatch_args(max_array)
            args.pop("mem-per-cpu", None)
            return {k: v for k, v in args.items() if v not in (None, "") or k == "requeue"}

    extra: dict[str, str] = {}
    if slurm.account:
        extra["account"] = slurm.account
    executor = Executor(
        pipeline=[DatatroveStep(job)],
        tasks=count,
        workers=workers,
        time=slurm.time_limit or "24:00:00",
        partition=slurm.partition or "",
        cpus_per_task=1,
        job_name=f"gpt3-prepare-{job.phase}",
        logging_dir=_logs(job),
        slurm_logs_folder=str(Path(_logs(job)) / "slurm"),
        sbatch_args=extra,
        env_command=_job_path_command(),
        requeue=False,
    )
    executor.run()
    if executor.job_id in (None, -1):  # every task was already done
        return
    subprocess.run(
        [
            "sbatch",
            "--wait",
            "--quiet",
            f"--dependency=afterany:{executor.job_id}",
            "--job-name=gpt3-prepare-wait",
            f"--output={Path(_logs(job)) / 'slurm' / 'wait.out'}",
            *([f"--partition={slurm.partition}"] if slurm.partition else []),
            *([f"--account={slurm.account}"] if slurm.account else []),
            "--wrap=true",
        ],
        check=False,
    )
