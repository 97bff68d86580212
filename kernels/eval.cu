// ce_fast evaluation kernel: per-row cross-entropy and top-1 in one read of the logits,
// summed exactly on the device (loaded by CuPy RawModule; python/ce_fast/_eval_cuda.py).
//
// One warp per row (blocks of several warps loop over rows). Each lane streams its
// share of the row once, keeping a running max m (NaN ignored, NaN remembered), the
// sum s = sum exp(z - m) in f32, and the first index of its maximum; the warp combines
// them with shuffles (sums in f64), reads the target logit z_y, and forms the row's loss
// in f64 as the Rust engine and ce_fast._rules do:
//     loss = (mx - z_y) + log(s)      (NaN where mx is not finite, or the row holds NaN)
// Rows whose target is negative (ignored) are not read at all.
//
// Exact sums: every finite double is m * 2**(shift - 1074) with an integer |m| < 2**53
// and shift in [0, 2045] (read from its bits), so the sum of the losses is
// sum_shift (sum of m at that shift) * 2**(shift - 1074). Each m is split into hi (its
// top 27 bits, signed) and lo (its low 26 bits) and added with int64 atomics into
// bins[shift] and bins[2048 + shift]: integer adds, so the sums do not depend on the
// order of the rows, the blocks or the launches. The host folds the bins into one exact
// integer (ce_fast.streaming.fold_bins). counts = (tokens, correct, NaN losses, +inf
// losses, -inf losses). An int64 bin overflows only after 2**36 rows of one shift.
//
// Top-1: the first index of the row's maximum (numpy.argmax; 0 for a row of only
// -inf); a row holding NaN is never correct.
//
// Self-contained (no #include), C++14; CE_EMULATE builds it on the CPU for the tests
// (tests/kernel_emulator_prelude.h supplies the CUDA features).

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

struct ce_half {
    u16 bits;
};
struct ce_bf16 {
    u16 bits;
};

#define EV_INF __int_as_float(0x7f800000)
#define EV_NAN_D __longlong_as_double(0x7ff8000000000000LL)
#define EV_BINS 2048

#ifndef CE_EMULATE
__device__ __forceinline__ float ce_f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ i64 ev_bits(double d) { return __double_as_longlong(d); }
__device__ __forceinline__ void ev_add(i64* p, i64 v) { atomicAdd(reinterpret_cast<u64*>(p), (u64)v); }
#else
static inline i64 ev_bits(double d) {
    i64 b;
    std::memcpy(&b, &d, 8);
    return b;
}
static inline void ev_add(i64* p, i64 v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
#endif

template <typename T>
struct EvLoad;
template <>
struct EvLoad<float> {
    __device__ static float ld(const float* p) { return *p; }
};
template <>
struct EvLoad<ce_half> {
    __device__ static float ld(const ce_half* p) { return ce_f16_to_f32(p->bits); }
};
template <>
struct EvLoad<ce_bf16> {
    __device__ static float ld(const ce_bf16* p) { return __uint_as_float(((u32)p->bits) << 16); }
};

// Adds a finite double to the bins (see the header).
__device__ __forceinline__ void ev_bin(i64* bins, double v) {
    const i64 b = ev_bits(v);
    const i64 e = (b >> 52) & 0x7ff;
    i64 m = b & ((1LL << 52) - 1);
    if (e != 0) m |= 1LL << 52;
    if (b < 0) m = -m;
    const i64 shift = (e > 1 ? e : 1) - 1;
    ev_add(bins + shift, m >> 26);  // arithmetic shift: hi * 2**26 + lo == m, 0 <= lo < 2**26
    ev_add(bins + EV_BINS + shift, m & ((1LL << 26) - 1));
}

// bins: 2 * 2048 int64, counts: 5 int64 (both zeroed by the host once, then accumulated);
// o_loss: optional per-row losses (0 for ignored rows), for tests.
template <typename T>
__global__ void __launch_bounds__(256)
    ce_eval(const T* x, i64 rows, i64 C, i64 x_cs, i64 x_rs, const i64* x_tab, const i64* target, i64* bins,
            i64* counts, double* o_loss) {
    const int lane = threadIdx.x & 31;
    const i64 warps = blockDim.x >> 5;
    for (i64 r = (i64)blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += (i64)gridDim.x * warps) {
        const i64 y = target[r];
        if (y < 0) {  // ignored: not read, not counted
            if (o_loss && lane == 0) o_loss[r] = 0.0;
            continue;
        }
        const T* row = x + (x_tab ? x_tab[r] : r * x_rs);
        float m = -EV_INF, s = 0.0f;
        i64 ai = -1;  // first index of this lane's maximum
        int nan = 0;
        for (i64 c = lane; c < C; c += 32) {
            const float v = EvLoad<T>::ld(row + c * x_cs);
            if (v != v) {
                nan = 1;
            } else if (v > m) {
                // Guard exp(-inf - -inf): nothing was summed while the max was -inf.
                s = (m == -EV_INF) ? 1.0f : s * __expf(m - v) + 1.0f;
                m = v;
                ai = c;
            } else if (v > -EV_INF) {
                s += __expf(v - m);
            }
        }
        // Combine the lanes: the max, the first index holding it, the sum in f64.
        float M = m;
        int anynan = nan;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
            anynan |= __shfl_xor_sync(0xffffffffu, anynan, o);
        }
        // A lane that saw only -inf (or nothing) adds 0; exp(-inf - -inf) is never formed.
        double S = (m == M) ? (double)s : (m == -EV_INF ? 0.0 : (double)s * exp((double)m - (double)M));
        i64 I = (m == M && ai >= 0) ? ai : (i64)0x7fffffffffffffffLL;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            S += __shfl_xor_sync(0xffffffffu, S, o);
            const i64 J = __shfl_xor_sync(0xffffffffu, (long long)I, o);
            I = J < I ? J : I;
        }
        if (lane == 0) {
            if (I == (i64)0x7fffffffffffffffLL) I = 0;  // a row of only -inf: numpy.argmax gives 0
            const double zy = (double)EvLoad<T>::ld(row + y * x_cs);
            const bool finite = M > -EV_INF && M < EV_INF;
            const double loss = (anynan || !finite) ? EV_NAN_D : ((double)M - zy) + log(S);
            if (o_loss) o_loss[r] = loss;
            ev_add(counts, 1);
            if (!anynan && I == y) ev_add(counts + 1, 1);
            if (loss != loss) {
                ev_add(counts + 2, 1);
            } else if (loss == (double)EV_INF) {
                ev_add(counts + 3, 1);
            } else if (loss == -(double)EV_INF) {
                ev_add(counts + 4, 1);
            } else {
                ev_bin(bins, loss);
            }
        }
    }
}
