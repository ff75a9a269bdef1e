"""The house stays one-way: imports only run down the floors, with no circles, and no function grows
past 60 lines (read from the code's own syntax trees, imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"protos": 0, "quant": 1, "workers": 2, "orchestrator": 3, "bench": 4}  # a package may import lower floors
GENERATED = ("_pb2.py", "_pb2_grpc.py")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in FLOORS:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            if p.name.endswith(GENERATED):
                continue
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The edgeweave modules `mod` imports, anywhere in the file (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names += [target] + [f"{target}.{a.name}" for a in node.names]
    out = set()
    for n in names:
        if n.split(".")[0] not in FLOORS:
            continue
        while n not in known and "." in n:
            n = n.rsplit(".", 1)[0]
        if n in known and n != mod:
            out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def test_the_graph_is_read():
    """The checks below see the real code: the controller imports the planner, a worker its shard."""
    g = _graph()
    assert "orchestrator.planner" in g["orchestrator.controller"]
    assert "workers.shard" in g["workers.server"] and "quant.manifest" in g["orchestrator.planner"]


def test_no_import_runs_up_a_floor():
    up = sorted(f"{m} -> {t}" for m, ts in _graph().items() for t in ts
                if FLOORS[t.split(".")[0]] > FLOORS[m.split(".")[0]])
    assert not up, "imports from a lower package to a higher one (protos <- quant <- workers <- orchestrator <- bench): " + ", ".join(up)


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("pkg", ["protos", "quant", "workers", "orchestrator"])
def test_no_function_over_60_lines(pkg):
    long = []
    for p in sorted((ROOT / pkg).rglob("*.py")):
        if p.name.endswith(GENERATED):
            continue
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(long)


def test_every_package_says_what_it_is():
    for pkg in ("protos", "quant", "workers", "orchestrator"):
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text()))
        assert doc and "runtime issue" not in doc, pkg
