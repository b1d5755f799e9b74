"""Replace the prepared folder all at once: a run that dies midway leaves the old outputs.

The new outputs are written into a temporary sibling `.<name>.tmp-<pid>-...`, then swapped in
by rename; the old folder is set aside as `.<name>.old-<pid>-...` for that moment and deleted
after. What a killed run leaves behind is cleared (or put back) by the next run.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

from pipeline.data.prepared import META_FILE
from pipeline.errors import DataError


def check_target(target: Path, marker: str = META_FILE) -> None:
    """Refuse to replace anything that is not earlier prepared data (e.g. `data/` itself)."""
    if target.exists() and not target.is_dir():
        raise DataError(f"data.prepared_dir: {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise DataError(
            f"{target} holds files but no {marker}; refusing to replace a folder that is not "
            "prepared data (empty it or choose another data.prepared_dir / data.tokenizer_dir)"
        )


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with this id is running (ours counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_siblings(target: Path) -> None:
    """Clear what a killed prepare left beside `target`: its temporary folder is deleted, and
    a previous output set aside for the swap is put back if the new one never arrived."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-")
    for sibling in sorted(target.parent.iterdir()):
        found = pattern.match(sibling.name)
        if found is None or pid_alive(int(found.group(2))):
            continue
        if found.group(1) == "old" and not target.exists():
            os.rename(sibling, target)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


def swap_into_place(new: Path, target: Path) -> None:
    """Rename `new` to `target`, setting the old `target` aside first and deleting it after.

    Between the two renames `target` is briefly absent; a run killed right there leaves the
    old outputs beside it, and the next run's `recover_stale_siblings` puts them back.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old)
