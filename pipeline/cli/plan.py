"""`gpt3 plan`: memory per GPU for a model size on N GPUs, and which setups fit.

    gpt3 plan --model_size 13B --gpus 16 [--zero 3 --offload cpu] [--gpu_memory 80]

Reads the model config (and the training config's micro-batch and sequence length); allocates
nothing, so 175B plans in a second. See `pipeline/distributed/planner.py` for the formulas.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config.loader import load_config
from pipeline.errors import ConfigError

DEFAULT_TRAINING_CONFIG = "configs/training_configs/large_scale.yaml"
GPT2_VOCAB = 50257


@click.command("plan", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model_size", help="A size in configs/model_configs, e.g. 13B.")
@click.option("--config", "model_config", type=click.Path(dir_okay=False), help="Model config.")
@click.option(
    "--training_config",
    type=click.Path(dir_okay=False),
    help=f"Where micro-batch and sequence length come from [default: {DEFAULT_TRAINING_CONFIG}].",
)
@click.option("--gpus", type=int, required=True, help="GPUs in the job.")
@click.option("--gpus_per_node", type=int, help="GPUs per node [default: min(gpus, 8)].")
@click.option("--zero", type=click.IntRange(0, 3), help="Mark this ZeRO stage (0 = plain DDP).")
@click.option("--offload", type=click.Choice(["none", "cpu"]), default="none", show_default=True)
@click.option("--gpu_memory", type=float, default=80.0, show_default=True, help="GiB per GPU.")
@click.option("--host_memory", type=float, help="GiB of host memory per node (to judge offload).")
@click.option("--micro_batch_size", type=int, help="Override the training config's.")
@click.option("--seq_len", type=int, help="Override the training config's (or the model's n_ctx).")
@click.option("--vocab_size", type=int, default=GPT2_VOCAB, show_default=True)
@click.option(
    "--deepspeed_table", is_flag=True, help="Also print DeepSpeed's own ZeRO-2/3 estimate tables."
)
def plan(
    model_size: str | None,
    model_config: str | None,
    training_config: str | None,
    gpus: int,
    gpus_per_node: int | None,
    zero: int | None,
    offload: str,
    gpu_memory: float,
    host_memory: float | None,
    micro_batch_size: int | None,
    seq_len: int | None,
    vocab_size: int,
    deepspeed_table: bool,
) -> int:
    """Print parameters, memory per GPU and which setups fit (nothing is allocated)."""
    from pipeline.distributed.planner import GIB, find_setup, format_plan, make_plan

    if not (model_size or model_config):
        raise ConfigError("give --model_size (e.g. 13B) or --config")
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    per_node = gpus_per_node or min(gpus, 8)
    if gpus % per_node:
        raise ConfigError(f"--gpus {gpus} is not a multiple of --gpus_per_node {per_node}")
    if zero == 0 and offload == "cpu":
        raise ConfigError("--offload cpu needs --zero 2 or 3 (DeepSpeed offloads ZeRO states)")
    if zero == 1 and offload == "cpu":
        raise ConfigError("--offload cpu with --zero 1: this planner offloads ZeRO-2/3 only")
    overrides = {"training.micro_batch_size": micro_batch_size, "training.seq_len": seq_len}
    recipe = training_config or (
        DEFAULT_TRAINING_CONFIG if Path(DEFAULT_TRAINING_CONFIG).is_file() else None
    )
    config = load_config(
        model_config=model_config,
        model_size=model_size,
        training_config=recipe,
        overrides={k: v for k, v in overrides.items() if v is not None},
    )
    result = make_plan(
        config.model,
        config.model.vocab_size or vocab_size,
        gpus,
        per_node,
        config.training.micro_batch_size,
        config.seq_len,
    )
    chosen = None if zero is None else find_setup(zero or None, offload)
    host = int(host_memory * GIB) if host_memory is not None else None
    click.echo(format_plan(result, int(gpu_memory * GIB), host, chosen))
    if deepspeed_table:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
        from deepspeed.runtime.zero.stage_1_and_2 import (
            estimate_zero2_model_states_mem_needs_all_cold,
        )

        nodes = gpus // per_node
        estimate_zero2_model_states_mem_needs_all_cold(result.parameters, per_node, nodes)
        estimate_zero3_model_states_mem_needs_all_cold(
            result.parameters, result.largest_layer, per_node, nodes
        )
    return 0
