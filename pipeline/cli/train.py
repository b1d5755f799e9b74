"""`gpt3 train` / `stages/train.py`: the training guide's command line.

    python3 stages/train.py --config configs/model_configs/1.3B.yaml \
        --training_config configs/training_configs/large_scale.yaml [--fp16] [--seed N] ...

With no config flags it trains what `params.yaml` describes (this is how DVC runs it). With
`--config`/`--training_config`/`--model_size` it trains exactly those files and ignores
params.yaml, unless `--params` names it too. Exit codes: 0 done, 2 bad input, 143 stopped by
SIGTERM/SIGINT after saving a checkpoint (resume with `--resume_from_checkpoint latest`).

`--rerun runs:/<run_id>` (also `gpt3 rerun`) trains a logged run again from its MLflow record
instead of the config flags: see `pipeline/training/rerun.py`.

Distributed: under torchrun, `python3 -m torch.distributed.launch` or `deepspeed`, every worker
runs this same command and reads its rank from the environment (the flags must agree with the
launcher's world). Run plainly with `--num_nodes` x `--gpus_per_node` > 1 (or params.yaml's
`distributed` section), it starts this node's workers itself: see `pipeline/distributed/`.
With `distributed.launcher: slurm` it submits a SLURM batch job instead and waits for it
(`sbatch --wait`, see `pipeline/slurm/`); inside that job the same command trains.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from pipeline.cli.overrides import parse_set
from pipeline.config.loader import load_config
from pipeline.config.schema import Config
from pipeline.errors import PREEMPTED_EXIT_CODE, ConfigError


def config_from_flags(
    *,
    params_file: str | None,
    model_config: str | None,
    model_size: str | None,
    training_config: str | None,
    seed: int | None,
    output_dir: str | None,
    precision: str | None,
    fp16: bool,
    bf16: bool,
    gradient_checkpointing: bool | None,
    compile_model: bool | None,
    max_steps: int | None,
    distributed_backend: str | None,
    num_nodes: int | None,
    gpus_per_node: int | None,
    deepspeed_config: str | None,
    sets: tuple[str, ...],
) -> Config:
    """The run's config from the command line's config flags (`gpt3 slurm` takes them too)."""
    if fp16 and bf16:
        raise ConfigError("--fp16 and --bf16 are mutually exclusive")
    chosen = "fp16" if fp16 else "bf16" if bf16 else None
    if chosen and precision and chosen != precision:
        raise ConfigError(f"--{chosen} contradicts --precision {precision}")
    explicit_files = any((model_config, model_size, training_config))
    if params_file is None and not explicit_files and Path("params.yaml").is_file():
        params_file = "params.yaml"
    flags: dict[str, Any] = {
        "seed": seed,
        "output_dir": output_dir,
        "training.precision": chosen or precision,
        "training.gradient_checkpointing": gradient_checkpointing,
        "training.compile": compile_model,
        "training.max_steps": max_steps,
        "distributed.backend": distributed_backend,
        "distributed.num_nodes": num_nodes,
        "distributed.gpus_per_node": gpus_per_node,
        "distributed.deepspeed_config": deepspeed_config,
    }
    # Named flags are more specific than --set, so they win.
    overrides = {**parse_set(sets), **{k: v for k, v in flags.items() if v is not None}}
    if params_file is None and output_dir is None:
        model_name = model_size or (Path(model_config).stem if model_config else "model")
        recipe = Path(training_config).stem if training_config else "default"
        overrides.setdefault("name", f"{model_name}-{recipe}")
    return load_config(
        params_file=params_file,
        model_config=model_config,
        training_config=training_config,
        model_size=model_size,
        overrides=overrides,
    )


RERUN_FLAGS = {"output_dir", "sets", "params_file"}
"""Flags a rerun takes: where it goes, explicit overrides, and params.yaml for the store's URI."""


def rerun_from_flags(
    rerun: str, force: bool, resume: str | None, flags: dict[str, Any]
) -> tuple[Config, dict[str, str]]:
    """The config and MLflow tags of `--rerun`; other config flags would change it: refused."""
    from pipeline.training.rerun import plan_rerun

    given = sorted(
        key for key, value in flags.items() if key not in RERUN_FLAGS and value not in (None, False)
    )
    if resume is not None:
        given.insert(0, "resume_from_checkpoint")
    if given:
        raise ConfigError(
            f"--rerun takes its config from the run's record; --{given[0]} would change it "
            "(--set KEY=VALUE does, and is recorded)"
        )
    plan = plan_rerun(
        rerun,
        force=force,
        output_dir=flags["output_dir"],
        overrides=parse_set(flags["sets"]),
        params_file=flags["params_file"],
    )
    for difference in plan.differences:
        click.echo(f"warning: --force: {difference}", err=True)
    return plan.config, plan.tags


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False),
    help="params.yaml to layer over the config files (default: params.yaml when no "
    "config flags are given).",
)
@click.option(
    "--config",
    "model_config",
    type=click.Path(dir_okay=False),
    help="Model config, e.g. configs/model_configs/1.3B.yaml.",
)
@click.option("--model_size", help="Shortcut for --config configs/model_configs/<SIZE>.yaml.")
@click.option(
    "--training_config",
    type=click.Path(dir_okay=False),
    help="Training recipe, e.g. configs/training_configs/large_scale.yaml.",
)
@click.option("--seed", type=int, help="The run's one seed.")
@click.option("--output_dir", help="Run directory (default experiments/<name>).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option("--fp16", is_flag=True, help="Same as --precision fp16 (dynamic loss scaling).")
@click.option("--bf16", is_flag=True, help="Same as --precision bf16.")
@click.option(
    "--gradient_checkpointing",
    is_flag=True,
    default=None,
    help="Recompute each block's activations in the backward pass.",
)
@click.option("--compile", "compile_model", is_flag=True, default=None, help="torch.compile.")
@click.option("--max_steps", type=int)
@click.option(
    "--resume_from_checkpoint",
    help="A checkpoint file, a checkpoints folder, 'latest', 'auto' (resume only if the "
    "latest checkpoint has this exact config), or runs:/RUN_ID[/checkpoints/NAME] (a checkpoint "
    "logged to MLflow: the run's newest, or that one).",
)
@click.option("--distributed_backend", type=click.Choice(["nccl", "gloo"]))
@click.option("--num_nodes", type=int, help="Nodes in the job (plain launch starts this node's).")
@click.option(
    "--gpus_per_node",
    type=int,
    help="Processes per node: one per GPU, or CPU processes on a machine without CUDA.",
)
@click.option("--node_rank", type=int, help="This node's rank for a plain multi-node launch.")
@click.option("--master_addr", help="Address of node 0 for a plain multi-node launch.")
@click.option("--master_port", type=int, help="Rendezvous port for a plain launch.")
@click.option("--deepspeed_config", type=click.Path(dir_okay=False))
@click.option(
    "--local_rank",
    "--local-rank",
    "local_rank",
    type=int,
    hidden=True,
    help="Passed by torch.distributed.launch and deepspeed; the rank is read from the environment.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any config key, e.g. --set training.lr=3e-4 (repeatable).",
)
@click.option(
    "--rerun",
    metavar="runs:/RUN_ID",
    help="Train this MLflow run again from its record (resolved config, git commit, data "
    "hash); takes no other config flags but --output_dir and --set.",
)
@click.option(
    "--force",
    is_flag=True,
    help="With --rerun: go on when the code or the data differ from the run's (tagged).",
)
def train(
    resume_from_checkpoint: str | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
    local_rank: int | None,
    rerun: str | None,
    force: bool,
    **flags: Any,
) -> int:
    """Train a GPT model (resumable; see the module docstring for precedence)."""
    tags: dict[str, str] = {}
    if rerun is not None:
        config, tags = rerun_from_flags(rerun, force, resume_from_checkpoint, flags)
        resume_from_checkpoint = "auto"  # an interrupted rerun continues, a finished one again
    elif force:
        raise ConfigError("--force goes with --rerun runs:/RUN_ID")
    else:
        config = config_from_flags(**flags)  # every other flag is a config flag
    from pipeline.distributed.environment import LaunchFlags  # heavy imports after validation
    from pipeline.distributed.launch import submits_slurm_job
    from pipeline.distributed.session import plan_launch, training_strategy

    launch = plan_launch(
        config,
        LaunchFlags(
            flags["num_nodes"],
            flags["gpus_per_node"],
            node_rank,
            master_addr,
            master_port,
            local_rank,
        ),
        sys.argv,
    )
    if submits_slurm_job(config.distributed, launch.env):  # launcher slurm, outside the job
        if rerun is not None:
            raise ConfigError(
                f"{rerun} trained under SLURM (distributed.launcher slurm): rerun it inside an "
                "allocation (srun gpt3 rerun ...), or --set distributed.launcher=none"
            )
        from pipeline.slurm.submit import submit_and_wait

        sys.exit(submit_and_wait(config, resume_from_checkpoint))
    if launch.relaunch is not None:  # launched plainly with several processes: start them
        click.echo(f"starting workers: {launch.relaunch.describe()}", err=True)
        sys.exit(launch.relaunch.run())
    from pipeline.training.run import train as run_training

    with training_strategy(config, launch) as strategy:
        result = run_training(
            config, resume=resume_from_checkpoint, console=True, strategy=strategy, tags=tags
        )
    if result.preempted:
        click.echo(
            f"stopped at step {result.progress.step}; resume with --resume_from_checkpoint latest",
            err=True,
        )
        sys.exit(PREEMPTED_EXIT_CODE)
    return 0
