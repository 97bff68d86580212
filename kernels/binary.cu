// ce_fast CUDA kernels: elementwise binary cross-entropy with logits (PyTorch's
// binary_cross_entropy_with_logits) and the sigmoid focal loss (torchvision's), loaded
// by CuPy RawModule. The arithmetic is the Rust engine's (rust/binary.rs), per element in
// f32:
//
//   e = exp(-|x|), sp = log1p(e), sigmoid(x) = 1/(1+e) or e/(1+e) by the sign of x
//   BCE   = w * (((1 - t) x - lw min(x, 0)) + lw sp),  lw = 1 + (pw - 1) t
//   dBCE  = w * (lw sigmoid(x) - pw t)                  (sigmoid(x) - t without pw)
//   focal = alpha_t * ce * m^gamma, m = t sigmoid(-x) + (1 - t) sigmoid(x) (= 1 - p_t)
//
// Every operand is seen as rows x cols: element (r, c) at r * rs + c * cs (elements), the
// host collapsing the batch dims (broadcast operands have stride 0). Blocks loop over
// tiles of one row (TILE consecutive columns), threads over the tile's columns, so rows
// with a contiguous last axis are read coalesced. Each block writes the f64 sum of its
// losses to partial[blockIdx.x]; the host sums the partials on the device (no sync).
//
// Self-contained (no #include), C++14, like ce.cu.

typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;

struct bx_half {
    u16 bits;
};
struct bx_bf16 {
    u16 bits;
};

#ifndef CE_EMULATE
__device__ __forceinline__ float bx_f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 bx_f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else  // the CPU emulator of the tests supplies the conversions
__device__ __forceinline__ float bx_f16_to_f32(u16 h) { return ce_f16_to_f32(h); }
__device__ __forceinline__ u16 bx_f32_to_f16(float f) { return ce_f32_to_f16(f); }
#endif
// Round to nearest even, NaN kept quiet (as rust/elem.rs f32_to_bf16).
__device__ __forceinline__ u16 bx_f32_to_bf16(float f) {
    u32 b = __float_as_uint(f);
    if (f != f) return (u16)((b >> 16) | 0x40u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (u16)(b >> 16);
}

template <typename T>
struct BX;
template <>
struct BX<float> {
    __device__ static float ld(const float* p) { return *p; }
    __device__ static void st(float* p, float v) { *p = v; }
};
template <>
struct BX<double> {  // targets only: read as f32, as the Rust engine does
    __device__ static float ld(const double* p) { return (float)*p; }
};
template <>
struct BX<bx_half> {
    __device__ static float ld(const bx_half* p) { return bx_f16_to_f32(p->bits); }
    __device__ static void st(bx_half* p, float v) { p->bits = bx_f32_to_f16(v); }
};
template <>
struct BX<bx_bf16> {
    __device__ static float ld(const bx_bf16* p) { return __uint_as_float(((u32)p->bits) << 16); }
    __device__ static void st(bx_bf16* p, float v) { p->bits = bx_f32_to_bf16(v); }
};

#define BX_BLOCK 256
#define BX_TILE 1024  // columns per tile: 4 per thread

// (m^gamma, gamma m^(gamma - 1)); the derivative is 0 for gamma == 0 and at m == 0.
__device__ __forceinline__ void bx_focal_pow(float m, float gamma, float* mg, float* dmg) {
    if (gamma == 0.0f) {
        *mg = 1.0f;
        *dmg = 0.0f;
    } else if (gamma == 1.0f) {
        *mg = m;
        *dmg = 1.0f;
    } else if (gamma == 2.0f) {
        *mg = m * m;
        *dmg = 2.0f * m;
    } else if (m > 0.0f) {
        const float m1 = powf(m, gamma - 1.0f);
        *mg = m1 * m;
        *dmg = gamma * m1;
    } else {
        *mg = powf(m, gamma);
        *dmg = 0.0f;
    }
}

// kind 0: BCE (w, pw optional; null = none); kind 1: sigmoid focal (alpha < 0: no alpha).
// loss: per-element f32 losses (contiguous rows x cols) or null. grad: the gradient
// (strided like the operands) or null, scaled by gmul * (*gptr when not null) * (go[i]
// when go, contiguous rows x cols f64, is not null).
template <typename TX, typename TT>
__global__ void __launch_bounds__(BX_BLOCK) bx_binary(
    const TX* x, i64 x_rs, i64 x_cs,  // not restrict: grad may be x itself (in place)
    const TT* __restrict__ t, i64 t_rs, i64 t_cs,
    const float* __restrict__ w, i64 w_rs, i64 w_cs,
    const float* __restrict__ pw, i64 pw_rs, i64 pw_cs,
    const double* __restrict__ go, const double* __restrict__ gptr, double gmul,
    float* __restrict__ loss, TX* grad, i64 g_rs, i64 g_cs,
    double* __restrict__ partial, i64 rows, i64 cols, int kind, float alpha, float gamma) {
    __shared__ double red[BX_BLOCK];
    const i64 tiles_per_row = (cols + BX_TILE - 1) / BX_TILE;
    const i64 tiles = rows * tiles_per_row;
    const float gs = (float)(gmul * (gptr ? *gptr : 1.0));
    double acc = 0.0;
    for (i64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const i64 r = tile / tiles_per_row;
        const i64 c0 = (tile - r * tiles_per_row) * BX_TILE;
        const i64 c1 = c0 + BX_TILE < cols ? c0 + BX_TILE : cols;
        for (i64 c = c0 + threadIdx.x; c < c1; c += BX_BLOCK) {
            const float xv = BX<TX>::ld(x + r * x_rs + c * x_cs);
            const float tv = BX<TT>::ld(t + r * t_rs + c * t_cs);
            const float e = expf(-fabsf(xv));
            const float sp = log1pf(e);
            const float rr = 1.0f / (1.0f + e);
            const bool pos = xv >= 0.0f;
            const float p = pos ? rr : e * rr;  // sigmoid(x)
            const float q = pos ? e * rr : rr;  // sigmoid(-x)
            const float min0 = xv < 0.0f ? xv : 0.0f;
            const float omt = 1.0f - tv;
            float l, d;
            if (kind == 0) {
                const float wv = w ? w[r * w_rs + c * w_cs] : 1.0f;
                if (pw) {
                    const float pv = pw[r * pw_rs + c * pw_cs];
                    const float lw = 1.0f + (pv - 1.0f) * tv;
                    l = ((omt * xv - lw * min0) + lw * sp) * wv;
                    d = (lw * p - pv * tv) * wv;
                } else {
                    l = ((omt * xv - min0) + sp) * wv;
                    d = (p - tv) * wv;
                }
            } else {
                const float ce = (omt * xv - min0) + sp;
                const float m = tv * q + omt * p;
                float mg, dmg;
                bx_focal_pow(m, gamma, &mg, &dmg);
                const float at = alpha >= 0.0f ? alpha * tv + (1.0f - alpha) * omt : 1.0f;
                const float dm = (omt - tv) * p * q;
                l = at * ce * mg;
                d = at * ((p - tv) * mg + ce * dmg * dm);
            }
            acc += (double)l;
            if (loss) loss[r * cols + c] = l;
            if (grad) {
                float s = gs;
                if (go) s *= (float)go[r * cols + c];
                // NaN logits give a NaN gradient, as autograd in float64 does.
                BX<TX>::st(grad + r * g_rs + c * g_cs, xv != xv ? xv : d * s);
            }
        }
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = BX_BLOCK / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}
