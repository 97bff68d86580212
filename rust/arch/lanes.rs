//! The lane trait: the vector operations the kernels need, implemented once per
//! instruction set (x86_64/avx2.rs, x86_64/avx512.rs; aarch64/neon.rs later). The
//! kernels themselves (`generic.rs`) are written once over it.
//!
//! Every method is an `unsafe fn` marked `#[inline(always)]`: it may only run on a CPU
//! with the instruction set its type stands for, and it is inlined into the kernel
//! set's `#[target_feature]` entry points, where the intrinsics compile for that set.
//! Pointer arguments must address `N` (or `2 * N`, for the `_2` pairs) readable or
//! writable elements; they need no alignment.

/// The most lanes any set has (AVX-512: 16 f32); sizes the stack arrays of the tails.
pub const MAX_LANES: usize = 16;

/// `N` f32 lanes (`V`), a mask over them (`M`) and `N / 2` f64 lanes (`D`).
///
/// # Safety
/// An implementation's methods are sound only on CPUs with its instruction set and
/// with pointers to `N` (or `2 * N`) valid elements; kernels call them only from
/// the set's `#[target_feature]` entry points, reached after run-time detection.
pub unsafe trait Lanes: Copy + Send + Sync + 'static {
    const N: usize;
    /// Whether `exp2_core` splits t with `round` and `ldexp_add` (round + convert + shift:
    /// fewer dependent steps, fastest where rounding is one cheap operation, as on Zen 3)
    /// rather than with the 1.5 * 2^23 magic-number add (three adds, no rounding unit).
    /// Both give the same bits.
    const ROUND_SPLIT: bool;
    type V: Copy;
    type M: Copy;
    type D: Copy;

    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// max(a, b), b when either is NaN (the x86 rule the kernels rely on to skip NaN).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// a * b + c, one rounding.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// a * b - c, one rounding.
    unsafe fn fmsub(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// c - a * b, one rounding.
    unsafe fn fnmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Rounded to the nearest integer, ties to even.
    unsafe fn round(a: Self::V) -> Self::V;
    /// The bits of `y` plus those of the integer-valued `n` (|n| <= 126) shifted left by
    /// 23, as floats: 2^n * y.
    unsafe fn ldexp_add(y: Self::V, n: Self::V) -> Self::V;
    /// |a| (the sign bit cleared).
    unsafe fn abs(a: Self::V) -> Self::V;
    /// t with u's sign bit or-ed in.
    unsafe fn or_sign(t: Self::V, u: Self::V) -> Self::V;
    /// The bits of `p` plus the bits of `nf` shifted left by 23, as floats: 2^n * p when
    /// `nf`'s low mantissa bits hold the integer n.
    unsafe fn shl23_add(p: Self::V, nf: Self::V) -> Self::V;

    /// !(a < b): true where a >= b or either is NaN.
    unsafe fn nlt(a: Self::V, b: Self::V) -> Self::M;
    /// a < b, false where either is NaN.
    unsafe fn lt(a: Self::V, b: Self::V) -> Self::M;
    /// a >= b, false where either is NaN.
    unsafe fn ge(a: Self::V, b: Self::V) -> Self::M;
    /// a > b, false where either is NaN.
    unsafe fn gt(a: Self::V, b: Self::V) -> Self::M;
    /// Where a or b is NaN.
    unsafe fn unord(a: Self::V, b: Self::V) -> Self::M;
    unsafe fn mask_none() -> Self::M;
    unsafe fn mask_or(a: Self::M, b: Self::M) -> Self::M;
    unsafe fn mask_any(m: Self::M) -> bool;
    /// v where m, else 0.
    unsafe fn and_mask(v: Self::V, m: Self::M) -> Self::V;
    /// b where m, else a.
    unsafe fn blend(a: Self::V, b: Self::V, m: Self::M) -> Self::V;

    unsafe fn splat_d(x: f64) -> Self::D;
    /// The low / high N/2 lanes widened to f64.
    unsafe fn lo_d(v: Self::V) -> Self::D;
    unsafe fn hi_d(v: Self::V) -> Self::D;
    unsafe fn add_d(a: Self::D, b: Self::D) -> Self::D;
    unsafe fn sub_d(a: Self::D, b: Self::D) -> Self::D;
    unsafe fn fmadd_d(a: Self::D, b: Self::D, c: Self::D) -> Self::D;
    unsafe fn hsum_d(d: Self::D) -> f64;
    /// The N/2 f64 lanes into `p`.
    unsafe fn store_d(p: *mut f64, d: Self::D);

    /// N bfloat16 bits widened to f32 lanes.
    unsafe fn load_bf16(p: *const u16) -> Self::V;
    /// 2N bfloat16 bits as two vectors of f32 lanes: elements 2i and elements 2i + 1.
    unsafe fn load_bf16_2(p: *const u16) -> (Self::V, Self::V);
    /// N float16 bits widened to f32 lanes.
    unsafe fn load_f16(p: *const u16) -> Self::V;
    /// N lanes rounded to nearest even as `elem::f32_to_bf16` (NaN kept quiet).
    unsafe fn store_bf16(p: *mut u16, v: Self::V);
    /// N lanes rounded to nearest even as IEEE half.
    unsafe fn store_f16(p: *mut u16, v: Self::V);

    /// Whether `store_bf16_2` is faster than two `store_bf16` (the gradient pass then
    /// works on `load_bf16_2`'s pairs).
    const BF16_PAIRS: bool = false;
    /// The inverse of `load_bf16_2`: 2N elements at `p`, element 2i from `even`'s lane i
    /// and 2i + 1 from `odd`'s, each rounded as `store_bf16`. The default goes through
    /// memory, element by element.
    #[inline(always)]
    unsafe fn store_bf16_2(p: *mut u16, even: Self::V, odd: Self::V) {
        let (mut e, mut o) = ([0.0f32; MAX_LANES], [0.0f32; MAX_LANES]);
        Self::store(e.as_mut_ptr(), even);
        Self::store(o.as_mut_ptr(), odd);
        for i in 0..Self::N {
            *p.add(2 * i) = crate::elem::f32_to_bf16(e[i]);
            *p.add(2 * i + 1) = crate::elem::f32_to_bf16(o[i]);
        }
    }

    /// A hint to bring the cache line at `p` into L1; never faults, so `p` may lie past
    /// the end of the data. The default does nothing.
    #[inline(always)]
    unsafe fn prefetch(_p: *const u8) {}
}
