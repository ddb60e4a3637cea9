//! detour's memory allocator: mimalloc, with two settings so that memory
//! freed after a peak (loading a large config) goes back to the OS.
//!
//! mimalloc keeps free lists per thread: on the request path it costs about
//! a tenth of glibc malloc's instructions (BENCHMARKS.md). Left at its
//! defaults it also keeps what a peak freed: it returns pages to the OS a
//! second after they are freed, and only when the thread that freed them
//! allocates again, so a thread that goes idle after parsing a large config
//! holds the parse's memory; and on Linux it commits its arenas eagerly, so
//! what it purges stays resident. The first is set here at start
//! ([`give_back_freed_memory`]); the second is a compile-time default
//! (`MI_DEFAULT_ARENA_EAGER_COMMIT=0` in the workspace's `.cargo/config.toml`),
//! because the first arena is reserved before `main` runs.

pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v3), which libmimalloc-sys does
/// not name; the test below checks it by its default.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Environment variable with which an operator sets the purge delay
/// (milliseconds) instead; then [`give_back_freed_memory`] leaves it alone.
pub const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

/// Freed pages go back to the OS as soon as a page is wholly free, instead
/// of after mimalloc's delay. Call once, first thing in `main`.
pub fn give_back_freed_memory() {
    if std::env::var_os(PURGE_DELAY_ENV).is_some() {
        return;
    }
    // SAFETY: `mi_option_set` stores one option value (an atomic store in
    // mimalloc's option table); it takes no pointers and is safe to call
    // from any thread at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purge_delay() -> std::os::raw::c_long {
        // SAFETY: reads one option value.
        unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
    }

    #[test]
    fn the_option_set_is_the_purge_delay() {
        if std::env::var_os(PURGE_DELAY_ENV).is_some() {
            return;
        }
        // mimalloc v3's default purge delay: the option number is right.
        assert_eq!(purge_delay(), 1000);
        give_back_freed_memory();
        assert_eq!(purge_delay(), 0);
    }
}
