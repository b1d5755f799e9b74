"""Numeric precision in one place: autocast, loss scaling, and the unscale-clip-step they imply.

fp32 runs as is; bf16 autocasts matmuls to bfloat16 (no scaling needed: bf16 has fp32's range);
fp16 autocasts to float16 and scales the loss dynamically so small gradients do not underflow.
Every strategy that steps a torch optimizer itself (single device, DDP, and sharded layouts that
bring their own grad scaler, e.g. FSDP2's `ShardedGradScaler`) steps through
`MixedPrecision.unscale_clip_step`, so clipping and overflow handling are written once.
DeepSpeed's engine does all of this itself (`deepspeed_engine.EnginePrecision`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

ClipFn = Callable[[Iterable[torch.Tensor], float], torch.Tensor]
"""`clip(params, max_norm) -> total norm` (torch.nn.utils.clip_grad_norm_'s signature)."""


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip in place and return the total norm of all gradients, before clipping.

    On DTensor gradients (FSDP2, tensor parallel) torch computes the global norm across the
    mesh and returns it as a DTensor; it is made a full tensor here so every rank reads it alike.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did; the trainer turns it into counters, warnings and policy.

    Defined here, beside the one place that steps a torch optimizer, and re-exported by
    `pipeline.distributed.strategy` (the `Strategy.step` protocol) so that this module stays a
    leaf that evaluation can import without the distributed layer.
    """

    grad_norm: float
    """The global gradient norm before clipping (nan when the engine does not report one)."""
    applied: bool
    """Whether the optimizer update was applied."""
    overflow: bool = False
    """fp16: the loss scaler found inf/nan, skipped the update and lowered its scale. That is
    the scaler's normal business, counted as a skipped step but not as a non-finite one."""


@dataclass
class MixedPrecision:
    """Autocast context and (for fp16) the dynamic loss scaler of one run."""

    name: str
    device_type: str
    scaler: Any
    """A `torch.amp.GradScaler` (or a subclass such as FSDP's ShardedGradScaler), or None."""

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

    def unscale_clip_step(
        self,
        optimizer: torch.optim.Optimizer,
        max_norm: float | None,
        clip: ClipFn = clip_grad_norm,
    ) -> StepResult:
        """Unscale (fp16), clip to `max_norm` (None: measure only), then update if that is safe.

        With a scaler, the scaler decides: a step with inf/nan gradients is skipped and the
        scale lowered (`overflow`). Without one, a non-finite norm means no update, and the
        caller's policy decides what happens next. Gradients are left for the caller to zero.
        """
        scaler = self.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = float(clip(params, max_norm if max_norm is not None else math.inf))
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            overflow = scaler.get_scale() < scale_before
            return StepResult(grad_norm, applied=not overflow, overflow=overflow)
        if not math.isfinite(grad_norm):
            return StepResult(grad_norm, applied=False)
        optimizer.step()
        return StepResult(grad_norm, applied=True)
