//! Elementwise losses over logits: binary cross-entropy with logits (PyTorch's
//! `binary_cross_entropy_with_logits`) and the sigmoid focal loss (torchvision's
//! `sigmoid_focal_loss`), with their gradients.
//!
//! Every operand is a `(*batch, C)` view of the logits' shape (broadcast operands have
//! stride 0), walked as rows x chunks of CHUNK elements; each chunk is converted into
//! compute-type buffers, the loss and gradient are formed per element (f32 for
//! f32/f16/bf16 logits, f64 for f64) and written back, and the losses are summed in
//! f64. Blocks of chunks are split over the engine's pool and their sums added in a
//! fixed order, so the sum does not depend on the thread count.
//!
//! Per element, with e = exp(-|x|) and sp = log1p(e) (never overflows):
//! log sigmoid(x) = min(x, 0) - sp, sigmoid(x) = 1/(1+e) or e/(1+e) by the sign of x.
//! BCE = (1 - t) x - lw log sigmoid(x), lw = 1 + (pw - 1) t: PyTorch's own formula, so
//! infinities and NaN come out as its float64 result does; it is evaluated as
//! ((1 - t) x - lw min(x, 0)) + lw sp, which keeps tiny losses that the other order
//! cancels to 0.

use crate::arch::{self, Level};
use crate::elem::{bf16_to_f32, f32_to_bf16, DType, Matrix};

/// Elements per chunk: the buffers of one chunk stay in L1.
pub const CHUNK: usize = 1024;
/// Elements per parallel task: enough to amortise the scheduling.
const TASK_ELEMS: usize = 1 << 16;
/// Below this many elements the call runs on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 17;

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// `binary_cross_entropy_with_logits` (weights are the operands `w` and `pw`).
    Bce,
    /// `sigmoid_focal_loss`; `alpha < 0` means no alpha weighting.
    Focal { alpha: f64, gamma: f64 },
}

/// One call: operands share the logits' batch shape and column count.
pub struct Job<'a> {
    pub kind: Kind,
    pub x: &'a Matrix,
    pub t: &'a Matrix,
    pub w: Option<&'a Matrix>,
    pub pw: Option<&'a Matrix>,
    /// Per-element losses (reduction "none"), float32 or float64.
    pub loss: Option<&'a Matrix>,
    /// The gradient's destination (the logits' dtype; may be the logits themselves).
    pub grad: Option<&'a Matrix>,
    /// The gradient's scalar factor (grad_output, divided by the count for "mean").
    pub gscale: f64,
    /// grad_output per element (reduction "none" with an array grad_output).
    pub gout: Option<&'a Matrix>,
}

/// The scalar arithmetic each compute type needs.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    /// The stored dtype whose elements are this type's values (read without a copy).
    const DTYPE: DType;
    fn from_f64(x: f64) -> Self;
    fn from_stored(m: &Matrix, p: *const u8) -> Self;
    fn store(m: &Matrix, p: *mut u8, v: Self);
    fn exp(self) -> Self;
    fn ln_1p(self) -> Self;
    fn abs(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty, $d:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const DTYPE: DType = $d;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn from_stored(m: &Matrix, p: *const u8) -> Self {
                // SAFETY: `p` addresses one element of `m`'s live array (see `addr`).
                unsafe {
                    match m.dtype {
                        DType::F32 => (p as *const f32).read_unaligned() as $t,
                        DType::F64 => (p as *const f64).read_unaligned() as $t,
                        DType::F16 => {
                            half::f16::from_bits((p as *const u16).read_unaligned()).to_f32() as $t
                        }
                        DType::BF16 => bf16_to_f32((p as *const u16).read_unaligned()) as $t,
                    }
                }
            }
            #[inline(always)]
            fn store(m: &Matrix, p: *mut u8, v: Self) {
                // SAFETY: `p` addresses one element of `m`, a destination this worker alone
                // writes (ce_fast passes destinations that overlap nothing but, for the
                // gradient, the logits, whose chunk was read before it is written).
                unsafe {
                    match m.dtype {
                        DType::F32 => (p as *mut f32).write_unaligned(v as f32),
                        DType::F64 => (p as *mut f64).write_unaligned(v as f64),
                        // Rounded once from the compute type.
                        DType::F16 => {
                            (p as *mut u16).write_unaligned(half::f16::from_f64(v as f64).to_bits())
                        }
                        DType::BF16 => (p as *mut u16).write_unaligned(f32_to_bf16(v as f32)),
                    }
                }
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}
impl_real!(f32, DType::F32);
impl_real!(f64, DType::F64);

/// Address of element `col` of the row at element offset `row_off`.
#[inline(always)]
fn addr(m: &Matrix, row_off: isize, col: usize) -> *mut u8 {
    (m.ptr as isize + (row_off + col as isize * m.col_stride) * m.dtype.itemsize()) as *mut u8
}

/// Elements `start..start + dst.len()` of one row into `dst`.
fn load<F: Real>(m: &Matrix, row_off: isize, start: usize, dst: &mut [F]) {
    if m.col_stride == 0 {
        // Broadcast along the row (e.g. a per-row weight): one value.
        let v = F::from_stored(m, addr(m, row_off, 0));
        dst.iter_mut().for_each(|d| *d = v);
        return;
    }
    for (i, d) in dst.iter_mut().enumerate() {
        *d = F::from_stored(m, addr(m, row_off, start + i));
    }
}

/// `src` into elements `start..start + src.len()` of one row.
fn store<F: Real>(m: &Matrix, row_off: isize, start: usize, src: &[F]) {
    for (i, &v) in src.iter().enumerate() {
        F::store(m, addr(m, row_off, start + i), v);
    }
}

/// f32 chunks in and out, with fast paths for unit-stride rows.
fn load_f32(m: &Matrix, row_off: isize, start: usize, dst: &mut [f32]) {
    if m.col_stride != 1 {
        return load(m, row_off, start, dst);
    }
    let p = addr(m, row_off, start);
    let n = dst.len();
    let aligned = (p as usize).is_multiple_of(m.dtype.itemsize() as usize);
    // SAFETY: unit stride and aligned: the n elements from `p` lie in one live row of
    // `m` (start + n <= cols), and nothing writes them while they are read here.
    unsafe {
        match m.dtype {
            DType::F32 if aligned => {
                dst.copy_from_slice(std::slice::from_raw_parts(p as *const f32, n))
            }
            DType::BF16 if aligned => {
                let s = std::slice::from_raw_parts(p as *const u16, n);
                dst.iter_mut()
                    .zip(s)
                    .for_each(|(d, &b)| *d = bf16_to_f32(b));
            }
            DType::F16 if aligned => {
                use half::slice::HalfFloatSliceExt;
                let s = std::slice::from_raw_parts(p as *const half::f16, n);
                s.convert_to_f32_slice(dst);
            }
            _ => load(m, row_off, start, dst),
        }
    }
}

fn store_f32(m: &Matrix, row_off: isize, start: usize, src: &[f32]) {
    let p = addr(m, row_off, start);
    let n = src.len();
    let fast = m.col_stride == 1 && (p as usize).is_multiple_of(m.dtype.itemsize() as usize);
    // SAFETY: as in `load_f32`; the destination's elements are this worker's alone.
    unsafe {
        match m.dtype {
            DType::F32 if fast => {
                std::slice::from_raw_parts_mut(p as *mut f32, n).copy_from_slice(src)
            }
            DType::BF16 if fast => {
                let d = std::slice::from_raw_parts_mut(p as *mut u16, n);
                d.iter_mut()
                    .zip(src)
                    .for_each(|(d, &x)| *d = f32_to_bf16(x));
            }
            DType::F16 if fast => {
                use half::slice::HalfFloatSliceExt;
                let d = std::slice::from_raw_parts_mut(p as *mut half::f16, n);
                d.convert_from_f32_slice(src);
            }
            _ => store(m, row_off, start, src),
        }
    }
}

/// The per-chunk inputs and outputs, in the compute type.
pub struct Chunk<'b, F> {
    pub x: &'b [F],
    pub t: &'b [F],
    pub w: Option<&'b [F]>,
    pub pw: Option<&'b [F]>,
    /// grad_output per element times the scalar factor, or None (the factor alone).
    pub gout: Option<&'b [F]>,
    pub gscale: F,
}

/// Per-element loss into `loss` (its first x.len() elements), gradient into `grad`.
pub fn scalar_chunk<F: Real>(kind: Kind, c: &Chunk<F>, loss: &mut [F], grad: Option<&mut [F]>) {
    let n = c.x.len();
    let mut grad = grad;
    let (one, zero) = (F::ONE, F::ZERO);
    let (alpha, gamma) = match kind {
        Kind::Bce => (-1.0, 0.0),
        Kind::Focal { alpha, gamma } => (alpha, gamma),
    };
    let (fa, fg) = (F::from_f64(alpha), F::from_f64(gamma));
    for i in 0..n {
        let x = c.x[i];
        let t = c.t[i];
        let e = (zero - x.abs()).exp();
        let sp = e.ln_1p();
        let r = one / (one + e);
        let pos = x >= zero;
        let p = if pos { r } else { e * r }; // sigmoid(x)
        let q = if pos { e * r } else { r }; // sigmoid(-x)
        let min0 = if x < zero { x } else { zero };
        // (1 - t) x - lw min(x, 0) first: it cancels exactly where the loss is only sp.
        let (l, d) = match kind {
            Kind::Bce => {
                let w = c.w.map_or(one, |w| w[i]);
                match c.pw {
                    None => ((((one - t) * x - min0) + sp) * w, (p - t) * w),
                    Some(pw) => {
                        let lw = one + (pw[i] - one) * t;
                        let l = ((one - t) * x - lw * min0) + lw * sp;
                        (l * w, (lw * p - pw[i] * t) * w)
                    }
                }
            }
            Kind::Focal { .. } => {
                let ce = ((one - t) * x - min0) + sp;
                // 1 - p_t, formed from both sigmoids so it keeps its precision near 0.
                let m = t * q + (one - t) * p;
                let (mg, dmg) = focal_pow(m, fg, gamma);
                let at = if alpha >= 0.0 {
                    fa * t + (one - fa) * (one - t)
                } else {
                    one
                };
                let dm = (one - t - t) * p * q;
                (at * ce * mg, at * ((p - t) * mg + ce * dmg * dm))
            }
        };
        loss[i] = l;
        if let Some(g) = grad.as_deref_mut() {
            let gs = c.gout.map_or(c.gscale, |go| go[i] * c.gscale);
            // NaN logits give a NaN gradient, as autograd in float64 does.
            g[i] = if x.is_nan() { x } else { d * gs };
        }
    }
}

/// (m^gamma, gamma * m^(gamma - 1)) for m >= 0; the derivative is 0 for gamma == 0
/// and at m == 0 (its limit times the vanishing sigmoid slope there).
#[inline(always)]
fn focal_pow<F: Real>(m: F, fg: F, gamma: f64) -> (F, F) {
    let one = F::ONE;
    if gamma == 0.0 {
        (one, F::ZERO)
    } else if gamma == 1.0 {
        (m, one)
    } else if gamma == 2.0 {
        (m * m, fg * m)
    } else if m > F::ZERO {
        let mg1 = m.powf(fg - one);
        (mg1 * m, fg * mg1)
    } else {
        (m.powf(fg), F::ZERO)
    }
}

/// Per-thread buffers of one chunk.
struct Bufs<F> {
    x: Vec<F>,
    t: Vec<F>,
    w: Vec<F>,
    pw: Vec<F>,
    go: Vec<F>,
    loss: Vec<F>,
    grad: Vec<F>,
}

impl<F: Real> Bufs<F> {
    fn new() -> Self {
        let v = || vec![F::ZERO; CHUNK];
        Bufs {
            x: v(),
            t: v(),
            w: v(),
            pw: v(),
            go: v(),
            loss: v(),
            grad: v(),
        }
    }
}

/// How a compute type moves chunks and computes them on the chosen kernel set.
trait Engine<F: Real>: Copy + Send + Sync {
    fn load(self, m: &Matrix, row_off: isize, start: usize, dst: &mut [F]);
    fn store(self, m: &Matrix, row_off: isize, start: usize, src: &[F]);
    /// Fills `loss[..n]` (and `grad[..n]`) and returns the sum of `loss[..n]` in f64.
    fn chunk(self, kind: Kind, c: &Chunk<F>, loss: &mut [F], grad: Option<&mut [F]>) -> f64;
}

#[derive(Clone, Copy)]
struct ScalarF64;

impl Engine<f64> for ScalarF64 {
    fn load(self, m: &Matrix, row_off: isize, start: usize, dst: &mut [f64]) {
        load(m, row_off, start, dst)
    }
    fn store(self, m: &Matrix, row_off: isize, start: usize, src: &[f64]) {
        store(m, row_off, start, src)
    }
    fn chunk(self, kind: Kind, c: &Chunk<f64>, loss: &mut [f64], grad: Option<&mut [f64]>) -> f64 {
        scalar_chunk(kind, c, loss, grad);
        loss[..c.x.len()].iter().sum()
    }
}

#[derive(Clone, Copy)]
struct ScalarF32;

impl Engine<f32> for ScalarF32 {
    fn load(self, m: &Matrix, row_off: isize, start: usize, dst: &mut [f32]) {
        load_f32(m, row_off, start, dst)
    }
    fn store(self, m: &Matrix, row_off: isize, start: usize, src: &[f32]) {
        store_f32(m, row_off, start, src)
    }
    fn chunk(self, kind: Kind, c: &Chunk<f32>, loss: &mut [f32], grad: Option<&mut [f32]>) -> f64 {
        scalar_chunk(kind, c, loss, grad);
        loss[..c.x.len()].iter().map(|&v| v as f64).sum()
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2F32 {
    _detected: (),
}

#[cfg(target_arch = "x86_64")]
impl Engine<f32> for Avx2F32 {
    fn load(self, m: &Matrix, row_off: isize, start: usize, dst: &mut [f32]) {
        load_f32(m, row_off, start, dst)
    }
    fn store(self, m: &Matrix, row_off: isize, start: usize, src: &[f32]) {
        store_f32(m, row_off, start, src)
    }
    fn chunk(self, kind: Kind, c: &Chunk<f32>, loss: &mut [f32], grad: Option<&mut [f32]>) -> f64 {
        // SAFETY: an Avx2F32 exists only after detection found AVX2 and FMA (see `run`).
        unsafe { avx2::chunk(kind, c, loss, grad) }
    }
}

fn run_with<F: Real, E: Engine<F>>(e: E, job: &Job, pool: &rayon::ThreadPool) -> f64 {
    let rows = job.x.rows();
    let cols = job.x.cols;
    let per_row = cols.div_ceil(CHUNK);
    let items = rows * per_row;
    // One task is a run of consecutive chunks; tasks are summed in order afterwards.
    let per_task = (TASK_ELEMS / CHUNK.min(cols)).max(1);
    let tasks = items.div_ceil(per_task);
    let task = |bufs: &mut Bufs<F>, k: usize| -> f64 {
        let mut s = 0.0;
        for it in k * per_task..((k + 1) * per_task).min(items) {
            s += chunk_at(e, job, bufs, it / per_row, (it % per_row) * CHUNK);
        }
        s
    };
    let parallel = rows * cols >= PAR_MIN_ELEMS && pool.current_num_threads() > 1 && tasks > 1;
    if !parallel {
        let mut bufs = Bufs::new();
        return (0..tasks).map(|k| task(&mut bufs, k)).sum();
    }
    let sums: Vec<f64> = pool.install(|| {
        use rayon::prelude::*;
        (0..tasks)
            .into_par_iter()
            .map_init(Bufs::new, |b, k| task(b, k))
            .collect()
    });
    sums.iter().sum()
}

/// One chunk of one row: load, compute, store; returns the chunk's loss sum.
fn chunk_at<F: Real, E: Engine<F>>(
    e: E,
    job: &Job,
    b: &mut Bufs<F>,
    row: usize,
    start: usize,
) -> f64 {
    let n = CHUNK.min(job.x.cols - start);
    let off = |m: &Matrix| m.row_offset(row);
    let Bufs {
        x,
        t,
        w,
        pw,
        go,
        loss,
        grad,
    } = b;
    // The operands read here are dropped before anything is stored (the gradient may be
    // written over the logits' own elements).
    let c = Chunk {
        x: operand(e, job.x, off(job.x), start, &mut x[..n]),
        t: operand(e, job.t, off(job.t), start, &mut t[..n]),
        w: job.w.map(|m| operand(e, m, off(m), start, &mut w[..n])),
        pw: job.pw.map(|m| operand(e, m, off(m), start, &mut pw[..n])),
        gout: job.gout.map(|m| operand(e, m, off(m), start, &mut go[..n])),
        gscale: F::from_f64(job.gscale),
    };
    let s = e.chunk(job.kind, &c, loss, job.grad.map(|_| &mut grad[..]));
    if let Some(m) = job.loss {
        e.store(m, off(m), start, &loss[..n]);
    }
    if let Some(m) = job.grad {
        e.store(m, off(m), start, &grad[..n]);
    }
    s
}

/// Elements `start..start + buf.len()` of one row: the stored elements themselves when
/// they already are contiguous aligned values of the compute type, else converted into `buf`.
fn operand<'a, F: Real, E: Engine<F>>(
    e: E,
    m: &Matrix,
    row_off: isize,
    start: usize,
    buf: &'a mut [F],
) -> &'a [F] {
    let n = buf.len();
    let p = addr(m, row_off, start);
    if m.dtype == F::DTYPE
        && m.col_stride == 1
        && (p as usize).is_multiple_of(std::mem::align_of::<F>())
    {
        // SAFETY: aligned elements start..start + n (<= cols) of one live row of this type,
        // read while this worker holds the chunk; the caller stores into the row (in
        // place) only after its last use of the returned slice.
        return unsafe { std::slice::from_raw_parts(p as *const F, n) };
    }
    e.load(m, row_off, start, buf);
    buf
}

/// Runs the job on the kernels the current level allows (the AVX2 kernels also serve
/// the AVX-512 level: their Cephes exp and log are not on the lane trait yet); returns
/// the sum of the losses (f64).
pub fn run(job: &Job, pool: &rayon::ThreadPool) -> f64 {
    if job.x.dtype == DType::F64 {
        return run_with(ScalarF64, job, pool);
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(arch::current(), Level::Avx2 | Level::Avx512) && arch::x86_64::avx2::has() {
        return run_with(Avx2F32 { _detected: () }, job, pool);
    }
    run_with(ScalarF32, job, pool)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! 8 f32 lanes: exp by a Cephes-style polynomial with the exponent added into the
    //! bits, log1p(e) as log(1 + e) plus the rounding error of 1 + e divided by 1 + e.

    use super::{focal_pow, Chunk, Kind};
    use std::arch::x86_64::*;

    /// exp(a) for a <= 0: 0 below -87.3 (so -inf gives 0); NaN lanes give garbage that
    /// the callers replace.
    #[allow(clippy::excessive_precision)]
    #[inline(always)]
    unsafe fn exp_le0(a: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.3);
        let keep = _mm256_cmp_ps(a, lo, _CMP_GE_OQ);
        let x = _mm256_max_ps(a, lo);
        let fx = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        // x - n ln 2 in two parts, exact for |n| <= 126.
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.398_199_9e-3));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.333_452e-3));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.166_579_6e-2));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.666_666_5e-1));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.000_000_1e-1));
        y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let n = _mm256_slli_epi32(_mm256_cvtps_epi32(fx), 23);
        let v = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), n));
        _mm256_and_ps(v, keep)
    }

    /// ln(u) for 1 <= u <= 2 (Cephes logf's reduction and polynomial).
    #[allow(clippy::excessive_precision)]
    #[inline(always)]
    unsafe fn ln_1_2(u: __m256) -> __m256 {
        let big = _mm256_cmp_ps(u, _mm256_set1_ps(std::f32::consts::SQRT_2), _CMP_GT_OQ);
        let k = _mm256_and_ps(big, _mm256_set1_ps(1.0));
        let m = _mm256_blendv_ps(u, _mm256_mul_ps(u, _mm256_set1_ps(0.5)), big);
        let f = _mm256_sub_ps(m, _mm256_set1_ps(1.0));
        let z = _mm256_mul_ps(f, f);
        let mut y = _mm256_set1_ps(7.037_683_6e-2);
        for c in [
            -1.151_461_0e-1,
            1.167_699_9e-1,
            -1.242_014_1e-1,
            1.424_932_3e-1,
            -1.666_805_8e-1,
            2.000_071_5e-1,
            -2.499_999_4e-1,
            3.333_333_1e-1,
        ] {
            y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(c));
        }
        y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
        y = _mm256_fmadd_ps(k, _mm256_set1_ps(-2.121_944_4e-4), y);
        y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5), y);
        let r = _mm256_add_ps(f, y);
        _mm256_fmadd_ps(k, _mm256_set1_ps(0.693_359_4), r)
    }

    /// m^gamma and gamma m^(gamma-1) lane by lane, as the scalar kernels compute them.
    #[inline(always)]
    unsafe fn pow_lanes(m: __m256, gamma: f64) -> (__m256, __m256) {
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), m);
        let (mut p, mut d) = ([0f32; 8], [0f32; 8]);
        for i in 0..8 {
            (p[i], d[i]) = focal_pow(a[i], gamma as f32, gamma);
        }
        (_mm256_loadu_ps(p.as_ptr()), _mm256_loadu_ps(d.as_ptr()))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn ld(s: &[f32], i: usize) -> __m256 {
        let a = &s[i..i + 8];
        // SAFETY: `a` holds 8 f32 (the slice above is bounds-checked).
        unsafe { _mm256_loadu_ps(a.as_ptr()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn st(s: &mut [f32], i: usize, v: __m256) {
        let a = &mut s[i..i + 8];
        // SAFETY: `a` holds 8 f32 (bounds-checked as in `ld`).
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) }
    }

    /// As `super::scalar_chunk`, and the sum of the losses in f64.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chunk(
        kind: Kind,
        c: &Chunk<f32>,
        loss: &mut [f32],
        grad: Option<&mut [f32]>,
    ) -> f64 {
        let n = c.x.len();
        let body = n - n % 8;
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        let sign = _mm256_set1_ps(-0.0);
        let (alpha, gamma) = match kind {
            Kind::Bce => (-1.0, 0.0),
            Kind::Focal { alpha, gamma } => (alpha, gamma),
        };
        let fa = _mm256_set1_ps(alpha as f32);
        let fg = _mm256_set1_ps(gamma as f32);
        let gs = _mm256_set1_ps(c.gscale);
        let mut grad = grad;
        let (mut acc0, mut acc1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut i = 0;
        while i < body {
            let x = ld(c.x, i);
            let t = ld(c.t, i);
            let ax = _mm256_andnot_ps(sign, x);
            let e = exp_le0(_mm256_xor_ps(ax, sign));
            let u = _mm256_add_ps(one, e);
            let r = _mm256_div_ps(one, u);
            // log1p(e) = ln(u) + (e - (u - 1)) / u: the rounding of 1 + e put back.
            let sp = _mm256_fmadd_ps(_mm256_sub_ps(e, _mm256_sub_ps(u, one)), r, ln_1_2(u));
            let pos = _mm256_cmp_ps(x, zero, _CMP_GE_OQ);
            let er = _mm256_mul_ps(e, r);
            let p = _mm256_blendv_ps(er, r, pos);
            let q = _mm256_blendv_ps(r, er, pos);
            let min0 = _mm256_min_ps(x, zero);
            let omt = _mm256_sub_ps(one, t);
            // (1 - t) x - lw min(x, 0) first: it cancels exactly where the loss is only sp.
            let (l, d) = match kind {
                Kind::Bce => {
                    let (mut l, mut d) = match c.pw {
                        None => (
                            _mm256_add_ps(_mm256_fmsub_ps(omt, x, min0), sp),
                            _mm256_sub_ps(p, t),
                        ),
                        Some(pw) => {
                            let pw = ld(pw, i);
                            let lw = _mm256_fmadd_ps(_mm256_sub_ps(pw, one), t, one);
                            let a = _mm256_fnmadd_ps(lw, min0, _mm256_mul_ps(omt, x));
                            (
                                _mm256_fmadd_ps(lw, sp, a),
                                _mm256_fmsub_ps(lw, p, _mm256_mul_ps(pw, t)),
                            )
                        }
                    };
                    if let Some(w) = c.w {
                        let w = ld(w, i);
                        l = _mm256_mul_ps(l, w);
                        d = _mm256_mul_ps(d, w);
                    }
                    (l, d)
                }
                Kind::Focal { .. } => {
                    let ce = _mm256_add_ps(_mm256_fmsub_ps(omt, x, min0), sp);
                    let m = _mm256_fmadd_ps(t, q, _mm256_mul_ps(omt, p));
                    let (mg, dmg) = if gamma == 2.0 {
                        (_mm256_mul_ps(m, m), _mm256_mul_ps(fg, m))
                    } else if gamma == 1.0 {
                        (m, one)
                    } else if gamma == 0.0 {
                        (one, zero)
                    } else {
                        pow_lanes(m, gamma)
                    };
                    let at = if alpha >= 0.0 {
                        _mm256_fmadd_ps(fa, t, _mm256_mul_ps(_mm256_sub_ps(one, fa), omt))
                    } else {
                        one
                    };
                    let dm = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(omt, t), p), q);
                    let l = _mm256_mul_ps(at, _mm256_mul_ps(ce, mg));
                    let d = _mm256_fmadd_ps(
                        _mm256_sub_ps(p, t),
                        mg,
                        _mm256_mul_ps(ce, _mm256_mul_ps(dmg, dm)),
                    );
                    (l, _mm256_mul_ps(at, d))
                }
            };
            st(loss, i, l);
            acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(l)));
            acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(l, 1)));
            if let Some(g) = grad.as_deref_mut() {
                let s = match c.gout {
                    None => gs,
                    Some(go) => _mm256_mul_ps(ld(go, i), gs),
                };
                let v = _mm256_mul_ps(d, s);
                // NaN logits give a NaN gradient, as autograd in float64 does.
                let v = _mm256_blendv_ps(v, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
                st(g, i, v);
            }
            i += 8;
        }
        let s = _mm256_add_pd(acc0, acc1);
        let mut h = [0f64; 4];
        // SAFETY: h holds 4 f64.
        unsafe { _mm256_storeu_pd(h.as_mut_ptr(), s) };
        let mut sum = (h[0] + h[1]) + (h[2] + h[3]);
        if body < n {
            fn part(s: &[f32], a: usize, b: usize) -> &[f32] {
                &s[a..b]
            }
            let tail = |s| part(s, body, n);
            let ct = Chunk {
                x: tail(c.x),
                t: tail(c.t),
                w: c.w.map(tail),
                pw: c.pw.map(tail),
                gout: c.gout.map(tail),
                gscale: c.gscale,
            };
            super::scalar_chunk(kind, &ct, &mut loss[body..n], grad.map(|g| &mut g[body..n]));
            sum += loss[body..n].iter().map(|&v| v as f64).sum::<f64>();
        }
        sum
    }
}
