"""The one interface every parallelism implements, and the registry that picks one by name.

A strategy wraps the plain model from outside and does the parts of a step that differ between
layouts; the trainer owns everything else (data, micro-batch loop, learning rate, counters,
non-finite policy, logging) and never looks inside a strategy. No strategy receives or imports
the trainer: it is built from a `Collective` and the resolved `Config`, gets the model,
optimizer and precision once in `wrap`, and answers with values (`Wrapped`, `StepResult`,
checkpoint states).

The protocol (`Strategy`), in the order the trainer calls it:

    wrap(model, optimizer, precision) -> Wrapped
        Once, before training: shard/replicate/compile the model and return what the loop uses:
        `forward(inputs, targets) -> (logits, loss)`, the optimizer whose `param_groups` the loop
        sets the learning rate in, and the precision whose `autocast()` wraps the forward and
        whose `loss_scale()` is logged. A strategy may return a precision of its own (DeepSpeed:
        the engine's; FSDP2 in fp16: a `MixedPrecision` over a sharded grad scaler).
    micro_step(last) -> context manager
        Around one micro-batch's forward and backward; gradients sync only when `last`.
    backward(loss)
        Loss (already divided by the accumulation steps) -> gradients, scaled where the
        strategy's precision scales.
    step() -> StepResult(grad_norm, applied, overflow)
        Once per global batch: unscale, clip at `training.grad_clip`, update unless the norm is
        not finite, zero the gradients. It decides nothing about policy: a non-finite norm is
        reported (`applied=False, overflow=False`) and the trainer skips, rolls back or aborts;
        an fp16 overflow the loss scaler absorbed is reported as `overflow=True`. The grad norm is
        the global one (after the all-reduce / over all shards), so every rank decides alike.
    reduce_mean(tensor), any_rank(flag), main_only(fn), run_lock(directory)
        The collectives the loop needs (see `pipeline.distributed.comm`).
    checkpoint_store(directory, keep) -> store
        The store the run's checkpoints live in. The trainer only lists it
        (`list_checkpoints()`, `path_for(step)`, `directory`) to resolve `auto` and rollbacks.
    save(loop_state, step) -> Path
        `loop_state` is the trainer's named states that are not the model's (sampler, progress,
        RNG, config, data, tracking: `Trainer.loop_state_dict()`); the strategy adds its own
        (model, optimizer, scaler, every rank's RNG as `rng_ranks`) in whatever form its layout
        needs (full tensors in one file; ZeRO partitions; DTensor shards through DCP) and writes
        them through its store. It may return before the bytes are on disk (async).
    load(which, check) -> (loop_state, path)
        Resolve `which` (`latest`, a step path), call `check(state, path)` (the trainer's
        compatibility check: model shape, tokenizer) before restoring anything, restore model,
        optimizer and scaler in place, and return the checkpoint's loop state and where it came
        from. The trainer restores the loop state (and this rank's RNG from `rng_ranks`) itself.
    prepare_checkpoint_buffers(loop_state)
        After the first step: allocate what an async save needs, so the first save stalls less.
    flush_checkpoints(collective=True)
        Return once every save is on disk (a background write's error is raised here).
    export_model(model) -> GPT | None
        The full fp32 model on rank 0 (None elsewhere); collective where state is sharded.
    close()
        Release engines and hooks before the process group goes away.

Every strategy also has `name` (its registry name: the MLflow tag `distributed.strategy`),
`rank`, `world_size` and `is_main`. Constructors take `(comm, *, config)`.

How a sharded strategy fits (FSDP2 / tensor parallel): `wrap` applies `fully_shard` /
`parallelize_module` to `model` in place and returns it as `forward`, with the optimizer built
over the sharded parameters and `MixedPrecision(..., scaler=ShardedGradScaler(...))` for fp16;
`step` is `precision.unscale_clip_step(optimizer, max_norm, clip=...)` (the default clip works
on DTensor gradients and returns the global norm); `save`/`load` go through a DCP store with
`get_state_dict`/`set_state_dict`. The trainer does not change.

Strategies are chosen by name from `STRATEGIES` ("module:class" strings, imported on use:
DeepSpeed takes seconds to import), never by a chain of ifs in the loop.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import torch

from pipeline.config.schema import Config
from pipeline.distributed.tensor_parallel import check_sequence_parallel
from pipeline.errors import ConfigError
from pipeline.training.precision import StepResult

if TYPE_CHECKING:  # types only: the model module imports nothing from here
    from pipeline.distributed.comm import Collective
    from pipeline.model import GPT

T = TypeVar("T")

__all__ = [
    "STRATEGIES",
    "CheckpointListing",
    "CompatibilityCheck",
    "Precision",
    "StepResult",
    "Strategy",
    "Wrapped",
    "build_strategy",
    "choose_strategy",
]


class Precision(Protocol):
    """What the loop asks of a precision (`pipeline.training.precision.MixedPrecision`)."""

    name: str

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def loss_scale(self) -> float: ...


@dataclass
class Wrapped:
    """What `Strategy.wrap` hands back: the parts the training loop calls every step."""

    forward: Callable[..., Any]
    """`forward(inputs, targets) -> (logits, loss)`: the wrapped (DDP, engine, sharded,
    compiled) model."""
    optimizer: Any
    """Has `param_groups` (where the loop sets the learning rate) and `zero_grad`."""
    precision: Precision


class CheckpointListing(Protocol):
    """The part of a strategy's checkpoint store that the trainer reads."""

    directory: Path

    def list_checkpoints(self) -> list[tuple[int, Path]]: ...

    def path_for(self, step: int) -> Path: ...


CompatibilityCheck = Callable[[dict[str, Any], Path], None]
"""`check(state, source)`: raises CheckpointError when a checkpoint does not fit this run."""


@runtime_checkable
class Strategy(Protocol):
    """One parallelism layout. See the module docstring for what each method promises."""

    name: str

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def is_main(self) -> bool: ...

    def main_only(self, fn: Callable[[], T]) -> T: ...

    def any_rank(self, flag: bool) -> bool: ...

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor: ...

    def run_lock(self, directory: Path) -> contextlib.AbstractContextManager: ...

    def wrap(self, model: GPT, optimizer: torch.optim.Optimizer, precision: Any) -> Wrapped: ...

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> StepResult: ...

    def checkpoint_store(self, directory: Path, keep: int) -> Any: ...

    def save(self, loop_state: dict[str, Any], step: int) -> Path: ...

    def load(self, which: str | Path, check: CompatibilityCheck) -> tuple[dict[str, Any], Path]: ...

    def prepare_checkpoint_buffers(self, loop_state: dict[str, Any]) -> None: ...

    def flush_checkpoints(self, collective: bool = True) -> None: ...

    def export_model(self, model: GPT) -> GPT | None: ...

    def close(self) -> None: ...


STRATEGIES: dict[str, str] = {
    "single": "pipeline.distributed.data_parallel:SingleDevice",
    "ddp": "pipeline.distributed.data_parallel:DataParallel",
    "deepspeed": "pipeline.distributed.deepspeed_engine:DeepSpeedStrategy",
    "fsdp": "pipeline.distributed.fsdp_strategy:FSDPStrategy",
}
"""Strategy name -> "module:class", imported on use (DeepSpeed takes seconds to import)."""


def choose_strategy(config: Config, world_size: int) -> str:
    """Resolve `distributed.strategy` (auto picks by DeepSpeed config and world size)."""
    d = config.distributed
    name = d.strategy
    if name == "auto":
        name = "deepspeed" if d.deepspeed_config else "ddp" if world_size > 1 else "single"
    if name not in STRATEGIES:
        raise ConfigError(
            f"distributed.strategy {name} is not implemented; use one of {sorted(STRATEGIES)}"
        )
    if name == "deepspeed" and not d.deepspeed_config:
        raise ConfigError(
            "distributed.strategy deepspeed needs a DeepSpeed JSON: --deepspeed_config PATH"
        )
    if name != "deepspeed" and d.deepspeed_config:
        raise ConfigError(
            f"--deepspeed_config {d.deepspeed_config} contradicts distributed.strategy {name}"
        )
    if name == "single" and world_size > 1:
        raise ConfigError(
            f"distributed.strategy single cannot train on {world_size} processes; use ddp"
        )
    if name != "fsdp" and (d.tensor_parallel > 1 or d.cpu_offload):
        option = "tensor_parallel" if d.tensor_parallel > 1 else "cpu_offload"
        raise ConfigError(f"distributed.{option} needs distributed.strategy fsdp, not {name}")
    if d.tensor_parallel > 1:
        check_tensor_parallel_run(config)
    return name


def check_tensor_parallel_run(config: Config) -> None:
    """What a tensor-parallel run needs beyond the mesh, checked before any worker starts.

    Dropout: tensor parallelism alone gives the ranks of a group one random stream (the
    activations between its layers are replicated, so their dropout masks must agree), and the
    attention dropout would then repeat one mask on every rank's heads; sequence parallelism
    gives every dropout rank-local data and each rank its own stream. A check of the launch,
    not of the config, so that models trained before it still load for evaluation and export.
    """
    d = config.distributed
    if config.model.dropout > 0 and not d.sequence_parallel:
        raise ConfigError(
            f"model.dropout {config.model.dropout} with distributed.tensor_parallel "
            f"{d.tensor_parallel} needs distributed.sequence_parallel: true (tensor parallelism "
            "alone would repeat one attention-dropout mask on every rank's heads), or dropout 0"
        )
    if d.sequence_parallel:
        check_sequence_parallel(config.seq_len, d.tensor_parallel)


def build_strategy(name: str, comm: Collective, config: Config) -> Strategy:
    """Instantiate a strategy by its registry name."""
    module_name, attribute = STRATEGIES[name].split(":")
    cls = getattr(importlib.import_module(module_name), attribute)
    return cls(comm, config=config)
