"""Running a bench and rendering its results: the entry points ``ce-fast bench`` uses.

Backends are found by device name: ``ce_fast.bench.cpu`` and ``ce_fast.bench.cuda``
each define ``BACKEND`` (the class) and ``LAYOUT`` (its table). A backend module is
imported on first use, so the CUDA one (and CuPy) only when ``--device cuda`` is
asked for or CUDA results are rendered.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import subprocess
import sys
from types import ModuleType
from typing import Any

import numpy as np

from .. import __version__
from .._engines import cpu as _cpu
from .base import Backend, say
from .config import SCHEMA, Config
from .report import Layout, Report
from .training import format_training, run_training

DEVICES = ("cpu", "cuda")


def backend_module(device: str) -> ModuleType:
    """The module that benches ``device`` (imported now if it was not yet)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    return importlib.import_module(f"{__package__}.{device}")


def layout_for(results: dict) -> Layout:
    """The table layout of the backend that produced ``results``."""
    return backend_module(results.get("config", {}).get("device", "cpu")).LAYOUT


def _git_commit() -> str | None:
    """The commit of the ce_fast checkout this package runs from; None for an installed
    package (site-packages may sit inside some other repository, e.g. pyenv's)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", package, *args], capture_output=True, text=True, timeout=5)
        except Exception:
            return None
        return (out.stdout.strip() or None) if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(os.path.join(top, "python", "ce_fast")) != os.path.realpath(package):
        return None
    return git("describe", "--always", "--dirty", "--abbrev=12")


def machine_info(backend: Backend, cfg: Config) -> dict:
    """What the results were measured on: CPU, memory, library versions, date, git
    commit, and the backend's own facts (:meth:`Backend.info`)."""
    cpu = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    if "model name" in fields:
        cpu = fields["model name"]
        if "cpu family" in fields and "model" in fields:
            # "AMD EPYC" alone does not tell Zen 1 (family 23) from Zen 3 (25) or Zen 5 (26)
            cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "ce_fast": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
    try:
        import ml_dtypes

        info["ml_dtypes"] = ml_dtypes.__version__
    except Exception:
        pass
    if cfg.torch:
        try:
            import torch

            info["torch"] = torch.__version__
            info["torch_threads"] = torch.get_num_threads()
        except ImportError:
            info["torch"] = None
    info.update(backend.info())
    return info


def run_bench(cfg: Config, quiet: bool = False, backend: Backend | None = None) -> dict:
    """Runs the benchmark described by ``cfg``; returns the JSON-ready results
    (``schema``, ``command``, ``machine``, ``config``, ``cases``).

    ``backend`` (default: the one for ``cfg.device``) is for tests that drive the bench
    loop with a stand-in device. Raises :class:`~ce_fast.bench.DeviceUnavailable` when
    the device cannot be benched here. The process's thread settings (ce_fast's and
    PyTorch's) are left as they were.
    """
    prev_threads = _cpu._threads
    prev_torch_threads = None
    try:
        if backend is None:
            backend = backend_module(cfg.device).BACKEND.from_config(cfg)
        torch_mod: Any = None
        if cfg.torch:
            try:
                import torch as torch_mod

                if cfg.threads is not None:
                    prev_torch_threads = torch_mod.get_num_threads()
                    torch_mod.set_num_threads(cfg.threads)
            except ImportError:
                say(quiet, "PyTorch is not installed: no PyTorch baseline")
                cfg.torch = False
        results: dict[str, Any] = {
            "schema": SCHEMA,
            "command": "ce-fast " + " ".join(cfg.argv),
            "machine": machine_info(backend, cfg),
            "config": cfg.to_json(),
            "cases": [],
        }
        for shape in cfg.sizes:
            for dtype in cfg.dtypes:
                results["cases"].append(backend.bench_case(shape, dtype, cfg, torch_mod, quiet))
        if cfg.training and cfg.device == "cpu" and cfg.torch:
            results["training"] = run_training(cfg.training, cfg.dtypes, seed=cfg.seed, quiet=quiet)
        return results
    finally:
        _cpu.set_threads(prev_threads)
        if prev_torch_threads is not None:
            sys.modules["torch"].set_num_threads(prev_torch_threads)


def build_report(results: dict) -> Report:
    """``results`` laid out by the table of the backend that produced them."""
    return Report.of(results, layout_for(results))


def format_table(results: dict) -> str:
    """The results as the terminal table (machine line, command, table, footnotes), and
    the training-step table when it was measured."""
    text = build_report(results).text()
    if results.get("training"):
        text += "\n\n" + format_training(results["training"])
    return text


def format_markdown(results: dict) -> str:
    """The results as Markdown (for benches/RESULTS.md)."""
    text = build_report(results).markdown()
    if results.get("training"):
        text += "\n" + format_training(results["training"], markdown=True)
    return text
