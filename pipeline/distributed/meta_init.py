"""Build the GPT sharded, never whole: on the meta device, then fill only each rank's shards.

Today's model is built whole on its device (`GPT(config)` under `torch.device(device)`), then
wrapped; a 175B model (650 GiB in fp32) can therefore start nowhere. Here the model is built on
the meta device (no memory, no random draws), FSDP2 / tensor parallelism shard it there, and
`materialize` allocates the local shards and writes the same values that today's build gives.

How the values are made the same. `GPT.__init__` draws random numbers twice per parameter:
first each module's PyTorch default (`reset_parameters`: Kaiming-uniform for `Linear`, normal
for `Embedding`) in construction order, then GPT-2's init (`GPT.init_module`) in `named_modules`
order. Both orders are replayed here on the same generator (the device's default one, seeded by
the caller exactly as before building today's model), one module at a time: each module's full
parameters are allocated, drawn, this rank's slice copied into its shard, then freed. So:

- on one rank the weights are bitwise those of `GPT(config)` for the same seed (tested);
- on many ranks every rank draws the same full tensors, so the weights are the same whatever the
  layout (FSDP over 4 ranks, TP 2 x FSDP 2, one device), deterministic for a seed;
- peak memory is the shards plus the largest single parameter (the embedding), not the model.

The price is time: each rank draws every parameter twice (the first draw only advances the
generator). A seeded generator per parameter would draw only once but could not give today's
bits, which existing runs' reproducibility depends on; drawing is cheap next to training (on a
GPU, seconds for 175B).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from pipeline.config.schema import ModelConfig
from pipeline.model import GPT


def build_on_meta(config: ModelConfig, vocab_size: int) -> GPT:
    """The GPT with every parameter on the meta device: no memory, no random number drawn."""
    with torch.device("meta"):
        return GPT(config, vocab_size)


@torch.no_grad()
def materialize(model: GPT, device: torch.device, init_device: torch.device | None = None) -> None:
    """Allocate `model`'s (possibly sharded) parameters on `device` and initialise them as today.

    `model` was built with `build_on_meta` and may since have been sharded (DTensor parameters
    from `fully_shard` / `parallelize_module`); parameter names are unchanged by both. The
    default generator of `device` must be in the state `GPT(config)` would have started from
    (the caller seeds it as today's build does). Every rank must call this, in any layout.
    `init_device` (default `device`) is where the values are drawn, for shards kept elsewhere
    (FSDP's CPU offload keeps them on the host, today's build draws on the GPU).
    """
    init_device = init_device or device
    model.to_empty(device=device)
    targets = dict(model.named_parameters())  # tied head dedup'd: lm_head.weight is wte.weight
    for name, module, tied_head in replay_init(model.config, model.vocab_size, init_device):
        for local_name, full in module.named_parameters(recurse=False):
            target = targets.pop(qualified(name, local_name), None)
            if target is not None and not tied_head:
                _copy_shard(target, full)
    if targets:
        raise RuntimeError(f"materialize: parameters left uninitialised: {sorted(targets)}")
    if not isinstance(model.wte.weight, DTensor):  # unsharded: to_empty broke the tie
        model.tie_weights()


@torch.no_grad()
def replay_init(
    config: ModelConfig, vocab_size: int, device: torch.device
) -> Iterator[tuple[str, nn.Module, bool]]:
    """Today's initial values of `GPT(config, vocab_size)`, one module at a time.

    Draws from `device`'s default generator exactly what today's build draws, in its order:
    first PyTorch's defaults of every module in construction order (drawn, then dropped), then
    GPT-2's init in `named_modules` order. Yields `(name, module, tied_head)` with the module's
    full parameters allocated on `device` and holding their values; once the consumer has
    copied them, they go back to the meta device, so one module is whole at a time.
    `tied_head`: the output head, whose weight is the embedding's (written as that).
    """
    reference = build_on_meta(config, vocab_size)
    modules = [
        (name, module)
        for name, module in reference.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    ]
    for _, module in modules:  # 1. the constructor's defaults: drawn, then dropped
        module.to_empty(device=device, recurse=False)
        module.reset_parameters()
        module.to_empty(device="meta", recurse=False)
    for name, module in modules:  # 2. GPT-2's init, handed out module by module
        module.to_empty(device=device, recurse=False)
        reference.init_module(name, module)
        yield name, module, module is reference.lm_head
        module.to_empty(device="meta", recurse=False)


def qualified(module_name: str, local_name: str) -> str:
    """The model-level name of a module's parameter (the root module's name is empty)."""
    return f"{module_name}.{local_name}" if module_name else local_name


def _copy_shard(target: nn.Parameter, full: torch.Tensor) -> None:
    """Write `full`'s part that this rank holds into `target` (a plain tensor or a DTensor).

    Every rank holds the same `full`, so the slice is cut locally (`src_data_rank=None`): no
    communication, and the placements' own chunking (FSDP2's, tensor parallelism's) decides it.
    """
    if isinstance(target, DTensor):
        local = distribute_tensor(
            full, target.device_mesh, target.placements, src_data_rank=None
        ).to_local()
        target.to_local().copy_(local)  # across devices too (shards offloaded to the host)
    else:
        target.copy_(full)
