//! Kernel sets and their choice. The lane trait (`lanes.rs`) is implemented once per
//! instruction set (`x86_64/avx2.rs`, `x86_64/avx512.rs`; `aarch64/` holds the plan for
//! NEON), the f32 kernels are written once over it (`generic.rs`), and the scalar set
//! (`scalar.rs`, generic over f32 / f64, libm's exp) is the reference the others are
//! tested against. The set is chosen once per call (`engine::with_f32_kernels`).
//!
//! `CE_FAST_SIMD` (or `ce_fast._core.set_simd`) takes "scalar", "avx2", "avx512" or
//! "auto" in any case; anything else fails the import, so a typo never silently means
//! "auto", and forcing a set the CPU lacks is an error, not a quiet fallback.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub mod binary;
pub mod generic;
pub mod lanes;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

use crate::elem::DType;
use crate::float::Float;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Level {
    Scalar,
    Avx2,
    Avx512,
}

/// Every level, in order of preference (best last).
pub const LEVELS: [Level; 3] = [Level::Scalar, Level::Avx2, Level::Avx512];

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// What the CPU needs for this level, for error messages.
    fn needs(self) -> &'static str {
        match self {
            Level::Scalar => "nothing",
            Level::Avx2 => "AVX2, FMA and F16C",
            Level::Avx512 => "AVX-512 F, BW, VL and DQ",
        }
    }

    /// Whether this CPU can run the level's kernels (detected once).
    pub fn available(self) -> bool {
        self <= detected()
    }

    fn code(self) -> u8 {
        match self {
            Level::Scalar => 1,
            Level::Avx2 => 2,
            Level::Avx512 => 3,
        }
    }
}

impl PartialOrd for Level {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.code().cmp(&other.code()))
    }
}

// 0 = best available (the default), else the code of the forced level.
static FORCED: AtomicU8 = AtomicU8::new(0);

/// The best level this CPU has, detected once.
pub fn detected() -> Level {
    static BEST: OnceLock<Level> = OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if x86_64::avx512::has() {
                return Level::Avx512;
            }
            if x86_64::avx2::has() {
                return Level::Avx2;
            }
        }
        Level::Scalar
    })
}

/// The level used for the next call.
pub fn current() -> Level {
    match FORCED.load(Ordering::Relaxed) {
        0 => detected(),
        c => LEVELS
            .into_iter()
            .find(|l| l.code() == c)
            .unwrap_or(Level::Scalar),
    }
}

/// The features the kernel sets look for that this CPU has.
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if is_x86_feature_detected!($f) {
                    v.push($f);
                }
            )*};
        }
        probe!("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq");
        if x86_64::avx512::has_bf16() {
            v.push("avx512bf16");
        }
    }
    v
}

/// f16 bits -> f32, vectorised where the level allows; as many as the shorter slice holds.
pub fn f16_to_f32(level: Level, src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match level {
        Level::Avx512 => {
            if let Some(k) = x86_64::avx512::Avx512::new() {
                return k.f16_to_f32(src, dst);
            }
        }
        Level::Avx2 => {
            if let Some(k) = x86_64::avx2::Avx2::new() {
                return k.f16_to_f32(src, dst);
            }
        }
        Level::Scalar => {}
    }
    let _ = level;
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(x).to_f32();
    }
}

/// f32 -> f16 bits (round to nearest even), vectorised where the level allows; as many
/// as the shorter slice holds.
pub fn f32_to_f16(level: Level, src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    match level {
        Level::Avx512 => {
            if let Some(k) = x86_64::avx512::Avx512::new() {
                return k.f32_to_f16(src, dst);
            }
        }
        Level::Avx2 => {
            if let Some(k) = x86_64::avx2::Avx2::new() {
                return k.f32_to_f16(src, dst);
            }
        }
        Level::Scalar => {}
    }
    let _ = level;
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(x).to_bits();
    }
}

const ACCEPTED: &str = "'scalar', 'auto', 'avx2' or 'avx512' (any case)";

/// Chooses the kernels by name: "scalar", "auto", "avx2" or "avx512", in any case.
/// `what` names the setting in the error. A set the CPU lacks is refused rather than
/// quietly replaced by another.
pub fn set(name: &str, what: &str) -> Result<(), String> {
    let forced = match name.to_ascii_lowercase().as_str() {
        "auto" => None,
        "scalar" => Some(Level::Scalar),
        "avx2" => Some(Level::Avx2),
        "avx512" => Some(Level::Avx512),
        _ => {
            return Err(format!(
                "{what} must be {ACCEPTED}, got '{}'",
                name.escape_debug()
            ))
        }
    };
    if let Some(l) = forced {
        if !l.available() {
            return Err(format!(
                "{what}='{}' needs a CPU with {}, which this one lacks; use 'auto' (here: '{}')",
                l.name(),
                l.needs(),
                detected().name()
            ));
        }
    }
    FORCED.store(forced.map_or(0, Level::code), Ordering::Relaxed);
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
            None => Err(format!("{VAR} must be {ACCEPTED}, got {v:?}")),
        },
    }
}

/// One chunk's sums of the distillation KL against given maxima: sums of exp(r - mr),
/// exp(o - mo), the cross term sum exp(r - mr) (r - o) (terms with exp(r - mr) = 0
/// count as 0), the chunk's own maxima (NaN skipped) and whether a NaN was seen.
pub struct Fused<F> {
    pub sr: f64,
    pub so: f64,
    pub x: f64,
    pub maxr: F,
    pub maxo: F,
    pub nan: bool,
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
    /// The elementwise binary losses' chunk (see `engine::binary::scalar_chunk`): fills
    /// `loss[..n]` (and `grad[..n]`) and returns the sum of the losses in f64. None: not
    /// offered (nothing was written; the caller runs the scalar chunk).
    fn binary_chunk(
        self,
        _kind: crate::engine::binary::Kind,
        _c: &crate::engine::binary::Chunk<F>,
        _loss: &mut [F],
        _grad: Option<&mut [F]>,
    ) -> Option<f64> {
        None
    }
    /// The distillation KL's chunk over the values `s * r` and `s * o` (s = 1/T > 0,
    /// applied in registers) against the maxima `mr`, `mo`; the terms are only
    /// meaningful where the chunk's maxima stay below the given ones plus 88 (callers
    /// check the returned maxima). The default is the scalar reference.
    fn kl_chunk(self, r: &[F], o: &[F], s: F, mr: F, mo: F) -> Fused<F> {
        let (mut sr, mut so, mut x) = ([0.0f64; 2], [0.0f64; 2], [0.0f64; 2]);
        let (mut maxr, mut maxo, mut nan) = (F::NEG_INF, F::NEG_INF, false);
        for (i, (&ri, &oi)) in r.iter().zip(o).enumerate() {
            let k = i & 1;
            let (ri, oi) = (s * ri, s * oi);
            if ri > maxr {
                maxr = ri;
            }
            if oi > maxo {
                maxo = oi;
            }
            nan |= ri.is_nan() || oi.is_nan();
            let e = (ri - mr).exp();
            sr[k] += e.to_f64();
            so[k] += (oi - mo).exp().to_f64();
            if e.to_f64() != 0.0 {
                x[k] += (e * (ri - oi)).to_f64();
            }
        }
        Fused {
            sr: sr[0] + sr[1],
            so: so[0] + so[1],
            x: x[0] + x[1],
            maxr,
            maxo,
            nan,
        }
    }
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

#[cfg(test)]
mod tests;
