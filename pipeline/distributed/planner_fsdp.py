"""Memory per GPU of FSDP2 and of FSDP2 x tensor parallelism, from the config alone.

The layout modelled is `pipeline.distributed.parallelize`'s: `fully_shard` on each transformer
block and on the root (token and position embeddings, final LayerNorm, the tied output head),
sharding over the data-parallel mesh dimension of `dp` ranks; tensor parallelism of degree `t`
inside a node (`tensor_parallel.py`) splits each block Megatron-style (`c_attn` and `mlp.c_fc`
column-wise, the two `c_proj` row-wise) and the tied token embedding / output head by
vocabulary rows (`vocab_parallel=False` plans them replicated instead). LayerNorm weights, the
biases of the row-wise layers and the position embedding stay replicated over the TP group
(FSDP still shards them over `dp`).

Per GPU (P_local = the parameters one TP rank holds, P_shard = P_local / dp):

- States: the sharded fp32 parameters (FSDP2's `MixedPrecisionPolicy` keeps the master copy in
  the parameter's own dtype and casts when it gathers), fp32 sharded gradients and AdamW's two
  fp32 moments: 16 bytes x P_shard. With `CPUOffloadPolicy` all of it lives in host memory and
  the optimizer steps on the CPU, so the GPU holds none of it.
- Working set (the unsharded copies FSDP2 gathers): the root stays unsharded from forward through
  backward (FSDP2 does not reshard the root after forward) with its gradient; in backward one
  block is unsharded while the next is prefetched, and the block's unsharded gradient is copied
  into a reduce-scatter buffer of the reduce dtype. So root x 2 p + block x (3 p + r) bytes,
  p = param dtype bytes (2 for bf16), r = reduce dtype bytes (4 for fp32).
- Build (`meta_init.materialize`): on the meta device, then each rank allocates only its
  shards in fp32 (4 bytes x P_shard) and initialises one module at a time in full, keeping its
  slice: the price of weights bitwise today's on one rank. The transient is the largest
  parameter in full plus the slicing's intermediates (`distribute_tensor` over the tp then the
  dp axis): 3 x 4 bytes x the largest parameter, measured on CPU (bench/fsdp_memory.py: TP 2
  needs all three; FSDP alone about 1.5 of them, so this is conservative there).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.schema import ModelConfig
from pipeline.model import padded_vocab_size

STATE_BYTES = 16
"""fp32 sharded parameter (4) + fp32 sharded gradient (4) + AdamW exp_avg and exp_avg_sq (8)."""
BUILD_BYTES = 4
"""The model is materialised in fp32."""
BUILD_TRANSIENT_COPIES = 3
"""Copies of the largest parameter alive while it is initialised and sliced (see above)."""


@dataclass(frozen=True)
class Precision:
    """FSDP2's `MixedPrecisionPolicy`: bytes of the gathered compute copy and of the reduction."""

    param_bytes: int
    reduce_bytes: int


BF16_FP32_REDUCE = Precision(param_bytes=2, reduce_bytes=4)
"""bf16 parameters for compute, fp32 gradient reduction: the policy the planner plans for."""
FP32 = Precision(param_bytes=4, reduce_bytes=4)
"""No mixed precision (what the CPU check in bench/fsdp_memory.py measures)."""


@dataclass(frozen=True)
class ParamSplit:
    """Parameter counts by how tensor parallelism treats them (padded vocabulary rows included:
    they are allocated)."""

    n_layer: int
    block_split: int
    """Per block: parameters split `t` ways (c_attn, attn.c_proj and mlp weights, column-wise
    biases)."""
    block_replicated: int
    """Per block: LayerNorms and the row-wise layers' biases."""
    root_split: int
    """Token embedding / tied output head when vocab-parallel, else 0."""
    root_replicated: int
    """Position embedding, final LayerNorm, and the token embedding when replicated."""
    largest_param: int
    """Elements of the biggest single tensor (the build transient)."""

    def block_local(self, t: int) -> int:
        """One block's parameters on one TP rank."""
        return -(-self.block_split // t) + self.block_replicated

    def root_local(self, t: int) -> int:
        """The root unit's parameters on one TP rank."""
        return -(-self.root_split // t) + self.root_replicated

    def local(self, t: int) -> int:
        """Every parameter one TP rank holds before FSDP shards them."""
        return self.n_layer * self.block_local(t) + self.root_local(t)

    @property
    def total(self) -> int:
        return self.local(1)


def param_split(model: ModelConfig, vocab_size: int, vocab_parallel: bool = True) -> ParamSplit:
    """Count `GPT(model, vocab_size)`'s parameters by TP placement, from shapes alone."""
    d = model.d_model
    d_ff = model.d_ff or 4 * d
    inner = model.n_head * (model.d_head or d // model.n_head)
    rows = padded_vocab_size(vocab_size)
    block_split = (d * 3 * inner + 3 * inner) + inner * d + (d * d_ff + d_ff) + d_ff * d
    block_replicated = 2 * d + d + 2 * d + d  # ln_1, attn.c_proj bias, ln_2, mlp.c_proj bias
    embedding = rows * d
    root_replicated = model.n_ctx * d + 2 * d + (0 if vocab_parallel else embedding)
    largest = max(embedding, model.n_ctx * d, d * 3 * inner, inner * d, d * d_ff)
    return ParamSplit(
        n_layer=model.n_layer,
        block_split=block_split,
        block_replicated=block_replicated,
        root_split=embedding if vocab_parallel else 0,
        root_replicated=root_replicated,
        largest_param=largest,
    )


def shard_params(split: ParamSplit, t: int, dp: int) -> int:
    """Parameters one GPU owns: its TP slice, then its FSDP shard (rounded up per unit, as FSDP2
    pads each dim-0 shard)."""
    units = [split.block_local(t)] * split.n_layer + [split.root_local(t)]
    return sum(-(-unit // dp) for unit in units)


def fsdp_state_bytes(split: ParamSplit, t: int, dp: int, offload: bool) -> tuple[int, int]:
    """(GPU bytes, host bytes) of sharded parameters, gradients and AdamW states of one GPU."""
    states = STATE_BYTES * shard_params(split, t, dp)
    return (0, states) if offload else (states, 0)


def fsdp_working_bytes(split: ParamSplit, t: int, precision: Precision = BF16_FP32_REDUCE) -> int:
    """The unsharded copies alive at the start of backward (see the module docstring)."""
    p, r = precision.param_bytes, precision.reduce_bytes
    return split.root_local(t) * 2 * p + split.block_local(t) * (3 * p + r)


def fsdp_build_bytes(split: ParamSplit, t: int, dp: int) -> int:
    """Peak while building: this GPU's fp32 shards plus the largest parameter initialised in full
    and sliced."""
    return BUILD_BYTES * (shard_params(split, t, dp) + BUILD_TRANSIENT_COPIES * split.largest_param)


def tensor_parallel_degrees(model: ModelConfig, gpus: int, gpus_per_node: int) -> list[int]:
    """The TP degrees worth planning: powers of two within one node (TP's all-reduces per layer
    need NVLink), dividing the heads, d_ff and the job's GPUs."""
    d_ff = model.d_ff or 4 * model.d_model
    degrees = []
    t = 1
    while t <= gpus_per_node:
        if gpus_per_node % t == 0 and model.n_head % t == 0 and d_ff % t == 0 and gpus % t == 0:
            degrees.append(t)
        t *= 2
    return degrees
