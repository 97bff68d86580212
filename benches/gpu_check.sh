#!/usr/bin/env bash
# One prepared check of ce_fast on a fresh GPU machine (H100/H200), inside about 6 minutes:
#   1. installs the ce_fast wheel built here (abi3) without touching the network;
#   2. in parallel: the GPU tests (pytest -m gpu over every GPU test file, pytest-xdist) and,
#      on the machine's own CPU, the Rust kernel tests and the avx512 kernel set's Python tests
#      (these machines' server CPUs usually have the AVX-512 a development machine may lack);
#   3. compute-sanitizer memcheck on a subset (in place, strided / misaligned views, non-finite
#      rows, the generated rules kernels);
#   4. `ce-fast bench --device cuda` at 16384 x {32000, 128256, 262144}, bf16 and f32, with the
#      two-pass fused kernel (CE_FAST_FUSED=two-pass, today's default) and the one-read kernel
#      (CE_FAST_FUSED=one-read), while the CPU bench runs 4096 x 128256 on 2 threads with the
#      avx512 and the avx2 kernel sets (same-run ratios against the read pass and PyTorch);
#   5. with CHECK_PROFILE=1, benches/gpu_profile.py (wall and per-kernel device time of each
#      call, kernel resources, the fused kernel's rows in flight), benches/host_overhead.py
#      --cuda (the host's share of small calls) and `ncu` on the statistics and fused kernels;
#   6. with CHECK_COMPILE=1, the torch.compile baseline at 16384 x 128256.
# CHECK_CPU=0 leaves out the CPU tests and bench, CHECK_BENCH=0 the benchmarks (a rerun);
# CHECK_K selects GPU tests (pytest -k), CHECK_WORKERS sets their pytest-xdist workers;
# CHECK_ONE_READ=0 leaves the one-read kernel out of memcheck and the benchmarks; CHECK_AVX2=0
# the CPU bench of the avx2 set; MEMCHECK_LIMIT is memcheck's time limit in seconds.
# Every log and result goes under $CHECK_DIR (default ./gpu_check_out); the summary is
# $CHECK_DIR/summary.txt and is printed last.
#
# The device machine has Python 3.12, CuPy 14 (cuda13), torch, pytest-xdist and
# compute-sanitizer, but no Rust and no network. Build and carry from a development checkout:
#
#   maturin build --release                       # abi3 wheel: one for Python 3.9+, incl. 3.12
#   cargo test --release --no-run                 # the Rust kernel tests (needs no libpython)
#   mkdir -p .devcarry && cp target/wheels/ce_fast-*abi3-manylinux*.whl .devcarry/ \
#       && cp "$(ls -t target/release/deps/_core-* | grep -v '\.d$' | head -n 1)" .devcarry/core_tests
#
# then run this script from the repository root on the device machine with .devcarry carried
# along (an ignored folder; list it in .git/info/exclude), or point $CE_FAST_WHEEL at the wheel.
# The tests come from this checkout's tests/; the package imported is the installed wheel (the
# kernels embedded in it are the checkout's kernels/ at build time: rebuild after editing ce.cu).
#
# Exit status: 0 when every step passed; otherwise the number of failed steps.
set -u

DIR="${CHECK_DIR:-$PWD/gpu_check_out}"
mkdir -p "$DIR"
SUMMARY="$DIR/summary.txt"
: >"$SUMMARY"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

note() { echo "$*" | tee -a "$SUMMARY"; }
step() { # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to $DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$DIR/$name.log" 2>&1
    local rc=$?
    note "$(printf '%-22s rc=%-3s %4ss  (limit %ss)' "$name" "$rc" "$(($(date +%s) - t0))" "$limit")"
    [ "$rc" -eq 0 ] || echo "$name" >>"$DIR/failed.txt"
    return $rc
}
: >"$DIR/failed.txt"

PY=${PYTHON:-python3}
WHEEL="${CE_FAST_WHEEL:-$(ls -t .devcarry/ce_fast-*abi3*.whl target/wheels/ce_fast-*abi3*.whl 2>/dev/null | head -n 1)}"
note "gpu_check $(date -u +%FT%TZ) wheel=${WHEEL:-none}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv >"$DIR/machine.txt" 2>&1
lscpu >>"$DIR/machine.txt" 2>&1
note "$(sed -n 2p "$DIR/machine.txt")"
note "cpu: $(grep -m1 'Model name' "$DIR/machine.txt" | sed 's/.*: *//'), $(nproc) cores," \
    "avx512: $(grep -o 'avx512[a-z_0-9]*' "$DIR/machine.txt" | sort -u | tr '\n' ' ')"
if [ -z "$WHEEL" ]; then
    note "no wheel: build one with 'maturin build --release' and carry it (see the header)"
    exit 1
fi

# 1. install (no network: dependencies must already be there; --no-deps keeps pip offline)
step install 60 "$PY" -m pip install --no-deps --no-index --force-reinstall -q "$WHEEL" || exit 1
step imports 60 "$PY" -c "
import ce_fast, cupy, torch, numpy, ml_dtypes
from ce_fast import _core
print(ce_fast.__file__, ce_fast.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)
print('device', cupy.cuda.runtime.getDeviceProperties(0)['name'], 'cc', cupy.cuda.Device(0).compute_capability)
print('cpu kernel sets', _core.simd_available(), 'default', _core.simd_level())
" || exit 1
cat "$DIR/imports.log" >>"$SUMMARY"

# 2. GPU tests and CPU kernel tests side by side (16 cores; NVRTC compiles dominate the former)
GPU_TESTS="tests/test_gpu.py tests/test_gpu_kl_focal.py tests/test_binary_gpu.py tests/test_eval_gpu.py
    tests/test_torch.py tests/test_cli.py tests/test_destinations.py tests/test_layers.py"
SIMD_TESTS="tests/test_cross_entropy.py tests/test_binary.py tests/test_focal.py tests/test_fuzz.py
    tests/test_kl.py tests/test_logsumexp.py tests/test_threads.py tests/test_vocab_parallel.py"
# shellcheck disable=SC2086
step pytest-gpu 200 "$PY" -m pytest -q -m gpu -n "${CHECK_WORKERS:-6}" -p no:cacheprovider -o addopts="" \
    --durations=10 --junitxml="$DIR/pytest-gpu.xml" -k "${CHECK_K:-not no_such_test}" $GPU_TESTS &
GPU_PID=$!
[ "${CHECK_CPU:-1}" = 1 ] && (
    if [ -x .devcarry/core_tests ]; then
        step cargo-tests 60 .devcarry/core_tests
    else
        note "cargo-tests: no .devcarry/core_tests carried"
    fi
    # shellcheck disable=SC2086
    step pytest-avx512 170 "$PY" -m pytest -q -n 4 -p no:cacheprovider -o addopts="-m 'not slow'" \
        -k "avx512" $SIMD_TESTS
    step pytest-simd-core 90 "$PY" -m pytest -q -n 2 -p no:cacheprovider -o addopts="-m 'not slow'" \
        tests/test_simd_choice.py tests/test_core_boundary.py
) &
CPU_PID=$!
wait $GPU_PID $CPU_PID
tail -n 4 "$DIR/pytest-gpu.log" >>"$SUMMARY"
for f in cargo-tests pytest-avx512 pytest-simd-core; do
    [ -f "$DIR/$f.log" ] && tail -n 3 "$DIR/$f.log" | sed "s/^/[$f] /" >>"$SUMMARY"
done

# 3. memcheck on a subset (the sanitizer slows kernels down ~100x: small shapes only)
MEMCHECK_K="capture or test_gradient_in_place or test_layouts or test_in_place_on_views"
MEMCHECK_K="$MEMCHECK_K or test_non_finite_rows_across_warps or test_soft_targets"
ONE_READ_K=""
[ "${CHECK_ONE_READ:-1}" = 1 ] || ONE_READ_K=" and not one-read"  # its first compile takes ~90 s
if command -v compute-sanitizer >/dev/null; then
    step memcheck "${MEMCHECK_LIMIT:-75}" compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
        "$PY" -m pytest -q -x -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_gpu_kl_focal.py \
        -v -k "($MEMCHECK_K)$ONE_READ_K"
    tail -n 6 "$DIR/memcheck.log" >>"$SUMMARY"
else
    note "memcheck: compute-sanitizer not found"
    echo memcheck >>"$DIR/failed.txt"
fi

# 4. GPU benchmarks (alone on the GPU) while the CPU bench runs on 2 of the 16 cores
SIZES=16384x32000,16384x128256,16384x262144
[ "${CHECK_BENCH:-1}" = 1 ] && (
    CE_FAST_FUSED=two-pass step bench-two-pass 100 "$PY" -m ce_fast bench --device cuda --sizes "$SIZES" \
        --dtypes bfloat16,float32 --repeat 10 --warmup 2 --no-compile \
        --json "$DIR/bench-two-pass.json" --markdown "$DIR/bench-two-pass.md"
    [ "${CHECK_ONE_READ:-1}" = 1 ] && CE_FAST_FUSED=one-read step bench-one-read 60 "$PY" -m ce_fast bench --device cuda --sizes "$SIZES" \
        --dtypes bfloat16,float32 --ops fwd+bwd,inplace --repeat 10 --warmup 2 --no-torch --no-compile \
        --json "$DIR/bench-one-read.json" --markdown "$DIR/bench-one-read.md"
) &
GPU_PID=$!
[ "${CHECK_BENCH:-1}" = 1 ] && [ "${CHECK_CPU:-1}" = 1 ] && (
    CE_FAST_SIMD=avx512 step bench-cpu-avx512 100 "$PY" -m ce_fast bench --sizes 4096x128256 --threads 2 \
        --dtypes float32,bfloat16 --ops fwd,inplace --no-numpy --repeat 5 --baseline-repeat 1 \
        --training 64x32000,512x32000 --json "$DIR/bench-cpu-avx512.json" --markdown "$DIR/bench-cpu-avx512.md"
    [ "${CHECK_AVX2:-1}" = 1 ] && CE_FAST_SIMD=avx2 step bench-cpu-avx2 60 "$PY" -m ce_fast bench --sizes 4096x128256 --threads 2 \
        --dtypes float32,bfloat16 --ops fwd,inplace --no-numpy --no-torch --repeat 5 --training none \
        --json "$DIR/bench-cpu-avx2.json" --markdown "$DIR/bench-cpu-avx2.md"
) &
CPU_PID=$!
wait $GPU_PID $CPU_PID

# 5. where the time goes
if [ "${CHECK_PROFILE:-0}" = 1 ]; then
    step profile 90 "$PY" benches/gpu_profile.py
    cat "$DIR/profile.log" >>"$SUMMARY"
    step host-overhead 60 "$PY" benches/host_overhead.py --cuda --profile
    head -n 40 "$DIR/host-overhead.log" >>"$SUMMARY"
    step ncu 90 ncu --clock-control none -k 'regex:ce_(stats|fused)' -c 5 --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats "$PY" benches/gpu_profile.py --ncu
    grep -E "^  [a-z_]+<|^  ce_|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Registers Per|Achieved Occ|Theoretical Occ|Block Size|Grid Size|Warp Cycles Per Issued|Stall|OPT|Issued Warp" \
        "$DIR/ncu.log" | cut -c1-200 >>"$SUMMARY"
fi

# 6. torch.compile baseline (compiles take tens of seconds: only on request)
if [ "${CHECK_COMPILE:-0}" = 1 ]; then
    step bench-compile 120 "$PY" -m ce_fast bench --device cuda --sizes 16384x128256 \
        --dtypes bfloat16,float32 --ops fwd+bwd --repeat 10 --warmup 2 \
        --json "$DIR/bench-compile.json" --markdown "$DIR/bench-compile.md"
fi

for f in bench-two-pass bench-one-read bench-cpu-avx512 bench-cpu-avx2 bench-compile; do
    [ -f "$DIR/$f.md" ] && { note "--- $f"; cat "$DIR/$f.md" >>"$SUMMARY"; }
done
FAILED=$(wc -l <"$DIR/failed.txt")
note "total $(($(date +%s) - START))s, failed steps: $FAILED ($(tr '\n' ' ' <"$DIR/failed.txt"))"
exit "$FAILED"
