//! One request queue as both device drivers use it: a ring (split or packed), one device-shared
//! slot per descriptor (the request header the device reads and the status or response
//! it writes, a typed `#[repr(C)]` struct `T`), and the failure policy.
//!
//! The policy, the same for every driver:
//! - a used entry that breaks the protocol (bad id, length, index) fails the queue with
//!   [`QueueFailure::Device`]; the device may still write into the queue's memory, so
//!   the ring and slots are never freed (leaked on drop);
//! - a back-end that hung up (the transport's broken flag, checked every 256 idle polls
//!   while requests are in flight, one relaxed load) fails the queue with
//!   [`QueueFailure::Disconnected`]; its memory is not reused either (the flag also rises
//!   when vireo gives up on a silent back-end, which may still be alive and writing);
//! - after a failure the driver takes the in-flight slots back with
//!   [`RequestQueue::drain_in_flight`] and fails their requests; nothing more is queued.
//!
//! Slots and ring descriptors are separate: a slot is taken with
//! [`take_slot`](RequestQueue::take_slot), filled through
//! [`slot_mut`](RequestQueue::slot_mut), and submitted as a chain whose segments point
//! into it (at [`slot_addr`](RequestQueue::slot_addr) + a field offset) and into data
//! buffers. The slot stays the driver's after its completion until it gives it back
//! with [`release_slot`](RequestQueue::release_slot) or submits it again (a retry).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::Result;
use crate::memory::{DmaBuf, DmaMemory};
use crate::ring::{QueueFull, Segment, Used, Virtqueue};
use crate::wire::DeviceShared;

/// Why a request queue stopped working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueFailure {
    /// The back-end went away.
    Disconnected,
    /// The device broke the protocol (the message says how); its memory is never reused.
    Device(String),
}

impl std::fmt::Display for QueueFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueFailure::Disconnected => {
                f.write_str("the back-end closed the connection or the PCI function was removed")
            }
            QueueFailure::Device(why) => f.write_str(why),
        }
    }
}

/// At most this many requests in flight, polling prefetches what the next completion
/// reads (with more, the device is the bottleneck and its writes should not be raced).
const PREFETCH_IN_FLIGHT: u16 = 4;

/// Idle polls between two looks at the transport's broken flag (and for a stall).
const BROKEN_CHECK_INTERVAL: u32 = 256;

/// A queue with requests on the device and nothing completed (nor added) for this
/// long is notified again, whatever the device's suppression state says; looked at
/// every 256 idle polls of [`RequestQueue::poll`] and by [`RequestQueue::arm`] before
/// a waiter sleeps.
pub const RENOTIFY_AFTER: std::time::Duration = std::time::Duration::from_millis(10);

/// A request queue with device-shared slots of type `T`. Owned by one thread.
pub struct RequestQueue<T: DeviceShared> {
    ring: Option<Virtqueue>,
    slots: Option<DmaBuf>,
    base: *mut T,
    /// Device address of slot 0.
    base_iova: u64,
    size: u16,
    free: Vec<u16>,
    /// Where the slots released by the reaps since the last `take_slot` begin in
    /// `free` (see [`take_slot`](Self::take_slot)).
    batch_mark: Option<usize>,
    /// The device holds the slot (submitted, not yet completed).
    on_device: Box<[bool]>,
    broken: Arc<AtomicBool>,
    failure: Option<QueueFailure>,
    /// The device may still write into this memory: never free it.
    leak: bool,
    idle_polls: u32,
    /// Completions reaped so far.
    reaped: u64,
    /// (completions reaped, avail index, ticks): since when neither count has moved
    /// while requests were out.
    stall_mark: (u64, u16, u64),
    used: Vec<Used>,
    _t: PhantomData<T>,
}

// SAFETY: `base` points into `slots`, owned by this queue; moving the queue moves that
// ownership (the rings are Send for the same reason). Not Sync.
unsafe impl<T: DeviceShared> Send for RequestQueue<T> {}

impl<T: DeviceShared> std::fmt::Debug for RequestQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestQueue")
            .field("size", &self.size)
            .field("free_slots", &self.free.len())
            .field("failure", &self.failure)
            .finish()
    }
}

impl<T: DeviceShared + Default> RequestQueue<T> {
    /// Slots for every descriptor of `ring`, in `mem`; `broken` is the transport's flag.
    pub fn new(
        mem: &Arc<DmaMemory>,
        ring: impl Into<Virtqueue>,
        broken: Arc<AtomicBool>,
    ) -> Result<RequestQueue<T>> {
        let mut ring: Virtqueue = ring.into();
        // Slot numbers are the tokens, all below the ring size: with indirect
        // descriptors each slot gets its own head and table.
        ring.use_slot_heads();
        let n = ring.size() as usize;
        let stride = std::mem::size_of::<T>();
        let align = std::mem::align_of::<T>().max(64);
        let mut slots = mem.alloc((n * stride).max(1), align)?;
        let base = slots.as_mut_slice().as_mut_ptr() as *mut T;
        let base_iova = slots.iova();
        for i in 0..n {
            // SAFETY: `i < n` slots of `T` fit in the allocation, which is aligned for T;
            // the device has no request yet, so nothing else accesses it.
            unsafe { base.add(i).write(T::default()) };
        }
        let stall_mark = (0, ring.avail_index(), crate::clock::ticks());
        Ok(RequestQueue {
            size: ring.size(),
            ring: Some(ring),
            slots: Some(slots),
            base,
            base_iova,
            free: (0..n as u16).rev().collect(),
            batch_mark: None,
            on_device: vec![false; n].into_boxed_slice(),
            broken,
            failure: None,
            leak: false,
            idle_polls: 0,
            reaped: 0,
            stall_mark,
            used: Vec::with_capacity(n),
            _t: PhantomData,
        })
    }
}

impl<T: DeviceShared> RequestQueue<T> {
    /// Slots (= descriptors of the ring).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The ring (index, statistics).
    pub fn ring(&self) -> Option<&Virtqueue> {
        self.ring.as_ref()
    }

    /// Requests the device holds.
    pub fn in_flight(&self) -> usize {
        self.ring.as_ref().map_or(0, |r| r.in_flight() as usize)
    }

    /// The queue failed, or its connection is gone (the transport's flag is up).
    pub fn lost(&self) -> bool {
        self.failure.is_some() || self.broken.load(Ordering::Acquire)
    }

    /// Why the queue stopped working, if it did.
    pub fn failure(&self) -> Option<&QueueFailure> {
        self.failure.as_ref()
    }

    /// Largest number of segments one request may have on the ring.
    pub fn max_segments(&self) -> usize {
        self.ring.as_ref().map_or(0, |r| r.max_segments())
    }

    /// A free slot, if any (and the queue works).
    ///
    /// After one or more reaps, the slots come back in the order their requests
    /// completed (the first completed first), not reversed as a plain stack would
    /// give them: a caller that resubmits in completion order keeps each of its
    /// buffers with the same slot, and (the ring frees chains in the same order) the
    /// same chain head, whose descriptors then need no rewrite (with slot heads, see
    /// [`Virtqueue::use_slot_heads`], the slot is the head). This holds for the
    /// slots released before the first take after the reaps (drivers release them
    /// while reaping); after a ring overflow, slots come back as a stack.
    #[inline]
    pub fn take_slot(&mut self) -> Option<u16> {
        if self.failure.is_some() {
            return None;
        }
        if let Some(m) = self.batch_mark.take() {
            if let Some(batch) = self.free.get_mut(m..) {
                batch.reverse();
            }
        }
        self.free.pop()
    }

    /// Give back a slot the device does not hold.
    ///
    /// # Panics
    /// If the device holds the slot (a driver bug that would hand one slot to two
    /// requests).
    #[inline]
    pub fn release_slot(&mut self, slot: u16) {
        assert!(
            !self.on_device[slot as usize],
            "slot {slot} released while the device holds it"
        );
        self.free.push(slot);
    }

    /// Device address of slot `slot` (add `offset_of!` a field for that field).
    #[inline]
    pub fn slot_addr(&self, slot: u16) -> u64 {
        self.base_iova + slot as u64 * std::mem::size_of::<T>() as u64
    }

    /// The slot, to fill in before submitting it.
    ///
    /// # Panics
    /// If the device holds the slot (a driver bug).
    #[inline]
    pub fn slot_mut(&mut self, slot: u16) -> &mut T {
        assert!(
            !self.on_device[slot as usize],
            "slot {slot} is in use by the device"
        );
        // SAFETY: `slot < size` (indexing above), the slot lies inside `slots`, aligned;
        // the device does not hold it, so this is the only access; T is plain data.
        unsafe { &mut *self.base.add(slot as usize) }
    }

    /// The slot as the device left it (after its completion).
    #[inline]
    pub fn slot(&self, slot: u16) -> T {
        assert!((slot as usize) < self.size as usize);
        // SAFETY: inside `slots`, aligned; the device published its writes before the
        // used entry the ring read with Acquire ordering. A volatile read: a device that
        // keeps writing can only produce another bit pattern, and every one is valid
        // for T (DeviceShared).
        unsafe { std::ptr::read_volatile(self.base.add(slot as usize)) }
    }

    /// One field of the slot as the device left it: `offset` is the field's
    /// `offset_of!` in `T` (checked to lie inside `T` and to be aligned for `F`).
    #[inline]
    pub fn read_at<F: DeviceShared>(&self, slot: u16, offset: usize) -> F {
        assert!(
            (slot as usize) < self.size as usize
                && offset
                    .checked_add(std::mem::size_of::<F>())
                    .is_some_and(|end| end <= std::mem::size_of::<T>())
                && std::mem::align_of::<F>() <= std::mem::align_of::<T>()
                && offset.is_multiple_of(std::mem::align_of::<F>()),
            "field at {offset} does not fit slot {slot}"
        );
        // SAFETY: checked above: the field lies inside slot `slot` of `slots` and is
        // aligned for F. Volatile, and every bit pattern is a valid F (see `slot`).
        unsafe {
            let p = (self.base.add(slot as usize) as *const u8).add(offset) as *const F;
            std::ptr::read_volatile(p)
        }
    }

    /// Put `slot`'s chain on the ring: `segs[..n_out]` are read by the device, the rest
    /// written. Visible to the device after [`publish`](Self::publish).
    ///
    /// Always inlined: the ring dispatch (split or packed) made LLVM stop inlining it
    /// into the drivers' submit paths (virtio-scsi on SPDK's target, callgrind: +14
    /// instructions per I/O as a call).
    #[inline(always)]
    pub fn submit(
        &mut self,
        slot: u16,
        segs: &[Segment],
        n_out: usize,
    ) -> std::result::Result<(), QueueFull> {
        if self.failure.is_some() {
            return Err(QueueFull);
        }
        assert!(
            !self.on_device[slot as usize],
            "slot {slot} submitted while the device holds it"
        );
        let ring = self.ring.as_mut().ok_or(QueueFull)?;
        ring.add(segs, n_out, slot as u64)?;
        self.on_device[slot as usize] = true;
        Ok(())
    }

    /// Make submitted requests visible and kick the device if it asks for it.
    #[inline]
    pub fn publish(&mut self) -> std::result::Result<(), QueueFailure> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        if let Err(e) = ring.publish() {
            return Err(self.notify_failed(e));
        }
        Ok(())
    }

    /// A notification could not be sent: the queue fails (the device would never see
    /// its requests).
    fn notify_failed(&mut self, e: crate::error::Error) -> QueueFailure {
        let f = QueueFailure::Device(format!("cannot notify the device: {e}"));
        self.fail(f.clone());
        f
    }

    /// Reap completions: `on_done(slot, used_len)` for each, in the device's order; the
    /// slot stays the caller's. An error means the queue failed (now or before).
    #[inline]
    pub fn poll(
        &mut self,
        mut on_done: impl FnMut(&mut Self, u16, u32),
    ) -> std::result::Result<usize, QueueFailure> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        let Some(ring) = self.ring.as_mut() else {
            return Ok(0);
        };
        if ring.in_flight() <= PREFETCH_IN_FLIGHT {
            // Latency-bound: while waiting, keep fetching what the next completion will
            // read: the used entry, and the read-back line (`T::READ_BACK_OFFSET`) of
            // the request it most likely names, the oldest. Each line then arrives as
            // soon as the device has written it, alongside the used index, not one
            // miss after another.
            ring.prefetch_next_used();
            if let Some(t) = ring.next_in_order() {
                Self::prefetch_read_back(self.base, self.size, t);
            }
        }
        if !ring.has_used() {
            self.idle_polls = self.idle_polls.wrapping_add(1);
            if self.idle_polls.is_multiple_of(BROKEN_CHECK_INTERVAL) && ring.in_flight() > 0 {
                if self.broken.load(Ordering::Relaxed) {
                    self.fail(QueueFailure::Disconnected);
                    return Err(QueueFailure::Disconnected);
                }
                self.check_stall()?;
            }
            return Ok(0);
        }
        // Requests that waited for room take slots in their own order: no pairing to
        // keep then (see the split ring's `free_chain`).
        if self.batch_mark.is_none() && !ring.overflowed() {
            self.batch_mark = Some(self.free.len());
        }
        let mut used = std::mem::take(&mut self.used);
        used.clear();
        let r = ring.poll(|u| used.push(u));
        for u in &used {
            self.on_device[u.token as usize] = false;
            Self::prefetch_slot_for_reuse(self.base, self.size, u.token);
        }
        for u in &used {
            on_done(self, u.token as u16, u.len);
        }
        let n = used.len();
        self.reaped += n as u64;
        self.used = used;
        match r {
            Ok(_) => Ok(n),
            Err(e) => {
                let f = QueueFailure::Device(e.to_string());
                self.fail(f.clone());
                Err(f)
            }
        }
    }

    /// Start loading the line of slot `slot` that its completion reads
    /// (`T::READ_BACK_OFFSET`); a hint, nothing is read.
    #[inline]
    fn prefetch_read_back(base: *mut T, size: u16, slot: u64) {
        if slot < size as u64 && T::READ_BACK_OFFSET < std::mem::size_of::<T>() {
            // SAFETY: `slot < size`: the slot lies inside `slots` (which starts at
            // `base`), and the offset inside the slot.
            crate::ring::prefetch(unsafe {
                (base.add(slot as usize) as *const u8).add(T::READ_BACK_OFFSET)
            });
        }
    }

    /// With requests out and nothing completed (nor added) for [`RENOTIFY_AFTER`],
    /// notify the device again, whether or not it asked (a driver may notify at any
    /// time, virtio 1.2 2.7.13). A lost notification (a device or emulator that got
    /// the suppression protocol wrong) then costs a pause instead of a queue that
    /// never moves again; a slow device gets a harmless extra notification per
    /// period. Called every 256 idle polls and before sleeping.
    fn check_stall(&mut self) -> std::result::Result<(), QueueFailure> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        if ring.in_flight() == 0 {
            return Ok(());
        }
        let now = crate::clock::ticks();
        let (reaped, avail) = (self.reaped, ring.avail_index());
        if (self.stall_mark.0, self.stall_mark.1) != (reaped, avail) {
            self.stall_mark = (reaped, avail, now);
        } else if now.saturating_sub(self.stall_mark.2)
            >= crate::clock::ns_to_ticks(RENOTIFY_AFTER.as_nanos() as u64)
        {
            self.stall_mark.2 = now;
            if let Err(e) = ring.renotify() {
                return Err(self.notify_failed(e));
            }
        }
        Ok(())
    }

    /// Start taking the lines of a completed `slot` that the driver uses next: its
    /// read-back line (read now, rewritten at the next submission) and its first line
    /// (the request header, rewritten at the next submission), for writing. Each of
    /// these lines was last touched by the device; taking them together now overlaps
    /// the transfers, instead of one miss when `on_done` reads the response and two
    /// store misses (which stall once the store buffer fills) when the slot is reused.
    #[inline]
    fn prefetch_slot_for_reuse(base: *mut T, size: u16, slot: u64) {
        if slot < size as u64 {
            // SAFETY: `slot < size`: the slot lies inside `slots` (which starts at
            // `base`); READ_BACK_OFFSET is inside the slot (checked).
            unsafe {
                let p = base.add(slot as usize) as *const u8;
                crate::ring::prefetch_write(p);
                // Slots are 64-byte aligned: a read-back part in the first 64 bytes
                // shares the first line.
                if T::READ_BACK_OFFSET >= 64 && T::READ_BACK_OFFSET < std::mem::size_of::<T>() {
                    crate::ring::prefetch_write(p.add(T::READ_BACK_OFFSET));
                }
            }
        }
    }

    /// Fail the queue (the first failure sticks). Its memory is never reused: a device
    /// that broke the protocol may still write it, and so may a back-end that vireo
    /// stopped waiting for.
    pub fn fail(&mut self, f: QueueFailure) {
        if self.failure.is_some() {
            return;
        }
        self.leak = true;
        self.failure = Some(f);
    }

    /// The connection came back and serves this same ring (the device resends what it
    /// had in flight): work again with the new doorbell, completion signal and broken
    /// flag. Only after [`QueueFailure::Disconnected`].
    pub fn reattach(
        &mut self,
        notifier: crate::notify::Notifier,
        signal: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
        broken: Arc<AtomicBool>,
    ) -> bool {
        if self.failure != Some(QueueFailure::Disconnected) {
            return false;
        }
        let Some(ring) = self.ring.as_mut() else {
            return false;
        };
        ring.set_notifier(notifier);
        ring.set_completion_signal(signal);
        // The new connection looks at the ring when kicked.
        let _ = ring.notifier().notify(ring.index());
        self.broken = broken;
        self.failure = None;
        self.leak = false;
        self.idle_polls = 0;
        true
    }

    /// Take back every slot the device holds (after a failure: their requests are
    /// failed by the caller). Returns them; they are free again.
    pub fn drain_in_flight(&mut self) -> Vec<u16> {
        let mut v = Vec::new();
        for (i, d) in self.on_device.iter_mut().enumerate() {
            if *d {
                *d = false;
                v.push(i as u16);
                self.free.push(i as u16);
            }
        }
        v
    }

    /// Ask the device to signal the next completion on the queue's eventfd; returns the
    /// fd and whether completions are already pending (then do not sleep). `None` when
    /// the transport has no completion eventfd, or the queue failed.
    pub fn arm(&mut self) -> Option<(std::os::fd::RawFd, bool)> {
        // About to sleep: a back-end that hung up would never signal (the polling path
        // looks every 256 idle polls, which naps would stretch to seconds).
        if self.failure.is_none() && self.in_flight() > 0 && self.broken.load(Ordering::Relaxed) {
            self.fail(QueueFailure::Disconnected);
        }
        if self.failure.is_some() || self.check_stall().is_err() {
            return None;
        }
        let ring = self.ring.as_mut()?;
        let fd = ring.completion_fd()?;
        let pending = ring.enable_interrupts();
        Some((fd, pending))
    }

    /// The eventfd the device signals completions on (when interrupts are enabled),
    /// if the transport has one.
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.ring.as_ref()?.completion_fd()
    }

    /// Back to polling: interrupts off, a pending signal consumed.
    pub fn disarm(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            ring.disable_interrupts();
            ring.clear_completion_signal();
        }
    }

    /// Take the ring out for reuse by another channel, freeing the slots: only when the
    /// queue works and the device holds nothing (otherwise `None`, and the memory stays
    /// with this queue, which leaks it when dropped if the device may still use it).
    pub fn take_ring(&mut self) -> Option<Virtqueue> {
        if self.failure.is_some() || self.in_flight() > 0 {
            return None;
        }
        self.slots.take();
        self.ring.take()
    }
}

impl<T: DeviceShared> Drop for RequestQueue<T> {
    fn drop(&mut self) {
        let in_flight = self.ring.as_ref().is_some_and(|r| r.in_flight() > 0);
        if self.leak || in_flight {
            // The device may still read or write the ring and the slots (their
            // eventfds go).
            if let Some(r) = self.ring.take() {
                r.leak();
            }
            std::mem::forget(self.slots.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::DmaConfig;
    use crate::notify::Notifier;
    use crate::ring::{QueueOptions, SplitQueue};
    use crate::wire::blk::ReqHeader;
    use std::sync::atomic::{AtomicU16, AtomicU64};

    /// A queue of `size` slots: the queue, the transport's broken flag, and the count
    /// of notifications sent.
    fn queue(size: u16) -> (RequestQueue<ReqHeader>, Arc<AtomicBool>, Arc<AtomicU64>) {
        let mem = DmaMemory::new(DmaConfig::default()).unwrap();
        let kicks = Arc::new(AtomicU64::new(0));
        let ring = SplitQueue::new(
            &mem,
            0,
            size,
            QueueOptions::default(),
            Notifier::Counter(kicks.clone()),
        )
        .unwrap();
        let broken = Arc::new(AtomicBool::new(false));
        (
            RequestQueue::new(&mem, ring, broken.clone()).unwrap(),
            broken,
            kicks,
        )
    }

    /// A request queue over a ring with indirect descriptors (slot heads).
    fn indirect_queue(size: u16) -> RequestQueue<ReqHeader> {
        let mem = DmaMemory::new(DmaConfig::default()).unwrap();
        let ring = SplitQueue::new(
            &mem,
            0,
            size,
            QueueOptions {
                event_idx: false,
                indirect_max: 4,
                packed: false,
            },
            Notifier::Counter(Arc::new(AtomicU64::new(0))),
        )
        .unwrap();
        RequestQueue::new(&mem, ring, Arc::new(AtomicBool::new(false))).unwrap()
    }

    #[test]
    fn with_indirect_descriptors_each_slot_is_its_ring_head() {
        let mut q = indirect_queue(8);
        assert!(q.ring().unwrap().slot_heads());
        // Every slot on the ring at once (three descriptors each: more than the ring
        // could hold directly).
        let mut slots = Vec::new();
        while let Some(s) = q.take_slot() {
            let seg = |off: u64| Segment {
                addr: q.slot_addr(s) + off,
                len: 4,
            };
            q.submit(s, &[seg(0), seg(4), seg(8)], 1).unwrap();
            slots.push(s);
        }
        assert_eq!(slots.len(), 8);
        q.publish().unwrap();
        let ring = q.ring().unwrap();
        assert_eq!(ring.in_flight(), 8);
        // The avail ring lists each slot's own head, in submission order.
        let avail = ring.layout().avail_va;
        for (i, &s) in slots.iter().enumerate() {
            // SAFETY: avail ring entry `i` (< size) of this queue's ring, mapped and
            // aligned; nothing else writes it now.
            let head = unsafe { std::ptr::read_volatile((avail + 4 + 2 * i as u64) as *const u16) };
            assert_eq!(u16::from_le(head), s);
        }
    }

    /// One 16-byte request on the ring, published; its slot.
    fn submit_one(q: &mut RequestQueue<ReqHeader>) -> u16 {
        let s = q.take_slot().unwrap();
        let seg = Segment {
            addr: q.slot_addr(s),
            len: 16,
        };
        q.submit(s, &[seg], 1).unwrap();
        q.publish().unwrap();
        s
    }

    #[test]
    fn slots_are_typed_and_addressed() {
        let (mut q, _, _) = queue(8);
        let s = q.take_slot().unwrap();
        q.slot_mut(s).sector = 42u64.into();
        assert_eq!(q.slot(s).sector.get(), 42);
        assert_eq!(q.slot_addr(1) - q.slot_addr(0), 16);
        // A slot on the device cannot be written.
        let seg = Segment {
            addr: q.slot_addr(s),
            len: 16,
        };
        q.submit(s, &[seg], 1).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            q.slot_mut(s);
        }));
        assert!(r.is_err());
    }

    #[test]
    fn slots_come_back_in_completion_order() {
        // The k-th slot taken after a reap is the slot of the batch's k-th completion
        // (a plain stack would reverse the batch).
        let (mut q, _, _) = queue(8);
        let layout = q.ring().unwrap().layout();
        let slots: Vec<u16> = (0..4).map(|_| submit_one(&mut q)).collect();
        // The device completes the third, the first, the fourth: one batch. Used
        // entries are (id, len) at byte 4 + 8 * i of the used ring, then the index.
        // Heads are handed out in slot order here, so head == slot order.
        let done = [slots[2], slots[0], slots[3]];
        let used = layout.used_va as *mut u8;
        for (i, &s) in done.iter().enumerate() {
            // SAFETY: test-only device writes inside the ring's used area.
            unsafe {
                std::ptr::write_unaligned(used.add(4 + 8 * i) as *mut u32, s as u32);
                std::ptr::write_unaligned(used.add(8 + 8 * i) as *mut u32, 0);
            }
        }
        // SAFETY: as above: the used index.
        unsafe { (*(used.add(2) as *const AtomicU16)).store(3, Ordering::Release) };
        let mut got = Vec::new();
        assert_eq!(
            q.poll(|q, s, _| {
                got.push(s);
                q.release_slot(s);
            }),
            Ok(3)
        );
        assert_eq!(got, done.to_vec());
        let again: Vec<u16> = (0..3).map(|_| q.take_slot().unwrap()).collect();
        assert_eq!(again, done.to_vec());
    }

    #[test]
    fn a_queue_that_stops_moving_is_notified_again() {
        let (mut q, _, kicks) = queue(8);
        let _ = submit_one(&mut q);
        assert_eq!(
            kicks.load(Ordering::Relaxed),
            1,
            "the first publish notifies"
        );
        // The device never answers: within a few periods, polling notifies it again.
        let start = std::time::Instant::now();
        while kicks.load(Ordering::Relaxed) < 3 && start.elapsed() < RENOTIFY_AFTER * 100 {
            assert_eq!(q.poll(|_, _, _| {}), Ok(0));
        }
        assert!(kicks.load(Ordering::Relaxed) >= 3);
        assert!(
            start.elapsed() >= RENOTIFY_AFTER * 2,
            "not before the period is over"
        );
        assert_eq!(q.ring().unwrap().renotifications(), 2);
    }

    #[test]
    fn a_waiter_that_sleeps_between_polls_notifies_a_stuck_device_again() {
        // Sleeping callers poll rarely: the check also runs each time they arm.
        let (mut q, _, kicks) = queue(8);
        let _ = submit_one(&mut q);
        for _ in 0..4 {
            let _ = q.arm();
            q.disarm();
            std::thread::sleep(RENOTIFY_AFTER / 2 + std::time::Duration::from_millis(1));
        }
        let _ = q.arm();
        assert!(
            kicks.load(Ordering::Relaxed) >= 2,
            "renotified while arming"
        );
    }

    #[test]
    fn a_waiter_about_to_sleep_notices_a_hung_up_backend() {
        let (mut q, broken, _) = queue(8);
        let _ = submit_one(&mut q);
        broken.store(true, Ordering::Relaxed);
        assert!(q.arm().is_none(), "no sleep on a dead back-end's eventfd");
        assert_eq!(q.failure(), Some(&QueueFailure::Disconnected));
    }

    #[test]
    fn a_hung_up_backend_fails_the_queue_and_returns_its_slots() {
        let (mut q, broken, _) = queue(8);
        let s = submit_one(&mut q);
        for _ in 0..BROKEN_CHECK_INTERVAL {
            assert_eq!(q.poll(|_, _, _| {}), Ok(0));
        }
        broken.store(true, Ordering::Relaxed);
        let mut r = Ok(0);
        for _ in 0..BROKEN_CHECK_INTERVAL {
            r = q.poll(|_, _, _| {});
            if r.is_err() {
                break;
            }
        }
        assert_eq!(r, Err(QueueFailure::Disconnected));
        assert_eq!(q.take_slot(), None, "a failed queue hands out no slots");
        assert_eq!(q.drain_in_flight(), vec![s]);
        assert_eq!(q.publish(), Err(QueueFailure::Disconnected));
    }
}
