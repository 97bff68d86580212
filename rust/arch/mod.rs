//! Instruction-set dispatch: one module per instruction set, chosen once per call
//! at run time. The scalar path is always available and forced with
//! `CE_FAST_SIMD=scalar` (or `ce_fast._core.set_simd("scalar")`) so CI tests both.
//! CE_FAST_SIMD takes "scalar", "auto" or "avx2" in any case; anything else fails
//! the import, so a typo never silently means "auto".

pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

use crate::elem::DType;
use crate::float::Float;
use std::sync::atomic::{AtomicBool, Ordering};

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

// false = best available (the default), true = scalar forced.
static SCALAR: AtomicBool = AtomicBool::new(false);

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
    if SCALAR.load(Ordering::Relaxed) {
        Level::Scalar
    } else {
        detected()
    }
}

/// f16 bits -> f32, with F16C when the level allows; as many as the shorter slice holds.
pub fn f16_to_f32(level: Level, src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 && detected() == Level::Avx2 {
        let n = src.len().min(dst.len());
        // SAFETY: detection (cached, re-checked here because any code can name Level::Avx2)
        // found AVX2, FMA and F16C, and both slices hold n elements.
        return unsafe { x86_64::avx2::f16_to_f32(&src[..n], &mut dst[..n]) };
    }
    let _ = level;
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(x).to_f32();
    }
}

/// f32 -> f16 bits (round to nearest even), with F16C when the level allows; as many
/// as the shorter slice holds.
pub fn f32_to_f16(level: Level, src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 && detected() == Level::Avx2 {
        let n = src.len().min(dst.len());
        // SAFETY: as in `f16_to_f32`: the CPU has F16C, and both slices hold n elements.
        return unsafe { x86_64::avx2::f32_to_f16(&src[..n], &mut dst[..n]) };
    }
    let _ = level;
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(x).to_bits();
    }
}

/// Chooses the kernels by name: "scalar", "auto" or "avx2", in any case. `what` names
/// the setting in the error. "avx2" is refused on a CPU without it rather than
/// quietly running something else.
pub fn set(name: &str, what: &str) -> Result<(), String> {
    let scalar = match name.to_ascii_lowercase().as_str() {
        "scalar" => true,
        "auto" => false,
        // AVX2 is the best level there is, so forcing it is "auto" where the CPU has it.
        "avx2" if detected() == Level::Avx2 => false,
        "avx2" => {
            return Err(format!(
                "{what}='avx2' needs a CPU with AVX2, FMA and F16C, which this one lacks; use 'auto' or 'scalar'"
            ))
        }
        _ => {
            return Err(format!(
                "{what} must be 'scalar', 'auto' or 'avx2' (any case), got '{}'",
                name.escape_debug()
            ))
        }
    };
    SCALAR.store(scalar, Ordering::Relaxed);
    Ok(())
}

/// Applies CE_FAST_SIMD once, at import; unset or empty means "auto".
pub fn init_from_env() -> Result<(), String> {
    const VAR: &str = "CE_FAST_SIMD";
    match std::env::var_os(VAR) {
        None => Ok(()),
        Some(v) if v.is_empty() => Ok(()),
        Some(v) => match v.to_str() {
            Some(name) => set(name, VAR),
            None => Err(format!(
                "{VAR} must be 'scalar', 'auto' or 'avx2' (any case), got {v:?}"
            )),
        },
    }
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
    /// `sum_exp_max` over stored bfloat16 (`bf16`) or float16 bits, converted in
    /// registers. None: not offered (the caller converts into a buffer first).
    fn sum_exp_max_half(self, _src: &[u16], _bf16: bool, _m: F) -> Option<(f64, F)> {
        None
    }
    /// The gradient of the common case (`grad` without weights, soft target or softcap)
    /// from `n` stored elements of `dtype` at `src` into `dst`, converted in registers.
    /// false: not offered (nothing was written; the caller goes through a buffer).
    ///
    /// # Safety
    /// `src` holds `n` readable elements of `dtype`, unit stride and aligned for it, and
    /// `dst` `n` writable ones likewise; the two are disjoint or the same memory.
    unsafe fn grad_stored(
        self,
        _dtype: DType,
        _src: *const u8,
        _dst: *mut u8,
        _n: usize,
        _p: &GradParams<F>,
    ) -> bool {
        false
    }
    fn sum(self, buf: &[F]) -> f64;
    /// sum(w * (x - m)) in f64, the differences included, w = 1 when `None`.
    fn dot_shift(self, x: &[F], w: Option<&[F]>, m: F) -> f64;
    /// In place: `g * chain * (a * exp(x - m) - d * w - e * w * t)`, where `w` is 1
    /// without weights and `chain` the derivative of the transform (`scale` when None).
    fn grad(
        self,
        buf: &mut [F],
        p: &GradParams<F>,
        w: Option<&[F]>,
        t: Option<&[F]>,
        chain: Option<&[F]>,
    );
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
