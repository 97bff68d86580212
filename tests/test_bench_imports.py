"""How the benchmark code is wired: ``ce_fast.bench`` and ``ce_fast.cli`` import without
the CUDA backend or CuPy, core modules never import the bench, the bench never
imports the command line, and there is no import cycle between them."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "python" / "ce_fast"

PROBE = """
import json, sys
for name in sys.argv[1:]:
    __import__(name)
watch = ("cupy", "cupyx", "cuda", "ce_fast.bench.cuda", "ce_fast._engines.cuda", "ce_fast.cli")
print(json.dumps({m: m in sys.modules for m in watch}))
"""


def _fresh_import(*modules: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


@pytest.mark.parametrize("modules", [["ce_fast.bench"], ["ce_fast.cli"], ["ce_fast.bench.cuda"]])
def test_fresh_import_loads_no_cuda(modules):
    loaded = _fresh_import(*modules)
    for m in ("cupy", "cupyx", "cuda", "ce_fast._engines.cuda"):
        assert not loaded[m], f"importing {modules} imported {m}"
    if modules != ["ce_fast.bench.cuda"]:
        assert not loaded["ce_fast.bench.cuda"]
    if modules != ["ce_fast.cli"]:
        assert not loaded["ce_fast.cli"], "the bench imported the command line"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split("."))
    base = PKG.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: pathlib.Path) -> set:
    """Every ce_fast module ``path`` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")}
    return {m for m in out if m == "ce_fast" or m.startswith("ce_fast.")}


GRAPH = {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}
BENCH = {m for m in GRAPH if m == "ce_fast.bench" or m.startswith("ce_fast.bench.")}


def test_graph_sees_the_bench():
    assert {"ce_fast.bench", "ce_fast.bench.cpu", "ce_fast.bench.cuda", "ce_fast.cli"} <= set(GRAPH)
    assert "ce_fast.bench" in GRAPH["ce_fast.cli"]
    assert "ce_fast.bench.timing" in GRAPH["ce_fast.bench.cuda"]


def test_core_modules_never_import_the_bench():
    for mod, deps in GRAPH.items():
        if mod in BENCH or mod in ("ce_fast.cli", "ce_fast.__main__"):
            continue
        assert not deps & (BENCH | {"ce_fast.cli"}), f"{mod} imports {sorted(deps & (BENCH | {'ce_fast.cli'}))}"


def test_bench_never_imports_cli():
    for mod in BENCH:
        assert "ce_fast.cli" not in GRAPH[mod], f"{mod} imports ce_fast.cli"


def test_no_cycle_between_cli_and_bench():
    nodes = BENCH | {"ce_fast.cli"}
    edges = {m: GRAPH[m] & nodes for m in nodes}
    state: dict = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = [*path[path.index(d) :], d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(nodes):
        if m not in state:
            visit(m, [m])
