"""The batch script of a run: its `#SBATCH` request, the training command, and the
preemption protocol (USR1 -> checkpoint -> requeue -> resume). Rendering writes nothing.

The script is self-contained: the resolved config is embedded in it and written beside the
job's output when the job starts, so the job trains exactly what `gpt3 slurm script` showed,
whatever happens to params.yaml while it waits in the queue, and a user may `sbatch` the
printed script by hand.

How a stop request reaches the training processes (measured with Slurm 22.05 and torch 2.13;
`tests/test_slurm.py` runs it):

- `--signal=B:USR1@<s>` signals only the batch shell. A shell trap passes it on with
  `kill -USR1 <srun pid>`; srun forwards it to its step, and slurmstepd signals every process
  of the step on every node: each node's torchrun agent and its workers alike.
- A worker's trainer (`StopRequested`) finishes its step, checkpoints and exits with 143.
- torchrun itself would die of USR1 (it handles only TERM, INT, HUP and QUIT by default),
  and the step would end under the workers while they still write the checkpoint.
  `PET_SIGNALS_TO_HANDLE` (its `--signals_to_handle`) adds USR1: the agent passes it on too
  and waits up to `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds for its workers before SIGKILL.
- The deepspeed launcher handles no USR1 at all, so with `slurm.launcher: deepspeed` it runs
  in its own process group in the batch shell and the trap signals that whole group; the
  shell then waits until the group's last process (the workers) has exited.
- Once the launcher returns non-zero after such a request, the script runs `scontrol requeue`
  (at most `max_requeues` times, counted by SLURM_RESTART_COUNT). The requeued job runs this
  script again and resumes with `--resume_from_checkpoint latest`, so even a run that had just
  finished is exported rather than started afresh. Without a request (a crash, exit 2 for
  bad input) nothing is requeued. A requeue, cancel or preemption by SLURM itself sends SIGTERM
  to every process: the workers checkpoint the same way, and SLURM decides about the requeue.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from pipeline.config.loader import dump_config
from pipeline.config.schema import Config
from pipeline.errors import ConfigError, UserError
from pipeline.redact import redact

TRAIN_STAGE = Path(__file__).resolve().parents[2] / "stages" / "train.py"
"""The command DVC runs; every training process of the job runs it too."""

SCRIPT_NAME = "train.sbatch"
CONFIG_END = "GPT3_CONFIG_END"
"""Heredoc terminator of the embedded config."""

RESUME_CHOICES = ("auto", "latest")
"""What the first start may resume from; a requeued start always continues from `latest`."""

TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""torchrun's default signal list plus USR1, the time-limit warning."""

DEFAULT_PORT_BASE = 29500


def job_dir(config: Config, workdir: Path | None = None) -> Path:
    """Folder of the script, the job's output and its config: absolute, from `workdir`."""
    folder = Path(config.slurm.log_dir or Path(config.run_dir) / "slurm")
    return (workdir or Path.cwd()).absolute() / folder


def job_name(config: Config) -> str:
    """The run's name as a SLURM job name (anything but letters, digits, `._-` becomes `_`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", config.name) or "gpt3"


def wants_gpus(config: Config) -> bool:
    """Request GPUs unless the run trains on the CPU: the login node cannot tell for `auto`."""
    return config.training.device != "cpu"


def cpu_processes_warning(config: Config) -> str | None:
    """A warning when several processes per node will train on CPUs: `training.device: cpu`
    (the default training config's) requests no GPUs, whatever `gpus_per_node` says."""
    per_node = config.distributed.gpus_per_node
    if wants_gpus(config) or per_node == 1:
        return None
    return (
        f"warning: training.device is cpu, so the job requests no GPUs and each node runs "
        f"{per_node} CPU processes (distributed.gpus_per_node); for GPUs add "
        "--set training.device=auto or a GPU training config"
    )


def check_resume(resume: str | None) -> str:
    """The first start's resume source; a requeued job must find its own checkpoints again."""
    resume = resume or "auto"
    if resume not in RESUME_CHOICES:
        raise ConfigError(
            f"--resume_from_checkpoint {resume}: a SLURM job resumes from 'auto' or 'latest' "
            "(after a requeue it continues from its own latest checkpoint); copy the "
            "checkpoint into the run's checkpoints folder to start from it"
        )
    return resume


def sbatch_lines(config: Config, workdir: Path) -> list[str]:
    """The `#SBATCH` request: resources, output files, and requeue on a time-limit warning."""
    slurm, dist = config.slurm, config.distributed
    out = job_dir(config, workdir) / job_name(config)
    options = [
        f"--job-name={job_name(config)}",
        f"--nodes={dist.num_nodes}",
        "--ntasks-per-node=1",  # one launcher per node starts gpus_per_node processes
    ]
    if wants_gpus(config):
        options.append(f"--gpus-per-node={dist.gpus_per_node}")
    if slurm.cpus_per_task is not None:
        options.append(f"--cpus-per-task={slurm.cpus_per_task}")
    if slurm.time_limit is not None:
        options.append(f"--time={slurm.time_limit}")
    if slurm.partition:
        options.append(f"--partition={shlex.quote(slurm.partition)}")
    if slurm.account:
        options.append(f"--account={shlex.quote(slurm.account)}")
    options += [
        f"--chdir={shlex.quote(str(workdir))}",
        f"--output={shlex.quote(f'{out}-%j.out')}",
        f"--error={shlex.quote(f'{out}-%j.err')}",
        "--open-mode=append",  # a requeued start adds to the same files
        "--requeue",
        f"--signal=B:USR1@{slurm.signal_seconds}",
        *slurm.extra_sbatch,
    ]
    return [f"#SBATCH {option}" for option in options]


def render_script(
    config: Config,
    resume: str | None = "auto",
    *,
    python: str | None = None,
    workdir: Path | None = None,
    train_stage: Path = TRAIN_STAGE,
) -> str:
    """The batch script that trains `config` (see the module docstring for the protocol).

    `python` is the interpreter the job uses (default: this one, so a shared filesystem is
    assumed, as it is for the run directory), `workdir` the job's working directory (default:
    this one, where relative paths in the config point from).
    """
    python = python or sys.executable
    workdir = (workdir or Path.cwd()).absolute()
    resume = check_resume(resume)
    config_text = dump_config(config)
    if CONFIG_END in config_text:
        raise ConfigError(f"the config contains the line {CONFIG_END!r}; rename that value")
    slurm, dist = config.slurm, config.distributed
    port = str(slurm.port) if slurm.port else f"$(({DEFAULT_PORT_BASE} + SLURM_JOB_ID % 1000))"
    train = f'{shlex.quote(str(train_stage))} --params "$config" --resume_from_checkpoint "$resume"'
    if slurm.launcher == "torchrun":
        torchrun = _console_script(python, "torchrun", "torch.distributed.run")
        exports = [
            "# torchrun passes USR1 on to its workers and gives them this long to checkpoint",
            f"export PET_SIGNALS_TO_HANDLE={TORCHRUN_SIGNALS}",
            f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={slurm.signal_seconds}",
        ]
        launch = [
            "# One torchrun per node (srun), rendezvous on the first node.",
            f'srun --kill-on-bad-exit=1 {torchrun} --nnodes "$SLURM_NNODES" '
            f"--nproc_per_node {dist.gpus_per_node} \\",
            '  --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" --rdzv_id "$SLURM_JOB_ID" \\',
            f"  {train} &",
        ]
        signal_target = '"$launcher_pid"'  # srun forwards it to every process of its step
        after_wait: list[str] = []
    else:
        deepspeed = _console_script(python, "deepspeed", "deepspeed.launcher.runner")
        # One node: the launcher starts the processes itself, no ssh (it would check for it).
        # More: it reaches the other nodes with pdsh over passwordless ssh.
        ssh_check = " --no_ssh_check" if dist.num_nodes == 1 else ""
        exports = []
        launch = [
            "# The deepspeed launcher, in its own process group, with a hostfile of the nodes.",
            'hostfile="$job_dir/hostfile-$SLURM_JOB_ID"',
            'scontrol show hostnames "$SLURM_JOB_NODELIST" '
            f"| sed 's/$/ slots={dist.gpus_per_node}/' > \"$hostfile\"",
            f'setsid {deepspeed} --hostfile "$hostfile"{ssh_check} --master_addr "$head_node" '
            '--master_port "$port" \\',
            f"  {train} &",
        ]
        signal_target = '-- "-$launcher_pid"'  # the launcher's whole process group
        after_wait = [
            "# USR1 stops the launcher itself at once; its workers are still checkpointing.",
            'while kill -0 -- "-$launcher_pid" 2>/dev/null; do sleep 1; done',
        ]
    header = [
        "#!/bin/bash",
        *sbatch_lines(config, workdir),
        "#",
        f"# Written by `gpt3 slurm` for the run in {config.run_dir}: {dist.num_nodes} node(s) x "
        f"{dist.gpus_per_node} process(es), {slurm.launcher}.",
        f"# USR1 comes {slurm.signal_seconds} s before the time limit: every training process "
        "checkpoints and exits,",
        f"# then the job requeues itself (at most {slurm.max_requeues} times) and resumes from "
        "`latest`.",
        *(
            [
                "# tracking.uri holds credentials, written here as ***: the job reads the real URI",
                "# from MLFLOW_TRACKING_URI in the environment sbatch passes on (`gpt3 slurm "
                "submit` sets it).",
            ]
            if redact(config.tracking.uri) != config.tracking.uri
            else []
        ),
    ]
    body = [
        "set -u",
        'export GPT3_SLURM_JOB="$SLURM_JOB_ID"  # stages/train.py in the job trains, never submits',
        *exports,
        f"job_dir={shlex.quote(str(job_dir(config, workdir)))}",
        f"checkpoints={shlex.quote(str(workdir / config.run_dir / 'checkpoints'))}",
        f"max_requeues={slurm.max_requeues}",
        'restarts="${SLURM_RESTART_COUNT:-0}"',
        "",
        "# The resolved config this job trains.",
        'config="$job_dir/config-$SLURM_JOB_ID.yaml"',
        f"cat > \"$config\" <<'{CONFIG_END}'",
        config_text.rstrip("\n"),
        CONFIG_END,
        "",
        f"resume={resume}",
        'if [ "$restarts" -gt 0 ] && ls "$checkpoints" 2>/dev/null '
        "| grep -Eq '^(latest|step_)'; then",
        "  resume=latest  # requeued: continue this job's own run, even one that had just finished",
        "fi",
        "",
        "stop=0",
        "launcher_pid=",
        "request_checkpoint() {",
        "  stop=1",
        '  echo "gpt3: USR1 at $(date +%T): the training processes checkpoint and stop"',
        f'  if [ -n "$launcher_pid" ]; then kill -USR1 {signal_target} 2>/dev/null; fi',
        "}",
        "trap request_checkpoint USR1",
        "trap 'echo \"gpt3: SIGTERM at $(date +%T): cancelled, preempted or requeued by SLURM\"' "
        "TERM",
        "",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"port={port}",
        'echo "gpt3: job $SLURM_JOB_ID start $((restarts + 1)) on $SLURM_JOB_NODELIST, '
        'resume $resume"',
        *launch,
        "launcher_pid=$!",
        "# a warning that came before the launcher started is passed on now",
        f'if [ "$stop" -eq 1 ]; then kill -USR1 {signal_target} 2>/dev/null; fi',
        'while kill -0 "$launcher_pid" 2>/dev/null; do',
        '  wait "$launcher_pid"  # a trap ends the wait early: wait again',
        "done",
        'wait "$launcher_pid"; code=$?  # the launcher\'s own exit status',
        *after_wait,
        "",
        'if [ "$code" -eq 0 ]; then',
        '  echo "gpt3: training finished"',
        "  exit 0",
        "fi",
        'if [ "$stop" -eq 1 ]; then',
        '  if [ "$restarts" -lt "$max_requeues" ]; then',
        '    echo "gpt3: requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most '
        '$max_requeues)"',
        "    trap '' TERM  # the requeue ends this start with SIGTERM",
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "  else",
        '    echo "gpt3: not requeued: requeued $restarts times already (slurm.max_requeues)"',
        "  fi",
        "fi",
        'echo "gpt3: training exited with $code"',
        'exit "$code"',
    ]
    return "\n".join([*header, "", *body]) + "\n"


def _console_script(python: str, name: str, module: str) -> str:
    """`name` beside the interpreter (a venv's torchrun), else `python -m module`."""
    beside = Path(python).with_name(name)
    if beside.is_file():
        return shlex.quote(str(beside))
    return f"{shlex.quote(python)} -m {module}"


def require_train_stage(train_stage: Path = TRAIN_STAGE) -> Path:
    """The job runs `stages/train.py` of this checkout; an installed package has none."""
    if not train_stage.is_file():
        raise UserError(
            f"{train_stage} not found: `gpt3 slurm` submits this repository's stages/train.py; "
            "run it from a checkout of the repository"
        )
    return train_stage
