"""Tensor parallelism (Megatron-style) for the plain GPT, applied from outside with DTensor.

Within a tensor-parallel group every rank sees the same tokens and holds a slice of each block:

- attention: the fused `c_attn` ([q; k; v] rows) is split column-wise so that each rank holds
  its own heads' q, k and v (`_StridedShard(0, split_factor=3)`: the q, k and v thirds are each
  split over the ranks, not the fused matrix as a whole), computes attention for those heads
  alone, and `c_proj` is split row-wise: its partial outputs are summed (one all-reduce);
- MLP: `c_fc` column-wise, `c_proj` row-wise (one all-reduce);
- the tied token embedding / output head: the vocabulary rows are split (`Shard(0)`); the
  embedding lookup sums the ranks' partial rows (all-reduce), the head's logits are gathered
  over the vocabulary so the loss is computed exactly as on one device;
- norms and the position embedding are replicated (`Replicate()` DTensors), so that every
  parameter is a DTensor on the mesh: the optimizer's foreach kernels and gradient clipping
  then see one kind of tensor, and FSDP2 on the data axis shards them all the same way.

Checkpoint keys and full tensors are unchanged (`full_tensor()` gives today's [q; k; v] layout).
The state dict of `c_attn` is not a contiguous block per rank, which
`torch.distributed.checkpoint` cannot write as is; see `tensor_parallel.checkpoint_view`.

Sequence parallelism for the norms is not applied (activations stay replicated between blocks):
on CPU and at the sizes tested it only adds collectives; see bench/NOTES.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import _StridedShard

from pipeline.errors import ConfigError
from pipeline.model import GPT


class FusedQKVColwise(ColwiseParallel):
    """Column-wise split of a fused [q; k; v] projection: rank r holds q_r, k_r and v_r.

    The output stays in that order on each rank, so the model's own `split(inner)` into q, k
    and v works on the local tensor once `inner` and `n_head` are the per-rank values.
    """

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        for param_name, param in module.named_parameters():
            # The bias is small: replicated, it is cut to [q_r, k_r, v_r] locally in the add,
            # and it stays a plain block for FSDP's sharding and for checkpoints.
            placement = _StridedShard(0, split_factor=3) if param.dim() == 2 else Replicate()
            sharded = distribute_tensor(param, device_mesh, [placement], src_data_rank=None)
            module.register_parameter(
                param_name, nn.Parameter(sharded, requires_grad=param.requires_grad)
            )

    @staticmethod
    def _prepare_output_fn(
        output_layouts: Any, use_local_output: bool, mod: nn.Module, outputs: Any, device_mesh: Any
    ) -> Any:
        return outputs.to_local()  # this rank's [q_r, k_r, v_r], no communication


class ReplicateParallel(ParallelStyle):
    """Parameters replicated over the mesh as DTensors; plain tensors in and out.

    The inputs are the same on every rank of the group, so each rank computes the same output
    and the same parameter gradient: nothing is communicated.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            partition_fn=_replicate_parameters,
            input_fn=_inputs_to_replicated,
            output_fn=_output_to_local,
        )


def _replicate_parameters(name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
    for param_name, param in list(module.named_parameters(recurse=False)):
        replicated = distribute_tensor(param, device_mesh, [Replicate()], src_data_rank=None)
        module.register_parameter(
            param_name, nn.Parameter(replicated, requires_grad=param.requires_grad)
        )


def _inputs_to_replicated(module: nn.Module, inputs: Any, device_mesh: DeviceMesh) -> Any:
    return tuple(
        DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
        else x
        for x in inputs
    )


def _output_to_local(module: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:
    return outputs.to_local() if isinstance(outputs, DTensor) else outputs


def check_tensor_parallel(model: GPT, degree: int) -> None:
    """Refuse, with what to change, a model that `degree` ranks cannot split evenly."""
    c = model.config
    problems = []
    if c.n_head % degree:
        problems.append(f"model.n_head {c.n_head} is not a multiple of it")
    if c.d_ff % degree:
        problems.append(f"model.d_ff {c.d_ff} is not a multiple of it")
    if model.loss_chunk_tokens is not None:
        problems.append("training.loss_chunk_tokens needs the whole output head on each rank")
    if problems:
        raise ConfigError(f"distributed.tensor_parallel {degree}: " + "; ".join(problems))


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh) -> GPT:
    """Split `model` over the 1-D `tp_mesh` in place (see the module docstring); returns it.

    The model may be on the meta device (`meta_init.materialize` then fills the shards) or
    initialised identically on every rank of the group (nothing is broadcast: the slices are
    cut locally). Apply before `apply_fsdp` on the data axis of the same 2-D mesh.
    """
    degree = tp_mesh.size()
    check_tensor_parallel(model, degree)
    plan: dict[str, ParallelStyle] = {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "wpe": ReplicateParallel(),
        "ln_f": ReplicateParallel(),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    for i, block in enumerate(model.h):
        plan[f"h.{i}.ln_1"] = ReplicateParallel()
        plan[f"h.{i}.ln_2"] = ReplicateParallel()
        plan[f"h.{i}.attn.c_attn"] = FusedQKVColwise()
        plan[f"h.{i}.attn.c_proj"] = RowwiseParallel()
        plan[f"h.{i}.mlp.c_fc"] = ColwiseParallel()
        plan[f"h.{i}.mlp.c_proj"] = RowwiseParallel()
        block.attn.n_head //= degree  # the forward reshapes by the heads this rank holds
        block.attn.inner //= degree
    parallelize_module(model, tp_mesh, plan, src_data_rank=None)
    model.tie_weights()  # both split by vocabulary rows (Shard(0)): one DTensor, one gradient
    return model


def tensor_parallel_placement_ok(param: nn.Parameter) -> bool:
    """Whether a parameter's placements are plain blocks (`Shard`/`Replicate`) that
    `torch.distributed.checkpoint` can write as they are (`_StridedShard` is not)."""
    if not isinstance(param, DTensor):
        return True
    return all(type(p) in (Shard, Replicate) for p in param.placements)
