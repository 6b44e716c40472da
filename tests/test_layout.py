"""The package's shape: the library never imports the CLI, no module imports itself back, and no
two packages import each other (dependencies point down).

Every ``import`` in ``cai/`` counts, those inside functions too (a late import that dodges a
cycle is still a cycle).
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "cai"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The cai modules ``name`` imports (``from .x import y`` counts ``.x``, or ``.x.y`` when
    ``y`` is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cai")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cai":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found.update(subs or {target})
    return (found & known) - {name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_graph_is_read() -> None:
    g = graph()
    assert "cai.pipeline" in g and "cai.stages.runner" in g["cai.pipeline"]
    assert "cai.cli.app" in g["cai.cli.revise"]


def test_library_never_imports_the_cli() -> None:
    bad = sorted((a, b) for a, bs in graph().items() if not a.startswith("cai.cli")
                 for b in bs if b == "cai.cli" or b.startswith("cai.cli."))
    assert not bad, f"library modules import the CLI: {bad}"


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def package_of(module: str) -> str:
    """A module's node in the package graph: its subpackage (``cai.report.html`` -> ``cai.report``);
    a top-level module ``cai/x.py`` is its own node (``cai.x``), and ``cai/__init__.py`` is ``cai``."""
    return ".".join(module.split(".")[:2])


def package_graph(g: dict[str, set[str]]) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    """Edges A -> B when a module of A imports a module of B, with the imports behind each edge."""
    pg: dict[str, set[str]] = {}
    why: dict[tuple[str, str], list[str]] = {}
    for a, bs in g.items():
        for b in bs:
            pa, pb = package_of(a), package_of(b)
            if pa != pb:
                pg.setdefault(pa, set()).add(pb)
                why.setdefault((pa, pb), []).append(f"{a} imports {b}")
    return pg, why


def test_no_cycles_between_packages() -> None:
    pg, why = package_graph(graph())
    cycle = find_cycle(pg)
    if cycle is not None:
        steps = "; ".join(f"{a} -> {b} ({', '.join(sorted(why[a, b]))})" for a, b in pairwise(cycle))
        pytest.fail(f"packages import each other: {' -> '.join(cycle)}. {steps}. Move the shared code "
                    "down into a module both can import (as cai.stats and cai.analysis are), or pass it in.")


def test_package_graph_of_modules() -> None:
    pg, why = package_graph({"cai.report.html": {"cai.analysis", "cai.report.svg"}, "cai.analysis": {"cai.stats"},
                             "cai.stages.label": {"cai.stats"}, "cai.stats": set()})
    assert pg == {"cai.report": {"cai.analysis"}, "cai.analysis": {"cai.stats"}, "cai.stages": {"cai.stats"}}
    assert why["cai.report", "cai.analysis"] == ["cai.report.html imports cai.analysis"]
    assert find_cycle(pg) is None
    assert find_cycle(package_graph({"cai.a.x": {"cai.b.y"}, "cai.b.z": {"cai.a.w"}})[0]) == \
        ["cai.a", "cai.b", "cai.a"]


@pytest.mark.parametrize(("g", "cycle"), [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_the_cycle_finder_finds_cycles(g: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(g) == cycle
