"""Which device a run uses: one small module, so that evaluation and export can resolve
`training.device` without importing how training builds its model (DeepSpeed, FSDP)."""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; asking for CUDA without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device: {name!r} requested but no CUDA device is available")
    return device
