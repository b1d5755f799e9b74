"""The model folder's checksum manifest: the list of its files and their SHA-256.

`<model>/checksums.sha256`, in `sha256sum -c` format, lists every file of an exported model
folder but `tracking.json`. It is written last by `save_model_dir` and checked by
`load_model_dir`, so a flipped byte in `model.safetensors` or an edited `config.yaml` is
refused instead of evaluated, served or exported with altered weights. It also tells a model
folder this pipeline wrote from any other folder at that path, which is never deleted (see
`pipeline.model_artifact`).

The manifest proves integrity (nothing changed since it was written), not origin: whoever can
write the folder can rewrite the manifest. A model folder holds no pickles, so a forged one
can carry wrong weights but no code (the MLflow pyfunc route is the exception, see README).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import CheckpointError
from pipeline.hashing import file_sha256

MANIFEST = "checksums.sha256"
TRACKING_FILE = "tracking.json"
"""Written after the manifest, when the MLflow run ends: which run the model belongs to, not
what it computes, so it is the one file the manifest does not cover (users may write it)."""


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, TRACKING_FILE)
    )


def write_manifest(folder: Path) -> Path:
    """List every file of `folder` with its SHA-256 (replacing any earlier manifest)."""
    lines = "".join(f"{file_sha256(folder / name)}  {name}\n" for name in _files(folder))
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(lines, encoding="ascii")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def manifest_problem(folder: Path) -> str | None:
    """What is wrong with `folder` against its manifest; None when every file matches."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder} has no {MANIFEST}, so its files cannot be verified"
    listed: dict[str, str] = {}
    for line in manifest.read_text(encoding="ascii", errors="replace").splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            return f"{manifest} is malformed"
        listed[name] = digest
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing (listed in {MANIFEST})"
        if file_sha256(path) != digest:
            return f"{path} is corrupt or was modified: its SHA-256 does not match {MANIFEST}"
    unlisted = sorted(set(_files(folder)) - set(listed))
    if unlisted:
        return f"{folder} holds files its {MANIFEST} does not list: {', '.join(unlisted)}"
    return None


def verify_model_files(folder: Path) -> None:
    """Raise a one-line CheckpointError unless every file of `folder` matches its manifest."""
    problem = manifest_problem(folder)
    if problem is not None:
        raise CheckpointError(f"refusing model folder: {problem}")
