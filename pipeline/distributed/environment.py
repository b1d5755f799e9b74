"""Who this process is in a distributed job, and whether the command line agrees with that.

A launcher, not the command line, is the source of truth for the world: torchrun (and the
training guide's `python3 -m torch.distributed.launch`, torchrun underneath) and the deepspeed
launcher both export RANK, LOCAL_RANK and WORLD_SIZE; torchrun adds LOCAL_WORLD_SIZE, DeepSpeed
LOCAL_SIZE. The `--local_rank`/`--local-rank` argument they may pass is only cross-checked.

On a machine without CUDA, `gpus_per_node` means processes per node (gloo on CPU cores), which
is how the whole distributed path is tested on a laptop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.config.schema import Config, DistributedConfig
from pipeline.distributed.comm import Collective
from pipeline.errors import ConfigError

PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
"""Long enough for rank 0 to write a large checkpoint while the others wait in a barrier."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; the defaults describe a plain single-process run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str | None = None
    """`torchrun`, `the deepspeed launcher`, `a launcher` (variables set by hand), or None."""

    @property
    def launched(self) -> bool:
        return self.launcher is not None

    @property
    def num_nodes(self) -> int:
        return max(self.world_size // self.local_world_size, 1)


@dataclass(frozen=True)
class LaunchFlags:
    """The command line's distributed flags; None where the flag was not given."""

    num_nodes: int | None = None
    gpus_per_node: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    local_rank: int | None = None


def _int_var(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def read_environment(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The launcher's view of the job; a plain run (no RANK/WORLD_SIZE) is one process."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return DistEnv()
    values = {name: _int_var(environ, name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ConfigError(
            f"incomplete launcher environment: {', '.join(missing)} not set (RANK, WORLD_SIZE "
            "and LOCAL_RANK are all needed; start the job with torchrun or deepspeed)"
        )
    rank, world, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    local_world = _int_var(environ, "LOCAL_WORLD_SIZE") or _int_var(environ, "LOCAL_SIZE")
    if "TORCHELASTIC_RUN_ID" in environ:
        launcher = "torchrun"
    elif "LOCAL_SIZE" in environ or "CROSS_RANK" in environ:
        launcher = "the deepspeed launcher"
    else:
        launcher = "a launcher"
    assert rank is not None and world is not None and local_rank is not None
    if not (0 <= rank < world and 0 <= local_rank < world):
        raise ConfigError(f"launcher environment is inconsistent: RANK={rank} WORLD_SIZE={world}")
    return DistEnv(rank, local_rank, world, local_world or world, launcher)


def check_against_launcher(
    distributed: DistributedConfig, flags: LaunchFlags, env: DistEnv
) -> None:
    """Under a launcher, the flags and the config must describe the world it started.

    An explicit flag must match. A config value must match when the config asks for more than
    one process; the default (1 node x 1 GPU) means "whatever the launcher started", so
    `torchrun --nproc_per_node 4 stages/train.py --config ...` needs no extra flags.
    """
    if not env.launched:
        return
    problems = []
    asks_for_many = distributed.num_nodes * distributed.gpus_per_node > 1
    for key, started, unit in (
        ("num_nodes", env.num_nodes, "node(s)"),
        ("gpus_per_node", env.local_world_size, "process(es) per node"),
    ):
        flag = getattr(flags, key)
        if flag is not None and flag != started:
            problems.append(
                f"--{key} {flag} disagrees with {env.launcher}, which started {started} {unit}"
            )
        elif flag is None and asks_for_many and getattr(distributed, key) != started:
            problems.append(
                f"distributed.{key}={getattr(distributed, key)} disagrees with {env.launcher}, "
                f"which started {started} {unit}"
            )
    if flags.local_rank is not None and flags.local_rank != env.local_rank:
        problems.append(f"--local_rank {flags.local_rank} differs from LOCAL_RANK={env.local_rank}")
    if problems:
        raise ConfigError(
            "; ".join(problems) + " (WORLD_SIZE="
            f"{env.world_size}); change the flags or the launcher's process count"
        )


def uses_cuda(config: Config) -> bool:
    """Whether this run trains on GPUs (training.device `auto` with CUDA present, or `cuda...`)."""
    device = config.training.device
    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


def resolve_backend(config: Config) -> str:
    """`distributed.backend`, defaulting to NCCL on GPUs and gloo on CPUs."""
    cuda = uses_cuda(config)
    backend = config.distributed.backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError(
            "distributed.backend nccl needs CUDA GPUs, and this run trains on the CPU "
            f"(training.device={config.training.device}); use --distributed_backend gloo"
        )
    return backend


def check_devices(config: Config, env: DistEnv) -> None:
    """One GPU per local rank: enough GPUs, and no device index pinning every rank to one."""
    if not uses_cuda(config) or env.world_size == 1:
        return
    if ":" in config.training.device:
        raise ConfigError(
            f"training.device={config.training.device} would put every rank on one GPU; use "
            "auto or cuda (each rank takes the GPU of its LOCAL_RANK)"
        )
    count = torch.cuda.device_count()
    if env.local_world_size > count:
        raise ConfigError(
            f"{env.local_world_size} processes per node but only {count} GPU(s) are visible"
        )


@contextlib.contextmanager
def process_group(env: DistEnv, backend: str, cuda: bool) -> Iterator[Collective]:
    """Join the job's process group for the duration of a run, and always leave it.

    A launched process rendezvouses through the launcher's MASTER_ADDR/MASTER_PORT. A plain
    single process (e.g. DeepSpeed on one GPU without its launcher) gets a one-rank group over
    an in-memory store, so no port is opened.
    """
    if cuda:
        torch.cuda.set_device(env.local_rank)
    if env.launched:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
    else:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=PROCESS_GROUP_TIMEOUT
        )
    comm = Collective(env.rank, env.world_size, "cuda" if backend == "nccl" else "cpu")
    try:
        yield comm
        # Leave together: a rank that tears gloo down while rank 0 still writes the model can
        # abort at exit. Not on an error path, where a peer may never arrive.
        comm.barrier()
    finally:
        dist.destroy_process_group()
