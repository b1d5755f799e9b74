"""Read DeepSpeed checkpoint files without running code that a file could carry.

DeepSpeed's own loader (`TorchCheckpointEngine.load`) calls `torch.load(weights_only=False)`,
so a crafted `*_optim_states.pt` runs its pickled payload on resume. The checksum file beside
the data is no defence: whoever can write the file can rewrite its line. So every file is read
the way `torch.load(weights_only=True)` reads it, with the few DeepSpeed classes its optimizer
states really hold (a loss scaler, a ZeRO stage enum, fragment addresses) allowed by name:

- `SafeCheckpointEngine` replaces the engine's checkpoint engine, so every file DeepSpeed
  itself loads, on every rank, goes through `safe_load`.
- `scan_files` reads every file of a checkpoint folder that way on rank 0 before any rank
  restores it, so a bad shard of another rank is refused with one message on every rank
  instead of one rank failing inside a collective.

Anything else the unpickler meets (a function, another class) is a `CheckpointError` naming
the file and the refused global.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CheckpointError

_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL (\S+)")


def allowed_globals() -> list[type]:
    """The DeepSpeed classes its ZeRO optimizer states pickle (found with
    `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO-1/2 fp32/bf16 checkpoints).

    Each is plain data: the weights-only unpickler only sets its attributes, it runs nothing.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _refusal(path: str | Path, exc: Exception) -> CheckpointError:
    text = str(exc)
    match = _GLOBAL_RE.search(text)
    what = f"it holds {match.group(1)}" if match else text.strip().splitlines()[-1][:200]
    return CheckpointError(
        f"refusing DeepSpeed checkpoint file {path}: {what}, which loading would run or build "
        "(only tensors, plain values and DeepSpeed's own state are loaded); it was not written "
        "by this trainer"
    )


def safe_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with DeepSpeed's state classes allowed."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            raise _refusal(path, exc) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [repr(exc)])[0]
            raise CheckpointError(f"cannot read DeepSpeed checkpoint file {path}: {first}") from exc


def scan_files(paths: Iterable[Path]) -> None:
    """Read every file with `safe_load` (memory-mapped where the format allows: the weights'
    bytes are not read, only the pickled structure that could carry code)."""
    for path in paths:
        safe_load(path, "cpu", mmap=zipfile.is_zipfile(path))


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with `load` replaced by `safe_load`; the rest delegated."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def install(engine: Any) -> None:
    """Make every checkpoint file `engine` loads go through `safe_load`."""
    if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
