"""The kill loop: SIGKILL a training run again and again, resume it each time, lose nothing.

`run_chaos` trains one config twice, each run in its own processes (`stages/train.py`, the
command DVC runs):
- a reference run, uninterrupted;
- a chaos run, SIGKILLed `kills` times, each time restarted with `--resume_from_checkpoint
  latest`. When no checkpoint exists yet it is restarted afresh, without the flag. After the
  last kill it is left to finish.
It then checks that both runs end with bitwise identical weights and optimizer state.

Kills come in two kinds, drawn from a seeded RNG. Their exact timing still depends on the
machine, so the loop is repeatable in kind but not to the microsecond:
- `random`: the loop watches the run's `training.log` and picks a progress point: the line
  that starts training, or `step N: loss` for a step N a few steps ahead. It kills a random few
  milliseconds after that line appears. Checkpoints are saved every few steps, so some of these
  kills land inside a checkpoint write.
- `checkpoint-write`: a kill that is certain to land inside checkpoint code. The child runs
  `stages/train.py` behind a Python audit hook (`sys.addaudithook`) that counts the file
  operations in the checkpoints folder (create, rename, hard link, delete) and SIGKILLs its own
  process just before the n-th one, or a moment after it. Those operations are the save's
  write-aside, rename and `latest` steps, and the sweep after a killed writer. No pipeline code
  is patched.

Every child gets one intra-op thread, so the reference and the chaos run do their arithmetic
the same way. The report lists every kill, where it landed, whether it left a half-written
checkpoint behind, and whether a resume had to fall back from `latest` to an older checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGE = REPO_ROOT / "stages" / "train.py"

EVENTS_PER_SAVE = 24
"""About how many counted file operations one checkpoint save makes (more when it prunes)."""
FAULT_EVENTS = ("open", "os.rename", "os.link", "os.remove")
"""The audit events counted: opening for writing, rename/replace, hard link, unlink."""
KILL_WINDOW_S = 0.02
"""A random kill lands up to this long after the progress line it waits for (about 2 steps)."""
_CHILD_CODE = "import sys; from pipeline.chaos import run_stage_with_fault; run_stage_with_fault()"
_STARTED_RE = re.compile(r" from step (\d+) to ")
_STEP_RE = re.compile(r" step (\d+): loss ")
_FALLBACK_MARKERS = ("falling back to the newest intact checkpoint", "trying an older one")

TINY_OVERRIDES: dict[str, Any] = {
    "model.n_layer": 2,
    "model.d_model": 64,
    "model.n_head": 2,
    "model.d_head": 32,
    "model.d_ff": 256,
    "model.n_ctx": 64,
    "training.seq_len": 64,
    "training.micro_batch_size": 4,
    "training.global_batch_size": 8,
    "training.warmup_tokens": 1024,
    "training.device": "cpu",
}
"""A 2-layer model that trains a step in about 10 ms on one CPU thread (the tests' shapes)."""


class ChaosError(RuntimeError):
    """The loop itself could not go on: a child failed or hung. The message has its output."""


@dataclass
class Kill:
    """One injected fault and what it left behind."""

    index: int
    kind: str
    """`random` (SIGKILL from outside after a progress point) or `checkpoint-write`."""
    started_from: int | None
    """The step the child resumed from (0 after a fresh start), from its log; None if unknown."""
    aimed_at: str
    """Where the kill was aimed, in words."""
    last_step: int | None
    """The last step the child logged before it died."""
    partial_write: list[str] = field(default_factory=list)
    """What the kill left half-written in the checkpoints folder (new since the child started)."""


@dataclass
class ChaosReport:
    """The outcome of `run_chaos`."""

    kills: list[Kill]
    resumes: int
    """Starts with `--resume_from_checkpoint latest` (the final one included)."""
    fresh_starts: int
    """Starts without a checkpoint to resume from (the first, and after kills before one)."""
    fallbacks: int
    """Resumes that found `latest` unusable and loaded an older intact checkpoint instead."""
    steps: int
    final_step: int
    weights_identical: bool
    optimizer_identical: bool
    differing: list[str]
    seconds: float

    @property
    def identical(self) -> bool:
        return self.weights_identical and self.optimizer_identical

    @property
    def kills_in_checkpoint_writes(self) -> int:
        """Kills that left a half-written checkpoint (or were aimed into a save's file calls)."""
        return sum(1 for k in self.kills if k.partial_write or k.kind == "checkpoint-write")

    def summary(self) -> str:
        lines = [
            f"{'#':>3}  {'kind':<16} {'from':>5} {'died':>5}  aimed at / left behind",
        ]
        for k in self.kills:
            left = f"; left {', '.join(k.partial_write)}" if k.partial_write else ""
            lines.append(
                f"{k.index:>3}  {k.kind:<16} {_num(k.started_from):>5} {_num(k.last_step):>5}"
                f"  {k.aimed_at}{left}"
            )
        by_kind = {kind: sum(k.kind == kind for k in self.kills) for kind in _KINDS}
        lines += [
            f"faults injected: {len(self.kills)} SIGKILLs ({by_kind['random']} at random moments "
            f"after progress lines, {by_kind['checkpoint-write']} inside checkpoint file calls)",
            f"kills that landed inside a checkpoint write: {self.kills_in_checkpoint_writes}",
            f"restarts: {self.resumes} resumed from latest, {self.fresh_starts} fresh (no "
            f"checkpoint yet); {self.fallbacks} resume(s) fell back to an older intact checkpoint",
            f"final step: {self.final_step} of {self.steps}",
            f"final weights bitwise identical to the uninterrupted run: "
            f"{'yes' if self.weights_identical else 'NO'}; optimizer state: "
            f"{'yes' if self.optimizer_identical else 'NO'}"
            + (f" (differ: {', '.join(self.differing[:5])})" if self.differing else ""),
            f"wall time: {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


_KINDS = ("random", "checkpoint-write")


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


# ------------------------------------------------------------------------------ the child


def install_fault(checkpoint_dir: Path, at_event: int, delay_s: float) -> None:
    """SIGKILL this process at the `at_event`-th file operation in `checkpoint_dir`.

    With `delay_s` 0 the kill comes just before that operation; otherwise a timer thread sends
    it `delay_s` later, typically in the middle of the bytes being written.
    """
    prefix = os.path.join(os.path.abspath(checkpoint_dir), "")
    seen = 0

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def in_checkpoints(paths: Iterable[object]) -> bool:
        return any(
            isinstance(p, (str, bytes, os.PathLike))
            and os.path.abspath(os.fsdecode(p)).startswith(prefix)
            for p in paths
        )

    def hook(event: str, args: tuple[Any, ...]) -> None:
        nonlocal seen
        if event not in FAULT_EVENTS:
            return
        if event == "open":
            mode = args[1] if len(args) > 1 else None
            if not (isinstance(mode, str) and set(mode) & set("wxa+")):
                return
            paths: tuple[Any, ...] = args[:1]
        else:
            paths = args[:2]
        if not in_checkpoints(paths):
            return
        seen += 1
        if seen != at_event:
            return
        if delay_s <= 0:
            kill()
        else:
            threading.Timer(delay_s, kill).start()

    sys.addaudithook(hook)


def run_stage_with_fault(argv: list[str] | None = None) -> None:
    """Child entry: `CHECKPOINT_DIR AT_EVENT DELAY_S TRAIN_ARGS...` -> stages/train.py, faulted."""
    import runpy

    args = list(sys.argv[1:] if argv is None else argv)
    checkpoint_dir, at_event, delay_s, train_args = args[0], int(args[1]), float(args[2]), args[3:]
    install_fault(Path(checkpoint_dir), at_event, delay_s)
    sys.argv = [str(STAGE), *train_args]
    runpy.run_path(str(STAGE), run_name="__main__")


# ------------------------------------------------------------------------------- the loop


def set_args(overrides: Mapping[str, Any]) -> list[str]:
    """Dotted overrides as `--set key=value` flags of the train command."""
    args: list[str] = []
    for key, value in overrides.items():
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = str(value).lower()
        else:
            text = str(value)
        args += ["--set", f"{key}={text}"]
    return args


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """One intra-op thread per child (same arithmetic in every run), the repo importable."""
    env = dict(os.environ if base is None else base)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


class _Child:
    """One training process, its output in a file, its log followed from where it started."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str], out: Path, log: Path):
        self.log = log
        self.offset = log.stat().st_size if log.exists() else 0
        self.text = ""
        self.out = out
        with open(out, "wb") as handle:
            self.proc = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT
            )

    def read(self) -> str:
        """This child's part of training.log so far."""
        if self.log.exists():
            with open(self.log, "rb") as handle:
                handle.seek(self.offset)
                self.text += handle.read().decode("utf-8", "replace")
                self.offset = handle.tell()
        return self.text

    def wait_for(self, pattern: re.Pattern[str] | str, deadline: float) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        while True:
            match = regex.search(self.read())
            if match:
                return match
            if self.proc.poll() is not None:
                raise ChaosError(
                    f"training exited with {self.proc.returncode} before "
                    f"{regex.pattern!r} appeared in its log:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                raise ChaosError(f"no {regex.pattern!r} in the log in time:\n{self.tail()}")
            time.sleep(0.002)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise ChaosError(
                f"training did not finish in {timeout:.0f} s:\n{self.tail()}"
            ) from None

    def started_from(self) -> int | None:
        match = _STARTED_RE.search(self.read())
        return int(match.group(1)) if match else None

    def last_step(self) -> int | None:
        steps = _STEP_RE.findall(self.read())
        return int(steps[-1]) if steps else None

    def fell_back(self) -> bool:
        text = self.read()
        return any(marker in text for marker in _FALLBACK_MARKERS)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.out.read_text(errors="replace").splitlines()[-lines:])


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
    from pipeline.checkpoint_io import TEMP_RE

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


def run_chaos(
    overrides: Mapping[str, Any],
    workdir: Path,
    kills: int = 20,
    seed: int = 0,
    checkpoint_interval: int = 3,
    say: Callable[[str], None] | None = None,
    timeout_s: float = 180.0,
) -> ChaosReport:
    """Run the kill loop on the config `overrides` describe; see the module docstring.

    `overrides`: dotted config keys (data, model shapes, device). The loop sets the run's
    length, its checkpoint interval, logging and output directories itself, and turns
    tracking off. `workdir` receives `reference/`, `chaos/` and each child's output.
    Raises `ChaosError` if a child fails or hangs; no child is left running.
    """
    loop = _KillLoop(overrides, Path(workdir), seed, checkpoint_interval, timeout_s)
    return loop.run(kills, say or (lambda line: None))


class _KillLoop:
    """The state of one `run_chaos`: its runs, RNG, children and counters."""

    def __init__(
        self,
        overrides: Mapping[str, Any],
        workdir: Path,
        seed: int,
        interval: int,
        timeout_s: float,
    ) -> None:
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.interval = interval
        self.timeout_s = timeout_s
        self.env = child_env()
        self.reference_dir, self.run_dir = self.workdir / "reference", self.workdir / "chaos"
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.log = self.run_dir / "logs" / "training.log"
        self.overrides = dict(overrides)
        self.children: list[_Child] = []
        self.resumes = self.fresh = self.fallbacks = 0

    def _command(self, output: Path, resume: bool, fault: tuple[int, float] | None) -> list[str]:
        args = set_args({**self.overrides, "output_dir": str(output)})
        if resume:
            args += ["--resume_from_checkpoint", "latest"]
        if fault is None:
            return [sys.executable, str(STAGE), *args]
        at_event, delay_s = fault
        fault_args = [str(self.checkpoint_dir), str(at_event), repr(delay_s)]
        return [sys.executable, "-c", _CHILD_CODE, *fault_args, *args]

    def _start(self, out_name: str, fault: tuple[int, float] | None = None) -> _Child:
        """Start the chaos run: resumed from `latest`, or afresh when nothing was saved yet."""
        resume = has_checkpoint(self.checkpoint_dir)
        self.resumes += resume
        self.fresh += not resume
        command = self._command(self.run_dir, resume, fault)
        child = _Child(command, self.workdir, self.env, self.workdir / out_name, self.log)
        self.children.append(child)
        return child

    def _kill_in_checkpoint_write(self, index: int) -> tuple[_Child, str]:
        at_event = self.rng.randint(1, EVENTS_PER_SAVE)
        delay_s = 0.0 if self.rng.random() < 0.7 else self.rng.uniform(0.0, 0.004)
        aimed = f"file operation {at_event} in checkpoints/"
        if delay_s:
            aimed += f" + {delay_s * 1000:.1f} ms"
        child = self._start(f"chaos_{index:02d}.out", (at_event, delay_s))
        child.wait(self.timeout_s)
        return child, aimed

    def _kill_at_random(self, index: int) -> tuple[_Child, str]:
        # The first kill aims before the first checkpoint, so a fresh restart is exercised.
        ahead = self.rng.randint(0, self.interval - 1 if index == 1 else 2 * self.interval)
        delay_s = self.rng.uniform(0.0, KILL_WINDOW_S)
        deadline = time.monotonic() + self.timeout_s
        child = self._start(f"chaos_{index:02d}.out")
        start = int(child.wait_for(_STARTED_RE, deadline).group(1))
        if ahead:
            child.wait_for(re.compile(rf" step {start + ahead}: loss "), deadline)
        time.sleep(delay_s)
        child.proc.send_signal(signal.SIGKILL)
        child.wait(self.timeout_s)
        where = f"step {start + ahead}" if ahead else "the start line"
        return child, f"{delay_s * 1000:.1f} ms after {where}"

    def _one_kill(self, index: int) -> Kill:
        before = leftovers(self.checkpoint_dir)
        kind = "checkpoint-write" if index % 4 == 2 else "random"
        if kind == "checkpoint-write":
            child, aimed = self._kill_in_checkpoint_write(index)
        else:
            child, aimed = self._kill_at_random(index)
        if child.proc.returncode != -signal.SIGKILL:
            raise ChaosError(
                f"kill {index} ({kind}, {aimed}): training exited with "
                f"{child.proc.returncode} instead of dying by SIGKILL:\n{child.tail()}"
            )
        self.fallbacks += child.fell_back()
        return Kill(
            index=index,
            kind=kind,
            started_from=child.started_from(),
            aimed_at=aimed,
            last_step=child.last_step(),
            partial_write=sorted(leftovers(self.checkpoint_dir) - before),
        )

    def run(self, kills: int, say: Callable[[str], None]) -> ChaosReport:
        started = time.monotonic()
        # Each cycle moves at most about 2 intervals past the last checkpoint: never finish early.
        steps = kills * (2 * self.interval + 2) + 2 * self.interval
        self.overrides.update(
            {
                "training.max_steps": steps,
                "training.checkpoint_interval": self.interval,
                "training.keep_checkpoints": 2,
                "training.log_interval": 1,
                "training.eval_interval": steps,
                "tracking.enabled": False,
            }
        )
        reference_log = self.reference_dir / "logs" / "training.log"
        command = self._command(self.reference_dir, False, None)
        reference = _Child(
            command, self.workdir, self.env, self.workdir / "reference.out", reference_log
        )
        self.children.append(reference)
        record: list[Kill] = []
        try:
            for index in range(1, kills + 1):
                kill = self._one_kill(index)
                record.append(kill)
                left = f"; left {', '.join(kill.partial_write)}" if kill.partial_write else ""
                say(
                    f"kill {index:2d}/{kills}: {kill.kind}, from step {_num(kill.started_from)}, "
                    f"died after step {_num(kill.last_step)}{left}"
                )
            final = self._start("final.out")
            if final.wait(self.timeout_s) != 0:
                raise ChaosError(f"the final resume failed:\n{final.tail()}")
            self.fallbacks += final.fell_back()
            if reference.wait(self.timeout_s) != 0:
                raise ChaosError(f"the reference run failed:\n{reference.tail()}")
        finally:
            for child in self.children:  # leave no training process behind
                if child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()

        ours, theirs = _final_state(self.run_dir), _final_state(self.reference_dir)
        model_diff = _differences(ours["model"], theirs["model"], "model")
        optim_diff = _differences(ours["optimizer"], theirs["optimizer"], "optimizer")
        return ChaosReport(
            kills=record,
            resumes=self.resumes,
            fresh_starts=self.fresh,
            fallbacks=self.fallbacks,
            steps=steps,
            final_step=int(ours["progress"]["step"]),
            weights_identical=not model_diff,
            optimizer_identical=not optim_diff,
            differing=model_diff + optim_diff,
            seconds=time.monotonic() - started,
        )
