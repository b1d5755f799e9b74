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
`torch.distributed.checkpoint` cannot write as is; checkpoints store it as a `(3, inner, d)`
view in every layout (`qkv_view`, `checkpoint_states`).

Sequence parallelism (`sequence_parallel=True`, Megatron's, Korthikanti et al. 2022). Without
it the activations between the split layers (the LayerNorms, dropout and residual adds, the
embedding sum) are replicated: each of the t ranks stores all of them. With it they are split
by sequence position (`Shard(1)`): the row-wise layers reduce-scatter instead of all-reduce
(rank r keeps positions [r T/t, (r+1) T/t)), the norms run on their positions alone
(`SequenceParallel`: replicated weights whose gradients come out `Partial` and are summed over
the group, which FSDP2 does when it reduces them), and the attention / MLP inputs are
all-gathered before the column-wise layers. The communication volume is the same (an
all-reduce is a reduce-scatter plus an all-gather); the stored activations outside attention
and the MLP shrink t times. The output head gathers the sequence and computes the loss on the
whole logits, as without it. Parameters keep the same placements either way, so checkpoints do
not depend on the switch. The sequence length must divide by t (`check_sequence_parallel`);
the sharded model trains and evaluates but does not generate (`export_model` gives a plain one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
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
            output_fn=self._output_fn,
        )

    @staticmethod
    def _output_fn(module: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:
        return _output_to_local(module, outputs, device_mesh)


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


def check_sequence_parallel(seq_len: int, degree: int) -> None:
    """Refuse a sequence length that `degree` sequence-parallel ranks cannot split evenly."""
    if seq_len % degree:
        raise ConfigError(
            f"distributed.sequence_parallel: the sequence length {seq_len} (training.seq_len, "
            f"else model.n_ctx) is not a multiple of distributed.tensor_parallel {degree}; "
            "each rank keeps an equal share of the positions between the blocks"
        )


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> GPT:
    """Split `model` over the 1-D `tp_mesh` in place (see the module docstring); returns it.

    The model may be on the meta device (`meta_init.materialize` then fills the shards) or
    initialised identically on every rank of the group (nothing is broadcast: the slices are
    cut locally). Apply before `apply_fsdp` on the data axis of the same 2-D mesh.
    """
    degree = tp_mesh.size()
    check_tensor_parallel(model, degree)
    plan = tensor_parallel_plan(model, sequence_parallel)
    for block in model.h:
        block.attn.n_head //= degree  # the forward reshapes by the heads this rank holds
        block.attn.inner //= degree
    parallelize_module(model, tp_mesh, plan, src_data_rank=None)
    model.tie_weights()  # both split by vocabulary rows (Shard(0)): one DTensor, one gradient
    if sequence_parallel:
        model.register_forward_pre_hook(sequence_split_check(degree), with_kwargs=True)
    return model


def tensor_parallel_plan(model: GPT, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Module name -> style. `sequence_parallel` changes only the activations' layouts between
    the split layers (`Shard(1)` instead of `Replicate()`), never a parameter's placement."""
    between = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
        "wpe": PositionsSequenceParallel() if sequence_parallel else ReplicateParallel(),
        "ln_f": _norm_style(sequence_parallel),
        "lm_head": ColwiseParallel(input_layouts=between, output_layouts=Replicate()),
    }
    for i in range(len(model.h)):
        plan[f"h.{i}.ln_1"] = _norm_style(sequence_parallel)
        plan[f"h.{i}.ln_2"] = _norm_style(sequence_parallel)
        if sequence_parallel:  # gather the positions before the column-wise layers
            plan[f"h.{i}.attn"] = _gather_sequence(extra_inputs=2)  # (x, kv_cache, start_pos)
            plan[f"h.{i}.mlp"] = _gather_sequence(extra_inputs=0)
        plan[f"h.{i}.attn.c_attn"] = FusedQKVColwise()
        plan[f"h.{i}.attn.c_proj"] = RowwiseParallel(output_layouts=between)
        plan[f"h.{i}.mlp.c_fc"] = ColwiseParallel()
        plan[f"h.{i}.mlp.c_proj"] = RowwiseParallel(output_layouts=between)
    return plan


def _norm_style(sequence_parallel: bool) -> ParallelStyle:
    """A LayerNorm on this rank's positions (plain tensors in and out), or on all of them."""
    if sequence_parallel:
        return SequenceParallel(sequence_dim=1, use_local_output=True)
    return ReplicateParallel()


def _gather_sequence(extra_inputs: int) -> PrepareModuleInput:
    """All-gather a module's first input over the sequence (its other inputs pass as they are)."""
    rest: tuple[None, ...] = (None,) * extra_inputs
    return PrepareModuleInput(
        input_layouts=(Shard(1), *rest),
        desired_input_layouts=(Replicate(), *rest),
        use_local_output=True,
    )


class PositionsSequenceParallel(ReplicateParallel):
    """The position embedding, replicated, returning this rank's positions only.

    The model adds it to the token embedding, which is sequence-sharded (`Shard(1)` of
    `(B, T, d)`): rank r takes rows [r T/t, (r+1) T/t) of the `(T, d)` lookup (no
    communication); in backward the rows' gradients are all-gathered, so every rank holds the
    whole (replicated) gradient of the table.
    """

    @staticmethod
    def _output_fn(module: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:
        return _output_rows_to_local(module, outputs, device_mesh)


def _output_rows_to_local(module: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:
    return outputs.redistribute(device_mesh, [Shard(0)]).to_local()


def sequence_split_check(degree: int) -> Callable[[nn.Module, tuple, dict[str, Any]], None]:
    """A forward pre-hook refusing what a sequence-sharded model cannot compute: a length
    that does not split evenly, and generation (`kv_cache`, `last_only`: the last position
    lives on one rank only)."""

    def check(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        idx = args[0] if args else kwargs["idx"]
        if idx.shape[1] % degree:
            raise ValueError(
                f"sequence parallelism over {degree} ranks needs a sequence length that is a "
                f"multiple of {degree}, got {idx.shape[1]}"
            )
        kv_cache = args[2] if len(args) > 2 else kwargs.get("kv_cache")
        last_only = args[4] if len(args) > 4 else kwargs.get("last_only", False)
        if kv_cache is not None or last_only:
            raise ValueError(
                "a sequence-parallel model does not generate (kv_cache / last_only): sample "
                "from the exported plain model"
            )

    return check


QKV_WEIGHT = "attn.c_attn.weight"
"""Parameters whose rows are [q; k; v] (state-dict keys end with this)."""


def qkv_view(value: Any) -> Any:
    """A fused [q; k; v] matrix `(3 * inner, d)` as `(3, inner, d)`, sharing its storage.

    Tensor parallelism holds q_r, k_r and v_r on rank r (`_StridedShard`): three row blocks of
    the fused matrix, which `torch.distributed.checkpoint` cannot write as one chunk. As
    `(3, inner, d)` the same shard is one block (`Shard(1)`), so checkpoints store this view
    in every layout (one device, FSDP, FSDP x TP) and reshard between them. FSDP shards these
    matrices on their input dimension (`Shard(1)` -> `Shard(2)` here) for the same reason.
    """
    if isinstance(value, DTensor):
        local = value.to_local()
        rows, cols = value.shape
        placements = [_viewed_placement(p) for p in value.placements]
        view = local.view(3, local.shape[0] // 3, local.shape[1])
        return DTensor.from_local(
            view,
            value.device_mesh,
            placements,
            run_check=False,
            shape=torch.Size((3, rows // 3, cols)),
            stride=(rows // 3 * cols, cols, 1),
        )
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        return value.view(3, value.shape[0] // 3, value.shape[1])
    return value


def _viewed_placement(placement: Any) -> Any:
    if isinstance(placement, _StridedShard) and placement.dim == 0:
        return Shard(1)
    if type(placement) is Shard and placement.dim == 1:
        return Shard(2)
    if isinstance(placement, Replicate):
        return placement
    raise ValueError(f"no (3, inner, d) view of a fused q/k/v matrix placed as {placement}")


def _with_qkv_views(state: Any) -> Any:
    """`state` (a model or optimizer state dict) with every fused q/k/v tensor as `qkv_view`."""
    if not isinstance(state, dict):
        return state
    out = {}
    for key, value in state.items():
        if isinstance(key, str) and key.endswith(QKV_WEIGHT):
            out[key] = (
                {k: qkv_view(v) for k, v in value.items()}
                if isinstance(value, dict)
                else qkv_view(value)
            )
        else:
            out[key] = _with_qkv_views(value)
    return out


class QKVViewState:
    """A DCP `Stateful` (model or optimizer state) whose fused q/k/v tensors are stored as
    `(3, inner, d)` views: the checkpoint key layout is the same for every parallel layout.

    DCP loads into the views in place (they share storage with the state dict's tensors), so
    `load_state_dict` hands the original state dict to the wrapped state.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._original: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        self._original = self.inner.state_dict()
        return _with_qkv_views(self._original)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        assert self._original is not None, "state_dict() is taken before a load"
        self.inner.load_state_dict(self._original)


def checkpoint_states(states: dict[str, Any]) -> dict[str, Any]:
    """Wrap each named state (model, optimizer) in `QKVViewState`."""
    return {name: QKVViewState(state) for name, state in states.items()}
