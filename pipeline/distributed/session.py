"""From a validated config to a ready strategy: the one entry point the command line calls.

    plan = plan_launch(config, flags, sys.argv)      # checks; never touches the network
    if plan.relaunch: exit(plan.relaunch.run())      # plain run asking for N > 1 processes
    with training_strategy(config, plan.env) as strategy:
        train(config, ..., strategy=strategy)

Every check (flags against the launcher's world, backend against the devices, strategy against
the DeepSpeed config) runs before a process group exists, so a bad command line ends each rank
with exit code 2 rather than a hang.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pipeline.config.schema import Config
from pipeline.distributed.comm import Collective
from pipeline.distributed.data_parallel import SingleDevice
from pipeline.distributed.environment import (
    DistEnv,
    LaunchFlags,
    check_against_launcher,
    check_devices,
    process_group,
    read_environment,
    resolve_backend,
    uses_cuda,
)
from pipeline.distributed.launch import Relaunch, plan_relaunch
from pipeline.distributed.strategy import Strategy, build_strategy, choose_strategy
from pipeline.training.batching import global_batch_sequences, plan_batch


@dataclass(frozen=True)
class LaunchPlan:
    """This process's environment and, for a plain multi-process run, how to start workers."""

    env: DistEnv
    strategy: str
    relaunch: Relaunch | None


def plan_launch(config: Config, flags: LaunchFlags, argv: Sequence[str]) -> LaunchPlan:
    """Validate the distributed setup of `config` for this process (raises ConfigError)."""
    env = read_environment()
    check_against_launcher(config.distributed, flags, env)
    world = (
        env.world_size
        if env.launched
        else (config.distributed.num_nodes * config.distributed.gpus_per_node)
    )
    strategy = choose_strategy(config, world)
    seq = config.seq_len  # an impossible batch split fails here, before any worker starts
    plan_batch(global_batch_sequences(config.training, seq), config.training.micro_batch_size,
               world, seq)  # fmt: skip
    if strategy != "single":
        resolve_backend(config)
    relaunch = plan_relaunch(config.distributed, flags, env, argv)
    if relaunch is None:
        check_devices(config, env)
    return LaunchPlan(env, strategy, relaunch)


@contextlib.contextmanager
def training_strategy(config: Config, plan: LaunchPlan) -> Iterator[Strategy]:
    """The chosen strategy, inside the job's process group when it needs one."""
    if plan.strategy == "single":
        yield SingleDevice(Collective(), config=config)
        return
    with process_group(plan.env, resolve_backend(config), uses_cuda(config)) as comm:
        strategy = build_strategy(plan.strategy, comm, config)
        try:
            yield strategy
        finally:
            strategy.close()
