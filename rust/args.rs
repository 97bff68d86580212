//! Typed, checked arguments of the bindings. Arrays of logits are described by the
//! Python `Operand` itself (read by attribute); the O(rows) and O(classes) vectors are
//! NumPy arrays whose dtype, dimensionality, contiguity and length are checked here, so
//! a wrong Python argument is an exception, never a stray address. Adding an output
//! vector is one field in `Outputs` (and its attribute on `ce_fast._types.Stats`).

use crate::elem::{DType, Matrix};
use crate::engine::rows::StatsOut;
use numpy::{
    PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray1,
    PyReadwriteArray2, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

fn err(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// A slice needs aligned values; NumPy allows views at any byte offset.
fn aligned<T>(p: *const T, what: &str) -> PyResult<()> {
    if (p as usize).is_multiple_of(std::mem::align_of::<T>()) {
        Ok(())
    } else {
        Err(err(format!("{what}: values not aligned")))
    }
}

/// An array as `ce_fast._arrays.Operand` describes it: address, dtype code (None for
/// non-float arrays), shape and strides in elements; the class axis is the last.
#[derive(FromPyObject)]
pub struct ArrayDesc {
    pub ptr: usize,
    pub code: Option<u8>,
    pub shape: Vec<usize>,
    pub strides: Vec<isize>,
}

impl ArrayDesc {
    /// The rows-by-classes view the engine reads, after the checks it relies on.
    pub fn matrix(self, what: &str) -> PyResult<Matrix> {
        let dtype = match self.code {
            Some(c) => DType::from_code(c)
                .ok_or_else(|| err(format!("{what}: unsupported dtype code {c}")))?,
            None => return Err(err(format!("{what}: not a floating-point array"))),
        };
        let (Some(&cols), Some(&col_stride)) = (self.shape.last(), self.strides.last()) else {
            return Err(err(format!("{what}: no class axis (a 0-d array)")));
        };
        if self.shape.len() != self.strides.len() {
            return Err(err(format!("{what}: shape and strides differ in length")));
        }
        if cols == 0 {
            return Err(err(format!("{what}: zero classes")));
        }
        // The batch axes are the vectors less their last entry (no copy: small calls count).
        let (mut batch_shape, mut batch_strides) = (self.shape, self.strides);
        batch_shape.pop();
        batch_strides.pop();
        if self.ptr == 0 && batch_shape.iter().product::<usize>() > 0 {
            return Err(err(format!("{what}: null data pointer")));
        }
        Ok(Matrix {
            ptr: self.ptr,
            dtype,
            cols,
            col_stride,
            batch_shape,
            batch_strides,
        })
    }

    /// An operand read or written alongside the logits `x`: their classes and batch shape.
    pub fn like(self, x: &Matrix, what: &str) -> PyResult<Matrix> {
        let m = self.matrix(what)?;
        if m.cols != x.cols || m.batch_shape != x.batch_shape {
            let full = |m: &Matrix| -> Vec<usize> {
                m.batch_shape.iter().copied().chain([m.cols]).collect()
            };
            return Err(err(format!(
                "{what}: shape {:?} differs from the logits' {:?}",
                full(&m),
                full(x)
            )));
        }
        Ok(m)
    }
}

/// A read-only contiguous vector of exactly `len` values.
pub fn vector<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray1<'_, T>,
    len: usize,
    what: &str,
) -> PyResult<&'a [T]> {
    aligned(a.data(), what)?;
    let s = a
        .as_slice()
        .map_err(|_| err(format!("{what}: not a contiguous array")))?;
    if s.len() != len {
        return Err(err(format!("{what}: {} values, expected {len}", s.len())));
    }
    Ok(s)
}

/// The destination address of a writable contiguous vector of `len` values (0 for None).
pub fn destination<T: numpy::Element>(
    a: &mut Option<PyReadwriteArray1<'_, T>>,
    len: usize,
    what: &str,
) -> PyResult<usize> {
    match a {
        Some(a) => address_mut(a, len, what),
        None => Ok(0),
    }
}

/// A writable contiguous vector of exactly `len` values.
pub fn vector_mut<'a, T: numpy::Element>(
    a: &'a mut PyReadwriteArray1<'_, T>,
    len: usize,
    what: &str,
) -> PyResult<&'a mut [T]> {
    aligned(a.data(), what)?;
    if a.len() != len {
        return Err(err(format!("{what}: {} values, expected {len}", a.len())));
    }
    a.as_slice_mut()
        .map_err(|_| err(format!("{what}: not a contiguous array")))
}

/// The address of a writable contiguous vector of exactly `len` values.
pub fn address_mut<T: numpy::Element>(
    a: &mut PyReadwriteArray1<'_, T>,
    len: usize,
    what: &str,
) -> PyResult<usize> {
    Ok(vector_mut(a, len, what)?.as_mut_ptr() as usize)
}

/// The shape check of a (2, rows) array of per-row statistics.
fn pair_shape(shape: &[usize], rows: usize, what: &str) -> PyResult<()> {
    if shape != [2, rows] {
        return Err(err(format!(
            "{what}: shape {shape:?}, expected [2, {rows}]"
        )));
    }
    Ok(())
}

/// A writable contiguous float64 (2, rows) array as its two rows (row maxima, log-sums).
pub fn pair_mut<'a>(
    a: &'a mut PyReadwriteArray2<'_, f64>,
    rows: usize,
    what: &str,
) -> PyResult<(&'a mut [f64], &'a mut [f64])> {
    pair_shape(a.shape(), rows, what)?;
    aligned(a.data(), what)?;
    let s = a
        .as_slice_mut()
        .map_err(|_| err(format!("{what}: not a contiguous array")))?;
    Ok(s.split_at_mut(rows))
}

/// A contiguous float64 (2, rows) array as its two rows, only read.
pub fn pair<'a>(
    a: &'a PyReadonlyArray2<'_, f64>,
    rows: usize,
    what: &str,
) -> PyResult<(&'a [f64], &'a [f64])> {
    pair_shape(a.shape(), rows, what)?;
    aligned(a.data(), what)?;
    let s = a
        .as_slice()
        .map_err(|_| err(format!("{what}: not a contiguous array")))?;
    Ok(s.split_at(rows))
}

/// The address and size in bytes of a C-contiguous NumPy array of plain values (no
/// Python objects), read from the array itself so no caller names a stray address.
pub fn bytes(a: &Bound<'_, PyUntypedArray>, what: &str) -> PyResult<(usize, usize)> {
    let dtype = a.dtype();
    if dtype.has_object() {
        return Err(PyTypeError::new_err(format!(
            "{what}: an array of Python objects (dtype {dtype}) holds references, not data"
        )));
    }
    if !a.is_c_contiguous() {
        return Err(err(format!("{what}: not a C-contiguous array")));
    }
    // SAFETY: `a` is a live NumPy array (its type was checked when the argument was
    // extracted) and the GIL is held, so its array struct may be read.
    let ptr = unsafe { (*numpy::npyffi::_PyArray_GET_ITEM_DATA(a.as_array_ptr())).data };
    Ok((ptr as usize, a.len() * dtype.itemsize()))
}

/// Destinations of the per-row statistics, read by attribute from `ce_fast._types.Stats`:
/// float64 vectors of one value per row, None where not wanted.
#[derive(FromPyObject)]
pub struct Outputs<'py> {
    pub mx: Option<PyReadwriteArray1<'py, f64>>,
    pub ls: Option<PyReadwriteArray1<'py, f64>>,
    pub zy: Option<PyReadwriteArray1<'py, f64>>,
    pub swz: Option<PyReadwriteArray1<'py, f64>>,
    pub swtz: Option<PyReadwriteArray1<'py, f64>>,
    pub swt: Option<PyReadwriteArray1<'py, f64>>,
}

impl Outputs<'_> {
    /// The engine's destinations; the arrays stay borrowed (and alive) while `self` lives.
    pub fn stats_out(&mut self, rows: usize) -> PyResult<StatsOut> {
        Ok(StatsOut {
            mx: destination(&mut self.mx, rows, "mx")?,
            ls: destination(&mut self.ls, rows, "ls")?,
            zy: destination(&mut self.zy, rows, "zy")?,
            swz: destination(&mut self.swz, rows, "swz")?,
            swtz: destination(&mut self.swtz, rows, "swtz")?,
            swt: destination(&mut self.swt, rows, "swt")?,
            am: 0, // the argmax destination is an argument of its own
        })
    }
}

/// Statistics saved by an earlier call (a `ce_fast._types.Stats`): mx and ls, and swt
/// for soft targets.
#[derive(FromPyObject)]
pub struct Saved<'py> {
    pub mx: PyReadonlyArray1<'py, f64>,
    pub ls: PyReadonlyArray1<'py, f64>,
    pub swt: Option<PyReadonlyArray1<'py, f64>>,
}

/// The gradient's coefficients, read by attribute from `ce_fast._types.GradCoef`.
#[derive(FromPyObject)]
pub struct Coefficients<'py> {
    pub a0: PyReadonlyArray1<'py, f64>,
    pub b: PyReadonlyArray1<'py, f64>,
    pub g: PyReadonlyArray1<'py, f64>,
    pub a_lse: f64,
    pub a_swt: f64,
    pub d: f64,
    pub e: f64,
}

/// The distillation KL's per-row statistics to be written, read by attribute from
/// `ce_fast._types.KlStats`: float64 vectors of one value per row.
#[derive(FromPyObject)]
pub struct KlOut<'py> {
    pub ms: PyReadwriteArray1<'py, f64>,
    pub ls: PyReadwriteArray1<'py, f64>,
    pub mt: PyReadwriteArray1<'py, f64>,
    pub lt: PyReadwriteArray1<'py, f64>,
    pub cross: PyReadwriteArray1<'py, f64>,
}

/// The distillation KL's per-row statistics saved by an earlier call (only read).
#[derive(FromPyObject)]
pub struct KlSaved<'py> {
    pub ms: PyReadonlyArray1<'py, f64>,
    pub ls: PyReadonlyArray1<'py, f64>,
    pub mt: PyReadonlyArray1<'py, f64>,
    pub lt: PyReadonlyArray1<'py, f64>,
    pub cross: PyReadonlyArray1<'py, f64>,
}

/// The vectors of a `KlStats`, borrowed (and kept alive) while this value lives.
pub enum KlVectors<'py> {
    Out(KlOut<'py>),
    Saved(KlSaved<'py>),
}

impl KlVectors<'_> {
    /// The engine's view: addresses of `rows` values each, checked. The engine writes
    /// them only for `Out` and reads them only for `Saved`.
    pub fn stats(&mut self, rows: usize) -> PyResult<crate::engine::kl::KlStats> {
        let addr = |a: &PyReadonlyArray1<'_, f64>, what: &str| -> PyResult<usize> {
            Ok(vector(a, rows, what)?.as_ptr() as usize)
        };
        Ok(match self {
            KlVectors::Out(s) => crate::engine::kl::KlStats {
                ms: address_mut(&mut s.ms, rows, "ms")?,
                ls: address_mut(&mut s.ls, rows, "ls")?,
                mt: address_mut(&mut s.mt, rows, "mt")?,
                lt: address_mut(&mut s.lt, rows, "lt")?,
                cross: address_mut(&mut s.cross, rows, "cross")?,
            },
            KlVectors::Saved(s) => crate::engine::kl::KlStats {
                ms: addr(&s.ms, "given ms")?,
                ls: addr(&s.ls, "given ls")?,
                mt: addr(&s.mt, "given mt")?,
                lt: addr(&s.lt, "given lt")?,
                cross: addr(&s.cross, "given cross")?,
            },
        })
    }
}
