"""The README walked through as a new user would (issue 17): what surprised them, now said or
fixed. Real processes throughout: the lint script in real git repos, `stages/prepare.py` and
`stages/train.py` as subprocesses, real signals, real TensorBoard event files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, set_args, tiny_overrides, train_cli

from pipeline.cli import run_command
from pipeline.cli.slurm import slurm as slurm_command
from pipeline.config.loader import load_config
from pipeline.tracking.tensorboard import RUNS_FOLDER

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    ruff = Path(sys.executable).parent / "ruff"
    return subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "lint.sh")],
        cwd=cwd,
        env={**GIT_ENV, "RUFF": str(ruff)},
        capture_output=True,
        text=True,
    )


def test_lint_checks_the_files_git_tracks_not_a_users_scratch_file(tmp_path: Path) -> None:
    """`make test`'s ruff: an untracked scratch script does not fail it, a tracked one does,
    and outside git (a tarball) every file is checked."""
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "good.py").write_text('"""Fine."""\n\nVALUE = 1\n')
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=GIT_ENV)
    subprocess.run(["git", "add", "good.py", "pyproject.toml"], cwd=tmp_path, check=True)
    (tmp_path / "scratch.py").write_text("import os\n")  # F401: ruff fails on it
    assert _lint(tmp_path).returncode == 0, _lint(tmp_path).stdout

    subprocess.run(["git", "add", "scratch.py"], cwd=tmp_path, check=True)
    tracked = _lint(tmp_path)
    assert tracked.returncode == 1 and "scratch.py" in tracked.stdout, tracked.stdout

    shutil.rmtree(tmp_path / ".git")
    tarball = _lint(tmp_path)
    assert tarball.returncode == 1 and "scratch.py" in tarball.stdout, tarball.stdout


def test_a_bpe_smaller_than_asked_for_says_so(tmp_path: Path) -> None:
    """`--vocab_size 8192` on a small corpus: one warning line on stderr, and meta.json holds
    both the size asked for and the size that came out."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a small corpus of few words"] * 50))
    (tmp_path / "other.txt").write_text("another small file with a few words\n" * 20)
    prepared = tmp_path / "prepared"
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")  # its paths are relative
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "stages" / "prepare.py"),
            "--input",
            str(tmp_path / "*.txt"),
            "--vocab_size",
            "8192",
            "--val_fraction",
            "0.5",
            "--prepared_dir",
            str(prepared),
            "--no-progress",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["tokenizer"]["vocab_size_requested"] == 8192 and meta["vocab_size"] < 8192
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: data.vocab_size 8192 asked for, but the BPE learned only "
        f"{meta['vocab_size']} tokens from this text (too little of it to merge further); "
        "meta.json records both"
    ], done.stderr


def test_slurm_script_warns_when_gpus_per_node_trains_on_cpus(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's cluster example with the default training config (`device: cpu`)."""
    params = str(REPO_ROOT / "params.yaml")
    flags = ["--params", params, "--set", "distributed.gpus_per_node=8"]
    for extra, warned in (([], True), (["--set", "training.device=auto"], False)):
        with pytest.raises(SystemExit) as exit_info:
            run_command(slurm_command, ["script", *flags, *extra])
        assert exit_info.value.code == 0
        captured = capsys.readouterr()
        assert ("--gpus-per-node=8" in captured.out) is not warned
        expected = (
            "warning: training.device is cpu, so the job requests no GPUs and each node runs 8 "
            "CPU processes (distributed.gpus_per_node); for GPUs add --set training.device=auto "
            "or a GPU training config\n"
        )
        assert captured.err == (expected if warned else ""), captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_recipe_on_cpu_warns_first_and_a_second_signal_stops_at_once(
    prepared_dir: Path, tmp_path: Path
) -> None:
    """`device: auto` falling back to the CPU warns before the model is built. A step made
    long (4096 sequences of accumulation) stands for a GPU recipe's step on a CPU: the first
    SIGTERM says it will checkpoint after the step; repeats within `REPEAT_AFTER_S` (one
    signal delivered twice) change nothing; a later one stops at once, with no checkpoint."""
    from pipeline.training.trainer import StopRequested

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        prepared_dir,
        run_dir,
        {"training.device": "auto", "training.global_batch_size": 4096, "training.max_steps": 3},
    )
    proc = train_cli(set_args(overrides), tmp_path)
    lines = []
    try:
        for line in proc.stdout:  # until the handlers are in place (the loop says so)
            lines.append(line)
            if "SIGTERM or Ctrl-C" in line:
                break
        first = time.monotonic()
        while True:
            proc.send_signal(signal.SIGTERM)  # as a user pressing Ctrl-C until it stops
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                assert time.monotonic() - first < 60, "a second signal should stop at once"
        elapsed = time.monotonic() - first
        lines += proc.stdout.readlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, output
    warning = next(i for i, line in enumerate(lines) if "warning: training on the CPU" in line)
    started = next(i for i, line in enumerate(lines) if "training custom (" in line)
    assert warning < started, output
    assert "training.device auto" in lines[warning] and "FLOPs per optimizer step" in output
    assert output.count("SIGTERM: finishing this step") == 1, output
    assert output.count("SIGTERM again: stopping now, without a checkpoint") == 1, output
    assert elapsed >= StopRequested.REPEAT_AFTER_S, "a repeat inside the window stopped it"
    assert "step 1:" not in output, "the step was not meant to finish"
    assert not list((run_dir / "checkpoints").glob("step_*")), "no checkpoint after a 2nd signal"


def _scalar_steps(folder: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]


def test_tensorboard_keeps_one_folder_per_run(prepared_dir: Path, tmp_path: Path) -> None:
    """Two runs of one experiment name keep both curves; a resume continues its run's folder."""
    from pipeline.training.run import train

    run_dir = tmp_path / "run"

    def config(steps: int):
        return load_config(
            overrides=tiny_overrides(prepared_dir, run_dir, {"training.max_steps": steps})
        )

    train(config(2), console=False)
    train(config(4), resume="latest", console=False)  # the same run, continued
    train(config(4), resume="auto", console=False)  # finished: a new run starts afresh
    runs = sorted((run_dir / "logs" / RUNS_FOLDER).iterdir())
    assert len(runs) == 2, runs
    assert [_scalar_steps(run) for run in runs] == [[1, 2, 3, 4], [1, 2, 3, 4]]
