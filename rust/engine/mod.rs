//! The row algorithms (statistics pass, gradient pass) of every loss, generic over the
//! compute type and the kernel set; no pyo3 types. The kernel set is chosen once per
//! call, here, from `arch::current()`.

pub mod binary;
pub mod kl;
pub mod plain;
pub mod rows;

use crate::arch::{self, scalar::Scalar, Kernels, Level};

/// A pass over f32 lanes, run by `with_f32_kernels` on the kernel set chosen for the call.
pub trait F32Pass {
    type Out;
    fn run<K: Kernels<f32>>(self, k: K) -> Self::Out;
}

/// Runs `pass` on the f32 kernel set `arch::current()` names: the one place the choice
/// is made, so every row algorithm gets the same set.
pub fn with_f32_kernels<P: F32Pass>(pass: P) -> P::Out {
    #[cfg(target_arch = "x86_64")]
    {
        use arch::x86_64::{avx2::Avx2, avx512::Avx512};
        match arch::current() {
            Level::Avx512 => {
                if let Some(k) = Avx512::new() {
                    return pass.run(k);
                }
            }
            Level::Avx2 => {
                if let Some(k) = Avx2::new() {
                    return pass.run(k);
                }
            }
            Level::Scalar => {}
        }
    }
    pass.run(Scalar)
}
