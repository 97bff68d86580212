//! Bindings only: Python hands over array descriptors (address, dtype code,
//! shape, strides in elements) already validated by `ce_fast`; this layer checks
//! what it relies on, picks the kernel set and releases the GIL for the pass.
//!
//! Soundness rests on that contract: each address and layout describes live memory
//! that the caller keeps alive for the call, and `ce_fast` makes the arrays written
//! here share no element with the arrays read (`out=logits` exactly is the one overlap
//! allowed, and each row is read before it is overwritten by the same worker).

#![warn(clippy::undocumented_unsafe_blocks)]

mod arch;
mod args;
mod elem;
mod engine;
mod float;
mod kernels;
mod pages;

use args::{ArrayDesc, Coefficients, Outputs, Saved};
use elem::{DType, Matrix};
use engine::{binary, kl, plain, rows};
use numpy::{
    PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray1, PyReadwriteArray2, PyUntypedArray,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rows::{GradSpec, Problem, StatsOut};
use std::sync::{Arc, Mutex, OnceLock};

/// Largest thread count accepted: above the logical CPU count of today's largest
/// machines (768), far below what would exhaust memory with thread stacks.
const MAX_THREADS: usize = 1024;

/// The engine's thread pool: one at a time, of the size last asked for, tagged with
/// the process that built it. Rayon's global pool is never used: it cannot be
/// rebuilt, and after `fork` its threads do not exist in the child.
struct Slot {
    pid: u32,
    size: usize,
    pool: Arc<rayon::ThreadPool>,
}

static POOL: Mutex<Option<Slot>> = Mutex::new(None);

/// Threads for `threads == 0`: RAYON_NUM_THREADS when a positive integer, else the
/// CPUs this process may use; read once (available_parallelism reads cgroup files).
fn default_size() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let env = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        let n = match env {
            Some(n @ 1..) => n,
            _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        n.min(MAX_THREADS)
    })
}

/// The pool for a call with `threads` (0 = the default size). Asking for another size
/// replaces the pool; the old one stops when the last call using it lets go of it.
/// Taking the GIL token keeps the lock from being held across `fork` (Python forks
/// with the GIL held), so a child never inherits it locked. The process id check at
/// each call costs one getpid and, unlike pthread_atfork, needs no unsafe code.
fn pool(_py: Python<'_>, threads: usize) -> PyResult<Arc<rayon::ThreadPool>> {
    if threads > MAX_THREADS {
        return Err(PyValueError::new_err(format!(
            "threads must be at most {MAX_THREADS} (0 = the default), got {threads}"
        )));
    }
    let size = if threads == 0 {
        default_size()
    } else {
        threads
    };
    let pid = std::process::id();
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.as_ref() {
        if s.pid == pid && s.size == size {
            return Ok(s.pool.clone());
        }
    }
    if let Some(old) = slot.take() {
        if old.pid != pid {
            // Forked child: the parent's workers were not copied; dropping the pool would
            // signal threads that do not exist here.
            std::mem::forget(old);
        }
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(size)
        .thread_name(|i| format!("ce_fast-{i}"))
        .build()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let p = Arc::new(p);
    *slot = Some(Slot {
        pid,
        size,
        pool: p.clone(),
    });
    Ok(p)
}

/// A gradient destination shaped like `x`, with huge pages asked for when it is a large
/// fresh array (see `pages`).
fn grad_out(d: ArrayDesc, x: &Matrix) -> PyResult<Matrix> {
    let m = d.like(x, "grad out")?;
    pages::advise_fresh(&m, x);
    Ok(m)
}

/// Per-row statistics of the logits `x` (an `Operand`) into the float64 vectors of
/// `stats` (a `Stats`, None fields not wanted); with `grad` (a `GradCoef`) the gradient
/// into `out` (an `Operand` of the logits' shape); with `given` (a `Stats` saved by an
/// earlier call: mx, ls, and swt for soft targets) only the gradient pass runs.
/// `target`: int64 class indices, -1 for no target, one per row; `weight`: float64, one
/// per class; `soft`: an `Operand` of the logits' shape; `argmax`: int64, one per row,
/// receives each row's first maximum (-1 for a row holding NaN) from the same pass.
#[pyfunction]
#[pyo3(signature = (
    x, *, target=None, weight=None, soft=None, scale=1.0, softcap=0.0, want_wz=false,
    stats=None, grad=None, out=None, given=None, threads=0, argmax=None
))]
#[allow(clippy::too_many_arguments)]
fn run(
    py: Python<'_>,
    x: ArrayDesc,
    target: Option<PyReadonlyArray1<'_, i64>>,
    weight: Option<PyReadonlyArray1<'_, f64>>,
    soft: Option<ArrayDesc>,
    scale: f64,
    softcap: f64,
    want_wz: bool,
    stats: Option<Outputs<'_>>,
    grad: Option<Coefficients<'_>>,
    out: Option<ArrayDesc>,
    given: Option<Saved<'_>>,
    threads: usize,
    argmax: Option<PyReadwriteArray1<'_, i64>>,
) -> PyResult<()> {
    let x = x.matrix("logits")?;
    let rows = x.rows();
    let cols = x.cols;
    if given.is_some() && grad.is_none() {
        return Err(PyValueError::new_err("given statistics need a gradient"));
    }
    let soft = soft.map(|d| d.like(&x, "soft target")).transpose()?;
    let gout = match (&grad, out) {
        (Some(_), Some(d)) => Some(grad_out(d, &x)?),
        (None, None) => None,
        _ => return Err(PyValueError::new_err("grad and out go together")),
    };
    let target = target
        .as_ref()
        .map(|t| args::vector(t, rows, "target"))
        .transpose()?;
    if let Some(&bad) = target.and_then(|t| t.iter().find(|&&y| y >= cols as i64)) {
        // The engine indexes rows with these: refuse what validation should have caught.
        return Err(PyValueError::new_err(format!(
            "target index {bad} out of range"
        )));
    }
    let weight = weight
        .as_ref()
        .map(|w| args::vector(w, cols, "weight"))
        .transpose()?;
    let saved = match &given {
        Some(g) => Some((
            args::vector(&g.mx, rows, "given mx")?,
            args::vector(&g.ls, rows, "given ls")?,
            g.swt
                .as_ref()
                .map(|s| args::vector(s, rows, "given swt"))
                .transpose()?,
        )),
        None => None,
    };
    let gspec = match (&grad, &gout) {
        (Some(c), Some(m)) => Some(GradSpec {
            a0: args::vector(&c.a0, rows, "a0")?,
            b: args::vector(&c.b, rows, "b")?,
            g: args::vector(&c.g, rows, "g")?,
            a_lse: c.a_lse,
            a_swt: c.a_swt,
            d: c.d,
            e: c.e,
            out: m,
        }),
        _ => None,
    };
    let mut stats = stats;
    let sout = match stats.as_mut() {
        Some(s) => s.stats_out(rows)?,
        None => StatsOut::default(),
    };
    let mut argmax = argmax;
    let sout = StatsOut {
        am: args::destination(&mut argmax, rows, "argmax")?,
        ..sout
    };
    let pool = pool(py, threads)?;
    let p = Problem {
        x: &x,
        target,
        weight,
        soft: soft.as_ref(),
        scale,
        softcap,
        want_wz,
        given: saved,
    };
    py.detach(|| rows::run_auto(&p, gspec.as_ref(), sout, &pool));
    drop((stats, argmax)); // the destinations stay borrowed until the pass is done
    Ok(())
}

/// Elementwise binary losses: `kind` 0 is binary cross-entropy with logits (weights `w`,
/// `pw`), 1 the sigmoid focal loss (`alpha`, `gamma`). Every operand (an `Operand`) has
/// the logits' shape (broadcast operands with stride 0); `loss` receives the per-element
/// losses, `grad` the gradient times `gscale` (and `gout` per element). Returns the sum
/// of the losses in f64.
#[pyfunction]
#[pyo3(signature = (
    kind, x, t, *, w=None, pw=None, loss=None, grad=None, gscale=1.0, gout=None,
    alpha=0.25, gamma=2.0, threads=0
))]
#[allow(clippy::too_many_arguments)]
fn run_binary(
    py: Python<'_>,
    kind: u8,
    x: ArrayDesc,
    t: ArrayDesc,
    w: Option<ArrayDesc>,
    pw: Option<ArrayDesc>,
    loss: Option<ArrayDesc>,
    grad: Option<ArrayDesc>,
    gscale: f64,
    gout: Option<ArrayDesc>,
    alpha: f64,
    gamma: f64,
    threads: usize,
) -> PyResult<f64> {
    let kind = match kind {
        0 => binary::Kind::Bce,
        1 => binary::Kind::Focal { alpha, gamma },
        _ => return Err(PyValueError::new_err(format!("unknown loss kind {kind}"))),
    };
    let x = x.matrix("logits")?;
    let like = |d: Option<ArrayDesc>, what: &str| d.map(|d| d.like(&x, what)).transpose();
    let t = t.like(&x, "target")?;
    let (w, pw) = (like(w, "weight")?, like(pw, "pos_weight")?);
    let (loss, grad, gout) = (
        like(loss, "loss out")?,
        grad.map(|d| grad_out(d, &x)).transpose()?,
        like(gout, "grad_output")?,
    );
    if loss
        .as_ref()
        .is_some_and(|m| !matches!(m.dtype, DType::F32 | DType::F64))
    {
        return Err(PyValueError::new_err("loss out must be float32 or float64"));
    }
    if grad.as_ref().is_some_and(|m| m.dtype != x.dtype) {
        return Err(PyValueError::new_err(
            "grad out must have the logits' dtype",
        ));
    }
    if gout.is_some() && grad.is_none() {
        return Err(PyValueError::new_err("grad_output needs grad"));
    }
    let pool = pool(py, threads)?;
    Ok(py.detach(move || {
        let job = binary::Job {
            kind,
            x: &x,
            t: &t,
            w: w.as_ref(),
            pw: pw.as_ref(),
            loss: loss.as_ref(),
            grad: grad.as_ref(),
            gscale,
            gout: gout.as_ref(),
        };
        binary::run(&job, &pool)
    }))
}

/// Distillation KL over student logits `x` and `teacher` of the same shape, divided by
/// the temperature (`inv_temp` = 1 / T). `stats` (a `KlStats` of float64 vectors, one
/// value per row: ms, ls, mt, lt, cross) is written by the pass, or read when `given`
/// (then only the gradient runs). With `g` (float64, one factor per row) and `out` (an
/// `Operand` of the logits' shape) the gradient with respect to `x` goes into `out`.
#[pyfunction]
#[pyo3(signature = (x, teacher, inv_temp, reverse, stats, *, g=None, out=None, given=false, threads=0))]
#[allow(clippy::too_many_arguments)]
fn kl_run(
    py: Python<'_>,
    x: ArrayDesc,
    teacher: ArrayDesc,
    inv_temp: f64,
    reverse: bool,
    stats: &Bound<'_, PyAny>,
    g: Option<PyReadonlyArray1<'_, f64>>,
    out: Option<ArrayDesc>,
    given: bool,
    threads: usize,
) -> PyResult<()> {
    let x = x.matrix("logits")?;
    let teacher = teacher.like(&x, "teacher logits")?;
    let rows = x.rows();
    let gout = match (&g, out) {
        (Some(_), Some(d)) => Some(grad_out(d, &x)?),
        (None, None) => None,
        _ => return Err(PyValueError::new_err("g and out go together")),
    };
    if given && gout.is_none() {
        return Err(PyValueError::new_err("given statistics need a gradient"));
    }
    let gs = g.as_ref().map(|v| args::vector(v, rows, "g")).transpose()?;
    let mut vectors = if given {
        args::KlVectors::Saved(stats.extract()?)
    } else {
        args::KlVectors::Out(stats.extract()?)
    };
    let st = vectors.stats(rows)?;
    let pool = pool(py, threads)?;
    let p = kl::KlProblem {
        student: &x,
        teacher: &teacher,
        inv_t: inv_temp,
        reverse,
        given,
    };
    let grad = gout.as_ref().zip(gs).map(|(out, g)| kl::KlGrad { g, out });
    py.detach(|| kl::run_auto(&p, st, grad.as_ref(), &pool));
    drop(vectors); // the statistics stay borrowed until the pass is done
    Ok(())
}

/// The int64 targets (one per row) as class indices (-1 for ignored rows) and the
/// counted rows; `Err(r)` for the first row whose target is out of range.
fn plain_targets(
    target: &PyReadonlyArray1<'_, i64>,
    rows: usize,
    cols: usize,
    ignore_index: i64,
) -> PyResult<Result<(Vec<i64>, usize), usize>> {
    let t = args::vector(target, rows, "target")?;
    Ok(plain::targets(t, cols, ignore_index))
}

/// The plain cross-entropy's forward (integer targets and `ignore_index`, no other
/// option) of the logits `x` (an `Operand`): `target` int64, one per row; `lse` float64
/// (2, rows) receives the row maxima then the log-sums; `loss` float64 (rows,) the
/// per-row losses (0 for ignored rows). With `go` and `out` (an `Operand` of the logits'
/// shape) the gradient of `go * loss` (go divided by the counted rows when `mean`) is
/// written into `out` in the same pass. Returns the counted rows, or -1 - r for the
/// first row r whose target is out of range (then nothing is computed).
#[pyfunction]
// `threads` before the named options: the small-call path passes it positionally.
#[pyo3(signature = (x, target, ignore_index, lse, loss, threads=0, *, go=None, mean=false, out=None))]
#[allow(clippy::too_many_arguments)]
fn plain_forward(
    py: Python<'_>,
    x: ArrayDesc,
    target: PyReadonlyArray1<'_, i64>,
    ignore_index: i64,
    mut lse: PyReadwriteArray2<'_, f64>,
    mut loss: PyReadwriteArray1<'_, f64>,
    threads: usize,
    go: Option<f64>,
    mean: bool,
    out: Option<ArrayDesc>,
) -> PyResult<i64> {
    let x = x.matrix("logits")?;
    let rows = x.rows();
    let gout = match (go, out) {
        (Some(go), Some(d)) => Some((go, grad_out(d, &x)?)),
        (None, None) if mean => return Err(PyValueError::new_err("mean needs go")),
        (None, None) => None,
        _ => return Err(PyValueError::new_err("go and out go together")),
    };
    let (mx, ls) = args::pair_mut(&mut lse, rows, "lse")?;
    let loss = args::vector_mut(&mut loss, rows, "loss")?;
    let (idx, counted) = match plain_targets(&target, rows, x.cols, ignore_index)? {
        Ok(v) => v,
        Err(r) => return Ok(-1 - r as i64),
    };
    let pool = pool(py, threads)?;
    py.detach(|| {
        let grad = gout.as_ref().map(|(go, m)| {
            let up = if mean {
                plain::Upstream::Mean(*go)
            } else {
                plain::Upstream::Sum(*go)
            };
            (up, m)
        });
        plain::forward(&x, &idx, counted, mx, ls, loss, grad, &pool)
    });
    Ok(counted as i64)
}

/// The plain cross-entropy's gradient of the logits `x` (an `Operand`) from the `lse` a
/// `plain_forward` call filled, into `out` (an `Operand` of the logits' shape): either
/// `go` for the batch (divided by the counted rows when `mean`) or `go_rows`, float64
/// values one per row.
#[pyfunction]
#[pyo3(signature = (x, target, ignore_index, lse, out, threads=0, *, go=None, go_rows=None, mean=false))]
#[allow(clippy::too_many_arguments)]
fn plain_backward(
    py: Python<'_>,
    x: ArrayDesc,
    target: PyReadonlyArray1<'_, i64>,
    ignore_index: i64,
    lse: PyReadonlyArray2<'_, f64>,
    out: ArrayDesc,
    threads: usize,
    go: Option<f64>,
    go_rows: Option<PyReadonlyArray1<'_, f64>>,
    mean: bool,
) -> PyResult<()> {
    let x = x.matrix("logits")?;
    let rows = x.rows();
    let out = grad_out(out, &x)?;
    let (mx, ls) = args::pair(&lse, rows, "lse")?;
    let up = match (go, &go_rows) {
        (Some(go), None) if mean => plain::Upstream::Mean(go),
        (Some(go), None) => plain::Upstream::Sum(go),
        (None, Some(_)) if mean => {
            return Err(PyValueError::new_err("mean applies to go, not go_rows"))
        }
        (None, Some(v)) => plain::Upstream::Rows(args::vector(v, rows, "go_rows")?),
        _ => {
            return Err(PyValueError::new_err(
                "exactly one of go and go_rows is needed",
            ))
        }
    };
    let (idx, counted) = plain_targets(&target, rows, x.cols, ignore_index)?
        .map_err(|r| PyValueError::new_err(format!("target of row {r} out of range")))?;
    let pool = pool(py, threads)?;
    py.detach(|| plain::backward(&x, &idx, counted, mx, ls, up, &out, &pool));
    Ok(())
}

/// Reads every byte of the C-contiguous NumPy array `a` (any dtype but object) once, on
/// the engine's threads: the memory-bandwidth yardstick the benchmarks compare against.
/// Returns a checksum so the reads cannot be optimised away.
#[pyfunction]
#[pyo3(signature = (a, threads=0))]
fn read_pass(py: Python<'_>, a: &Bound<'_, PyUntypedArray>, threads: usize) -> PyResult<u64> {
    let (ptr, nbytes) = args::bytes(a, "a")?;
    if ptr == 0 && nbytes > 0 {
        return Err(PyValueError::new_err("null data pointer"));
    }
    let pool = pool(py, threads)?;
    Ok(py.detach(move || {
        // Unaligned head bytes are read one by one so the words are aligned.
        let head = ((8 - ptr % 8) % 8).min(nbytes);
        let words = (nbytes - head) / 8;
        // Empty parts are never made from the address: it may be null (nbytes == 0) or,
        // when the whole buffer fits in the head, not 8-byte aligned at ptr + head.
        let bytes = |from: usize, n: usize| -> &[u8] {
            if n == 0 {
                return &[];
            }
            // SAFETY: [from, from + n) lies in the array's buffer of `nbytes` bytes at the
            // non-null `ptr`, which the argument keeps alive (and the caller unwritten).
            unsafe { std::slice::from_raw_parts(from as *const u8, n) }
        };
        let data: &[u64] = if words == 0 {
            &[]
        } else {
            // SAFETY: ptr + head is 8-byte aligned (head rounds ptr up) and non-null, and
            // its `words` words end inside the array's live buffer of `nbytes` bytes.
            unsafe { std::slice::from_raw_parts((ptr + head) as *const u64, words) }
        };
        let end = ptr + head + words * 8;
        let rest: u64 = bytes(ptr, head)
            .iter()
            .chain(bytes(end, ptr + nbytes - end))
            .fold(0, |a, &b| a ^ b as u64);
        let body = || {
            use rayon::prelude::*;
            data.par_chunks(1 << 16)
                .map(|c| {
                    // Four lanes of xor keep the loop free of a serial dependency.
                    let mut acc = [0u64; 4];
                    let mut it = c.chunks_exact(4);
                    for q in &mut it {
                        for k in 0..4 {
                            acc[k] ^= q[k];
                        }
                    }
                    it.remainder()
                        .iter()
                        .fold(acc[0] ^ acc[1] ^ acc[2] ^ acc[3], |a, &b| a ^ b)
                })
                .reduce(|| 0, |a, b| a ^ b)
        };
        pool.install(body) ^ rest
    }))
}

/// Forces the scalar kernels ("scalar"), the best the CPU has ("auto"), the AVX2 kernels
/// ("avx2") or the AVX-512 ones ("avx512"); any case. Forcing a set the CPU lacks is an
/// error.
#[pyfunction]
fn set_simd(name: &str) -> PyResult<()> {
    arch::set(name, "simd").map_err(PyValueError::new_err)
}

/// The kernel set f32-lane calls use now: "avx512", "avx2" or "scalar".
#[pyfunction]
fn simd_level() -> &'static str {
    arch::current().name()
}

/// The kernel sets this CPU can run, from "scalar" to the best (what `set_simd` accepts
/// besides "auto").
#[pyfunction]
fn simd_available() -> Vec<&'static str> {
    arch::LEVELS
        .into_iter()
        .filter(|l| l.available())
        .map(|l| l.name())
        .collect()
}

/// The CPU features the kernel sets look for that this CPU has (e.g. "avx2",
/// "avx512f", "avx512bf16"), for benchmark records.
#[pyfunction]
fn cpu_features() -> Vec<&'static str> {
    arch::cpu_features()
}

/// Threads used when the count is 0: RAYON_NUM_THREADS if a positive integer, else
/// the CPUs available to the process (at most MAX_THREADS). Builds no pool.
#[pyfunction]
fn default_threads() -> usize {
    default_size()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // A bad CE_FAST_SIMD fails the import rather than silently meaning "auto".
    arch::init_from_env().map_err(PyValueError::new_err)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_function(wrap_pyfunction!(run_binary, m)?)?;
    m.add_function(wrap_pyfunction!(kl_run, m)?)?;
    m.add_function(wrap_pyfunction!(plain_forward, m)?)?;
    m.add_function(wrap_pyfunction!(plain_backward, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd, m)?)?;
    m.add_function(wrap_pyfunction!(read_pass, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(simd_available, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    m.add_function(wrap_pyfunction!(default_threads, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::kernel_source, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::kernel_names, m)?)?;
    // The package's one version number: Cargo.toml's, also pyproject's (dynamic).
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CHUNK", rows::CHUNK)?;
    m.add("PAR_MIN_ELEMS", rows::PAR_MIN_ELEMS)?;
    m.add("MAX_THREADS", MAX_THREADS)?;
    Ok(())
}
