"""The child side: stages/train.py behind an audit hook that SIGKILLs it in checkpoint code."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = REPO_ROOT / "bench"
"""Where this package lives: the children import it from there (`-c "from chaos_loop..."`)."""
STAGE = REPO_ROOT / "stages" / "train.py"

EVENTS_PER_SAVE = 24
"""About how many counted file operations one checkpoint save makes (more when it prunes)."""
FAULT_EVENTS = ("open", "os.rename", "os.link", "os.remove")
"""The audit events counted: opening for writing, rename/replace, hard link, unlink."""


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
