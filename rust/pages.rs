//! Page-size advice for fresh outputs. A gradient the size of the logits is usually a
//! new allocation whose pages the pass touches first; with 4 KiB pages that is one page
//! fault per 4 KiB (half a million for a 2 GiB gradient), which measured here as the
//! larger part of a big training step. NumPy already asks for 2 MiB pages on its large
//! allocations; torch does not, so the engine asks for them on the outputs it writes.

use crate::elem::Matrix;

/// Outputs smaller than this are left alone: one system call would not pay.
const MIN_BYTES: usize = 4 << 20;
/// The transparent huge page size on x86-64 and most aarch64 kernels.
const HUGE: usize = 2 << 20;

/// The whole 2 MiB pages inside `[start, start + len)`, as (address, length), if any.
fn huge_span(start: usize, len: usize) -> Option<(usize, usize)> {
    let lo = start.checked_add(HUGE - 1)? & !(HUGE - 1);
    let hi = start.checked_add(len)? & !(HUGE - 1);
    (hi > lo).then(|| (lo, hi - lo))
}

/// Asks the kernel to back the dense interior of `out` with huge pages, when `out` is a
/// large dense array other than `logits` (an in-place output is already paged in).
/// Advice only: no byte of memory changes, and a refusal (no THP support, a file
/// mapping) is ignored.
pub fn advise_fresh(out: &Matrix, logits: &Matrix) {
    if out.ptr == logits.ptr {
        return;
    }
    let Some((start, len)) = out.dense_bytes() else {
        return;
    };
    if len < MIN_BYTES {
        return;
    }
    if let Some((addr, n)) = huge_span(start, len) {
        advise_huge(addr, n);
    }
}

#[cfg(target_os = "linux")]
fn advise_huge(addr: usize, len: usize) {
    extern "C" {
        fn madvise(
            addr: *mut std::ffi::c_void,
            len: usize,
            advice: std::ffi::c_int,
        ) -> std::ffi::c_int;
    }
    const MADV_HUGEPAGE: std::ffi::c_int = 14;
    // SAFETY: MADV_HUGEPAGE changes only how the kernel backs the range's pages, never their
    // contents; the range is page-aligned and lies inside the caller's output array.
    unsafe {
        madvise(addr as *mut std::ffi::c_void, len, MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_addr: usize, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_span_keeps_to_whole_pages_inside() {
        assert_eq!(huge_span(0, HUGE), Some((0, HUGE)));
        assert_eq!(huge_span(1, HUGE), None);
        assert_eq!(huge_span(1, 3 * HUGE), Some((HUGE, 2 * HUGE)));
        assert_eq!(huge_span(HUGE - 64, 5 * HUGE), Some((HUGE, 4 * HUGE)));
        assert_eq!(huge_span(usize::MAX - 10, 100), None);
    }
}
