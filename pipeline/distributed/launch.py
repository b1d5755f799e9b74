"""The plain-launch path: a run started without a launcher that asks for several processes
starts its workers itself, with the same command line.

`python stages/train.py --gpus_per_node 4` (or `dvc repro` with `distributed.gpus_per_node: 4`
in params.yaml) becomes, on this node,

    torch.distributed.run --nnodes N --nproc_per_node G --node_rank R --master_addr A
        [--master_port P] stages/train.py <the same arguments>

run inside this process (PyTorch's elastic agent, the code behind `torchrun`), or with
`distributed.launcher: deepspeed` the deepspeed launcher as a child process
(`python -m deepspeed.launcher.runner --num_gpus G ...`, the `deepspeed` command's own entry
point, so the venv's DeepSpeed runs whatever is on PATH). The workers see the launcher's
environment and train; this process waits and exits with their exit code (2 for a user error,
143 after a SIGTERM that was answered with a checkpoint).

Why re-launch rather than spawn with multiprocessing: every worker then goes through exactly
the command line a user would type under torchrun, so there is one code path to test, and the
elastic agent brings its worker monitoring (one failed rank stops the others).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from pipeline.config.schema import DistributedConfig
from pipeline.distributed.environment import DistEnv, LaunchFlags
from pipeline.errors import ConfigError
from pipeline.slurm.environment import inside_slurm_job

DEFAULT_MASTER_PORT = 29500
"""torchrun's default for multi-node jobs; a one-node job picks a free port instead."""


@dataclass(frozen=True)
class Relaunch:
    """How this node starts its workers: the launcher and its argument list."""

    launcher: str
    """`torchrun` (torch.distributed.run, in this process) or `deepspeed` (a child process)."""
    args: tuple[str, ...]

    def describe(self) -> str:
        name = "torch.distributed.run" if self.launcher == "torchrun" else "deepspeed"
        return f"{name} {' '.join(self.args)}"

    def run(self) -> int:
        """Start the workers, wait for them, and return the exit code to leave with."""
        if self.launcher == "torchrun":
            return _run_elastic(list(self.args))
        command = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", *self.args]
        with subprocess.Popen(command) as child, _forward_signals(child):
            return child.wait()


def plan_relaunch(
    distributed: DistributedConfig,
    flags: LaunchFlags,
    env: DistEnv,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> Relaunch | None:
    """None when this process should train itself; else how to start this node's workers.

    A DeepSpeed run is always started through a launcher (DeepSpeed reads LOCAL_RANK and the
    rendezvous from the environment), even on one GPU.

    `launcher: slurm` outside a SLURM job: None, the caller submits a batch job instead (see
    `submits_slurm_job`). Inside one, a plain run starts this node's workers like `torchrun`.

    `argv` is the command line to give every worker (script first). Master address, port and
    node rank come from the flags, else MASTER_ADDR / MASTER_PORT / NODE_RANK.
    """
    environ = os.environ if environ is None else environ
    if env.launched or submits_slurm_job(distributed, env, environ):
        return None
    nodes, per_node = distributed.num_nodes, distributed.gpus_per_node
    node_rank = flags.node_rank if flags.node_rank is not None else _env_int(environ, "NODE_RANK")
    node_rank = node_rank or 0
    if not 0 <= node_rank < nodes:
        raise ConfigError(
            f"--node_rank {node_rank} is outside 0..{nodes - 1} (--num_nodes {nodes})"
        )
    if nodes * per_node == 1 and not distributed.deepspeed_config:
        return None  # DeepSpeed wants a launcher's environment even for one process
    master_addr = flags.master_addr or environ.get("MASTER_ADDR")
    if master_addr is None:
        if nodes > 1:
            raise ConfigError(
                f"--num_nodes {nodes} needs --master_addr (or MASTER_ADDR): the address of node 0, "
                "reachable from every node"
            )
        master_addr = "127.0.0.1"
    master_port = flags.master_port or _env_int(environ, "MASTER_PORT")
    if master_port is None and nodes > 1:
        master_port = DEFAULT_MASTER_PORT
    script, *rest = argv
    if distributed.launcher == "deepspeed":
        args = ["--num_gpus", str(per_node), "--master_port", str(master_port or free_port())]
        if nodes > 1:
            args += ["--num_nodes", str(nodes), "--master_addr", master_addr]
        return Relaunch("deepspeed", (*args, script, *rest))
    args = [
        f"--nnodes={nodes}",
        f"--nproc_per_node={per_node}",
        f"--node_rank={node_rank}",
        f"--master_addr={master_addr}",
    ]
    if master_port is not None:
        args.append(f"--master_port={master_port}")
    return Relaunch("torchrun", (*args, script, *rest))


def submits_slurm_job(
    distributed: DistributedConfig, env: DistEnv, environ: Mapping[str, str] | None = None
) -> bool:
    """Should this process submit a SLURM batch job rather than train (`launcher: slurm`)?

    Only a plain process outside any SLURM job does: the job's own `stages/train.py` runs
    under torchrun (or inside the job's allocation) and trains.
    """
    return distributed.launcher == "slurm" and not env.launched and not inside_slurm_job(environ)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def free_port() -> int:
    """A TCP port that is free right now on this machine (for a one-node rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _exit_code(code: int) -> int:
    """A worker's exit code as a shell would report it (a signal N becomes 128 + N)."""
    return 128 - code if code < 0 else code


def _run_elastic(args: list[str]) -> int:
    """torch.distributed.run in this process; the first failed worker's exit code wins."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(args))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return _exit_code(failure.exitcode) or 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


@contextlib.contextmanager
def _forward_signals(child: subprocess.Popen) -> Iterator[None]:
    """Pass SIGTERM/SIGINT on to the launcher child, so its workers can checkpoint and stop."""

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
