"""The device mesh of a sharded run: data parallel x tensor parallel, and what each rank trains on.

Ranks are laid out with the tensor-parallel axis innermost (ranks 0..tp-1 form the first
tensor-parallel group), as torchtitan and Megatron do: on GPUs the tensor-parallel group, which
communicates in every layer, then sits within one node.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pipeline.errors import ConfigError


def build_mesh(device_type: str, world_size: int, tensor_parallel: int = 1) -> DeviceMesh:
    """A 2-D mesh named ("dp", "tp") over the default process group's `world_size` ranks."""
    if tensor_parallel < 1 or world_size % tensor_parallel:
        raise ConfigError(
            f"distributed.tensor_parallel {tensor_parallel} does not divide the "
            f"{world_size} rank(s) of this job"
        )
    shape = (world_size // tensor_parallel, tensor_parallel)
    return init_device_mesh(device_type, shape, mesh_dim_names=("dp", "tp"))


@dataclass(frozen=True)
class DataSlice:
    """Which part of the global batch a rank trains on: ranks of one tensor-parallel group
    share a slice (they split the model, not the data)."""

    rank: int
    world_size: int


def data_slice(mesh: DeviceMesh) -> DataSlice:
    """This rank's data-parallel coordinate and the number of data-parallel slices."""
    dp = mesh["dp"]
    return DataSlice(rank=dp.get_local_rank(), world_size=dp.size())
