"""Fast tests of the ``ce-fast`` command line (tiny arrays; the numbers are not judged,
only their presence, their sign and the losses' agreement)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import ce_fast
from ce_fast import bench, cli

TINY = ["--sizes", "64x1000", "--repeat", "1", "--slow", "1e9", "-q"]


def _bench_script(name: str):
    """A script of benches/ loaded by path (benches/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parent.parent / "benches" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benches_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
        ["bench", "--threads", "5000"],
        ["bench", "--ops", "sideways"],
        ["bench", "--device", "tpu"],
        ["frobnicate"],
    ],
)
def test_bad_options_exit_2(args, capsys):
    assert cli.main(args) == 2
    assert "error" in capsys.readouterr().err


def _gpu_available() -> bool:
    from ce_fast.bench import cuda as bench_cuda

    try:
        bench_cuda.probe()
        return True
    except bench.DeviceUnavailable:
        return False


def test_cuda_without_gpu_exits_with_a_message(capsys):
    if _gpu_available():
        pytest.skip("a CUDA device is available here (tests/test_cli.py::test_gpu_* run the bench)")
    assert cli.main(["bench", "--device", "cuda", *TINY]) == 3
    err = capsys.readouterr().err
    assert "--device cuda needs CuPy" in err and "Traceback" not in err


def test_cuda_without_gpu_python_dash_m():
    if _gpu_available():
        pytest.skip("a CUDA device is available here")
    r = subprocess.run(
        [sys.executable, "-m", "ce_fast", "bench", "--device", "cuda", "-q"], capture_output=True, text=True
    )
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.startswith("ce-fast: ce-fast bench --device cuda needs") and "Traceback" not in r.stderr


def test_python_dash_m_exit_codes():
    env = dict(os.environ)
    ok = subprocess.run([sys.executable, "-m", "ce_fast", "bench", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "--sizes" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "ce_fast", "bench", "--repeat", "x"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "--repeat" in bad.stderr


def test_parse_lists():
    assert bench.parse_sizes("4096x128256, 2x8x1000") == [(4096, 128256), (2, 8, 1000)]
    assert bench.parse_dtypes("bf16,f32,float32") == ["bfloat16", "float32"]
    assert bench.parse_ops("inplace,fwd") == ["fwd+bwd in-place", "fwd"]


# ----------------------------------------------------------------- the JSON results


def test_json_keys_and_positive_numbers(results):
    assert results["schema"] == bench.SCHEMA
    m = results["machine"]
    for k in ("cpu_model", "cores", "numpy", "torch", "date", "simd", "ce_fast_threads", "peak_memory_method"):
        assert m.get(k), k
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists() and "cpu family" in cpuinfo.read_text():
        assert re.search(r"\(family \d+, model \d+\)$", m["cpu_model"]), m["cpu_model"]  # tells Zen 1 from Zen 3
    # a commit only when running from a ce_fast checkout, never another repository's
    assert m["git_commit"] is None or re.fullmatch(r"[0-9a-f]{12}(-dirty)?", m["git_commit"])
    assert results["config"]["repeat"] == 1
    assert [(c["shape"], c["dtype"]) for c in results["cases"]] == [([64, 1000], "float32"), ([64, 1000], "bfloat16")]
    for c in results["cases"]:
        assert c["bytes"] == 64 * 1000 * (4 if c["dtype"] == "float32" else 2)
        assert _positive(c["yardsticks"]["read"]["gbps"]) and _positive(c["yardsticks"]["copy"]["gbps"])
        assert set(c["ops"]) == set(bench.OPS)
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
            assert abs(lc - rec["loss"]["torch"]) <= bench.LOSS_RTOL_TORCH[c["dtype"]] * abs(ln)


def test_table_and_markdown(results):
    text = bench.format_table(results)
    for word in (
        "read pass",
        "fwd+bwd in-place",
        "vs NumPy",
        "vs torch",
        "AMD" if "AMD" in results["machine"]["cpu_model"] else "",
    ):
        assert word in text
    md = results["_markdown"]
    assert md.startswith("# ce_fast benchmark results")
    assert "| size | dtype | op |" in md and "## Machine" in md and "ce-fast bench --sizes 64x1000" in md
    assert md.count("\n| 64x1000 |") == 2


def test_report_script_renders_json(results, tmp_path):
    report = _bench_script("report")
    src = tmp_path / "r.json"
    src.write_text(json.dumps({k: v for k, v in results.items() if k != "_markdown"}))
    out = tmp_path / "RESULTS.md"
    assert report.main([str(src), "-o", str(out)]) == 0
    assert "| fwd |" in out.read_text()


# ----------------------------------------------------------------- options


def test_no_baselines_threads_and_3d(tmp_path, capsys):
    path = tmp_path / "r.json"
    prev = ce_fast.get_threads()
    rc = cli.main(
        [
            "bench",
            "--sizes",
            "2x16x300",
            "--dtype",
            "f32",
            "--ops",
            "fwd,inplace",
            "--threads",
            "1",
            "--no-torch",
            "--no-numpy",
            "--no-copy",
            "--repeat",
            "2",
            "-q",
            "--json",
            str(path),
        ]
    )
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
    z, y = bench.make_logits((64, 1000), dtype, seed=3)
    ref = float(ce_fast.cross_entropy(z, y))
    assert abs(bench.numpy_forward(z, y) - ref) <= 1e-5 * abs(ref)
    loss, grad = bench.numpy_forward_backward(z, y)
    assert abs(loss - ref) <= 1e-5 * abs(ref)
    _, g = ce_fast.cross_entropy_and_grad(z, y)
    assert grad.dtype == z.dtype
    tol = 1e-7 if dtype == "float32" else 1e-3 / 64
    np.testing.assert_allclose(grad.astype(np.float64), np.asarray(g).astype(np.float64), atol=tol)


def test_timer_single_run_for_slow_baselines():
    timer = bench.Timer(lambda: None, bench.NoMemory())
    calls = []
    t, first = timer.time(lambda: calls.append(1) or len(calls), repeat=3, warmup=1, slow_s=0.0)
    assert t.single_run and len(t.times_s) == 1 and first == 1 and len(calls) == 1
    calls.clear()
    t, _ = timer.time(lambda: calls.append(1), repeat=3, warmup=1, setup=lambda: calls.append(0))
    assert not t.single_run and len(t.times_s) == 3 and calls == [0, 1] * 4


def test_peak_memory_sees_a_large_allocation():
    pm = bench.PeakMemory()
    pm.reset()
    a = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched (above glibc's mmap threshold)
    grown = pm.peak_growth()
    del a
    if pm.method == "vmhwm":
        assert grown >= 60 << 20
    elif pm.method == "ru_maxrss":
        assert grown >= 0  # a lower bound only


# ----------------------------------------------------------------- --device cuda without a GPU
#
# The CUDA backend's logic (defaults, case assembly, records, table, JSON, Markdown,
# OOM / compile-failure handling, the 64-row check) driven by a stand-in device: CPU
# torch tensors, a perf_counter "event" clock and a CPU read pass. Only the device
# calls themselves (CUDA events, the read-pass kernel, CuPy / torch CUDA allocation)
# are left to the @pytest.mark.gpu tests at the end.

import time  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402

from ce_fast.bench import cuda as bench_cuda  # noqa: E402


class _ClockEvent:
    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class _FakeOOM(RuntimeError):
    pass


class CpuTorchArrays(bench_cuda.TorchArrays):
    """TorchArrays on the CPU; ``oom_on`` names methods that raise an out-of-memory error."""

    def __init__(self, oom_on=()):
        super().__init__(torch, torch.device("cpu"))
        self.oom_on = set(oom_on)
        self.freed = 0

    def empty_like(self, a):
        if "empty_like" in self.oom_on:
            raise _FakeOOM("CUDA out of memory. Tried to allocate 16.00 GiB")
        return super().empty_like(a)

    def make_inputs(self, shape, dtype, seed):
        if "make_inputs" in self.oom_on:
            raise _FakeOOM("CUDA out of memory (fake)")
        return super().make_inputs(shape, dtype, seed)

    def event_pair(self):
        return _ClockEvent(), _ClockEvent()

    def elapsed_ms(self, start, end):
        return (end.t - start.t) * 1e3 + 1e-6  # never exactly 0

    def sync(self):
        pass

    def free(self):
        self.freed += 1


class FakeCudaBackend(bench_cuda.CudaBackend):
    """The CUDA backend with its device calls replaced (no probe, no CuPy)."""

    def __init__(self, compile_error=None, oom_on=()):
        self.ce, self.threads, self.cupy, self.torch, self.device_index = ce_fast, None, None, torch, 0
        self.arrays = CpuTorchArrays(oom_on)
        self.memory = bench.NoMemory()
        self.timer = bench_cuda.EventTimer(self.arrays, self.memory)
        self.compile_error = compile_error
        self.compiled = []

    def info(self):
        return {
            "device": "cuda:0",
            "gpu": "FakeGPU 9000",
            "gpu_memory_bytes": 80 << 30,
            "compute_capability": "9.0",
            "arrays": "torch",
            "cupy": "0.0",
            "peak_memory_method": self.memory.description,
        }

    def read_pass(self, a):
        return lambda: a.view(torch.int16).sum() if a.dtype == torch.bfloat16 else a.sum()

    def compile(self, fn, torch_mod):
        if self.compile_error:
            raise RuntimeError(self.compile_error)
        self.compiled.append(fn)
        return fn  # "compiled" = eager: same losses


def _cuda_cfg(*args):
    argv = ["bench", "--device", "cuda", *args]
    return cli._to_config(cli.build_parser().parse_args(argv), argv)


@pytest.fixture(scope="module")
def fake_cuda_results():
    cfg = _cuda_cfg("--sizes", "64x1000,2x8x300", "--dtype", "f32,bf16", "--repeat", "2", "--warmup", "1")
    return bench.run_bench(cfg, quiet=True, backend=FakeCudaBackend())


def test_gpu_defaults():
    cfg = _cuda_cfg()
    assert cfg.sizes == [(16384, 32000), (16384, 128256), (16384, 262144)]
    assert cfg.sizes == bench_cuda.default_sizes()
    assert cfg.dtypes == ["float32", "bfloat16"] and cfg.ops == list(bench.OPS)
    assert (cfg.repeat, cfg.warmup, cfg.compile, cfg.arrays) == (20, 3, True, None)
    cpu = cli._to_config(cli.build_parser().parse_args(["bench"]), ["bench"])
    assert cpu.sizes == bench.parse_sizes(bench.DEFAULT_SIZES) and (cpu.repeat, cpu.warmup) == (3, 1)
    own = _cuda_cfg("--sizes", "8x100", "--repeat", "4", "--warmup", "0", "--no-compile", "--arrays", "cupy")
    assert own.sizes == [(8, 100)] and (own.repeat, own.warmup, own.compile, own.arrays) == (4, 0, False, "cupy")


@pytest.mark.parametrize("args", [["--dtype", "float64"], ["--dtype", "f32,f64"]])
def test_gpu_rejects_float64(args, capsys):
    assert cli.main(["bench", "--device", "cuda", *args]) == 2
    assert "float64" in capsys.readouterr().err


def test_arrays_needs_cuda(capsys):
    assert cli.main(["bench", "--arrays", "torch", *TINY]) == 2
    assert "--arrays applies to --device cuda" in capsys.readouterr().err


def test_probe_messages(monkeypatch):
    def fake_cupy(count):
        def get_count():
            if isinstance(count, Exception):
                raise count
            return count

        runtime = types.SimpleNamespace(getDeviceCount=get_count)
        return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(RuntimeError("cudaErrorNoDevice: no CUDA-capable device")))
    with pytest.raises(bench.DeviceUnavailable, match="no usable CUDA device.*cudaErrorNoDevice"):
        bench_cuda.probe()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(0))
    with pytest.raises(bench.DeviceUnavailable, match="no CUDA device found"):
        bench_cuda.probe()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(1))
    lib, cp, t = bench_cuda.probe()
    if not torch.cuda.is_available():
        assert (lib, t) == ("cupy", None)
        with pytest.raises(bench.DeviceUnavailable, match="--arrays torch needs PyTorch"):
            bench_cuda.probe("torch")
    assert bench_cuda.probe("cupy")[0] == "cupy"
    monkeypatch.setitem(sys.modules, "cupy", None)  # import fails
    with pytest.raises(bench.DeviceUnavailable, match="CuPy is not installed"):
        bench_cuda.probe()


def test_is_oom():
    assert bench_cuda.is_oom(torch.cuda.OutOfMemoryError("x"), torch)
    assert bench_cuda.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not bench_cuda.is_oom(RuntimeError("illegal memory access"), torch)
    assert not bench_cuda.is_oom(ValueError("out of memory"))


def test_event_timer_median_warmup_and_setup():
    """Scripted event times: warm-up runs are dropped, the median / best are of the timed runs,
    setup runs before every call, the first result is kept and peak memory is read once."""
    script = iter([5.0, 9.0, 3.0, 1.0, 2.0, 4.0])  # ms: first (warm-up), warm-up, then 4 timed

    class Ev:
        def record(self):
            pass

        def synchronize(self):
            pass

    class Events:
        syncs = 0

        def event_pair(self):
            return Ev(), Ev()

        def elapsed_ms(self, a, b):
            return next(script)

        def sync(self):
            Events.syncs += 1

    class Mem:
        resets = peaks = 0

        def reset(self):
            Mem.resets += 1

        def peak_growth(self):
            Mem.peaks += 1
            return 123

    calls = []
    timer = bench_cuda.EventTimer(Events(), Mem())
    t, first = timer.time(
        lambda: calls.append("f") or len(calls),
        repeat=4,
        warmup=2,
        setup=lambda: calls.append("s"),
        keep=lambda r: r * 10,
    )
    assert t.times_s == pytest.approx([3e-3, 1e-3, 2e-3, 4e-3])
    assert t.median_s == pytest.approx(2.5e-3) and t.best_s == pytest.approx(1e-3)
    assert t.warmup == 2 and t.peak_rss_bytes == 123 and first == 20
    assert calls == ["s", "f"] * 6 and Mem.resets == Mem.peaks == 1
    script = iter([7.0, 8.0])
    t, _ = timer.time(lambda: None, repeat=2, warmup=0)
    assert t.times_s == pytest.approx([7e-3, 8e-3]) and t.warmup == 0


def test_reference_check():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 50))
    y = np.array([0, 7, 49, 3])
    m = z.max(-1, keepdims=True)
    p = np.exp(z - m) / np.exp(z - m).sum(-1, keepdims=True)
    loss = -np.log(p[np.arange(4), y])
    grad = p / 10
    grad[np.arange(4), y] -= 0.1
    ok = bench_cuda.reference_check(z, y, 10, loss, grad, "float32")
    assert ok["ok"] and ok["rows"] == 4 and ok["loss_max_err"] < 1e-12 and ok["grad_max_rel_err"] < 1e-12
    bad = bench_cuda.reference_check(z, y, 10, loss, grad * 1.02, "bfloat16")
    assert not bad["ok"] and bad["grad_max_rel_err"] == pytest.approx(0.02, rel=1e-6)
    assert not bench_cuda.reference_check(z, y, 10, loss + 1e-3, grad, "float32")["ok"]


def test_fake_cuda_records(fake_cuda_results):
    r = fake_cuda_results
    assert r["schema"] == bench.SCHEMA and r["config"]["device"] == "cuda"
    assert r["config"]["repeat"] == 2 and r["config"]["compile"] is True
    m = r["machine"]
    assert m["gpu"] == "FakeGPU 9000" and m["device"] == "cuda:0" and m["cpu_model"]
    assert [(c["shape"], c["dtype"]) for c in r["cases"]] == [
        ([64, 1000], "float32"),
        ([64, 1000], "bfloat16"),
        ([2, 8, 300], "float32"),
        ([2, 8, 300], "bfloat16"),
    ]
    for c in r["cases"]:
        assert c["bytes"] == c["rows"] * c["classes"] * (4 if c["dtype"] == "float32" else 2)
        read, copy = c["yardsticks"]["read"], c["yardsticks"]["copy"]
        assert read["bytes"] == c["bytes"] and copy["bytes"] == 2 * c["bytes"]
        assert "read_pass" in read["what"] and "copy_" in copy["what"]
        assert set(c["ops"]) == set(bench.OPS)
        for op, rec in c["ops"].items():
            n = c["bytes"] * (1 if op == "fwd" else 2)
            for impl in ("ce_fast", "torch", "torch_compile"):
                t = rec[impl]
                assert t["bytes"] == n and len(t["times_s"]) == 2 and _positive(t["median_s"]), (op, impl)
                assert t["gbps"] == pytest.approx(n / t["median_s"] / 1e9)
            assert rec["numpy"] is None and rec["speedup_numpy"] is None
            assert rec["share_of_read"] == pytest.approx(rec["gbps"] / read["gbps"])
            if op == "fwd":
                assert rec["share_of_copy"] is None
            else:
                assert rec["share_of_copy"] == pytest.approx(rec["gbps"] / copy["gbps"])
            assert rec["speedup_torch"] == pytest.approx(rec["torch"]["median_s"] / rec["ce_fast"]["median_s"])
            assert _positive(rec["speedup_torch_compile"])
            assert rec["loss_ok"], rec["loss_rel_diff"]
            assert set(rec["loss"]) == {"ce_fast", "torch", "torch_compile"}
            assert "eager" in rec["torch"]["what"] and "torch.compile" in rec["torch_compile"]["what"]
        # the fused baselines are measured once and shared by both fused variants
        assert c["ops"]["fwd+bwd"]["torch"] is c["ops"]["fwd+bwd in-place"]["torch"]
        assert c["check"]["ok"] and c["check"]["rows"] == min(64, c["rows"])
    json.dumps(r)  # JSON-ready


def test_fake_cuda_table_and_markdown(fake_cuda_results, tmp_path):
    text = bench.format_table(fake_cuda_results)
    lines = text.splitlines()
    assert lines[0].startswith("FakeGPU 9000 (cuda:0, 80 GiB, sm 9.0)")
    head = next(ln for ln in lines if ln.startswith("size"))
    for col in ("GB/s", "% read", "% copy", "torch ms", "vs torch", "compile ms", "vs compile", "loss check"):
        assert col in head
    assert sum(1 for ln in lines if " read pass " in ln) == 4 and "fwd+bwd in-place" in text
    assert "CUDA events" in text and "check on 64 rows" in text and "n/a" not in text.split("\n\n")[1]
    md = bench.format_markdown(fake_cuda_results)
    assert "- **gpu**: FakeGPU 9000" in md and "- **gpu_memory_bytes**: 80.0 GiB" in md
    assert "| size | dtype | op | best ms | median ms | GB/s | % read | % copy |" in md
    assert md.count("\n| 64x1000 |") == 2 and md.count("\n| 2x8x300 |") == 2
    src = tmp_path / "r.json"
    src.write_text(json.dumps(fake_cuda_results))
    report = _bench_script("report")
    assert report.main([str(src), "-o", str(tmp_path / "R.md")]) == 0
    assert "compile ms" in (tmp_path / "R.md").read_text()


def test_fake_cuda_compile_failure_and_oom():
    """A failing torch.compile reads n/a with its reason; an allocation that runs out of device
    memory reads OOM; neither stops the bench."""
    be = FakeCudaBackend(compile_error="triton is not installed", oom_on={"empty_like"})
    cfg = _cuda_cfg("--sizes", "16x500", "--dtype", "f32", "--repeat", "1", "--warmup", "0")
    r = bench.run_bench(cfg, quiet=True, backend=be)
    (c,) = r["cases"]
    assert c["yardsticks"]["copy"]["error"] == "out of memory" and c["yardsticks"]["copy"]["oom"]
    assert c["ops"]["fwd+bwd in-place"]["ce_fast"]["oom"] and c["ops"]["fwd+bwd in-place"]["gbps"] is None
    assert _positive(c["ops"]["fwd+bwd"]["gbps"]) and c["ops"]["fwd+bwd"]["share_of_copy"] is None
    for rec in c["ops"].values():
        assert "triton is not installed" in rec["torch_compile"]["error"]
        assert rec["speedup_torch_compile"] is None and _positive(rec["torch"]["median_s"])
    assert _positive(c["ops"]["fwd"]["speedup_torch"]) and c["ops"]["fwd+bwd in-place"]["speedup_torch"] is None
    assert any(
        "torch.compile n/a (torch.compile failed: RuntimeError: triton is not installed)" in n for n in c["notes"]
    )
    report = bench.build_report(r)
    cells = {row[2]: dict(zip(report.head, row)) for row in report.cells}
    assert cells["copy"]["median ms"] == "OOM" and cells["copy"]["GB/s"] == "OOM"
    assert cells["fwd+bwd in-place"]["median ms"] == "OOM" and cells["fwd+bwd in-place"]["% copy"] == "-"
    for op in bench.OPS:
        assert cells[op]["compile ms"] == "n/a" and cells[op]["vs compile"] == "-"
        assert cells[op]["torch ms"] not in ("OOM", "n/a", "-")
    assert "triton is not installed" in bench.format_table(r)
    assert be.arrays.freed > 0


def test_fake_cuda_inputs_oom_and_no_torch():
    be = FakeCudaBackend(oom_on={"make_inputs"})
    cfg = _cuda_cfg("--sizes", "16x500", "--dtype", "bf16", "--repeat", "1", "--no-torch")
    r = bench.run_bench(cfg, quiet=True, backend=be)
    (c,) = r["cases"]
    assert c["oom"] and c["ops"] == {} and "do not fit" in c["notes"][0]
    assert "(not run)" in bench.format_table(r) and "OOM" in bench.format_table(r)
    r = bench.run_bench(cfg, quiet=True, backend=FakeCudaBackend())
    for rec in r["cases"][0]["ops"].values():
        assert rec["torch"] is None and rec["torch_compile"] is None and rec["speedup_torch"] is None
    assert " - " in bench.format_table(r)


def test_bench_gpu_script_is_a_wrapper(capsys):
    bench_gpu = _bench_script("bench_gpu")
    assert bench_gpu.cli_args(["--sizes", "8x100", "--iters", "5", "--no-check", "--dtypes", "bf16"]) == [
        "bench",
        "--device",
        "cuda",
        "--sizes",
        "8x100",
        "--repeat",
        "5",
        "--dtypes",
        "bf16",
    ]
    assert bench_gpu.cli_args(["--iters=7", "--device", "cpu"]) == ["bench", "--device", "cuda", "--repeat=7"]
    assert bench_gpu.main(["--help"]) == 0 and "--arrays" in capsys.readouterr().out
    if not _gpu_available():
        assert bench_gpu.main(["-q"]) == 3
        assert "needs CuPy" in capsys.readouterr().err


# ----------------------------------------------------------------- --device cuda on a GPU


def _need_gpu():
    cp = pytest.importorskip("cupy")
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception:
        n = 0
    if n < 1:
        pytest.skip("no CUDA device")
    return cp


def _check_gpu_results(data, dtypes):
    assert data["machine"]["gpu"] and data["machine"]["device"].startswith("cuda:")
    assert [c["dtype"] for c in data["cases"]] == dtypes
    for c in data["cases"]:
        assert "error" not in c, c["notes"]
        assert _positive(c["yardsticks"]["read"]["gbps"]) and _positive(c["yardsticks"]["copy"]["gbps"])
        assert c["check"]["ok"], c["check"]
        for op, rec in c["ops"].items():
            assert _positive(rec["ce_fast"]["median_s"]) and _positive(rec["gbps"]), op
            assert rec["loss_ok"], (op, rec["loss_rel_diff"])
            assert (
                rec["torch_compile"] is None
                or rec["torch_compile"].get("error")
                or _positive(rec["torch_compile"]["median_s"])
            )


@pytest.mark.gpu
def test_gpu_bench_tiny(tmp_path, capsys):
    _need_gpu()
    path = tmp_path / "gpu.json"
    args = [
        "bench",
        "--device",
        "cuda",
        "--sizes",
        "256x1000",
        "--dtype",
        "float32,bfloat16",
        "--repeat",
        "3",
        "--warmup",
        "1",
        "--no-compile",
        "-q",
        "--json",
        str(path),
        "--markdown",
        str(tmp_path / "gpu.md"),
    ]
    if not torch.cuda.is_available():
        args[args.index("float32,bfloat16")] = "float32"
    rc = cli.main(args)
    out = capsys.readouterr()
    assert rc == 0, out.err
    data = json.loads(path.read_text())
    _check_gpu_results(data, ["float32", "bfloat16"] if torch.cuda.is_available() else ["float32"])
    assert data["machine"]["gpu"] in out.out and "read pass" in out.out
    assert "| size | dtype | op |" in (tmp_path / "gpu.md").read_text()


@pytest.mark.gpu
def test_gpu_bench_cupy_arrays_and_compile(tmp_path, capsys):
    """CuPy inputs, and torch.compile (timed, or n/a with a reason: never a crash)."""
    _need_gpu()
    path = tmp_path / "gpu.json"
    rc = cli.main(
        [
            "bench",
            "--device",
            "cuda",
            "--arrays",
            "cupy",
            "--sizes",
            "128x2000",
            "--dtype",
            "float32",
            "--repeat",
            "2",
            "--warmup",
            "1",
            "-q",
            "--json",
            str(path),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    data = json.loads(path.read_text())
    assert data["machine"]["arrays"] == "cupy"
    _check_gpu_results(data, ["float32"])


def test_device_memory_counts_torch_and_cupy_pool_peaks():
    """DeviceMemory with stand-ins for torch.cuda's counters and CuPy's MemoryHook registry."""
    hooks = {}

    class MemoryHook:
        def __enter__(self):
            hooks[self.name] = self
            return self

        def __exit__(self, *exc):
            del hooks[self.name]

    fake_cp = types.SimpleNamespace(cuda=types.SimpleNamespace(MemoryHook=MemoryHook))
    state = {"alloc": 1000, "peak": 1000}
    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            reset_peak_memory_stats=lambda i: state.update(peak=state["alloc"]),
            memory_allocated=lambda i: state["alloc"],
            max_memory_allocated=lambda i: state["peak"],
        )
    )
    mem = bench_cuda.DeviceMemory(fake_torch, fake_cp, 0)
    assert "torch.cuda.max_memory_allocated" in mem.description and "CuPy" in mem.description
    mem.reset()
    (hook,) = hooks.values()
    state["peak"] = 1000 + 300  # torch: 300 bytes more at its peak
    hook.free_postprocess(mem_ptr=1, mem_size=64)  # allocated before the reset: ignored
    hook.malloc_postprocess(mem_ptr=10, mem_size=512, size=500)
    hook.malloc_postprocess(mem_ptr=11, mem_size=512, size=500)
    hook.free_postprocess(mem_ptr=10, mem_size=512)
    hook.malloc_postprocess(mem_ptr=12, mem_size=256, size=200)
    hook.malloc_postprocess(mem_ptr=0, mem_size=1 << 30, size=1 << 30)  # failed allocation
    assert mem.peak_growth() == 300 + 1024 and not hooks  # the hook is unregistered
    mem.reset()
    mem.reset()  # twice in a row (a call that raised): still one hook
    assert len(hooks) == 1 and mem.peak_growth() == 0 and not hooks
