//! Element types and strided 2-D views: rows of any stored type are converted
//! chunk by chunk into a small buffer of the compute type, and gradients are
//! converted back on the store (rounded once).

use crate::arch::Level;
use crate::float::Float;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
}

impl DType {
    pub fn from_code(code: u8) -> Option<DType> {
        match code {
            0 => Some(DType::F32),
            1 => Some(DType::F64),
            2 => Some(DType::F16),
            3 => Some(DType::BF16),
            _ => None,
        }
    }
    pub fn itemsize(self) -> isize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// A `(*batch, C)` array seen as rows: batch dims may have any strides (in elements).
///
/// `ce_fast` guarantees what the accessors rely on: for row < rows and col < cols every
/// address computed here lies inside one live array of `dtype` that the caller keeps alive
/// for the call, and a destination's positions are distinct elements. The base address
/// need not be aligned (NumPy and torch allow views at any byte offset).
pub struct Matrix {
    pub ptr: usize,
    pub dtype: DType,
    pub cols: usize,
    pub col_stride: isize,
    pub batch_shape: Vec<usize>,
    pub batch_strides: Vec<isize>,
}

impl Matrix {
    pub fn rows(&self) -> usize {
        self.batch_shape.iter().product()
    }

    /// Element offset of the first element of row `r` (C order over the batch dims).
    #[inline]
    pub fn row_offset(&self, mut r: usize) -> isize {
        let mut off = 0isize;
        for (&n, &s) in self.batch_shape.iter().zip(&self.batch_strides).rev() {
            off += (r % n) as isize * s;
            r /= n;
        }
        off
    }

    /// Whether every element is aligned for its type: strides are whole elements, so
    /// that holds exactly when the base address is aligned.
    #[inline]
    fn aligned(&self) -> bool {
        self.ptr.is_multiple_of(self.dtype.itemsize() as usize)
    }

    #[inline]
    fn addr(&self, off: isize) -> *mut u8 {
        (self.ptr as isize + off * self.dtype.itemsize()) as *mut u8
    }

    /// Elements start..start + n of a row as stored bits, when they are contiguous,
    /// aligned float16 or bfloat16.
    #[inline]
    pub fn halves<'a>(&self, row_off: isize, start: usize, n: usize) -> Option<&'a [u16]> {
        let half = matches!(self.dtype, DType::F16 | DType::BF16);
        // SAFETY: aligned 2-byte elements start..start + n of one row (n <= cols - start),
        // live for the call; the row is written (out=logits) only after its reads are done.
        (half && self.col_stride == 1 && self.aligned()).then(|| unsafe {
            std::slice::from_raw_parts(self.addr(row_off + start as isize) as *const u16, n)
        })
    }

    /// (first byte, byte length) of the elements when they are dense in C order (no gaps,
    /// no repeats); None otherwise.
    pub fn dense_bytes(&self) -> Option<(usize, usize)> {
        let mut expect = self.cols as isize;
        if self.col_stride != 1 && self.cols > 1 {
            return None;
        }
        for (&n, &s) in self.batch_shape.iter().zip(&self.batch_strides).rev() {
            if s != expect && n > 1 {
                return None;
            }
            expect *= n as isize;
        }
        Some((self.ptr, expect as usize * self.dtype.itemsize() as usize))
    }

    /// Address of a row's first element when the row is contiguous and aligned.
    #[inline]
    pub fn contiguous_row(&self, row_off: isize) -> Option<*mut u8> {
        (self.col_stride == 1 && self.aligned()).then(|| self.addr(row_off))
    }

    /// Reads one element as f64.
    #[inline]
    pub fn get(&self, row_off: isize, col: usize) -> f64 {
        let p = self.addr(row_off + col as isize * self.col_stride);
        // SAFETY: callers pass a row's offset and col < cols, so `p` is an element of the live
        // array (see `Matrix`); the unaligned reads need no alignment.
        unsafe {
            match self.dtype {
                DType::F32 => (p as *const f32).read_unaligned() as f64,
                DType::F64 => (p as *const f64).read_unaligned(),
                DType::F16 => half::f16::from_bits((p as *const u16).read_unaligned()).to_f64(),
                DType::BF16 => bf16_to_f32((p as *const u16).read_unaligned()) as f64,
            }
        }
    }

    /// Writes one element from f64, rounded once to the stored type.
    #[inline]
    pub fn set(&self, row_off: isize, col: usize, v: f64) {
        let p = self.addr(row_off + col as isize * self.col_stride);
        // SAFETY: as in `get`; only the worker of this row writes it, and no reference to
        // the element is alive (ce_fast rules out out= overlapping what is read elsewhere).
        unsafe {
            match self.dtype {
                DType::F32 => (p as *mut f32).write_unaligned(v as f32),
                DType::F64 => (p as *mut f64).write_unaligned(v),
                DType::F16 => (p as *mut u16).write_unaligned(half::f16::from_f64(v).to_bits()),
                // f64 -> f32 -> bf16 could double-round; go through the f64 bits instead.
                DType::BF16 => (p as *mut u16).write_unaligned(f64_to_bf16(v)),
            }
        }
    }
}

#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Round-to-nearest-even f32 -> bf16, NaN kept quiet.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    ((b.wrapping_add(round)) >> 16) as u16
}

fn f64_to_bf16(v: f64) -> u16 {
    if v.is_nan() {
        return 0x7fc0;
    }
    let f = v as f32; // correctly rounded to 24 bits
    let back = f as f64;
    // When the f32 rounding landed exactly on a bf16 tie, decide the tie from the f64 value.
    let b = f.to_bits();
    if b & 0xffff == 0x8000 && back != v {
        let up = ((b >> 16) + 1) as u16;
        let down = (b >> 16) as u16;
        let mag_up = (v.abs() > back.abs()) as u16;
        return if mag_up == 1 { up } else { down };
    }
    f32_to_bf16(f)
}

/// The compute types know how to fill a buffer from any stored type and write one back.
pub trait Compute: Float {
    /// The stored elements themselves when they already are contiguous values of this type.
    fn view<'a>(m: &Matrix, row_off: isize, start: usize, n: usize) -> Option<&'a [Self]>;
    fn load(m: &Matrix, row_off: isize, start: usize, dst: &mut [Self], level: Level);
    fn store(m: &Matrix, row_off: isize, start: usize, src: &[Self], level: Level);
}

impl Compute for f32 {
    fn view<'a>(m: &Matrix, row_off: isize, start: usize, n: usize) -> Option<&'a [f32]> {
        let contiguous = m.dtype == DType::F32 && m.col_stride == 1 && m.aligned();
        // SAFETY: aligned f32 elements start..start + n of one row (n <= cols - start), live
        // for the call; the row is written (out=logits) only after its reads are done.
        contiguous.then(|| unsafe {
            std::slice::from_raw_parts(m.addr(row_off + start as isize) as *const f32, n)
        })
    }

    fn load(m: &Matrix, row_off: isize, start: usize, dst: &mut [f32], level: Level) {
        let n = dst.len();
        let base = m.addr(row_off + start as isize * m.col_stride);
        // SAFETY: unit stride and aligned: `base` starts n <= cols - start elements of one
        // live row, not written meanwhile; otherwise `get` reads element by element.
        unsafe {
            if m.col_stride == 1 && m.aligned() {
                match m.dtype {
                    DType::F32 => {
                        dst.copy_from_slice(std::slice::from_raw_parts(base as *const f32, n))
                    }
                    DType::F64 => {
                        let s = std::slice::from_raw_parts(base as *const f64, n);
                        for (d, &x) in dst.iter_mut().zip(s) {
                            *d = x as f32;
                        }
                    }
                    DType::BF16 => {
                        let s = std::slice::from_raw_parts(base as *const u16, n);
                        for (d, &x) in dst.iter_mut().zip(s) {
                            *d = bf16_to_f32(x);
                        }
                    }
                    DType::F16 => {
                        let s = std::slice::from_raw_parts(base as *const u16, n);
                        crate::arch::f16_to_f32(level, s, dst);
                    }
                }
            } else {
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = m.get(row_off, start + i) as f32;
                }
            }
        }
    }

    fn store(m: &Matrix, row_off: isize, start: usize, src: &[f32], level: Level) {
        let n = src.len();
        let base = m.addr(row_off + start as isize * m.col_stride);
        // SAFETY: as in `load` (unaligned writes otherwise); the row is this worker's alone and
        // nothing else reads it (out shares no element with other inputs, or is the logits).
        unsafe {
            if m.col_stride == 1 && m.aligned() {
                match m.dtype {
                    DType::F32 => {
                        std::slice::from_raw_parts_mut(base as *mut f32, n).copy_from_slice(src)
                    }
                    DType::F64 => {
                        let d = std::slice::from_raw_parts_mut(base as *mut f64, n);
                        for (d, &x) in d.iter_mut().zip(src) {
                            *d = x as f64;
                        }
                    }
                    DType::BF16 => {
                        let d = std::slice::from_raw_parts_mut(base as *mut u16, n);
                        for (d, &x) in d.iter_mut().zip(src) {
                            *d = f32_to_bf16(x);
                        }
                    }
                    DType::F16 => {
                        let d = std::slice::from_raw_parts_mut(base as *mut u16, n);
                        crate::arch::f32_to_f16(level, src, d);
                    }
                }
            } else {
                for (i, &x) in src.iter().enumerate() {
                    let p = m.addr(row_off + (start + i) as isize * m.col_stride);
                    match m.dtype {
                        DType::F32 => (p as *mut f32).write_unaligned(x),
                        DType::F64 => (p as *mut f64).write_unaligned(x as f64),
                        DType::F16 => {
                            (p as *mut u16).write_unaligned(half::f16::from_f32(x).to_bits())
                        }
                        DType::BF16 => (p as *mut u16).write_unaligned(f32_to_bf16(x)),
                    }
                }
            }
        }
    }
}

impl Compute for f64 {
    fn view<'a>(m: &Matrix, row_off: isize, start: usize, n: usize) -> Option<&'a [f64]> {
        let contiguous = m.dtype == DType::F64 && m.col_stride == 1 && m.aligned();
        // SAFETY: as for f32: aligned f64 elements of one live row, not written while read.
        contiguous.then(|| unsafe {
            std::slice::from_raw_parts(m.addr(row_off + start as isize) as *const f64, n)
        })
    }

    fn load(m: &Matrix, row_off: isize, start: usize, dst: &mut [f64], _level: Level) {
        for (i, d) in dst.iter_mut().enumerate() {
            *d = m.get(row_off, start + i);
        }
    }

    fn store(m: &Matrix, row_off: isize, start: usize, src: &[f64], _level: Level) {
        for (i, &x) in src.iter().enumerate() {
            m.set(row_off, start + i, x);
        }
    }
}
