//! Instruction-set dispatch: one module per instruction set, chosen once per call
//! at run time. The scalar path is always available and forced with
//! `CE_FAST_SIMD=scalar` (or `ce_fast._core.set_simd("scalar")`) so CI tests both.

#[cfg(target_arch = "x86_64")]
pub mod avx2;
pub mod scalar;

use crate::float::Float;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Level {
    Scalar,
    Avx2,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
        }
    }
}

// 0 = not decided yet, 1 = scalar forced, 2 = best available.
static CHOICE: AtomicU8 = AtomicU8::new(0);

pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The level used for the next call.
pub fn current() -> Level {
    let mut c = CHOICE.load(Ordering::Relaxed);
    if c == 0 {
        let forced = std::env::var("CE_FAST_SIMD").map(|v| v.eq_ignore_ascii_case("scalar"));
        c = if forced.unwrap_or(false) { 1 } else { 2 };
        CHOICE.store(c, Ordering::Relaxed);
    }
    if c == 1 {
        Level::Scalar
    } else {
        detected()
    }
}

/// f16 bits -> f32, with F16C when the level allows.
pub fn f16_to_f32(level: Level, src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 {
        // Level::Avx2 is only reported after detection found F16C.
        return unsafe { avx2::f16_to_f32(src, dst) };
    }
    let _ = level;
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(x).to_f32();
    }
}

/// f32 -> f16 bits (round to nearest even), with F16C when the level allows.
pub fn f32_to_f16(level: Level, src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 {
        return unsafe { avx2::f32_to_f16(src, dst) };
    }
    let _ = level;
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(x).to_bits();
    }
}

/// Returns false for an unknown name.
pub fn set(name: &str) -> bool {
    let c = match name {
        "scalar" => 1,
        "auto" | "avx2" => 2,
        _ => return false,
    };
    CHOICE.store(c, Ordering::Relaxed);
    true
}

/// Per-chunk kernels over a buffer of the compute type (the chunk is in L1).
pub trait Kernels<F: Float>: Copy + Send + Sync {
    fn level(self) -> Level;
    /// `x -> scale * x`, then `softcap * tanh(x / softcap)` when `softcap > 0`; `chain`
    /// (softcap only) receives the derivative `scale * (1 - tanh^2)`.
    fn transform(self, buf: &mut [F], scale: F, softcap: F, chain: Option<&mut [F]>);
    /// Largest value ignoring NaN, and whether a NaN was seen.
    fn max_nan(self, buf: &[F]) -> (F, bool);
    /// sum(exp(x - m)) for finite `m`.
    fn sum_exp(self, buf: &[F], m: F) -> f64;
    /// One pass for sum(exp(x - m)) against a stale maximum `m` and the chunk's
    /// own maximum (NaN skipped; a NaN makes the sum NaN). The sum is only
    /// meaningful when the returned maximum is below m + 88. None: not offered.
    fn sum_exp_max(self, _buf: &[F], _m: F) -> Option<(f64, F)> {
        None
    }
    fn sum(self, buf: &[F]) -> f64;
    /// sum(w * (x - m)) in f64, the differences included, w = 1 when `None`.
    fn dot_shift(self, x: &[F], w: Option<&[F]>, m: F) -> f64;
    /// In place: `g * chain * (a * exp(x - m) - d * w - e * w * t)`, where `w` is 1
    /// without weights and `chain` the derivative of the transform (`scale` when None).
    fn grad(self, buf: &mut [F], p: &GradParams<F>, w: Option<&[F]>, t: Option<&[F]>, chain: Option<&[F]>);
}

#[derive(Clone, Copy)]
pub struct GradParams<F> {
    pub m: F,
    pub a: F,
    pub g: F,
    pub d: F,
    pub e: F,
    pub scale: F,
}
