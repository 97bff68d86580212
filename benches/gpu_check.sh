#!/usr/bin/env bash
# One prepared check of the CUDA engine on a fresh GPU machine, inside 8 minutes:
#   1. installs the ce_fast wheel built here (abi3) without touching the network,
#   2. runs the GPU tests (pytest -m gpu: both fused kernels, CUDA graphs, torch.compile, scale),
#   3. compute-sanitizer memcheck on a subset (in place, strided / misaligned views, non-finite rows),
#   4. `ce-fast bench --device cuda` at 16384 x {32000, 128256, 262144}, bf16 and f32, with the
#      two-pass fused kernel (CE_FAST_FUSED=two-pass, today's default) and again with the one-read
#      kernel (CE_FAST_FUSED=one-read), so a first run can tell a design problem from a regression,
# and writes every log and result under $OUT (default ./gpu_check_out).
#
# The device machine has Python 3.12, CuPy 14 (cuda13), torch and compute-sanitizer, but no Rust
# and no network. Build and carry the wheel from a development checkout:
#
#   maturin build --release            # abi3 (cp39-abi3): one wheel for Python 3.9+, incl. 3.12
#   ls target/wheels/ce_fast-*-cp39-abi3-*.whl
#
# then run this script from the repository root on the device machine with target/wheels carried
# along (e.g. the device runner's carry=["target/wheels"]), or point $CE_FAST_WHEEL at the wheel.
# The tests come from this checkout's tests/; the package imported is the installed wheel (the
# kernels embedded in it are the checkout's kernels/ at build time: rebuild after editing ce.cu).
#
# Exit status: 0 when every step passed; otherwise the number of failed steps. The summary is
# $OUT/summary.txt.
set -u

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0
START=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }
step() { # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    note "$(printf '%-22s rc=%-3s %4ss  (limit %ss)' "$name" "$rc" "$(($(date +%s) - t0))" "$limit")"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
    return $rc
}

PY=${PYTHON:-python3}
WHEEL="${CE_FAST_WHEEL:-$(ls -t target/wheels/ce_fast-*abi3*.whl 2>/dev/null | head -n 1)}"
note "gpu_check $(date -u +%FT%TZ) wheel=${WHEEL:-none}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv >"$OUT/nvidia-smi.txt" 2>&1
note "$(tail -n +2 "$OUT/nvidia-smi.txt" | head -n 1)"
if [ -z "$WHEEL" ]; then
    note "no wheel: build one with 'maturin build --release' and carry target/wheels (see the header)"
    exit 1
fi

# 1. install (no network: dependencies must already be there; --no-deps keeps pip offline)
step install 60 "$PY" -m pip install --no-deps --no-index --force-reinstall "$WHEEL" || exit 1
step imports 60 "$PY" -c "
import ce_fast, cupy, torch, numpy, ml_dtypes
from ce_fast._engines import cuda
print(ce_fast.__file__, ce_fast.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)
print('device', cupy.cuda.runtime.getDeviceProperties(0)['name'], 'cc', cupy.cuda.Device(0).compute_capability)
" || exit 1
cat "$OUT/imports.log" >>"$SUMMARY"

# 2. the GPU tests (each fused kernel where a test takes the `fused` fixture)
step pytest-gpu 210 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --durations=15 \
    --junitxml="$OUT/pytest-gpu.xml" tests/test_gpu.py
tail -n 5 "$OUT/pytest-gpu.log" >>"$SUMMARY"

# 3. memcheck on a subset (the sanitizer slows kernels down ~100x: small shapes only)
if command -v compute-sanitizer >/dev/null; then
    step memcheck 75 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
        "$PY" -m pytest -q -x -m gpu -p no:cacheprovider -o addopts="" tests/test_gpu.py \
        -k "test_gradient_in_place or test_layouts or test_in_place_on_views or test_non_finite_rows_across_warps or test_soft_targets"
    tail -n 8 "$OUT/memcheck.log" >>"$SUMMARY"
else
    note "memcheck: compute-sanitizer not found"
    FAILED=$((FAILED + 1))
fi

# 4. benchmarks: today's two-pass fused kernel, then the one-read kernel (fused ops only)
SIZES=16384x32000,16384x128256,16384x262144
CE_FAST_FUSED=two-pass step bench-two-pass 150 "$PY" -m ce_fast bench --device cuda --sizes "$SIZES" \
    --dtypes bfloat16,float32 --repeat 10 --warmup 2 --no-compile \
    --json "$OUT/bench-two-pass.json" --markdown "$OUT/bench-two-pass.md"
CE_FAST_FUSED=one-read step bench-one-read 90 "$PY" -m ce_fast bench --device cuda --sizes "$SIZES" \
    --dtypes bfloat16,float32 --ops fwd+bwd,inplace --repeat 10 --warmup 2 --no-torch --no-compile \
    --json "$OUT/bench-one-read.json" --markdown "$OUT/bench-one-read.md"
for f in bench-two-pass bench-one-read; do
    [ -f "$OUT/$f.md" ] && { note "--- $f"; cat "$OUT/$f.md" >>"$SUMMARY"; }
done

note "total $(($(date +%s) - START))s, failed steps: $FAILED"
exit "$FAILED"
