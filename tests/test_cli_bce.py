"""``ce-fast bench --loss bce``: the table, the JSON rows and the refusals."""

from __future__ import annotations

import json

from ce_fast import cli


def test_bench_bce_table_and_json(tmp_path, capsys):
    path = tmp_path / "bce.json"
    rc = cli.main(
        ["bench", "--loss", "bce", "--sizes", "8x16,2x3x5", "--dtype", "f32,bf16", "--repeat", "1"]
        + ["--warmup", "0", "-q", "--json", str(path)]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("binary_cross_entropy_with_logits on ")
    assert "kernels " in out.splitlines()[0]
    rows = json.loads(path.read_text())
    assert [(r["shape"], r["dtype"], r["op"]) for r in rows] == [
        (s, d, op) for s in ("8x16", "2x3x5") for d in ("float32", "bfloat16") for op in ("fwd", "fwd+bwd")
    ]
    for r in rows:
        assert r["ce_fast_s"] > 0 and r["torch_s"] > 0
        assert abs(r["speedup_vs_torch"] - r["torch_s"] / r["ce_fast_s"]) < 1e-9 * r["speedup_vs_torch"]


def test_bench_bce_is_cpu_only(capsys):
    assert cli.main(["bench", "--loss", "bce", "--device", "cuda", "-q"]) == 2
    assert "--loss bce benches the CPU engine only" in capsys.readouterr().err


def test_unknown_loss_is_refused(capsys):
    assert cli.main(["bench", "--loss", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
