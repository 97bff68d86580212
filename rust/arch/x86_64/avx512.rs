//! AVX-512 (F, BW, VL, DQ) lanes: 16 f32 in a `__m512`, masks in `__mmask16`.
//!
//! bfloat16 is widened by a shift and narrowed by the same integer round-to-nearest-even
//! as the AVX2 set: AVX512_BF16's VCVTNEPS2BF16 treats subnormal inputs as zero and
//! flushes subnormal results, which would change the bits of tiny gradients. The CPU's
//! AVX512_BF16 is detected apart (`has_bf16`) and reported, not relied on.

use crate::arch::lanes::Lanes;
use crate::arch::Level;
use std::arch::x86_64::*;

/// The AVX-512 kernel set; a value exists only on CPUs with AVX-512 F, BW, VL and DQ
/// (and AVX2, FMA and F16C, which every such CPU has; checked all the same).
#[derive(Clone, Copy)]
pub struct Avx512 {
    _private: (),
}

impl Avx512 {
    /// Only constructed after run-time detection says the CPU has the features.
    pub fn new() -> Option<Avx512> {
        has().then_some(Avx512 { _private: () })
    }
}

/// Whether the CPU has what these kernels are compiled for.
pub fn has() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && super::avx2::has()
}

/// Whether the CPU also has the AVX512_BF16 conversions.
pub fn has_bf16() -> bool {
    is_x86_feature_detected!("avx512bf16")
}

/// The lanes; used only inside the `#[target_feature]` entry points below.
#[derive(Clone, Copy)]
pub struct L16;

// SAFETY: every method is an AVX-512 F/BW/VL/DQ intrinsic sequence (the callers'
// obligation: such a CPU) and reads or writes exactly the N = 16 (or 32) elements the
// trait names.
unsafe impl Lanes for L16 {
    const N: usize = 16;
    // VRNDSCALEPS is two operations on Intel cores (instruction tables; not measured here).
    const ROUND_SPLIT: bool = false;
    type V = __m512;
    type M = __mmask16;
    type D = __m512d;

    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: __m512, b: __m512) -> __m512 {
        _mm512_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        // VMAXPS returns the second operand when either is NaN, as on AVX2.
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fmsub(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmsub_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn min(a: __m512, b: __m512) -> __m512 {
        _mm512_min_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn round(a: __m512) -> __m512 {
        _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
    }
    #[inline(always)]
    unsafe fn ldexp_add(y: __m512, n: __m512) -> __m512 {
        let n = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
        _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(y), n))
    }
    #[inline(always)]
    unsafe fn abs(a: __m512) -> __m512 {
        _mm512_andnot_ps(_mm512_set1_ps(-0.0), a)
    }
    #[inline(always)]
    unsafe fn or_sign(t: __m512, u: __m512) -> __m512 {
        _mm512_or_ps(t, _mm512_and_ps(u, _mm512_set1_ps(-0.0)))
    }
    #[inline(always)]
    unsafe fn shl23_add(p: __m512, nf: __m512) -> __m512 {
        let e = _mm512_slli_epi32(_mm512_castps_si512(nf), 23);
        _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e))
    }
    #[inline(always)]
    unsafe fn nlt(a: __m512, b: __m512) -> __mmask16 {
        _mm512_cmp_ps_mask(a, b, _CMP_NLT_UQ)
    }
    #[inline(always)]
    unsafe fn lt(a: __m512, b: __m512) -> __mmask16 {
        _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)
    }
    #[inline(always)]
    unsafe fn ge(a: __m512, b: __m512) -> __mmask16 {
        _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ)
    }
    #[inline(always)]
    unsafe fn gt(a: __m512, b: __m512) -> __mmask16 {
        _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ)
    }
    #[inline(always)]
    unsafe fn unord(a: __m512, b: __m512) -> __mmask16 {
        _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q)
    }
    #[inline(always)]
    unsafe fn mask_none() -> __mmask16 {
        0
    }
    #[inline(always)]
    unsafe fn mask_or(a: __mmask16, b: __mmask16) -> __mmask16 {
        a | b
    }
    #[inline(always)]
    unsafe fn mask_any(m: __mmask16) -> bool {
        m != 0
    }
    #[inline(always)]
    unsafe fn and_mask(v: __m512, m: __mmask16) -> __m512 {
        _mm512_maskz_mov_ps(m, v)
    }
    #[inline(always)]
    unsafe fn blend(a: __m512, b: __m512, m: __mmask16) -> __m512 {
        _mm512_mask_blend_ps(m, a, b)
    }
    #[inline(always)]
    unsafe fn splat_d(x: f64) -> __m512d {
        _mm512_set1_pd(x)
    }
    #[inline(always)]
    unsafe fn lo_d(v: __m512) -> __m512d {
        _mm512_cvtps_pd(_mm512_castps512_ps256(v))
    }
    #[inline(always)]
    unsafe fn hi_d(v: __m512) -> __m512d {
        _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1))
    }
    #[inline(always)]
    unsafe fn add_d(a: __m512d, b: __m512d) -> __m512d {
        _mm512_add_pd(a, b)
    }
    #[inline(always)]
    unsafe fn sub_d(a: __m512d, b: __m512d) -> __m512d {
        _mm512_sub_pd(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd_d(a: __m512d, b: __m512d, c: __m512d) -> __m512d {
        _mm512_fmadd_pd(a, b, c)
    }
    #[inline(always)]
    unsafe fn hsum_d(s: __m512d) -> f64 {
        // Halves added pairwise, as the AVX2 set does with its two.
        let h = _mm256_add_pd(_mm512_castpd512_pd256(s), _mm512_extractf64x4_pd(s, 1));
        let s2 = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
        _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)))
    }
    #[inline(always)]
    unsafe fn store_d(p: *mut f64, d: __m512d) {
        _mm512_storeu_pd(p, d)
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
    /// One 512-bit load: the even elements shifted into the high halves, the odd ones
    /// already there once the low halves are cleared.
    #[inline(always)]
    unsafe fn load_bf16_2(p: *const u16) -> (__m512, __m512) {
        let v = _mm512_loadu_si512(p as *const __m512i);
        let even = _mm512_slli_epi32(v, 16);
        let odd = _mm512_and_si512(v, _mm512_set1_epi32(-65536));
        (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn store_bf16(p: *mut u16, v: __m512) {
        let b = _mm512_castps_si512(v);
        let hi = _mm512_srli_epi32(b, 16);
        let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
        let r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
        let r = _mm512_srli_epi32(r, 16);
        let nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        let quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
        let r = _mm512_mask_blend_epi32(nan, r, quiet);
        // Every lane is below 2^16, so the truncating narrow keeps it exactly.
        _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(r))
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut u16, v: __m512) {
        let h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256(p as *mut __m256i, h)
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
}

crate::arch::generic::kernel_set!(
    Avx512,
    L16,
    "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c",
    Level::Avx512
);
