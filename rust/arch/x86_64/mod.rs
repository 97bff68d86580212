//! x86-64 kernel sets, each compiled with `#[target_feature]` and chosen at run time.

pub mod avx2;
pub mod avx512;
