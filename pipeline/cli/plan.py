"""`gpt3 plan`: memory per GPU for a model size on N GPUs, which setups fit, which one to use
and why, and what it costs.

    gpt3 plan --model_size 13B --gpus 16 [--zero 3 --offload cpu | --fsdp --tensor_parallel 2]
              [--gpu_memory 80] [--tokens 300B --gpu H100 --mfu 0.45]

Reads the model config (and the training config's micro-batch, sequence length, global batch and
token budget); allocates nothing, so 175B plans in a second. See `pipeline/distributed/planner.py`
(DDP and DeepSpeed rows), `planner_fsdp.py` (FSDP2 and tensor parallelism), `planner_advice.py`
(the recommendation) and `cost.py` (FLOPs, GPU-hours and the `#SBATCH` request).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipeline.config.loader import load_config
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config.schema import ModelConfig
    from pipeline.distributed.cost import Cost, SlurmRequest
    from pipeline.distributed.planner import Plan, Row, Setup

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
@click.option("--fsdp", is_flag=True, help="Mark the FSDP2 row (see --tensor_parallel).")
@click.option(
    "--tensor_parallel",
    type=int,
    default=1,
    show_default=True,
    help="Mark the FSDP x TP row of this degree (implies --fsdp).",
)
@click.option(
    "--sequence_parallel",
    is_flag=True,
    help="Plan the TP rows with distributed.sequence_parallel (activations split further).",
)
@click.option("--offload", type=click.Choice(["none", "cpu"]), default="none", show_default=True)
@click.option("--gpu_memory", type=float, default=80.0, show_default=True, help="GiB per GPU.")
@click.option("--host_memory", type=float, help="GiB of host memory per node (to judge offload).")
@click.option("--micro_batch_size", type=int, help="Override the training config's.")
@click.option("--seq_len", type=int, help="Override the training config's (or the model's n_ctx).")
@click.option("--vocab_size", type=int, default=GPT2_VOCAB, show_default=True)
@click.option(
    "--deepspeed_table", is_flag=True, help="Also print DeepSpeed's own ZeRO-2/3 estimate tables."
)
@click.option(
    "--tokens",
    help="Training tokens, e.g. 300e9 or 300B [default: the training config's max_tokens].",
)
@click.option(
    "--gpu",
    "gpu_kind",
    default="H100",
    show_default=True,
    help="GPU kind for the peak and the measured MFU: H100, H200, A100, ... (throughput.py).",
)
@click.option("--mfu", type=float, help="MFU to assume, e.g. 0.45 [default: measured].")
@click.option(
    "--measured_mfu",
    type=click.Path(dir_okay=False),
    help="Measured MFU per GPU kind and model size [default: this checkout's "
    "bench/measured_mfu.json].",
)
@click.option(
    "--time_margin",
    type=float,
    default=0.2,
    show_default=True,
    help="Fraction added to the wall-clock estimate for the sbatch time limit.",
)
@click.option("--cpus_per_gpu", type=int, default=8, show_default=True, help="For --cpus-per-task.")
def plan(
    model_size: str | None,
    model_config: str | None,
    training_config: str | None,
    gpus: int,
    gpus_per_node: int | None,
    zero: int | None,
    fsdp: bool,
    tensor_parallel: int,
    sequence_parallel: bool,
    offload: str,
    gpu_memory: float,
    host_memory: float | None,
    micro_batch_size: int | None,
    seq_len: int | None,
    vocab_size: int,
    deepspeed_table: bool,
    tokens: str | None,
    gpu_kind: str,
    mfu: float | None,
    measured_mfu: str | None,
    time_margin: float,
    cpus_per_gpu: int,
) -> int:
    """Print parameters, memory per GPU, which setups fit, the recommended one and why, and the
    run's cost (nothing is allocated)."""
    from pipeline.distributed.cost import check_mfu, format_cost, gpu_peak_tflops, parse_tokens
    from pipeline.distributed.planner import GIB, find_setup, format_plan, make_plan
    from pipeline.distributed.planner_advice import recommend
    from pipeline.training.batching import global_batch_sequences

    token_count = parse_tokens(tokens) if tokens is not None else None
    gpu_kind, _ = gpu_peak_tflops(gpu_kind)
    if mfu is not None:
        check_mfu(mfu)
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
    if tensor_parallel < 1:
        raise ConfigError(f"--tensor_parallel must be at least 1, got {tensor_parallel}")
    fsdp = fsdp or tensor_parallel > 1
    if fsdp and zero is not None:
        raise ConfigError("--fsdp/--tensor_parallel and --zero name different setups; give one")
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
    vocab = config.model.vocab_size or vocab_size
    budget = token_count if token_count is not None else config.training.max_tokens
    # The cost comes first: a bad cost input then prints only its error, before DeepSpeed loads.
    cost = None
    if budget is not None:
        cost = _cost(
            config.model,
            vocab,
            config.seq_len,
            budget,
            gpu_kind,
            mfu,
            Path(measured_mfu) if measured_mfu else None,
            gpus,
            per_node,
            time_margin,
            cpus_per_gpu,
        )
    result = make_plan(
        config.model,
        vocab,
        gpus,
        per_node,
        config.training.micro_batch_size,
        config.seq_len,
        global_batch=global_batch_sequences(config.training, config.seq_len),
        zero3_init=True,  # the trainer builds ZeRO-3 under deepspeed.zero.Init
        sequence_parallel=sequence_parallel,
    )
    chosen = None
    if fsdp:
        chosen = find_setup(None, offload, fsdp=True, tensor_parallel=tensor_parallel)
    elif zero is not None:
        chosen = find_setup(zero or None, offload)
    if chosen is not None and chosen not in (row.setup for row in result.rows):
        planned = ", ".join(row.setup.name for row in result.rows if row.setup.fsdp)
        raise ConfigError(
            f"{chosen.name} is not planned for {gpus} GPU(s) in nodes of {per_node} "
            f"(TP degrees divide the node, the heads and d_ff); planned: {planned}"
        )
    host = int(host_memory * GIB) if host_memory is not None else None
    gpu_bytes = int(gpu_memory * GIB)
    click.echo(format_plan(result, gpu_bytes, host, chosen))
    click.echo()
    advice = recommend(result, gpu_bytes, host)
    click.echo("\n".join(advice.lines))
    click.echo()
    if cost is None:
        click.echo("cost: pass --tokens (e.g. 300B) for FLOPs, GPU-hours and the sbatch request")
    else:
        memory = _memory_line(result, gpu_bytes, host, chosen)
        click.echo(format_cost(*cost, time_margin, memory))
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


def _cost(
    model: ModelConfig,
    vocab_size: int,
    seq_len: int,
    tokens: int,
    gpu_kind: str,
    mfu: float | None,
    measured_file: Path | None,
    gpus: int,
    gpus_per_node: int,
    margin: float,
    cpus_per_gpu: int,
) -> tuple[Cost, SlurmRequest, str]:
    """FLOPs, GPU-hours and the Slurm request, and a note of where the MFU came from."""
    from pipeline.distributed.cost import (
        estimate_cost,
        explain_measured,
        load_measured_mfu,
        nearest_measured,
        slurm_request,
    )
    from pipeline.model import count_parameters

    if mfu is not None:
        mfu_from = "(--mfu)"
    else:
        parameters = count_parameters(model, vocab_size)  # what the memory table reports
        measured = load_measured_mfu(measured_file) if measured_file else load_measured_mfu()
        entry = nearest_measured(measured, gpu_kind, parameters)
        mfu, mfu_from = entry.mfu, explain_measured(entry, parameters)
    cost = estimate_cost(model, vocab_size, seq_len, tokens, gpu_kind, gpus, mfu)
    return cost, slurm_request(cost, gpus_per_node, cpus_per_gpu, margin), mfu_from


def _memory_line(result: Plan, gpu_memory: int, host: int | None, chosen: Setup | None) -> str:
    """The chosen setup's memory per GPU, else that of the recommended one."""
    from pipeline.distributed.planner import verdict
    from pipeline.distributed.planner_advice import recommend

    if chosen is not None:
        row = next(row for row in result.rows if row.setup == chosen)
        return _row_memory(row, verdict(row, gpu_memory, host))
    advice = recommend(result, gpu_memory, host)
    if advice.row is None:
        return "no setup fits (see the table)"
    return _row_memory(advice.row, advice.fit)


def _row_memory(row: Row, fit: str) -> str:
    from pipeline.distributed.planner import GIB

    if fit == "yes":
        return f"{row.with_activations / GIB:,.1f} GiB, {row.setup.name}"
    text = f"{row.with_checkpointing / GIB:,.1f} GiB, {row.setup.name} with gradient checkpointing"
    return text if fit == "ckpt" else f"{text}; does not fit: {fit}"
