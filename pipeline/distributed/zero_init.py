"""Build the GPT for DeepSpeed ZeRO-3 under `deepspeed.zero.Init`: no rank ever holds it whole.

Today's build (`GPT(config)` on the device, then `deepspeed.initialize`) puts the whole fp32
model on every rank before ZeRO-3 partitions it; a 175B model (650 GiB) cannot start anywhere.
Under `deepspeed.zero.Init` each submodule's parameters are partitioned across the data-parallel
ranks as soon as its constructor returns, so a rank holds its partitions plus, briefly, the one
module being built. The model stays plain PyTorch: the context wraps the constructor from here.

Why the values need a second pass. `GPT.__init__` ends with GPT-2's init (`init_weights`), which
runs after the submodules were partitioned: on the empty local tensors it draws nothing and
writes nothing, leaving PyTorch's defaults. And under bf16 `zero.Init` creates the parameters in
bf16, whose draws need not consume the generator as fp32's do. So, as `meta_init` does for FSDP,
the generator is put back where the caller seeded it and today's two passes are replayed in fp32
on scratch tensors, module by module (PyTorch's defaults in construction order, only to advance
the generator; then `GPT.init_module` in `named_modules` order), each module's result written
into its partitioned parameters through `deepspeed.zero.GatheredParameters`. Hence:

- on one rank the weights are bitwise those of `GPT(config)` for the same seed in fp32 (in bf16,
  those weights rounded, as DeepSpeed's cast of today's build rounds them), and the generator is
  left where today's build leaves it (tested);
- on many ranks every rank draws the same full tensors and rank 0's are kept
  (`modifier_rank=0`), so the weights are deterministic for a seed whatever the world size;
- peak memory is the partitions plus the largest layer twice in fp32 (the drawn copy and the
  gathered one), as `gpt3 plan` plans it.

The tied head survives: `GPT.tie_weights` runs inside the constructor and assigns the embedding's
already-partitioned Parameter to `lm_head`, one Parameter (one `ds_id`) in two modules, which
ZeRO-3 gathers for whichever module runs; `build_partitioned` checks that the tie holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config.schema import Config
from pipeline.distributed.deepspeed_config import read_deepspeed_json, resolve_deepspeed_config
from pipeline.distributed.meta_init import qualified, replay_init
from pipeline.errors import ConfigError
from pipeline.model import GPT


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage a (read or resolved) DeepSpeed JSON asks for; 0 when it has no section."""
    section = ds_config.get("zero_optimization") or {}
    return section.get("stage", 0) if isinstance(section, dict) else 0


def builds_partitioned(config: Config) -> bool:
    """Whether the run trains with DeepSpeed ZeRO-3, so the model must be built partitioned.

    A DeepSpeed JSON is only allowed with the deepspeed strategy (`choose_strategy`), so its
    presence and its stage decide; an unreadable file is the JSON reader's ConfigError.
    """
    d = config.distributed
    if d.deepspeed_config is None or d.strategy not in ("auto", "deepspeed"):
        return False
    return zero_stage(read_deepspeed_json(d.deepspeed_config)) == 3


def build_partitioned(config: Config, vocab_size: int, device: torch.device) -> GPT:
    """`GPT(config.model, vocab_size)` built under `deepspeed.zero.Init`, today's weights.

    Every rank of the job's process group calls this, with the device's generator seeded as
    for today's build (`seed_everything`). The JSON is resolved exactly as the DeepSpeed strategy
    resolves it in `wrap`, so the partitioning (stage 3 settings, parameter offload, dtype)
    agrees with the engine's.
    """
    ds_config = _resolved(config, device)  # a missing process group fails before the import
    import deepspeed

    # DeepSpeed's own communication layer over the job's group, before zero.Init reads the JSON:
    # it sizes the batch checks by that layer's world size (1 until it knows the group).
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    generators = _generator_states(device)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = GPT(config.model, vocab_size)
    _set_generator_states(device, generators)
    if model.lm_head.weight is not model.wte.weight:
        raise RuntimeError("zero.Init build: lm_head.weight is no longer tied to wte.weight")
    initialize(model, device)
    return model


def _resolved(config: Config, device: torch.device) -> dict[str, Any]:
    """The resolved JSON for this job; a ConfigError when no process group is there to join."""
    import torch.distributed as dist

    path = config.distributed.deepspeed_config
    assert path is not None, "builds_partitioned guarantees a DeepSpeed config"
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(
            f"--deepspeed_config {path}: ZeRO stage 3 builds the model partitioned across the "
            "job's ranks (deepspeed.zero.Init), which needs their process group: run it "
            "through stages/train.py or `gpt3 train` (they set the group up, also for one "
            "process), or initialise torch.distributed before calling train()"
        )
    return resolve_deepspeed_config(
        read_deepspeed_json(path), config, dist.get_world_size(), str(path), device.type == "cuda"
    )


def _generator_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_generator_states(device: torch.device, states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


@torch.no_grad()
def initialize(model: GPT, device: torch.device) -> None:
    """Write today's initial values into `model`'s ZeRO-3 partitions (a collective).

    Replays both of today's draws on the device's default generator, one module at a time on a
    meta-device twin, and copies each full fp32 tensor into the gathered parameter; on leaving
    `GatheredParameters`, rank 0's values are partitioned back (every rank drew the same ones).
    """
    import deepspeed

    targets = dict(model.named_parameters())  # the tied head once: lm_head.weight is wte.weight
    for name, module, tied_head in replay_init(model.config, model.vocab_size, device):
        pairs = [
            (targets.pop(qualified(name, local)), full)
            for local, full in module.named_parameters(recurse=False)
            if not tied_head  # written as wte.weight
        ]
        if pairs:
            params = [target for target, _ in pairs]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                for target, full in pairs:
                    target.data.copy_(full)  # rounds to bf16 as DeepSpeed's cast does today
    if targets:
        raise RuntimeError(f"zero.Init build: parameters left uninitialised: {sorted(targets)}")


def full_shape(param: nn.Parameter) -> torch.Size:
    """A parameter's shape in the model: ZeRO-3 leaves an empty local tensor and keeps the
    real shape as `ds_shape`."""
    return getattr(param, "ds_shape", param.shape)


def decay_groups(model: GPT, weight_decay: float) -> list[dict[str, object]]:
    """`GPT.param_groups` for a partitioned model: the same rule (decay on tensors of two or
    more dimensions) read from the full shapes, which the empty local tensors no longer show."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if len(full_shape(p)) >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if len(full_shape(p)) < 2], "weight_decay": 0.0},
    ]
