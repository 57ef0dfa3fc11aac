//! Fault injection and statistics shared between a target's worker threads and the test that
//! owns the target.
//!
//! Both are plain atomics: a test flips a fault on while I/O runs and the next request the
//! target pops sees it. Nothing here blocks.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Sentinel of the disconnect countdown meaning "no disconnect armed".
const DISARMED: u64 = u64::MAX;

/// Extra bytes a lying device adds to the used length of a request, beyond every byte the
/// driver made writable.
pub const LIE_EXTRA_BYTES: u32 = 4096;

/// Faults the target injects on demand. Every setter takes effect on the next request the target
/// pops from a ring, on whichever queue.
#[derive(Debug)]
pub struct Faults {
    fail_next: AtomicU64,
    completion_delay_us: AtomicU64,
    reorder_window: AtomicU32,
    disconnect_countdown: AtomicU64,
    lie_used_len_next: AtomicU64,
    bad_used_id_next: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_next: AtomicU64::new(0),
            completion_delay_us: AtomicU64::new(0),
            reorder_window: AtomicU32::new(0),
            disconnect_countdown: AtomicU64::new(DISARMED),
            lie_used_len_next: AtomicU64::new(0),
            bad_used_id_next: AtomicU64::new(0),
        }
    }
}

/// Decrements `counter` if it is non-zero; true when it did (one "shot" was consumed).
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

impl Faults {
    /// Fails the next `n` requests without executing them (replaces any count still pending):
    /// a blk target completes them with `VIRTIO_BLK_S_IOERR`, a scsi target as its
    /// [`ScsiFaults`](crate::ScsiFaults) say (CHECK CONDITION / MEDIUM ERROR by default).
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::Release);
    }

    /// Requests still to be failed by [`Faults::fail_next`].
    pub fn pending_failures(&self) -> u64 {
        self.fail_next.load(Ordering::Acquire)
    }

    /// Delays every completion by `delay` (the worker thread of the queue sleeps before it puts
    /// the request in the used ring). `Duration::ZERO` turns it off.
    pub fn set_completion_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.completion_delay_us.store(us, Ordering::Release);
    }

    /// Holds back up to `window` completions of a queue and then completes them in reverse
    /// order. Whatever is held when the available ring runs dry is completed (reversed) at once,
    /// so a driver that waits for a single request never hangs. 0 or 1 means in order.
    pub fn set_reorder_window(&self, window: u32) {
        self.reorder_window.store(window, Ordering::Release);
    }

    /// Drops the connection when the request after the next `n` arrives: `n` more requests are
    /// served, the one after them is not completed and the socket is shut down, so the driver
    /// sees a disconnect with I/O in flight. Fires once, then disarms itself; the target accepts
    /// the next connection as usual.
    pub fn disconnect_after(&self, n: u64) {
        // `DISARMED` is the sentinel, so the largest countdown is one less.
        self.disconnect_countdown
            .store(n.min(DISARMED - 1), Ordering::Release);
    }

    /// Disarms a pending [`Faults::disconnect_after`].
    pub fn cancel_disconnect(&self) {
        self.disconnect_countdown.store(DISARMED, Ordering::Release);
    }

    /// Whether a disconnect is still armed.
    pub fn disconnect_armed(&self) -> bool {
        self.disconnect_countdown.load(Ordering::Acquire) != DISARMED
    }

    /// The next `n` requests report a used length [`LIE_EXTRA_BYTES`] bytes larger than all
    /// device-writable buffers of the request together (a lying device). The request itself is
    /// executed normally.
    pub fn lie_used_len_next(&self, n: u64) {
        self.lie_used_len_next.store(n, Ordering::Release);
    }

    /// The next `n` requests are executed but completed with a used id of `queue_size + head`:
    /// an id outside the ring, which no driver may accept. The real head is never returned.
    pub fn bad_used_id_next(&self, n: u64) {
        self.bad_used_id_next.store(n, Ordering::Release);
    }

    /// Turns every fault off.
    pub fn clear(&self) {
        self.fail_next(0);
        self.set_completion_delay(Duration::ZERO);
        self.set_reorder_window(0);
        self.cancel_disconnect();
        self.lie_used_len_next(0);
        self.bad_used_id_next(0);
    }

    pub(crate) fn take_failure(&self) -> bool {
        take_one(&self.fail_next)
    }

    pub(crate) fn take_lie(&self) -> bool {
        take_one(&self.lie_used_len_next)
    }

    pub(crate) fn take_bad_id(&self) -> bool {
        take_one(&self.bad_used_id_next)
    }

    pub(crate) fn completion_delay(&self) -> Option<Duration> {
        match self.completion_delay_us.load(Ordering::Acquire) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub(crate) fn reorder_window(&self) -> usize {
        match self.reorder_window.load(Ordering::Acquire) {
            0 | 1 => 0,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        }
    }

    /// Called when a request arrives. True when this request must trigger the disconnect (the
    /// countdown had reached zero); the countdown is disarmed then.
    pub(crate) fn arrival_triggers_disconnect(&self) -> bool {
        let previous = self.disconnect_countdown.fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |n| match n {
                DISARMED => None,
                0 => Some(DISARMED),
                n => Some(n - 1),
            },
        );
        previous == Ok(0)
    }
}

/// Counters the target keeps; read a snapshot with `TargetHandle::stats`.
#[derive(Debug, Default)]
pub(crate) struct StatCounters {
    pub connections: AtomicU64,
    pub kicks: AtomicU64,
    pub interrupts: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub get_ids: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub unsupported: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub ok: AtomicU64,
    pub io_errors: AtomicU64,
    pub malformed: AtomicU64,
    pub out_of_range: AtomicU64,
    pub read_only_rejected: AtomicU64,
    pub oversize_rejected: AtomicU64,
    pub discard_limit_rejected: AtomicU64,
    pub write_zeroes_limit_rejected: AtomicU64,
    pub max_segments: AtomicU64,
    pub max_segment_bytes: AtomicU64,
    pub max_request_bytes: AtomicU64,
    pub max_discard_ranges: AtomicU64,
    pub max_discard_range_sectors: AtomicU64,
    pub max_write_zeroes_ranges: AtomicU64,
    pub max_write_zeroes_range_sectors: AtomicU64,
    pub injected_errors: AtomicU64,
    pub injected_disconnects: AtomicU64,
    pub lied_used_lens: AtomicU64,
    pub bad_used_ids: AtomicU64,
    pub reordered_completions: AtomicU64,
    pub resubmitted: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn raise(counter: &AtomicU64, n: u64) {
    counter.fetch_max(n, Ordering::Relaxed);
}

/// A snapshot of the target's counters, summed over all queues and connections since the
/// target started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Front-end connections accepted.
    pub connections: u64,
    /// Kicks (avail notifications) the queues' worker threads woke up for.
    pub kicks: u64,
    /// Used-buffer notifications (call eventfd writes) sent to the driver.
    pub interrupts: u64,
    /// `VIRTIO_BLK_T_IN` requests received (whatever their outcome).
    pub reads: u64,
    /// `VIRTIO_BLK_T_OUT` requests received.
    pub writes: u64,
    /// `VIRTIO_BLK_T_FLUSH` requests received.
    pub flushes: u64,
    /// `VIRTIO_BLK_T_GET_ID` requests received.
    pub get_ids: u64,
    /// `VIRTIO_BLK_T_DISCARD` requests received.
    pub discards: u64,
    /// `VIRTIO_BLK_T_WRITE_ZEROES` requests received.
    pub write_zeroes: u64,
    /// Requests completed with `VIRTIO_BLK_S_UNSUPP` (unknown type, feature not negotiated,
    /// unknown flags).
    pub unsupported: u64,
    /// Bytes read successfully by `IN` requests.
    pub bytes_read: u64,
    /// Bytes written successfully by `OUT` requests.
    pub bytes_written: u64,
    /// Requests completed with `VIRTIO_BLK_S_OK`.
    pub ok: u64,
    /// Requests completed with `VIRTIO_BLK_S_IOERR` (any cause, injected ones included).
    pub io_errors: u64,
    /// Descriptor chains that break the virtio-blk framing (short header, no status byte,
    /// data in the wrong direction, unreadable guest memory, ...).
    pub malformed: u64,
    /// Requests that reach beyond the capacity or are not aligned to the block size.
    pub out_of_range: u64,
    /// Writes, discards and write-zeroes refused because the device is read-only.
    pub read_only_rejected: u64,
    /// `IN`/`OUT` requests refused for more data segments than `seg_max` or a segment larger
    /// than `size_max`.
    pub oversize_rejected: u64,
    /// Discards refused for more ranges than `max_discard_seg` or a range longer than
    /// `max_discard_sectors`.
    pub discard_limit_rejected: u64,
    /// Write-zeroes refused for more ranges than `max_write_zeroes_seg` or a range longer than
    /// `max_write_zeroes_sectors`.
    pub write_zeroes_limit_rejected: u64,
    /// Largest number of data segments in one `IN`/`OUT` request.
    pub max_segments: u64,
    /// Largest single data segment, in bytes.
    pub max_segment_bytes: u64,
    /// Largest data transfer of one `IN`/`OUT` request, in bytes.
    pub max_request_bytes: u64,
    /// Largest number of ranges in one discard.
    pub max_discard_ranges: u64,
    /// Largest single discard range, in 512-byte sectors.
    pub max_discard_range_sectors: u64,
    /// Largest number of ranges in one write-zeroes.
    pub max_write_zeroes_ranges: u64,
    /// Largest single write-zeroes range, in 512-byte sectors.
    pub max_write_zeroes_range_sectors: u64,
    /// Requests failed by [`Faults::fail_next`].
    pub injected_errors: u64,
    /// Connections dropped by [`Faults::disconnect_after`].
    pub injected_disconnects: u64,
    /// Completions that reported a used length beyond the buffers ([`Faults::lie_used_len_next`]).
    pub lied_used_lens: u64,
    /// Completions reported with an out-of-range id ([`Faults::bad_used_id_next`]).
    pub bad_used_ids: u64,
    /// Completions put in the used ring out of order by [`Faults::set_reorder_window`].
    pub reordered_completions: u64,
    /// Requests an earlier connection left in flight, served again from the inflight
    /// buffer (INFLIGHT_SHMFD).
    pub resubmitted: u64,
}

impl StatCounters {
    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            connections: get(&self.connections),
            kicks: get(&self.kicks),
            interrupts: get(&self.interrupts),
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            get_ids: get(&self.get_ids),
            discards: get(&self.discards),
            write_zeroes: get(&self.write_zeroes),
            unsupported: get(&self.unsupported),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            ok: get(&self.ok),
            io_errors: get(&self.io_errors),
            malformed: get(&self.malformed),
            out_of_range: get(&self.out_of_range),
            read_only_rejected: get(&self.read_only_rejected),
            oversize_rejected: get(&self.oversize_rejected),
            discard_limit_rejected: get(&self.discard_limit_rejected),
            write_zeroes_limit_rejected: get(&self.write_zeroes_limit_rejected),
            max_segments: get(&self.max_segments),
            max_segment_bytes: get(&self.max_segment_bytes),
            max_request_bytes: get(&self.max_request_bytes),
            max_discard_ranges: get(&self.max_discard_ranges),
            max_discard_range_sectors: get(&self.max_discard_range_sectors),
            max_write_zeroes_ranges: get(&self.max_write_zeroes_ranges),
            max_write_zeroes_range_sectors: get(&self.max_write_zeroes_range_sectors),
            injected_errors: get(&self.injected_errors),
            injected_disconnects: get(&self.injected_disconnects),
            lied_used_lens: get(&self.lied_used_lens),
            bad_used_ids: get(&self.bad_used_ids),
            reordered_completions: get(&self.reordered_completions),
            resubmitted: get(&self.resubmitted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_next_counts_down() {
        let f = Faults::default();
        assert!(!f.take_failure());
        f.fail_next(2);
        assert!(f.take_failure());
        assert_eq!(f.pending_failures(), 1);
        assert!(f.take_failure());
        assert!(!f.take_failure());
    }

    #[test]
    fn disconnect_fires_once_after_n() {
        let f = Faults::default();
        assert!(!f.arrival_triggers_disconnect());
        f.disconnect_after(2);
        assert!(f.disconnect_armed());
        assert!(!f.arrival_triggers_disconnect());
        assert!(!f.arrival_triggers_disconnect());
        assert!(f.arrival_triggers_disconnect());
        assert!(!f.disconnect_armed());
        assert!(!f.arrival_triggers_disconnect());

        f.disconnect_after(0);
        assert!(f.arrival_triggers_disconnect());
        f.disconnect_after(5);
        f.cancel_disconnect();
        assert!(!f.arrival_triggers_disconnect());
    }

    #[test]
    fn delay_reorder_and_clear() {
        let f = Faults::default();
        assert_eq!(f.completion_delay(), None);
        f.set_completion_delay(Duration::from_micros(250));
        assert_eq!(f.completion_delay(), Some(Duration::from_micros(250)));
        f.set_reorder_window(1);
        assert_eq!(f.reorder_window(), 0);
        f.set_reorder_window(4);
        assert_eq!(f.reorder_window(), 4);
        f.lie_used_len_next(1);
        f.bad_used_id_next(2);
        f.fail_next(3);
        f.disconnect_after(1);
        f.clear();
        assert_eq!(f.completion_delay(), None);
        assert_eq!(f.reorder_window(), 0);
        assert!(!f.take_lie());
        assert!(!f.take_bad_id());
        assert!(!f.take_failure());
        assert!(!f.disconnect_armed());
    }
}
