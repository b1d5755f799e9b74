"""`--resume_from_checkpoint auto` never destroys a checkpoint (issue 18, item 2).

Real runs of the tiny model: a `latest` with a valid checksum that cannot be loaded falls back
to the newest loadable checkpoint and continues exactly; checkpoints that are all unusable, or
of other configs, are moved aside under unique dated names with their bytes intact.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
from conftest import tiny_overrides

from pipeline.checkpoint import checksum_path
from pipeline.config.loader import load_config
from pipeline.training.run import train


def _config(prepared: Path, run_dir: Path, extra: dict | None = None):
    return load_config(overrides=tiny_overrides(prepared, run_dir, extra))


def _replace_with_checksum(path: Path, data: bytes) -> None:
    """Swap new bytes and a matching checksum in (what a buggy writer or an attacker does)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a new inode: a hard-linked `latest` keeps the old bytes
    checksum_path(path).write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _log(run_dir: Path) -> str:
    return (run_dir / "logs" / "training.log").read_text()


def test_an_unloadable_latest_falls_back_to_the_newest_loadable_step(
    prepared_dir: Path, tmp_path: Path
) -> None:
    """Steps 4 and 6 saved; 6 (and `latest`) verify but hold no training state: resume at 4."""
    reference = train(_config(prepared_dir, tmp_path / "ref"), console=False)
    run_dir = tmp_path / "run"
    train(_config(prepared_dir, run_dir, {"training.max_steps": 6}), console=False)
    checkpoints = run_dir / "checkpoints"
    buffer = io.BytesIO()
    torch.save({"format": 1, "note": torch.zeros(3)}, buffer)  # loads weights-only, not ours
    for name in ("step_0000006.pt", "latest_checkpoint.pt"):
        _replace_with_checksum(checkpoints / name, buffer.getvalue())
    planted = _snapshot(checkpoints)

    result = train(_config(prepared_dir, run_dir), resume="auto", console=False)
    assert sorted(result.losses) == [5, 6, 7, 8], "did not resume from step 4"
    assert {s: result.losses[s] for s in (5, 6, 7, 8)} == {
        s: reference.losses[s] for s in (5, 6, 7, 8)
    }, "the resumed steps differ from an uninterrupted run"
    asides = list(run_dir.glob("checkpoints.unusable-*"))
    assert len(asides) == 1, asides
    moved = _snapshot(asides[0])
    for name in ("step_0000006.pt", "step_0000006.pt.sha256", "latest_checkpoint.pt"):
        assert moved[name] == planted[name], f"{name} not kept byte for byte"
    assert f"moved to {asides[0]}" in _log(run_dir)


def test_when_nothing_loads_the_whole_folder_is_kept_aside(
    prepared_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    train(_config(prepared_dir, run_dir, {"training.max_steps": 6}), console=False)
    checkpoints = run_dir / "checkpoints"
    for step_file in checkpoints.glob("step_*.pt"):
        data = bytearray(step_file.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: the checksum no longer matches
        step_file.with_name("x").write_bytes(bytes(data))
        os.replace(step_file.with_name("x"), step_file)
    (checkpoints / "latest_checkpoint.pt").unlink()
    (checkpoints / "latest_checkpoint.pt.sha256").unlink()
    damaged = _snapshot(checkpoints)

    result = train(_config(prepared_dir, run_dir), resume="auto", console=False)
    assert sorted(result.losses) == list(range(1, 9)), "there was nothing to resume"
    asides = list(run_dir.glob("checkpoints.unusable-*"))
    assert len(asides) == 1 and _snapshot(asides[0]) == damaged
    assert f"moved to {asides[0]}, starting afresh" in _log(run_dir)


def test_config_changes_in_a_row_keep_every_earlier_run(prepared_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    kept = []
    for lr in (1e-3, 2e-3, 3e-3):
        train(
            _config(prepared_dir, run_dir, {"training.max_steps": 2, "training.lr": lr}),
            resume="auto",
            console=False,
        )
        kept.append(_snapshot(run_dir / "checkpoints"))
    asides = sorted(run_dir.glob("checkpoints.previous-*"), key=lambda p: p.stat().st_mtime)
    assert len(asides) == 2, asides
    contents = [_snapshot(folder) for folder in asides]
    for first_two in kept[:2]:
        assert first_two in contents, "an earlier run's checkpoints were lost"
