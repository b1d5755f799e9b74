"""The library's import graph: no circles, and the strategies never see the trainer.

Parsed with `ast`, never imported, so it is fast and sees every import: at module level, inside
functions (lazy ones) and under `if TYPE_CHECKING:`. A circle through any of them means two
modules that cannot be understood, tested or moved apart, so none is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "pipeline"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (any import statement anywhere)."""
    files = {_module_name(path, root): path for path in root.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from a import b` imports a, and a.b when b is a module
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                inside = target == root.name or target.startswith(f"{root.name}.")
                found = resolve(target) if inside else None
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_checker_finds_a_circle(tmp_path: Path) -> None:
    """The checker itself: a lazy import inside a function closes a circle, and it is found."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from pkg import a\n    return a\n")
    (package / "c.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import pkg.a\n")
    graph = import_graph(package)
    assert graph["pkg.c"] == {"pkg.a"}, "an import under TYPE_CHECKING counts too"
    assert cycles(graph) == [["pkg.a", "pkg.b"]], "c only imports a: it is in no circle"


@pytest.fixture(scope="module")
def pipeline_graph() -> dict[str, set[str]]:
    return import_graph()


def test_pipeline_has_no_import_circles(pipeline_graph: dict[str, set[str]]) -> None:
    circles = cycles(pipeline_graph)
    assert not circles, "import circles in pipeline/: " + "; ".join(map(" <-> ".join, circles))


def test_no_strategy_imports_the_trainer(pipeline_graph: dict[str, set[str]]) -> None:
    """Strategies get the model, optimizer and precision, never the loop that drives them."""
    graph = pipeline_graph
    loop = {"pipeline.training.trainer", "pipeline.training.nonfinite", "pipeline.training.run"}
    for module in graph:
        if module.startswith("pipeline.distributed."):
            assert not graph[module] & loop, f"{module} imports {graph[module] & loop}"


def test_the_kill_loop_is_not_part_of_the_library() -> None:
    assert not (PACKAGE / "chaos").exists() and not (PACKAGE / "chaos.py").exists()
    assert (REPO_ROOT / "bench" / "chaos_loop" / "__init__.py").is_file()
