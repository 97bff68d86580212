//! The CUDA kernel sources (kernels/*.cu), embedded at build time so the wheel ships
//! them inside `_core` and the GPU engine needs no files beside the package.

use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;

/// (file name, source text); include_str! makes cargo rebuild when a file changes.
const KERNELS: &[(&str, &str)] = &[
    ("ce.cu", include_str!("../kernels/ce.cu")),
    ("eval.cu", include_str!("../kernels/eval.cu")),
    ("binary.cu", include_str!("../kernels/binary.cu")),
    ("kl.cu", include_str!("../kernels/kl.cu")),
];

/// The embedded source of the kernel file `name` (e.g. "ce.cu"), byte for byte.
#[pyfunction]
pub fn kernel_source(name: &str) -> PyResult<&'static str> {
    KERNELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, src)| *src)
        .ok_or_else(|| {
            PyKeyError::new_err(format!(
                "no embedded kernel file {name:?}; have {:?}",
                kernel_names()
            ))
        })
}

/// Names of the embedded kernel files.
#[pyfunction]
pub fn kernel_names() -> Vec<&'static str> {
    KERNELS.iter().map(|(n, _)| *n).collect()
}
