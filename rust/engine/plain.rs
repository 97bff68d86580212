//! The plain cross-entropy of a training loop: integer targets, `ignore_index`, no
//! weights, smoothing, z-loss, softcap or scale. Small calls are dominated by what
//! surrounds the pass, so the target scan, the per-row losses and the gradient's
//! coefficients are formed here in one go rather than as a chain of array operations.
//! The numbers are those of the general rules (`ce_fast._rules`) with every weight 1.

use crate::elem::Matrix;
use crate::engine::rows::{self, GradSpec, Problem, StatsOut};

/// Class indices with -1 for ignored rows and the number of counted rows, or `Err(r)`
/// for the first row `r` whose target is neither in `[0, cols)` nor `ignore_index`.
pub fn targets(t: &[i64], cols: usize, ignore_index: i64) -> Result<(Vec<i64>, usize), usize> {
    let mut idx = Vec::with_capacity(t.len());
    let mut counted = 0;
    for (r, &y) in t.iter().enumerate() {
        if y == ignore_index {
            idx.push(-1);
        } else if (0..cols as i64).contains(&y) {
            idx.push(y);
            counted += 1;
        } else {
            return Err(r);
        }
    }
    Ok((idx, counted))
}

/// How the incoming gradient reaches each row.
#[derive(Clone, Copy)]
pub enum Upstream<'a> {
    /// One number for the batch (reduction "sum").
    Sum(f64),
    /// One number for the batch, divided by the counted rows (reduction "mean").
    Mean(f64),
    /// One number per row (reduction "none").
    Rows(&'a [f64]),
}

/// The gradient pass's coefficients: `g * (p_c - [c == y])` for counted rows, 0 otherwise.
struct Coef {
    one: Vec<f64>,
    g: Vec<f64>,
}

fn coef(idx: &[i64], counted: usize, up: Upstream) -> Coef {
    let one = idx.iter().map(|&y| f64::from(u8::from(y >= 0))).collect();
    let per = |r: usize| match up {
        Upstream::Sum(go) => go,
        // As the general rule: go / den, and go * 0 where nothing counts.
        Upstream::Mean(go) if counted > 0 => go / counted as f64,
        Upstream::Mean(go) => go * 0.0,
        Upstream::Rows(v) => v[r],
    };
    let g = idx
        .iter()
        .enumerate()
        .map(|(r, &y)| if y >= 0 { per(r) } else { 0.0 })
        .collect();
    Coef { one, g }
}

fn spec<'a>(c: &'a Coef, out: &'a Matrix) -> GradSpec<'a> {
    GradSpec {
        a0: &c.one,
        b: &c.one,
        g: &c.g,
        a_lse: 0.0,
        a_swt: 0.0,
        d: 0.0,
        e: 0.0,
        out,
    }
}

/// Statistics pass (and the gradient into `grad.1` when given): the row maxima and
/// log-sums into `mx` and `ls`, each row's loss into `loss` (0 for ignored rows, NaN
/// where the row's log-sum-exp is not finite, as float64 `log_softmax`).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &Matrix,
    idx: &[i64],
    counted: usize,
    mx: &mut [f64],
    ls: &mut [f64],
    loss: &mut [f64],
    grad: Option<(Upstream, &Matrix)>,
    pool: &rayon::ThreadPool,
) {
    let rows = x.rows();
    assert!(idx.len() == rows && mx.len() == rows && ls.len() == rows && loss.len() == rows);
    let coef = grad.map(|(up, _)| coef(idx, counted, up));
    let gspec = coef.as_ref().zip(grad).map(|(c, (_, out))| spec(c, out));
    let mut zy = vec![0.0f64; rows];
    let out = StatsOut {
        mx: mx.as_mut_ptr() as usize,
        ls: ls.as_mut_ptr() as usize,
        zy: zy.as_mut_ptr() as usize,
        ..StatsOut::default()
    };
    let p = problem(x, idx, None);
    rows::run_auto(&p, gspec.as_ref(), out, pool);
    for r in 0..rows {
        loss[r] = if idx[r] < 0 {
            0.0
        } else if mx[r].is_finite() {
            (mx[r] - zy[r]) + ls[r]
        } else {
            f64::NAN
        };
    }
}

/// The gradient from statistics saved by `forward`: one read and one write of the logits.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &Matrix,
    idx: &[i64],
    counted: usize,
    mx: &[f64],
    ls: &[f64],
    up: Upstream,
    out: &Matrix,
    pool: &rayon::ThreadPool,
) {
    let rows = x.rows();
    assert!(idx.len() == rows && mx.len() == rows && ls.len() == rows);
    let c = coef(idx, counted, up);
    let gspec = spec(&c, out);
    let p = problem(x, idx, Some((mx, ls, None)));
    rows::run_auto(&p, Some(&gspec), StatsOut::default(), pool);
}

fn problem<'a>(x: &'a Matrix, idx: &'a [i64], given: Option<rows::Given<'a>>) -> Problem<'a> {
    Problem {
        x,
        target: Some(idx),
        weight: None,
        soft: None,
        scale: 1.0,
        softcap: 0.0,
        want_wz: false,
        given,
    }
}
