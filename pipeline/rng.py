"""Capture and restore every random number generator a training step draws from.

An exact resume needs Python's `random`, NumPy's global generator, torch's CPU generator and
each CUDA device's generator back where they were. The captured state holds only tensors and
primitives so it can live in a checkpoint that loads with `torch.load(weights_only=True)`:
`random.getstate()` is a tuple of 625 ints (kept as an int64 tensor) and NumPy's state holds a
uint32 ndarray (kept as an int64 tensor, since torch's uint32 support is partial).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from pipeline.errors import CheckpointError

logger = logging.getLogger(__name__)

_KEYS = ("python", "numpy", "torch", "cuda")


def capture_rng_state() -> dict[str, Any]:
    """The state of Python, NumPy, torch CPU and all CUDA generators, as tensors/primitives."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back to a state from `capture_rng_state` (e.g. out of a checkpoint).

    CUDA states are restored for the devices both sides have; a different device count (or no
    CUDA now) is logged as a warning, since draws on the missing devices cannot be exact.
    """
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise CheckpointError(f"the checkpoint's RNG state lacks {', '.join(missing)}; "
                              f"expected keys {', '.join(_KEYS)}")
    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()),
                     python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["bit_generator"], numpy["keys"].numpy().astype(np.uint32),
                         numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    _restore_cuda(list(state["cuda"]))


def _restore_cuda(states: list[torch.Tensor]) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(states) != available:
        logger.warning("the checkpoint has CUDA RNG states for %d device(s) but %d are visible; "
                       "restoring %d, so GPU random draws will not match the original run",
                       len(states), available, min(len(states), available))
    for device, device_state in enumerate(states[:available]):
        torch.cuda.set_rng_state(device_state.cpu(), device)
