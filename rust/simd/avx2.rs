//! AVX2 + FMA + F16C kernels for f32 lanes. The exponential is the bottleneck on
//! CPUs without AVX-512, so it is a degree-5 FMA polynomial for 2^f with the
//! exponent added into the float's bits, and the sums run four independent
//! accumulators.

use super::{GradParams, Kernels, Level};

use std::arch::x86_64::*;

#[derive(Clone, Copy)]
pub struct Avx2 {
    _private: (),
}

impl Avx2 {
    /// Only constructed after run-time detection says the CPU has AVX2, FMA and F16C.
    pub fn new() -> Option<Avx2> {
        (super::detected() == Level::Avx2).then_some(Avx2 { _private: () })
    }
}

mod imp {
    use super::*;

        /// 2^t for -126 <= t <= 127 (NaN passes through): 2^n * p(t - n), p a degree-5
    /// minimax polynomial (relative error 1.9e-7), 2^n added into the exponent bits.
    #[inline(always)]
    unsafe fn exp2_core(t: __m256) -> __m256 {
        // Adding 1.5 * 2^23 rounds t to an integer n held in the low mantissa bits,
        // which avoids round/convert instructions (one slow port on some cores).
        let magic = _mm256_set1_ps(12_582_912.0);
        let nf = _mm256_add_ps(t, magic);
        let f = _mm256_sub_ps(t, _mm256_sub_ps(nf, magic));
        let mut p = _mm256_set1_ps(1.326_472_4e-3);
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.671_513e-3));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550_733_6e-2));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402_224_2e-1));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931_470e-1));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
        // n << 23 (the magic's own bits shift out); n >= -126 and p >= 1 when
        // n == -126, so the sum stays a normal float.
        let e = _mm256_slli_epi32(_mm256_castps_si256(nf), 23);
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e))
    }

    /// exp(x) for x <= 0 inside sums: below -87.3 it returns ~1e-38 instead of 0,
    /// which no sum that holds its own maximum (exp(0) = 1) can notice.
    #[inline(always)]
    unsafe fn exp_sum_term(x: __m256) -> __m256 {
        let t = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E));
        // max returns its second operand on NaN, so NaN flows through.
        exp2_core(_mm256_max_ps(_mm256_set1_ps(-126.0), t))
    }

    /// exp(x) for x <= 0 with an exact 0 below -87.3 (so -inf gives 0), NaN kept.
    #[inline(always)]
    unsafe fn exp_le0(x: __m256) -> __m256 {
        let t = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E));
        let keep = _mm256_cmp_ps(t, _mm256_set1_ps(-126.0), _CMP_NLT_UQ);
        _mm256_and_ps(exp2_core(_mm256_max_ps(_mm256_set1_ps(-126.0), t)), keep)
    }

    /// (c * tanh(u), 1 - tanh(u)^2) with u = x / c, via e = exp(-2|u|) (no overflow):
    /// tanh = (1 - e)/(1 + e), 1 - tanh^2 = 4e/(1 + e)^2 (no cancellation when tanh
    /// saturates), and a series for tanh near 0, where 1 - e cancels.
    #[inline(always)]
    unsafe fn softcap_ps(x: __m256, c: __m256, inv_c: __m256) -> (__m256, __m256) {
        let u = _mm256_mul_ps(x, inv_c);
        let sign = _mm256_set1_ps(-0.0);
        let a = _mm256_andnot_ps(sign, u);
        let e = exp_le0(_mm256_mul_ps(a, _mm256_set1_ps(-2.0)));
        let one = _mm256_set1_ps(1.0);
        let q = _mm256_div_ps(one, _mm256_add_ps(one, e));
        let t_big = _mm256_mul_ps(_mm256_sub_ps(one, e), q);
        let dt = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(4.0), e), _mm256_mul_ps(q, q));
        let a2 = _mm256_mul_ps(a, a);
        let mut p = _mm256_set1_ps(-17.0 / 315.0);
        p = _mm256_fmadd_ps(p, a2, _mm256_set1_ps(2.0 / 15.0));
        p = _mm256_fmadd_ps(p, a2, _mm256_set1_ps(-1.0 / 3.0));
        let t_small = _mm256_fmadd_ps(_mm256_mul_ps(p, a2), a, a);
        let small = _mm256_cmp_ps(a, _mm256_set1_ps(0.0625), _CMP_LT_OQ);
        let t = _mm256_blendv_ps(t_big, t_small, small);
        let t = _mm256_or_ps(t, _mm256_and_ps(u, sign));
        (_mm256_mul_ps(c, t), dt)
    }

    #[inline(always)]
    unsafe fn hsum_f64(v: __m256) -> f64 {
        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        let s = _mm256_add_pd(lo, hi);
        let s2 = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
        _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)))
    }

    /// The last < 8 elements, padded with `fill`.
    #[inline(always)]
    unsafe fn tail(buf: &[f32], start: usize, fill: f32) -> __m256 {
        let mut t = [fill; 8];
        t[..buf.len() - start].copy_from_slice(&buf[start..]);
        _mm256_loadu_ps(t.as_ptr())
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn transform(buf: &mut [f32], scale: f32, softcap: f32, mut chain: Option<&mut [f32]>) {
        if softcap > 0.0 {
            let s = _mm256_set1_ps(scale);
            let c = _mm256_set1_ps(softcap);
            let inv_c = _mm256_set1_ps(1.0 / softcap);
            let n = buf.len();
            let mut i = 0;
            let mut tmp = [0.0f32; 16];
            while i < n {
                // The tail (< 8 elements) is padded; every vector goes through `tmp`.
                let x = lanes(buf, i, 0.0);
                let (v, dt) = softcap_ps(_mm256_mul_ps(x, s), c, inv_c);
                let len = (n - i).min(8);
                _mm256_storeu_ps(tmp.as_mut_ptr(), v);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), _mm256_mul_ps(dt, s));
                buf[i..i + len].copy_from_slice(&tmp[..len]);
                if let Some(ch) = chain.as_deref_mut() {
                    ch[i..i + len].copy_from_slice(&tmp[8..8 + len]);
                }
                i += 8;
            }
        } else {
            for x in buf.iter_mut() {
                *x *= scale;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn max_nan(buf: &[f32]) -> (f32, bool) {
        let n16 = buf.len() / 16 * 16;
        let p = buf.as_ptr();
        let mut m0 = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut m1 = m0;
        let mut nan = _mm256_setzero_ps();
        let mut i = 0;
        while i < n16 {
            let a = _mm256_loadu_ps(p.add(i));
            let b = _mm256_loadu_ps(p.add(i + 8));
            // max(x, acc) returns acc when x is NaN: NaN is skipped here, flagged below.
            m0 = _mm256_max_ps(a, m0);
            m1 = _mm256_max_ps(b, m1);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
            i += 16;
        }
        let mut m = [0.0f32; 8];
        _mm256_storeu_ps(m.as_mut_ptr(), _mm256_max_ps(m0, m1));
        let mut best = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut has_nan = _mm256_movemask_ps(nan) != 0;
        for &x in &buf[n16..] {
            if x > best {
                best = x;
            }
            has_nan |= x.is_nan();
        }
        (best, has_nan)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn sum_exp(buf: &[f32], m: f32) -> f64 {
        match sum_exp_impl::<false>(buf, m) {
            Some((s, _)) => s,
            None => sum_exp_sub(buf, m),
        }
    }

    /// sum(exp(x - m)) and max(x) (NaN skipped) in one pass; None when m*log2e does
    /// not round to float32 within `MAX_RHO` (|m| beyond ~1.9e8). Terms above exp(88)
    /// are garbage: callers check the max.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn sum_exp_max(buf: &[f32], m: f32) -> Option<(f64, f32)> {
        sum_exp_impl::<true>(buf, m)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sum_exp_impl<const MAX: bool>(buf: &[f32], m: f32) -> Option<(f64, f32)> {
        let log2e = std::f32::consts::LOG2_E;
        let ml = m * log2e;
        // t = x*log2e - fl(m*log2e) in one FMA; the rounding of fl(m*log2e) is the same
        // for every term, so it is a factor 2^-rho on the sum, undone exactly in f64.
        let rho = ml as f64 - m as f64 * log2e as f64;
        // Past MAX_RHO the shifted terms leave exp2_core's range (ulp(ml) grows with |m|).
        if rho.is_nan() || rho.abs() > MAX_RHO {
            return None;
        }
        let n32 = buf.len() / 32 * 32;
        let p = buf.as_ptr();
        let vl = _mm256_set1_ps(log2e);
        let vml = _mm256_set1_ps(-ml);
        let lo = _mm256_set1_ps(-126.0);
        let term = |x: __m256| exp2_core(_mm256_max_ps(lo, _mm256_fmadd_ps(x, vl, vml)));
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = a0;
        let mut a2 = a0;
        let mut a3 = a0;
        let mut mx0 = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut mx1 = mx0;
        let mut i = 0;
        while i < n32 {
            let x0 = _mm256_loadu_ps(p.add(i));
            let x1 = _mm256_loadu_ps(p.add(i + 8));
            let x2 = _mm256_loadu_ps(p.add(i + 16));
            let x3 = _mm256_loadu_ps(p.add(i + 24));
            if MAX {
                // max(x, acc) returns acc when x is NaN: NaN shows in the sum instead.
                mx0 = _mm256_max_ps(x0, mx0);
                mx1 = _mm256_max_ps(x1, mx1);
                mx0 = _mm256_max_ps(x2, mx0);
                mx1 = _mm256_max_ps(x3, mx1);
            }
            a0 = _mm256_add_ps(a0, term(x0));
            a1 = _mm256_add_ps(a1, term(x1));
            a2 = _mm256_add_ps(a2, term(x2));
            a3 = _mm256_add_ps(a3, term(x3));
            i += 32;
        }
        while i + 8 <= buf.len() {
            let x0 = _mm256_loadu_ps(p.add(i));
            if MAX {
                mx0 = _mm256_max_ps(x0, mx0);
            }
            a0 = _mm256_add_ps(a0, term(x0));
            i += 8;
        }
        let mut s = hsum_f64(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        s *= (rho * std::f64::consts::LN_2).exp();
        let mut best = f32::NEG_INFINITY;
        if MAX {
            let mut v = [0.0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), _mm256_max_ps(mx0, mx1));
            best = v.iter().chain(&buf[i..]).copied().fold(best, |a, b| if b > a { b } else { a });
        }
        Some((s + tail_sum_exp(buf, i, m), best))
    }

    /// Largest |fl(m*log2e) - m*log2e| the one-pass sum takes. Terms are 2^(t - rho) with
    /// t <= log2(e^FUSED_MAX_JUMP) = 92.3, and a lane adds up to 67 of them before the f64
    /// sum: 2^(92.3 + 16 + 6.1) stays below f32's 2^128, and the 2^-126 floor of the
    /// smallest terms becomes at most 2^-110, far below the max's own term 1.
    const MAX_RHO: f64 = 16.0;

    /// The last < 8 terms, padded with -inf, through the exact-zero exp.
    #[inline(always)]
    unsafe fn tail_sum_exp(buf: &[f32], i: usize, m: f32) -> f64 {
        if i == buf.len() {
            return 0.0;
        }
        let x = tail(buf, i, f32::NEG_INFINITY);
        hsum_f64(exp_le0(_mm256_sub_ps(x, _mm256_set1_ps(m))))
    }

    /// sum(exp(x - m)) with the subtraction first: for |m| too large for m*log2e.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum_exp_sub(buf: &[f32], m: f32) -> f64 {
        let p = buf.as_ptr();
        let vm = _mm256_set1_ps(m);
        let mut a0 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= buf.len() {
            a0 = _mm256_add_ps(a0, exp_sum_term(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm)));
            i += 8;
        }
        hsum_f64(a0) + tail_sum_exp(buf, i, m)
    }

    /// sum(w * (x - m)) (w = 1 when None) in f64 lanes, the differences included:
    /// 3e38 - (-3e38) does not fit in f32, and terms near it neither overflow nor cancel.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_shift(x: &[f32], w: Option<&[f32]>, m: f32) -> f64 {
        let n = x.len();
        let n8 = n / 8 * 8;
        let px = x.as_ptr();
        let vm = _mm256_set1_pd(m as f64);
        let mut s0 = _mm256_setzero_pd();
        let mut s1 = s0;
        let mut i = 0;
        while i < n8 {
            let xv = _mm256_loadu_ps(px.add(i));
            let dlo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xv)), vm);
            let dhi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)), vm);
            match w {
                Some(w) => {
                    let wv = _mm256_loadu_ps(w.as_ptr().add(i));
                    s0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(wv)), dlo, s0);
                    s1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(wv, 1)), dhi, s1);
                }
                None => {
                    s0 = _mm256_add_pd(s0, dlo);
                    s1 = _mm256_add_pd(s1, dhi);
                }
            }
            i += 8;
        }
        let s = _mm256_add_pd(s0, s1);
        let s2 = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
        let mut total = _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
        for j in n8..n {
            total += w.map_or(1.0, |w| w[j] as f64) * (x[j] as f64 - m as f64);
        }
        total
    }

    /// Applies `f(x, i)` to every 8 lanes of `buf` in place; the tail is padded with 0.
    #[inline(always)]
    unsafe fn map8(buf: &mut [f32], f: impl Fn(__m256, usize) -> __m256) {
        let n = buf.len();
        let n8 = n / 8 * 8;
        let px = buf.as_mut_ptr();
        let mut i = 0;
        while i < n8 {
            _mm256_storeu_ps(px.add(i), f(_mm256_loadu_ps(px.add(i)), i));
            i += 8;
        }
        if n8 < n {
            let mut out = [0.0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), f(tail(buf, n8, 0.0), n8));
            buf[n8..].copy_from_slice(&out[..n - n8]);
        }
    }

    /// The 8 lanes of `v` from `i` on, padded with `fill` past the end.
    #[inline(always)]
    unsafe fn lanes(v: &[f32], i: usize, fill: f32) -> __m256 {
        if i + 8 <= v.len() {
            _mm256_loadu_ps(v.as_ptr().add(i))
        } else {
            tail(v, i, fill)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn grad(
        buf: &mut [f32],
        p: &GradParams<f32>,
        w: Option<&[f32]>,
        t: Option<&[f32]>,
        chain: Option<&[f32]>,
    ) {
        let vlse = _mm256_set1_ps(p.m);
        // g (and scale, without softcap) folded into the coefficients: g*chain*(a p - d w - e w t).
        let gs = if chain.is_some() { p.g } else { p.g * p.scale };
        // Unless a folded coefficient overflows f32 where its parts do not (z_loss at |lse|
        // ~ 1e33 and up): then inf * p would be NaN where p = 0, so the factor goes last.
        let fits = |k: f32| k * p.a.abs().max(p.d.abs()).max(p.e.abs()) <= f32::MAX;
        let (k, post) = if fits(gs.abs()) || !fits(1.0) { (gs, 1.0) } else { (1.0, gs) };
        let ga = _mm256_set1_ps(k * p.a);
        let gd = _mm256_set1_ps(k * p.d);
        let ge = _mm256_set1_ps(k * p.e);
        let core = |x: __m256, i: usize| {
            let prob = exp_le0(_mm256_sub_ps(x, vlse));
            match (w, t) {
                (None, None) => _mm256_fmsub_ps(ga, prob, gd),
                _ => {
                    let wv = w.map_or(_mm256_set1_ps(1.0), |w| lanes(w, i, 1.0));
                    let tv = t.map_or(_mm256_setzero_ps(), |t| lanes(t, i, 0.0));
                    let wt = _mm256_mul_ps(wv, _mm256_fmadd_ps(ge, tv, gd));
                    _mm256_fmsub_ps(ga, prob, wt)
                }
            }
        };
        if let Some(ch) = chain {
            map8(buf, |x, i| _mm256_mul_ps(lanes(ch, i, 0.0), core(x, i)));
        } else if w.is_none() && t.is_none() {
            // The common case gets its own loop: one FMA after the exponential.
            map8(buf, |x, _| _mm256_fmsub_ps(ga, exp_le0(_mm256_sub_ps(x, vlse)), gd));
        } else {
            map8(buf, core);
        }
        if post != 1.0 {
            let vp = _mm256_set1_ps(post);
            map8(buf, |x, _| _mm256_mul_ps(vp, x));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
        let n = src.len();
        let n8 = n / 8 * 8;
        let mut i = 0;
        while i < n8 {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for j in n8..n {
            let h = _mm_set1_epi16(src[j] as i16);
            dst[j] = _mm_cvtss_f32(_mm_cvtph_ps(h));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f32_to_f16(src: &[f32], dst: &mut [u16]) {
        let n = src.len();
        let n8 = n / 8 * 8;
        let mut i = 0;
        while i < n8 {
            let h = _mm256_cvtps_ph(_mm256_loadu_ps(src.as_ptr().add(i)), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            i += 8;
        }
        for j in n8..n {
            let h = _mm_cvtps_ph(_mm_set1_ps(src[j]), _MM_FROUND_TO_NEAREST_INT);
            dst[j] = _mm_extract_epi16(h, 0) as u16;
        }
    }
}

pub use imp::{f16_to_f32, f32_to_f16};

// Every method is safe to call: an `Avx2` value exists only on CPUs that have the features.
impl Kernels<f32> for Avx2 {
    fn level(self) -> Level {
        Level::Avx2
    }
    fn transform(self, buf: &mut [f32], scale: f32, softcap: f32, chain: Option<&mut [f32]>) {
        unsafe { imp::transform(buf, scale, softcap, chain) }
    }
    fn max_nan(self, buf: &[f32]) -> (f32, bool) {
        unsafe { imp::max_nan(buf) }
    }
    fn sum_exp(self, buf: &[f32], m: f32) -> f64 {
        unsafe { imp::sum_exp(buf, m) }
    }
    fn sum_exp_max(self, buf: &[f32], m: f32) -> Option<(f64, f32)> {
        unsafe { imp::sum_exp_max(buf, m) }
    }
    fn sum(self, buf: &[f32]) -> f64 {
        unsafe { imp::dot_shift(buf, None, 0.0) }
    }
    fn dot_shift(self, x: &[f32], w: Option<&[f32]>, m: f32) -> f64 {
        unsafe { imp::dot_shift(x, w, m) }
    }
    fn grad(
        self,
        buf: &mut [f32],
        p: &GradParams<f32>,
        w: Option<&[f32]>,
        t: Option<&[f32]>,
        chain: Option<&[f32]>,
    ) {
        unsafe { imp::grad(buf, p, w, t, chain) }
    }
}
