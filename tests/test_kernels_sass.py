"""What the GPU kernels compile to, checked without a GPU: NVRTC builds the engine's
kernel source (as tests/test_kernels_compile.py does) to cubins for sm_80 and sm_90,
``cuobjdump -sass`` (pip: nvidia-cuda-cuobjdump, with nvdisasm from
nvidia-cuda-nvdisasm or triton's copy) disassembles them, and the machine code is
checked for what the design relies on:

- the gradient of every fused kernel is written with 16-byte stores (STG.E.128),
- no kernel spills to local memory (no STL / LDL),
- bf16 gradients are rounded by the paired conversion instruction (F2FP.BF16), not
  integer arithmetic.

Like the compile test, this one fails (it is not skipped) when the tools are missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from ce_fast._engines import cuda as _cuda

from test_kernels_compile import compile_all, compile_module

ARCHS = ["sm_80", "sm_90"]


def _tool(name: str, env: str | None = None) -> str | None:
    """A CUDA binary utility from $env, PATH, the nvidia-* pip wheels or triton's copy."""
    if env and os.environ.get(env):
        cand = Path(os.environ[env])
        cand = cand / name if cand.is_dir() else cand
        if cand.exists():
            return str(cand)
    found = shutil.which(name)
    if found:
        return found
    for base in map(Path, sys.path):
        for sub in (
            "nvidia/cu13/bin",
            "nvidia/cuda_nvdisasm/bin",
            "nvidia/cuda_cuobjdump/bin",
            "triton/backends/nvidia/bin",
        ):
            cand = base / sub / name
            if cand.exists():
                return str(cand)
    return None


def _sass(cubin: bytes) -> dict[str, Counter]:
    """{mangled kernel name: Counter of memory, conversion and call opcodes} of a cubin."""
    cuobjdump = _tool("cuobjdump")
    nvdisasm = _tool("nvdisasm", "NVDISASM_PATH")
    if cuobjdump is None or nvdisasm is None:
        pytest.fail(
            "cuobjdump and nvdisasm are needed to read the kernels' SASS: pip install "
            f"nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm (found cuobjdump={cuobjdump}, nvdisasm={nvdisasm})"
        )
    env = dict(os.environ, NVDISASM_PATH=str(Path(nvdisasm).parent))
    env["PATH"] = str(Path(nvdisasm).parent) + os.pathsep + env.get("PATH", "")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ce.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    out: dict[str, Counter] = {}
    cur: Counter | None = None
    for line in res.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), Counter())
            continue
        if cur is not None:
            for op in re.findall(r"\b((?:STG|LDG|STL|LDL|F2FP|CALL)(?:\.[\w]+)*)", line):
                cur[op] += 1
    assert out, f"no functions in the SASS listing:\n{res.stdout[:2000]}{res.stderr[:2000]}"
    return out


@pytest.fixture(scope="module", params=ARCHS)
def sass(request):
    """(arch, SASS opcode counts of every row kernel) for one arch: the cubins of the
    compile test (tests/test_kernels_compile.py, cached for the session), disassembled."""
    kernels = {}
    for key, names, (_result, log, lowered, cubin) in compile_all(request.param):
        if key == "targets":
            continue
        assert cubin, (key, log)
        ops = _sass(cubin)
        kernels.update({n: ops.get(lowered[n], Counter()) for n in names})
    return request.param, kernels


def test_fused_kernels_store_16_bytes_at_a_time(sass):
    arch, kernels = sass
    fused = {n: c for n, c in kernels.items() if n.startswith(("ce_fused<", "ce_fused1<"))}
    if arch == "sm_90":  # the cluster kernels exist from sm_90 on
        fused.update({n: c for n, c in kernels.items() if n.startswith("ce_fused1c<")})
    # Per logit type: one two-pass kernel per soft-target type, the plain call's, two one-read.
    assert len(fused) == 3 * (5 + 1) + 3 * 2 + (3 * 2 * len(_cuda.CLUSTERS) if arch == "sm_90" else 0)
    for name, ops in fused.items():
        assert ops["STG.E.128"] >= 2, (name, dict(ops))  # the zero rows and the gradient vectors


def test_one_read_kernels_read_the_row_once(sass):
    """The kept row is loaded with 16-byte loads, each of the KEEP vectors once: no
    16-byte load is left for the gradient pass to read the row again."""
    arch, kernels = sass
    for name, ops in kernels.items():
        if name.startswith("ce_fused1<") or (arch == "sm_90" and name.startswith("ce_fused1c<")):
            assert ops["LDG.E.128"] == _cuda.KEEP["true>" in name], (name, dict(ops))


def test_no_local_memory_spills(sass):
    for name, ops in sass[1].items():
        spills = {op: n for op, n in ops.items() if op.startswith(("STL", "LDL"))}
        assert not spills, (name, spills)


def test_bf16_gradients_use_the_paired_conversion(sass):
    arch, kernels = sass
    prefixes = ("ce_fused<ce_bf16", "ce_fused1<ce_bf16") + (("ce_fused1c<ce_bf16",) if arch == "sm_90" else ())
    for name, ops in kernels.items():
        if name.startswith(prefixes):
            assert any(op.startswith("F2FP.BF16") for op in ops), (name, dict(ops))


def test_the_listing_reads_what_it_claims():
    """The opcode reader sees 128-bit loads in the read pass (it is not vacuously green)."""
    result, log, lowered, cubin = compile_module(_cuda.source(), [_cuda.READ_PASS], "sm_90")
    ops = _sass(cubin)[lowered[_cuda.READ_PASS]]
    assert ops["LDG.E.128"] >= 1 and ops["STG.E.128"] == 0, dict(ops)
