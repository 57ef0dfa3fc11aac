//! Driver side of a packed virtqueue (virtio 1.2 section 2.8).
//!
//! One ring carries both directions. The driver writes available descriptors at its
//! position, in ring order, with `VIRTQ_DESC_F_AVAIL` equal to its wrap counter and
//! `VIRTQ_DESC_F_USED` the inverse; the device overwrites them, in the order it
//! completes buffers, with used descriptors (both bits equal to its wrap counter) that
//! carry the buffer id, and skips as many entries as that buffer took. A request and
//! its completion thus share the ring's cache lines; there is no separate avail or used
//! ring and no index to publish.
//!
//! What the driver trusts: nothing but the used descriptor at its own used position,
//! read with one acquiring 8-byte load (length, id and flags together). The id must name
//! a buffer in flight, and the driver's own record of that buffer (its token, its
//! device-writable bytes, how many ring entries it took) says the rest: where the next
//! used descriptor goes, what the length may be. A device that names anything else
//! fails the queue; a length beyond the device-writable bytes is clamped and counted.
//!
//! Ordering: a buffer's other descriptors, then its first descriptor's address, then
//! one releasing 8-byte store of the first descriptor's length, id and flags (the
//! flags make the buffer available, virtio 1.2 2.8.6). The first buffer of a batch
//! keeps that store back until `publish`, which makes the batch available at once (the
//! device reads the ring in order); the notification decision then reads the device's
//! event suppression structure after a full barrier.
//!
//! Interrupts: the driver event suppression structure says `RING_EVENT_FLAGS_DISABLE`
//! while completions are polled; a waiter enables them (with `VIRTIO_RING_F_EVENT_IDX`:
//! `RING_EVENT_FLAGS_DESC` at the next used position and its wrap counter).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::{
    full_barrier, prefetch, QueueFull, QueueOptions, RingLayout, Segment, Used, DESC_F_INDIRECT,
    DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE, DIRECT_CHAIN_MAX,
};
use crate::error::{Error, Result};
use crate::memory::{DmaBuf, DmaMemory};
use crate::notify::Notifier;

/// Descriptor flag: available (virtio 1.2 2.8.1).
pub(crate) const DESC_F_AVAIL: u16 = 1 << 7;
/// Descriptor flag: used.
pub(crate) const DESC_F_USED: u16 = 1 << 15;
/// Event suppression: notify on every event.
pub(crate) const EVENT_FLAGS_ENABLE: u16 = 0;
/// Event suppression: do not notify.
pub(crate) const EVENT_FLAGS_DISABLE: u16 = 1;
/// Event suppression: notify when the descriptor at offset/wrap is made available or
/// used (only with `VIRTIO_RING_F_EVENT_IDX`).
pub(crate) const EVENT_FLAGS_DESC: u16 = 2;
/// Largest queue size of a packed ring (2^15 entries; any size, not only powers of two).
pub const MAX_PACKED_QUEUE_SIZE: u16 = 32768;

/// Where the driver area (driver event suppression) and the device area (device event
/// suppression) lie in the ring buffer of a queue of `size`, and the buffer's length:
/// each on a cache line of its own, after the descriptor ring.
pub(crate) fn packed_ring_sizes(size: usize) -> (usize, usize, usize) {
    let driver = (DESC_SIZE * size).div_ceil(64) * 64;
    let device = driver + 64;
    (driver, device, device + 64)
}

/// The AVAIL and USED bits of an available descriptor written while the driver's wrap
/// counter is `wrap`.
#[inline]
fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL
    } else {
        DESC_F_USED
    }
}

/// Whether `flags` mark a used descriptor of the lap whose wrap counter is `wrap`.
#[inline]
fn is_used(flags: u16, wrap: bool) -> bool {
    let avail = flags & DESC_F_AVAIL != 0;
    let used = flags & DESC_F_USED != 0;
    avail == used && used == wrap
}

/// `vring_need_event` (virtio 1.2 2.7.10): whether moving from `old` to `new` crosses
/// `event` (all mod 2^16).
#[inline]
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver's record of one buffer id.
#[derive(Debug, Clone, Copy, Default)]
struct BufferInfo {
    /// The token given to `add`.
    token: u64,
    /// Device-writable bytes, to validate used lengths.
    writable: u32,
    /// Ring entries the buffer took (0: not in flight).
    descs: u16,
}

/// Driver side of one packed virtqueue. Owned by one thread (`Send`, not `Sync`).
pub struct PackedQueue {
    index: u16,
    size: u16,
    _ring: DmaBuf,
    /// The descriptor ring.
    desc: *mut u8,
    desc_iova: u64,
    /// Offsets of the driver and device areas in the ring buffer.
    driver_off: usize,
    device_off: usize,
    indirect: Option<DmaBuf>,
    indirect_max: u16,
    event_idx: bool,
    /// Each request goes in the ring under the id its token names (a slot number),
    /// through that id's own indirect table (see [`PackedQueue::use_slot_heads`]).
    slot_heads: bool,
    /// A request was refused in slot-heads mode (logged once).
    slot_refusal_logged: bool,
    /// The ring entry the driver writes next, and the driver ring wrap counter.
    next_avail: u16,
    avail_wrap: bool,
    /// The ring entry the device's next used descriptor goes in, and the wrap counter
    /// it carries.
    next_used: u16,
    used_wrap: bool,
    /// Ring entries not held by buffers in flight.
    num_free: u16,
    /// What the driver knows of each buffer id.
    bufs: Box<[BufferInfo]>,
    /// Free buffer ids (without slot heads).
    free_ids: Vec<u16>,
    /// The buffer id whose first descriptor was written at each ring entry.
    order: Box<[u16]>,
    /// Requests added so far (mod 2^16).
    added: u16,
    /// `added` when the last batch was made available: the requests after it are not
    /// the device's yet.
    released: u16,
    /// Ring entries made available since the last notification decision.
    unpublished: u16,
    /// The first buffer added since the last publish: its ring entry and the last 8
    /// bytes of its first descriptor (length, id, flags), not stored yet. The device
    /// reads the ring in order, so the whole batch behind it becomes available at once
    /// when `publish` stores them (see [`PackedQueue::add`]).
    withheld: Option<(u16, u64)>,
    in_flight: u16,
    /// An `add` found no room since the last reap.
    overflowed: bool,
    notifier: Notifier,
    notifications: u64,
    renotifications: u64,
    len_overruns: u64,
    signal: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
    tag: u64,
}

// SAFETY: the raw pointer points into `_ring`, DMA memory owned by this queue (as do the
// indirect tables); moving the queue to another thread moves that ownership along. It
// is not Sync.
unsafe impl Send for PackedQueue {}

impl std::fmt::Debug for PackedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQueue")
            .field("index", &self.index)
            .field("size", &self.size)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl PackedQueue {
    /// Allocate a packed queue of `size` entries (1 to 32768) in `mem`.
    pub fn new(
        mem: &Arc<DmaMemory>,
        index: u16,
        size: u16,
        opts: QueueOptions,
        notifier: Notifier,
    ) -> Result<PackedQueue> {
        if size == 0 || size > MAX_PACKED_QUEUE_SIZE {
            return Err(Error::InvalidQueue(format!(
                "packed queue size {size} must be between 1 and {MAX_PACKED_QUEUE_SIZE}"
            )));
        }
        let n = size as usize;
        let (driver_off, device_off, total) = packed_ring_sizes(n);
        // The descriptor ring is zero-initialised (virtio 1.2 2.8.18): no entry is
        // available or used in the first lap (both wrap counters start at 1).
        let mut ring = mem.alloc(total, 4096)?;
        ring.as_mut_slice().fill(0);
        let desc = ring.as_ptr();
        let desc_iova = ring.iova();
        let indirect = if opts.indirect_max > 1 {
            let mut t = mem.alloc(n * opts.indirect_max as usize * DESC_SIZE, 4096)?;
            t.as_mut_slice().fill(0);
            Some(t)
        } else {
            None
        };
        let mut q = PackedQueue {
            index,
            size,
            _ring: ring,
            desc,
            desc_iova,
            driver_off,
            device_off,
            indirect_max: if indirect.is_some() {
                opts.indirect_max
            } else {
                0
            },
            indirect,
            event_idx: opts.event_idx,
            slot_heads: false,
            slot_refusal_logged: false,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            num_free: size,
            bufs: vec![BufferInfo::default(); n].into_boxed_slice(),
            free_ids: (0..size).rev().collect(),
            order: vec![0; n].into_boxed_slice(),
            added: 0,
            released: 0,
            unpublished: 0,
            withheld: None,
            in_flight: 0,
            overflowed: false,
            notifier,
            notifications: 0,
            renotifications: 0,
            len_overruns: 0,
            signal: None,
            tag: 0,
        };
        q.disable_interrupts();
        Ok(q)
    }

    /// Queue index within the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Number of ring entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Requests submitted and not yet completed.
    #[inline]
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Ring entries not held by requests in flight.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Completions whose used length exceeded the request's device-writable bytes.
    pub fn len_overruns(&self) -> u64 {
        self.len_overruns
    }

    /// Notifications (kicks) sent so far.
    pub fn notifications(&self) -> u64 {
        self.notifications
    }

    /// Notifications sent by [`renotify`](Self::renotify).
    pub fn renotifications(&self) -> u64 {
        self.renotifications
    }

    /// Largest number of segments one request may have.
    pub fn max_segments(&self) -> usize {
        if self.indirect_max > 1 {
            self.indirect_max as usize
        } else {
            self.size as usize
        }
    }

    /// Addresses of the ring parts: the descriptor ring (`desc`), the driver area
    /// (`avail`) and the device area (`used`).
    pub fn layout(&self) -> RingLayout {
        let d = self.desc as u64;
        RingLayout {
            size: self.size,
            desc_va: d,
            avail_va: d + self.driver_off as u64,
            used_va: d + self.device_off as u64,
            desc_iova: self.desc_iova,
            avail_iova: self.desc_iova + self.driver_off as u64,
            used_iova: self.desc_iova + self.device_off as u64,
            packed: true,
        }
    }

    /// The notifier of this queue.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Replace the notifier.
    pub fn set_notifier(&mut self, notifier: Notifier) {
        self.notifier = notifier;
    }

    /// The owner's label (0 at creation).
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Set the owner's label.
    pub fn set_tag(&mut self, tag: u64) {
        self.tag = tag;
    }

    /// The last 8 bytes of ring entry `pos`: length, buffer id, flags.
    #[inline]
    fn tail(&self, pos: u16) -> &AtomicU64 {
        debug_assert!(pos < self.size);
        // SAFETY: `pos < size` (every caller passes a position kept below the size):
        // bytes 8..16 of entry `pos` lie in the ring, 8-byte aligned (the ring is
        // page-aligned, entries are 16 bytes); the device writes them concurrently,
        // hence an atomic.
        unsafe { &*(self.desc.add(pos as usize * DESC_SIZE + 8) as *const AtomicU64) }
    }

    /// Write the address of ring entry `pos` (the device does not look at it before the
    /// entry's flags make it available).
    #[inline]
    fn put_addr(&self, pos: u16, addr: u64) {
        debug_assert!(pos < self.size);
        // SAFETY: `pos < size`: the first 8 bytes of the entry lie in the ring, aligned;
        // the entry is free (the device used it or never saw it), so the device does
        // not read it until its flags are stored after this.
        unsafe {
            (self.desc.add(pos as usize * DESC_SIZE) as *mut u64).write_volatile(addr.to_le())
        }
    }

    /// The last 8 bytes of a descriptor: length, id, flags.
    #[inline]
    fn tail_word(len: u32, id: u16, flags: u16) -> u64 {
        (u64::from(len) | (u64::from(id) << 32) | (u64::from(flags) << 48)).to_le()
    }

    /// Write ring entry `pos` whole: address, then length, id and flags in one store,
    /// releasing: everything written before it is visible to a device that sees the
    /// flags.
    #[inline]
    fn put_desc(&self, pos: u16, addr: u64, len: u32, id: u16, flags: u16) {
        self.put_addr(pos, addr);
        self.tail(pos)
            .store(Self::tail_word(len, id, flags), Ordering::Release);
    }

    /// Write the first descriptor of a buffer at `pos`: as [`put_desc`](Self::put_desc),
    /// except for the first buffer since the last publish, whose length, id and flags
    /// wait for `publish` (the batch's one deferred store).
    #[inline]
    fn put_head(&mut self, pos: u16, addr: u64, len: u32, id: u16, flags: u16) {
        self.put_addr(pos, addr);
        let tail = Self::tail_word(len, id, flags);
        if self.unpublished == 0 && self.withheld.is_none() {
            self.withheld = Some((pos, tail));
        } else {
            self.tail(pos).store(tail, Ordering::Release);
        }
    }

    /// Make the batch available: store the withheld first descriptor's flags (after
    /// every other store of the batch: releasing).
    #[inline]
    fn release_withheld(&mut self) {
        self.released = self.added;
        if let Some((pos, tail)) = self.withheld.take() {
            self.tail(pos).store(tail, Ordering::Release);
        }
    }

    /// The driver area (the driver event suppression structure), one 4-byte word:
    /// offset and wrap in the low half, flags in the high half.
    #[inline]
    fn driver_event(&self) -> &AtomicU32 {
        // SAFETY: the driver area lies inside the ring buffer at a 64-byte aligned offset
        // (packed_ring_sizes); the device reads it concurrently, hence an atomic.
        unsafe { &*(self.desc.add(self.driver_off) as *const AtomicU32) }
    }

    /// The device area (the device event suppression structure), as above.
    #[inline]
    fn device_event(&self) -> &AtomicU32 {
        // SAFETY: as for `driver_event`: inside the ring buffer, aligned, written by the
        // device concurrently.
        unsafe { &*(self.desc.add(self.device_off) as *const AtomicU32) }
    }

    /// From now on every request goes in the ring under the buffer id its token names
    /// (tokens must be below the ring size: a request queue's slot numbers), through
    /// that id's own indirect table, whatever its length: one ring entry per request,
    /// so a ring of N entries carries N requests, and a slot reused for the same buffers
    /// finds its table already holding them (nothing is rewritten there). Needs
    /// indirect descriptors and an idle ring; returns whether the ring now works so.
    pub fn use_slot_heads(&mut self) -> bool {
        if self.slot_heads {
            return true;
        }
        if self.indirect.is_none() || self.indirect_max < 2 || self.in_flight != 0 {
            return false;
        }
        self.slot_heads = true;
        true
    }

    /// Whether requests go in the ring under the id their token names.
    pub fn slot_heads(&self) -> bool {
        self.slot_heads
    }

    /// The indirect table of buffer id `id`: its address and device address.
    #[inline]
    fn table(&self, id: u16) -> Option<(*mut u8, u64)> {
        let b = self.indirect.as_ref()?;
        let off = id as usize * self.indirect_max as usize * DESC_SIZE;
        // SAFETY: `id < size` (callers), and the indirect buffer holds size*indirect_max
        // descriptors.
        Some((unsafe { b.as_ptr().add(off) }, b.iova() + off as u64))
    }

    /// Fill the indirect table at `table` with `segs` (only `VIRTQ_DESC_F_WRITE` is a
    /// valid flag there, virtio 1.2 2.8.7); entries that already hold the same values are
    /// not written again. Returns the device-writable bytes.
    #[inline]
    fn fill_table(table: *mut u8, segs: &[Segment], n_out: usize) -> u32 {
        let mut writable: u32 = 0;
        for (i, s) in segs.iter().enumerate() {
            let mut flags = 0;
            if i >= n_out {
                flags = DESC_F_WRITE;
                writable = writable.saturating_add(s.len);
            }
            let d = u128::from(s.addr) | (u128::from(s.len) << 64) | (u128::from(flags) << 112);
            let mut cur = [0u8; DESC_SIZE];
            // SAFETY: the caller's table holds at least `segs.len()` descriptors, in
            // memory owned by this queue; the device only reads it, and any bytes are a
            // u128.
            unsafe {
                std::ptr::copy_nonoverlapping(table.add(i * DESC_SIZE), cur.as_mut_ptr(), DESC_SIZE)
            };
            if u128::from_le_bytes(cur) != d {
                let bytes = d.to_le_bytes();
                // SAFETY: as above; the device does not read the table until the ring
                // entry that points at it is made available, after this.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        table.add(i * DESC_SIZE),
                        DESC_SIZE,
                    )
                };
            }
        }
        writable
    }

    /// The ring entry after `pos`, and the wrap counter it is written with.
    #[inline]
    fn step(&self, pos: u16, wrap: bool) -> (u16, bool) {
        if pos + 1 == self.size {
            (0, !wrap)
        } else {
            (pos + 1, wrap)
        }
    }

    /// Record a buffer made available: `descs` ring entries from `next_avail` under `id`.
    #[inline]
    fn made_available(&mut self, id: u16, descs: u16, token: u64, writable: u32) {
        self.order[self.next_avail as usize] = id;
        self.bufs[id as usize] = BufferInfo {
            token,
            writable,
            descs,
        };
        let mut next = self.next_avail as u32 + descs as u32;
        if next >= self.size as u32 {
            next -= self.size as u32;
            self.avail_wrap = !self.avail_wrap;
        }
        self.next_avail = next as u16;
        self.num_free -= descs;
        self.in_flight += 1;
        self.added = self.added.wrapping_add(1);
        self.unpublished = self.unpublished.saturating_add(descs);
    }

    /// [`add`](Self::add) when the ring uses slot heads.
    fn add_at_slot_head(
        &mut self,
        segs: &[Segment],
        n_out: usize,
        token: u64,
    ) -> std::result::Result<(), QueueFull> {
        if token >= self.size as u64
            || segs.len() > self.indirect_max as usize
            || self.bufs[token as usize].descs != 0
        {
            self.slot_refused(token, segs.len());
            return Err(QueueFull);
        }
        if self.num_free == 0 {
            // Cannot happen while every request takes one entry and ids are below the
            // size; kept for a caller that breaks that.
            self.overflowed = true;
            return Err(QueueFull);
        }
        let id = token as u16;
        let Some((table, table_iova)) = self.table(id) else {
            return Err(QueueFull);
        };
        let writable = Self::fill_table(table, segs, n_out);
        let pos = self.next_avail;
        self.put_head(
            pos,
            table_iova,
            (segs.len() * DESC_SIZE) as u32,
            id,
            DESC_F_INDIRECT | avail_bits(self.avail_wrap),
        );
        self.made_available(id, 1, token, writable);
        Ok(())
    }

    /// Log (once) a request refused in slot-heads mode; out of line, off the I/O path.
    #[cold]
    #[inline(never)]
    fn slot_refused(&mut self, token: u64, segments: usize) {
        if !self.slot_refusal_logged {
            self.slot_refusal_logged = true;
            tracing::error!(
                queue = self.index,
                token,
                segments,
                "request refused: its slot is beyond the ring, still on the device, or its chain is longer than an indirect table (a driver bug)"
            );
        }
    }

    /// Queue a request: `segs[..n_out]` are read by the device, the rest written by it.
    /// Nothing is visible to the device until [`publish`](Self::publish), as on a split
    /// ring: the first buffer added since the last publish keeps its first descriptor's
    /// flags back (the device reads the ring in order, so it stops there), and publish
    /// stores them, making the batch available at once. A device that polls the ring
    /// then takes a batch in one pass instead of chasing each descriptor as it is
    /// written (every line of four descriptors moving back and forth between the two
    /// caches up to four times).
    pub fn add(
        &mut self,
        segs: &[Segment],
        n_out: usize,
        token: u64,
    ) -> std::result::Result<(), QueueFull> {
        debug_assert!(!segs.is_empty() && n_out <= segs.len());
        if segs.is_empty() {
            return Err(QueueFull);
        }
        if self.slot_heads {
            return self.add_at_slot_head(segs, n_out, token);
        }
        // As in the split ring: short chains directly in the ring while it has room,
        // long ones (or a crowded ring) through one indirect descriptor.
        let can_indirect = segs.len() > 1 && segs.len() <= self.indirect_max as usize;
        let fits_direct = segs.len() <= self.num_free as usize;
        let use_indirect = can_indirect && (segs.len() > DIRECT_CHAIN_MAX || !fits_direct);
        let need = if use_indirect { 1 } else { segs.len() };
        if need > self.num_free as usize {
            self.overflowed = true;
            return Err(QueueFull);
        }
        // Each buffer in flight holds at least one ring entry, so an entry free means
        // an id free.
        let Some(id) = self.free_ids.pop() else {
            self.overflowed = true;
            return Err(QueueFull);
        };
        let first = self.next_avail;
        let first_bits = avail_bits(self.avail_wrap);
        if use_indirect {
            let Some((table, table_iova)) = self.table(id) else {
                self.free_ids.push(id);
                return Err(QueueFull);
            };
            let writable = Self::fill_table(table, segs, n_out);
            self.put_head(
                first,
                table_iova,
                (segs.len() * DESC_SIZE) as u32,
                id,
                DESC_F_INDIRECT | first_bits,
            );
            self.made_available(id, 1, token, writable);
            return Ok(());
        }
        let mut writable: u32 = 0;
        for s in &segs[n_out..] {
            writable = writable.saturating_add(s.len);
        }
        let last = segs.len() - 1;
        let flags_of = |i: usize| {
            let mut f = if i >= n_out { DESC_F_WRITE } else { 0 };
            if i < last {
                f |= DESC_F_NEXT;
            }
            f
        };
        // The rest of the chain first, each entry with the flags of its own lap (the
        // chain may wrap); the buffer id goes in every descriptor (the spec asks for
        // it in the last one).
        let (mut pos, mut wrap) = self.step(first, self.avail_wrap);
        for (i, s) in segs.iter().enumerate().skip(1) {
            self.put_desc(pos, s.addr, s.len, id, flags_of(i) | avail_bits(wrap));
            (pos, wrap) = self.step(pos, wrap);
        }
        // Then the first, whose flags make the whole chain available.
        self.put_head(
            first,
            segs[0].addr,
            segs[0].len,
            id,
            flags_of(0) | first_bits,
        );
        self.made_available(id, segs.len() as u16, token, writable);
        Ok(())
    }

    /// Make the requests added since the last call available (one store: the withheld
    /// flags of the batch's first buffer) and notify the device if it asks for it. One
    /// call per batch. Returns whether a notification was sent.
    pub fn publish(&mut self) -> Result<bool> {
        let added = self.unpublished;
        if added == 0 {
            return Ok(false);
        }
        self.unpublished = 0;
        self.release_withheld();
        // The flags stores before the load of the device's suppression state (virtio
        // 1.2 2.8.21.3.1: a store-load barrier).
        full_barrier();
        let ev = u32::from_le(self.device_event().load(Ordering::Relaxed));
        let (off_wrap, flags) = (ev as u16, (ev >> 16) as u16 & 3);
        let kick = match flags {
            EVENT_FLAGS_DISABLE => false,
            EVENT_FLAGS_DESC if self.event_idx && added < self.size => {
                // Positions as 16-bit numbers whose differences are ring distances:
                // the event of the lap before the current one lies `size` back.
                let new = self.next_avail;
                let old = new.wrapping_sub(added);
                let mut event = off_wrap & 0x7fff;
                if (off_wrap >> 15 != 0) != self.avail_wrap {
                    event = event.wrapping_sub(self.size);
                }
                need_event(event, new, old)
            }
            // ENABLE; DESC without event index or past a whole ring; the reserved value:
            // a notification is always allowed.
            _ => true,
        };
        if kick {
            self.notifications += 1;
            self.notifier.notify(self.index)?;
        }
        Ok(kick)
    }

    /// Whether buffer `id` is one of the requests added since the last batch was made
    /// available (their first descriptors follow the withheld one in the ring). Off
    /// the I/O path: only when a poll finds requests added and not yet published.
    #[cold]
    #[inline(never)]
    fn unpublished_has(&self, id: u16) -> bool {
        let Some((mut pos, _)) = self.withheld else {
            return false;
        };
        for _ in 0..self.added.wrapping_sub(self.released) {
            let here = self.order[pos as usize];
            if here == id {
                return true;
            }
            let d = self.bufs[here as usize].descs.max(1) as u32;
            pos = ((pos as u32 + d) % self.size as u32) as u16;
        }
        false
    }

    /// Notify the device now, whatever its suppression state says (for a queue that
    /// stopped moving). Counted in [`renotifications`](Self::renotifications); the
    /// first one is logged.
    pub fn renotify(&mut self) -> Result<()> {
        if self.renotifications == 0 {
            tracing::info!(
                queue = self.index,
                in_flight = self.in_flight,
                "no completion for a while with requests on the device: notifying it again (a lost notification, or a slow device)"
            );
        }
        self.renotifications += 1;
        self.notifications += 1;
        // Whatever was added is made available first: a notification is about it.
        self.release_withheld();
        full_barrier();
        self.notifier.notify(self.index)
    }

    /// Requests added so far (mod 2^16).
    #[inline]
    pub fn avail_index(&self) -> u16 {
        self.added
    }

    /// Whether an `add` found no room since the last reap.
    #[inline]
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Whether the device has completions that `poll` would return.
    #[inline]
    pub fn has_used(&self) -> bool {
        if self.in_flight == 0 {
            return false;
        }
        let tail = u64::from_le(self.tail(self.next_used).load(Ordering::Acquire));
        is_used((tail >> 48) as u16, self.used_wrap)
    }

    /// The token of the request the device would complete next if it completes in
    /// submission order: the one whose first descriptor is at the next used position.
    /// `None` when nothing is in flight.
    #[inline]
    pub fn next_in_order(&self) -> Option<u64> {
        if self.in_flight == 0 {
            return None;
        }
        let id = self.order[self.next_used as usize];
        let info = &self.bufs[id as usize];
        (info.descs != 0).then_some(info.token)
    }

    /// Start loading the ring entry the device's next used descriptor goes in.
    #[inline]
    pub fn prefetch_next_used(&self) {
        // SAFETY: `next_used < size`: the entry lies inside the ring.
        prefetch(unsafe { self.desc.add(self.next_used as usize * DESC_SIZE) });
    }

    /// Reap completions, in the order the device wrote them. Each is validated: an id
    /// that is out of range or not in flight is a device error (the queue must then be
    /// abandoned). A length beyond the device-writable bytes is clamped and counted; a
    /// used descriptor without `VIRTQ_DESC_F_WRITE` has no length (0).
    pub fn poll(&mut self, mut on_used: impl FnMut(Used)) -> Result<usize> {
        let mut n = 0;
        while self.in_flight > 0 {
            let pos = self.next_used;
            // One load: length, id and flags as the device left them, ordered before
            // anything the completion leads the caller to read.
            let tail = u64::from_le(self.tail(pos).load(Ordering::Acquire));
            let flags = (tail >> 48) as u16;
            if !is_used(flags, self.used_wrap) {
                break;
            }
            let id = (tail >> 32) as u16;
            if id >= self.size || self.bufs[id as usize].descs == 0 {
                return Err(Error::Device(format!(
                    "queue {}: used buffer id {id} at ring entry {pos} is out of range or not in flight",
                    self.index
                )));
            }
            let info = self.bufs[id as usize];
            if self.added != self.released && self.unpublished_has(id) {
                return Err(Error::Device(format!(
                    "queue {}: used buffer id {id} at ring entry {pos} names a request not yet made available",
                    self.index
                )));
            }
            let mut len = if flags & DESC_F_WRITE != 0 {
                tail as u32
            } else {
                0
            };
            if len > info.writable {
                if self.len_overruns == 0 {
                    tracing::warn!(
                        queue = self.index,
                        "the device reported a used length of {len} for a request with {} device-writable bytes; lengths are clamped to the writable bytes",
                        info.writable
                    );
                }
                self.len_overruns += 1;
                len = info.writable;
            }
            self.bufs[id as usize].descs = 0;
            if !self.slot_heads {
                self.free_ids.push(id);
            }
            let mut next = pos as u32 + info.descs as u32;
            if next >= self.size as u32 {
                next -= self.size as u32;
                self.used_wrap = !self.used_wrap;
            }
            self.next_used = next as u16;
            self.num_free += info.descs;
            self.in_flight -= 1;
            n += 1;
            on_used(Used {
                token: info.token,
                len,
            });
        }
        if n > 0 {
            self.overflowed = false;
        }
        Ok(n)
    }

    /// Ask the device not to interrupt (the default: completions are polled).
    pub fn disable_interrupts(&mut self) {
        self.driver_event().store(
            (u32::from(EVENT_FLAGS_DISABLE) << 16).to_le(),
            Ordering::Relaxed,
        );
    }

    /// Ask the device to interrupt on the next completion (with event index: when it
    /// writes the next used position). Returns `true` when completions are already
    /// pending (do not sleep then).
    pub fn enable_interrupts(&mut self) -> bool {
        let word = if self.event_idx {
            let off_wrap = self.next_used | (u16::from(self.used_wrap) << 15);
            u32::from(off_wrap) | (u32::from(EVENT_FLAGS_DESC) << 16)
        } else {
            u32::from(EVENT_FLAGS_ENABLE) << 16
        };
        self.driver_event().store(word.to_le(), Ordering::Relaxed);
        full_barrier();
        self.has_used()
    }

    /// The eventfd the device signals completions on while interrupts are enabled.
    pub fn set_completion_signal(&mut self, signal: Option<Arc<vmm_sys_util::eventfd::EventFd>>) {
        self.signal = signal;
    }

    /// The completion eventfd, if the transport has one.
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.signal.as_ref().map(|e| e.as_raw_fd())
    }

    /// Consume a pending completion signal, if one is there.
    pub fn clear_completion_signal(&self) {
        if let Some(e) = &self.signal {
            // Never wait for a signal: the fd may be in blocking mode (the libblkio API
            // lets its caller switch it); read it only when one is there.
            use std::os::fd::AsRawFd;
            if crate::notify::is_readable(e.as_raw_fd()) {
                let _ = e.read();
            }
        }
    }

    /// The flags word of ring entry `pos` (tests).
    #[cfg(test)]
    fn flags_at(&self, pos: u16) -> u16 {
        // SAFETY: as for `tail`: bytes 14..16 of an entry inside the ring, aligned.
        let a = unsafe {
            &*(self.desc.add(pos as usize * DESC_SIZE + 14) as *const std::sync::atomic::AtomicU16)
        };
        u16::from_le(a.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests;
