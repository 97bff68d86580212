//! Bindings only: Python hands over array descriptors (address, dtype code,
//! shape, strides in elements) already validated by `ce_fast`; this layer checks
//! what it relies on, picks the kernel set and releases the GIL for the pass.
//!
//! Soundness rests on that contract: each address and layout describes live memory
//! that the caller keeps alive for the call, and `ce_fast` makes the arrays written
//! here share no element with the arrays read (`out=logits` exactly is the one overlap
//! allowed, and each row is read before it is overwritten by the same worker).

#![warn(clippy::undocumented_unsafe_blocks)]

mod elem;
mod float;
mod kernels;
mod plain;
mod rows;
mod simd;

use elem::{DType, Matrix};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rows::{GradSpec, Problem, StatsOut};
use std::sync::{Arc, Mutex, OnceLock};

/// (address, dtype code, columns, column stride, batch shape, batch strides)
type Desc = (usize, u8, usize, isize, Vec<usize>, Vec<isize>);

/// (a0, b, g pointers, a_lse, a_swt, d, e, out descriptor): the gradient's coefficients.
type GradArgs = (usize, usize, usize, f64, f64, f64, f64, Desc);

fn matrix(d: Desc, what: &str) -> PyResult<Matrix> {
    let (ptr, code, cols, col_stride, batch_shape, batch_strides) = d;
    let dtype = DType::from_code(code)
        .ok_or_else(|| PyValueError::new_err(format!("{what}: unknown dtype code {code}")))?;
    if batch_shape.len() != batch_strides.len() {
        return Err(PyValueError::new_err(format!(
            "{what}: shape and strides differ in length"
        )));
    }
    if cols == 0 {
        return Err(PyValueError::new_err(format!("{what}: zero classes")));
    }
    if ptr == 0 && batch_shape.iter().product::<usize>() > 0 {
        return Err(PyValueError::new_err(format!("{what}: null data pointer")));
    }
    Ok(Matrix {
        ptr,
        dtype,
        cols,
        col_stride,
        batch_shape,
        batch_strides,
    })
}

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

/// The `len` values at `ptr`, or None for a null `ptr`.
///
/// # Safety
/// A non-null `ptr` is aligned for `T` and holds `len` initialised values that nothing
/// writes while the slice lives.
unsafe fn slice<'a, T>(ptr: usize, len: usize) -> Option<&'a [T]> {
    // SAFETY: the caller's obligation above; null was mapped to None.
    (ptr != 0).then(|| unsafe { std::slice::from_raw_parts(ptr as *const T, len) })
}

/// The f64 / i64 side arrays (targets, weights, statistics, coefficients) are used as
/// slices and written through `*mut f64`: an address that is not 8-byte aligned is refused.
fn check_aligned(ptrs: &[(usize, &str)]) -> PyResult<()> {
    match ptrs.iter().find(|(p, _)| !p.is_multiple_of(8)) {
        Some((p, what)) => Err(PyValueError::new_err(format!(
            "{what}: address {p:#x} is not 8-byte aligned"
        ))),
        None => Ok(()),
    }
}

/// Per-row statistics of `x`, and the gradient into `grad.7` when `grad` is given.
///
/// grad = (a0_ptr, b_ptr, g_ptr, a_lse, a_swt, d, e, out_desc); pointers are f64 of length rows.
#[pyfunction]
/// stats = (mx, ls, zy, swz, swtz, swt) destinations (f64, length rows, 0 = not wanted);
/// given = (mx, ls, swt) pointers: statistics saved by an earlier call; only the gradient pass runs.
#[pyo3(signature = (x, target, weight, soft, scale, softcap, want_wz, stats, grad=None, threads=0, given=None))]
#[allow(clippy::too_many_arguments)]
fn run(
    py: Python<'_>,
    x: Desc,
    target: usize,
    weight: usize,
    soft: Option<Desc>,
    scale: f64,
    softcap: f64,
    want_wz: bool,
    stats: (usize, usize, usize, usize, usize, usize),
    grad: Option<GradArgs>,
    threads: usize,
    given: Option<(usize, usize, usize)>,
) -> PyResult<()> {
    if given.is_some_and(|g| g.0 == 0 || g.1 == 0) || (given.is_some() && grad.is_none()) {
        return Err(PyValueError::new_err(
            "given statistics need mx and ls pointers and a gradient",
        ));
    }
    let x = matrix(x, "logits")?;
    let soft = soft.map(|d| matrix(d, "soft target")).transpose()?;
    if let Some(s) = &soft {
        if s.cols != x.cols || s.batch_shape != x.batch_shape {
            return Err(PyValueError::new_err(
                "soft target shape differs from logits",
            ));
        }
    }
    let rows = x.rows();
    let out = StatsOut {
        mx: stats.0,
        ls: stats.1,
        zy: stats.2,
        swz: stats.3,
        swtz: stats.4,
        swt: stats.5,
    };
    let gout = match &grad {
        Some(g) => {
            let m = matrix(g.7.clone(), "grad out")?;
            if m.cols != x.cols || m.batch_shape != x.batch_shape {
                return Err(PyValueError::new_err(
                    "gradient out shape differs from logits",
                ));
            }
            Some(m)
        }
        None => None,
    };
    let (gv, gr) = (
        given.unwrap_or_default(),
        grad.as_ref().map_or((0, 0, 0), |g| (g.0, g.1, g.2)),
    );
    check_aligned(&[
        (target, "target"),
        (weight, "weight"),
        (stats.0, "mx"),
        (stats.1, "ls"),
        (stats.2, "zy"),
        (stats.3, "swz"),
        (stats.4, "swtz"),
        (stats.5, "swt"),
        (gv.0, "given mx"),
        (gv.1, "given ls"),
        (gv.2, "given swt"),
        (gr.0, "a0"),
        (gr.1, "b"),
        (gr.2, "g"),
    ])?;
    if target != 0 {
        // The engine indexes rows with these: refuse what validation should have caught.
        // SAFETY: non-null and aligned (checked above); ce_fast passes an int64 array of
        // `rows` values that it keeps alive for the call, and nothing writes it meanwhile.
        let t = unsafe { std::slice::from_raw_parts(target as *const i64, rows) };
        if let Some(&bad) = t.iter().find(|&&y| y >= x.cols as i64) {
            return Err(PyValueError::new_err(format!(
                "target index {bad} out of range"
            )));
        }
    }
    let pool = pool(py, threads)?;
    let x_ref = &x;
    let soft_ref = soft.as_ref();
    let gout_ref = gout.as_ref();
    let cols = x.cols;
    py.detach(move || {
        // SAFETY: aligned (checked above); ce_fast passes its own int64 targets (`rows`) and
        // float64 weights (`cols`, a private copy), kept alive and unwritten for the call.
        let (target, weight) = unsafe { (slice::<i64>(target, rows), slice::<f64>(weight, cols)) };
        let p = Problem {
            x: x_ref,
            target,
            weight,
            soft: soft_ref,
            scale,
            softcap,
            want_wz,
            // SAFETY: aligned, mx and ls non-null (checked above); ce_fast passes float64
            // statistics of `rows` values from an earlier call, kept alive for this one.
            given: given.map(|(m, l, s)| unsafe {
                (
                    slice(m, rows).unwrap(),
                    slice(l, rows).unwrap(),
                    slice(s, rows),
                )
            }),
        };
        // SAFETY: aligned (checked above); ce_fast passes float64 coefficients of `rows`
        // values, fresh arrays that it keeps alive and nothing writes during the call.
        let gspec = grad.as_ref().zip(gout_ref).map(|(g, m)| unsafe {
            GradSpec {
                a0: slice(g.0, rows).unwrap_or(&[]),
                b: slice(g.1, rows).unwrap_or(&[]),
                g: slice(g.2, rows).unwrap_or(&[]),
                a_lse: g.3,
                a_swt: g.4,
                d: g.5,
                e: g.6,
                out: m,
            }
        });
        rows::run_auto(&p, gspec.as_ref(), out, &pool);
    });
    Ok(())
}

/// The int64 targets at `target` as class indices (-1 for ignored rows) and the counted
/// rows; `Err(r)` for the first row whose target is out of range.
fn plain_targets(
    target: usize,
    rows: usize,
    cols: usize,
    ignore_index: i64,
) -> PyResult<Result<(Vec<i64>, usize), usize>> {
    if target == 0 && rows > 0 {
        return Err(PyValueError::new_err("target: null data pointer"));
    }
    check_aligned(&[(target, "target")])?;
    // SAFETY: non-null for rows > 0 and aligned (checked above); ce_fast passes a
    // contiguous int64 array of `rows` values, kept alive and unwritten for the call.
    let t = unsafe { slice::<i64>(target, rows) }.unwrap_or(&[]);
    Ok(plain::targets(t, cols, ignore_index))
}

/// `len` float64 values at a non-null, 8-byte aligned `ptr`, checked.
///
/// # Safety
/// `ptr` addresses `len` float64 values that the caller keeps alive for the call, and
/// nothing else reads or writes them while the slice lives.
unsafe fn f64s_mut<'a>(ptr: usize, len: usize, what: &str) -> PyResult<&'a mut [f64]> {
    if ptr == 0 || !ptr.is_multiple_of(8) {
        return Err(PyValueError::new_err(format!(
            "{what}: address {ptr:#x} is null or not 8-byte aligned"
        )));
    }
    // SAFETY: the caller's obligation above; null and misalignment were refused.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr as *mut f64, len) })
}

/// The plain cross-entropy's forward (integer targets and `ignore_index`, no other
/// option): `target` int64, contiguous, one per row; `lse` float64 (2, rows), contiguous,
/// receives the row maxima then the log-sums; `loss` float64 (rows,) the per-row losses
/// (0 for ignored rows). With `grad = (go, mean, out)` the gradient of `go * loss` (go
/// divided by the counted rows when `mean`) is written into `out` in the same pass.
/// Returns the counted rows, or -1 - r for the first row r whose target is out of range
/// (then nothing is computed).
#[pyfunction]
#[pyo3(signature = (x, target, ignore_index, lse, loss, grad=None, threads=0))]
#[allow(clippy::too_many_arguments)]
fn plain_forward(
    py: Python<'_>,
    x: Desc,
    target: usize,
    ignore_index: i64,
    lse: usize,
    loss: usize,
    grad: Option<(f64, bool, Desc)>,
    threads: usize,
) -> PyResult<i64> {
    let x = matrix(x, "logits")?;
    let rows = x.rows();
    let (idx, counted) = match plain_targets(target, rows, x.cols, ignore_index)? {
        Ok(v) => v,
        Err(r) => return Ok(-1 - r as i64),
    };
    let gout = match grad {
        Some((go, mean, d)) => Some((go, mean, grad_matrix(d, &x)?)),
        None => None,
    };
    // SAFETY: ce_fast passes fresh float64 arrays, (2, rows) and (rows,), that it keeps
    // alive for the call and that nothing else touches meanwhile.
    let (lse, loss) = unsafe {
        (
            f64s_mut(lse, 2 * rows, "lse")?,
            f64s_mut(loss, rows, "loss")?,
        )
    };
    let (mx, ls) = lse.split_at_mut(rows);
    let pool = pool(py, threads)?;
    py.detach(|| {
        let grad = gout.as_ref().map(|(go, mean, m)| {
            let up = if *mean {
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

/// The plain cross-entropy's gradient from the `lse` a `plain_forward` call filled: `go`
/// for the batch (divided by the counted rows when `mean`), or float64 per-row values at
/// `go_rows` (0 = none), into `out`.
#[pyfunction]
#[pyo3(signature = (x, target, ignore_index, lse, go, go_rows, mean, out, threads=0))]
#[allow(clippy::too_many_arguments)]
fn plain_backward(
    py: Python<'_>,
    x: Desc,
    target: usize,
    ignore_index: i64,
    lse: usize,
    go: f64,
    go_rows: usize,
    mean: bool,
    out: Desc,
    threads: usize,
) -> PyResult<()> {
    let x = matrix(x, "logits")?;
    let rows = x.rows();
    let (idx, counted) = plain_targets(target, rows, x.cols, ignore_index)?
        .map_err(|r| PyValueError::new_err(format!("target of row {r} out of range")))?;
    let out = grad_matrix(out, &x)?;
    // SAFETY: ce_fast passes the float64 statistics saved by the forward, (2, rows), and
    // per-row upstream gradients (rows,), alive and unwritten for the call; only read here.
    let (lse, up) = unsafe {
        let lse: &[f64] = f64s_mut(lse, 2 * rows, "lse")?;
        let up = if go_rows != 0 {
            plain::Upstream::Rows(f64s_mut(go_rows, rows, "go_rows")?)
        } else if mean {
            plain::Upstream::Mean(go)
        } else {
            plain::Upstream::Sum(go)
        };
        (lse, up)
    };
    let (mx, ls) = lse.split_at(rows);
    let pool = pool(py, threads)?;
    py.detach(|| plain::backward(&x, &idx, counted, mx, ls, up, &out, &pool));
    Ok(())
}

/// A gradient destination: the logits' class count and batch shape.
fn grad_matrix(d: Desc, x: &Matrix) -> PyResult<Matrix> {
    let m = matrix(d, "grad out")?;
    if m.cols != x.cols || m.batch_shape != x.batch_shape {
        return Err(PyValueError::new_err(
            "gradient out shape differs from logits",
        ));
    }
    Ok(m)
}

/// Reads every byte of a C-contiguous buffer once, on the engine's threads: the
/// memory-bandwidth yardstick the benchmarks compare against. Returns a checksum
/// so the reads cannot be optimised away.
#[pyfunction]
#[pyo3(signature = (ptr, nbytes, threads=0))]
fn read_pass(py: Python<'_>, ptr: usize, nbytes: usize, threads: usize) -> PyResult<u64> {
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
            // SAFETY: [from, from + n) lies in the caller's buffer of `nbytes` bytes at the
            // non-null `ptr`, which the caller keeps alive and unwritten for the call.
            unsafe { std::slice::from_raw_parts(from as *const u8, n) }
        };
        let data: &[u64] = if words == 0 {
            &[]
        } else {
            // SAFETY: ptr + head is 8-byte aligned (head rounds ptr up) and non-null, and
            // its `words` words end inside the caller's live buffer of `nbytes` bytes.
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

/// Forces the scalar kernels ("scalar"), the best the CPU has ("auto"), or the AVX2
/// kernels ("avx2": an error on a CPU without AVX2, FMA and F16C); any case.
#[pyfunction]
fn set_simd(name: &str) -> PyResult<()> {
    simd::set(name, "simd").map_err(PyValueError::new_err)
}

/// The kernel set f32-lane calls use now: "avx2" or "scalar".
#[pyfunction]
fn simd_level() -> &'static str {
    simd::current().name()
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
    simd::init_from_env().map_err(PyValueError::new_err)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_function(wrap_pyfunction!(plain_forward, m)?)?;
    m.add_function(wrap_pyfunction!(plain_backward, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd, m)?)?;
    m.add_function(wrap_pyfunction!(read_pass, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
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
