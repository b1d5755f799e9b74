"""Which setup `gpt3 plan` recommends, and why the ones before it were passed over.

The rule, so a reader can check it against the table: take the setups in order of the traffic
and overhead they add, least first, and recommend the first that fits the GPU, fits the host
memory, can be built, and splits the global batch into whole micro-batches on its data-parallel
ranks -- first without gradient checkpointing, then with it, then the offloading setups the
same way. Recomputation costs about a third more compute for certain, while sharding's and
tensor parallelism's traffic within the listed setups largely overlaps compute; offloading
moves states over PCIe and steps the optimizer on the CPU every step, which costs more than
recomputing.

1. DDP, then ZeRO-1 and ZeRO-2: a whole replica per GPU, one gradient all-reduce's worth of
   traffic per step.
2. FSDP, then FSDP x TP 2, 4, 8: every state sharded (1.5x DDP's traffic: parameters gathered in
   forward and backward, gradients reduce-scattered); tensor parallelism within a node splits
   weights and activations further for two all-reduces per layer each way over NVLink.
3. ZeRO-3: the same sharding as FSDP with DeepSpeed (2 more bytes per parameter, and no
   tensor parallelism to compose with here).
4. Offloading setups last, in table order.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.distributed.planner import GIB, Plan, Row, verdict


@dataclass(frozen=True)
class Recommendation:
    """The recommended row (None: nothing fits), its verdict, and the reasons as printed lines."""

    row: Row | None
    fit: str
    lines: tuple[str, ...]


def _offloads(row: Row) -> bool:
    return row.setup.offload_optimizer or row.setup.offload_params


def preference_order(plan: Plan) -> list[Row]:
    """The plan's rows in the order the module docstring gives."""

    def rank(row: Row) -> tuple[int, int]:
        setup = row.setup
        if _offloads(row):
            return 3, plan.rows.index(row)
        if setup.fsdp:
            return 1, setup.tensor_parallel
        if setup.zero == 3:
            return 2, 0
        return 0, plan.rows.index(row)

    return sorted(plan.rows, key=rank)


def _gib(value: int) -> str:
    return f"{value / GIB:,.1f}"


def rejection(
    plan: Plan, row: Row, gpu_memory: int, host_memory: int | None, allow_ckpt: bool = True
) -> str | None:
    """Why `row` cannot run this plan (or, with `allow_ckpt` False, not without gradient
    checkpointing), in a few words; None if it can."""
    fit = verdict(row, gpu_memory, host_memory)
    if fit == "no":
        return (
            f"{_gib(row.with_checkpointing)} GiB per GPU even with gradient checkpointing "
            f"(model states {_gib(row.model_states)})"
        )
    if fit == "no (host)":
        return f"{_gib(row.host_per_node)} GiB of host memory per node"
    if fit == "no (build)":
        return f"building needs {_gib(row.build)} GiB per GPU"
    if plan.global_batch is not None and plan.accumulation(row) is None:
        text = (
            f"the global batch of {plan.global_batch} sequences is not a multiple of "
            f"{row.data_parallel} data-parallel ranks x micro-batch {plan.micro_batch_size}"
        )
        smaller = [
            m
            for m in range(plan.micro_batch_size - 1, 0, -1)
            if plan.global_batch % (row.data_parallel * m) == 0
        ]
        return text + (f" (micro-batch {smaller[0]} would split it)" if smaller else "")
    if fit == "ckpt" and not allow_ckpt:
        return (
            f"fits only with gradient checkpointing ({_gib(row.with_checkpointing)} GiB; "
            f"{_gib(row.with_activations)} without)"
        )
    return None


def describe(plan: Plan, row: Row, fit: str, gpu_memory: int) -> list[str]:
    """The recommendation's lines: the setup, the layout in mesh terms, the batch split, and
    the memory per GPU (and host, and the build peak)."""
    setup = row.setup
    nodes = plan.gpus // plan.gpus_per_node
    ranks = f"{row.data_parallel} data-parallel ranks ({nodes} node(s) of {plan.gpus_per_node})"
    if setup.fsdp and setup.tensor_parallel > 1:
        layout = f"TP {setup.tensor_parallel} within each node x FSDP over {ranks}"
        if plan.sequence_parallel:
            layout += ", sequence parallel"
    elif setup.fsdp:
        layout = f"FSDP over {ranks}"
    else:
        layout = ranks
    memory = row.with_activations if fit == "yes" else row.with_checkpointing
    accumulation = plan.accumulation(row)
    batch = f"micro-batch {plan.micro_batch_size} x {row.data_parallel} ranks"
    if accumulation is not None:
        batch += f" x {accumulation} accumulation step(s) = {plan.global_batch} sequences"
    host = f", host {_gib(row.host_per_node)} GiB per node" if row.host_per_node else ""
    return [
        f"recommended: {setup.name}" + ("" if fit == "yes" else ", with gradient checkpointing"),
        f"  layout  {layout}",
        f"  batch   {batch}",
        f"  memory  {_gib(memory)} of {_gib(gpu_memory)} GiB per GPU (build peak "
        f"{_gib(row.build)} GiB{host})",
    ]


def recommend(plan: Plan, gpu_memory: int, host_memory: int | None) -> Recommendation:
    """The first row that can run, in the passes of the module docstring, with a line per row
    passed over before it (each with the reason of the pass that settled it)."""
    ordered = preference_order(plan)
    groups = [
        [row for row in ordered if not _offloads(row)],
        [row for row in ordered if _offloads(row)],
    ]
    passed: list[str] = []
    for group in groups:
        for allow_ckpt in (False, True):
            reasons = []
            for row in group:
                reason = rejection(plan, row, gpu_memory, host_memory, allow_ckpt)
                if reason is None:
                    fit = verdict(row, gpu_memory, host_memory)
                    lines = describe(plan, row, fit, gpu_memory)
                    if passed or reasons:
                        lines.append("passed over first (least communication first):")
                        lines += passed + reasons
                    return Recommendation(row, fit, tuple(lines))
                reasons.append(f"  {row.setup.name}: {reason}")
        passed += reasons  # the group's reasons with checkpointing allowed
    lines = ["recommended: nothing fits on these GPUs; every setup, least communication first:"]
    return Recommendation(None, "no", tuple(lines + passed))
