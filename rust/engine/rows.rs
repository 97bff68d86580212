//! The row algorithms, generic over compute type and kernel set. One streaming
//! pass per row computes the statistics every loss needs (online log-sum-exp over
//! chunks that stay in L1); the optional gradient pass then re-reads the row
//! (still in L2) and writes the gradient chunk by chunk, so `out` may alias the
//! logits. The loss rules themselves live in Python (`ce_fast._rules`).

use crate::arch::{scalar::Scalar, GradParams, Kernels};
use crate::elem::DType;
use crate::elem::{Compute, Matrix};
use crate::float::Float;
use rayon::prelude::*;

/// Elements per chunk: 8 KiB of f32, so a chunk and its weights stay in L1.
pub const CHUNK: usize = 2048;
/// Elements per chunk read straight from the logits (no buffer, no other sums), once the
/// row has a maximum: each chunk costs a call, two reductions and a rescaling.
pub const LONG_CHUNK: usize = 8192;
/// Below this many elements a call stays on the calling thread (thread start-up dominates).
pub const PAR_MIN_ELEMS: usize = 1 << 17;
/// A fused chunk's terms reach exp(this) at most: far inside f32's range.
const FUSED_MAX_JUMP: f64 = 64.0;
/// Rows handed to a worker at a time hold at least this many elements.
const TASK_ELEMS: usize = 1 << 16;

pub struct Problem<'a> {
    pub x: &'a Matrix,
    /// One class index per row; negative means no target (ignored row or none given).
    pub target: Option<&'a [i64]>,
    pub weight: Option<&'a [f64]>,
    pub soft: Option<&'a Matrix>,
    pub scale: f64,
    /// 0 means off.
    pub softcap: f64,
    /// Accumulate sum_c w_c z_c (label smoothing with integer targets).
    pub want_wz: bool,
    /// (mx, ls, and sum_c w_c t_c for soft targets) saved by an earlier call:
    /// the statistics pass is skipped and only the gradient pass runs.
    pub given: Option<Given<'a>>,
}

/// Saved per-row statistics: (mx, ls, and sum_c w_c t_c for soft targets).
pub type Given<'a> = (&'a [f64], &'a [f64], Option<&'a [f64]>);

/// Per-row coefficients of the gradient, built by the loss rules:
/// `grad_c = g * chain_c * ((a0 + a_lse*lse + a_swt*swt) * p_c - d*w_c - e*w_c*t_c - b*[c == y])`
/// with `p_c = exp(z_c - lse)` and `lse = mx + ls`.
pub struct GradSpec<'a> {
    pub a0: &'a [f64],
    pub b: &'a [f64],
    pub g: &'a [f64],
    pub a_lse: f64,
    pub a_swt: f64,
    pub d: f64,
    pub e: f64,
    pub out: &'a Matrix,
}

/// Destinations (length `rows`, f64) of the per-row statistics; 0 = not wanted.
#[derive(Clone, Copy, Default)]
pub struct StatsOut {
    pub mx: usize,
    pub ls: usize,
    pub zy: usize,
    pub swz: usize,
    pub swtz: usize,
    pub swt: usize,
    /// i64 per row: index of the first maximum of the row, -1 for a row holding NaN.
    pub am: usize,
}

impl StatsOut {
    #[inline]
    fn put(&self, ptr: usize, r: usize, v: f64) {
        if ptr != 0 {
            // SAFETY: the binding checked `ptr` is 8-byte aligned; ce_fast passes a fresh float64
            // array of `rows` values (r < rows), and each row is written by exactly one worker.
            unsafe { *(ptr as *mut f64).add(r) = v }
        }
    }
}

struct Bufs<F> {
    x: Vec<F>,
    t: Vec<F>,
    /// Derivative of the softcap transform, per element of the chunk.
    c: Vec<F>,
}

impl<F: Float> Bufs<F> {
    fn new() -> Self {
        Bufs {
            x: vec![F::ZERO; CHUNK],
            t: vec![F::ZERO; CHUNK],
            c: vec![F::ZERO; CHUNK],
        }
    }
}

/// Position of the first element equal to `v` (a chunk's max, so present); searched
/// only when a chunk raises the row's max, while the chunk is still in L1. Blocks of 64
/// are tested without an early exit (so the test vectorises), then one is scanned.
fn first_at<F: Float>(buf: &[F], v: f64) -> usize {
    let fv = F::from_f64(v); // exact: v is an element's value
    let mut base = 0;
    for blk in buf.chunks(64) {
        if blk.iter().fold(false, |hit, &x| hit | (x == fv)) {
            return base + blk.iter().position(|&x| x == fv).unwrap_or(0);
        }
        base += blk.len();
    }
    0
}

/// A sum relative to the running max after the max grew by `delta` over
/// elements of total weight `wdone`. Leaving a max of -inf (delta = inf), the sum
/// is already -inf or NaN, or holds only zero weights (wdone = 0): it stays as it is.
fn shift(acc: f64, delta: f64, wdone: f64) -> f64 {
    if wdone == 0.0 {
        acc
    } else {
        acc - delta * wdone
    }
}

struct Ctx<'a, F, K> {
    k: K,
    p: &'a Problem<'a>,
    grad: Option<&'a GradSpec<'a>>,
    w: Option<Vec<F>>,
    out: StatsOut,
    transform: bool,
}

impl<'a, F: Compute, K: Kernels<F>> Ctx<'a, F, K> {
    fn row(&self, bufs: &mut Bufs<F>, r: usize) {
        let p = self.p;
        let x = p.x;
        let cols = x.cols;
        let level = self.k.level();
        let off = x.row_offset(r);
        let soff = p.soft.map(|s| s.row_offset(r));
        let y = p.target.map_or(-1, |t| t[r]);
        // Read before any gradient is written, so `out` may alias the logits.
        let (zy, chain_y) = if y >= 0 {
            self.target_logit(x.get(off, y as usize))
        } else {
            (0.0, 0.0)
        };

        if let (Some(gs), Some((mx, ls, swt))) = (self.grad, p.given) {
            let swt = swt.map_or(0.0, |s| s[r]);
            self.grad_row(bufs, gs, r, off, soff, y, (zy, chain_y), mx[r], ls[r], swt);
            return;
        }
        let (mut m, mut s, mut nan) = (f64::NEG_INFINITY, 0.0f64, false);
        // First index of the maximum (numpy.argmax; 0 for a row of only -inf).
        let (want_am, mut am) = (self.out.am != 0, 0usize);
        // Sums of w*(z - m) and w*t*(z - m) relative to the running max m, so the
        // smoothing and soft-target terms never cancel large common offsets; `wdone`
        // and `swt` (sums of w and w*t so far) shift them when m grows.
        let (mut swz, mut swtz, mut swt, mut wdone) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        let scale = F::from_f64(p.scale);
        let softcap = F::from_f64(p.softcap);
        // Half-precision chunks go from their bits straight into the fused sum (converted in
        // registers) when no other sum needs the chunk in the compute type.
        let direct_half = !self.transform && !p.want_wz && p.soft.is_none();
        let bf16 = x.dtype == DType::BF16;
        let long =
            direct_half && (F::view(x, off, 0, 0).is_some() || x.halves(off, 0, 0).is_some());
        let mut start = 0;
        while start < cols {
            let size = if long && m.is_finite() {
                LONG_CHUNK
            } else {
                CHUNK
            };
            let n = size.min(cols - start);
            let half = if direct_half && m.is_finite() {
                x.halves(off, start, n)
            } else {
                None
            };
            let fused = half
                .and_then(|src| self.k.sum_exp_max_half(src, bf16, F::from_f64(m)))
                .filter(|(_, cm)| cm.to_f64() <= m + FUSED_MAX_JUMP);
            if let Some((se, cm)) = fused {
                // As the fused branch below; the smoothing and soft-target sums are off here.
                let cm = cm.to_f64();
                nan |= se.is_nan();
                if cm > m {
                    s = (s + se) * (m - cm).exp();
                    m = cm;
                } else {
                    s += se;
                }
                start += n;
                continue;
            }
            // Contiguous logits of the compute type are read in place, others converted (a
            // long chunk the fused half route declined goes back to the buffer's size).
            let view = if self.transform {
                None
            } else {
                F::view(x, off, start, n)
            };
            let buf: &[F] = match view {
                Some(v) => v,
                None => {
                    let buf = &mut bufs.x[..n.min(CHUNK)];
                    F::load(x, off, start, buf, level);
                    if self.transform {
                        self.k.transform(buf, scale, softcap, None);
                    }
                    buf
                }
            };
            let n = buf.len();
            // With a max from earlier chunks, one fused pass gives the sum and the chunk's
            // max; only a chunk whose max jumps far above it takes the two-pass route.
            let fused = if m.is_finite() {
                self.k.sum_exp_max(buf, F::from_f64(m))
            } else {
                None
            };
            match fused {
                Some((se, cm)) if cm.to_f64() <= m + FUSED_MAX_JUMP => {
                    let cm = cm.to_f64();
                    nan |= se.is_nan();
                    if cm > m {
                        if want_am {
                            am = start + first_at(buf, cm);
                        }
                        s = (s + se) * (m - cm).exp();
                        swz = shift(swz, cm - m, wdone);
                        swtz = shift(swtz, cm - m, swt);
                        m = cm;
                    } else {
                        s += se;
                    }
                }
                _ => {
                    let (cm, cn) = self.k.max_nan(buf);
                    nan |= cn;
                    let cm = cm.to_f64();
                    if cm > m {
                        if want_am {
                            am = start + first_at(buf, cm);
                        }
                        if m.is_finite() {
                            s *= (m - cm).exp();
                        }
                        swz = shift(swz, cm - m, wdone);
                        swtz = shift(swtz, cm - m, swt);
                        m = cm;
                    }
                    if m.is_finite() {
                        s += self.k.sum_exp(buf, F::from_f64(m));
                    }
                }
            }
            // While the max is -inf every element so far is -inf (or NaN): the sums take
            // w * -inf as is (-inf, or NaN for 0 * -inf as float64 torch), and the shift
            // when the max turns finite keeps them. A +inf max leaves them alone.
            let fm = if m == f64::NEG_INFINITY {
                F::ZERO
            } else {
                F::from_f64(m)
            };
            let take = m < f64::INFINITY;
            let w = self.w.as_ref().map(|w| &w[start..start + n]);
            if p.want_wz {
                if take {
                    swz += self.k.dot_shift(buf, w, fm);
                }
                wdone += match w {
                    Some(w) => self.k.sum(w),
                    None => n as f64,
                };
            }
            if let (Some(sm), Some(soff)) = (p.soft, soff) {
                let t = &mut bufs.t[..n];
                F::load(sm, soff, start, t, level);
                if let Some(w) = w {
                    for (ti, &wi) in t.iter_mut().zip(w) {
                        *ti = *ti * wi;
                    }
                }
                if take {
                    swtz += self.k.dot_shift(buf, Some(t), fm);
                }
                swt += self.k.sum(t);
            }
            start += n;
        }
        // lse = mx + ls, kept apart so that lse - z_y keeps ls when |mx| is huge.
        let (mx, ls) = if nan {
            (f64::NAN, 0.0)
        } else if m.is_finite() {
            (m, s.ln())
        } else {
            (m, 0.0)
        };
        self.out.put(self.out.mx, r, mx);
        self.out.put(self.out.ls, r, ls);
        self.out.put(self.out.zy, r, zy);
        self.out.put(self.out.swz, r, swz);
        self.out.put(self.out.swtz, r, swtz);
        self.out.put(self.out.swt, r, swt);
        if want_am {
            let v = if nan { -1 } else { am as i64 };
            // SAFETY: the binding checked `am` is 8-byte aligned; ce_fast passes a fresh int64
            // array of `rows` values (r < rows), and each row is written by exactly one worker.
            unsafe { *(self.out.am as *mut i64).add(r) = v }
        }

        if let Some(gs) = self.grad {
            self.grad_row(bufs, gs, r, off, soff, y, (zy, chain_y), mx, ls, swt);
        }
    }

    /// The transformed target logit and its chain factor, computed as the row's chunks
    /// compute every logit (the compute type, the same kernel): z_y - max is then exactly
    /// what the max and the sums saw (0 at a tie with the max), also where the transform
    /// rounds by more than the exponential's range (|z| ~ 1e9 and up in f32).
    fn target_logit(&self, xy: f64) -> (f64, f64) {
        if !self.transform {
            return (F::from_f64(xy).to_f64(), 1.0);
        }
        let p = self.p;
        let mut z = [F::from_f64(xy)];
        let mut chain = [F::ZERO];
        let softcap = p.softcap > 0.0;
        let ch = if softcap { Some(&mut chain[..]) } else { None };
        self.k
            .transform(&mut z, F::from_f64(p.scale), F::from_f64(p.softcap), ch);
        (
            z[0].to_f64(),
            if softcap { chain[0].to_f64() } else { p.scale },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn grad_row(
        &self,
        bufs: &mut Bufs<F>,
        gs: &GradSpec,
        r: usize,
        off: isize,
        soff: Option<isize>,
        y: i64,
        (zy, chain_y): (f64, f64),
        mx: f64,
        ls: f64,
        swt: f64,
    ) {
        let p = self.p;
        let cols = p.x.cols;
        let level = self.k.level();
        let ooff = gs.out.row_offset(r);
        let g = gs.g[r];
        let a = gs.a0[r] + gs.a_lse * (mx + ls) + gs.a_swt * swt;
        // p_c = exp(z_c - mx) * exp(-ls): the second factor (in [1/C, 1]) joins `a`.
        let params = GradParams {
            m: F::from_f64(mx),
            a: F::from_f64(a * (-ls).exp()),
            g: F::from_f64(g),
            d: F::from_f64(gs.d),
            e: F::from_f64(gs.e),
            scale: F::from_f64(p.scale),
        };
        let softcap = p.softcap > 0.0;
        let mut start = 0;
        // The common case reads and writes the stored type directly (converted in registers).
        let plain = g != 0.0 && !self.transform && self.w.is_none() && p.soft.is_none();
        if let (true, Some(src), Some(dst)) = (
            plain && p.x.dtype == gs.out.dtype,
            p.x.contiguous_row(off),
            gs.out.contiguous_row(ooff),
        ) {
            // SAFETY: both rows are contiguous and aligned with `cols` live elements of the one
            // dtype; `out` shares no element with the logits unless it is the logits exactly
            // (ce_fast checks), and then the two rows are the same memory.
            if unsafe { self.k.grad_stored(p.x.dtype, src, dst, cols, &params) } {
                start = cols;
            }
        }
        while start < cols {
            let n = CHUNK.min(cols - start);
            let buf = &mut bufs.x[..n];
            if g == 0.0 {
                // Ignored rows get an exact zero gradient, also where the row holds inf/NaN.
                buf.fill(F::ZERO);
            } else {
                F::load(p.x, off, start, buf, level);
                let chain = &mut bufs.c[..n];
                if self.transform {
                    let ch = if softcap { Some(&mut *chain) } else { None };
                    self.k
                        .transform(buf, params.scale, F::from_f64(p.softcap), ch);
                }
                let w = self.w.as_ref().map(|w| &w[start..start + n]);
                let t = match (p.soft, soff) {
                    (Some(sm), Some(soff)) => {
                        let t = &mut bufs.t[..n];
                        F::load(sm, soff, start, t, level);
                        Some(&*t)
                    }
                    _ => None,
                };
                self.k.grad(buf, &params, w, t, softcap.then_some(&*chain));
            }
            F::store(gs.out, ooff, start, buf, level);
            start += n;
        }
        // The true-class term p_y - b in f64, rounded once at the store.
        let b = gs.b[r];
        if y >= 0 && b != 0.0 && g != 0.0 {
            let yi = y as usize;
            let wy = p.weight.map_or(1.0, |w| w[yi]);
            let py = ((zy - mx) - ls).exp();
            gs.out.set(ooff, yi, g * chain_y * (a * py - gs.d * wy - b));
        }
    }
}

pub fn run<F: Compute, K: Kernels<F>>(
    k: K,
    p: &Problem,
    grad: Option<&GradSpec>,
    out: StatsOut,
    pool: &rayon::ThreadPool,
) {
    let ctx = Ctx {
        k,
        p,
        grad,
        w: p.weight
            .map(|w| w.iter().map(|&v| F::from_f64(v)).collect()),
        out,
        transform: p.scale != 1.0 || p.softcap > 0.0,
    };
    let rows = p.x.rows();
    let cols = p.x.cols;
    let parallel =
        rows > 1 && rows.saturating_mul(cols) >= PAR_MIN_ELEMS && pool.current_num_threads() > 1;
    if !parallel {
        let mut bufs = Bufs::new();
        for r in 0..rows {
            ctx.row(&mut bufs, r);
        }
        return;
    }
    let min_len = (TASK_ELEMS / cols).max(1);
    let work = || {
        (0..rows)
            .into_par_iter()
            .with_min_len(min_len)
            .for_each_init(Bufs::new, |bufs, r| ctx.row(bufs, r));
    };
    pool.install(work);
}

/// `run` with the kernels chosen once for the call: float64 logits on the scalar f64
/// kernels, every other dtype on the f32 kernel set chosen now.
pub fn run_auto(p: &Problem, grad: Option<&GradSpec>, out: StatsOut, pool: &rayon::ThreadPool) {
    if p.x.dtype == DType::F64 {
        return run::<f64, _>(Scalar, p, grad, out, pool);
    }
    struct Pass<'a> {
        p: &'a Problem<'a>,
        grad: Option<&'a GradSpec<'a>>,
        out: StatsOut,
        pool: &'a rayon::ThreadPool,
    }
    impl super::F32Pass for Pass<'_> {
        type Out = ();
        fn run<K: Kernels<f32>>(self, k: K) {
            run::<f32, _>(k, self.p, self.grad, self.out, self.pool)
        }
    }
    super::with_f32_kernels(Pass { p, grad, out, pool })
}
