//! Driver side of the virtqueues: split rings (virtio 1.2 section 2.7, [`SplitQueue`]) and
//! packed rings (section 2.8, [`PackedQueue`]), behind one type, [`Virtqueue`], that the
//! request queues and drivers hold.
//!
//! Both keep the driver's own records of what is in flight (tokens, chain lengths,
//! device-writable bytes) and trust nothing the device writes except its completions,
//! each of which is validated: a completion that names a request not in flight is a
//! device error, a length beyond the device-writable bytes is clamped.

use std::sync::Arc;

use crate::error::Result;
use crate::memory::DmaMemory;
use crate::notify::Notifier;

mod packed;
mod split;

pub use packed::{PackedQueue, MAX_PACKED_QUEUE_SIZE};
pub use split::{peek_used_index, SplitQueue, MAX_QUEUE_SIZE};

/// Descriptor flag: the buffer continues in the next descriptor.
pub(crate) const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub(crate) const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub(crate) const DESC_F_INDIRECT: u16 = 4;
/// Bytes of one descriptor, split or packed.
pub(crate) const DESC_SIZE: usize = 16;
/// Chains up to this long go directly in the ring when it has room (without slot heads).
pub(crate) const DIRECT_CHAIN_MAX: usize = 4;

/// One buffer segment of a request: device address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Device address (IOVA) of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Addresses of the three parts of a ring, for the transport to hand to the device. The
/// names are the split ring's; a packed ring puts its descriptor ring in `desc`, its
/// driver event suppression structure (the driver area) in `avail` and its device event
/// suppression structure (the device area) in `used`, as the transports' registers and
/// messages name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size (number of descriptors).
    pub size: u16,
    /// Virtual address of the descriptor table.
    pub desc_va: u64,
    /// Virtual address of the available ring.
    pub avail_va: u64,
    /// Virtual address of the used ring.
    pub used_va: u64,
    /// Device address of the descriptor table.
    pub desc_iova: u64,
    /// Device address of the available ring.
    pub avail_iova: u64,
    /// Device address of the used ring.
    pub used_iova: u64,
    /// A packed ring (`VIRTIO_F_RING_PACKED`): the parts are the descriptor ring, the
    /// driver area and the device area.
    pub packed: bool,
}

/// Options of a queue that come from feature negotiation.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueOptions {
    /// `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub event_idx: bool,
    /// `VIRTIO_RING_F_INDIRECT_DESC` was negotiated: chains of more than one
    /// descriptor and at most this many segments go in an indirect table (0: off).
    pub indirect_max: u16,
    /// `VIRTIO_F_RING_PACKED` was negotiated: the queue is a packed ring.
    pub packed: bool,
}

/// Returned by [`Virtqueue::add`] when the ring has no room; nothing was consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// One validated completion from the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// The token given to [`Virtqueue::add`].
    pub token: u64,
    /// Bytes the device says it wrote (at most the device-writable length).
    pub len: u32,
}

/// One virtqueue, split or packed (chosen by [`QueueOptions::packed`]). Owned by one
/// thread (`Send`, not `Sync`). Every method does what the method of the same name of
/// [`SplitQueue`] and [`PackedQueue`] does; a match on the kind is all this adds (one
/// predictable branch per call).
#[derive(Debug)]
pub enum Virtqueue {
    /// A split ring.
    Split(SplitQueue),
    /// A packed ring.
    Packed(PackedQueue),
}

/// `$q` bound to the ring inside `$self`, whatever its kind, in `$body`.
macro_rules! each {
    ($self:expr, $q:ident => $body:expr) => {
        match $self {
            Virtqueue::Split($q) => $body,
            Virtqueue::Packed($q) => $body,
        }
    };
}

impl Virtqueue {
    /// Allocate a queue of `size` descriptors in `mem`: packed when `opts.packed` (any
    /// size from 1 to 32768), else split (a power of two up to 32768).
    pub fn new(
        mem: &Arc<DmaMemory>,
        index: u16,
        size: u16,
        opts: QueueOptions,
        notifier: Notifier,
    ) -> Result<Virtqueue> {
        Ok(if opts.packed {
            Virtqueue::Packed(PackedQueue::new(mem, index, size, opts, notifier)?)
        } else {
            Virtqueue::Split(SplitQueue::new(mem, index, size, opts, notifier)?)
        })
    }

    /// Whether this is a packed ring.
    pub fn is_packed(&self) -> bool {
        matches!(self, Virtqueue::Packed(_))
    }

    /// Queue index within the device.
    pub fn index(&self) -> u16 {
        each!(self, q => q.index())
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        each!(self, q => q.size())
    }

    /// Requests submitted and not yet completed.
    #[inline]
    pub fn in_flight(&self) -> u16 {
        each!(self, q => q.in_flight())
    }

    /// Free descriptors (ring entries).
    pub fn num_free(&self) -> u16 {
        each!(self, q => q.num_free())
    }

    /// Completions whose used length exceeded the request's device-writable bytes.
    pub fn len_overruns(&self) -> u64 {
        each!(self, q => q.len_overruns())
    }

    /// Notifications (kicks) sent so far.
    pub fn notifications(&self) -> u64 {
        each!(self, q => q.notifications())
    }

    /// Notifications sent because the queue stopped moving.
    pub fn renotifications(&self) -> u64 {
        each!(self, q => q.renotifications())
    }

    /// Largest number of segments one request may have.
    pub fn max_segments(&self) -> usize {
        each!(self, q => q.max_segments())
    }

    /// Addresses of the ring parts.
    pub fn layout(&self) -> RingLayout {
        each!(self, q => q.layout())
    }

    /// The notifier of this queue.
    pub fn notifier(&self) -> &Notifier {
        each!(self, q => q.notifier())
    }

    /// Give up the ring for good while a device may still use its memory: the memory
    /// (ring, tables) is leaked, its notifier and completion signal (eventfds of a
    /// connection that is gone) are closed.
    pub fn leak(mut self) {
        self.set_notifier(Notifier::Counter(Arc::default()));
        self.set_completion_signal(None);
        std::mem::forget(self);
    }

    /// Replace the notifier (the transport hands it out after it learned the layout).
    pub fn set_notifier(&mut self, notifier: Notifier) {
        each!(self, q => q.set_notifier(notifier))
    }

    /// The owner's label (0 at creation).
    pub fn tag(&self) -> u64 {
        each!(self, q => q.tag())
    }

    /// Set the owner's label.
    pub fn set_tag(&mut self, tag: u64) {
        each!(self, q => q.set_tag(tag))
    }

    /// From now on each request goes on the ring under its token (a slot number below
    /// the ring size), through that token's own indirect table: one ring entry per
    /// request. Needs indirect descriptors and an idle ring; returns whether the ring
    /// now works so. See [`SplitQueue::use_slot_heads`].
    pub fn use_slot_heads(&mut self) -> bool {
        each!(self, q => q.use_slot_heads())
    }

    /// Whether requests go on the ring under their token's own indirect table.
    pub fn slot_heads(&self) -> bool {
        each!(self, q => q.slot_heads())
    }

    /// Queue a request: `segs[..n_out]` are read by the device, the rest written by it.
    /// Nothing is visible to the device until [`publish`](Self::publish).
    #[inline(always)]
    pub fn add(
        &mut self,
        segs: &[Segment],
        n_out: usize,
        token: u64,
    ) -> std::result::Result<(), QueueFull> {
        each!(self, q => q.add(segs, n_out, token))
    }

    /// Make queued requests visible and notify the device if it asked for it. One call
    /// per batch. Returns whether a notification was sent.
    #[inline]
    pub fn publish(&mut self) -> Result<bool> {
        each!(self, q => q.publish())
    }

    /// Notify the device now, whatever its suppression state says.
    pub fn renotify(&mut self) -> Result<()> {
        each!(self, q => q.renotify())
    }

    /// Requests added so far (mod 2^16).
    #[inline]
    pub fn avail_index(&self) -> u16 {
        each!(self, q => q.avail_index())
    }

    /// Whether an `add` found no room since the last reap.
    #[inline]
    pub fn overflowed(&self) -> bool {
        each!(self, q => q.overflowed())
    }

    /// Whether the device has completions that `poll` would return.
    #[inline]
    pub fn has_used(&self) -> bool {
        each!(self, q => q.has_used())
    }

    /// The token of the request the device would complete next if it completes in
    /// submission order; `None` when nothing is in flight.
    #[inline]
    pub fn next_in_order(&self) -> Option<u64> {
        each!(self, q => q.next_in_order())
    }

    /// Start loading the ring entry the device's next completion goes in (a hint).
    #[inline]
    pub fn prefetch_next_used(&self) {
        each!(self, q => q.prefetch_next_used())
    }

    /// Reap completions, each validated; an error means the device broke the protocol
    /// and the queue must be abandoned.
    #[inline]
    pub fn poll(&mut self, on_used: impl FnMut(Used)) -> Result<usize> {
        each!(self, q => q.poll(on_used))
    }

    /// Ask the device not to interrupt (the default: completions are polled).
    pub fn disable_interrupts(&mut self) {
        each!(self, q => q.disable_interrupts())
    }

    /// Ask the device to interrupt on the next completion. Returns `true` when
    /// completions are already pending (do not sleep then).
    pub fn enable_interrupts(&mut self) -> bool {
        each!(self, q => q.enable_interrupts())
    }

    /// The eventfd the device signals completions on while interrupts are enabled.
    pub fn set_completion_signal(&mut self, signal: Option<Arc<vmm_sys_util::eventfd::EventFd>>) {
        each!(self, q => q.set_completion_signal(signal))
    }

    /// The completion eventfd, if the transport has one.
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        each!(self, q => q.completion_fd())
    }

    /// Consume a pending completion signal (non-blocking).
    pub fn clear_completion_signal(&self) {
        each!(self, q => q.clear_completion_signal())
    }
}

impl From<SplitQueue> for Virtqueue {
    fn from(q: SplitQueue) -> Virtqueue {
        Virtqueue::Split(q)
    }
}

impl From<PackedQueue> for Virtqueue {
    fn from(q: PackedQueue) -> Virtqueue {
        Virtqueue::Packed(q)
    }
}

/// A store-load barrier against the device: stores before it are visible to the
/// device before loads after it read. On x86_64 an `mfence`, explicitly: Rust's
/// `fence(SeqCst)` compiles to a locked `or` on the stack there, and so would an
/// `xchg` store (Linux's `virt_store_mb`) be a locked instruction; QEMU's TCG
/// translates a guest's locked instructions into plain loads and stores when the VM
/// has one vCPU (atomics only for `maxcpus` > 1), so inside such a guest a load of the
/// device's event index could pass the store of the avail index while QEMU's device
/// thread runs in parallel: both sides see stale values and the notification is lost
/// for good (seen as intermittent stalls of every queue in the guest tests). TCG
/// always keeps an `mfence` (in its words: "even with a single cpu we have i/o
/// threads running in parallel"). One instruction per published batch.
#[inline]
pub(crate) fn full_barrier() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 (MFENCE) is part of the x86_64 baseline; a fence has no operands.
    unsafe {
        std::arch::x86_64::_mm_mfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Start loading the cache line at `p` (a hint: no architectural effect, never faults,
/// whatever the address).
#[inline]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of the x86_64 baseline, and a prefetch neither faults nor
    // changes memory, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Start taking the cache line at `p` for writing (PREFETCHW: the line arrives
/// owned, so later stores and loads to it hit). A hint: no architectural effect, never
/// faults, whatever the address; a CPU without PRFCHW runs it as a NOP.
#[inline]
pub(crate) fn prefetch_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW (0F 0D /1) only hints the cache; it neither faults nor changes
    // memory or flags, and x86-64 CPUs without PRFCHW decode it as a NOP.
    unsafe {
        std::arch::asm!("prefetchw byte ptr [{0}]", in(reg) p, options(nostack, preserves_flags, readonly))
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
