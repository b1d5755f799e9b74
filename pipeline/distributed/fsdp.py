"""FSDP2 (`fully_shard`) applied to the plain GPT from outside, as torchtitan does.

Each transformer block is one FSDP unit (its parameters are all-gathered just before its
forward and backward and freed after), and the root holds the rest (embeddings, the tied output
head, the final norm). Parameters, gradients and optimizer state are sharded over the mesh's
data-parallel axis; gradients are reduce-scattered (averaged) once per global batch, so the
global-batch semantics are DDP's: each rank trains on its slice, the update sees the mean.

Precision is FSDP2's `MixedPrecisionPolicy`, not autocast: `bf16` all-gathers and computes in
bfloat16 and reduces gradients in fp32; `fp16` the same in float16, with a loss scaler whose
overflow check is agreed by every rank (`sharded_grad_scaler`); `fp32` casts nothing. The
sharded master copy of the parameters stays fp32 in every case.

Nothing here knows the trainer: `apply_fsdp` returns the model it was given, now sharded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor, Shard

from pipeline.errors import ConfigError
from pipeline.model import GPT

PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""training.precision -> the dtype FSDP2 all-gathers and computes in (None: the parameters')."""


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for training.precision: low-precision compute, fp32 gradient reduction."""
    if precision not in PARAM_DTYPES:
        raise ConfigError(f"training.precision {precision!r}: FSDP knows {sorted(PARAM_DTYPES)}")
    dtype = PARAM_DTYPES[precision]
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_fsdp(
    model: GPT,
    mesh: DeviceMesh,
    precision: str = "fp32",
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> GPT:
    """Shard `model` in place with `fully_shard`: each block, then the root; returns it.

    `mesh` is the data-parallel mesh (1-D; with tensor parallelism, the `dp` axis of the 2-D
    mesh, applied after `apply_tensor_parallel`). `cpu_offload` keeps the sharded parameters,
    gradients and optimizer step on the host (pinned), copying shards in for each unit.
    `reshard_after_forward=False` keeps each block gathered from forward to backward (ZeRO-2
    like: more memory, one all-gather less per block). The model may be on the meta device
    (then `meta_init.materialize` fills it) or already initialised.

    Activation checkpointing (`model.set_gradient_checkpointing`) and per-block compilation
    (`block.compile()` before this call, as `build_components` does) compose with it: the
    checkpoint recomputes a block inside FSDP's hooks, and FSDP's hooks stay outside the
    compiled region when the block was compiled first.
    """
    policy = mixed_precision_policy(precision)
    offload: OffloadPolicy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    options = {
        "mesh": mesh,
        "mp_policy": policy,
        "offload_policy": offload,
        "shard_placement_fn": fused_qkv_on_dim1(model),
    }
    for block in model.h:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    # The root's parameters (embedding/head) are needed again at once by the loss: keep them.
    fully_shard(model, reshard_after_forward=False, **options)
    return model


def fused_qkv_on_dim1(model: GPT) -> Callable[[nn.Parameter], Shard | None]:
    """FSDP's shard dimension per parameter: dim 0 (the default), except the fused [q; k; v]
    matrices, sharded on their input dimension (`Shard(1)`).

    Tensor parallelism splits their rows in strides (q_r, k_r, v_r), which FSDP cannot split
    again consistently; and checkpoints store them as `(3, inner, d)` views
    (`tensor_parallel.qkv_view`), which a row split of the fused matrix does not map onto.
    """
    fused = {id(block.attn.c_attn.weight) for block in model.h}

    def placement(param: nn.Parameter) -> Shard | None:
        return Shard(1) if id(param) in fused else None

    return placement


def sharded_grad_scaler(device: torch.device) -> ShardedGradScaler:
    """fp16's dynamic loss scaler for sharded gradients: an overflow found in any rank's shard
    skips the step on every rank (a plain `GradScaler` would decide per shard and diverge)."""
    return ShardedGradScaler(device.type)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient 2-norm of sharded (DTensor) or plain parameters, clipped to `max_norm`.

    `torch.nn.utils.clip_grad_norm_` stacks the per-parameter norms, which fails when the
    DTensors live on different meshes (FSDP x TP: 2-D for the split matrices, the `dp` axis for
    the rest). Here each norm is completed over its own mesh first (`full_tensor`: the squares
    are summed over the shards), so a parameter replicated over `tp` counts once. Returns the
    norm before clipping (inf/nan are passed through and nothing is scaled then).

    Under sequence parallelism the LayerNorm weights' gradients leave backward `Partial` over
    `tp` (each rank saw its own positions); FSDP2 redistributes every gradient to its
    parameter's placement (`Replicate()` there) before it reduces over `dp`, so the gradients
    read here are already complete (tests/test_fsdp.py compares the norms with one device's).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    squares = []
    for grad in grads:
        norm = torch.linalg.vector_norm(grad, 2, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.square())
    total = torch.stack(squares).sum().sqrt()
    if math.isfinite(max_norm) and torch.isfinite(total):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(float(coef))
    return total
