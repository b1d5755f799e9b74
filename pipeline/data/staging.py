"""The folders prepare writes: outputs staged beside their target and swapped in whole, and
the scratch space of the passes, cleared after a run and after a killed one."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from pipeline.data.atomic_swap import (
    check_target,
    pid_alive,
    recover_stale_siblings,
    swap_into_place,
)
from pipeline.data.prepared import META_FILE


def write_json(path: Path, text: str) -> None:
    """Write a small record durably (it names files that are already on disk)."""
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class Staging:
    """A temporary sibling of `target` that becomes `target` on success."""

    def __init__(self, target: Path, marker: str = META_FILE) -> None:
        self.target = target.absolute()
        if self.target.is_symlink():  # write where the link points (e.g. a bigger disk)
            self.target = self.target.resolve()
        check_target(self.target, marker)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        recover_stale_siblings(self.target)
        name = f".{self.target.name}.tmp-{os.getpid()}-"
        self.folder = Path(tempfile.mkdtemp(prefix=name, dir=self.target.parent))
        self.folder.chmod(0o755)  # mkdtemp makes it private; the outputs are ordinary data
        return self.folder

    def commit(self) -> None:
        swap_into_place(self.folder, self.target)

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)  # gone already after a commit


def clear_stale_work(work_dir: Path) -> None:
    """Delete what killed prepares on this machine left in `work_dir` (their key files and
    tokenizer samples); runs of other machines sharing the folder are left alone."""
    pattern = re.compile(rf"^run-{re.escape(socket.gethostname())}-(\d+)$")
    for item in sorted(work_dir.iterdir()) if work_dir.is_dir() else []:
        found = pattern.match(item.name)
        if found and not pid_alive(int(found.group(1))):
            shutil.rmtree(item, ignore_errors=True)


def keep_only_logs(work_root: Path) -> None:
    """After a failure: delete the scratch data, keep executor logs (if any) for the user."""
    for source in work_root.iterdir() if work_root.is_dir() else []:
        for item in source.iterdir():
            if item.name != "logs":
                shutil.rmtree(item, ignore_errors=True)
        if not any(source.iterdir()):
            source.rmdir()
    if work_root.is_dir() and not any(work_root.iterdir()):
        work_root.rmdir()
        if not any(work_root.parent.iterdir()):
            work_root.parent.rmdir()
