"""The kill loop driver: a reference run, a chaos run killed again and again, a comparison."""

from __future__ import annotations

import random
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from chaos_loop.child import EVENTS_PER_SAVE, STAGE
from chaos_loop.process import _STARTED_RE, _Child, child_env, set_args
from chaos_loop.report import ChaosError, ChaosReport, Kill, _num
from chaos_loop.state import _differences, _final_state, has_checkpoint, leftovers

KILL_WINDOW_S = 0.02
"""A random kill lands up to this long after the progress line it waits for (about 2 steps)."""
_CHILD_CODE = (
    "import sys; from chaos_loop.child import run_stage_with_fault; run_stage_with_fault()"
)


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
