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

use crate::arch::scalar::Scalar;
use crate::arch::{GradParams, Kernels};
use crate::elem::{Compute, Matrix};
use crate::engine::rows::CHUNK;
use crate::float::Float;
use rayon::prelude::*;

/// A fused chunk's terms reach exp(this) at most: far inside f32's range.
const FUSED_MAX_JUMP: f64 = 64.0;
/// Rows handed to a worker at a time hold at least this many elements (of both rows).
const TASK_ELEMS: usize = 1 << 16;

/// One chunk's sums against given maxima: sums of exp(r - mr), exp(o - mo), the cross
/// term sum exp(r - mr) (r - o) (terms with exp(r - mr) = 0 count as 0), the chunk's
/// own maxima (NaN skipped) and whether a NaN was seen.
pub struct Fused<F> {
    pub sr: f64,
    pub so: f64,
    pub x: f64,
    pub maxr: F,
    pub maxo: F,
    pub nan: bool,
}

/// Per-chunk kernel of the pass over the values `s * r` and `s * o` (s = 1/T > 0, applied
/// in registers); the terms are only meaningful where the chunk's maxima stay below the
/// given ones plus 88 (callers check the returned maxima).
pub trait KlKernels<F: Float>: Kernels<F> {
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

impl<F: Float> KlKernels<F> for Scalar {}

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
        K: KlKernels<F>,
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
        K: KlKernels<F>,
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
        K: KlKernels<F>,
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

pub fn run<F: Compute, K: KlKernels<F>>(
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Fused, KlKernels};
    use crate::arch::x86_64::avx2::Avx2;
    use std::arch::x86_64::*;

    /// (exp(x), x >= -87.3) for x <= 92: 2^n * p(f), the degree-5 minimax polynomial of the
    /// engine's AVX2 kernels (their helpers are private). Below -87.3 (-inf included) the
    /// value is ~1e-38, which no sum holding its own max (exp(0) = 1) can notice; the mask
    /// says where it is a true exponential.
    // The coefficients are the fitted minimax values, written as fitted.
    #[allow(clippy::approx_constant, clippy::excessive_precision)]
    #[inline(always)]
    unsafe fn exp_ps(x: __m256) -> (__m256, __m256) {
        let t = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E));
        let lo = _mm256_set1_ps(-126.0);
        let keep = _mm256_cmp_ps(t, lo, _CMP_NLT_UQ);
        let t = _mm256_max_ps(lo, t);
        let magic = _mm256_set1_ps(12_582_912.0);
        let nf = _mm256_add_ps(t, magic);
        let f = _mm256_sub_ps(t, _mm256_sub_ps(nf, magic));
        let mut p = _mm256_set1_ps(1.326_472_4e-3);
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.671_513e-3));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550_733_6e-2));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402_224_2e-1));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931_470e-1));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32(_mm256_castps_si256(nf), 23);
        let v = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
        (v, keep)
    }

    #[inline(always)]
    unsafe fn hsum_f64(v: __m256) -> f64 {
        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        let s = _mm256_add_pd(lo, hi);
        let s2 = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
        _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)))
    }

    #[inline(always)]
    unsafe fn hmax(v: __m256) -> f32 {
        let mut m = [0.0f32; 8];
        _mm256_storeu_ps(m.as_mut_ptr(), v);
        m.iter()
            .copied()
            .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
    }

    /// Accumulators of one lane group: the two sums, the cross term, the maxima, the NaN mask.
    struct Acc {
        sr: __m256,
        so: __m256,
        x: __m256,
        mr: __m256,
        mo: __m256,
        nan: __m256,
    }

    /// One vector of raw values r, o: maxima and the cross term unscaled (the caller
    /// scales them by s once), the exponentials of s * x - m.
    #[inline(always)]
    unsafe fn step(acc: &mut Acc, r: __m256, o: __m256, vs: __m256, vmr: __m256, vmo: __m256) {
        // max(x, acc) returns acc when x is NaN: NaN is skipped here, flagged below.
        acc.mr = _mm256_max_ps(r, acc.mr);
        acc.mo = _mm256_max_ps(o, acc.mo);
        acc.nan = _mm256_or_ps(acc.nan, _mm256_cmp_ps(r, o, _CMP_UNORD_Q));
        let (er, live) = exp_ps(_mm256_fmsub_ps(r, vs, vmr));
        let (eo, _) = exp_ps(_mm256_fmsub_ps(o, vs, vmo));
        acc.sr = _mm256_add_ps(acc.sr, er);
        acc.so = _mm256_add_ps(acc.so, eo);
        // Only true exponentials weigh r - o: a -inf logit (r - o inf or NaN) contributes 0.
        let term = _mm256_mul_ps(er, _mm256_sub_ps(r, o));
        acc.x = _mm256_add_ps(acc.x, _mm256_and_ps(term, live));
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `o` is at least as long as `r`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kl_chunk(r: &[f32], o: &[f32], s: f32, mr: f32, mo: f32) -> Fused<f32> {
        let n = r.len();
        let vs = _mm256_set1_ps(s);
        let (pr, po) = (r.as_ptr(), o.as_ptr());
        let (vmr, vmo) = (_mm256_set1_ps(mr), _mm256_set1_ps(mo));
        let zero = _mm256_setzero_ps();
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let new = || Acc {
            sr: zero,
            so: zero,
            x: zero,
            mr: ninf,
            mo: ninf,
            nan: zero,
        };
        // Two independent groups keep the adds free of one serial dependency.
        let (mut a0, mut a1) = (new(), new());
        let mut i = 0;
        while i + 16 <= n {
            step(
                &mut a0,
                _mm256_loadu_ps(pr.add(i)),
                _mm256_loadu_ps(po.add(i)),
                vs,
                vmr,
                vmo,
            );
            step(
                &mut a1,
                _mm256_loadu_ps(pr.add(i + 8)),
                _mm256_loadu_ps(po.add(i + 8)),
                vs,
                vmr,
                vmo,
            );
            i += 16;
        }
        while i < n {
            // The tail padded with -inf: zero terms, no max, no NaN.
            let (mut tr, mut to) = ([f32::NEG_INFINITY; 8], [f32::NEG_INFINITY; 8]);
            let len = (n - i).min(8);
            tr[..len].copy_from_slice(&r[i..i + len]);
            to[..len].copy_from_slice(&o[i..i + len]);
            step(
                &mut a0,
                _mm256_loadu_ps(tr.as_ptr()),
                _mm256_loadu_ps(to.as_ptr()),
                vs,
                vmr,
                vmo,
            );
            i += len;
        }
        // Scaling by s > 0 is monotonic, also after rounding: the max of the scaled values.
        Fused {
            sr: hsum_f64(_mm256_add_ps(a0.sr, a1.sr)),
            so: hsum_f64(_mm256_add_ps(a0.so, a1.so)),
            x: s as f64 * hsum_f64(_mm256_add_ps(a0.x, a1.x)),
            maxr: s * hmax(_mm256_max_ps(a0.mr, a1.mr)),
            maxo: s * hmax(_mm256_max_ps(a0.mo, a1.mo)),
            nan: _mm256_movemask_ps(_mm256_or_ps(a0.nan, a1.nan)) != 0,
        }
    }

    impl KlKernels<f32> for Avx2 {
        fn kl_chunk(self, r: &[f32], o: &[f32], s: f32, mr: f32, mo: f32) -> Fused<f32> {
            // A short `o` panics here instead of being read past its end.
            let o = &o[..r.len()];
            // SAFETY: an Avx2 value exists only where detection found AVX2, FMA and F16C,
            // and `o` now has exactly r.len() elements.
            unsafe { kl_chunk(r, o, s, mr, mo) }
        }
    }
}
