"""Reliability: non-finite steps (skip, rollback, abort), bad input through the command line,
two runs on one output directory, and nothing listening beyond loopback by default.

Non-finite steps are injected into the real model between real steps: a NaN written into a
weight (so the loss is NaN), or a gradient hook that turns one parameter's gradient into inf/NaN
for one backward pass (so the loss stays finite but the gradient does not). Nothing in the
training step is mocked.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, set_args, tiny_overrides, train_cli

from pipeline.config.loader import load_config
from pipeline.errors import UserError
from pipeline.tracking.base import TrackerGroup
from pipeline.training.trainer import Trainer

TRAIN_SHARD, VAL_SHARD = "train-00000-000.bin", "val-00000-000.bin"
"""The small prepared corpus's one shard per split."""


def _config(prepared: Path, run_dir: Path, extra: dict | None = None):
    return load_config(overrides=tiny_overrides(prepared, run_dir, extra))


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.parts.model.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{key} differs"
        elif isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        else:
            assert a[key] == b[key], f"{key} differs"


def _poison_gradient(
    trainer: Trainer, value: float = math.nan, when: Callable[[], bool] = lambda: True
) -> dict[str, bool]:
    """Make the position embedding's gradient `value` in the first backward pass `when` allows.

    A test-only gradient hook on the real model. It fires once, so with gradient accumulation
    only the first micro-batch is poisoned, which is enough to make the summed gradient non-finite.
    """
    fired = {"fired": False}

    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        if fired["fired"] or not when():
            return None
        fired["fired"] = True
        return torch.full_like(grad, value)

    trainer.parts.model.wpe.weight.register_hook(hook)
    return fired


def test_skip_drops_the_update_counts_it_and_stops_past_the_limit(
    prepared_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = {"training.nonfinite_policy": "skip", "training.max_nonfinite_steps": 2}
    trainer = Trainer(_config(prepared_dir, tmp_path / "run", extra))
    trainer.train_step()
    trainer.train_step()
    weights = _snapshot(trainer)
    optimizer = copy.deepcopy(trainer.parts.optimizer.state_dict())  # AdamW updates in place
    cursor = trainer.parts.sampler.cursor
    _poison_gradient(trainer, math.inf)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        metrics = trainer.train_step()
    assert math.isfinite(metrics["train/loss"]) and not math.isfinite(metrics["train/grad_norm"])
    assert (trainer.progress.step, trainer.progress.nonfinite_steps) == (3, 1)
    assert trainer.progress.skipped_steps == 1
    assert trainer.parts.sampler.cursor == cursor + 8, "the bad batch is consumed, not retried"
    _assert_same(weights, trainer.parts.model.state_dict())
    _assert_same(optimizer["state"], trainer.parts.optimizer.state_dict()["state"])
    assert "step 3: non-finite gradient norm (inf)" in caplog.text
    assert "update skipped (1 non-finite step(s) so far, limit 2)" in caplog.text

    trainer.train_step()  # a good step updates again
    after = trainer.parts.model.state_dict()
    assert any(not torch.equal(weights[k], after[k]) for k in weights)
    assert all(torch.isfinite(v).all() for v in after.values())
    _poison_gradient(trainer)
    trainer.train_step()  # the second non-finite step is still within the limit
    _poison_gradient(trainer)
    with pytest.raises(UserError, match=r"3 non-finite steps exceed training\.max_nonfinite_steps"):
        trainer.train_step()


def test_abort_stops_with_a_clear_error_and_applies_nothing(
    prepared_dir: Path, tmp_path: Path
) -> None:
    trainer = Trainer(
        _config(prepared_dir, tmp_path / "run", {"training.nonfinite_policy": "abort"})
    )
    trainer.train_step()
    weights = _snapshot(trainer)
    _poison_gradient(trainer)
    with pytest.raises(UserError, match=r"^step 2: non-finite gradient norm \(nan\); .* abort"):
        trainer.train_step()
    _assert_same(weights, trainer.parts.model.state_dict())
    assert trainer.progress.nonfinite_steps == 1


def test_rollback_restores_the_checkpoint_and_moves_past_the_bad_batch(
    prepared_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Dropout makes the restored RNG state matter to the comparison below.
    config = _config(
        prepared_dir,
        tmp_path / "run",
        {"training.nonfinite_policy": "rollback", "model.dropout": 0.1},
    )
    trainer = Trainer(config)
    for _ in range(4):
        trainer.train_step()
    saved = trainer.save_checkpoint()
    trainer.train_step()  # step 5; step 6 goes wrong
    cursor = trainer.parts.sampler.cursor
    with torch.no_grad():
        trainer.parts.model.wpe.weight[0, 0] = math.nan  # the loss becomes NaN
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        metrics = trainer.train_step()
    assert math.isfinite(metrics["train/loss"]), "the retried step trains on good weights"
    assert trainer.progress.step == 5, "back at step 4, then step 5 again"
    assert trainer.progress.nonfinite_steps == 1
    assert trainer.parts.sampler.cursor == cursor + 8 + 8, "the bad batch is not replayed"
    assert re.search(r"step 6: non-finite gradient norm \(nan\); 1 non-finite step", caplog.text)
    assert f"rolled back to step 4 from {saved}" in caplog.text

    # Exactly what resuming step 4 by hand, with the data position past the bad batch, gives.
    expected = Trainer(config)
    expected.resume(saved)
    expected.parts.sampler.cursor = cursor + 8
    expected.train_step()
    _assert_same(expected.parts.model.state_dict(), trainer.parts.model.state_dict())
    _assert_same(expected.parts.optimizer.state_dict(), trainer.parts.optimizer.state_dict())

    trainer.nonfinite.limit = 1
    _poison_gradient(trainer)
    with pytest.raises(UserError, match=r"2 non-finite steps exceed training\.max_nonfinite_steps"):
        trainer.train_step()


def test_rollback_after_resuming_an_older_checkpoint_does_not_jump_ahead(
    prepared_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(prepared_dir, tmp_path / "run", {"training.nonfinite_policy": "rollback"})
    first = Trainer(config)
    for step in range(1, 9):
        first.train_step()
        if step % 4 == 0:
            first.save_checkpoint()
    trainer = Trainer(config)
    trainer.resume(trainer.checkpoints.path_for(4))  # latest still points at step 8
    trainer.train_step()
    _poison_gradient(trainer)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        trainer.train_step()
    assert "rolled back to step 4 from" in caplog.text
    assert trainer.progress.step == 5


def test_rollback_before_the_first_checkpoint_returns_to_the_start(
    prepared_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = {"training.nonfinite_policy": "rollback", "training.max_steps": 6}
    trainer = Trainer(_config(prepared_dir, tmp_path / "run", extra))
    poisoned = _poison_gradient(trainer, when=lambda: trainer.progress.step == 1)  # in step 2
    with caplog.at_level(logging.INFO, logger="pipeline"):
        result = trainer.fit(TrackerGroup([]))
    assert poisoned["fired"]
    assert result.progress.step == 6 and result.progress.nonfinite_steps == 1
    assert "saved the starting state (step 0)" in caplog.text
    assert "rolled back to step 0" in caplog.text
    assert all(math.isfinite(loss) for loss in result.losses.values())
    state = torch.load(result.final_checkpoint, weights_only=True)
    # Steps 1 and 2 of the first attempt consumed two batches that are never trained on again.
    assert state["sampler"]["cursor"] == (6 + 2) * 8
    assert state["progress"]["nonfinite_steps"] == 1


# ------------------------------------------------------------------------ the command line


def _prepared_copy(prepared: Path, folder: Path, damage: Callable[[Path], None]) -> Path:
    shutil.copytree(prepared, folder)
    damage(folder)
    return folder


def _truncate(path: Path, nbytes: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - nbytes)


def _retype(folder: Path) -> None:
    meta = folder / "meta.json"
    meta.write_text(meta.read_text().replace('"uint16"', '"uint32"'))


def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    prepared_dir: Path, tmp_path: Path
) -> None:
    stray = tmp_path / "stray.pt"
    stray.write_bytes(b"not a checkpoint")
    cases: dict[str, tuple[dict, list[str], str]] = {
        "no meta.json": (
            {
                "data.prepared_dir": _prepared_copy(
                    prepared_dir, tmp_path / "p_nometa", lambda p: (p / "meta.json").unlink()
                )
            },
            [],
            r"meta\.json: missing, so .* is not prepared data; run prepare again",
        ),
        "vocab larger than the model's": (
            {"model.vocab_size": 256},
            [],
            r"model\.vocab_size \(256\) differs from the prepared data's vocabulary \(512 in ",
        ),
        "truncated token file": (
            {
                "data.prepared_dir": _prepared_copy(
                    prepared_dir, tmp_path / "p_cut", lambda p: _truncate(p / TRAIN_SHARD, 1)
                )
            },
            [],
            r"train-00000-000\.bin: \d+ bytes is not a whole number of uint16 tokens \(truncated",
        ),
        "token file shorter than meta.json says": (
            {
                "data.prepared_dir": _prepared_copy(
                    prepared_dir, tmp_path / "p_short", lambda p: _truncate(p / VAL_SHARD, 64)
                )
            },
            [],
            r"val-00000-000\.bin: holds \d+ tokens but meta\.json says \d+; prepare again",
        ),
        "wrong dtype in meta.json": (
            {"data.prepared_dir": _prepared_copy(prepared_dir, tmp_path / "p_dtype", _retype)},
            [],
            r"train-00000-000\.bin: holds \d+ tokens but meta\.json says \d+; prepare again",
        ),
        "resume path that does not exist": (
            {},
            ["--resume_from_checkpoint", str(tmp_path / "nope" / "step_0000004.pt")],
            r"checkpoint .*nope/step_0000004\.pt does not exist",
        ),
        "resume latest with nothing saved": (
            {},
            ["--resume_from_checkpoint", "latest"],
            r"cannot resume from 'latest': no checkpoint in .*checkpoints",
        ),
        "resume from a file without a checksum": (
            {},
            ["--resume_from_checkpoint", str(stray)],
            r"stray\.pt has no checksum file stray\.pt\.sha256",
        ),
    }
    before = {p.name for p in tmp_path.iterdir()}
    procs = {}
    for number, (name, (extra, flags, _)) in enumerate(cases.items()):
        run_dir = tmp_path / f"run{number}"
        overrides = tiny_overrides(prepared_dir, run_dir, extra)
        procs[name] = (
            train_cli([*set_args(overrides), *flags], tmp_path, OMP_NUM_THREADS="1"),
            run_dir,
        )
    failures = []
    for name, (proc, run_dir) in procs.items():
        output = proc.communicate(timeout=120)[0]
        pattern = cases[name][2]
        lines = output.strip().splitlines()
        if (
            proc.returncode != 2
            or len(lines) != 1
            or not (lines[0].startswith("error: ") and re.search(pattern, lines[0]))
        ):
            failures.append(f"{name}: exit {proc.returncode}, output:\n{output}")
        if run_dir.exists():
            failures.append(f"{name}: wrote {sorted(str(p) for p in run_dir.rglob('*'))}")
    assert not failures, "\n".join(failures)
    assert {p.name for p in tmp_path.iterdir()} == before


def test_a_second_run_on_the_same_output_directory_is_refused(
    prepared_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    extra = {"training.max_steps": 100_000, "training.checkpoint_interval": 100_000}
    args = set_args(tiny_overrides(prepared_dir, run_dir, extra))
    first = train_cli(args, tmp_path, OMP_NUM_THREADS="1")
    log = run_dir / "logs" / "training.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "step 2: loss" in log.read_text()):
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "the first run did not start"
        time.sleep(0.05)
    try:
        second = train_cli(args, tmp_path, OMP_NUM_THREADS="1")
        output = second.communicate(timeout=120)[0]
        assert second.returncode == 2, output
        lines = output.strip().splitlines()
        assert len(lines) == 1, output
        assert re.match(
            rf"error: output directory {re.escape(str(run_dir))} is in use by another training "
            rf"run: pid {first.pid} on host .* holds the lock .*\.run\.lock",
            lines[0],
        ), output
        assert first.poll() is None, "the refused run must not disturb the first one"
        assert log.read_text().count(" from step 0 to ") == 1, "the second run logged"
        assert not (run_dir / "checkpoints").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        rest = first.communicate(timeout=120)[0]
    assert first.returncode == 143, rest


# ------------------------------------------------------------------------------ security

_SERVERS = re.compile(r"(mlflow (?:ui|server)|tensorboard --logdir)")
_LOOPBACK = re.compile(r"--host[ =](127\.0\.0\.1|localhost)\b")


def _project_text_files() -> list[Path]:
    files = [REPO_ROOT / name for name in ("README.md", "Makefile", "dvc.yaml", "params.yaml")]
    for folder in ("pipeline", "stages", "bench", "scripts", "configs", "docs", ".ci"):
        root = REPO_ROOT / folder
        if root.is_dir():
            files += [p for p in root.rglob("*") if p.is_file() and p.suffix != ".pyc"]
    return [p for p in files if p.is_file()]


def test_nothing_listens_beyond_loopback_by_default() -> None:
    problems = []
    for path in _project_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        where = path.relative_to(REPO_ROOT)
        if "0.0.0.0" in text:
            problems.append(f"{where}: mentions 0.0.0.0")
        for match in _SERVERS.finditer(text):
            # The command runs to the end of its inline code span or paragraph.
            ends = [text.find(mark, match.end()) for mark in ("`", "\n\n")]
            end = min([e for e in ends if e != -1], default=len(text))
            command = text[match.start() : end]
            if command.strip() == match.group(1):
                continue  # the name in prose, not a command line
            if not _LOOPBACK.search(command):
                problems.append(f"{where}: {command.strip()!r} without --host 127.0.0.1")
    assert not problems, "\n".join(problems)
