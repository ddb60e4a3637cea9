//! The state one mock keeps, shared by its handle ([`crate::MockServer`]), the
//! accept loop, every connection and the control API.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;

use super::faults::Faults;
use super::gen;
use super::record::{Counters, Recorder};
use super::statuspage::{Page, PageStatus};
use super::{Flavor, MockOptions};

/// State shared by the server handle, the accept loop and every connection.
pub(crate) struct Shared {
    pub flavor: Flavor,
    pub opts: MockOptions,
    pub faults: ArcSwap<Faults>,
    /// The status page's state (used by the statuspage flavor only).
    pub page: ArcSwap<Page>,
    pub counters: Counters,
    pub recorder: Recorder,
    /// OpenAI's `system_fingerprint`, fixed by the seed.
    pub fingerprint: String,
    /// Serves each accepted connection (HTTP/1.1 or HTTP/2).
    pub builder: auto::Builder<TokioExecutor>,
}

impl Shared {
    pub(crate) fn new(flavor: Flavor, opts: MockOptions) -> Self {
        let fingerprint = format!("fp_{:010x}", gen::mix(opts.seed, 0xf1) >> 24);
        Self {
            flavor,
            opts,
            faults: ArcSwap::from_pointee(Faults::default()),
            page: ArcSwap::from_pointee(Page::new(&PageStatus::default(), None)),
            counters: Counters::default(),
            recorder: Recorder::new(),
            fingerprint,
            builder: auto::Builder::new(TokioExecutor::new()),
        }
    }

    /// Replaces the status page's state.
    pub(crate) fn set_status(&self, status: &PageStatus) {
        let previous = self.page.load_full();
        self.page
            .store(Arc::new(Page::new(status, Some(&previous))));
    }

    /// Clears faults, counters, recorded requests and the page status; arrival numbers
    /// restart at 0, so the fault sequence after a reset is the same as after start.
    pub(crate) fn reset(&self) {
        self.faults.store(Arc::new(Faults::default()));
        self.page
            .store(Arc::new(Page::new(&PageStatus::default(), None)));
        self.counters.clear();
        self.recorder.clear();
    }
}
