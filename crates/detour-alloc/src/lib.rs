//! detour's memory allocator: mimalloc as the global allocator ([`MiMalloc`]),
//! and a way to hand what a peak freed back to the OS.
//!
//! mimalloc keeps free lists per thread: on the request path it costs about
//! a tenth of glibc malloc's instructions (BENCHMARKS.md). It gives wholly
//! free pages back to the OS a while after they are freed (its purge delay,
//! 1 s by default; `MIMALLOC_PURGE_DELAY` in milliseconds sets another).
//! The delay matters on the request path: with pages purged at once, a
//! worker that frees a request's last object on a page hands the page back
//! (`madvise`, a TLB shootdown on every core) and faults it in again on the
//! next request — a fifth of detour's CPU per request under load.
//!
//! Loading a config is the other side: its peak is freed once, and the
//! thread that loaded it may not allocate again for a long time. So after a
//! load, [`give_back_now`] purges everything freed so far. On Linux
//! mimalloc also commits its arenas eagerly, so what it purges would stay
//! resident; that is a compile-time default
//! (`MI_DEFAULT_ARENA_EAGER_COMMIT=0` in the workspace's `.cargo/config.toml`),
//! because the first arena is reserved before `main` runs.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block of at least this size has
/// (`MI_MAX_ALIGN_SIZE` in mimalloc's `types.h`).
const MIN_ALIGN: usize = 16;

/// mimalloc as Rust's global allocator, by its plain entry points whenever
/// the layout allows, as std's `System` does with `malloc`.
///
/// The `mimalloc` crate's allocator calls `mi_malloc_aligned` for every
/// layout. mimalloc v3 serves that from its fast path only for blocks up to
/// 1 KiB whose free list happens to start aligned; anything larger (a boxed
/// request future, a read buffer) takes its generic aligned path, several
/// times the instructions of `mi_malloc`, on every request.
pub struct MiMalloc;

/// Whether `mi_malloc`'s own alignment serves `align` for `size` bytes.
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free`
// takes blocks from any of its entry points); `plain` sends a layout to an
// entry point without an alignment only when mimalloc's guaranteed alignment
// covers it, and the others get the aligned entry points.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: allocation calls take no pointers.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a block this allocator returned, with its
        // layout; the new block keeps the layout's alignment.
        unsafe {
            if plain(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

/// Hands every page mimalloc holds wholly free back to the OS now, without
/// waiting for the purge delay. Costs a few system calls: call it after a
/// one-off peak (loading a config), never per request.
pub fn give_back_now() {
    // SAFETY: `mi_collect` takes no pointers; it collects the calling
    // thread's heap and purges the arenas' free pages, and is safe to call
    // from any thread at any time.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_has_its_layouts_alignment() {
        let sizes = (1..=4096).chain((4096..=262_144).step_by(4093));
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in sizes.clone() {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // Neighbours in one page as well as the first block of one.
                // SAFETY: a non-zero size; freed below with its layout.
                let others = [(); 3].map(|()| unsafe { MiMalloc.alloc(layout) });
                for o in others {
                    assert_eq!(o as usize % align, 0, "size {size}, align {align}");
                }
                // SAFETY: a non-zero size; freed below with its layout.
                let p = unsafe { MiMalloc.alloc(layout) };
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                for o in others {
                    // SAFETY: each came from `alloc` with this layout.
                    unsafe { MiMalloc.dealloc(o, layout) };
                }
                // SAFETY: `p` came from `alloc` with this layout.
                let q = unsafe { MiMalloc.realloc(p, layout, size * 3) };
                assert!(!q.is_null());
                assert_eq!(q as usize % align, 0, "grown from {size}, align {align}");
                // SAFETY: `q` is the block `realloc` returned for the new size.
                unsafe { MiMalloc.dealloc(q, Layout::from_size_align_unchecked(size * 3, align)) };
                // SAFETY: as for `alloc`.
                let z = unsafe { MiMalloc.alloc_zeroed(layout) };
                assert_eq!(z as usize % align, 0, "zeroed, size {size}, align {align}");
                // SAFETY: `z` holds `size` bytes.
                assert!(unsafe { std::slice::from_raw_parts(z, size) }
                    .iter()
                    .all(|&b| b == 0));
                // SAFETY: `z` came from `alloc_zeroed` with this layout.
                unsafe { MiMalloc.dealloc(z, layout) };
            }
        }
    }

    /// `mi_option_purge_delay` in mimalloc.h (v3).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

    #[test]
    fn the_purge_delay_is_left_at_its_default() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads one option value.
        let delay = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        assert_eq!(delay, 1000);
    }

    /// Resident memory of this process, in bytes.
    #[cfg(target_os = "linux")]
    fn rss() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: usize = statm
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_freed_peak_goes_back_at_once() {
        const CHUNK: usize = 64 * 1024;
        const PEAK: usize = 64 * 1024 * 1024;
        let chunks: Vec<*mut u8> = (0..PEAK / CHUNK)
            .map(|_| {
                // SAFETY: a plain allocation, freed below.
                let p = unsafe { libmimalloc_sys::mi_malloc(CHUNK) }.cast::<u8>();
                assert!(!p.is_null());
                // SAFETY: `p` points to CHUNK writable bytes.
                unsafe { std::ptr::write_bytes(p, 1, CHUNK) };
                p
            })
            .collect();
        let at_peak = rss();
        for p in chunks {
            // SAFETY: each pointer came from `mi_malloc` and is freed once.
            unsafe { libmimalloc_sys::mi_free(p.cast()) };
        }
        give_back_now();
        let after = rss();
        assert!(
            at_peak.saturating_sub(after) > PEAK / 2,
            "resident {at_peak} at the peak, {after} after giving back"
        );
    }
}
