//! AVX2 + FMA + F16C lanes: 8 f32 in a `__m256`, masks as all-ones lanes.

use crate::arch::lanes::Lanes;
use crate::arch::Level;
use std::arch::x86_64::*;

/// The AVX2 kernel set; a value exists only on CPUs with AVX2, FMA and F16C.
#[derive(Clone, Copy)]
pub struct Avx2 {
    _private: (),
}

impl Avx2 {
    /// Only constructed after run-time detection says the CPU has AVX2, FMA and F16C.
    pub fn new() -> Option<Avx2> {
        has().then_some(Avx2 { _private: () })
    }
}

/// Whether the CPU has what these kernels are compiled for.
pub fn has() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The lanes; used only inside the `#[target_feature]` entry points below.
#[derive(Clone, Copy)]
pub struct L8;

// SAFETY: every method is an AVX2/FMA/F16C intrinsic sequence (the callers' obligation:
// such a CPU) and reads or writes exactly the N = 8 (or 16) elements the trait names.
unsafe impl Lanes for L8 {
    const N: usize = 8;
    // Measured on Zen 3: 5.8 against 6.4 cycles per 8 terms of the fused sum.
    const ROUND_SPLIT: bool = true;
    type V = __m256;
    type M = __m256;
    type D = __m256d;

    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn div(a: __m256, b: __m256) -> __m256 {
        _mm256_div_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fmsub(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmsub_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn min(a: __m256, b: __m256) -> __m256 {
        _mm256_min_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn round(a: __m256) -> __m256 {
        _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
    }
    #[inline(always)]
    unsafe fn ldexp_add(y: __m256, n: __m256) -> __m256 {
        let n = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), n))
    }
    #[inline(always)]
    unsafe fn abs(a: __m256) -> __m256 {
        _mm256_andnot_ps(_mm256_set1_ps(-0.0), a)
    }
    #[inline(always)]
    unsafe fn or_sign(t: __m256, u: __m256) -> __m256 {
        _mm256_or_ps(t, _mm256_and_ps(u, _mm256_set1_ps(-0.0)))
    }
    #[inline(always)]
    unsafe fn shl23_add(p: __m256, nf: __m256) -> __m256 {
        let e = _mm256_slli_epi32(_mm256_castps_si256(nf), 23);
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e))
    }
    #[inline(always)]
    unsafe fn nlt(a: __m256, b: __m256) -> __m256 {
        _mm256_cmp_ps(a, b, _CMP_NLT_UQ)
    }
    #[inline(always)]
    unsafe fn lt(a: __m256, b: __m256) -> __m256 {
        _mm256_cmp_ps(a, b, _CMP_LT_OQ)
    }
    #[inline(always)]
    unsafe fn ge(a: __m256, b: __m256) -> __m256 {
        _mm256_cmp_ps(a, b, _CMP_GE_OQ)
    }
    #[inline(always)]
    unsafe fn gt(a: __m256, b: __m256) -> __m256 {
        _mm256_cmp_ps(a, b, _CMP_GT_OQ)
    }
    #[inline(always)]
    unsafe fn unord(a: __m256, b: __m256) -> __m256 {
        _mm256_cmp_ps(a, b, _CMP_UNORD_Q)
    }
    #[inline(always)]
    unsafe fn mask_none() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn mask_or(a: __m256, b: __m256) -> __m256 {
        _mm256_or_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mask_any(m: __m256) -> bool {
        _mm256_movemask_ps(m) != 0
    }
    #[inline(always)]
    unsafe fn and_mask(v: __m256, m: __m256) -> __m256 {
        _mm256_and_ps(v, m)
    }
    #[inline(always)]
    unsafe fn blend(a: __m256, b: __m256, m: __m256) -> __m256 {
        _mm256_blendv_ps(a, b, m)
    }
    #[inline(always)]
    unsafe fn splat_d(x: f64) -> __m256d {
        _mm256_set1_pd(x)
    }
    #[inline(always)]
    unsafe fn lo_d(v: __m256) -> __m256d {
        _mm256_cvtps_pd(_mm256_castps256_ps128(v))
    }
    #[inline(always)]
    unsafe fn hi_d(v: __m256) -> __m256d {
        _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))
    }
    #[inline(always)]
    unsafe fn add_d(a: __m256d, b: __m256d) -> __m256d {
        _mm256_add_pd(a, b)
    }
    #[inline(always)]
    unsafe fn sub_d(a: __m256d, b: __m256d) -> __m256d {
        _mm256_sub_pd(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd_d(a: __m256d, b: __m256d, c: __m256d) -> __m256d {
        _mm256_fmadd_pd(a, b, c)
    }
    #[inline(always)]
    unsafe fn hsum_d(s: __m256d) -> f64 {
        let s2 = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
        _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)))
    }
    #[inline(always)]
    unsafe fn store_d(p: *mut f64, d: __m256d) {
        _mm256_storeu_pd(p, d)
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    /// One 256-bit load: the even elements shifted into the high halves, the odd ones
    /// already there once the low halves are cleared (one operation per 8 each).
    #[inline(always)]
    unsafe fn load_bf16_2(p: *const u16) -> (__m256, __m256) {
        let v = _mm256_loadu_si256(p as *const __m256i);
        let even = _mm256_slli_epi32(v, 16);
        let odd = _mm256_and_si256(v, _mm256_set1_epi32(-65536));
        (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn store_bf16(p: *mut u16, v: __m256) {
        let b = _mm256_castps_si256(v);
        let nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        let r = _mm256_blendv_epi8(round_bf16_hi(b), quiet_hi(b), nan);
        let r = _mm256_srli_epi32(r, 16);
        // Every lane is below 2^16, so the saturating pack keeps it exactly.
        let h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128(p as *mut __m128i, h)
    }
    const BF16_PAIRS: bool = true;
    /// Rounds both vectors in their 32-bit lanes and interleaves the kept high halves with
    /// one word blend: 12 operations per 16 elements against 20 for two `store_bf16`.
    #[inline(always)]
    unsafe fn store_bf16_2(p: *mut u16, even: __m256, odd: __m256) {
        let (be, bo) = (_mm256_castps_si256(even), _mm256_castps_si256(odd));
        let (mut re, mut ro) = (round_bf16_hi(be), round_bf16_hi(bo));
        if _mm256_movemask_ps(_mm256_cmp_ps(even, odd, _CMP_UNORD_Q)) != 0 {
            // Rare: a NaN keeps its high half, made quiet, as in `store_bf16`.
            let ne = _mm256_castps_si256(_mm256_cmp_ps(even, even, _CMP_UNORD_Q));
            let no = _mm256_castps_si256(_mm256_cmp_ps(odd, odd, _CMP_UNORD_Q));
            re = _mm256_blendv_epi8(re, quiet_hi(be), ne);
            ro = _mm256_blendv_epi8(ro, quiet_hi(bo), no);
        }
        // Element 2i is the low word of lane i, 2i + 1 the high word.
        let v = _mm256_blend_epi16(_mm256_srli_epi32(re, 16), ro, 0xAA);
        _mm256_storeu_si256(p as *mut __m256i, v)
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut u16, v: __m256) {
        let h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(p as *mut __m128i, h)
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
}

/// b + 0x7fff + (the lowest kept bit): the high half is b rounded to nearest even.
#[inline(always)]
unsafe fn round_bf16_hi(b: __m256i) -> __m256i {
    let lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb)
}

/// The high half of b with the quiet bit set, in the high half.
#[inline(always)]
unsafe fn quiet_hi(b: __m256i) -> __m256i {
    _mm256_slli_epi32(
        _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40)),
        16,
    )
}

crate::arch::generic::kernel_set!(Avx2, L8, "avx2,fma,f16c", Level::Avx2);
