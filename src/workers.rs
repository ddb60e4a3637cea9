//! The data plane's threads: one single-threaded tokio runtime per worker
//! (one per core by default, `server.worker_threads`).
//!
//! An accepted client connection is handed to the worker with the fewest
//! open connections and lives its whole life there: its requests, the
//! attempts they make, their hedges and background probes (spawned from the
//! request, so on the same runtime), and the upstream connections they use —
//! each provider's client keeps one connection pool per worker
//! ([`crate::upstream::Upstream`] picks the pool of [`current`]). Nothing on
//! a request's path crosses to another thread: no futex wake-up and no
//! context switch per request, which is what a work-stealing runtime pays
//! whenever a request's client side and its upstream connection land on
//! different threads (nginx and pingora are built the same way).
//!
//! The control plane (reloads, status pages, shared health, the accept
//! loop) stays on the main runtime; the admin listener has its own thread.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// This thread's worker number: 1..=n on a worker, 0 elsewhere.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// How many workers the process runs (set once, by the first [`Workers::start`]).
static COUNT: OnceLock<usize> = OnceLock::new();

/// How many per-worker slots a per-worker structure needs: one per worker,
/// plus one shared by every thread that is not a worker (the main runtime,
/// tests, the drill).
pub fn slots() -> usize {
    COUNT.get().map_or(1, |n| n + 1)
}

/// The calling thread's slot: `1..=n` on a worker, 0 elsewhere. Always less
/// than [`slots`] on a worker of this process's pool.
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// The data plane's worker threads; stopped (and joined) on drop.
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    /// Connections open on this worker.
    open: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A connection's place on a worker, counted until dropped.
#[derive(Debug)]
pub struct Placed {
    open: Arc<AtomicUsize>,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `n` workers (at least one). Providers' clients built after this
    /// keep a pool per worker; the first pool started sets the count for the
    /// process.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let n = n.max(1);
        let _ = COUNT.set(n);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("detour-worker-{i}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(i + 1));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Connections were drained by the listener before this.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })?;
            workers.push(Worker {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Self { workers })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The worker with the fewest open connections (the first of equals),
    /// and the new connection's place on it.
    pub fn place(&self) -> Option<(&Handle, Placed)> {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))?;
        worker.open.fetch_add(1, Ordering::Relaxed);
        let placed = Placed {
            open: Arc::clone(&worker.open),
        };
        Some((&worker.handle, placed))
    }

    /// Open connections per worker, in worker order.
    pub fn open_connections(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.open.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(thread) = w.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The default worker count: one per CPU this process may run on.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_least_loaded_worker_and_run_there() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.len(), 2);
        let (a, pa) = workers.place().unwrap();
        let (b, pb) = workers.place().unwrap();
        assert_eq!(workers.open_connections(), vec![1, 1]);
        // Each task sees its own worker's slot.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (sa, sb) = rt.block_on(async {
            let sa = a.spawn(async { current() }).await.unwrap();
            let sb = b.spawn(async { current() }).await.unwrap();
            (sa, sb)
        });
        assert_ne!(sa, sb);
        assert!((1..=2).contains(&sa) && (1..=2).contains(&sb));
        assert!(sa < slots() && sb < slots());
        assert_eq!(current(), 0);
        drop(pa);
        assert_eq!(workers.open_connections(), vec![0, 1]);
        let (_, _pc) = workers.place().unwrap();
        assert_eq!(workers.open_connections(), vec![1, 1]);
        drop(pb);
    }
}
