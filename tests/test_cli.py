"""Fast tests of the ``ce-fast`` command line (tiny arrays; the numbers are not judged,
only their presence, their sign and the losses' agreement)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import ce_fast
from ce_fast import cli

TINY = ["--sizes", "64x1000", "--repeat", "1", "--slow", "1e9", "-q"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One tiny run with both dtypes, every op and both baselines, read back from --json."""
    d = tmp_path_factory.mktemp("bench")
    path, md = d / "r.json", d / "r.md"
    rc = cli.main(["bench", *TINY, "--dtype", "float32,bfloat16", "--json", str(path), "--markdown", str(md)])
    assert rc == 0
    with open(path) as f:
        data = json.load(f)
    data["_markdown"] = md.read_text()
    return data


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ----------------------------------------------------------------- parsing and exit codes


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--sizes", "--dtype", "--threads", "--repeat", "--json", "--no-torch", "--no-numpy", "--device"):
        assert opt in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "--bogus"],
        ["bench", "--sizes", "12y34"],
        ["bench", "--sizes", "64"],
        ["bench", "--sizes", "0x10"],
        ["bench", "--dtype", "int8"],
        ["bench", "--repeat", "0"],
        ["bench", "--threads", "-1"],
        ["bench", "--ops", "sideways"],
        ["bench", "--device", "tpu"],
        ["frobnicate"],
    ],
)
def test_bad_options_exit_2(args, capsys):
    assert cli.main(args) == 2
    assert "error" in capsys.readouterr().err


def test_cuda_not_implemented(capsys):
    assert cli.main(["bench", "--device", "cuda", *TINY]) == 3
    assert "not implemented" in capsys.readouterr().err


def test_python_dash_m_exit_codes():
    env = dict(os.environ)
    ok = subprocess.run([sys.executable, "-m", "ce_fast", "bench", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "--sizes" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "ce_fast", "bench", "--repeat", "x"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2 and "--repeat" in bad.stderr


def test_parse_lists():
    assert cli._parse_sizes("4096x128256, 2x8x1000") == [(4096, 128256), (2, 8, 1000)]
    assert cli._parse_list(cli._DTYPE_ALIASES, "dtype")("bf16,f32,float32") == ["bfloat16", "float32"]
    assert cli._parse_list(cli._OP_ALIASES, "op")("inplace,fwd") == ["fwd+bwd in-place", "fwd"]


# ----------------------------------------------------------------- the JSON results


def test_json_keys_and_positive_numbers(results):
    assert results["schema"] == cli.SCHEMA
    m = results["machine"]
    for k in ("cpu_model", "cores", "numpy", "torch", "date", "simd", "ce_fast_threads", "peak_memory_method"):
        assert m.get(k), k
    assert results["config"]["repeat"] == 1
    assert [(c["shape"], c["dtype"]) for c in results["cases"]] == [([64, 1000], "float32"), ([64, 1000], "bfloat16")]
    for c in results["cases"]:
        assert c["bytes"] == 64 * 1000 * (4 if c["dtype"] == "float32" else 2)
        assert _positive(c["yardsticks"]["read"]["gbps"]) and _positive(c["yardsticks"]["copy"]["gbps"])
        assert set(c["ops"]) == set(cli.OPS)
        for op, rec in c["ops"].items():
            for impl in ("ce_fast", "numpy", "torch"):
                t = rec[impl]
                assert len(t["times_s"]) == 1 and all(_positive(x) for x in t["times_s"])
                assert _positive(t["best_s"]) and _positive(t["median_s"]) and _positive(t["gbps"])
                assert t["bytes"] == c["bytes"] * (1 if op == "fwd" else 2)
            for k in ("gbps", "share_of_read", "speedup_numpy", "speedup_torch"):
                assert _positive(rec[k]), (op, k)
            assert rec["peak_rss_bytes"] is None or rec["peak_rss_bytes"] >= 0
            assert rec["loss_ok"], rec["loss_rel_diff"]


def test_losses_agree_with_numpy(results):
    for c in results["cases"]:
        for rec in c["ops"].values():
            lc, ln = rec["loss"]["ce_fast"], rec["loss"]["numpy"]
            assert abs(lc - ln) <= 1e-5 * abs(ln)
            assert abs(lc - rec["loss"]["torch"]) <= cli.LOSS_RTOL_TORCH[c["dtype"]] * abs(ln)


def test_table_and_markdown(results):
    text = cli.format_table(results)
    for word in ("read pass", "fwd+bwd in-place", "vs NumPy", "vs torch", "AMD" if "AMD" in results["machine"]["cpu_model"] else ""):
        assert word in text
    md = results["_markdown"]
    assert md.startswith("# ce_fast benchmark results")
    assert "| size | dtype | op |" in md and "## Machine" in md and "ce-fast bench --sizes 64x1000" in md
    assert md.count("\n| 64x1000 |") == 2


def test_report_script_renders_json(results, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benches"))
    try:
        import report
    finally:
        sys.path.pop(0)
    src = tmp_path / "r.json"
    src.write_text(json.dumps({k: v for k, v in results.items() if k != "_markdown"}))
    out = tmp_path / "RESULTS.md"
    assert report.main([str(src), "-o", str(out)]) == 0
    assert "| fwd |" in out.read_text()


# ----------------------------------------------------------------- options


def test_no_baselines_threads_and_3d(tmp_path, capsys):
    path = tmp_path / "r.json"
    prev = ce_fast.get_threads()
    rc = cli.main(["bench", "--sizes", "2x16x300", "--dtype", "f32", "--ops", "fwd,inplace", "--threads", "1",
                   "--no-torch", "--no-numpy", "--no-copy", "--repeat", "2", "-q", "--json", str(path)])
    assert rc == 0
    assert ce_fast.get_threads() == prev  # the thread setting is restored
    data = json.loads(path.read_text())
    assert data["machine"]["ce_fast_threads"] == 1
    (c,) = data["cases"]
    assert c["shape"] == [2, 16, 300] and c["rows"] == 32
    assert list(c["ops"]) == ["fwd", "fwd+bwd in-place"] and "copy" not in c["yardsticks"]
    for rec in c["ops"].values():
        assert rec["numpy"] is None and rec["torch"] is None
        assert rec["speedup_numpy"] is None and rec["speedup_torch"] is None
        assert len(rec["ce_fast"]["times_s"]) == 2
    assert "fwd+bwd in-place" in capsys.readouterr().out


# ----------------------------------------------------------------- building blocks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_numpy_baseline_matches_ce_fast(dtype):
    z, y = cli.make_logits((64, 1000), dtype, seed=3)
    ref = float(ce_fast.cross_entropy(z, y))
    assert abs(cli.numpy_forward(z, y) - ref) <= 1e-5 * abs(ref)
    loss, grad = cli.numpy_forward_backward(z, y)
    assert abs(loss - ref) <= 1e-5 * abs(ref)
    _, g = ce_fast.cross_entropy_and_grad(z, y)
    assert grad.dtype == z.dtype
    tol = 1e-7 if dtype == "float32" else 1e-3 / 64
    np.testing.assert_allclose(grad.astype(np.float64), np.asarray(g).astype(np.float64), atol=tol)


def test_timer_single_run_for_slow_baselines():
    timer = cli.Timer(lambda: None, cli._NoMemory())
    calls = []
    t, first = timer.time(lambda: calls.append(1) or len(calls), repeat=3, warmup=1, slow_s=0.0)
    assert t.single_run and len(t.times_s) == 1 and first == 1 and len(calls) == 1
    calls.clear()
    t, _ = timer.time(lambda: calls.append(1), repeat=3, warmup=1, setup=lambda: calls.append(0))
    assert not t.single_run and len(t.times_s) == 3 and calls == [0, 1] * 4


def test_peak_memory_sees_a_large_allocation():
    pm = cli.PeakMemory()
    pm.reset()
    a = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched (above glibc's mmap threshold)
    grown = pm.peak_growth()
    del a
    if pm.method == "vmhwm":
        assert grown >= 60 << 20
    elif pm.method == "ru_maxrss":
        assert grown >= 0  # a lower bound only
