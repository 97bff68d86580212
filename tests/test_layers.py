"""The package reads one way: no import cycles between ce_fast's modules (imports
inside functions included), and every module imports alone in a fresh interpreter."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import ce_fast

PKG = pathlib.Path(ce_fast.__file__).resolve().parent


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """ce_fast modules that `name` imports anywhere in its source (absolute or relative)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    # `from . import _x` names the package too; the top package only re-exports, so an
    # edge to it is not a layer's dependency.
    return {m: _imports(m, p, known) - {"ce_fast"} for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) >= 10
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_do_not_import_upper_ones():
    graph = _graph()
    upper = {"ce_fast._api", "ce_fast.torch", "ce_fast.cli"}
    for low in ("ce_fast._arrays", "ce_fast._types", "ce_fast._errors", "ce_fast._spec", "ce_fast._rules"):
        if low in graph:
            assert not graph[low] & upper, f"{low} imports {graph[low] & upper}"
    engines = [m for m in graph if m.startswith("ce_fast._engines")]
    assert engines
    for e in engines:
        assert "ce_fast._batch" not in graph[e] and "ce_fast._rules" not in graph[e], (e, graph[e])


@pytest.mark.parametrize("name", sorted(m for m in _modules() if not m.startswith("ce_fast.bench.cuda")))
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
