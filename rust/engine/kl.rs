//! Distillation KL divergence: one streaming pass over a student row and a teacher
//! row together. With a = teacher / T and b = student / T, the pass keeps the running
//! max and sum of exponentials of both rows and the cross term
//! X = sum_c exp(r_c - m_r) (r_c - o_c) of the reference row r (the teacher for
//! KL(p || q), the student for the reverse KL(q || p)) against the other row o,
//! rescaled with the reference sum whenever its max moves. Then
//! KL = X / S_r - lse_r + lse_o, and no softmax is materialised.
//!
//! The gradient with respect to the student logits is `(q - p) / T` (forward) or
//! `q (log q - log p - KL) / T` (reverse), written chunk by chunk, so `out` may be the
//! student logits themselves.

use crate::arch::{scalar::Scalar, GradParams, Kernels};
use crate::elem::{Compute, DType, Matrix};
use crate::engine::rows::CHUNK;
use rayon::prelude::*;

/// A fused chunk's terms reach exp(this) at most: far inside f32's range.
const FUSED_MAX_JUMP: f64 = 64.0;
/// Rows handed to a worker at a time hold at least this many elements (of both rows).
const TASK_ELEMS: usize = 1 << 16;

/// The problem of one call: student and teacher rows of the same shape.
pub struct KlProblem<'a> {
    pub student: &'a Matrix,
    pub teacher: &'a Matrix,
    pub inv_t: f64,
    pub reverse: bool,
    /// Statistics saved by an earlier call: only the gradient pass runs.
    pub given: bool,
}

/// Per-row f64 statistics (length rows): the student's max and log-sum, the teacher's,
/// and the cross term divided by the reference sum. Written by the pass, or read when
/// the problem's statistics are given.
#[derive(Clone, Copy)]
pub struct KlStats {
    pub ms: usize,
    pub ls: usize,
    pub mt: usize,
    pub lt: usize,
    pub cross: usize,
}

impl KlStats {
    #[inline]
    fn put(&self, r: usize, v: [f64; 5]) {
        for (p, v) in [self.ms, self.ls, self.mt, self.lt, self.cross]
            .into_iter()
            .zip(v)
        {
            // SAFETY: the binding checked every pointer is non-null and 8-byte aligned; ce_fast
            // passes fresh float64 arrays of `rows` values (r < rows), each row written by one worker.
            unsafe { *(p as *mut f64).add(r) = v }
        }
    }

    #[inline]
    fn get(&self, r: usize) -> [f64; 5] {
        [self.ms, self.ls, self.mt, self.lt, self.cross].map(|p| {
            // SAFETY: as in `put`; given statistics are only read, by the row's worker.
            unsafe { *(p as *const f64).add(r) }
        })
    }
}

/// The gradient: per-row factor g (grad_output over the mean's count, 0 for rows left
/// out) and the destination, of the student's shape.
pub struct KlGrad<'a> {
    pub g: &'a [f64],
    pub out: &'a Matrix,
}

struct Bufs<F> {
    a: Vec<F>,
    b: Vec<F>,
    q: Vec<F>,
}

struct Ctx<'a, K> {
    k: K,
    p: &'a KlProblem<'a>,
    stats: KlStats,
    grad: Option<&'a KlGrad<'a>>,
}

/// KL of a row from its statistics.
fn kl_of(reverse: bool, [ms, ls, mt, lt, cross]: [f64; 5]) -> f64 {
    let ((mr, lr), (mo, lo)) = if reverse {
        ((ms, ls), (mt, lt))
    } else {
        ((mt, lt), (ms, ls))
    };
    cross - (mr - mo) - (lr - lo)
}

impl<'a, K> Ctx<'a, K> {
    /// The `n` stored values of a row from `start`: in place when they need no conversion,
    /// else converted into `buf` (the kernel divides them by T in registers).
    fn chunk<'b, F: Compute>(
        &self,
        m: &Matrix,
        off: isize,
        start: usize,
        buf: &'b mut [F],
    ) -> &'b [F]
    where
        K: Kernels<F>,
    {
        let n = buf.len();
        if let Some(v) = F::view(m, off, start, n) {
            return v;
        }
        F::load(m, off, start, buf, self.k.level());
        buf
    }

    fn row<F: Compute>(&self, bufs: &mut Bufs<F>, r: usize)
    where
        K: Kernels<F>,
    {
        let p = self.p;
        let so_ = p.student.row_offset(r);
        let to_ = p.teacher.row_offset(r);
        let st = if p.given {
            self.stats.get(r)
        } else {
            let st = self.stats_row(bufs, so_, to_);
            self.stats.put(r, st);
            st
        };
        if let Some(gr) = self.grad {
            self.grad_row(bufs, gr, r, so_, to_, st);
        }
    }

    fn stats_row<F: Compute>(&self, bufs: &mut Bufs<F>, so_: isize, to_: isize) -> [f64; 5]
    where
        K: Kernels<F>,
    {
        let p = self.p;
        let cols = p.student.cols;
        let k = self.k;
        // Reference row r and other row o: their maxima, sums and the cross term.
        let (mut mr, mut mo) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
        let (mut sr, mut so, mut x) = (0.0f64, 0.0f64, 0.0f64);
        let mut bad = false;
        let sc = F::from_f64(p.inv_t);
        let mut start = 0;
        while start < cols {
            let n = CHUNK.min(cols - start);
            let (ab, bb) = (&mut bufs.a[..n], &mut bufs.b[..n]);
            let a = self.chunk(p.teacher, to_, start, ab);
            let b = self.chunk(p.student, so_, start, bb);
            let (rv, ov) = if p.reverse { (b, a) } else { (a, b) };
            start += n;
            // With maxima from earlier chunks one pass gives everything; a chunk whose max
            // jumps far above them (or the first chunk) takes the two-pass route.
            if mr.is_finite() && mo.is_finite() {
                let f = k.kl_chunk(rv, ov, sc, F::from_f64(mr), F::from_f64(mo));
                if f.nan {
                    bad = true;
                    break;
                }
                let (cr, co) = (f.maxr.to_f64(), f.maxo.to_f64());
                if cr <= mr + FUSED_MAX_JUMP && co <= mo + FUSED_MAX_JUMP {
                    if cr > mr {
                        let s = (mr - cr).exp();
                        sr = (sr + f.sr) * s;
                        x = (x + f.x) * s;
                        mr = cr;
                    } else {
                        sr += f.sr;
                        x += f.x;
                    }
                    if co > mo {
                        so = (so + f.so) * (mo - co).exp();
                        mo = co;
                    } else {
                        so += f.so;
                    }
                    continue;
                }
            }
            let ((cr, nr), (co, no)) = (k.max_nan(rv), k.max_nan(ov));
            // Scaling by 1/T > 0 is monotonic, also after rounding: the max of the scaled values.
            let (cr, co) = ((sc * cr).to_f64(), (sc * co).to_f64());
            // float64 log_softmax of a row holding NaN or +inf is NaN throughout.
            if nr || no || cr == f64::INFINITY || co == f64::INFINITY {
                bad = true;
                break;
            }
            if cr > mr {
                // Leaving a max of -inf the sums are still 0 (their terms were exact zeros).
                if mr.is_finite() {
                    let s = (mr - cr).exp();
                    sr *= s;
                    x *= s;
                }
                mr = cr;
            }
            if co > mo {
                if mo.is_finite() {
                    so *= (mo - co).exp();
                }
                mo = co;
            }
            // A max still -inf means a chunk of -inf only: any finite stand-in gives exact zeros.
            let fin = |m: f64| F::from_f64(if m.is_finite() { m } else { 0.0 });
            let f = k.kl_chunk(rv, ov, sc, fin(mr), fin(mo));
            sr += f.sr;
            so += f.so;
            x += f.x;
        }
        if bad || !mr.is_finite() || !mo.is_finite() {
            return [f64::NAN; 5];
        }
        let (lr, lo) = (sr.ln(), so.ln());
        let cross = x / sr;
        if p.reverse {
            [mr, lr, mo, lo, cross]
        } else {
            [mo, lo, mr, lr, cross]
        }
    }

    fn grad_row<F: Compute>(
        &self,
        bufs: &mut Bufs<F>,
        gr: &KlGrad,
        r: usize,
        so_: isize,
        to_: isize,
        st: [f64; 5],
    ) where
        K: Kernels<F>,
    {
        let p = self.p;
        let cols = p.student.cols;
        let k = self.k;
        let level = k.level();
        let ooff = gr.out.row_offset(r);
        let g = gr.g[r];
        let [ms, ls, mt, lt, _] = st;
        let c = F::from_f64(g * p.inv_t);
        // exp(z - m) * exp(-l): the softmax from the grad kernel with a = exp(-l), d = e = 0.
        let probs = |m: f64, l: f64| GradParams {
            m: F::from_f64(m),
            a: F::from_f64((-l).exp()),
            g: F::ONE,
            d: F::ZERO,
            e: F::ZERO,
            scale: F::ONE,
        };
        let (pq, pp) = (probs(ms, ls), probs(mt, lt));
        // Reverse: log q - log p - KL = (b - a) - shift, shift = lse_b - lse_a + KL.
        let shift = F::from_f64((ms - mt) + (ls - lt) + kl_of(true, st));
        let mut start = 0;
        while start < cols {
            let n = CHUNK.min(cols - start);
            if g == 0.0 {
                // Rows left out get an exact zero gradient, also where they hold inf/NaN.
                let q = &mut bufs.q[..n];
                q.fill(F::ZERO);
                F::store(gr.out, ooff, start, q, level);
                start += n;
                continue;
            }
            let Bufs { a, b, q } = bufs;
            let (a, b, q) = (&mut a[..n], &mut b[..n], &mut q[..n]);
            F::load(p.student, so_, start, b, level);
            F::load(p.teacher, to_, start, a, level);
            if p.inv_t != 1.0 {
                let s = F::from_f64(p.inv_t);
                k.transform(b, s, F::ZERO, None);
                k.transform(a, s, F::ZERO, None);
            }
            q.copy_from_slice(b);
            k.grad(q, &pq, None, None, None);
            if p.reverse {
                for ((qi, &bi), &ai) in q.iter_mut().zip(b.iter()).zip(a.iter()) {
                    // q = 0 contributes nothing (0 log 0 = 0), whatever the logits are.
                    *qi = if qi.to_f64() == 0.0 {
                        F::ZERO
                    } else {
                        c * *qi * ((bi - ai) - shift)
                    };
                }
            } else {
                k.grad(a, &pp, None, None, None);
                for (qi, &pi) in q.iter_mut().zip(a.iter()) {
                    *qi = c * (*qi - pi);
                }
            }
            F::store(gr.out, ooff, start, q, level);
            start += n;
        }
    }
}

pub fn run<F: Compute, K: Kernels<F>>(
    k: K,
    p: &KlProblem,
    stats: KlStats,
    grad: Option<&KlGrad>,
    pool: &rayon::ThreadPool,
) {
    let ctx = Ctx { k, p, stats, grad };
    let rows = p.student.rows();
    let cols = p.student.cols;
    let new = || Bufs {
        a: vec![F::ZERO; CHUNK],
        b: vec![F::ZERO; CHUNK],
        q: vec![F::ZERO; CHUNK],
    };
    let parallel = rows > 1
        && rows.saturating_mul(cols) >= crate::engine::rows::PAR_MIN_ELEMS
        && pool.current_num_threads() > 1;
    if !parallel {
        let mut bufs = new();
        for r in 0..rows {
            ctx.row(&mut bufs, r);
        }
        return;
    }
    let min_len = (TASK_ELEMS / (2 * cols)).max(1);
    pool.install(|| {
        (0..rows)
            .into_par_iter()
            .with_min_len(min_len)
            .for_each_init(new, |bufs, r| ctx.row(bufs, r));
    });
}

/// `run` with the kernels chosen once for the call: the scalar f64 kernels when either
/// operand is float64, else the f32 kernel set chosen now.
pub fn run_auto(p: &KlProblem, stats: KlStats, grad: Option<&KlGrad>, pool: &rayon::ThreadPool) {
    if p.student.dtype == DType::F64 || p.teacher.dtype == DType::F64 {
        return run::<f64, _>(Scalar, p, stats, grad, pool);
    }
    struct Pass<'a> {
        p: &'a KlProblem<'a>,
        stats: KlStats,
        grad: Option<&'a KlGrad<'a>>,
        pool: &'a rayon::ThreadPool,
    }
    impl super::F32Pass for Pass<'_> {
        type Out = ();
        fn run<K: Kernels<f32>>(self, k: K) {
            run::<f32, _>(k, self.p, self.stats, self.grad, self.pool)
        }
    }
    super::with_f32_kernels(Pass {
        p,
        stats,
        grad,
        pool,
    })
}
