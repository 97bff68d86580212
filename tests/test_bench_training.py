"""The training-step table of ``ce-fast bench``: measured when asked for, rendered in
the terminal table and the Markdown, recorded in the JSON; off when --sizes is given
without --training."""

from __future__ import annotations

import json
import math

from ce_fast import cli

TINY = ["--sizes", "64x1000", "--ops", "fwd", "--repeat", "1", "--slow", "1e9", "-q", "--no-numpy", "--no-copy"]


def test_training_table_measured_and_rendered(tmp_path, capsys):
    path, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["bench", *TINY, "--dtype", "float32,bfloat16", "--training", "8x100,3x4x50"]
    assert cli.main([*argv, "--json", str(path), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    recs = json.loads(path.read_text())["training"]
    assert [(r["shape"], r["dtype"]) for r in recs] == [
        ([8, 100], "float32"),
        ([8, 100], "bfloat16"),
        ([3, 4, 50], "float32"),
        ([3, 4, 50], "bfloat16"),
    ]
    for r in recs:
        assert r["ce_fast_s"] > 0 and r["torch_s"] > 0
        assert math.isclose(r["speedup_torch"], r["torch_s"] / r["ce_fast_s"])
        assert r["loss_rel_diff"] < (1e-5 if r["dtype"] == "float32" else 1e-2)
        assert all(n >= 3 for n in r["runs"])
    assert "training step (fwd+bwd)" in out and "3x4x50" in out
    assert "| training step (fwd+bwd) |" in md.read_text()


def test_training_table_off_with_sizes_or_none(tmp_path):
    path = tmp_path / "r.json"
    assert cli.main(["bench", *TINY, "--dtype", "float32", "--json", str(path)]) == 0
    assert "training" not in json.loads(path.read_text())
    assert json.loads(path.read_text())["config"]["training"] == []
    ns = cli.build_parser().parse_args(["bench", "--training", "none"])
    assert ns.training == []


def test_default_training_sizes_when_sizes_not_given():
    ns = cli.build_parser().parse_args(["bench"])
    cfg = cli._to_config(ns, [])
    assert cfg.training == [(8, 1000), (64, 32000), (512, 32000), (4096, 32000), (4096, 128256)]
    ns = cli.build_parser().parse_args(["bench", "--sizes", "8x10"])
    assert cli._to_config(ns, []).training == []
