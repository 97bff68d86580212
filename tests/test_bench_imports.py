"""How the benchmark code is wired: ``ce_fast.bench`` and ``ce_fast.cli`` import without
the CUDA backend or CuPy, core modules never import the bench, the bench never
imports the command line, and there is no import cycle between them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from import_graph import find_cycle, package_graph

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


GRAPH = package_graph()
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
    cycle = find_cycle({m: GRAPH[m] & nodes for m in nodes})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
