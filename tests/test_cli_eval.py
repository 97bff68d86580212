"""``ce-fast eval``: every file format, the printed and JSON results against
ce_fast.evaluate, progress on stderr, Ctrl-C, and every kind of bad input (one line on
stderr naming the file, exit status 2, no traceback, no JSON written)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import ce_fast
from ce_fast import cli, evaluate
from ce_fast.streaming import StreamingCrossEntropy

ROWS, C = 300, 37


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((ROWS, C)) * 3).astype(np.float32)
    y = rng.integers(0, C, ROWS)
    y[::9] = -100
    return x, y


@pytest.fixture
def files(tmp_path, data):
    x, y = data
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    x.tofile(tmp_path / "x.bin")
    y.astype(np.int32).tofile(tmp_path / "y.bin")
    save_file({"logits": x, "other": x[:2]}, str(tmp_path / "x.safetensors"))
    save_file({"labels": y}, str(tmp_path / "y.safetensors"))
    return tmp_path


def _run(capsys, *args):
    rc = cli.main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _json(path):
    return json.loads(Path(path).read_text())


@pytest.mark.parametrize(
    "logits,targets,extra",
    [
        ("x.npy", "y.npy", []),
        ("x.safetensors", "y.safetensors", ["--key", "logits"]),
        ("x.bin", "y.bin", ["--dtype", "float32", "--classes", str(C), "--target-dtype", "int32"]),
        ("x.npy", "y.bin", ["--target-dtype", "int32", "--block-rows", "7", "--threads", "1"]),
    ],
)
def test_formats_give_evaluate_s_result(capsys, files, data, logits, targets, extra):
    x, y = data
    ref = evaluate(x, y)
    out_json = files / "r.json"
    rc, out, err = _run(capsys, files / logits, files / targets, *extra, "--json", out_json, "-q")
    assert rc == 0, err
    assert err == ""
    d = _json(out_json)
    for k in ("tokens", "loss", "perplexity", "bits_per_token", "accuracy", "correct", "loss_sum"):
        assert d[k] == getattr(ref, k), k
    assert StreamingCrossEntropy().load_state_dict(d["state"]).result() == ref
    assert f"tokens          {ref.tokens}\n" in out
    assert f"loss            {ref.loss:.6f} nats" in out
    for word in ("perplexity", "bits/token", "accuracy", "time", "GB/s"):
        assert word in out


def test_bfloat16_npy_and_batch_shapes(capsys, tmp_path, data):
    x, y = data
    xb = x.astype(ml_dtypes.bfloat16).reshape(3, 100, C)
    np.save(tmp_path / "x.npy", xb)
    np.save(tmp_path / "y.npy", y.reshape(3, 100))
    np.save(tmp_path / "flat.npy", y)
    ref = evaluate(xb, y.reshape(3, 100))
    for t in ("y.npy", "flat.npy"):
        rc, out, err = _run(
            capsys, tmp_path / "x.npy", tmp_path / t, "--dtype", "bfloat16", "--json", tmp_path / "r.json", "-q"
        )
        assert rc == 0, err
        assert _json(tmp_path / "r.json")["loss"] == ref.loss


def test_ignore_index(capsys, files, data):
    x, y = data
    rc, _, err = _run(capsys, files / "x.npy", files / "y.npy", "--ignore-index", "3", "--json", files / "r.json", "-q")
    assert rc == 2 and "target value -100" in err  # -100 is now out of range
    y2 = np.where(y == -100, 3, y)
    np.save(files / "y2.npy", y2)
    rc, _, err = _run(
        capsys, files / "x.npy", files / "y2.npy", "--ignore-index", "3", "--json", files / "r.json", "-q"
    )
    assert rc == 0
    assert _json(files / "r.json")["tokens"] == evaluate(x, y2, ignore_index=3).tokens


def test_progress_bar_on_stderr(capsys, files):
    rc, out, err = _run(capsys, files / "x.npy", files / "y.npy", "--block-rows", "10")
    assert rc == 0
    assert "rows" in err and "GB/s" in err
    assert "rows" not in out.split("tokens")[0]


def test_no_tokens(capsys, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    np.save(tmp_path / "y.npy", np.full(4, -100))
    rc, out, _ = _run(capsys, tmp_path / "x.npy", tmp_path / "y.npy", "--json", tmp_path / "r.json", "-q")
    assert rc == 0 and "tokens          0" in out
    d = _json(tmp_path / "r.json")
    assert d["tokens"] == 0 and math.isnan(d["loss"]) and math.isnan(d["accuracy"])


def test_interrupt_between_blocks(capsys, files, monkeypatch):
    calls = []
    real = StreamingCrossEntropy._update_host

    def update(self, x, t):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(self, x, t)

    monkeypatch.setattr(StreamingCrossEntropy, "_update_host", update)
    rc, out, err = _run(
        capsys, files / "x.npy", files / "y.npy", "--block-rows", "50", "--json", files / "r.json", "-q"
    )
    assert rc == 130
    assert "interrupted after 100 of 300 rows; partial result over" in err
    assert out == "" and not (files / "r.json").exists()


def test_sigint_stops_after_the_current_block(capsys, files, monkeypatch):
    """A real SIGINT during a block: that block is finished and counted, then eval stops."""
    import os
    import signal

    calls = []
    real = StreamingCrossEntropy._update_host

    def update(self, x, t):
        calls.append(len(x))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        real(self, x, t)

    monkeypatch.setattr(StreamingCrossEntropy, "_update_host", update)
    before = signal.getsignal(signal.SIGINT)
    rc, out, err = _run(
        capsys, files / "x.npy", files / "y.npy", "--block-rows", "60", "--json", files / "r.json", "-q"
    )
    assert rc == 130 and calls == [60, 60]
    assert "interrupted after 120 of 300 rows; partial result over" in err
    assert out == "" and not (files / "r.json").exists()
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------- bad input


def _bad(capsys, files, *args):
    rc, out, err = _run(capsys, *args, "--json", files / "r.json", "-q")
    assert rc == 2, err
    assert out == ""
    assert not (files / "r.json").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ce-fast eval: error: ")
    return lines[0]


def test_missing_files(capsys, files):
    assert _bad(capsys, files, files / "nope.npy", files / "y.npy").endswith("nope.npy: no such file")
    assert _bad(capsys, files, files / "x.npy", files / "nope.bin").endswith("nope.bin: no such file")


def test_integer_and_unsupported_logits(capsys, files):
    np.save(files / "i.npy", np.zeros((3, 4), np.int32))
    msg = _bad(capsys, files, files / "i.npy", files / "y.npy")
    assert "i.npy: logits dtype int32 is not supported" in msg
    np.save(files / "c.npy", np.zeros((3, 4), np.complex64))
    assert "c.npy: logits dtype complex64 is not supported" in _bad(capsys, files, files / "c.npy", files / "y.npy")
    save_file({"a": np.zeros((3, 4), np.int64)}, str(files / "i.safetensors"))
    assert "logits dtype int64 is not supported" in _bad(capsys, files, files / "i.safetensors", files / "y.npy")


def test_object_npy_is_refused(capsys, files):
    np.save(files / "o.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    msg = _bad(capsys, files, files / "o.npy", files / "y.npy")
    assert "o.npy: dtype object holds Python objects" in msg
    msg = _bad(capsys, files, files / "x.npy", files / "o.npy")
    assert "o.npy: dtype object holds Python objects" in msg


def test_not_a_npy_or_safetensors_file(capsys, files):
    (files / "g.npy").write_bytes(b"garbage")
    assert "g.npy: not a .npy file" in _bad(capsys, files, files / "g.npy", files / "y.npy")
    (files / "g.safetensors").write_bytes(b"garbage12345")
    assert "g.safetensors: not a valid safetensors file" in _bad(
        capsys, files, files / "g.safetensors", files / "y.npy"
    )


def test_targets_shorter_or_longer(capsys, files, data):
    x, y = data
    np.save(files / "short.npy", y[:-1])
    msg = _bad(capsys, files, files / "x.npy", files / "short.npy")
    n = ROWS - 1
    assert f"short.npy: {n} targets (shape ({n},)) is shorter than the {ROWS} rows of logits shape ({ROWS}, {C})" in msg
    y[:-1].astype(np.int32).tofile(files / "short.bin")
    assert "short.bin: 299 targets" in _bad(
        capsys, files, files / "x.npy", files / "short.bin", "--target-dtype", "int32"
    )
    np.save(files / "long.npy", np.concatenate([y, y]))
    assert "is longer than" in _bad(capsys, files, files / "x.npy", files / "long.npy")
    np.save(files / "2d.npy", y.reshape(20, 15))
    assert "targets shape (20, 15) does not match the logits' batch shape (300,)" in _bad(
        capsys, files, files / "x.npy", files / "2d.npy"
    )


def test_float_targets_and_out_of_range(capsys, files, data):
    x, y = data
    np.save(files / "f.npy", y.astype(np.float32))
    assert "f.npy: targets dtype float32 is not an integer dtype" in _bad(
        capsys, files, files / "x.npy", files / "f.npy"
    )
    y2 = y.copy()
    y2[123] = C
    np.save(files / "oor.npy", y2)
    msg = _bad(capsys, files, files / "x.npy", files / "oor.npy", "--block-rows", "10")
    assert f"oor.npy: target value {C} at position (123,) is out of range for {C} classes" in msg


def test_raw_files_need_sizes(capsys, files):
    assert "x.bin: a raw logits file needs --dtype and --classes" in _bad(
        capsys, files, files / "x.bin", files / "y.npy"
    )
    msg = _bad(capsys, files, files / "x.bin", files / "y.npy", "--dtype", "float32", "--classes", "36")
    assert f"x.bin: {ROWS * C * 4} bytes is not a whole number of rows of 36 float32 classes (144 bytes each)" in msg
    (files / "odd.bin").write_bytes(b"\0" * 7)
    assert "odd.bin: 7 bytes is not a whole number of int64 values" in _bad(
        capsys, files, files / "x.npy", files / "odd.bin"
    )
    assert "x.npy: logits shape (300, 37) has 37 classes but --classes 5" in _bad(
        capsys, files, files / "x.npy", files / "y.npy", "--classes", "5"
    )
    assert "dtype float32 but --dtype float16" in _bad(
        capsys, files, files / "x.npy", files / "y.npy", "--dtype", "float16"
    )


def test_safetensors_keys(capsys, files):
    msg = _bad(capsys, files, files / "x.safetensors", files / "y.npy")
    assert "x.safetensors: holds tensors ['logits', 'other']; choose one with --key" in msg
    msg = _bad(capsys, files, files / "x.safetensors", files / "y.npy", "--key", "nope")
    assert "x.safetensors: no tensor 'nope'; it holds ['logits', 'other']" in msg


def test_zero_classes_and_scalars(capsys, files):
    np.save(files / "z.npy", np.zeros((3, 0), np.float32))
    assert "z.npy: logits shape (3, 0) has zero classes" in _bad(capsys, files, files / "z.npy", files / "y.npy")
    np.save(files / "s.npy", np.float32(1.0))
    assert "s.npy: logits are a 0-d array" in _bad(capsys, files, files / "s.npy", files / "y.npy")


def test_json_folder_must_exist(capsys, files):
    rc, out, err = _run(capsys, files / "x.npy", files / "y.npy", "--json", files / "no" / "r.json", "-q")
    assert rc == 2 and "the --json file's folder does not exist" in err


def test_command_line_process_has_no_traceback(tmp_path):
    np.save(tmp_path / "i.npy", np.zeros((3, 4), np.int8))
    np.save(tmp_path / "y.npy", np.zeros(3, np.int64))
    env_path = str(Path(ce_fast.__file__).resolve().parent.parent)  # the ce_fast this test imports
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {env_path!r}); from ce_fast.cli import main; sys.exit(main())",
            "eval",
            str(tmp_path / "i.npy"),
            str(tmp_path / "y.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    expect = "logits dtype int8 is not supported; expected float32, float64, float16, bfloat16"
    assert res.stderr.strip().splitlines() == [f"ce-fast eval: error: {tmp_path / 'i.npy'}: {expect}"]


def test_help_lists_the_options(capsys):
    assert cli.main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--key", "--dtype", "--classes", "--ignore-index", "--json", "--block-rows", "--threads", "--quiet"):
        assert opt in out
