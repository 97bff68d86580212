//! AVX2 + FMA + F16C kernels for f32 lanes. The exponential is the bottleneck on
//! CPUs without AVX-512, so it is a degree-5 FMA polynomial for 2^f with the
//! exponent added into the float's bits, and the sums run four independent
//! accumulators.

use crate::arch::{GradParams, Kernels, Level};
use crate::elem::DType;

use std::arch::x86_64::*;

#[derive(Clone, Copy)]
pub struct Avx2 {
    _private: (),
}

impl Avx2 {
    /// Only constructed after run-time detection says the CPU has AVX2, FMA and F16C.
    pub fn new() -> Option<Avx2> {
        (crate::arch::detected() == Level::Avx2).then_some(Avx2 { _private: () })
    }
}

/// The kernels proper. Each `pub unsafe fn` asks its caller for a CPU with AVX2, FMA and
/// F16C (it is compiled for them); slices are read and written only within their bounds
/// unless its `# Safety` section names a length the caller must ensure.
mod imp {
    use super::*;

    /// 2^t for -126 <= t <= 127 (NaN passes through): 2^n * p(t - n), p a degree-5
    /// minimax polynomial (relative error 1.9e-7), 2^n added into the exponent bits.
    // The coefficients are the fitted minimax values, written as fitted, not ln 2 et al.
    #[allow(clippy::approx_constant, clippy::excessive_precision)]
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

    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn transform(
        buf: &mut [f32],
        scale: f32,
        softcap: f32,
        mut chain: Option<&mut [f32]>,
    ) {
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

    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
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

    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn sum_exp(buf: &[f32], m: f32) -> f64 {
        match sum_exp_impl::<false, f32>(buf, m) {
            Some((s, _)) => s,
            None => sum_exp_sub(buf, m),
        }
    }

    /// sum(exp(x - m)) and max(x) (NaN skipped) in one pass; None when m*log2e does
    /// not round to float32 within `MAX_RHO` (|m| beyond ~1.9e8). Terms above exp(88)
    /// are garbage: callers check the max.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn sum_exp_max(buf: &[f32], m: f32) -> Option<(f64, f32)> {
        sum_exp_impl::<true, f32>(buf, m)
    }

    /// Stored element types read straight into f32 lanes: the conversion happens in
    /// registers inside the fused loops, with no round trip through a buffer.
    pub trait Load: Copy {
        /// 8 elements at `p` as f32 lanes.
        ///
        /// # Safety
        /// The CPU has AVX2, FMA and F16C, and `p` points at 8 readable elements.
        unsafe fn load8(p: *const Self) -> __m256;
        /// 16 elements at `p` as two vectors of f32 lanes, in any order (for sums and maxima).
        ///
        /// # Safety
        /// The CPU has AVX2, FMA and F16C, and `p` points at 16 readable elements.
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> (__m256, __m256) {
            // SAFETY: the caller's obligation: 16 readable elements from p.
            unsafe { (Self::load8(p), Self::load8(p.add(8))) }
        }
        fn to_f32(self) -> f32;
    }

    impl Load for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: the caller's obligation (8 readable f32 at p; unaligned load).
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            self
        }
    }

    /// bfloat16 bits: the upper half of an f32, widened by a shift.
    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub struct Bf16(pub u16);

    impl Load for Bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const Bf16) -> __m256 {
            // SAFETY: the caller's obligation (8 readable bf16 at p; unaligned load).
            unsafe {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
        }
        /// One 256-bit load: the even elements shifted into the high halves, the odd ones
        /// already there once the low halves are cleared (one operation per 8 each).
        #[inline(always)]
        unsafe fn load16(p: *const Bf16) -> (__m256, __m256) {
            // SAFETY: the caller's obligation (16 readable bf16 at p; unaligned load).
            unsafe {
                let v = _mm256_loadu_si256(p as *const __m256i);
                let even = _mm256_slli_epi32(v, 16);
                let odd = _mm256_and_si256(v, _mm256_set1_epi32(-65536));
                (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
            }
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            crate::elem::bf16_to_f32(self.0)
        }
    }

    /// IEEE half bits, widened by F16C.
    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub struct F16(pub u16);

    impl Load for F16 {
        #[inline(always)]
        unsafe fn load8(p: *const F16) -> __m256 {
            // SAFETY: the caller's obligation (8 readable f16 at p, a CPU with F16C).
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            half::f16::from_bits(self.0).to_f32()
        }
    }

    /// `sum_exp_max` over stored elements of any `Load` type.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn sum_exp_max_of<L: Load>(buf: &[L], m: f32) -> Option<(f64, f32)> {
        sum_exp_impl::<true, L>(buf, m)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sum_exp_impl<const MAX: bool, L: Load>(buf: &[L], m: f32) -> Option<(f64, f32)> {
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
            let (x0, x1) = L::load16(p.add(i));
            let (x2, x3) = L::load16(p.add(i + 16));
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
            let x0 = L::load8(p.add(i));
            if MAX {
                mx0 = _mm256_max_ps(x0, mx0);
            }
            a0 = _mm256_add_ps(a0, term(x0));
            i += 8;
        }
        let mut s = hsum_f64(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        s *= (rho * std::f64::consts::LN_2).exp();
        let mut rest = [f32::NEG_INFINITY; 8];
        for (r, x) in rest.iter_mut().zip(&buf[i..]) {
            *r = x.to_f32();
        }
        let rest = &rest[..buf.len() - i];
        let mut best = f32::NEG_INFINITY;
        if MAX {
            let mut v = [0.0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), _mm256_max_ps(mx0, mx1));
            best = v
                .iter()
                .chain(rest)
                .copied()
                .fold(best, |a, b| if b > a { b } else { a });
        }
        Some((s + tail_sum_exp(rest, 0, m), best))
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
            a0 = _mm256_add_ps(
                a0,
                exp_sum_term(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm)),
            );
            i += 8;
        }
        hsum_f64(a0) + tail_sum_exp(buf, i, m)
    }

    /// sum(w * (x - m)) (w = 1 when None) in f64 lanes, the differences included:
    /// 3e38 - (-3e38) does not fit in f32, and terms near it neither overflow nor cancel.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and `w`, when given, is at least as long as `x`.
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

    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
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
        let (k, post) = folded(gs, p);
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
            map8(buf, |x, _| {
                _mm256_fmsub_ps(ga, exp_le0(_mm256_sub_ps(x, vlse)), gd)
            });
        } else {
            map8(buf, core);
        }
        if post != 1.0 {
            let vp = _mm256_set1_ps(post);
            map8(buf, |x, _| _mm256_mul_ps(vp, x));
        }
    }

    /// Stored element types written from f32 lanes, rounded to nearest even in registers.
    pub trait Store: Load {
        /// Writes 8 lanes at `p`.
        ///
        /// # Safety
        /// The CPU has AVX2, FMA and F16C, and `p` points at 8 writable elements.
        unsafe fn store8(p: *mut Self, v: __m256);
        fn from_f32(x: f32) -> Self;
    }

    impl Store for f32 {
        #[inline(always)]
        unsafe fn store8(p: *mut f32, v: __m256) {
            // SAFETY: the caller's obligation (8 writable f32 at p; unaligned store).
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        fn from_f32(x: f32) -> f32 {
            x
        }
    }

    impl Store for Bf16 {
        /// Round to nearest even as `elem::f32_to_bf16`, NaN kept quiet.
        #[inline(always)]
        unsafe fn store8(p: *mut Bf16, v: __m256) {
            // SAFETY: the caller's obligation (8 writable bf16 at p; unaligned store).
            unsafe {
                let b = _mm256_castps_si256(v);
                let hi = _mm256_srli_epi32(b, 16);
                let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
                let r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
                let r = _mm256_srli_epi32(r, 16);
                let nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
                let quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
                let r = _mm256_blendv_epi8(r, quiet, nan);
                // Every lane is below 2^16, so the saturating pack keeps it exactly.
                let h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
                _mm_storeu_si128(p as *mut __m128i, h)
            }
        }
        #[inline(always)]
        fn from_f32(x: f32) -> Bf16 {
            Bf16(crate::elem::f32_to_bf16(x))
        }
    }

    impl Store for F16 {
        #[inline(always)]
        unsafe fn store8(p: *mut F16, v: __m256) {
            // SAFETY: the caller's obligation (8 writable f16 at p, a CPU with F16C).
            unsafe {
                let h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
                _mm_storeu_si128(p as *mut __m128i, h)
            }
        }
        #[inline(always)]
        fn from_f32(x: f32) -> F16 {
            F16(half::f16::from_f32(x).to_bits())
        }
    }

    /// The common gradient `g * scale * (a * exp(x - m) - d)` (no weights, soft target or
    /// softcap) from `n` stored elements at `src` into `dst`, converted in registers both
    /// ways: each 8 are read before they are written, so `dst` may be `src` itself.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `src` holds `n` readable elements and `dst` `n`
    /// writable ones, either disjoint or the same memory.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn grad_plain_of<L: Store>(
        src: *const L,
        dst: *mut L,
        n: usize,
        p: &GradParams<f32>,
    ) {
        let (k, post) = folded(p.g * p.scale, p);
        let vlse = _mm256_set1_ps(p.m);
        let ga = _mm256_set1_ps(k * p.a);
        let gd = _mm256_set1_ps(k * p.d);
        let vp = _mm256_set1_ps(post);
        let f = |x: __m256| {
            let v = _mm256_fmsub_ps(ga, exp_le0(_mm256_sub_ps(x, vlse)), gd);
            if post != 1.0 {
                _mm256_mul_ps(vp, v)
            } else {
                v
            }
        };
        let n8 = n / 8 * 8;
        let mut i = 0;
        while i < n8 {
            L::store8(dst.add(i), f(L::load8(src.add(i))));
            i += 8;
        }
        if i < n {
            let mut t = [0.0f32; 8];
            for (j, v) in t.iter_mut().enumerate().take(n - i) {
                *v = (*src.add(i + j)).to_f32();
            }
            let mut o = [0.0f32; 8];
            _mm256_storeu_ps(o.as_mut_ptr(), f(_mm256_loadu_ps(t.as_ptr())));
            for (j, &v) in o.iter().enumerate().take(n - i) {
                *dst.add(i + j) = L::from_f32(v);
            }
        }
    }

    /// (k, post): the factor `gs` folded into the coefficients, unless a folded coefficient
    /// overflows f32 where its parts do not (z_loss at |lse| ~ 1e33 and up): then inf * p
    /// would be NaN where p = 0, so the factor goes last (`post`).
    #[inline(always)]
    fn folded(gs: f32, p: &GradParams<f32>) -> (f32, f32) {
        let fits = |k: f32| k * p.a.abs().max(p.d.abs()).max(p.e.abs()) <= f32::MAX;
        if fits(gs.abs()) || !fits(1.0) {
            (gs, 1.0)
        } else {
            (1.0, gs)
        }
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and `dst` is at least as long as `src`.
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

    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and `dst` is at least as long as `src`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f32_to_f16(src: &[f32], dst: &mut [u16]) {
        let n = src.len();
        let n8 = n / 8 * 8;
        let mut i = 0;
        while i < n8 {
            let h = _mm256_cvtps_ph(
                _mm256_loadu_ps(src.as_ptr().add(i)),
                _MM_FROUND_TO_NEAREST_INT,
            );
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

// Every method is safe to call: an `Avx2` value exists only on CPUs that have the features
// (its one constructor, `new`, checks), and the kernels stay within their slices' bounds.
impl Kernels<f32> for Avx2 {
    fn level(self) -> Level {
        Level::Avx2
    }
    fn transform(self, buf: &mut [f32], scale: f32, softcap: f32, chain: Option<&mut [f32]>) {
        // SAFETY: an Avx2 value exists only where detection found AVX2, FMA and F16C.
        unsafe { imp::transform(buf, scale, softcap, chain) }
    }
    fn max_nan(self, buf: &[f32]) -> (f32, bool) {
        // SAFETY: an Avx2 value exists only where detection found AVX2, FMA and F16C.
        unsafe { imp::max_nan(buf) }
    }
    fn sum_exp(self, buf: &[f32], m: f32) -> f64 {
        // SAFETY: an Avx2 value exists only where detection found AVX2, FMA and F16C.
        unsafe { imp::sum_exp(buf, m) }
    }
    fn sum_exp_max(self, buf: &[f32], m: f32) -> Option<(f64, f32)> {
        // SAFETY: an Avx2 value exists only where detection found AVX2, FMA and F16C.
        unsafe { imp::sum_exp_max(buf, m) }
    }
    fn sum_exp_max_half(self, src: &[u16], bf16: bool, m: f32) -> Option<(f64, f32)> {
        let n = src.len();
        // SAFETY: an Avx2 value exists only where detection found AVX2, FMA and F16C; Bf16
        // and F16 are repr(transparent) over u16, so the slice is the same n elements.
        unsafe {
            if bf16 {
                let s = std::slice::from_raw_parts(src.as_ptr() as *const imp::Bf16, n);
                imp::sum_exp_max_of(s, m)
            } else {
                let s = std::slice::from_raw_parts(src.as_ptr() as *const imp::F16, n);
                imp::sum_exp_max_of(s, m)
            }
        }
    }
    unsafe fn grad_stored(
        self,
        dtype: DType,
        src: *const u8,
        dst: *mut u8,
        n: usize,
        p: &GradParams<f32>,
    ) -> bool {
        // SAFETY: an Avx2 value exists only where detection found AVX2, FMA and F16C; the
        // caller vouches for `n` elements of `dtype` at both addresses (see the trait).
        unsafe {
            match dtype {
                DType::F32 => imp::grad_plain_of(src as *const f32, dst as *mut f32, n, p),
                DType::BF16 => {
                    imp::grad_plain_of(src as *const imp::Bf16, dst as *mut imp::Bf16, n, p)
                }
                DType::F16 => {
                    imp::grad_plain_of(src as *const imp::F16, dst as *mut imp::F16, n, p)
                }
                DType::F64 => return false,
            }
        }
        true
    }
    fn sum(self, buf: &[f32]) -> f64 {
        // SAFETY: an Avx2 value exists only where detection found AVX2, FMA and F16C.
        unsafe { imp::dot_shift(buf, None, 0.0) }
    }
    fn dot_shift(self, x: &[f32], w: Option<&[f32]>, m: f32) -> f64 {
        // A short `w` panics here, as in the scalar kernels, instead of being read past its end.
        let w = w.map(|w| &w[..x.len()]);
        // SAFETY: an Avx2 value exists only where detection found AVX2, FMA and F16C, and
        // `w` now has exactly x.len() elements.
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
        // SAFETY: an Avx2 value exists only where detection found AVX2, FMA and F16C.
        unsafe { imp::grad(buf, p, w, t, chain) }
    }
}

#[cfg(test)]
mod tests {
    use super::imp::{self, Bf16, F16};
    use super::*;
    use crate::arch::scalar::Scalar;
    use crate::elem::f32_to_bf16;

    fn avx2() -> Option<Avx2> {
        let k = Avx2::new();
        if k.is_none() {
            eprintln!("skipped: this CPU lacks AVX2, FMA or F16C");
        }
        k
    }

    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 2003) as f32 * 0.013 - 13.0)
            .collect();
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0 + f32::EPSILON * 64.0, // a bf16 tie
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7f7f_ffff),
            f32::from_bits(0x0000_0001),
        ]);
        v
    }

    #[test]
    fn bf16_store_rounds_as_the_scalar_conversion() {
        let Some(_) = avx2() else { return };
        let src = values();
        let mut got = vec![Bf16(0); src.len()];
        for (i, chunk) in src.chunks(8).enumerate() {
            let mut lanes = [0.0f32; 8];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut out = [Bf16(0); 8];
            // SAFETY: the CPU has AVX2 (checked); both arrays hold 8 elements.
            unsafe {
                <Bf16 as imp::Store>::store8(out.as_mut_ptr(), _mm256_loadu_ps(lanes.as_ptr()))
            };
            got[i * 8..i * 8 + chunk.len()].copy_from_slice(&out[..chunk.len()]);
        }
        for (x, b) in src.iter().zip(&got) {
            assert_eq!(b.0, f32_to_bf16(*x), "{x:e}");
        }
    }

    #[test]
    fn half_loads_match_the_scalar_conversions() {
        let Some(_) = avx2() else { return };
        let src = values();
        let bf: Vec<Bf16> = src.iter().map(|&x| Bf16(f32_to_bf16(x))).collect();
        let hf: Vec<F16> = src
            .iter()
            .map(|&x| F16(half::f16::from_f32(x).to_bits()))
            .collect();
        for i in (0..src.len() - 8).step_by(8) {
            let mut a = [0.0f32; 8];
            let mut b = [0.0f32; 8];
            // SAFETY: the CPU has AVX2 and F16C (checked); 8 elements from i are in bounds.
            unsafe {
                _mm256_storeu_ps(
                    a.as_mut_ptr(),
                    <Bf16 as imp::Load>::load8(bf.as_ptr().add(i)),
                );
                _mm256_storeu_ps(
                    b.as_mut_ptr(),
                    <F16 as imp::Load>::load8(hf.as_ptr().add(i)),
                );
            }
            for j in 0..8 {
                assert_eq!(a[j].to_bits(), imp::Load::to_f32(bf[i + j]).to_bits());
                assert_eq!(b[j].to_bits(), imp::Load::to_f32(hf[i + j]).to_bits());
            }
        }
    }

    /// The in-register half paths give exactly what converting into an f32 buffer first gives.
    #[test]
    fn half_kernels_equal_the_buffer_route() {
        let Some(k) = avx2() else { return };
        for n in [1usize, 7, 8, 31, 32, 33, 100, 2048] {
            let x: Vec<f32> = values()
                .into_iter()
                .filter(|v| v.is_finite() && v.abs() < 20.0)
                .cycle()
                .take(n)
                .collect();
            let bf: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
            let wide: Vec<f32> = bf.iter().map(|&b| crate::elem::bf16_to_f32(b)).collect();
            let m = 3.0f32;
            // The same terms, summed in other lanes: equal maxima, sums to rounding.
            let (a, am) = Kernels::<f32>::sum_exp_max_half(k, &bf, true, m).unwrap();
            let (b, bm) = Kernels::<f32>::sum_exp_max(k, &wide, m).unwrap();
            assert_eq!(am, bm);
            assert!((a - b).abs() <= 1e-6 * b, "{a} vs {b}");
            let hf: Vec<u16> = wide
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let hw: Vec<f32> = hf
                .iter()
                .map(|&h| half::f16::from_bits(h).to_f32())
                .collect();
            assert_eq!(
                Kernels::<f32>::sum_exp_max_half(k, &hf, false, m),
                Kernels::<f32>::sum_exp_max(k, &hw, m)
            );
            let p = GradParams {
                m: 5.0,
                a: 0.7,
                g: 0.25,
                d: 0.01,
                e: 0.0,
                scale: 1.0,
            };
            let mut buf = wide.clone();
            Kernels::<f32>::grad(k, &mut buf, &p, None, None, None);
            let want: Vec<u16> = buf.iter().map(|&v| f32_to_bf16(v)).collect();
            let mut got = bf.clone();
            // SAFETY: n bf16 elements, read and written in place (the same memory).
            let done = unsafe {
                k.grad_stored(
                    DType::BF16,
                    got.as_ptr() as *const u8,
                    got.as_mut_ptr() as *mut u8,
                    n,
                    &p,
                )
            };
            assert!(done);
            assert_eq!(got, want, "n = {n}");
            // And the AVX2 gradient agrees with the scalar reference to a few ulp.
            let mut reference = wide.clone();
            Kernels::<f32>::grad(Scalar, &mut reference, &p, None, None, None);
            // Relative to the terms' size: a * p and d cancel where p is near d / a.
            for ((a, b), &z) in buf.iter().zip(&reference).zip(&wide) {
                let size = p.g as f64 * (p.a as f64 * (z as f64 - p.m as f64).exp() + p.d as f64);
                assert!(((a - b) as f64).abs() <= 1e-6 * size, "{a} vs {b}");
            }
        }
    }
}
