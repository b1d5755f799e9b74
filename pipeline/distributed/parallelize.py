"""Lay the plain GPT out on a ("dp", "tp") mesh: tensor parallelism, then FSDP2 on the data axis.

The one entry point the FSDP strategy (and the tests and bench) use, so that the order (TP
before FSDP, as FSDP2 requires) and the build-on-meta path are written once.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from pipeline.config.schema import ModelConfig
from pipeline.distributed.fsdp import apply_fsdp
from pipeline.distributed.meta_init import build_on_meta, materialize
from pipeline.distributed.tensor_parallel import apply_tensor_parallel
from pipeline.errors import ConfigError
from pipeline.model import GPT


def parallelize(
    model: GPT,
    mesh: DeviceMesh,
    precision: str = "fp32",
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    sequence_parallel: bool = False,
) -> GPT:
    """Tensor parallelism over `mesh["tp"]` (when larger than 1; `sequence_parallel` splits
    the activations between its layers by position too), then FSDP2 over `mesh["dp"]`."""
    if sequence_parallel and mesh["tp"].size() == 1:
        raise ConfigError("distributed.sequence_parallel needs distributed.tensor_parallel > 1")
    if mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel)
    return apply_fsdp(
        model,
        mesh["dp"],
        precision=precision,
        cpu_offload=cpu_offload,
        reshard_after_forward=reshard_after_forward,
    )


def build_sharded(
    config: ModelConfig,
    vocab_size: int,
    mesh: DeviceMesh,
    device: torch.device,
    precision: str = "fp32",
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    sequence_parallel: bool = False,
) -> GPT:
    """The GPT built on the meta device, laid out on `mesh`, then only this rank's shards
    allocated on `device` and initialised as `GPT(config)` would be (`meta_init`).

    The default generator of `device` must be seeded as for today's build (same seed on every
    rank); it is advanced as today's build advances it.
    """
    model = build_on_meta(config, vocab_size)
    parallelize(model, mesh, precision, cpu_offload, reshard_after_forward, sequence_parallel)
    # With CPU offload FSDP2 keeps the shards on the host and copies them in per unit.
    materialize(model, torch.device("cpu") if cpu_offload else device, init_device=device)
    return model
