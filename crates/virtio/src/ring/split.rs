//! Driver side of a split virtqueue (virtio 1.2 section 2.7).
//!
//! The ring memory lives in [`DmaMemory`]; the driver keeps its own shadow of everything
//! it needs (free list, chain lengths, tokens), so nothing the device writes into shared
//! memory is trusted except the used ring, and every used entry is validated.
//!
//! Ordering: descriptors and avail entries are written first, then the avail index is
//! stored with `Release`; the notification decision reads the device's event index or
//! flags after a full barrier (`full_barrier`: `MFENCE` on x86_64); the used index is
//! loaded with `Acquire` before entries are read.

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use super::{
    full_barrier, prefetch, QueueFull, QueueOptions, RingLayout, Segment, Used, DESC_F_INDIRECT,
    DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE, DIRECT_CHAIN_MAX,
};
use crate::error::{Error, Result};
use crate::memory::{DmaBuf, DmaMemory};
use crate::notify::Notifier;

const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
/// Largest queue size the spec allows for split rings.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Layout sizes per the spec (legacy-compatible: used ring 4 KiB aligned).
fn ring_sizes(size: usize) -> (usize, usize, usize) {
    let desc = DESC_SIZE * size;
    let avail = 6 + 2 * size;
    let used_off = (desc + avail).div_ceil(4096) * 4096;
    let used = 6 + 8 * size;
    (desc, used_off, used_off + used)
}

/// The driver's record of one in-flight chain head.
#[derive(Debug, Clone, Copy, Default)]
struct HeadInfo {
    /// The token given to `add`.
    token: u64,
    /// Device-writable bytes, to validate used lengths.
    writable: u32,
    /// Descriptors used in the ring (0: not in flight).
    chain_len: u16,
}

/// Driver side of one split virtqueue. Owned by one thread (`Send`, not `Sync`).
pub struct SplitQueue {
    index: u16,
    size: u16,
    _ring: DmaBuf,
    desc: *mut u8,
    /// Device address of the descriptor table (the start of the ring buffer).
    desc_iova: u64,
    avail: *mut u8,
    used: *const u8,
    indirect: Option<DmaBuf>,
    indirect_max: u16,
    event_idx: bool,
    /// Shadow free list: `next[i]` is the descriptor after `i` in the free chain.
    next: Box<[u16]>,
    free_head: u16,
    num_free: u16,
    /// An `add` found no room since the last reap.
    overflowed: bool,
    /// Each request goes on the ring at the head its token names, through that head's
    /// own indirect table (see [`SplitQueue::use_slot_heads`]); the free list is unused.
    slot_heads: bool,
    /// A request was refused in slot-heads mode (logged once).
    slot_refusal_logged: bool,
    /// The last descriptor of the chain the reaps since the last `add` freed last:
    /// where the next freed chain goes (completion order across reaps).
    reap_tail: Option<u16>,
    /// What the driver knows of each in-flight head (one record: one cache line touched
    /// per request).
    heads: Box<[HeadInfo]>,
    /// The head put at each avail position (the driver's copy of the avail ring).
    order: Box<[u16]>,
    /// What the driver last wrote into each descriptor of the table.
    desc_shadow: Box<[u128]>,
    avail_idx: u16,
    /// Avail index at the last notification decision.
    kicked_idx: u16,
    last_used: u16,
    in_flight: u16,
    notifier: Notifier,
    notifications: u64,
    renotifications: u64,
    len_overruns: u64,
    /// Signalled by the device on a completion while interrupts are enabled (the
    /// vhost-user call eventfd); `None` when the transport has none (polled PCI).
    signal: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
    /// The owner's label (the bdev layer: the connection generation the ring belongs to).
    tag: u64,
}

// SAFETY: the raw pointers point into `_ring`/`indirect`, DMA memory owned by this queue;
// moving the queue to another thread moves that ownership along. It is not Sync.
unsafe impl Send for SplitQueue {}

impl std::fmt::Debug for SplitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitQueue")
            .field("index", &self.index)
            .field("size", &self.size)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl SplitQueue {
    /// Allocate a queue of `size` descriptors (a power of two) in `mem`.
    pub fn new(
        mem: &Arc<DmaMemory>,
        index: u16,
        size: u16,
        opts: QueueOptions,
        notifier: Notifier,
    ) -> Result<SplitQueue> {
        debug_assert!(!opts.packed, "a split ring with packed options");
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(Error::InvalidQueue(format!(
                "queue size {size} must be a power of two between 1 and {MAX_QUEUE_SIZE}"
            )));
        }
        let n = size as usize;
        let (_, used_off, total) = ring_sizes(n);
        let mut ring = mem.alloc(total, 4096)?;
        ring.as_mut_slice().fill(0);
        let base = ring.as_ptr();
        let desc_iova = ring.iova();
        let indirect = if opts.indirect_max > 1 {
            let len = n * opts.indirect_max as usize * DESC_SIZE;
            let mut t = mem.alloc(len, 4096)?;
            t.as_mut_slice().fill(0);
            Some(t)
        } else {
            None
        };
        let next: Box<[u16]> = (0..size).map(|i| i.wrapping_add(1)).collect();
        // SAFETY: offsets are within the `total` bytes of `ring` (see ring_sizes).
        let (avail, used) = unsafe { (base.add(DESC_SIZE * n), base.add(used_off)) };
        let mut q = SplitQueue {
            index,
            size,
            _ring: ring,
            desc: base,
            desc_iova,
            avail,
            used,
            indirect_max: if indirect.is_some() {
                opts.indirect_max
            } else {
                0
            },
            indirect,
            event_idx: opts.event_idx,
            next,
            free_head: 0,
            overflowed: false,
            slot_heads: false,
            slot_refusal_logged: false,
            reap_tail: None,
            num_free: size,
            heads: vec![HeadInfo::default(); n].into_boxed_slice(),
            order: vec![0; n].into_boxed_slice(),
            // The table starts zeroed, as does this copy.
            desc_shadow: vec![0; n].into_boxed_slice(),
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            in_flight: 0,
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

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Free descriptors.
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

    /// Largest number of segments one request may have.
    pub fn max_segments(&self) -> usize {
        if self.indirect_max > 1 {
            self.indirect_max as usize
        } else {
            self.size as usize
        }
    }

    /// Addresses of the ring parts.
    pub fn layout(&self) -> RingLayout {
        let d = self.desc as u64;
        let a = self.avail as u64;
        let u = self.used as u64;
        // The ring is one device-contiguous buffer: its parts keep their offsets.
        RingLayout {
            size: self.size,
            desc_va: d,
            avail_va: a,
            used_va: u,
            desc_iova: self.desc_iova,
            avail_iova: self.desc_iova + (a - d),
            used_iova: self.desc_iova + (u - d),
            packed: false,
        }
    }

    /// The notifier of this queue.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The owner's label (0 at creation).
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Set the owner's label.
    pub fn set_tag(&mut self, tag: u64) {
        self.tag = tag;
    }

    /// Replace the notifier (the transport hands it out after it learned the layout).
    pub fn set_notifier(&mut self, notifier: Notifier) {
        self.notifier = notifier;
    }

    #[inline]
    fn avail_u16(&self, i: usize) -> &AtomicU16 {
        // SAFETY: `i` indexes flags(0), idx(1), ring (2..2+size) or used_event(2+size), all
        // inside the avail area, 2-byte aligned; AtomicU16 has u16's layout.
        unsafe { &*(self.avail.add(2 * i) as *const AtomicU16) }
    }

    #[inline]
    fn used_u16(&self, byte_off: usize) -> &AtomicU16 {
        // SAFETY: callers pass offsets of flags(0), idx(2) or avail_event(4+8*size), inside
        // the used area and 2-byte aligned.
        unsafe { &*(self.used.add(byte_off) as *const AtomicU16) }
    }

    #[inline]
    fn encode_desc(addr: u64, len: u32, flags: u16, next: u16) -> u128 {
        u128::from(addr)
            | (u128::from(len) << 64)
            | (u128::from(flags) << 96)
            | (u128::from(next) << 112)
    }

    #[inline]
    fn read_desc(table: *const u8, i: usize) -> u128 {
        let mut bytes = [0u8; DESC_SIZE];
        // SAFETY: callers pass a table of at least `i+1` descriptors in memory owned by
        // this queue; the device only reads descriptors, and any bytes are a u128.
        unsafe {
            std::ptr::copy_nonoverlapping(table.add(i * DESC_SIZE), bytes.as_mut_ptr(), DESC_SIZE)
        };
        u128::from_le_bytes(bytes)
    }

    #[inline]
    fn write_desc(table: *mut u8, i: usize, desc: u128) {
        let bytes = desc.to_le_bytes();
        // SAFETY: callers pass a table of at least `i+1` descriptors in memory owned by
        // this queue; the device does not act on it until the avail index is published.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), table.add(i * DESC_SIZE), DESC_SIZE)
        }
    }

    /// Write descriptor `i` of the ring's table unless the driver last wrote exactly
    /// these values there.
    ///
    /// A head reused for the same kind of request (the same buffer, the same chain)
    /// gets the same descriptors; leaving their line alone keeps it in the device's
    /// cache (a store would take it away, and the device would miss on it for the
    /// request). The comparison is with the driver's own copy of the ring's table (a
    /// line the device read stays readable in the driver's cache too, but the copy
    /// costs nothing to keep). Indirect tables, one per head with slot heads, are
    /// compared in place (`add_at_slot_head`). The descriptor table
    /// is the driver's (virtio 1.2 2.7.5): a device that writes into it only confuses
    /// itself; completions are checked against the driver's records, never the table.
    #[inline]
    fn put_desc(&mut self, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Self::encode_desc(addr, len, flags, next);
        if self.desc_shadow[i] != d {
            self.desc_shadow[i] = d;
            Self::write_desc(self.desc, i, d);
        }
    }

    /// From now on every request is put on the ring at the head its token names (tokens
    /// must be below the ring size: a request queue's slot numbers), through that
    /// head's own indirect table, whatever its length: one ring entry per request, so a
    /// ring of N entries carries N requests, and a slot reused for the same buffers
    /// finds its ring entry and its table already holding them (nothing is rewritten,
    /// and the device's cached copies stay valid). Needs indirect descriptors and an
    /// idle ring; returns whether the ring now works so (already did: true).
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

    /// Whether requests go on the ring at the head their token names.
    pub fn slot_heads(&self) -> bool {
        self.slot_heads
    }

    /// [`add`](Self::add) when the ring uses slot heads.
    fn add_at_slot_head(
        &mut self,
        segs: &[Segment],
        n_out: usize,
        token: u64,
    ) -> std::result::Result<(), QueueFull> {
        let head = token as usize;
        if token >= self.size as u64
            || segs.len() > self.indirect_max as usize
            || self.heads[head].chain_len != 0
        {
            // A token beyond the ring, a chain longer than a table, or a head still on
            // the device: the caller broke the contract (request queues pass free slot
            // numbers, and split to max_segments). Refuse without side effects, and say
            // so: a caller would take the refusal for a full ring and wait.
            self.slot_refused(token, segs.len());
            return Err(QueueFull);
        }
        let table_bytes = self.indirect_max as usize * DESC_SIZE;
        let Some((ind, ind_iova)) = self.indirect.as_ref().map(|b| (b.as_ptr(), b.iova())) else {
            return Err(QueueFull);
        };
        // SAFETY: head < size, and the indirect buffer holds size*indirect_max descriptors.
        let table = unsafe { ind.add(head * table_bytes) };
        let table_iova = ind_iova + (head * table_bytes) as u64;
        let last = segs.len() - 1;
        let mut writable: u32 = 0;
        for (i, s) in segs.iter().enumerate() {
            let mut flags = 0;
            if i >= n_out {
                flags |= DESC_F_WRITE;
                writable = writable.saturating_add(s.len);
            }
            if i < last {
                flags |= DESC_F_NEXT;
            }
            let d = Self::encode_desc(s.addr, s.len, flags, (i + 1) as u16);
            // A table the head last carried for the same request is left alone, so its
            // line stays shared with the device instead of moving back and forth.
            if Self::read_desc(table, i) != d {
                Self::write_desc(table, i, d);
            }
        }
        self.put_desc(
            head,
            table_iova,
            (segs.len() * DESC_SIZE) as u32,
            DESC_F_INDIRECT,
            0,
        );
        self.num_free -= 1;
        self.heads[head] = HeadInfo {
            token,
            writable,
            chain_len: 1,
        };
        self.put_avail(head as u16);
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

    /// The avail entry of a queued chain (visible at the next publish).
    #[inline]
    fn put_avail(&mut self, head: u16) {
        let pos = (self.avail_idx & (self.size - 1)) as usize;
        self.order[pos] = head;
        // Written unconditionally: unlike a descriptor, the entry shares its line with
        // neighbours the device reads for other requests, and reading it back first
        // costs a miss on the way to the publish (measured: slower on SPDK's target).
        self.avail_u16(2 + pos).store(head, Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
    }

    /// Queue a request: `segs[..n_out]` are read by the device, the rest written by it.
    /// Nothing is visible to the device until [`SplitQueue::publish`].
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
        // Short chains go in the ring directly while it has room: the device reads them
        // without the extra table (and, for vhost-user, the extra address translation)
        // an indirect descriptor costs. Long chains, or a crowded ring, use one
        // indirect descriptor when negotiated.
        let can_indirect = segs.len() > 1 && segs.len() <= self.indirect_max as usize;
        let fits_direct = segs.len() <= self.num_free as usize;
        let use_indirect = can_indirect && (segs.len() > DIRECT_CHAIN_MAX || !fits_direct);
        let need = if use_indirect { 1 } else { segs.len() };
        if need > self.num_free as usize {
            self.overflowed = true;
            return Err(QueueFull);
        }
        let head = self.free_head;
        self.reap_tail = None;
        let mut writable: u32 = 0;
        for s in &segs[n_out..] {
            writable = writable.saturating_add(s.len);
        }
        if use_indirect {
            let table_len = self.indirect_max as usize;
            let table_bytes = table_len * DESC_SIZE;
            let (ind, ind_iova) = self
                .indirect
                .as_ref()
                .map(|b| (b.as_ptr(), b.iova()))
                .unwrap_or((self.desc, self.desc_iova));
            // SAFETY: head < size, and the indirect buffer holds size*indirect_max descriptors.
            let table = unsafe { ind.add(head as usize * table_bytes) };
            let table_iova = ind_iova + (head as usize * table_bytes) as u64;
            let last = segs.len() - 1;
            for (i, s) in segs.iter().enumerate() {
                let mut flags = if i >= n_out { DESC_F_WRITE } else { 0 };
                if i < last {
                    flags |= DESC_F_NEXT;
                }
                Self::write_desc(
                    table,
                    i,
                    Self::encode_desc(s.addr, s.len, flags, (i + 1) as u16),
                );
            }
            self.put_desc(
                head as usize,
                table_iova,
                (segs.len() * DESC_SIZE) as u32,
                DESC_F_INDIRECT,
                0,
            );
            self.free_head = self.next[head as usize];
        } else {
            let mut idx = head;
            let last = segs.len() - 1;
            for (i, s) in segs.iter().enumerate() {
                let mut flags = if i >= n_out { DESC_F_WRITE } else { 0 };
                let nxt = self.next[idx as usize];
                if i < last {
                    flags |= DESC_F_NEXT;
                }
                self.put_desc(idx as usize, s.addr, s.len, flags, nxt);
                if i < last {
                    idx = nxt;
                }
            }
            self.free_head = self.next[idx as usize];
        }
        self.num_free -= need as u16;
        self.heads[head as usize] = HeadInfo {
            token,
            writable,
            chain_len: need as u16,
        };
        self.put_avail(head);
        Ok(())
    }

    /// Make queued requests visible and notify the device if it asked for it. One call
    /// per batch. Returns whether a notification was sent.
    pub fn publish(&mut self) -> Result<bool> {
        if self.avail_idx == self.kicked_idx {
            return Ok(false);
        }
        self.store_avail_idx_full_barrier();
        let old = self.kicked_idx;
        let new = self.avail_idx;
        self.kicked_idx = new;
        let kick = if self.event_idx {
            let event = self
                .used_u16(4 + 8 * self.size as usize)
                .load(Ordering::Relaxed);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.used_u16(0).load(Ordering::Relaxed) & USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.notifications += 1;
            self.notifier.notify(self.index)?;
        }
        Ok(kick)
    }

    /// Publish the avail index, ordered before the loads of the device's suppression
    /// state that follow (a store-load barrier, virtio 1.2 2.7.13).
    #[inline]
    fn store_avail_idx_full_barrier(&self) {
        self.avail_u16(1).store(self.avail_idx, Ordering::Release);
        full_barrier();
    }

    /// Notify the device of this queue now, whatever its suppression state says (for
    /// a queue that stopped moving: a notification may always be sent). Counted in
    /// [`renotifications`](Self::renotifications); the first one is logged.
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
        self.notifier.notify(self.index)
    }

    /// The driver's avail index: requests added so far (mod 2^16).
    #[inline]
    pub fn avail_index(&self) -> u16 {
        self.avail_idx
    }

    /// Notifications sent by [`renotify`](Self::renotify).
    pub fn renotifications(&self) -> u64 {
        self.renotifications
    }

    /// Whether an `add` found no room since the last reap: requests are waiting for
    /// the chains the next reap frees.
    #[inline]
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Whether the device has completions that `poll` would return.
    #[inline]
    pub fn has_used(&self) -> bool {
        self.used_u16(2).load(Ordering::Acquire) != self.last_used
    }

    /// The token of the request the device would complete next if it completes in
    /// submission order (most do): a hint for prefetching what its completion will
    /// read, from the driver's own records only. `None` when nothing is in flight.
    #[inline]
    pub fn next_in_order(&self) -> Option<u64> {
        let head = self.order[(self.last_used & (self.size - 1)) as usize];
        let info = &self.heads[head as usize];
        (info.chain_len != 0).then_some(info.token)
    }

    /// Start loading the used entry the device writes next (a hint; nothing is read).
    /// Polled while waiting, it fetches the entry as soon as the device has written it,
    /// alongside the used index that announces it, instead of after.
    #[inline]
    pub fn prefetch_next_used(&self) {
        let slot = (self.last_used & (self.size - 1)) as usize;
        // SAFETY: `slot < size`: the entry lies inside the used area.
        prefetch(unsafe { self.used.add(4 + 8 * slot) });
    }

    /// Reap completions. Each entry is validated: a head that is out of range or not in
    /// flight, or a used index that runs ahead of what was submitted, is a device error;
    /// the queue must then be abandoned. A length beyond the device-writable bytes is
    /// clamped to them and counted ([`len_overruns`](Self::len_overruns)).
    pub fn poll(&mut self, mut on_used: impl FnMut(Used)) -> Result<usize> {
        let used_idx = self.used_u16(2).load(Ordering::Acquire);
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(0);
        }
        // Only published requests are the device's to complete.
        let published = self.kicked_idx.wrapping_sub(self.last_used);
        if pending > published {
            return Err(Error::Device(format!(
                "queue {}: used index {} is {} ahead, but only {} requests were made available",
                self.index, used_idx, pending, published
            )));
        }
        let mut n = 0;
        // The chains freed since the last add go on the free list in completion
        // order, the first on top, unless requests are waiting for room (see
        // `free_chain`).
        let keep_order = !std::mem::take(&mut self.overflowed);
        if !keep_order {
            self.reap_tail = None;
        }
        while self.last_used != used_idx {
            let slot = (self.last_used & (self.size - 1)) as usize;
            // SAFETY: `slot < size`; used ring entries start at byte 4 of the used area
            // (4-byte aligned) and the area holds `size` entries of two u32s. Atomic
            // loads: the device may write the entry again (a lying one), and a racing
            // plain read would be undefined behaviour. The Acquire load of the index
            // above ordered these.
            let (id, len) = unsafe {
                let e = self.used.add(4 + 8 * slot) as *const AtomicU32;
                (
                    u32::from_le((*e).load(Ordering::Relaxed)),
                    u32::from_le((*e.add(1)).load(Ordering::Relaxed)),
                )
            };
            if id >= self.size as u32 || self.heads[id as usize].chain_len == 0 {
                return Err(Error::Device(format!(
                    "queue {}: used id {} is out of range or not in flight",
                    self.index, id
                )));
            }
            let info = self.heads[id as usize];
            if self.avail_idx != self.kicked_idx && self.unpublished_has(id as u16) {
                return Err(Error::Device(format!(
                    "queue {}: used id {} names a request not yet made available",
                    self.index, id
                )));
            }
            let mut len = len;
            if len > info.writable {
                // The length is the device's claim of what it wrote; no device can write
                // beyond the chain, and drivers must not rely on it beyond the writable
                // bytes. QEMU's virtio-scsi, for one, counts data-out bytes in it. Clamp
                // it (so no consumer reads past the buffers), count it, say so once.
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
            let last = self.free_chain(id as u16, self.reap_tail);
            if keep_order {
                self.reap_tail = Some(last);
            }
            self.last_used = self.last_used.wrapping_add(1);
            self.in_flight -= 1;
            n += 1;
            on_used(Used {
                token: info.token,
                len,
            });
        }
        if self.event_idx {
            self.park_used_event();
        }
        Ok(n)
    }

    /// Whether `head` was added since the last publish (its avail entry lies between the
    /// published index and the driver's). Off the I/O path: only when a poll finds
    /// requests added and not yet published.
    #[cold]
    #[inline(never)]
    fn unpublished_has(&self, head: u16) -> bool {
        let n = self.avail_idx.wrapping_sub(self.kicked_idx);
        (0..n).any(|k| {
            self.order[(self.kicked_idx.wrapping_add(k) & (self.size - 1)) as usize] == head
        })
    }

    /// Put the chain of `head` back on the free list: on top (`after` is `None`), or
    /// right after descriptor `after` (the last of the chain freed before it since the
    /// last `add`). Returns the chain's last descriptor.
    ///
    /// Why the order matters: a caller that resubmits in completion order (the perf
    /// tool, most applications) then gets, for its k-th resubmission, the head of the
    /// k-th completion since its last submission: the head its buffer had, so the
    /// chain's descriptors are unchanged and [`put_desc`](Self::put_desc) leaves their
    /// lines alone. Pushing each chain on top would reverse the batch and hand every
    /// buffer another head.
    /// When an `add` found the ring full since the last reap, requests that waited
    /// take the chains, in their own order: there is no pairing to keep, and `poll`
    /// pushes each chain on top (measured on SPDK's target: ~10% more IOPS in that
    /// regime than keeping the order, for reasons not pinned down).
    fn free_chain(&mut self, head: u16, after: Option<u16>) -> u16 {
        let count = self.heads[head as usize].chain_len;
        self.heads[head as usize].chain_len = 0;
        if self.slot_heads {
            // One entry, named by its token: no free list to keep.
            self.num_free += count;
            return head;
        }
        // Walk our own shadow list (the ring descriptors may have been altered).
        let mut last = head;
        for _ in 1..count {
            last = self.next[last as usize];
        }
        match after {
            None => {
                self.next[last as usize] = self.free_head;
                self.free_head = head;
            }
            Some(a) => {
                self.next[last as usize] = self.next[a as usize];
                self.next[a as usize] = head;
            }
        }
        self.num_free += count;
        last
    }

    /// Put the used event half the index space ahead of what we consumed: the device
    /// interrupts when its used index crosses it, which cannot happen while at most
    /// `size` (<= 32768) requests are in flight, even for a device that compares
    /// against an old "last signalled" index.
    #[inline]
    fn park_used_event(&self) {
        let slot = 2 + self.size as usize;
        self.avail_u16(slot)
            .store(self.last_used.wrapping_add(0x8000), Ordering::Relaxed);
    }

    /// Ask the device not to interrupt (the default: completions are polled).
    pub fn disable_interrupts(&mut self) {
        if self.event_idx {
            self.park_used_event();
        } else {
            self.avail_u16(0)
                .store(AVAIL_F_NO_INTERRUPT, Ordering::Relaxed);
        }
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

    /// Ask the device to interrupt on the next completion. Returns `true` when
    /// completions are already pending (do not sleep then).
    pub fn enable_interrupts(&mut self) -> bool {
        if self.event_idx {
            let slot = 2 + self.size as usize;
            self.avail_u16(slot)
                .store(self.last_used, Ordering::Relaxed);
        } else {
            self.avail_u16(0).store(0, Ordering::Relaxed);
        }
        full_barrier();
        self.has_used()
    }
}

#[cfg(test)]
mod tests;

/// The used ring index of the ring at `layout`, read from memory that need not be one's
/// own ring object (a reconnection re-registers rings other threads hold). `None` if
/// the used ring does not lie in `mem`.
pub fn peek_used_index(layout: &RingLayout, mem: &crate::memory::DmaMemory) -> Option<u16> {
    let at = layout.used_va.checked_add(2)?;
    if !at.is_multiple_of(2) || !mem.regions().iter().any(|r| r.contains(at, 2)) {
        return None;
    }
    // SAFETY: the two bytes lie in a region of `mem`, which stays mapped while `mem`
    // lives (regions are unmapped only when the memory is dropped); aligned for u16;
    // an atomic load, as the device writes it concurrently.
    let v = unsafe { (*(at as *const AtomicU16)).load(Ordering::Acquire) };
    Some(u16::from_le(v))
}
