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

use crate::arch::Kernels;
use crate::elem::{bf16_to_f32, f32_to_bf16, DType, Matrix};
use crate::float::Float;

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

/// What the binary losses need of a compute type beyond the engine's `Float`: its stored
/// dtype, element loads and stores, and a few more functions.
pub trait Real: Float {
    /// The stored dtype whose elements are this type's values (read without a copy).
    const DTYPE: DType;
    fn from_stored(m: &Matrix, p: *const u8) -> Self;
    fn store(m: &Matrix, p: *mut u8, v: Self);
    fn ln_1p(self) -> Self;
    fn abs(self) -> Self;
    fn powf(self, e: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty, $d:expr) => {
        impl Real for $t {
            const DTYPE: DType = $d;
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
pub fn focal_pow<F: Real>(m: F, fg: F, gamma: f64) -> (F, F) {
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

/// The f32 chunks of a SIMD kernel set (its `binary_chunk`), the scalar chunk where the
/// set offers none.
#[derive(Clone, Copy)]
struct Simd<K>(K);

impl<K: Kernels<f32>> Engine<f32> for Simd<K> {
    fn load(self, m: &Matrix, row_off: isize, start: usize, dst: &mut [f32]) {
        load_f32(m, row_off, start, dst)
    }
    fn store(self, m: &Matrix, row_off: isize, start: usize, src: &[f32]) {
        store_f32(m, row_off, start, src)
    }
    fn chunk(self, kind: Kind, c: &Chunk<f32>, loss: &mut [f32], grad: Option<&mut [f32]>) -> f64 {
        match grad {
            None => match self.0.binary_chunk(kind, c, loss, None) {
                Some(s) => s,
                None => ScalarF32.chunk(kind, c, loss, None),
            },
            Some(g) => {
                // Offered or not is the set's property, the same for every chunk: ask
                // with the gradient buffer lent, and fall back when declined.
                match self.0.binary_chunk(kind, c, loss, Some(&mut *g)) {
                    Some(s) => s,
                    None => ScalarF32.chunk(kind, c, loss, Some(g)),
                }
            }
        }
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

/// Runs the job on the f32 kernel set chosen for the call (float64 on the scalar f64
/// chunk); returns the sum of the losses (f64).
pub fn run(job: &Job, pool: &rayon::ThreadPool) -> f64 {
    if job.x.dtype == DType::F64 {
        return run_with(ScalarF64, job, pool);
    }
    struct Pass<'a> {
        job: &'a Job<'a>,
        pool: &'a rayon::ThreadPool,
    }
    impl super::F32Pass for Pass<'_> {
        type Out = f64;
        fn run<K: Kernels<f32>>(self, k: K) -> f64 {
            run_with(Simd(k), self.job, self.pool)
        }
    }
    super::with_f32_kernels(Pass { job, pool })
}
