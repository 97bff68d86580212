"""The package reads one way: no import cycles between ce_fast's modules (imports
inside functions included), and every module imports alone in a fresh interpreter."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import ce_fast

from import_graph import find_cycle, modules, package_graph


def test_no_import_cycles():
    graph = package_graph()
    assert len(graph) >= 10
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_do_not_import_upper_ones():
    graph = package_graph()
    upper = {"ce_fast._api", "ce_fast.torch", "ce_fast.cli"}
    for low in ("ce_fast._arrays", "ce_fast._types", "ce_fast._errors", "ce_fast._spec", "ce_fast._rules"):
        if low in graph:
            assert not graph[low] & upper, f"{low} imports {graph[low] & upper}"
    engines = [m for m in graph if m.startswith("ce_fast._engines")]
    assert engines
    for e in engines:
        assert "ce_fast._batch" not in graph[e] and "ce_fast._rules" not in graph[e], (e, graph[e])


@pytest.mark.parametrize("name", sorted(m for m in modules() if not m.startswith("ce_fast.bench.cuda")))
def test_module_imports_alone(name):
    """Each module imports in a fresh interpreter (no hidden order dependence); the
    CUDA engine does not need CuPy to be imported."""
    code = f"import importlib, sys; importlib.import_module({name!r}); print('cupy' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False", f"importing {name} imported cupy"


def test_one_version_number():
    """The version is written once, in Cargo.toml; the package and the extension report it."""
    import re

    import tomllib

    from ce_fast import _core

    root = pathlib.Path(__file__).resolve().parent.parent  # the checkout (ce_fast may be installed)
    cargo = tomllib.loads((root / "Cargo.toml").read_text())["package"]["version"]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert ce_fast.__version__ == _core.__version__ == cargo
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", cargo)
