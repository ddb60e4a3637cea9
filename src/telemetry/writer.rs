//! The log's writer: lines are formatted on the thread that logs and handed
//! through a bounded queue to a thread of their own, which writes them to
//! stderr in batches.
//!
//! - A request never waits for the log: when the queue is full (a stalled
//!   stderr pipe, a collector that stopped reading), the line is dropped and
//!   counted ([`Writer::dropped`]).
//! - A request does not wake the writer either, while lines keep coming: the
//!   writer drains the queue, writes what it found in one call, then sleeps
//!   [`BATCH_EVERY`] and looks again. Only when a look finds the queue empty
//!   does it block on the queue, and the next line wakes it. A logger that
//!   wakes its thread for every line costs every request two futex calls and a
//!   context switch — on this hot path, more than formatting the line.
//! - Lines may reach stderr up to [`BATCH_EVERY`] late; at exit,
//!   [`WriterGuard`] writes out whatever is queued.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// How long the writer sleeps after writing a batch before it looks again.
pub const BATCH_EVERY: Duration = Duration::from_millis(5);

/// Bytes gathered into one `write` at most.
const BATCH_BYTES: usize = 256 * 1024;

enum Msg {
    Line(Vec<u8>),
    /// Write out what is queued, then stop.
    Stop,
}

/// Where the subscriber writes: a handle on the writer's queue.
#[derive(Clone)]
pub struct Writer {
    queue: Sender<Msg>,
    dropped: Arc<AtomicU64>,
}

/// The writer's thread; dropping it writes out the queued lines and stops it.
pub struct WriterGuard {
    queue: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// A writer thread named `name` writing to `out`, holding at most
    /// `lines` queued lines.
    pub fn spawn(
        out: impl Write + Send + 'static,
        lines: usize,
        name: &str,
    ) -> std::io::Result<(Self, WriterGuard)> {
        let (queue, queued) = crossbeam_channel::bounded(lines);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || write_batches(&queued, out))?;
        let writer = Self {
            queue: queue.clone(),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let guard = WriterGuard {
            queue,
            thread: Some(thread),
        };
        Ok((writer, guard))
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A counter of dropped lines that outlives this handle.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dropped)
    }

    /// Queues one whole line (its bytes as they are), or drops and counts
    /// it when the queue is full: never waits.
    pub fn send(&self, line: Vec<u8>) {
        match self.queue.try_send(Msg::Line(line)) {
            Ok(()) => {}
            // Full, or stopping (the process is exiting): never wait.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.send(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Writer {
    type Writer = Writer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        // Blocks only while the writer drains a full queue.
        let _ = self.queue.send(Msg::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: blocks for the first line, then drains and writes in
/// batches every [`BATCH_EVERY`] until a look finds nothing.
fn write_batches(queued: &Receiver<Msg>, mut out: impl Write) {
    let mut batch = Vec::with_capacity(16 * 1024);
    // Blocks only when the last look found nothing.
    while let Ok(first) = queued.recv() {
        let mut next = Some(first);
        loop {
            let mut stop = false;
            while let Some(msg) = next.take().or_else(|| queued.try_recv().ok()) {
                match msg {
                    Msg::Line(line) => batch.extend_from_slice(&line),
                    Msg::Stop => {
                        stop = true;
                        break;
                    }
                }
                if batch.len() >= BATCH_BYTES {
                    break;
                }
            }
            let wrote = !batch.is_empty();
            if wrote {
                // Nowhere to report a failed write to stderr.
                let _ = out.write_all(&batch);
                let _ = out.flush();
                batch.clear();
            }
            if stop {
                return;
            }
            if !wrote {
                break;
            }
            // A dedicated thread, not a runtime's: sleeping here is the point.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(BATCH_EVERY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // A test double shared with the writer thread.
    #[allow(clippy::disallowed_types)]
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    #[allow(clippy::disallowed_types)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_batched_and_are_written_out_at_stop() {
        let sink = Sink::default();
        let (mut w, guard) = Writer::spawn(sink.clone(), 10_000, "test-log").unwrap();
        for i in 0..1000 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.bytes.lock().unwrap().clone()).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
        // Queued together, written together: far fewer writes than lines.
        assert!(sink.writes.load(Ordering::Relaxed) < 100);
        assert_eq!(w.dropped(), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        /// A stderr that never returns until released.
        #[allow(clippy::disallowed_types)]
        struct Stuck(Arc<Mutex<()>>, Arc<std::sync::atomic::AtomicBool>);
        impl Write for Stuck {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.1.store(true, Ordering::SeqCst);
                drop(self.0.lock().unwrap());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        #[allow(clippy::disallowed_types)]
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let writing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stuck = Stuck(Arc::clone(&gate), Arc::clone(&writing));
        let (mut w, guard) = Writer::spawn(stuck, 4, "test-log").unwrap();
        for _ in 0..100 {
            w.write_all(b"x\n").unwrap();
        }
        // Wait until the writer holds a batch and is stuck writing it.
        while !writing.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let before = w.dropped();
        for _ in 0..100 {
            w.write_all(b"x\n").unwrap();
        }
        // Returned at once (or this test would hang); at most a queue's worth went in.
        assert!(
            w.dropped() - before >= 96,
            "dropped {}",
            w.dropped() - before
        );
        drop(held);
        drop(guard);
    }
}
