"""Choosing the kernel set: CE_FAST_SIMD at import and _core.set_simd accept exactly
'scalar', 'auto' and 'avx2' (any case), refuse anything else with a ValueError that says
what is accepted, refuse 'avx2' on a CPU without it, and simd_level() reports what runs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import ce_fast
from ce_fast import _core

from conftest import use_simd

ACCEPTED = "'scalar', 'auto' or 'avx2' (any case)"
NO_AVX2 = "needs a CPU with AVX2, FMA and F16C, which this one lacks; use 'auto' or 'scalar'"

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


@pytest.mark.parametrize("value", ["garbage", "avx512", "sse2", "scalar ", "none", "1"])
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
    with use_simd("scalar" if level == "scalar" else "auto"):
        assert float(loss) == _loss()  # the same kernels give the same bits


@pytest.mark.parametrize("value", ["avx2", "AVX2", "Avx2"])
def test_env_avx2(value):
    got = _python(value)
    if _best() == "avx2":
        assert got.returncode == 0, got.stderr
        assert got.stdout.split()[0] == "avx2"
    else:  # asked for explicitly, so not silently replaced by the scalar kernels
        assert got.returncode != 0
        assert got.stderr.strip().splitlines()[-1] == f"ValueError: CE_FAST_SIMD='avx2' {NO_AVX2}"


def test_set_simd_names():
    best = _best()
    for name in ("scalar", "SCALAR", "Scalar"):
        _core.set_simd(name)
        assert _core.simd_level() == "scalar"
    for name in ("auto", "Auto"):
        _core.set_simd(name)
        assert _core.simd_level() == best
    for name in ("avx2", "AVX2"):
        _core.set_simd("scalar")
        if best == "avx2":
            _core.set_simd(name)
            assert _core.simd_level() == "avx2"
        else:
            with pytest.raises(ValueError) as e:
                _core.set_simd(name)
            assert type(e.value) is ValueError
            assert str(e.value) == f"simd='avx2' {NO_AVX2}"
            assert _core.simd_level() == "scalar"  # unchanged


@pytest.mark.parametrize("name", ["garbage", "avx512", "", "scalar "])
def test_set_simd_refuses_unknown_names(name):
    _core.set_simd("scalar")
    with pytest.raises(ValueError) as e:
        _core.set_simd(name)
    assert type(e.value) is ValueError
    assert str(e.value) == f"simd must be {ACCEPTED}, got '{name}'"
    assert _core.simd_level() == "scalar"  # a refused name changes nothing
