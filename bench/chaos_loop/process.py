"""One training process as the loop sees it: its command line, environment and log."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chaos_loop.child import BENCH, REPO_ROOT
from chaos_loop.report import ChaosError

_STARTED_RE = re.compile(r" from step (\d+) to ")
_STEP_RE = re.compile(r" step (\d+): loss ")
_FALLBACK_MARKERS = ("falling back to the newest intact checkpoint", "trying an older one")


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
    """One intra-op thread per child (same arithmetic in every run), the repo and this
    harness (under bench/) importable."""
    env = dict(os.environ if base is None else base)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
    )
    paths = [str(REPO_ROOT), str(BENCH), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
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
