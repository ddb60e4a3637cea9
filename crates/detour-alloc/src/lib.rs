//! detour's memory allocator: mimalloc, and a way to hand what a peak freed
//! back to the OS.
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

pub use mimalloc::MiMalloc;

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
