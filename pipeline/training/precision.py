"""Numeric precision as a wrapper around the plain model: autocast and loss scaling.

fp32 runs as is; bf16 autocasts matmuls to bfloat16 (no scaling needed: bf16 has fp32's range);
fp16 autocasts to float16 and scales the loss dynamically so small gradients do not underflow.
Overflowing steps are skipped by the scaler and counted by the loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MixedPrecision:
    """Autocast context and (for fp16) the dynamic loss scaler of one run."""

    name: str
    device_type: str
    scaler: torch.amp.GradScaler | None

    @classmethod
    def create(cls, name: str, device: torch.device) -> MixedPrecision:
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name=name, device_type=device.type, scaler=scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES[self.name]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
