"""Tokens/s and model FLOPs utilisation (MFU) against the device's peak.

FLOPs per token are 6N + 12 * n_layer * d_model * seq (N without the position embedding), as in
the PaLM appendix and the GPT-3 reference figures this project compares against.
"""

from __future__ import annotations

import torch

# Dense bf16/fp16 tensor-core peak, TFLOP/s, by a substring of the CUDA device name.
PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The peak to measure MFU against: the override, else the table entry, else None (no MFU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def mfu(
    tokens_per_second: float, flops_per_token: float, peak_tflops: float | None
) -> float | None:
    """Fraction of the peak the run achieves (0..1), or None when the peak is unknown."""
    if peak_tflops is None:
        return None
    return tokens_per_second * flops_per_token / (peak_tflops * 1e12)
