//! What a stream counts: the VM's buffer account (control state) and the metric handles the VM hands in.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Bytes queued across one VM's streams. The VM's buffer budget (`--vm-buffer`) is checked against this
/// count; the `stream_buffered` gauge only mirrors it.
pub struct BufferAccount {
    bytes: AtomicUsize,
    gauge: Gauge,
}

impl BufferAccount {
    pub fn new(gauge: Gauge) -> BufferAccount {
        BufferAccount {
            bytes: AtomicUsize::new(0),
            gauge,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    pub(super) fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
        self.gauge.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(super) fn sub(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
        self.gauge.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// What a stream counts, handed in by its VM (one per VM, shared by its streams), so this module depends on
/// no global metric registry.
pub struct StreamCounters {
    /// Bytes queued across the VM's streams.
    pub buffered: Arc<BufferAccount>,
    /// Streams whose process runs.
    pub streams_open: Gauge,
    /// Output discarded because its stream was closed.
    pub dropped: Counter,
    /// Shim attachments.
    pub attaches: Counter,
}
