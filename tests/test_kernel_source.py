"""The CUDA source the GPU engine compiles is kernels/ce.cu, shipped inside ``_core``.

The extension embeds kernels/*.cu at build time (rust/kernels.rs, include_str!), so a
wheel needs no files beside the package and no CUDA toolkit. The fast tests compare the
``_core`` under test (the dev build, or in CI the wheel pip built and installed) with
the checkout byte for byte and check the loader's override; the sdist test checks that
kernels/ travels with the source; the slow test builds a wheel from that sdist and
imports the engine from it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from ce_fast import _core
from ce_fast._engines import cuda as _cuda

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"


def _checkout_files():
    return sorted(p.name for p in KERNELS.glob("*.cu"))


def test_embedded_source_is_the_checkout_file_byte_for_byte():
    want = (KERNELS / "ce.cu").read_bytes()
    got = _core.kernel_source("ce.cu").encode("utf-8")
    assert got == want, "ce_fast._core embeds an older kernels/ce.cu: rebuild the extension"


def test_every_kernel_file_is_embedded():
    assert "ce.cu" in _checkout_files()
    assert sorted(_core.kernel_names()) == _checkout_files()
    assert _cuda.KERNEL_NAME in _core.kernel_names()


def test_unknown_kernel_file():
    with pytest.raises(KeyError) as exc:
        _core.kernel_source("nope.cu")
    have = ", ".join(f'"{n}"' for n in _core.kernel_names())
    assert exc.value.args == (f'no embedded kernel file "nope.cu"; have [{have}]',)


def test_loader_returns_the_embedded_text(monkeypatch):
    monkeypatch.delenv(_cuda.KERNELS_DIR_ENV, raising=False)
    assert _cuda.load_source() == _core.kernel_source("ce.cu")
    monkeypatch.setenv(_cuda.KERNELS_DIR_ENV, "")  # empty counts as unset
    assert _cuda.load_source() == _core.kernel_source("ce.cu")
    monkeypatch.setattr(_cuda, "_source", None)
    assert _cuda.source() == _core.kernel_source("ce.cu")


def test_loader_honours_the_directory_override(monkeypatch, tmp_path):
    text = "// edited kernel\r\n__global__ void ce_x() {}\n// \u00b5s\n"  # CRLF and UTF-8 kept as written
    (tmp_path / "ce.cu").write_bytes(text.encode("utf-8"))
    monkeypatch.setenv(_cuda.KERNELS_DIR_ENV, str(tmp_path))
    assert _cuda.load_source() == text
    monkeypatch.setattr(_cuda, "_source", None)
    assert _cuda.source() == text
    # Loaded once per process: a later change of the variable does not reach the engine.
    monkeypatch.setenv(_cuda.KERNELS_DIR_ENV, str(KERNELS))
    assert _cuda.source() == text
    assert _cuda.load_source() == (KERNELS / "ce.cu").read_bytes().decode("utf-8")


def test_override_without_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv(_cuda.KERNELS_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as exc:
        _cuda.load_source()
    assert str(exc.value) == (
        f"CE_FAST_KERNELS_DIR={str(tmp_path)!r} has no kernel file 'ce.cu' ({tmp_path / 'ce.cu'})"
    )


# ---------------------------------------------------------------- packaging


def _maturin():
    exe = shutil.which("maturin")
    if exe is None or shutil.which("cargo") is None:
        pytest.skip("maturin and cargo are needed to build the sdist")
    return exe


def _sdist(out: Path) -> Path:
    res = subprocess.run([_maturin(), "sdist", "-o", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    (path,) = out.glob("*.tar.gz")
    return path


def test_sdist_carries_the_kernels(tmp_path):
    sdist = _sdist(tmp_path)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        top = sdist.name[: -len(".tar.gz")]
        shipped = {n: tar.extractfile(f"{top}/kernels/{n}").read() for n in _checkout_files()}
    assert "rust/kernels.rs" in names
    assert {n: (KERNELS / n).read_bytes() for n in _checkout_files()} == shipped
    assert not [n for n in names if n.startswith("python/ce_fast/kernels")]


@pytest.mark.slow
def test_wheel_built_from_the_sdist_ships_the_kernels(tmp_path):
    """Builds the extension from the sdist alone (a few minutes), then imports the GPU
    engine from the unpacked wheel in a fresh interpreter: it loads kernels/ce.cu."""
    sdist = _sdist(tmp_path / "sdist")
    with tarfile.open(sdist) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp_path / "src", **safe)
    (src,) = (tmp_path / "src").iterdir()
    env = dict(
        os.environ,
        CARGO_PROFILE_RELEASE_LTO="off",
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS="8",
        CARGO_TARGET_DIR=str(tmp_path / "target"),
    )
    env.pop(_cuda.KERNELS_DIR_ENV, None)
    res = subprocess.run(
        [_maturin(), "build", "--release", "-o", str(tmp_path / "wheel")],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert "ce_fast/_cuda.py" in names
    assert not [n for n in names if n.startswith("ce_fast/kernels")]
    check = (
        "import sys, ce_fast, ce_fast._core as c; from ce_fast._engines import cuda as _cuda; "
        "assert ce_fast.__file__.startswith(sys.argv[1]), ce_fast.__file__; "
        "sys.stdout.buffer.write(_cuda.source().encode())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", _cuda.KERNELS_DIR_ENV)}
    env["PYTHONPATH"] = str(tmp_path / "site")
    res = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "site")], cwd=tmp_path, env=env, capture_output=True
    )
    assert res.returncode == 0, res.stderr.decode()[-4000:]
    assert res.stdout == (KERNELS / "ce.cu").read_bytes()
