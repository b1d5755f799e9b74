"""The code a DVC stage runs, found statically: the import closure of its `stages/*.py` script.

Parsed with `ast`, never imported, so it is fast and sees imports inside functions too (a lazy
import is still code the stage may run). Rules, the ones tests/test_stage_deps.py enforces:

- `import pipeline.a.b`, `from pipeline.a import b` and relative imports count, and importing
  a module also runs every `__init__.py` of the packages above it.
- A string `"pipeline.a.b:attr"` counts as an import: the project's lazy registries (e.g. the
  distributed strategies) name modules that way. The one exception is the `gpt3` command
  group's registry in `pipeline/cli/__init__.py`: only the `gpt3` entry point reads it; a stage
  runs its one command through `run_command`, never the group.
- Only modules under `pipeline/` are followed; the standard library and third-party packages
  are not the project's code.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

DYNAMIC_IMPORT = re.compile(r"^pipeline(\.\w+)+:\w+$")
COMMAND_GROUP = Path("pipeline/cli/__init__.py")


def _module_file(root: Path, dotted: str) -> Path | None:
    """`pipeline.a.b` -> pipeline/a/b.py or pipeline/a/b/__init__.py (relative), if it exists."""
    base = Path(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (root / candidate).is_file():
            return candidate
    return None


def _package_parts(module: Path) -> list[str]:
    """The dotted package a module file belongs to, as parts (its own package for __init__)."""
    parts = list(module.with_suffix("").parts)
    return parts[:-1]


def _imported_names(root: Path, module: Path) -> set[str]:
    """Dotted names `module` imports (each `from X import y` yields X and X.y)."""
    tree = ast.parse((root / module).read_text(), filename=str(module))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_parts(module)
                base = package[: len(package) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and DYNAMIC_IMPORT.match(node.value)
            and module != COMMAND_GROUP
        ):
            names.add(node.value.split(":")[0])
    return names


def import_closure(root: Path, entry: Path) -> set[Path]:
    """Every file (relative to `root`) that running `entry` may execute, `entry` included."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in _imported_names(root, module):
            parts = name.split(".")
            if parts[0] != "pipeline":
                continue
            for depth in range(1, len(parts) + 1):  # the packages above run their __init__
                found = _module_file(root, ".".join(parts[:depth]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def python_files(root: Path, folder: Path) -> set[Path]:
    """The .py files under `folder`, recursively, relative to `root`."""
    return {path.relative_to(root) for path in (root / folder).rglob("*.py")}


def path_literals(root: Path, modules: set[Path]) -> set[Path]:
    """String constants in `modules` that are, whole, the path of a file in `root` (docstrings
    excluded): the fixed files the code reads by name."""
    found: set[Path] = set()
    for module in modules:
        tree = ast.parse((root / module).read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and "/" in node.value
                and "\n" not in node.value
                and not node.value.startswith(("/", ".."))  # system files are not the project's
                and (root / node.value).is_file()
            ):
                found.add(Path(node.value))
    return found
