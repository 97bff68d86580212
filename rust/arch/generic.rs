//! The f32 kernels, written once over the lane trait. The exponential is the
//! bottleneck, so it is a degree-5 FMA polynomial for 2^f with the exponent added into
//! the float's bits; the streaming loops keep few registers live (AVX2 has 16: a spill
//! costs more than a shared accumulator) and prefetch ahead of DRAM.
//!
//! Every function here is `unsafe fn` and `#[inline(always)]`: a kernel set's
//! `#[target_feature]` entry points (made by `kernel_set!`) inline them, so each is
//! compiled for that set. Callers guarantee the CPU has the set; slices are read and
//! written only within their bounds unless a `# Safety` section names a length.

use super::lanes::{Lanes, MAX_LANES};
use super::{Fused, GradParams};

/// Stored element types read straight into f32 lanes and written back from them: the
/// conversion happens in registers inside the fused loops.
pub trait Stored: Copy {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// N elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// The CPU has `L`'s set, and `p` points at N readable elements.
    unsafe fn load<L: Lanes>(p: *const Self) -> L::V;
    /// 2N elements at `p` as two vectors, in any order (for sums and maxima).
    ///
    /// # Safety
    /// The CPU has `L`'s set, and `p` points at 2N readable elements.
    #[inline(always)]
    unsafe fn load2<L: Lanes>(p: *const Self) -> (L::V, L::V) {
        (Self::load::<L>(p), Self::load::<L>(p.add(L::N)))
    }
    /// N lanes into N elements at `p`, rounded to nearest even.
    ///
    /// # Safety
    /// The CPU has `L`'s set, and `p` points at N writable elements.
    unsafe fn store<L: Lanes>(p: *mut Self, v: L::V);
    /// Whether `store2` puts `load2`'s two vectors back where they came from: then a pass
    /// may work on the pairs (bf16: only where the set's pair store is the faster one).
    #[inline(always)]
    fn pairs<L: Lanes>() -> bool {
        true
    }
    /// The inverse of `load2`, where `pairs` says so.
    ///
    /// # Safety
    /// The CPU has `L`'s set, and `p` points at 2N writable elements.
    #[inline(always)]
    unsafe fn store2<L: Lanes>(p: *mut Self, a: L::V, b: L::V) {
        Self::store::<L>(p, a);
        Self::store::<L>(p.add(L::N), b);
    }
}

impl Stored for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load<L: Lanes>(p: *const f32) -> L::V {
        L::load(p)
    }
    #[inline(always)]
    unsafe fn store<L: Lanes>(p: *mut f32, v: L::V) {
        L::store(p, v)
    }
}

/// bfloat16 bits: the upper half of an f32.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Stored for Bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        crate::elem::bf16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Bf16 {
        Bf16(crate::elem::f32_to_bf16(x))
    }
    #[inline(always)]
    unsafe fn load<L: Lanes>(p: *const Bf16) -> L::V {
        L::load_bf16(p as *const u16)
    }
    #[inline(always)]
    unsafe fn load2<L: Lanes>(p: *const Bf16) -> (L::V, L::V) {
        L::load_bf16_2(p as *const u16)
    }
    #[inline(always)]
    unsafe fn store<L: Lanes>(p: *mut Bf16, v: L::V) {
        L::store_bf16(p as *mut u16, v)
    }
    #[inline(always)]
    fn pairs<L: Lanes>() -> bool {
        L::BF16_PAIRS
    }
    #[inline(always)]
    unsafe fn store2<L: Lanes>(p: *mut Bf16, a: L::V, b: L::V) {
        L::store_bf16_2(p as *mut u16, a, b)
    }
}

/// IEEE half bits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub struct F16(pub u16);

impl Stored for F16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
    #[inline(always)]
    fn from_f32(x: f32) -> F16 {
        F16(half::f16::from_f32(x).to_bits())
    }
    #[inline(always)]
    unsafe fn load<L: Lanes>(p: *const F16) -> L::V {
        L::load_f16(p as *const u16)
    }
    #[inline(always)]
    unsafe fn store<L: Lanes>(p: *mut F16, v: L::V) {
        L::store_f16(p as *mut u16, v)
    }
}

/// 2^t for -126 <= t <= 127 (NaN passes through): 2^n * p(t - n), n = t rounded to
/// nearest even, p a degree-5 minimax polynomial (relative error 1.9e-7), 2^n added into
/// the exponent bits.
// The coefficients are the fitted minimax values, written as fitted, not ln 2 et al.
#[allow(clippy::approx_constant, clippy::excessive_precision)]
#[inline(always)]
unsafe fn exp2_core<L: Lanes>(t: L::V) -> L::V {
    // n >= -126 and p >= 1 when n == -126, so 2^n * p stays a normal float.
    if L::ROUND_SPLIT {
        let n = L::round(t);
        L::ldexp_add(exp2_poly::<L>(L::sub(t, n)), n)
    } else {
        // Adding 1.5 * 2^23 rounds t to an integer n held in the low mantissa bits (the
        // same n: ties to even either way); n << 23 shifts the magic's own bits out.
        let magic = L::splat(12_582_912.0);
        let nf = L::add(t, magic);
        L::shl23_add(exp2_poly::<L>(L::sub(t, L::sub(nf, magic))), nf)
    }
}

/// 2^f for |f| <= 1/2, Horner's rule (Estrin's scheme measured slower: one more FMA).
#[allow(clippy::approx_constant, clippy::excessive_precision)]
#[inline(always)]
unsafe fn exp2_poly<L: Lanes>(f: L::V) -> L::V {
    let mut p = L::splat(1.326_472_4e-3);
    p = L::fmadd(p, f, L::splat(9.671_513e-3));
    p = L::fmadd(p, f, L::splat(5.550_733_6e-2));
    p = L::fmadd(p, f, L::splat(2.402_224_2e-1));
    p = L::fmadd(p, f, L::splat(6.931_470e-1));
    L::fmadd(p, f, L::splat(1.0))
}

/// How far ahead of the loads the streaming loops ask for cache lines: a row read from
/// DRAM otherwise stalls the exponential's long dependency chains (measured on Zen 3: 2.98
/// -> 3.68 Gelem/s for one thread's fused sum; 1 and 2 KiB gave 3.4 and 3.5).
const PREFETCH_BYTES: usize = 4096;

/// Prefetches the lines `PREFETCH_BYTES` past the `bytes` bytes a trip reads from `p`.
#[inline(always)]
unsafe fn prefetch_ahead<L: Lanes>(p: *const u8, bytes: usize) {
    let mut o = 0;
    while o < bytes {
        L::prefetch(p.wrapping_add(PREFETCH_BYTES + o));
        o += 64;
    }
}

/// exp(x) for x <= 0 inside sums: below -87.3 it returns ~1e-38 instead of 0,
/// which no sum that holds its own maximum (exp(0) = 1) can notice.
#[inline(always)]
unsafe fn exp_sum_term<L: Lanes>(x: L::V) -> L::V {
    let t = L::mul(x, L::splat(std::f32::consts::LOG2_E));
    // max returns its second operand on NaN, so NaN flows through.
    exp2_core::<L>(L::max(L::splat(-126.0), t))
}

/// (exp(x), where it is a true exponential) for x <= 92: below -87.3 (-inf included)
/// the value is ~1e-38 and the mask is off; NaN lanes keep the mask on.
#[inline(always)]
unsafe fn exp_masked<L: Lanes>(x: L::V) -> (L::V, L::M) {
    let t = L::mul(x, L::splat(std::f32::consts::LOG2_E));
    let lo = L::splat(-126.0);
    let keep = L::nlt(t, lo);
    (exp2_core::<L>(L::max(lo, t)), keep)
}

/// exp(x) for x <= 0 with an exact 0 below -87.3 (so -inf gives 0), NaN kept.
#[inline(always)]
unsafe fn exp_le0<L: Lanes>(x: L::V) -> L::V {
    let (v, keep) = exp_masked::<L>(x);
    L::and_mask(v, keep)
}

/// (c * tanh(u), 1 - tanh(u)^2) with u = x / c, via e = exp(-2|u|) (no overflow):
/// tanh = (1 - e)/(1 + e), 1 - tanh^2 = 4e/(1 + e)^2 (no cancellation when tanh
/// saturates), and a series for tanh near 0, where 1 - e cancels.
#[inline(always)]
unsafe fn softcap_v<L: Lanes>(x: L::V, c: L::V, inv_c: L::V) -> (L::V, L::V) {
    let u = L::mul(x, inv_c);
    let a = L::abs(u);
    let e = exp_le0::<L>(L::mul(a, L::splat(-2.0)));
    let one = L::splat(1.0);
    let q = L::div(one, L::add(one, e));
    let t_big = L::mul(L::sub(one, e), q);
    let dt = L::mul(L::mul(L::splat(4.0), e), L::mul(q, q));
    let a2 = L::mul(a, a);
    let mut p = L::splat(-17.0 / 315.0);
    p = L::fmadd(p, a2, L::splat(2.0 / 15.0));
    p = L::fmadd(p, a2, L::splat(-1.0 / 3.0));
    let t_small = L::fmadd(L::mul(p, a2), a, a);
    let small = L::lt(a, L::splat(0.0625));
    let t = L::blend(t_big, t_small, small);
    let t = L::or_sign(t, u);
    (L::mul(c, t), dt)
}

/// Horizontal sum of the lanes in f64.
#[inline(always)]
unsafe fn hsum_f64<L: Lanes>(v: L::V) -> f64 {
    L::hsum_d(L::add_d(L::lo_d(v), L::hi_d(v)))
}

/// The largest lane (the accumulators the kernels reduce hold no NaN).
#[inline(always)]
unsafe fn hmax<L: Lanes>(v: L::V) -> f32 {
    let mut m = [0.0f32; MAX_LANES];
    L::store(m.as_mut_ptr(), v);
    m[..L::N]
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// The last < N elements from `start`, padded with `fill`.
#[inline(always)]
unsafe fn tail<L: Lanes>(buf: &[f32], start: usize, fill: f32) -> L::V {
    let mut t = [fill; MAX_LANES];
    t[..buf.len() - start].copy_from_slice(&buf[start..]);
    L::load(t.as_ptr())
}

/// The N lanes of `v` from `i` on, padded with `fill` past the end.
#[inline(always)]
unsafe fn lanes<L: Lanes>(v: &[f32], i: usize, fill: f32) -> L::V {
    if i + L::N <= v.len() {
        L::load(v.as_ptr().add(i))
    } else {
        tail::<L>(v, i, fill)
    }
}

#[inline(always)]
pub unsafe fn transform<L: Lanes>(
    buf: &mut [f32],
    scale: f32,
    softcap: f32,
    mut chain: Option<&mut [f32]>,
) {
    if softcap > 0.0 {
        let s = L::splat(scale);
        let c = L::splat(softcap);
        let inv_c = L::splat(1.0 / softcap);
        let n = buf.len();
        let mut i = 0;
        let mut tmp = [0.0f32; 2 * MAX_LANES];
        while i < n {
            // The tail (< N elements) is padded; every vector goes through `tmp`.
            let x = lanes::<L>(buf, i, 0.0);
            let (v, dt) = softcap_v::<L>(L::mul(x, s), c, inv_c);
            let len = (n - i).min(L::N);
            L::store(tmp.as_mut_ptr(), v);
            L::store(tmp.as_mut_ptr().add(L::N), L::mul(dt, s));
            buf[i..i + len].copy_from_slice(&tmp[..len]);
            if let Some(ch) = chain.as_deref_mut() {
                ch[i..i + len].copy_from_slice(&tmp[L::N..L::N + len]);
            }
            i += L::N;
        }
    } else {
        for x in buf.iter_mut() {
            *x *= scale;
        }
    }
}

#[inline(always)]
pub unsafe fn max_nan<L: Lanes>(buf: &[f32]) -> (f32, bool) {
    let n2 = buf.len() / (2 * L::N) * (2 * L::N);
    let p = buf.as_ptr();
    let mut m0 = L::splat(f32::NEG_INFINITY);
    let mut m1 = m0;
    let mut nan = L::mask_none();
    let mut i = 0;
    while i < n2 {
        prefetch_ahead::<L>(p.add(i) as *const u8, 2 * L::N * std::mem::size_of::<f32>());
        let a = L::load(p.add(i));
        let b = L::load(p.add(i + L::N));
        // max(x, acc) returns acc when x is NaN: NaN is skipped here, flagged below.
        m0 = L::max(a, m0);
        m1 = L::max(b, m1);
        nan = L::mask_or(nan, L::unord(a, b));
        i += 2 * L::N;
    }
    let mut best = hmax::<L>(L::max(m0, m1));
    let mut has_nan = L::mask_any(nan);
    for &x in &buf[n2..] {
        if x > best {
            best = x;
        }
        has_nan |= x.is_nan();
    }
    (best, has_nan)
}

#[inline(always)]
pub unsafe fn sum_exp<L: Lanes>(buf: &[f32], m: f32) -> f64 {
    match sum_exp_impl::<L, false, f32>(buf, m) {
        Some((s, _)) => s,
        None => sum_exp_sub::<L>(buf, m),
    }
}

/// sum(exp(x - m)) and max(x) (NaN skipped) in one pass over stored elements of any
/// `Stored` type; None when m*log2e does not round to float32 within `MAX_RHO` (|m|
/// beyond ~1.9e8). Terms above exp(88) are garbage: callers check the max.
#[inline(always)]
pub unsafe fn sum_exp_max<L: Lanes, S: Stored>(buf: &[S], m: f32) -> Option<(f64, f32)> {
    sum_exp_impl::<L, true, S>(buf, m)
}

#[inline(always)]
unsafe fn sum_exp_impl<L: Lanes, const MAX: bool, S: Stored>(
    buf: &[S],
    m: f32,
) -> Option<(f64, f32)> {
    let log2e = std::f32::consts::LOG2_E;
    let ml = m * log2e;
    // t = x*log2e - fl(m*log2e) in one FMA; the rounding of fl(m*log2e) is the same
    // for every term, so it is a factor 2^-rho on the sum, undone exactly in f64.
    let rho = ml as f64 - m as f64 * log2e as f64;
    // Past MAX_RHO the shifted terms leave exp2_core's range (ulp(ml) grows with |m|).
    if rho.is_nan() || rho.abs() > MAX_RHO {
        return None;
    }
    let n = L::N;
    let n2 = buf.len() / (2 * n) * (2 * n);
    let p = buf.as_ptr();
    let vl = L::splat(log2e);
    let vml = L::splat(-ml);
    let lo = L::splat(-126.0);
    let mut a0 = L::splat(0.0);
    let mut mx0 = L::splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n2 {
        prefetch_ahead::<L>(p.add(i) as *const u8, 2 * n * std::mem::size_of::<S>());
        let (x0, x1) = S::load2::<L>(p.add(i));
        if MAX {
            // max(x, acc) returns acc when x is NaN: NaN shows in the sum instead.
            mx0 = L::max(x0, mx0);
            mx0 = L::max(x1, mx0);
        }
        // One accumulator, the trip's pair added first: one add per trip waits on the
        // last (the pair's terms are far from ready), and a register stays free.
        let pair = L::add(
            sum_term::<L>(x0, vl, vml, lo),
            sum_term::<L>(x1, vl, vml, lo),
        );
        a0 = L::add(a0, pair);
        i += 2 * n;
    }
    while i + n <= buf.len() {
        let x0 = S::load::<L>(p.add(i));
        if MAX {
            mx0 = L::max(x0, mx0);
        }
        a0 = L::add(a0, sum_term::<L>(x0, vl, vml, lo));
        i += n;
    }
    let mut s = hsum_f64::<L>(a0);
    s *= (rho * std::f64::consts::LN_2).exp();
    let mut rest = [f32::NEG_INFINITY; MAX_LANES];
    for (r, x) in rest.iter_mut().zip(&buf[i..]) {
        *r = x.to_f32();
    }
    let rest = &rest[..buf.len() - i];
    let mut best = f32::NEG_INFINITY;
    if MAX {
        best = rest
            .iter()
            .copied()
            .fold(hmax::<L>(mx0), |a, b| if b > a { b } else { a });
    }
    Some((s + tail_sum_exp::<L>(rest, 0, m), best))
}

/// One term 2^max(-126, x * log2e - ml) of the one-pass sum.
#[inline(always)]
unsafe fn sum_term<L: Lanes>(x: L::V, vl: L::V, vml: L::V, lo: L::V) -> L::V {
    exp2_core::<L>(L::max(lo, L::fmadd(x, vl, vml)))
}

/// Largest |fl(m*log2e) - m*log2e| the one-pass sum takes. Terms are 2^(t - rho) with
/// t <= log2(e^FUSED_MAX_JUMP) = 92.3, and a lane adds up to 1025 of them (a chunk of at
/// most rows::LONG_CHUNK = 8192 in trips of two vectors of 8 lanes, and the remainder)
/// before the f64 sum: 2^(92.3 + 16 + 10.1) stays below f32's 2^128, and the 2^-126 floor of the smallest terms becomes at most 2^-110, far
/// below the max's own term 1.
const MAX_RHO: f64 = 16.0;

/// The last < N terms, padded with -inf, through the exact-zero exp.
#[inline(always)]
unsafe fn tail_sum_exp<L: Lanes>(buf: &[f32], i: usize, m: f32) -> f64 {
    if i == buf.len() {
        return 0.0;
    }
    let x = tail::<L>(buf, i, f32::NEG_INFINITY);
    hsum_f64::<L>(exp_le0::<L>(L::sub(x, L::splat(m))))
}

/// sum(exp(x - m)) with the subtraction first: for |m| too large for m*log2e.
#[inline(always)]
unsafe fn sum_exp_sub<L: Lanes>(buf: &[f32], m: f32) -> f64 {
    let p = buf.as_ptr();
    let vm = L::splat(m);
    let mut a0 = L::splat(0.0);
    let mut i = 0;
    while i + L::N <= buf.len() {
        a0 = L::add(a0, exp_sum_term::<L>(L::sub(L::load(p.add(i)), vm)));
        i += L::N;
    }
    hsum_f64::<L>(a0) + tail_sum_exp::<L>(buf, i, m)
}

/// sum(w * (x - m)) (w = 1 when None) in f64 lanes, the differences included:
/// 3e38 - (-3e38) does not fit in f32, and terms near it neither overflow nor cancel.
///
/// # Safety
/// `w`, when given, is at least as long as `x`.
#[inline(always)]
pub unsafe fn dot_shift<L: Lanes>(x: &[f32], w: Option<&[f32]>, m: f32) -> f64 {
    let n = x.len();
    let nv = n / L::N * L::N;
    let px = x.as_ptr();
    let vm = L::splat_d(m as f64);
    let mut s0 = L::splat_d(0.0);
    let mut s1 = s0;
    let mut i = 0;
    while i < nv {
        let xv = L::load(px.add(i));
        let dlo = L::sub_d(L::lo_d(xv), vm);
        let dhi = L::sub_d(L::hi_d(xv), vm);
        match w {
            Some(w) => {
                let wv = L::load(w.as_ptr().add(i));
                s0 = L::fmadd_d(L::lo_d(wv), dlo, s0);
                s1 = L::fmadd_d(L::hi_d(wv), dhi, s1);
            }
            None => {
                s0 = L::add_d(s0, dlo);
                s1 = L::add_d(s1, dhi);
            }
        }
        i += L::N;
    }
    let mut total = L::hsum_d(L::add_d(s0, s1));
    for j in nv..n {
        total += w.map_or(1.0, |w| w[j] as f64) * (x[j] as f64 - m as f64);
    }
    total
}

/// Applies `$f` (an expression of the lanes `$x` at offset `$i`) to every N lanes of
/// `$buf` in place; the tail is padded with 0. A macro, not a closure: a closure is a
/// function of its own, compiled without the kernel set's target features.
macro_rules! map_lanes {
    ($L:ty, $buf:expr, |$x:ident, $i:ident| $f:expr) => {{
        let buf: &mut [f32] = $buf;
        let n = buf.len();
        let nv = n / <$L>::N * <$L>::N;
        let px = buf.as_mut_ptr();
        let mut $i = 0;
        while $i < nv {
            let $x = <$L>::load(px.add($i));
            <$L>::store(px.add($i), $f);
            $i += <$L>::N;
        }
        if nv < n {
            let mut out = [0.0f32; MAX_LANES];
            let ($x, $i) = (tail::<$L>(buf, nv, 0.0), nv);
            <$L>::store(out.as_mut_ptr(), $f);
            buf[nv..].copy_from_slice(&out[..n - nv]);
        }
    }};
}

#[inline(always)]
pub unsafe fn grad<L: Lanes>(
    buf: &mut [f32],
    p: &GradParams<f32>,
    w: Option<&[f32]>,
    t: Option<&[f32]>,
    chain: Option<&[f32]>,
) {
    let vlse = L::splat(p.m);
    // g (and scale, without softcap) folded into the coefficients: g*chain*(a p - d w - e w t).
    let gs = if chain.is_some() { p.g } else { p.g * p.scale };
    let (k, post) = folded(gs, p);
    let ga = L::splat(k * p.a);
    let gd = L::splat(k * p.d);
    let ge = L::splat(k * p.e);
    if let Some(ch) = chain {
        map_lanes!(L, buf, |x, i| L::mul(
            lanes::<L>(ch, i, 0.0),
            grad_core::<L>(x, i, vlse, ga, gd, ge, w, t)
        ));
    } else if w.is_none() && t.is_none() {
        // The common case gets its own loop: one FMA after the exponential.
        map_lanes!(L, buf, |x, _i| L::fmsub(
            ga,
            exp_le0::<L>(L::sub(x, vlse)),
            gd
        ));
    } else {
        map_lanes!(L, buf, |x, i| grad_core::<L>(x, i, vlse, ga, gd, ge, w, t));
    }
    if post != 1.0 {
        let vp = L::splat(post);
        map_lanes!(L, buf, |x, _i| L::mul(vp, x));
    }
}

/// `ga * exp(x - m) - w * (gd + ge * t)` for the lanes at offset `i`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn grad_core<L: Lanes>(
    x: L::V,
    i: usize,
    vlse: L::V,
    ga: L::V,
    gd: L::V,
    ge: L::V,
    w: Option<&[f32]>,
    t: Option<&[f32]>,
) -> L::V {
    let prob = exp_le0::<L>(L::sub(x, vlse));
    if w.is_none() && t.is_none() {
        return L::fmsub(ga, prob, gd);
    }
    let wv = match w {
        Some(w) => lanes::<L>(w, i, 1.0),
        None => L::splat(1.0),
    };
    let tv = match t {
        Some(t) => lanes::<L>(t, i, 0.0),
        None => L::splat(0.0),
    };
    let wt = L::mul(wv, L::fmadd(ge, tv, gd));
    L::fmsub(ga, prob, wt)
}

/// The common gradient `g * scale * (a * exp(x - m) - d)` (no weights, soft target or
/// softcap) from `n` stored elements at `src` into `dst`, converted in registers both
/// ways: each trip's elements are read before they are written, so `dst` may be `src`
/// itself.
///
/// # Safety
/// `src` holds `n` readable elements and `dst` `n` writable ones, either disjoint or the
/// same memory.
#[inline(always)]
pub unsafe fn grad_plain<L: Lanes, S: Stored>(
    src: *const S,
    dst: *mut S,
    n: usize,
    p: &GradParams<f32>,
) {
    let (k, post) = folded(p.g * p.scale, p);
    let vlse = L::splat(p.m);
    let ga = L::splat(k * p.a);
    let gd = L::splat(k * p.d);
    let vp = L::splat(post);
    let nv = n / L::N * L::N;
    let mut i = 0;
    if S::pairs::<L>() {
        while i + 2 * L::N <= n {
            prefetch_ahead::<L>(src.add(i) as *const u8, 2 * L::N * std::mem::size_of::<S>());
            let (a, b) = S::load2::<L>(src.add(i));
            S::store2::<L>(
                dst.add(i),
                plain_term::<L>(a, vlse, ga, gd, vp, post),
                plain_term::<L>(b, vlse, ga, gd, vp, post),
            );
            i += 2 * L::N;
        }
    }
    while i < nv {
        prefetch_ahead::<L>(src.add(i) as *const u8, L::N * std::mem::size_of::<S>());
        S::store::<L>(
            dst.add(i),
            plain_term::<L>(S::load::<L>(src.add(i)), vlse, ga, gd, vp, post),
        );
        i += L::N;
    }
    if i < n {
        let mut t = [0.0f32; MAX_LANES];
        for (j, v) in t.iter_mut().enumerate().take(n - i) {
            *v = (*src.add(i + j)).to_f32();
        }
        let mut o = [0.0f32; MAX_LANES];
        L::store(
            o.as_mut_ptr(),
            plain_term::<L>(L::load(t.as_ptr()), vlse, ga, gd, vp, post),
        );
        for (j, &v) in o.iter().enumerate().take(n - i) {
            *dst.add(i + j) = S::from_f32(v);
        }
    }
}

/// `post * (ga * exp(x - m) - gd)`, the multiplication skipped when `post` is 1.
#[inline(always)]
unsafe fn plain_term<L: Lanes>(
    x: L::V,
    vlse: L::V,
    ga: L::V,
    gd: L::V,
    vp: L::V,
    post: f32,
) -> L::V {
    let v = L::fmsub(ga, exp_le0::<L>(L::sub(x, vlse)), gd);
    if post != 1.0 {
        L::mul(vp, v)
    } else {
        v
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

/// f16 bits -> f32, `dst` at least as long as `src`.
#[inline(always)]
pub unsafe fn f16_to_f32<L: Lanes>(src: &[u16], dst: &mut [f32]) {
    let n = src.len();
    let nv = n / L::N * L::N;
    let mut i = 0;
    while i < nv {
        L::store(dst.as_mut_ptr().add(i), L::load_f16(src.as_ptr().add(i)));
        i += L::N;
    }
    for j in nv..n {
        // Exact, as the vector widening.
        dst[j] = half::f16::from_bits(src[j]).to_f32();
    }
}

/// f32 -> f16 bits (round to nearest even), `dst` at least as long as `src`.
#[inline(always)]
pub unsafe fn f32_to_f16<L: Lanes>(src: &[f32], dst: &mut [u16]) {
    let n = src.len();
    let nv = n / L::N * L::N;
    let mut i = 0;
    while i < nv {
        L::store_f16(dst.as_mut_ptr().add(i), L::load(src.as_ptr().add(i)));
        i += L::N;
    }
    if nv < n {
        // The tail through the same vector rounding.
        let mut o = [0u16; MAX_LANES];
        L::store_f16(o.as_mut_ptr(), tail::<L>(src, nv, 0.0));
        dst[nv..n].copy_from_slice(&o[..n - nv]);
    }
}

/// Accumulators of one lane group of `kl_chunk`: the two sums, the cross term, the
/// maxima, the NaN mask.
#[derive(Clone, Copy)]
struct KlAcc<L: Lanes> {
    sr: L::V,
    so: L::V,
    x: L::V,
    mr: L::V,
    mo: L::V,
    nan: L::M,
}

/// One vector of raw values r, o: maxima and the cross term unscaled (the caller
/// scales them by s once), the exponentials of s * x - m.
#[inline(always)]
unsafe fn kl_step<L: Lanes>(acc: &mut KlAcc<L>, r: L::V, o: L::V, vs: L::V, vmr: L::V, vmo: L::V) {
    // max(x, acc) returns acc when x is NaN: NaN is skipped here, flagged below.
    acc.mr = L::max(r, acc.mr);
    acc.mo = L::max(o, acc.mo);
    acc.nan = L::mask_or(acc.nan, L::unord(r, o));
    let (er, live) = exp_masked::<L>(L::fmsub(r, vs, vmr));
    let (eo, _) = exp_masked::<L>(L::fmsub(o, vs, vmo));
    acc.sr = L::add(acc.sr, er);
    acc.so = L::add(acc.so, eo);
    // Only true exponentials weigh r - o: a -inf logit (r - o inf or NaN) contributes 0.
    let term = L::mul(er, L::sub(r, o));
    acc.x = L::add(acc.x, L::and_mask(term, live));
}

/// The distillation KL's chunk (see `Kernels::kl_chunk`).
///
/// # Safety
/// `o` is at least as long as `r`.
#[inline(always)]
pub unsafe fn kl_chunk<L: Lanes>(r: &[f32], o: &[f32], s: f32, mr: f32, mo: f32) -> Fused<f32> {
    let n = r.len();
    let vs = L::splat(s);
    let (pr, po) = (r.as_ptr(), o.as_ptr());
    let (vmr, vmo) = (L::splat(mr), L::splat(mo));
    let zero = L::splat(0.0);
    let ninf = L::splat(f32::NEG_INFINITY);
    let none = L::mask_none();
    let new = KlAcc::<L> {
        sr: zero,
        so: zero,
        x: zero,
        mr: ninf,
        mo: ninf,
        nan: none,
    };
    // Two independent groups keep the adds free of one serial dependency.
    let (mut a0, mut a1) = (new, new);
    let mut i = 0;
    while i + 2 * L::N <= n {
        kl_step(
            &mut a0,
            L::load(pr.add(i)),
            L::load(po.add(i)),
            vs,
            vmr,
            vmo,
        );
        let j = i + L::N;
        kl_step(
            &mut a1,
            L::load(pr.add(j)),
            L::load(po.add(j)),
            vs,
            vmr,
            vmo,
        );
        i += 2 * L::N;
    }
    while i < n {
        // The tail padded with -inf: zero terms, no max, no NaN.
        let (mut tr, mut to) = (
            [f32::NEG_INFINITY; MAX_LANES],
            [f32::NEG_INFINITY; MAX_LANES],
        );
        let len = (n - i).min(L::N);
        tr[..len].copy_from_slice(&r[i..i + len]);
        to[..len].copy_from_slice(&o[i..i + len]);
        kl_step(
            &mut a0,
            L::load(tr.as_ptr()),
            L::load(to.as_ptr()),
            vs,
            vmr,
            vmo,
        );
        i += len;
    }
    // Scaling by s > 0 is monotonic, also after rounding: the max of the scaled values.
    Fused {
        sr: hsum_f64::<L>(L::add(a0.sr, a1.sr)),
        so: hsum_f64::<L>(L::add(a0.so, a1.so)),
        x: s as f64 * hsum_f64::<L>(L::add(a0.x, a1.x)),
        maxr: s * hmax::<L>(L::max(a0.mr, a1.mr)),
        maxo: s * hmax::<L>(L::max(a0.mo, a1.mo)),
        nan: L::mask_any(L::mask_or(a0.nan, a1.nan)),
    }
}

/// The `Kernels<f32>` implementation of a kernel set: `#[target_feature]` entry points
/// that inline the generic kernels over the set's lanes, and safe methods on the set's
/// zero-sized type, which exists only where detection found the features.
macro_rules! kernel_set {
    ($set:ident, $lanes:ty, $features:literal, $level:expr) => {
        /// The kernels proper, compiled for the set; each asks its caller for a CPU with it.
        mod entry {
            use super::*;
            use crate::arch::generic as g;
            use crate::arch::generic::{Bf16, F16};
            use crate::arch::{Fused, GradParams};

            #[target_feature(enable = $features)]
            pub unsafe fn transform(b: &mut [f32], s: f32, c: f32, ch: Option<&mut [f32]>) {
                g::transform::<$lanes>(b, s, c, ch)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn max_nan(b: &[f32]) -> (f32, bool) {
                g::max_nan::<$lanes>(b)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn sum_exp(b: &[f32], m: f32) -> f64 {
                g::sum_exp::<$lanes>(b, m)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn sum_exp_max(b: &[f32], m: f32) -> Option<(f64, f32)> {
                g::sum_exp_max::<$lanes, f32>(b, m)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn sum_exp_max_bf16(b: &[Bf16], m: f32) -> Option<(f64, f32)> {
                g::sum_exp_max::<$lanes, Bf16>(b, m)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn sum_exp_max_f16(b: &[F16], m: f32) -> Option<(f64, f32)> {
                g::sum_exp_max::<$lanes, F16>(b, m)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn dot_shift(x: &[f32], w: Option<&[f32]>, m: f32) -> f64 {
                g::dot_shift::<$lanes>(x, w, m)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn grad(
                b: &mut [f32],
                p: &GradParams<f32>,
                w: Option<&[f32]>,
                t: Option<&[f32]>,
                ch: Option<&[f32]>,
            ) {
                g::grad::<$lanes>(b, p, w, t, ch)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn grad_plain<S: g::Stored>(
                src: *const S,
                dst: *mut S,
                n: usize,
                p: &GradParams<f32>,
            ) {
                g::grad_plain::<$lanes, S>(src, dst, n, p)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
                g::f16_to_f32::<$lanes>(src, dst)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn f32_to_f16(src: &[f32], dst: &mut [u16]) {
                g::f32_to_f16::<$lanes>(src, dst)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn binary_chunk(
                kind: crate::engine::binary::Kind,
                c: &crate::engine::binary::Chunk<f32>,
                loss: &mut [f32],
                grad: Option<&mut [f32]>,
            ) -> f64 {
                crate::arch::binary::chunk::<$lanes>(kind, c, loss, grad)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn kl_chunk(r: &[f32], o: &[f32], s: f32, mr: f32, mo: f32) -> Fused<f32> {
                g::kl_chunk::<$lanes>(r, o, s, mr, mo)
            }
        }

        impl $set {
            /// f16 bits -> f32, as many as the shorter slice holds.
            pub fn f16_to_f32(self, src: &[u16], dst: &mut [f32]) {
                let n = src.len().min(dst.len());
                // SAFETY: a value of this type exists only where detection found the set's
                // features, and both slices hold n elements.
                unsafe { entry::f16_to_f32(&src[..n], &mut dst[..n]) }
            }
            /// f32 -> f16 bits (round to nearest even), as many as the shorter slice holds.
            pub fn f32_to_f16(self, src: &[f32], dst: &mut [u16]) {
                let n = src.len().min(dst.len());
                // SAFETY: as in `f16_to_f32`.
                unsafe { entry::f32_to_f16(&src[..n], &mut dst[..n]) }
            }
        }

        // Every method is safe to call: a value of the set's type exists only on CPUs that
        // have the features (its one constructor checks), and the kernels stay within
        // their slices' bounds.
        impl crate::arch::Kernels<f32> for $set {
            fn level(self) -> crate::arch::Level {
                $level
            }
            fn transform(
                self,
                buf: &mut [f32],
                scale: f32,
                softcap: f32,
                chain: Option<&mut [f32]>,
            ) {
                // SAFETY: the value exists only where detection found the set's features.
                unsafe { entry::transform(buf, scale, softcap, chain) }
            }
            fn max_nan(self, buf: &[f32]) -> (f32, bool) {
                // SAFETY: the value exists only where detection found the set's features.
                unsafe { entry::max_nan(buf) }
            }
            fn sum_exp(self, buf: &[f32], m: f32) -> f64 {
                // SAFETY: the value exists only where detection found the set's features.
                unsafe { entry::sum_exp(buf, m) }
            }
            fn sum_exp_max(self, buf: &[f32], m: f32) -> Option<(f64, f32)> {
                // SAFETY: the value exists only where detection found the set's features.
                unsafe { entry::sum_exp_max(buf, m) }
            }
            fn sum_exp_max_half(self, src: &[u16], bf16: bool, m: f32) -> Option<(f64, f32)> {
                let n = src.len();
                let p = src.as_ptr();
                // SAFETY: the value exists only where detection found the set's features;
                // Bf16 and F16 are repr(transparent) over u16, so each slice is the same n
                // elements.
                unsafe {
                    if bf16 {
                        entry::sum_exp_max_bf16(
                            std::slice::from_raw_parts(p as *const crate::arch::generic::Bf16, n),
                            m,
                        )
                    } else {
                        entry::sum_exp_max_f16(
                            std::slice::from_raw_parts(p as *const crate::arch::generic::F16, n),
                            m,
                        )
                    }
                }
            }
            unsafe fn grad_stored(
                self,
                dtype: crate::elem::DType,
                src: *const u8,
                dst: *mut u8,
                n: usize,
                p: &crate::arch::GradParams<f32>,
            ) -> bool {
                use crate::elem::DType;
                // SAFETY: the value exists only where detection found the set's features;
                // the caller vouches for `n` elements of `dtype` at both addresses.
                unsafe {
                    match dtype {
                        DType::F32 => entry::grad_plain(src as *const f32, dst as *mut f32, n, p),
                        DType::BF16 => entry::grad_plain(
                            src as *const crate::arch::generic::Bf16,
                            dst as *mut crate::arch::generic::Bf16,
                            n,
                            p,
                        ),
                        DType::F16 => entry::grad_plain(
                            src as *const crate::arch::generic::F16,
                            dst as *mut crate::arch::generic::F16,
                            n,
                            p,
                        ),
                        DType::F64 => return false,
                    }
                }
                true
            }
            fn sum(self, buf: &[f32]) -> f64 {
                // SAFETY: the value exists only where detection found the set's features.
                unsafe { entry::dot_shift(buf, None, 0.0) }
            }
            fn dot_shift(self, x: &[f32], w: Option<&[f32]>, m: f32) -> f64 {
                // A short `w` panics here, as in the scalar kernels, instead of being read
                // past its end.
                let w = w.map(|w| &w[..x.len()]);
                // SAFETY: the value exists only where detection found the set's features,
                // and `w` now has exactly x.len() elements.
                unsafe { entry::dot_shift(x, w, m) }
            }
            fn grad(
                self,
                buf: &mut [f32],
                p: &crate::arch::GradParams<f32>,
                w: Option<&[f32]>,
                t: Option<&[f32]>,
                chain: Option<&[f32]>,
            ) {
                // SAFETY: the value exists only where detection found the set's features.
                unsafe { entry::grad(buf, p, w, t, chain) }
            }
            fn binary_chunk(
                self,
                kind: crate::engine::binary::Kind,
                c: &crate::engine::binary::Chunk<f32>,
                loss: &mut [f32],
                grad: Option<&mut [f32]>,
            ) -> Option<f64> {
                // SAFETY: the value exists only where detection found the set's features;
                // the chunk's slices are indexed with bounds checks.
                Some(unsafe { entry::binary_chunk(kind, c, loss, grad) })
            }
            fn kl_chunk(
                self,
                r: &[f32],
                o: &[f32],
                s: f32,
                mr: f32,
                mo: f32,
            ) -> crate::arch::Fused<f32> {
                // A short `o` panics here instead of being read past its end.
                let o = &o[..r.len()];
                // SAFETY: the value exists only where detection found the set's features,
                // and `o` now has exactly r.len() elements.
                unsafe { entry::kl_chunk(r, o, s, mr, mo) }
            }
        }
    };
}
pub(crate) use kernel_set;
