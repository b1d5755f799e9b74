"""What fits where, before renting the GPUs: parameters, model-state memory per GPU for each way
of sharding, activation memory at the configured micro-batch, and a verdict per setup.

Everything is computed from the config alone (`pipeline.model.count_parameters`), so planning
175B allocates nothing. Sources of the numbers:

- ZeRO-2 and ZeRO-3 model states (16-bit weights, gradients, fp32 master weights, Adam moments,
  with or without CPU offload): DeepSpeed's own estimators, the functions its
  `estimate_zero{2,3}_model_states_mem_needs_all_cold` tables print (ZeRO-3 with or without
  `zero.Init`, as `make_plan(zero3_init=...)` says).
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
- FSDP2 and FSDP2 x tensor parallelism: `pipeline/distributed/planner_fsdp.py` (sharded states,
  the unsharded working set FSDP gathers, the build). With tensor parallelism of degree t the
  activations follow Korthikanti et al. too: per layer (10 or 8)sbh replicated on each TP rank
  (LayerNorm and linear inputs, dropout masks) and (8sbh + 4sbf)/t split (attention and MLP
  inner activations); with sequence parallelism the replicated part is split as well. The
  output head is vocab-parallel but its logits are gathered for the loss, so each rank keeps
  the whole logits plus its 16-bit slice (loss parallelism would split them t ways).
- Building: DDP, ZeRO-1 and ZeRO-2 keep a whole replica per GPU, built in fp32 (4 bytes per
  parameter). The trainer builds ZeRO-3 under `deepspeed.zero.Init` (`zero3_init=True`, as
  `gpt3 plan` plans it; see `pipeline.distributed.zero_init`): each module is partitioned as
  it is created, then today's values are drawn module by module in fp32 and written into the
  gathered partitions, so the peak is 4 bytes x P/N plus the largest layer twice in fp32 (the
  drawn copy and the gathered one; in bf16 the gathered one is half that, so this errs high).
  `zero3_init=False` (the function's default) plans the old whole build. FSDP and TP build on
  the meta device and materialise only each rank's shards (`planner_fsdp.fsdp_build_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config.schema import ModelConfig
from pipeline.distributed.planner_fsdp import (
    ParamSplit,
    fsdp_build_bytes,
    fsdp_state_bytes,
    fsdp_working_bytes,
    param_split,
    tensor_parallel_degrees,
)
from pipeline.model import count_parameters, padded_vocab_size

GIB = 2**30
LOGIT_BYTES = 6
"""Per logit: the 16-bit logits kept for backward and the fp32 gradient of the softmax. (The
fp32 copy for the loss is fused away under torch.compile; measured on an H200, bench/NOTES.md.)"""


@dataclass(frozen=True)
class Setup:
    """One way of holding model states: plain DDP, a ZeRO stage with optional offload, or FSDP2
    (optionally x tensor parallelism, optionally with CPU offload)."""

    name: str
    zero: int | None
    """None for plain DDP and for FSDP."""
    offload_optimizer: bool = False
    offload_params: bool = False
    offload_ratio: float | None = None
    """ZeRO-3's `offload_optimizer.ratio`: the share of optimizer states and updates on the
    CPU (the rest stays on the GPU). None: all of it, when offload_optimizer is set."""
    fsdp: bool = False
    """FSDP2 `fully_shard` per block and root over the data-parallel ranks."""
    tensor_parallel: int = 1
    """TP degree within a node (FSDP rows only); the data-parallel degree is GPUs / this."""


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
"""The DDP and DeepSpeed rows, in the order of the table (least sharded first)."""


def fsdp_setup(tensor_parallel: int = 1, offload: bool = False) -> Setup:
    """The FSDP2 row with TP degree `tensor_parallel` (1: FSDP alone), CPU offload or not."""
    name = "FSDP" if tensor_parallel == 1 else f"FSDP x TP {tensor_parallel}"
    name += " + CPU offload" if offload else ""
    return Setup(
        name,
        None,
        offload_optimizer=offload,
        offload_params=offload,
        fsdp=True,
        tensor_parallel=tensor_parallel,
    )


def fsdp_setups(model: ModelConfig, gpus: int, gpus_per_node: int) -> tuple[Setup, ...]:
    """FSDP alone, FSDP x TP for each TP degree that fits a node, then the offloaded ends (FSDP
    alone and the largest TP degree): the order the recommendation prefers."""
    degrees = tensor_parallel_degrees(model, gpus, gpus_per_node)
    offloaded = sorted({1, degrees[-1]})
    return tuple(fsdp_setup(t) for t in degrees) + tuple(fsdp_setup(t, True) for t in offloaded)


@dataclass(frozen=True)
class Row:
    """Memory of one setup, in bytes (per GPU, and host memory per node)."""

    setup: Setup
    model_states: int
    host_per_node: int
    with_activations: int
    with_checkpointing: int
    build: int
    """Peak while building the model, before training starts."""
    data_parallel: int
    """Ranks the batch is split over: GPUs / TP degree."""


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
    global_batch: int | None = None
    """Sequences per optimizer step (None: not known); each row's data-parallel degree x the
    micro-batch must divide it."""
    zero3_init: bool = False
    """ZeRO-3 rows built under `deepspeed.zero.Init` (the trainer's build, `gpt3 plan`'s)."""
    sequence_parallel: bool = False
    """FSDP x TP rows with `distributed.sequence_parallel` (norm/dropout/residual activations
    split over the TP ranks too)."""

    def accumulation(self, row: Row) -> int | None:
        """Gradient-accumulation steps of `row`; None where the global batch does not split
        (or is not known)."""
        per_step = row.data_parallel * self.micro_batch_size
        if self.global_batch is None or self.global_batch % per_step:
            return None
        return self.global_batch // per_step


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
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    loss_parallel: bool = False,
) -> int:
    """Activation memory of one micro-batch's forward pass on one GPU (see the module docstring).

    `checkpointed_layers` (with checkpointing): how many layers recompute (None: all).
    `tensor_parallel` t splits the attention and MLP activations t ways; `sequence_parallel`
    splits the rest (LayerNorms, dropout, the checkpointed inputs) too. The vocab-parallel
    output head gives each rank a 16-bit slice of the logits; `loss_parallel` computes the loss
    on the slices, otherwise (as `pipeline.distributed.tensor_parallel` does) they are gathered
    and the whole logits are kept as on one GPU, plus the slice. With t = 1 the last three
    change nothing. Sequence parallelism is `distributed.sequence_parallel`; loss parallelism
    is not applied by the trainer.
    """
    s, b, h, t = seq_len, micro_batch, model.d_model, tensor_parallel
    f = model.d_ff or 4 * h
    seq_split = t if sequence_parallel else 1
    replicated = (10 if model.dropout > 0 else 8) * s * b * h // seq_split
    per_layer = replicated + (8 * s * b * h + 4 * s * b * f) // t
    if loss_parallel:
        logits = LOGIT_BYTES * s * b * vocab_size // t
    else:
        logits = LOGIT_BYTES * s * b * vocab_size + (2 * s * b * vocab_size // t if t > 1 else 0)
    if not checkpointing:
        return model.n_layer * per_layer + logits
    recomputed = model.n_layer if checkpointed_layers is None else checkpointed_layers
    recomputed = min(recomputed, model.n_layer)
    kept = model.n_layer - recomputed
    layer_input = 2 * s * b * h // seq_split
    return recomputed * layer_input + (kept + (1 if recomputed else 0)) * per_layer + logits


def model_state_bytes(
    setup: Setup,
    params: int,
    largest: int,
    gpus_per_node: int,
    nodes: int,
    zero3_init: bool = False,
) -> tuple[int, int]:
    """(bytes per GPU, host bytes per node) of weights, gradients and optimizer states
    (`zero3_init`: ZeRO-3 under `deepspeed.zero.Init`, which changes DeepSpeed's host figure)."""
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
            zero_init=zero3_init,
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
    global_batch: int | None = None,
    zero3_init: bool = False,
    sequence_parallel: bool = False,
) -> Plan:
    """Every setup's memory for `model` on `gpus` GPUs, `gpus_per_node` to a node: the DDP and
    DeepSpeed rows, then FSDP and FSDP x TP as `pipeline.distributed.parallelize` lays them out.
    `global_batch` (sequences) lets the plan say which rows split it. `zero3_init`: ZeRO-3
    builds under `deepspeed.zero.Init` (partitioned as built), as the trainer does and `gpt3
    plan` says; the default False plans the whole fp32 build it did before, which DeepSpeed's
    `zero_init=0` host figures describe. `sequence_parallel`: the FSDP x TP rows run with
    `distributed.sequence_parallel` (their activations as `activation_bytes` says)."""
    if gpus < 1 or gpus_per_node < 1 or gpus % gpus_per_node:
        raise ValueError(f"{gpus} GPUs do not split into nodes of {gpus_per_node}")
    nodes = gpus // gpus_per_node
    params = count_parameters(model, vocab_size)
    largest = largest_layer_params(model, vocab_size)
    acts = activation_bytes(model, vocab_size, micro_batch_size, seq_len, checkpointing=False)
    acts_ckpt = activation_bytes(model, vocab_size, micro_batch_size, seq_len, checkpointing=True)
    rows = []
    for setup in SETUPS:
        states, host = model_state_bytes(setup, params, largest, gpus_per_node, nodes, zero3_init)
        sharded_build = setup.zero == 3 and zero3_init
        build = 4 * (params // gpus + 2 * largest) if sharded_build else 4 * params
        rows.append(Row(setup, states, host, states + acts, states + acts_ckpt, build, gpus))
    split = param_split(model, vocab_size)
    for setup in fsdp_setups(model, gpus, gpus_per_node):
        rows.append(
            _fsdp_row(
                setup,
                split,
                gpus,
                gpus_per_node,
                lambda ckpt, t: activation_bytes(
                    model,
                    vocab_size,
                    micro_batch_size,
                    seq_len,
                    ckpt,
                    tensor_parallel=t,
                    sequence_parallel=sequence_parallel and t > 1,
                ),
            )
        )
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
        global_batch,
        zero3_init,
        sequence_parallel,
    )


def _fsdp_row(
    setup: Setup,
    split: ParamSplit,
    gpus: int,
    gpus_per_node: int,
    activations: Callable[[bool, int], int],
) -> Row:
    """One FSDP (x TP) row: sharded states, the gathered working set, activations at TP degree
    t; host memory per node is the offloaded states of the node's GPUs."""
    t = setup.tensor_parallel
    dp = gpus // t
    gpu_states, host_states = fsdp_state_bytes(split, t, dp, setup.offload_params)
    on_gpu = gpu_states + fsdp_working_bytes(split, t)
    return Row(
        setup,
        on_gpu,
        host_states * gpus_per_node,
        on_gpu + activations(False, t),
        on_gpu + activations(True, t),
        fsdp_build_bytes(split, t, dp),
        dp,
    )


def find_setup(
    zero: int | None, offload: str, fsdp: bool = False, tensor_parallel: int = 1
) -> Setup:
    """The setup a `--zero N --offload cpu|none` (or `--fsdp [--tensor_parallel T]`) request
    names."""
    if fsdp or tensor_parallel > 1:
        if zero is not None:
            raise ValueError("FSDP / tensor parallelism and a ZeRO stage exclude each other")
        return fsdp_setup(tensor_parallel, offload == "cpu")
    for setup in SETUPS:
        wanted = setup.zero == zero and setup.offload_optimizer == (offload == "cpu")
        if wanted and not setup.offload_params and setup.offload_ratio is None:
            return setup
    raise ValueError(f"no setup with ZeRO {zero} and offload {offload}")


def verdict(row: Row, gpu_memory: int, host_memory: int | None) -> str:
    """`yes`, `ckpt` (only with gradient checkpointing), `no`, or why a fitting setup cannot start.

    `no (host)`: the host memory per node is exceeded; `no (build)`: the states and activations
    fit, but the build peak (`Row.build`: a whole fp32 replica for DDP and ZeRO-1/2) does not.
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
    zero3_build = (
        [
            "ZeRO-3 partitioned as built by deepspeed.zero.Init (its partitions plus the largest",
            "layer twice in fp32, drawn and gathered);",
        ]
        if plan.zero3_init
        else ["and for ZeRO-3 too (planned without deepspeed.zero.Init);"]
    )
    lines = [
        f"GPT {plan.model.name}: {plan.parameters:,} parameters{paper}; largest layer "
        f"{plan.largest_layer / 1e6:,.0f}M",
        f"{plan.gpus} GPU(s) = {nodes} node(s) x {plan.gpus_per_node}; micro-batch "
        f"{plan.micro_batch_size} x {plan.seq_len} tokens; GPU {_gib(gpu_memory)} GiB{host}",
        f"activations per GPU without TP: {_gib(plan.activations)} GiB, "
        f"{_gib(plan.activations_checkpointed)} GiB with gradient checkpointing",
        f"global batch: {plan.global_batch or 'not known'} sequences. TP (within a node): "
        "attention heads and MLP split",
        "column/row-wise, tied embedding/output head vocab-parallel (logits gathered for the "
        "loss),",
        (
            "norms, dropout and residuals split over the sequence (sequence parallel); "
            if plan.sequence_parallel
            else "norms and position embedding replicated (no --sequence_parallel); "
        )
        + "FSDP over the rest.",
        "",
        f"{'setup':36}{'states/GPU':>12}{'host/node':>12}{'+acts':>10}{'+acts ckpt':>12}"
        f"{'build':>8}{'accum':>7}  fits",
    ]
    for row in plan.rows:
        mark = "  <- chosen" if row.setup == chosen else ""
        accumulation = plan.accumulation(row)
        steps = "?" if plan.global_batch is None else str(accumulation or "-")
        lines.append(
            f"{row.setup.name:36}{_gib(row.model_states):>12}{_gib(row.host_per_node):>12}"
            f"{_gib(row.with_activations):>10}{_gib(row.with_checkpointing):>12}"
            f"{_gib(row.build):>8}{steps:>7}  {verdict(row, gpu_memory, host_memory)}{mark}"
        )
    lines += [
        "",
        "GiB throughout. states/GPU: weights, gradients, optimizer states (FSDP rows: their",
        "shards plus the unsharded block and root FSDP gathers). build: peak while the model is",
        "built: a whole fp32 replica for DDP and ZeRO-1/2,",
        *zero3_build,
        "FSDP/TP build on the meta device and materialise only each rank's shards. accum:",
        "gradient-accumulation steps of the global batch on the row's data-parallel ranks",
        "('-': it does not split). fits: yes; ckpt = only with gradient checkpointing;",
        "no (host) = host memory per node exceeded; no (build) = fits once built, but the",
        "build peak does not.",
    ]
    return "\n".join(lines)
