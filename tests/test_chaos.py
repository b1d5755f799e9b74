"""The kill loop of `bench/chaos_loop/` (also `bench/chaos.py`): 20 SIGKILLs, 20 resumes.

Every kill is followed by `stages/train.py --resume_from_checkpoint latest` (afresh when no
checkpoint exists yet). Some kills are aimed inside checkpoint writes. The run that was killed
20 times must end with the same bits as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

from chaos_loop import run_chaos
from conftest import tiny_overrides


def test_twenty_kills_and_resumes_end_bitwise_identical(prepared_dir: Path, tmp_path: Path) -> None:
    report = run_chaos(tiny_overrides(prepared_dir, tmp_path / "unused"), tmp_path, kills=20)
    print(report.summary())
    assert len(report.kills) == 20
    assert report.resumes + report.fresh_starts == 21  # one start per kill, plus the last one
    assert report.fresh_starts >= 1 and report.resumes >= 15
    assert sum(k.kind == "checkpoint-write" for k in report.kills) == 5
    assert any(k.partial_write for k in report.kills), "no kill left a half-written checkpoint"
    assert report.final_step == report.steps
    assert report.weights_identical, report.summary()
    assert report.optimizer_identical, report.summary()
