"""The checkpoints folder and final state: what a kill left behind, what differs at the end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def has_checkpoint(checkpoint_dir: Path) -> bool:
    """Is there anything `latest` can resume from (a `latest` file or a step file)?"""
    from pipeline.checkpoint import LATEST_NAME, list_step_files

    return (checkpoint_dir / LATEST_NAME).exists() or bool(list_step_files(checkpoint_dir))


def leftovers(checkpoint_dir: Path) -> set[str]:
    """What an interrupted save leaves: temporary files, checksum files listing two digests,
    a step file newer than `latest`, a checksum file without its data."""
    from pipeline.checkpoint import (
        CHECKSUM_SUFFIX,
        latest_target,
        list_step_files,
        read_checksums,
    )
    from pipeline.checkpoint.files import TEMP_RE

    if not checkpoint_dir.is_dir():
        return set()
    found: set[str] = set()
    names = sorted(os.listdir(checkpoint_dir))
    for name in names:
        path = checkpoint_dir / name
        if TEMP_RE.match(name):
            found.add(f"temporary file {name}")
        elif name.endswith(CHECKSUM_SUFFIX):
            data = path.with_name(name.removesuffix(CHECKSUM_SUFFIX))
            if not data.exists():
                found.add(f"checksum file {name} without its data")
            elif len(read_checksums(data) or ()) > 1:
                found.add(f"two-digest {name}")
    steps = list_step_files(checkpoint_dir)
    target = latest_target(checkpoint_dir)
    if steps and (target is None or steps[-1][0] > target[0]):
        found.add(f"{steps[-1][1].name} ahead of latest")
    return found


def _final_state(run_dir: Path) -> dict[str, Any]:
    from pipeline.checkpoint import load_verified

    return load_verified(run_dir / "checkpoints" / "latest_checkpoint.pt")


def _differences(a: Any, b: Any, where: str) -> list[str]:
    """Names of the tensors (or values) that are not bitwise equal."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} (keys)"]
        return [d for key in a for d in _differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} (length)"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [where]
