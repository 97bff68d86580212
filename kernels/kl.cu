// ce_fast CUDA kernels: distillation KL divergence between student and teacher logits,
// loaded by CuPy RawModule (the engine side is python/ce_fast/_engines/kl_cuda.py).
//
// The algorithm is the Rust engine's (rust/kl.rs), written for a GPU: with a = teacher/T,
// b = student/T, the reference row r (a for KL(p || q), b for the reverse KL(q || p)) and
// the other row o,
//
//   kl_stats: one block per row (blocks loop over rows). Each thread streams its share of
//     both rows once, keeping for each row a running max and sum of exp(x - max) and, for
//     r, the cross term X = sum exp(r - m_r) (r - o), rescaled with the sum whenever m_r
//     moves; terms whose exponential is 0 (a -inf logit) count as 0. The block combines
//     the threads' states in f64 (warp shuffles, then shared memory) and writes the
//     student's (ms, ls) and the teacher's (mt, lt), lse = m + l, and cross = X / S_r.
//     A row holding NaN or +inf, or only -inf, in either array gets NaN statistics.
//   kl_grad: the gradient with respect to the student logits, g (q - p) / T, or
//     g q (log q - log p - KL) / T for the reverse KL, from the statistics.
//
// Rows start at r * row_stride, or at table[r] when the batch dims do not collapse into
// one stride (the host builds the table); any class stride. All offsets are 64-bit.
// Self-contained (no #include) like ce.cu: bf16/f16 are converted with integer ops and
// PTX cvt, so NVRTC needs no CUDA headers. C++14.

typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;

struct ce_half {
    u16 bits;
};
struct ce_bf16 {
    u16 bits;
};

#define KL_INF __int_as_float(0x7f800000)
#define KL_NAN_D __longlong_as_double(0x7ff8000000000000LL)

// CE_EMULATE: the CPU emulator of the tests supplies the f16 conversions.
#ifndef CE_EMULATE
__device__ __forceinline__ float ce_f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 ce_f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ u16 ce_f64_to_f16(double d) {
    u16 h;
    asm("cvt.rn.f16.f64 %0, %1;" : "=h"(h) : "d"(d));
    return h;
}
#endif
__device__ __forceinline__ float ce_bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }
// Round to nearest even, NaN kept quiet (as rust/elem.rs f32_to_bf16).
__device__ __forceinline__ u16 ce_f32_to_bf16(float f) {
    u32 b = __float_as_uint(f);
    if (f != f) return (u16)((b >> 16) | 0x40u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (u16)(b >> 16);
}
__device__ __forceinline__ u16 ce_f64_to_bf16(double v) {
    if (v != v) return (u16)0x7fc0u;
    const float f = (float)v;
    const double back = (double)f;
    const u32 b = __float_as_uint(f);
    if ((b & 0xffffu) == 0x8000u && back != v) {
        return fabs(v) > fabs(back) ? (u16)((b >> 16) + 1u) : (u16)(b >> 16);
    }
    return ce_f32_to_bf16(f);
}

// Element traits: load as f32, store an f32 rounded once to the stored type.
template <typename T>
struct KE;
template <>
struct KE<float> {
    __device__ static float ld(const float* p) { return *p; }
    __device__ static void st(float* p, float v) { *p = v; }
};
template <>
struct KE<ce_half> {
    __device__ static float ld(const ce_half* p) { return ce_f16_to_f32(p->bits); }
    __device__ static void st(ce_half* p, float v) { p->bits = ce_f32_to_f16(v); }
};
template <>
struct KE<ce_bf16> {
    __device__ static float ld(const ce_bf16* p) { return ce_bf16_to_f32(p->bits); }
    __device__ static void st(ce_bf16* p, float v) { p->bits = ce_f32_to_bf16(v); }
};

__device__ __forceinline__ i64 kl_row_start(i64 row, i64 rs, const i64* tab) { return tab ? tab[row] : row * rs; }

// A running (max, sum of exp(x - max)) and, for the reference row, the cross term.
struct KlState {
    float mr, sr, xr, mo, so;
};

// The exponential of x - m where m is a max (m finite, or x = m = -inf: 0).
__device__ __forceinline__ float kl_exp(float x, float m) { return x == -KL_INF ? 0.0f : __expf(x - m); }

// Moves a (max, sums) onto a new max m2 >= m; from -inf the sums are 0 and stay 0.
__device__ __forceinline__ float kl_factor(float m, float m2) { return m == -KL_INF ? 0.0f : __expf(m - m2); }

// Merges state b into a, in f64 (a and b from threads or warps of one row).
struct KlSum {
    double mr, sr, xr, mo, so;
};
__device__ __forceinline__ double kl_dfactor(double m, double m2) { return m == -(double)KL_INF ? 0.0 : exp(m - m2); }
__device__ __forceinline__ void kl_merge(KlSum& a, const KlSum& b) {
    const double mr = a.mr > b.mr ? a.mr : b.mr;
    const double mo = a.mo > b.mo ? a.mo : b.mo;
    const double fa = kl_dfactor(a.mr, mr), fb = kl_dfactor(b.mr, mr);
    a.sr = a.sr * fa + b.sr * fb;
    a.xr = a.xr * fa + b.xr * fb;
    a.so = a.so * kl_dfactor(a.mo, mo) + b.so * kl_dfactor(b.mo, mo);
    a.mr = mr;
    a.mo = mo;
}
__device__ __forceinline__ KlSum kl_shfl(const KlSum& s, int m) {
    KlSum o;
    o.mr = __shfl_xor_sync(0xffffffffu, s.mr, m);
    o.sr = __shfl_xor_sync(0xffffffffu, s.sr, m);
    o.xr = __shfl_xor_sync(0xffffffffu, s.xr, m);
    o.mo = __shfl_xor_sync(0xffffffffu, s.mo, m);
    o.so = __shfl_xor_sync(0xffffffffu, s.so, m);
    return o;
}

// blockDim.x is a multiple of 32, at most 1024.
template <typename TS, typename TT>
__global__ void __launch_bounds__(1024) kl_stats(const TS* x, const TT* t, i64 rows, i64 C, i64 x_cs, i64 x_rs,
                                                 const i64* x_tab, i64 t_cs, i64 t_rs, const i64* t_tab,
                                                 double inv_t, int reverse, double* o_ms, double* o_ls,
                                                 double* o_mt, double* o_lt, double* o_cross) {
    __shared__ KlSum warp_sums[32];
    __shared__ int warp_bad[32];
    const float s = (float)inv_t;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const TS* xr = x + kl_row_start(row, x_rs, x_tab);
        const TT* tr = t + kl_row_start(row, t_rs, t_tab);
        KlState st = {-KL_INF, 0.0f, 0.0f, -KL_INF, 0.0f};
        int bad = 0;
        for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
            const float b = s * KE<TS>::ld(xr + c * x_cs);
            const float a = s * KE<TT>::ld(tr + c * t_cs);
            const float r = reverse ? b : a, o = reverse ? a : b;
            // float64 log_softmax of a row holding NaN or +inf is NaN throughout.
            if (r != r || o != o || r == KL_INF || o == KL_INF) {
                bad = 1;
                continue;
            }
            if (r > st.mr) {
                const float f = kl_factor(st.mr, r);
                st.sr *= f;
                st.xr *= f;
                st.mr = r;
            }
            if (o > st.mo) {
                st.so *= kl_factor(st.mo, o);
                st.mo = o;
            }
            const float e = kl_exp(r, st.mr);
            st.sr += e;
            if (e != 0.0f) st.xr += e * (r - o);  // a -inf logit (e = 0) contributes 0
            st.so += kl_exp(o, st.mo);
        }
        KlSum sum = {(double)st.mr, (double)st.sr, (double)st.xr, (double)st.mo, (double)st.so};
        for (int m = 16; m > 0; m >>= 1) {
            const KlSum other = kl_shfl(sum, m);
            kl_merge(sum, other);
            bad |= __shfl_xor_sync(0xffffffffu, bad, m);
        }
        if (lane == 0) {
            warp_sums[warp] = sum;
            warp_bad[warp] = bad;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            KlSum total = warp_sums[0];
            int any_bad = warp_bad[0];
            for (int w = 1; w < nwarps; ++w) {
                kl_merge(total, warp_sums[w]);
                any_bad |= warp_bad[w];
            }
            const bool finite = total.mr > -(double)KL_INF && total.mo > -(double)KL_INF;
            double ms, ls, mt, lt, cross;
            if (any_bad || !finite) {
                ms = ls = mt = lt = cross = KL_NAN_D;
            } else {
                const double lr = log(total.sr), lo = log(total.so);
                cross = total.xr / total.sr;
                if (reverse) {
                    ms = total.mr, ls = lr, mt = total.mo, lt = lo;
                } else {
                    ms = total.mo, ls = lo, mt = total.mr, lt = lr;
                }
            }
            o_ms[row] = ms;
            o_ls[row] = ls;
            o_mt[row] = mt;
            o_lt[row] = lt;
            o_cross[row] = cross;
        }
        __syncthreads();  // the shared slots are reused by the next row
    }
}

// Gradient with respect to the student logits from the statistics; g = 0 rows get 0.
template <typename TS, typename TT>
__global__ void __launch_bounds__(1024) kl_grad(const TS* x, const TT* t, i64 rows, i64 C, i64 x_cs, i64 x_rs,
                                                const i64* x_tab, i64 t_cs, i64 t_rs, const i64* t_tab,
                                                double inv_t, int reverse, const double* ms, const double* ls,
                                                const double* mt, const double* lt, const double* cross,
                                                const double* g, TS* out, i64 o_cs, i64 o_rs, const i64* o_tab) {
    const float s = (float)inv_t;
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        TS* orow = out + kl_row_start(row, o_rs, o_tab);
        const double gr = g[row];
        if (gr == 0.0) {
            // Rows left out get an exact zero gradient, also where they hold inf/NaN.
            for (i64 c = threadIdx.x; c < C; c += blockDim.x) KE<TS>::st(orow + c * o_cs, 0.0f);
            continue;
        }
        const TS* xr = x + kl_row_start(row, x_rs, x_tab);
        const TT* tr = t + kl_row_start(row, t_rs, t_tab);
        const float mb = (float)ms[row], ma = (float)mt[row];
        // exp(z - m) * exp(-l): the second factor joins the coefficient.
        const float kb = (float)exp(-ls[row]), ka = (float)exp(-lt[row]);
        const float k = (float)(gr * inv_t);
        // Reverse: log q - log p - KL = (b - a) - shift, shift = lse_b - lse_a + KL(q || p).
        const double kl_rev = cross[row] - (ms[row] - mt[row]) - (ls[row] - lt[row]);
        const float shift = (float)((ms[row] - mt[row]) + (ls[row] - lt[row]) + kl_rev);
        for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
            // The student's value is read before its gradient is stored (out may be x).
            const float b = s * KE<TS>::ld(xr + c * x_cs);
            const float a = s * KE<TT>::ld(tr + c * t_cs);
            const float q = kb * kl_exp(b, mb);
            float v;
            if (reverse) {
                v = q == 0.0f ? 0.0f : k * q * ((b - a) - shift);
            } else {
                v = k * (q - ka * kl_exp(a, ma));
            }
            KE<TS>::st(orow + c * o_cs, v);
        }
    }
}
