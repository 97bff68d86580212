"""Choosing the kernel set: CE_FAST_SIMD at import and _core.set_simd accept exactly
'scalar', 'auto', 'avx2' and 'avx512' (any case), refuse anything else with a ValueError
that says what is accepted, refuse a set the CPU lacks (naming what it needs), and
simd_level() reports what runs; simd_available() lists the sets this CPU runs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import ce_fast
from ce_fast import _core

from conftest import SIMD_SETS, simd_sets, use_simd

ACCEPTED = "'scalar', 'auto', 'avx2' or 'avx512' (any case)"
NEEDS = {"avx2": "AVX2, FMA and F16C", "avx512": "AVX-512 F, BW, VL and DQ"}

# Imports ce_fast, makes a real call and prints the level and the loss.
SCRIPT = """
import numpy as np, ce_fast
from ce_fast import _core
z = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
print(_core.simd_level(), repr(float(ce_fast.cross_entropy(z, np.array([0, 3, 1])))))
"""


def _best() -> str:
    with use_simd("auto") as level:
        return level


def _lacks(name: str) -> str:
    return f"='{name}' needs a CPU with {NEEDS[name]}, which this one lacks; use 'auto' (here: '{_best()}')"


def _python(simd):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ce_fast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("CE_FAST_SIMD", None)
    if simd is not None:
        env["CE_FAST_SIMD"] = simd
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)


def _loss():
    z = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    return float(ce_fast.cross_entropy(z, np.array([0, 3, 1])))


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return None


def test_available_sets_follow_the_cpu_flags():
    flags = _cpu_flags()
    if flags is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("no x86 /proc/cpuinfo flags to compare with")
    want = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        want.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            want.append("avx512")
    assert simd_sets() == want
    assert _best() == want[-1]
    assert set(_core.cpu_features()) <= flags | {"avx512bf16"}
    assert ("avx512bf16" in _core.cpu_features()) == ("avx512_bf16" in flags)


@pytest.mark.parametrize("value", ["garbage", "avx-512", "avx512f", "sse2", "scalar ", "none", "1"])
def test_unknown_env_value_fails_the_import(value):
    got = _python(value)
    assert got.returncode != 0
    last = got.stderr.strip().splitlines()[-1]
    assert last == f"ValueError: CE_FAST_SIMD must be {ACCEPTED}, got '{value}'", got.stderr


@pytest.mark.parametrize("value", ["scalar", "SCALAR", "Scalar", "auto", "AUTO", "", None])
def test_accepted_env_values(value):
    got = _python(value)
    assert got.returncode == 0, got.stderr
    level, loss = got.stdout.split()
    assert level == ("scalar" if value and value.lower() == "scalar" else _best())
    with use_simd(level):
        assert float(loss) == _loss()  # the same kernels give the same bits


@pytest.mark.parametrize("value", ["avx2", "AVX2", "Avx2", "avx512", "AVX512", "Avx512"])
def test_env_forces_a_set(value):
    name = value.lower()
    got = _python(value)
    if name in simd_sets():
        assert got.returncode == 0, got.stderr
        level, loss = got.stdout.split()
        assert level == name
        with use_simd(name):
            assert float(loss) == _loss()
    else:  # asked for explicitly, so not silently replaced by another set
        assert got.returncode != 0
        assert got.stderr.strip().splitlines()[-1] == f"ValueError: CE_FAST_SIMD{_lacks(name)}"


@pytest.mark.parametrize("name", SIMD_SETS)
def test_set_simd_forces_each_set(name):
    for spelled in (name, name.upper(), name.capitalize()):
        _core.set_simd("scalar")
        if name in simd_sets():
            _core.set_simd(spelled)
            assert _core.simd_level() == name
        else:
            with pytest.raises(ValueError) as e:
                _core.set_simd(spelled)
            assert type(e.value) is ValueError
            assert str(e.value) == f"simd{_lacks(name)}"
            assert _core.simd_level() == "scalar"  # unchanged
    for spelled in ("auto", "Auto"):
        _core.set_simd(spelled)
        assert _core.simd_level() == _best() == simd_sets()[-1]


@pytest.mark.parametrize("name", ["garbage", "avx-512", "", "scalar "])
def test_set_simd_refuses_unknown_names(name):
    _core.set_simd("scalar")
    with pytest.raises(ValueError) as e:
        _core.set_simd(name)
    assert type(e.value) is ValueError
    assert str(e.value) == f"simd must be {ACCEPTED}, got '{name}'"
    assert _core.simd_level() == "scalar"  # a refused name changes nothing


def test_simd_path_fixture_covers_every_set(simd_path):
    # Runs once per set this CPU has; the others are skipped by the fixture with a reason.
    assert simd_path in SIMD_SETS
    assert _core.simd_level() == simd_path
    z = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    ref = np.log(np.exp(z.astype(np.float64)).sum(1)) - z[np.arange(3), [0, 3, 1]]
    np.testing.assert_allclose(ce_fast.cross_entropy(z, np.array([0, 3, 1]), reduction="none"), ref, rtol=1e-6)
