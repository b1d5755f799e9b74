"""What fits where, before renting the GPUs: parameters, model-state memory per GPU for each way
of sharding, activation memory at the configured micro-batch, and a verdict per setup.

Everything is computed from the config alone (`pipeline.model.count_parameters`), so planning
175B allocates nothing. Sources of the numbers:

- ZeRO-2 and ZeRO-3 model states (16-bit weights, gradients, fp32 master weights, Adam moments,
  with or without CPU offload): DeepSpeed's own estimators, the functions its
  `estimate_zero{2,3}_model_states_mem_needs_all_cold` tables print. ZeRO-3 is estimated without
  `zero.Init`, because this trainer builds the whole model before DeepSpeed shards it.
- ZeRO-1 (DeepSpeed has no estimator for it): the ZeRO paper's 4 + 12/N bytes per parameter.
- DDP with this trainer's mixed precision (fp32 weights and gradients, Adam in fp32, 16-bit
  autocast): 16 bytes per parameter on every GPU.
- Activations: Korthikanti et al. 2022 (16-bit activations, per layer 18sbh + 4sbf bytes with
  dropout, 16sbh + 4sbf without, f = d_ff) with fused attention (no s^2 term: SDPA/flash), plus
  6 bytes per logit for the output layer and the loss. With gradient checkpointing each
  checkpointed layer keeps only its 16-bit input (2sbh) and one layer's activations are live
  while it is recomputed; `checkpointed_layers` below n_layer keeps the rest in full.
  Checked against measured peaks on an H200 (bench/NOTES.md): 125M-6.7B, micro-batches 4-64,
  full, partial and no checkpointing, all within 10% (tests/test_planner.py).
- Building: the model is built whole, in fp32, on each GPU before any sharding (4 bytes per
  parameter), so a setup also needs that much free at the start.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.schema import ModelConfig
from pipeline.model import count_parameters, padded_vocab_size

GIB = 2**30
LOGIT_BYTES = 6
"""Per logit: the 16-bit logits kept for backward and the fp32 gradient of the softmax. (The
fp32 copy for the loss is fused away under torch.compile; measured on an H200, bench/NOTES.md.)"""


@dataclass(frozen=True)
class Setup:
    """One way of holding model states: plain DDP, or a ZeRO stage with optional offload."""

    name: str
    zero: int | None
    """None for plain DDP."""
    offload_optimizer: bool = False
    offload_params: bool = False
    offload_ratio: float | None = None
    """ZeRO-3's `offload_optimizer.ratio`: the share of optimizer states and updates on the
    CPU (the rest stays on the GPU). None: all of it, when offload_optimizer is set."""


SETUPS = (
    Setup("DDP (fp32 weights, autocast)", None),
    Setup("ZeRO-1", 1),
    Setup("ZeRO-2", 2),
    Setup("ZeRO-2 + offload optimizer", 2, offload_optimizer=True),
    Setup("ZeRO-3", 3),
    Setup("ZeRO-3 + offload 55% of optimizer", 3, offload_optimizer=True, offload_ratio=0.55),
    Setup("ZeRO-3 + offload optimizer", 3, offload_optimizer=True),
    Setup("ZeRO-3 + offload optimizer+params", 3, offload_optimizer=True, offload_params=True),
)


@dataclass(frozen=True)
class Row:
    """Memory of one setup, in bytes (per GPU, and host memory per node)."""

    setup: Setup
    model_states: int
    host_per_node: int
    with_activations: int
    with_checkpointing: int
    build: int


@dataclass(frozen=True)
class Plan:
    """The numbers `format_plan` prints."""

    model: ModelConfig
    parameters: int
    largest_layer: int
    gpus: int
    gpus_per_node: int
    micro_batch_size: int
    seq_len: int
    activations: int
    activations_checkpointed: int
    rows: tuple[Row, ...]


def largest_layer_params(model: ModelConfig, vocab_size: int) -> int:
    """Parameters of the biggest single module (what ZeRO-3 gathers at once)."""
    d = model.d_model
    d_ff = model.d_ff or 4 * d
    inner = model.n_head * (model.d_head or d // model.n_head)
    return max(padded_vocab_size(vocab_size) * d, d * d_ff + d_ff, d * 3 * inner + 3 * inner)


def activation_bytes(
    model: ModelConfig,
    vocab_size: int,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    checkpointed_layers: int | None = None,
) -> int:
    """Activation memory of one micro-batch's forward pass (see the module docstring).

    `checkpointed_layers` (with checkpointing): how many layers recompute (None: all).
    """
    s, b, h = seq_len, micro_batch, model.d_model
    f = model.d_ff or 4 * h
    per_layer = (18 if model.dropout > 0 else 16) * s * b * h + 4 * s * b * f
    logits = LOGIT_BYTES * s * b * vocab_size
    if not checkpointing:
        return model.n_layer * per_layer + logits
    recomputed = model.n_layer if checkpointed_layers is None else checkpointed_layers
    recomputed = min(recomputed, model.n_layer)
    kept = model.n_layer - recomputed
    return recomputed * 2 * s * b * h + (kept + (1 if recomputed else 0)) * per_layer + logits


def model_state_bytes(
    setup: Setup, params: int, largest: int, gpus_per_node: int, nodes: int
) -> tuple[int, int]:
    """(bytes per GPU, host bytes per node) of weights, gradients and optimizer states."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = gpus_per_node * nodes
    host_init = int(params * 4 * gpus_per_node * 1.5)  # each rank builds the model in fp32
    if setup.zero is None:
        return 16 * params, host_init
    if setup.zero == 1:
        return 4 * params + 12 * params // gpus, host_init
    if setup.zero == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            params, gpus_per_node, nodes, cpu_offload=setup.offload_optimizer
        )
        return gpu, cpu

    def zero3(offload: bool) -> tuple[int, int]:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params,
            largest,
            gpus_per_node,
            nodes,
            cpu_offload=offload,
            cpu_offload_params=setup.offload_params,
            zero_init=False,
        )
        return int(gpu), int(cpu)

    if setup.offload_ratio is None:
        return zero3(setup.offload_optimizer)
    # DeepSpeed has no estimator for a partial offload: interpolate between its two estimates by
    # the share offloaded (not yet checked against a measurement).
    (gpu_on, cpu_on), (gpu_off, cpu_off) = zero3(False), zero3(True)
    ratio = setup.offload_ratio
    return (
        round(gpu_on + ratio * (gpu_off - gpu_on)),
        round(cpu_on + ratio * (cpu_off - cpu_on)),
    )


def make_plan(
    model: ModelConfig,
    vocab_size: int,
    gpus: int,
    gpus_per_node: int,
    micro_batch_size: int,
    seq_len: int,
) -> Plan:
    """Every setup's memory for `model` on `gpus` GPUs, `gpus_per_node` to a node."""
    if gpus < 1 or gpus_per_node < 1 or gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs do not split into nodes of {gpus_per_node}")
    nodes = gpus // gpus_per_node
    params = count_parameters(model, vocab_size)
    largest = largest_layer_params(model, vocab_size)
    acts = activation_bytes(model, vocab_size, micro_batch_size, seq_len, checkpointing=False)
    acts_ckpt = activation_bytes(model, vocab_size, micro_batch_size, seq_len, checkpointing=True)
    rows = []
    for setup in SETUPS:
        states, host = model_state_bytes(setup, params, largest, gpus_per_node, nodes)
        rows.append(Row(setup, states, host, states + acts, states + acts_ckpt, 4 * params))
    return Plan(
        model,
        params,
        largest,
        gpus,
        gpus_per_node,
        micro_batch_size,
        seq_len,
        acts,
        acts_ckpt,
        tuple(rows),
    )


def find_setup(zero: int | None, offload: str) -> Setup:
    """The setup a `--zero N --offload cpu|none` request names."""
    for setup in SETUPS:
        wanted = setup.zero == zero and setup.offload_optimizer == (offload == "cpu")
        if wanted and not setup.offload_params and setup.offload_ratio is None:
            return setup
    raise ValueError(f"no setup with ZeRO {zero} and offload {offload}")


def verdict(row: Row, gpu_memory: int, host_memory: int | None) -> str:
    """`yes`, `ckpt` (only with gradient checkpointing), `no`, or why a fitting setup cannot start.

    `no (host)`: the host memory per node is exceeded; `no (build)`: the states and activations
    fit, but the whole fp32 model does not fit on one GPU to be built before sharding.
    """
    if row.with_activations <= gpu_memory:
        fit = "yes"
    elif row.with_checkpointing <= gpu_memory:
        fit = "ckpt"
    else:
        return "no"
    if host_memory is not None and row.host_per_node > host_memory:
        return "no (host)"
    if row.build > gpu_memory:
        return "no (build)"
    return fit


def _gib(value: int) -> str:
    return f"{value / GIB:,.1f}"


def format_plan(
    plan: Plan, gpu_memory: int, host_memory: int | None, chosen: Setup | None = None
) -> str:
    """The plan as the table `gpt3 plan` prints."""
    nodes = plan.gpus // plan.gpus_per_node
    paper = f" (paper: {plan.model.paper_params / 1e9:g}B)" if plan.model.paper_params else ""
    host = f", host {_gib(host_memory)} GiB per node" if host_memory is not None else ""
    lines = [
        f"GPT {plan.model.name}: {plan.parameters:,} parameters{paper}; largest layer "
        f"{plan.largest_layer / 1e6:,.0f}M",
        f"{plan.gpus} GPU(s) = {nodes} node(s) x {plan.gpus_per_node}; micro-batch "
        f"{plan.micro_batch_size} x {plan.seq_len} tokens; GPU {_gib(gpu_memory)} GiB{host}",
        f"activations per GPU: {_gib(plan.activations)} GiB, "
        f"{_gib(plan.activations_checkpointed)} GiB with gradient checkpointing",
        f"building the model: {_gib(4 * plan.parameters)} GiB per GPU (fp32, before sharding)",
        "",
        f"{'setup':36}{'states/GPU':>12}{'host/node':>12}{'+acts':>10}{'+acts ckpt':>12}  fits",
    ]
    for row in plan.rows:
        mark = "  <- chosen" if row.setup == chosen else ""
        lines.append(
            f"{row.setup.name:36}{_gib(row.model_states):>12}{_gib(row.host_per_node):>12}"
            f"{_gib(row.with_activations):>10}{_gib(row.with_checkpointing):>12}  "
            f"{verdict(row, gpu_memory, host_memory)}{mark}"
        )
    lines += [
        "",
        "GiB throughout. fits: yes; ckpt = only with gradient checkpointing; no (host) = host",
        "memory per node exceeded; no (build) = fits once sharded, but the model is built whole",
        "in fp32 on each GPU first (deepspeed.zero.Init is not used yet).",
    ]
    return "\n".join(lines)
