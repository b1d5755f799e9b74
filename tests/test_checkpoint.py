"""The checkpoint store, RNG capture and run lock, on real files and real processes (no mocks).

Child processes do what a training process does (save in a loop, hit a file-size limit, hold
the run lock) and are killed with SIGKILL; the parent then checks what is left on disk.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import (
    LATEST_NAME,
    CheckpointManager,
    CorruptCheckpointError,
    checksum_path,
    file_sha256,
    list_step_files,
    read_checksums,
    verify_checkpoint,
)
from pipeline.errors import CheckpointError, UserError
from pipeline.rng import capture_rng_state, restore_rng_state
from pipeline.run_lock import LOCK_FILE_NAME, RunLock

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

SAVER = """
import sys
from pathlib import Path
import torch
from pipeline.checkpoint import CheckpointManager

manager = CheckpointManager(Path(sys.argv[1]), keep=3)
step = int(sys.argv[2])
while True:
    state = {"step": step, "weights": torch.full((1 << 20,), float(step)), "meta": {"lr": 0.1}}
    manager.save(state, step)
    print(step, flush=True)
    step += 1
"""

DISK_FULL = """
import resource, signal, sys
from pathlib import Path
import torch
from pipeline.checkpoint import CheckpointManager
from pipeline.errors import CheckpointError

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() then fails with EFBIG
manager = CheckpointManager(Path(sys.argv[1]), keep=3)
manager.save({"step": 1, "weights": torch.ones(1000)}, 1)
limit = 1 << 20
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    manager.save({"step": 2, "weights": torch.ones(1 << 20)}, 2)
except CheckpointError as exc:
    print(exc)
    sys.exit(0)
sys.exit("save succeeded past the file size limit")
"""

LOCK_CONTENDER = """
import sys
from pathlib import Path
from pipeline.errors import UserError
from pipeline.run_lock import RunLock

try:
    lock = RunLock(Path(sys.argv[1])).acquire()
except UserError:
    print("refused", flush=True)
    sys.exit(0)
print("won", flush=True)
sys.stdin.read()  # hold until the test closes stdin
lock.release()
"""

LOCK_HOLDER = """
import sys
from pathlib import Path
from pipeline.run_lock import RunLock

with RunLock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until killed
"""


def _spawn(script: str, *args: object, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=ROOT,
        env=CHILD_ENV,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_line(proc: subprocess.Popen[str]) -> str:
    """Block until the child writes a line; a child that died instead fails with its stderr."""
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        pytest.fail(f"child exited with {proc.returncode}: {proc.stderr.read()}")
    return line.strip()


def _state(step: int, size: int = 1000) -> dict:
    return {
        "step": step,
        "weights": torch.arange(size, dtype=torch.float32) + step,
        "optimizer": {
            "state": {0: {"exp_avg": torch.zeros(3)}},
            "param_groups": [
                {
                    "lr": 0.1,
                    "betas": (0.9, 0.95),
                    "fused": None,
                    "params": [0],
                    "name": "decay",
                    "amsgrad": False,
                }
            ],
        },
    }


def _assert_state(state: dict, step: int, size: int = 1000) -> None:
    assert state["step"] == step
    assert torch.equal(state["weights"], torch.arange(size, dtype=torch.float32) + step)
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)


def _names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def _flip_bytes(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        chunk = handle.read(16)
        handle.seek(-len(chunk), os.SEEK_CUR)
        handle.write(bytes(b ^ 0xFF for b in chunk))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


# ------------------------------------------------------------------------- save and load
def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints", keep=3)
    path = manager.save(_state(5), 5)

    assert path == tmp_path / "checkpoints" / "step_0000005.pt"
    assert checksum_path(path).read_text() == f"{file_sha256(path)}  step_0000005.pt\n"
    latest = path.parent / LATEST_NAME
    assert os.path.samefile(latest, path)
    assert read_checksums(latest) == {file_sha256(path)}
    _assert_state(torch.load(latest, weights_only=True), 5)  # what a user would type
    for which in ("latest", 5, "5", path, path.parent, tmp_path):  # tmp_path is the run dir
        state, loaded_from = manager.load(which)
        _assert_state(state, 5)
        assert loaded_from == path
    assert manager.latest_step() == 5
    assert not [name for name in _names(path.parent) if name.endswith(".tmp")]


def test_retention_keeps_newest_and_latest_loads_plainly(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, keep=2)
    for step in range(1, 6):
        manager.save(_state(step), step)

    assert [step for step, _ in manager.list_checkpoints()] == [4, 5]
    assert _names(directory) == {
        "step_0000004.pt",
        "step_0000004.pt.sha256",
        "step_0000005.pt",
        "step_0000005.pt.sha256",
        LATEST_NAME,
        LATEST_NAME + ".sha256",
    }
    _assert_state(torch.load(directory / LATEST_NAME, weights_only=True), 5)
    _assert_state(manager.load(4)[0], 4)


def test_saving_a_step_again_replaces_it_consistently(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(_state(1), 1)
    manager.save(_state(2), 2)
    manager.save(_state(7, size=10), 2)  # e.g. a resume from step 1 that reaches step 2 again

    _assert_state(manager.load()[0], 7, size=10)
    for _, path in manager.list_checkpoints():
        verify_checkpoint(path)
    verify_checkpoint(tmp_path / LATEST_NAME)
    assert len(read_checksums(tmp_path / "step_0000002.pt") or ()) == 1


def test_non_tensor_state_fails_before_writing(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, keep=3)
    bad_states = {
        r"state\['rng'\]\['numpy'\]\[1\] is a numpy.ndarray": {
            "rng": {"numpy": np.random.get_state()}
        },
        r"state\['metrics'\]\['loss'\] is a numpy.float64": {"metrics": {"loss": np.float64(1.0)}},
        r"state\['model'\]\[0\] is a builtins.object": {"model": [object()]},
    }
    for message, state in bad_states.items():
        with pytest.raises(TypeError, match=message):
            manager.save(state, 1)
    assert not directory.exists()


def test_load_by_step_that_does_not_exist_names_what_exists(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(_state(1), 1)
    with pytest.raises(CheckpointError, match=r"no checkpoint step_0000009.pt .*steps present: 1"):
        manager.load(9)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        CheckpointManager(tmp_path / "empty", keep=1).load()


# ------------------------------------------------------------------- corruption detection
@pytest.mark.parametrize("damage", [_flip_bytes, _truncate], ids=["flipped", "truncated"])
def test_corrupt_checkpoint_is_detected_and_latest_falls_back(
    tmp_path: Path, damage, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path, keep=5)
    for step in (1, 2, 3):
        manager.save(_state(step), step)
    newest = tmp_path / "step_0000003.pt"
    damage(newest)  # latest is a hard link to it, so latest is damaged too

    with pytest.raises(CorruptCheckpointError, match=str(newest)):
        manager.load(3)
    with pytest.raises(CorruptCheckpointError, match=str(newest)):
        manager.load(newest)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        state, path = manager.load("latest")
    _assert_state(state, 2)
    assert path == tmp_path / "step_0000002.pt"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tmp_path / LATEST_NAME) in w and "corrupt or truncated" in w for w in warnings)
    assert any(f"loaded {path}" in w for w in warnings)


def test_missing_or_wrong_checksum_files_are_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path, keep=5)
    for step in (1, 2):
        manager.save(_state(step), step)
    step2 = tmp_path / "step_0000002.pt"

    checksum_path(step2).write_text("0" * 64 + "  step_0000002.pt\n")
    with pytest.raises(CorruptCheckpointError, match=f"{step2} is corrupt"):
        manager.load(2)
    checksum_path(step2).unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{step2} has no checksum file"):
        manager.load(2)

    checksum_path(tmp_path / LATEST_NAME).unlink()  # latest's bytes are fine, but unverifiable
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        state, _ = manager.load()
    _assert_state(state, 1)  # step 2 has no checksum file either, so step 1
    assert any("has no checksum file" in r.getMessage() for r in caplog.records)


def test_nothing_intact_is_an_error_naming_the_directory(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(_state(1), 1)
    _flip_bytes(tmp_path / "step_0000001.pt")
    with pytest.raises(CheckpointError, match=f"no intact checkpoint in {tmp_path}"):
        manager.load()


class _Planted:
    """Pickles to a call of `os.mkdir`: what a malicious checkpoint would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_code_is_refused_even_with_a_valid_checksum(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    planted = tmp_path / "step_0000009.pt"
    planted.write_bytes(pickle.dumps({"step": _Planted(tmp_path / "pwned")}, protocol=2))
    checksum_path(planted).write_text(f"{file_sha256(planted)}  {planted.name}\n")

    with pytest.raises(CheckpointError, match=f"cannot load checkpoint {planted}"):
        manager.load(9)
    assert not (tmp_path / "pwned").exists()


def test_leftovers_of_dead_writers_are_removed_on_init(tmp_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    host = socket.gethostname()
    dead_tmp = tmp_path / f".step_0000002.pt.{finished.pid}@{host}.tmp"
    live_tmp = tmp_path / f".step_0000003.pt.1@{host}.tmp"  # pid 1 is always alive
    orphan = tmp_path / "step_0000002.pt.sha256"
    live_sidecar = tmp_path / "step_0000003.pt.sha256"
    for path in (dead_tmp, live_tmp, orphan, live_sidecar):
        path.write_text("x")

    CheckpointManager(tmp_path, keep=3)
    assert _names(tmp_path) == {live_tmp.name, live_sidecar.name}


# --------------------------------------------------------------------- processes and faults
def _interrupted_save(directory: Path, latest_step: int) -> bool:
    """Whether a kill left signs of a save in progress (temp files, half-swapped checksums)."""
    names = _names(directory)
    checksum_files = [name for name in names if name.endswith(".sha256")]
    return (
        any(name.endswith(".tmp") for name in names)
        or any(name.removesuffix(".sha256") not in names for name in checksum_files)
        or any(
            len(read_checksums(directory / name.removesuffix(".sha256")) or ()) > 1
            for name in checksum_files
        )
        or list_step_files(directory)[-1][0] != latest_step
    )


@pytest.mark.timeout(180)
def test_sigkill_during_saves_always_leaves_latest_intact(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    chooser = random.Random(20240601)
    next_step, save_seconds, kills_inside_a_write = 1, None, 0
    for _ in range(10):
        proc = _spawn(SAVER, directory, next_step)
        reported = [int(_read_line(proc))]  # the child is now saving in a steady loop
        if save_seconds is None:
            started = time.perf_counter()
            reported += [int(_read_line(proc)) for _ in range(3)]
            save_seconds = (time.perf_counter() - started) / 3
        # Fault injection, not synchronisation: kill at a random point of a save.
        time.sleep(chooser.uniform(0.0, 1.5 * save_seconds))
        proc.kill()
        rest, _ = proc.communicate()
        reported += [int(line) for line in rest.split()]
        latest = directory / LATEST_NAME
        state = torch.load(latest, weights_only=True)
        step = state["step"]
        kills_inside_a_write += _interrupted_save(directory, step)
        # Every reported save moved latest forward; a save may also have finished unreported.
        assert reported[-1] <= step <= reported[-1] + 1, (reported, step)
        assert bool((state["weights"] == float(step)).all())
        assert file_sha256(latest) in (read_checksums(latest) or ())
        assert os.path.samefile(latest, directory / f"step_{step:07d}.pt")
        for _, path in list_step_files(directory):  # every completed checkpoint is intact
            verify_checkpoint(path)
        next_step = step + 1

    manager = CheckpointManager(directory, keep=3)  # init removes the killed writers' leftovers
    names = _names(directory)
    assert not [name for name in names if name.endswith(".tmp")], names
    for name in names:
        if name.endswith(".sha256"):
            assert name.removesuffix(".sha256") in names
    assert manager.load()[0]["step"] == next_step - 1
    assert kills_inside_a_write >= 1


def test_full_disk_while_saving_keeps_previous_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    proc = _spawn(DISK_FULL, directory)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err

    assert "disk full while writing" in out
    assert str(directory / "step_0000002.pt") in out
    assert _names(directory) == {
        "step_0000001.pt",
        "step_0000001.pt.sha256",
        LATEST_NAME,
        LATEST_NAME + ".sha256",
    }
    state, path = CheckpointManager(directory, keep=3).load()
    assert state["step"] == 1 and path == directory / "step_0000001.pt"


# ------------------------------------------------------------------------------------ RNG
def _draws() -> tuple:
    return (
        random.random(),
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
        torch.rand(3),
        torch.randn(2),
    )


def _assert_same_draws(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4]
    assert torch.equal(a[4], b[4]) and torch.equal(a[5], b[5])


def test_rng_capture_restore_reproduces_draws_through_a_checkpoint(tmp_path: Path) -> None:
    original = capture_rng_state()
    try:
        random.gauss(0.0, 1.0)  # leave a cached Gaussian in both Python's and NumPy's state
        np.random.standard_normal()
        captured = capture_rng_state()
        first = _draws()

        restore_rng_state(captured)
        _assert_same_draws(_draws(), first)

        manager = CheckpointManager(tmp_path, keep=1)
        manager.save({"rng": captured}, 1)
        _draws()
        restore_rng_state(manager.load()[0]["rng"])  # loaded with weights_only=True
        _assert_same_draws(_draws(), first)
    finally:
        restore_rng_state(original)


# ------------------------------------------------------------------------------- run lock
def test_run_lock_refuses_a_second_run_and_survives_sigkill(tmp_path: Path) -> None:
    run_dir = tmp_path / "experiments" / "tiny"
    holder = _spawn(LOCK_HOLDER, run_dir, stdin=subprocess.PIPE)
    try:
        assert _read_line(holder) == "locked"
        with pytest.raises(UserError) as refused:
            RunLock(run_dir).acquire()
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert str(run_dir / LOCK_FILE_NAME) in message
    finally:
        holder.kill()
        holder.communicate()

    assert (run_dir / LOCK_FILE_NAME).exists()  # SIGKILL left the file, but not the lock
    with RunLock(run_dir) as lock:
        assert lock.held
        with pytest.raises(UserError, match=f"pid {os.getpid()} "):
            RunLock(run_dir).acquire()
    assert not (run_dir / LOCK_FILE_NAME).exists()
    with RunLock(run_dir):
        pass


def test_run_lock_admits_exactly_one_of_concurrent_starters(tmp_path: Path) -> None:
    contenders = [_spawn(LOCK_CONTENDER, tmp_path, stdin=subprocess.PIPE) for _ in range(4)]
    try:
        outcomes = sorted(_read_line(proc) for proc in contenders)
    finally:
        for proc in contenders:
            proc.communicate()  # closes stdin: the winner releases and exits
    assert outcomes == ["refused", "refused", "refused", "won"]
    assert not (tmp_path / LOCK_FILE_NAME).exists()
