"""`distributed.strategy: fsdp`: FSDP2 over the data axis, tensor parallelism over `tp` ranks.

The strategy lays the plain GPT out on a ("dp", "tp") mesh (`parallelize`), steps it through
`MixedPrecision.unscale_clip_step` with a clip that reads sharded gradients, and checkpoints
through the DCP store: each rank writes its own shards, and a checkpoint loads on another
number of ranks or another layout (DCP reshards on load).

Global batch. The trainer gives every rank its slice of the global batch (rank r of W takes
the r-th 1/W, as for DDP). The ranks of one tensor-parallel group must compute on the same
tokens, so the forward first gathers the group's slices (ranks of a group are adjacent, so
their slices are too): each group trains on its contiguous 1/dp of the batch, the loss is that
slice's mean (the same on every rank of the group) and FSDP averages gradients over the data
axis. The update is the one one device makes on the whole batch.

Precision is FSDP2's (`fsdp.mixed_precision_policy`: bf16/fp16 compute and fp32 gradient
reduction), so no autocast runs around the forward; fp16 scales the loss with a sharded scaler
whose overflow check is agreed by every rank.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pipeline.checkpoint.dcp_store import (
    DCPStore,
    ModelState,
    OptimizerState,
    is_dcp_folder,
    newest_steps,
)
from pipeline.checkpoint.layout import load_verified, resolve_latest
from pipeline.checkpoint.store import LOOP_STATE
from pipeline.config.schema import Config
from pipeline.distributed.comm import Collective
from pipeline.distributed.data_parallel import CollectiveStrategy, seed_rank
from pipeline.distributed.fsdp import clip_grad_norm, sharded_grad_scaler
from pipeline.distributed.mesh import build_mesh, data_slice
from pipeline.distributed.meta_init import materialize
from pipeline.distributed.parallelize import parallelize
from pipeline.distributed.strategy import CompatibilityCheck, StepResult, Wrapped
from pipeline.distributed.tensor_parallel import check_sequence_parallel, checkpoint_states
from pipeline.errors import CheckpointError
from pipeline.model import GPT
from pipeline.training.components import compiled_forward, with_attention_backend
from pipeline.training.device import resolve_device
from pipeline.training.precision import MixedPrecision


class ShardedPrecision(MixedPrecision):
    """FSDP2 casts parameters itself (`MixedPrecisionPolicy`): no autocast around the forward;
    fp16 keeps a loss scaler whose overflow decision is shared by all ranks."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class FSDPStrategy(CollectiveStrategy):
    """FSDP2 (x tensor parallel): see the module docstring."""

    name = "fsdp"

    def __init__(self, comm: Collective | None = None, *, config: Config) -> None:
        super().__init__(comm, config=config)
        d = config.distributed
        self.device = resolve_device(config.training.device)
        self.mesh = build_mesh(self.device.type, self.world_size, d.tensor_parallel)
        self.data = data_slice(self.mesh)
        self.tp_group = self.mesh["tp"].get_group() if d.tensor_parallel > 1 else None
        if d.sequence_parallel:
            check_sequence_parallel(config.seq_len, d.tensor_parallel)
        self.model: GPT | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.precision: ShardedPrecision | None = None
        self.store: DCPStore | None = None

    # ------------------------------------------------------------------------- the step
    def wrap(
        self, model: GPT, optimizer: torch.optim.Optimizer, precision: MixedPrecision
    ) -> Wrapped:
        """Shard `model` in place, rebuild the optimizer over the shards, compile as set.

        `model` may be on the meta device (`build_components` builds it there for fsdp): its
        shards are then allocated and initialised as today's build would (`meta_init`), from
        the generator state the build left, so the weights equal a single-device run's.
        """
        t, d = self.config.training, self.config.distributed
        if t.compile and t.compile_scope == "blocks":
            compiled_forward(model, t)  # each block compiled in place, before FSDP wraps it
        parallelize(
            model,
            self.mesh,
            precision=t.precision,
            cpu_offload=d.cpu_offload,
            sequence_parallel=d.sequence_parallel,
        )
        if any(p.is_meta for p in model.parameters()):  # built on meta: fill this rank's shards
            host = torch.device("cpu") if d.cpu_offload else self.device
            materialize(model, host, init_device=self.device)
        seed_rank(self.config.seed, self._dropout_stream())
        self.model = model
        self.optimizer = rebuild_optimizer(optimizer, model)
        scaler = sharded_grad_scaler(self.device) if t.precision == "fp16" else None
        self.precision = ShardedPrecision(t.precision, self.device.type, scaler)
        whole = t.compile and t.compile_scope == "model"
        forward: Callable[..., Any] = torch.compile(model) if whole else model
        if self.tp_group is not None:
            forward = gather_group_batch(forward, self.tp_group)
        forward = with_attention_backend(forward, t.attention_backend)
        return Wrapped(forward=forward, optimizer=self.optimizer, precision=self.precision)

    def _dropout_stream(self) -> int:
        """Which random stream this rank draws dropout masks from.

        Tensor parallelism alone replicates the activations between its layers over the
        group, so the group's ranks must draw the same masks there (one stream per data
        slice). Under sequence parallelism every dropout acts on this rank's own positions
        (or, in attention, its own heads): a shared stream would repeat one mask on every
        rank's part, so each rank draws its own.
        """
        return self.rank if self.config.distributed.sequence_parallel else self.data.rank

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduce-scattered after every micro-batch (sharded accumulation: the
        memory FSDP exists to save), so there is nothing to switch off."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        assert self.precision is not None, "wrap() first"
        self.precision.scale(loss).backward()

    def step(self) -> StepResult:
        assert self.precision is not None and self.optimizer is not None, "wrap() first"
        result = self.precision.unscale_clip_step(
            self.optimizer, self.config.training.grad_clip, clip=clip_grad_norm
        )
        self.optimizer.zero_grad(set_to_none=True)
        return result

    # ----------------------------------------------------------------------- checkpoints
    def checkpoint_store(self, directory: Path, keep: int) -> DCPStore:
        self.store = DCPStore(
            directory, keep, self.comm, async_save=self.config.training.async_checkpoint
        )
        return self.store

    def _states(self, loop_state: dict[str, Any] | None) -> dict[str, Any]:
        assert self.model is not None and self.optimizer is not None and self.precision
        states = checkpoint_states(
            {
                "model": ModelState(self.model),
                "optimizer": OptimizerState(self.model, self.optimizer),
            }
        )
        states["scaler"] = self.precision
        if loop_state is not None:
            states[LOOP_STATE] = loop_state
        return states

    def save(self, loop_state: dict[str, Any], step: int) -> Path:
        """Every rank writes its shards (in the background when training.async_checkpoint)."""
        assert self.store is not None, "checkpoint_store() first"
        return self.store.save_states(self._states(self.with_rank_rng(loop_state)), step)

    def prepare_checkpoint_buffers(self, loop_state: dict[str, Any]) -> None:
        """DCP's stager allocates its (pinned) buffers at the first save."""

    def flush_checkpoints(self, collective: bool = True) -> None:
        if self.store is None:
            return
        if collective:
            self.store.flush()
        else:
            self.store.wait()

    def load(self, which: str | Path, check: CompatibilityCheck) -> tuple[dict[str, Any], Path]:
        """Rank 0 resolves and verifies `which`; every rank checks it fits, then loads its own
        shards of it, resharded from whatever layout saved it."""
        self.flush_checkpoints()
        store = self.store
        assert store is not None, "checkpoint_store() first"
        if Path(which).suffix == ".pt":  # a single-device (or DDP) run's one-file checkpoint
            return self._load_single_file(Path(which), check)
        newer_file = self.main_only(lambda: newer_single_file(which, store.directory))
        newer_file = self.comm.broadcast_object(newer_file)
        if newer_file is not None:
            return self._load_single_file(newer_file, check)
        path = self.main_only(lambda: store.resolve(which))  # verified (checksums)
        loop = store.loop_state(path) if self.is_main else None
        loop = self.comm.broadcast_object(loop)
        check(loop, path)
        try:
            restored = store.restore_states(self._states(None), path)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{path}: cannot restore it: {exc}") from exc
        return restored, path

    def _load_single_file(self, path: Path, check: CompatibilityCheck) -> tuple[dict, Path]:
        """Resume from a `single`/`ddp` checkpoint file: every rank reads the whole (verified,
        weights-only) file and keeps its own shards of the model and optimizer state."""
        assert self.model is not None and self.optimizer is not None and self.precision
        state = load_verified(path)
        check(state, path)
        missing = [key for key in ("model", "optimizer", "scaler") if key not in state]
        if missing:
            raise CheckpointError(f"{path}: not a full training checkpoint (no {missing})")
        full = StateDictOptions(full_state_dict=True, strict=True)
        try:
            set_model_state_dict(self.model, state["model"], options=full)
            optimizer = keyed_by_name(state["optimizer"], self.model)
            set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=full)
            self.precision.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{path}: cannot restore it: {first[:300]}") from exc
        return state, path

    def export_model(self, model: GPT) -> GPT | None:
        """The whole fp32 model on rank 0 (every rank takes part in gathering the shards)."""
        assert self.model is not None
        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.is_main:
            return None
        with torch.device("meta"):
            plain = GPT(self.model.config, self.model.vocab_size)
        plain.to_empty(device="cpu")
        plain.load_state_dict(full)
        plain.tie_weights()
        return plain

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def newer_single_file(which: str | Path, own: Path) -> Path | None:
    """The one-file checkpoint to resume instead of a DCP folder, when `which` (`latest`: the
    run's own `own` directory; or a run/checkpoints directory) holds a `step_*.pt` newer than
    every DCP folder there: a run that went on under one device after fsdp. None otherwise."""
    text = str(which)
    if text.isdigit():
        return None
    candidates = [own] if text == "latest" else [Path(which), Path(which) / "checkpoints"]
    for directory in candidates:
        if is_dcp_folder(directory):
            return None
        folder_step, file_step = newest_steps(directory)
        if file_step is not None and (folder_step is None or file_step > folder_step):
            return resolve_latest(directory)
        if folder_step is not None:
            return None
    return None


def rebuild_optimizer(optimizer: torch.optim.Optimizer, model: GPT) -> torch.optim.Optimizer:
    """The same optimizer class and settings over the model's (now sharded) parameters.

    `fully_shard` replaces each Parameter by a DTensor one, so the optimizer built before it
    points at tensors no longer trained; it has taken no step yet, so nothing is lost. Groups
    are the model's own (decay on matrices), with the first group's weight decay.
    """
    if optimizer.state:
        raise RuntimeError("rebuild_optimizer: the optimizer already holds state")
    accepted = inspect.signature(type(optimizer).__init__).parameters
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}
    settings.pop("weight_decay", None)
    groups = model.param_groups(optimizer.param_groups[0]["weight_decay"])
    return type(optimizer)(groups, **settings)


def keyed_by_name(state: dict[str, Any], model: GPT) -> dict[str, Any]:
    """A plain optimizer state dict (parameters by position) keyed by parameter name instead.

    Positions follow `GPT.param_groups` (matrices, then vectors, each in `named_parameters`
    order), which built the optimizer that saved it; names are what
    `set_optimizer_state_dict` matches in any layout.
    """
    named = list(model.named_parameters())
    order = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
    groups = state["param_groups"]
    if sum(len(g["params"]) for g in groups) != len(order):
        raise ValueError(
            f"the optimizer state covers {sum(len(g['params']) for g in groups)} parameters, "
            f"the model has {len(order)}"
        )
    return {
        "state": {order[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in groups],
    }


def gather_group_batch(forward: Callable[..., Any], group: dist.ProcessGroup) -> Callable[..., Any]:
    """`forward(idx, targets)` on the concatenated batches of the tensor-parallel group.

    Ranks of a group are adjacent, so the concatenation (in rank order) is the group's
    contiguous slice of the global batch; every rank of the group computes on all of it.
    """
    size = dist.get_world_size(group)

    def gathered(idx: torch.Tensor, targets: torch.Tensor | None = None, **kwargs: Any) -> Any:
        parts = [_all_gather(idx, group, size)]
        if targets is not None:
            parts.append(_all_gather(targets, group, size))
        return forward(*parts, **kwargs)

    return gathered


def _all_gather(tensor: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return torch.cat(out, dim=0)
