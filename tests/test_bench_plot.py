"""``ce-fast bench --plot``: a small run draws a PNG with the curves the results hold."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from ce_fast import cli
from ce_fast.bench import plot


def test_bench_plot_writes_png_of_the_run(tmp_path, capsys):
    png, js = tmp_path / "out.png", tmp_path / "out.json"
    argv = ["bench", "--sizes", "8x8192,8x16384", "--dtype", "float32", "--ops", "fwd,fwd+bwd"]
    argv += ["--repeat", "1", "--warmup", "0", "-q", "--plot", str(png), "--json", str(js)]
    assert cli.main(argv) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.shape[0] > 300 and img.shape[1] > 400
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 10  # drawn, not blank

    (p,) = plot.panels(json.loads(js.read_text()))
    results = json.loads(js.read_text())
    assert (p.dtype, p.rows, p.classes) == ("float32", 8, [8192, 16384])
    assert set(p.curves) == {
        f"{impl} {op}" for impl in ("ce_fast", "NumPy", "PyTorch") for op in ("forward", "forward + gradient")
    }
    for i, case in enumerate(results["cases"]):
        assert p.roof[i] == case["yardsticks"]["read"]["gbps"]
        assert p.curves["ce_fast forward"][i] == case["ops"]["fwd"]["ce_fast"]["gbps"]
        assert p.curves["PyTorch forward + gradient"][i] == case["ops"]["fwd+bwd"]["torch"]["gbps"]


def test_plot_default_sizes_sweep_8k_to_256k():
    ns = cli.build_parser().parse_args(["bench", "--plot", "x.png"])
    cfg = cli._to_config(ns, ["bench", "--plot", "x.png"])
    assert [s[-1] for s in cfg.sizes] == [8192, 16384, 32768, 65536, 131072, 262144]
    ns = cli.build_parser().parse_args(["bench"])
    assert cli._to_config(ns, ["bench"]).sizes != cfg.sizes


def test_panels_per_dtype_and_missing_numbers():
    results = {
        "cases": [
            {"dtype": "bfloat16", "rows": 4, "classes": 16384, "yardsticks": {"read": {"gbps": 3.0}}, "ops": {}},
            {
                "dtype": "bfloat16",
                "rows": 4,
                "classes": 8192,
                "yardsticks": {"read": {"gbps": 2.0}},
                "ops": {"fwd": {"ce_fast": {"gbps": 1.5}}},
            },
            {"dtype": "float32", "rows": 4, "classes": 8192, "yardsticks": {}, "ops": {}},
        ]
    }
    bf, f32 = plot.panels(results)
    assert bf.classes == [8192, 16384] and bf.roof == [2.0, 3.0]
    assert bf.curves == {"ce_fast forward": [1.5, None]}
    assert f32.curves == {} and f32.roof == [None]


def test_missing_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    png = tmp_path / "out.png"
    assert cli.main(["bench", "--sizes", "8x8192", "--plot", str(png), "-q"]) == 2
    err = capsys.readouterr().err
    assert err == "ce-fast bench: error: --plot needs matplotlib: pip install 'ce_fast[plot]'\n"
    assert not png.exists()
    with pytest.raises(plot.PlotUnavailable, match=r"pip install 'ce_fast\[plot\]'"):
        plot.plot({"cases": []}, str(png))
