//! The row algorithms (statistics pass, gradient pass) of every loss, generic over the
//! compute type and the kernel set; no pyo3 types. The kernel set is chosen once per
//! call, here, from `arch::current()`.

pub mod binary;
pub mod kl;
pub mod plain;
pub mod rows;
