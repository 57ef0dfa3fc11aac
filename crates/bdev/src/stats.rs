//! I/O statistics: per channel (written only by the owning thread), summed per bdev.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde::Serialize;

use crate::io::IoOp;

/// A snapshot of I/O counters, in the shape of SPDK's `bdev_get_iostat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IoStats {
    /// Bytes read.
    pub bytes_read: u64,
    /// Completed reads.
    pub num_read_ops: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Completed writes.
    pub num_write_ops: u64,
    /// Bytes unmapped.
    pub bytes_unmapped: u64,
    /// Completed unmaps.
    pub num_unmap_ops: u64,
    /// Bytes zeroed.
    pub bytes_write_zeroes: u64,
    /// Completed write-zeroes.
    pub num_write_zeroes_ops: u64,
    /// Completed flushes.
    pub num_flush_ops: u64,
    /// Sum of read latencies in nanoseconds.
    pub read_latency_ns: u64,
    /// Sum of write latencies in nanoseconds.
    pub write_latency_ns: u64,
    /// Sum of unmap latencies in nanoseconds.
    pub unmap_latency_ns: u64,
    /// Failed I/Os.
    pub io_errors: u64,
    /// Requests sent to the device (after splitting).
    pub device_requests: u64,
    /// Times a request waited because the ring was full.
    pub queue_full_waits: u64,
}

impl IoStats {
    /// Add another snapshot.
    pub fn add(&mut self, o: &IoStats) {
        self.bytes_read += o.bytes_read;
        self.num_read_ops += o.num_read_ops;
        self.bytes_written += o.bytes_written;
        self.num_write_ops += o.num_write_ops;
        self.bytes_unmapped += o.bytes_unmapped;
        self.num_unmap_ops += o.num_unmap_ops;
        self.bytes_write_zeroes += o.bytes_write_zeroes;
        self.num_write_zeroes_ops += o.num_write_zeroes_ops;
        self.num_flush_ops += o.num_flush_ops;
        self.read_latency_ns += o.read_latency_ns;
        self.write_latency_ns += o.write_latency_ns;
        self.unmap_latency_ns += o.unmap_latency_ns;
        self.io_errors += o.io_errors;
        self.device_requests += o.device_requests;
        self.queue_full_waits += o.queue_full_waits;
    }

    /// Account one completed I/O.
    #[inline]
    pub fn record(&mut self, op: IoOp, bytes: u64, latency_ns: u64, ok: bool) {
        if !ok {
            self.io_errors += 1;
            return;
        }
        match op {
            IoOp::Read => {
                self.bytes_read += bytes;
                self.num_read_ops += 1;
                self.read_latency_ns += latency_ns;
            }
            IoOp::Write => {
                self.bytes_written += bytes;
                self.num_write_ops += 1;
                self.write_latency_ns += latency_ns;
            }
            IoOp::Unmap => {
                self.bytes_unmapped += bytes;
                self.num_unmap_ops += 1;
                self.unmap_latency_ns += latency_ns;
            }
            IoOp::WriteZeroes => {
                self.bytes_write_zeroes += bytes;
                self.num_write_zeroes_ops += 1;
            }
            IoOp::Flush => self.num_flush_ops += 1,
        }
    }
}

const FIELDS: usize = 15;

/// Counters of one channel, published by its thread for readers on other threads.
#[derive(Debug, Default)]
pub struct ChannelStats {
    cells: [AtomicU64; FIELDS],
}

fn to_array(s: &IoStats) -> [u64; FIELDS] {
    [
        s.bytes_read,
        s.num_read_ops,
        s.bytes_written,
        s.num_write_ops,
        s.bytes_unmapped,
        s.num_unmap_ops,
        s.bytes_write_zeroes,
        s.num_write_zeroes_ops,
        s.num_flush_ops,
        s.read_latency_ns,
        s.write_latency_ns,
        s.unmap_latency_ns,
        s.io_errors,
        s.device_requests,
        s.queue_full_waits,
    ]
}

fn from_array(a: [u64; FIELDS]) -> IoStats {
    IoStats {
        bytes_read: a[0],
        num_read_ops: a[1],
        bytes_written: a[2],
        num_write_ops: a[3],
        bytes_unmapped: a[4],
        num_unmap_ops: a[5],
        bytes_write_zeroes: a[6],
        num_write_zeroes_ops: a[7],
        num_flush_ops: a[8],
        read_latency_ns: a[9],
        write_latency_ns: a[10],
        unmap_latency_ns: a[11],
        io_errors: a[12],
        device_requests: a[13],
        queue_full_waits: a[14],
    }
}

impl ChannelStats {
    /// Publish the owner's counters (single writer: relaxed stores).
    pub fn publish(&self, s: &IoStats) {
        for (c, v) in self.cells.iter().zip(to_array(s)) {
            c.store(v, Ordering::Relaxed);
        }
    }

    /// Read the published counters.
    pub fn snapshot(&self) -> IoStats {
        let mut a = [0u64; FIELDS];
        for (v, c) in a.iter_mut().zip(self.cells.iter()) {
            *v = c.load(Ordering::Relaxed);
        }
        from_array(a)
    }
}

/// Statistics of a bdev: live channels plus the totals of closed ones.
#[derive(Debug, Default)]
pub struct BdevStats {
    inner: Mutex<(Vec<Weak<ChannelStats>>, IoStats)>,
}

impl BdevStats {
    /// A new channel's counters.
    pub fn register(&self) -> Arc<ChannelStats> {
        let c = Arc::new(ChannelStats::default());
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.retain(|w| w.strong_count() > 0);
        g.0.push(Arc::downgrade(&c));
        c
    }

    /// A closing channel's final counters: moved from the live set to the totals.
    pub fn retire(&self, channel: &Arc<ChannelStats>, final_stats: &IoStats) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.retain(|w| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(channel)) && w.strong_count() > 0);
        g.1.add(final_stats);
    }

    /// Totals over all channels, live and closed.
    pub fn total(&self) -> IoStats {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = g.1;
        for c in g.0.iter().filter_map(Weak::upgrade) {
            t.add(&c.snapshot());
        }
        t
    }
}
