//! A fake virtio device, in-process and synchronous, for unit tests of the layers above
//! (the virtio-blk and virtio-scsi drivers, I/O channels, reconnection). Built with
//! `cfg(test)` or the `test-utils` feature, like rust-vmm virtio-queue's `mock` module.
//!
//! - [`FakeDevice`] is the device side of the rings: it hands out [`Transport`]s
//!   ([`FakeDevice::connect`]), takes the chains the driver made available
//!   ([`FakeDevice::take_requests`]: descriptors resolved, indirect tables followed,
//!   every chain checked against the spec), and completes them
//!   ([`FakeDevice::complete`], or [`FakeDevice::push_used`] for a device that lies).
//!   Nothing runs by itself: the test calls the device between driver calls, or
//!   installs a hook that runs on every kick ([`FakeDevice::on_kick`]), which makes a
//!   driver that waits synchronously for its device (an attach that asks the serial
//!   number) work without a thread.
//! - [`FakeBlk`] is a virtio-blk RAM disk on a [`FakeDevice`].
//! - [`test_memory`] makes a small [`DmaMemory`].
//!
//! Addresses. The rings are reached through the virtual addresses of their
//! [`RingLayout`] (`*_va`); the addresses in descriptors are device addresses (IOVAs),
//! which the device translates through the regions of the connection's memory
//! ([`DmaMemory::regions`]: `iova` to `va`), so any [`Addressing`](crate::Addressing)
//! works. With [`test_memory`] (virtual addressing) IOVAs are the process's virtual
//! addresses. Every address is checked to lie inside the memory before it is touched:
//! a descriptor that points elsewhere is a driver bug and panics.
//!
//! Connections. Every [`FakeDevice::connect`] is a new connection (as a vhost-user
//! back-end sees a new socket); the one before is gone (its broken flag rises). A
//! transport of a connection that is gone fails its control calls, its doorbell rings
//! nothing, and requests it carried are never completed.

#![cfg(any(test, feature = "test-utils"))]

use std::collections::HashSet;
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::error::{Error, Result};
use crate::features::transport as tf;
use crate::memory::{DmaConfig, DmaMemory, DmaRegionInfo};
use crate::notify::{Kick, Notifier};
use crate::ring::RingLayout;
use crate::transport::{Reopen, Transport};

mod blk;
pub mod packed;
#[cfg(test)]
mod tests;

pub use blk::FakeBlk;
use packed::PackedDeviceRing;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const DESC_SIZE: u64 = 16;

/// A [`DmaMemory`] for tests: one region of `bytes` (rounded up to pages) of normal
/// pages, virtual addressing (device addresses are process virtual addresses), allowed
/// to grow to 16 times that.
pub fn test_memory(bytes: usize) -> Arc<DmaMemory> {
    let bytes = bytes.max(4096);
    DmaMemory::new(DmaConfig {
        initial_region_size: bytes,
        hugetlb: false,
        hugetlb_fallback: false,
        max_total_size: bytes.saturating_mul(16),
        addressing: crate::memory::Addressing::Virtual,
    })
    .expect("cannot create test DMA memory (memfd_create/mmap failed)")
}

/// What runs on a kick of the current connection (see [`FakeDevice::on_kick`]).
pub type KickHook = Arc<dyn Fn(&FakeDevice, u16) + Send + Sync>;

/// The device side of one queue on one connection.
struct QueueState {
    layout: RingLayout,
    /// Next avail position the device has not taken.
    last_avail: u16,
    /// The device's used index.
    used_idx: u16,
    /// Completion signals (interrupts) the device would have sent.
    signals: u64,
    /// Heads (packed: buffer ids) taken and not completed.
    outstanding: HashSet<u16>,
    /// The device side of a packed ring (`VIRTIO_F_RING_PACKED` negotiated).
    packed: Option<PackedDeviceRing>,
    /// A used entry of the test's choosing was pushed ([`FakeDevice::push_used`]): which
    /// heads the driver thinks the device holds is no longer known, so neither a head
    /// offered again nor one completed twice is taken for a bug.
    lied: bool,
    kicks: Arc<AtomicU64>,
}

/// One connection of a transport to the device.
struct Conn {
    id: u64,
    mem: Arc<DmaMemory>,
    broken: Arc<AtomicBool>,
    /// Neither disconnected nor aborted.
    alive: bool,
    /// The driver shut the device down: the queues are no longer served.
    stopped: bool,
    started: bool,
    driver_features: u64,
    queues: Vec<Option<QueueState>>,
}

struct Inner {
    features: u64,
    config: Vec<u8>,
    num_queues: u16,
    max_queue_size: u16,
    refuse: bool,
    connections: u64,
    /// Reconnection attempts through a transport's reopener, refused ones included.
    attempts: u64,
    /// `Transport::abort` calls, on any connection.
    aborts: u64,
    conn: Option<Conn>,
    kick_hook: Option<KickHook>,
}

impl Inner {
    /// The current connection if it is `id` and alive.
    fn live(&mut self, id: u64) -> Option<&mut Conn> {
        self.conn.as_mut().filter(|c| c.id == id && c.alive)
    }
}

/// The device side, shared by every transport connected to it (a reconnection is a new
/// transport to the same device). Cheap to clone: every clone is the same device.
#[derive(Clone)]
pub struct FakeDevice {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for FakeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.lock();
        f.debug_struct("FakeDevice")
            .field("features", &format_args!("{:#x}", i.features))
            .field("num_queues", &i.num_queues)
            .field("connections", &i.connections)
            .finish()
    }
}

/// One chain as the device sees it.
#[derive(Clone, Debug)]
pub struct FakeRequest {
    /// The chain's head descriptor (the id of its used entry).
    pub head: u16,
    /// Device-readable segments, in chain order: (device address, length).
    pub readable: Vec<(u64, u32)>,
    /// Device-writable segments, in chain order: (device address, length).
    pub writable: Vec<(u64, u32)>,
    queue: u16,
    conn: u64,
    mem: Arc<DmaMemory>,
}

impl FakeRequest {
    /// The queue the request came on.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> usize {
        self.readable.iter().map(|s| s.1 as usize).sum()
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> usize {
        self.writable.iter().map(|s| s.1 as usize).sum()
    }

    /// The device-readable bytes, concatenated.
    pub fn read_all(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.readable_len());
        for &(addr, len) in &self.readable {
            let va = translate(&self.mem, addr, len as u64)
                .expect("a segment checked when the request was taken left the memory");
            let at = out.len();
            out.resize(at + len as usize, 0);
            // SAFETY: `[va, va+len)` lies in a region of `self.mem` (translated above),
            // which stays mapped while the Arc lives; the destination is `len` bytes of
            // `out`. The driver gave the bytes to the device: it does not write them.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    va as *const u8,
                    out.as_mut_ptr().add(at),
                    len as usize,
                )
            };
        }
        out
    }

    /// Write `data` into the device-writable part, at `offset` bytes from its start
    /// (across segments).
    ///
    /// # Panics
    /// If `offset + data.len()` exceeds [`writable_len`](Self::writable_len).
    pub fn write_at(&self, offset: usize, data: &[u8]) {
        assert!(
            offset
                .checked_add(data.len())
                .is_some_and(|end| end <= self.writable_len()),
            "write of {} bytes at {offset} past the {} device-writable bytes of the request",
            data.len(),
            self.writable_len()
        );
        let mut skip = offset;
        let mut data = data;
        for &(addr, len) in &self.writable {
            if data.is_empty() {
                break;
            }
            let len = len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(data.len());
            let va = translate(&self.mem, addr, len as u64)
                .expect("a segment checked when the request was taken left the memory");
            // SAFETY: `[va + skip, va + skip + n)` lies inside the segment `[va, va+len)`,
            // which lies in a region of `self.mem` (mapped while the Arc lives); the
            // driver gave it to the device to write.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (va as *mut u8).add(skip), n) };
            data = &data[n..];
            skip = 0;
        }
    }
}

/// Process virtual address of the device address range `[iova, iova+len)`, if it lies in
/// one region of `mem`.
fn translate(mem: &DmaMemory, iova: u64, len: u64) -> Option<u64> {
    mem.regions()
        .iter()
        .find(|r| iova >= r.iova && len <= r.len && iova - r.iova <= r.len - len)
        .map(|r| r.va + (iova - r.iova))
}

/// Whether the virtual address range `[va, va+len)` lies in one region.
fn va_inside(regions: &[DmaRegionInfo], va: u64, len: u64) -> bool {
    regions.iter().any(|r| r.contains(va, len))
}

/// A 16-bit field of a ring. The caller passes an address inside a ring whose areas
/// were checked at `setup_queue` (inside the memory, which the connection keeps mapped)
/// and aligned for u16.
fn ring_u16(addr: u64) -> &'static AtomicU16 {
    // SAFETY: see above: the address is 2-byte aligned and inside a mapped region that
    // is never unmapped while the connection (which holds the memory) lives; the driver
    // and device share it, hence an atomic.
    unsafe { &*(addr as *const AtomicU16) }
}

/// A 32-bit field of the used ring (4-byte aligned, checked at `setup_queue`).
fn ring_u32(addr: u64) -> &'static AtomicU32 {
    // SAFETY: as for `ring_u16`, 4-byte aligned (the used ring is 4-byte aligned and its
    // entries are 8 bytes from offset 4).
    unsafe { &*(addr as *const AtomicU32) }
}

/// Descriptor `i` of the table at `table_va` (checked to hold more than `i` entries
/// inside the memory): (addr, len, flags, next).
fn read_desc(table_va: u64, i: u64) -> (u64, u32, u16, u16) {
    let mut b = [0u8; DESC_SIZE as usize];
    // SAFETY: the caller checked that the table, `i + 1` descriptors at least, lies in a
    // mapped region of the connection's memory; any bytes are a valid descriptor.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (table_va + DESC_SIZE * i) as *const u8,
            b.as_mut_ptr(),
            DESC_SIZE as usize,
        )
    };
    (
        u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
        u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
        u16::from_le_bytes([b[12], b[13]]),
        u16::from_le_bytes([b[14], b[15]]),
    )
}

/// `vring_need_event` (virtio 1.2 2.7.10): whether moving the index from `old` to `new`
/// crosses `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl FakeDevice {
    /// A device offering `features`, with configuration space `config`, `num_queues`
    /// queues of at most `max_queue_size` descriptors.
    pub fn new(features: u64, config: Vec<u8>, num_queues: u16, max_queue_size: u16) -> FakeDevice {
        FakeDevice {
            inner: Arc::new(Mutex::new(Inner {
                features,
                config,
                num_queues,
                max_queue_size,
                refuse: false,
                connections: 0,
                attempts: 0,
                aborts: 0,
                conn: None,
                kick_hook: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked in a device call (a driver bug found) leaves the state
        // usable enough for the next assertions.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A transport connected to this device, reaching `mem` (the old connection, if any,
    /// is gone: its broken flag is raised). Connects even while connections are refused
    /// (refusal applies to the transport's reopener).
    pub fn connect(&self, mem: &Arc<DmaMemory>) -> Box<dyn Transport> {
        let mut i = self.lock();
        if let Some(old) = i.conn.as_mut() {
            old.alive = false;
            old.broken.store(true, Ordering::Release);
        }
        i.connections += 1;
        let id = i.connections;
        let broken = Arc::new(AtomicBool::new(false));
        let num_queues = i.num_queues as usize;
        i.conn = Some(Conn {
            id,
            mem: mem.clone(),
            broken: broken.clone(),
            alive: true,
            stopped: false,
            started: false,
            driver_features: 0,
            queues: (0..num_queues).map(|_| None).collect(),
        });
        Box::new(FakeTransport {
            dev: self.clone(),
            id,
            mem: mem.clone(),
            broken,
        })
    }

    /// Features the driver accepted on the current connection (0 before it did).
    pub fn driver_features(&self) -> u64 {
        self.lock().conn.as_ref().map_or(0, |c| c.driver_features)
    }

    /// Features offered.
    pub fn offered_features(&self) -> u64 {
        self.lock().features
    }

    /// Features offered from the next negotiation on.
    pub fn set_features(&self, features: u64) {
        self.lock().features = features;
    }

    /// The configuration space.
    pub fn config(&self) -> Vec<u8> {
        self.lock().config.clone()
    }

    /// Replace the configuration space (seen by the next reads).
    pub fn set_config(&self, config: Vec<u8>) {
        self.lock().config = config;
    }

    /// Largest queue size from now on.
    pub fn set_max_queue_size(&self, size: u16) {
        self.lock().max_queue_size = size;
    }

    /// Whether the driver started the device on the current connection.
    pub fn started(&self) -> bool {
        self.lock().conn.as_ref().is_some_and(|c| c.started)
    }

    /// Run `hook(device, queue)` on every kick of the current connection, in the
    /// kicking thread, after the kick was counted (`None`: nothing runs). The hook must
    /// not capture this device (that would be a reference cycle): it gets it as its
    /// argument.
    pub fn on_kick(&self, hook: Option<KickHook>) {
        self.lock().kick_hook = hook;
    }

    /// New chains the driver made available on queue `q` since the last call, in avail
    /// order, descriptors resolved (indirect tables followed). Empty when the queue is
    /// not set up or the connection is gone or shut down. With `VIRTIO_RING_F_EVENT_IDX`
    /// the device then asks to be kicked for the next chain (avail event).
    ///
    /// # Panics
    /// On a malformed chain or ring (a driver bug): a head or next index out of range,
    /// a loop, a device-readable descriptor after a device-writable one, a nested or
    /// malformed indirect table, an indirect table without the feature, an address
    /// outside the DMA memory, an avail index more than the queue size ahead, a head
    /// offered again while the device holds it (not checked on a queue that had a
    /// [`push_used`](Self::push_used)).
    pub fn take_requests(&self, q: u16) -> Vec<FakeRequest> {
        let mut i = self.lock();
        let Some(conn) = i.conn.as_mut().filter(|c| c.alive && !c.stopped) else {
            return Vec::new();
        };
        let (id, features) = (conn.id, conn.driver_features);
        let mem = conn.mem.clone();
        let Some(qs) = conn.queues.get_mut(q as usize).and_then(Option::as_mut) else {
            return Vec::new();
        };
        if let Some(ring) = qs.packed.as_mut() {
            let mut out = Vec::new();
            while let Some(chain) = ring.take(|a, l| translate(&mem, a, l)) {
                let chain = chain.unwrap_or_else(|e| panic!("driver bug: queue {q}: {e}"));
                assert!(
                    qs.outstanding.insert(chain.id) || qs.lied,
                    "driver bug: queue {q}: buffer id {} made available again while the device holds it",
                    chain.id
                );
                out.push(FakeRequest {
                    head: chain.id,
                    readable: chain.readable,
                    writable: chain.writable,
                    queue: q,
                    conn: id,
                    mem: mem.clone(),
                });
            }
            // Kick me for the next one (with event index), else for every one.
            ring.kick_me(if features & tf::RING_EVENT_IDX != 0 {
                packed::KickMe::AtNext
            } else {
                packed::KickMe::Always
            });
            return out;
        }
        let l = qs.layout;
        let size = l.size;
        let avail_idx = ring_u16(l.avail_va + 2).load(Ordering::Acquire);
        let pending = avail_idx.wrapping_sub(qs.last_avail);
        assert!(
            pending <= size,
            "driver bug: queue {q}: the avail index {avail_idx} is {pending} ahead of the device's {} (queue size {size})",
            qs.last_avail
        );
        let mut out = Vec::with_capacity(pending as usize);
        while qs.last_avail != avail_idx {
            let pos = (qs.last_avail % size) as u64;
            let head = u16::from_le(ring_u16(l.avail_va + 4 + 2 * pos).load(Ordering::Relaxed));
            let (readable, writable) = walk_chain(&mem, &l, q, head, features);
            assert!(
                qs.outstanding.insert(head) || qs.lied,
                "driver bug: queue {q}: head {head} made available again while the device holds it"
            );
            out.push(FakeRequest {
                head,
                readable,
                writable,
                queue: q,
                conn: id,
                mem: mem.clone(),
            });
            qs.last_avail = qs.last_avail.wrapping_add(1);
        }
        if features & tf::RING_EVENT_IDX != 0 {
            // Kick me for the next one (avail_event, after the used ring entries).
            ring_u16(l.used_va + 4 + 8 * size as u64)
                .store(qs.last_avail.to_le(), Ordering::Release);
            fence(Ordering::SeqCst);
        }
        out
    }

    /// Put `req` on the used ring of queue `q` with `written` bytes, advance the used
    /// index, and count a completion signal where the driver asked for one (its used
    /// event with `VIRTIO_RING_F_EVENT_IDX`, else the avail flags). A request of a
    /// connection that is gone is dropped (that back-end can no longer answer).
    ///
    /// # Panics
    /// If the request is of another queue, or was already completed (not checked on a
    /// queue that had a [`push_used`](Self::push_used)).
    pub fn complete(&self, q: u16, req: &FakeRequest, written: u32) {
        self.complete_inner(q, req, written);
    }

    /// [`complete`](Self::complete); returns whether the request was put on the ring.
    pub(crate) fn complete_inner(&self, q: u16, req: &FakeRequest, written: u32) -> bool {
        assert_eq!(
            req.queue, q,
            "request {} is of queue {}, not {q}",
            req.head, req.queue
        );
        let mut i = self.lock();
        let Some(conn) = i.live(req.conn) else {
            return false;
        };
        let features = conn.driver_features;
        let Some(qs) = conn.queues.get_mut(q as usize).and_then(Option::as_mut) else {
            return false;
        };
        assert!(
            qs.outstanding.remove(&req.head) || qs.lied,
            "queue {q}: request {} completed twice, or never taken (push_used completes anything)",
            req.head
        );
        if let Some(ring) = qs.packed.as_mut() {
            if ring.entries_of(req.head).is_some() {
                if ring.put_used(req.head, written) {
                    qs.signals += 1;
                }
            } else if ring.put_used_raw(req.head, written, written > 0, 1) {
                // Completed by a lie already (push_used); this is a second one.
                qs.signals += 1;
            }
            return true;
        }
        push(qs, features, req.head as u32, written);
        true
    }

    /// Whether `req` came on the current connection and it is still up (so
    /// [`complete`](Self::complete) would put it on the ring).
    pub fn is_live(&self, req: &FakeRequest) -> bool {
        self.lock().live(req.conn).is_some()
    }

    /// A used entry of any id and length on queue `q` of the current connection (for
    /// devices that lie); nothing when the connection is gone.
    ///
    /// # Panics
    /// If queue `q` is not set up on the connection.
    pub fn push_used(&self, q: u16, id: u32, len: u32) {
        let mut i = self.lock();
        let Some(conn) = i.conn.as_mut().filter(|c| c.alive) else {
            return;
        };
        let features = conn.driver_features;
        let qs = conn
            .queues
            .get_mut(q as usize)
            .and_then(Option::as_mut)
            .unwrap_or_else(|| panic!("queue {q} is not set up on the current connection"));
        qs.lied = true;
        if id < qs.layout.size as u32 {
            qs.outstanding.remove(&(id as u16));
        }
        if let Some(ring) = qs.packed.as_mut() {
            // A packed ring's buffer ids are 16 bits: larger ones are cut to their low
            // half. The device skips the entries the id took if it holds it, else one.
            let skip = ring.entries_of(id as u16).unwrap_or(1);
            if ring.put_used_raw(id as u16, len, true, skip) {
                qs.signals += 1;
            }
            return;
        }
        push(qs, features, id, len);
    }

    /// Kicks the driver sent on queue `q` on the current connection.
    pub fn kicks(&self, q: u16) -> u64 {
        self.with_queue(q, |qs| qs.kicks.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Completion signals (interrupts) the device would have sent on queue `q` of the
    /// current connection.
    pub fn signals(&self, q: u16) -> u64 {
        self.with_queue(q, |qs| qs.signals).unwrap_or(0)
    }

    /// Requests of queue `q` taken by [`take_requests`](Self::take_requests) and not yet
    /// completed, on the current connection.
    pub fn outstanding(&self, q: u16) -> usize {
        self.with_queue(q, |qs| qs.outstanding.len()).unwrap_or(0)
    }

    /// The ring layout the driver gave for queue `q` on the current connection.
    pub fn layout(&self, q: u16) -> Option<RingLayout> {
        self.with_queue(q, |qs| qs.layout)
    }

    fn with_queue<R>(&self, q: u16, f: impl FnOnce(&QueueState) -> R) -> Option<R> {
        let i = self.lock();
        let qs = i.conn.as_ref()?.queues.get(q as usize)?.as_ref()?;
        Some(f(qs))
    }

    /// The back-end goes away: the current connection's broken flag rises.
    pub fn disconnect(&self) {
        if let Some(c) = self.lock().conn.as_mut() {
            c.alive = false;
            c.broken.store(true, Ordering::Release);
        }
    }

    /// Further connection attempts through a transport's reopener fail (until set
    /// false).
    pub fn refuse_connections(&self, refuse: bool) {
        self.lock().refuse = refuse;
    }

    /// Connections made so far.
    pub fn connections(&self) -> u64 {
        self.lock().connections
    }

    /// Reconnection attempts so far (through a transport's reopener), refused ones
    /// included.
    pub fn reconnect_attempts(&self) -> u64 {
        self.lock().attempts
    }

    /// How often a driver dropped a connection itself (`Transport::abort`).
    pub fn aborts(&self) -> u64 {
        self.lock().aborts
    }

    /// Whether the current connection is up (connected, neither disconnected nor
    /// aborted).
    pub fn connected(&self) -> bool {
        self.lock().conn.as_ref().is_some_and(|c| c.alive)
    }
}

/// Put a used entry on `qs` and count the completion signal.
fn push(qs: &mut QueueState, features: u64, id: u32, len: u32) {
    let l = qs.layout;
    let slot = (qs.used_idx % l.size) as u64;
    let e = l.used_va + 4 + 8 * slot;
    ring_u32(e).store(id.to_le(), Ordering::Relaxed);
    ring_u32(e + 4).store(len.to_le(), Ordering::Relaxed);
    let old = qs.used_idx;
    qs.used_idx = old.wrapping_add(1);
    ring_u16(l.used_va + 2).store(qs.used_idx.to_le(), Ordering::Release);
    fence(Ordering::SeqCst);
    let signal = if features & tf::RING_EVENT_IDX != 0 {
        let used_event =
            u16::from_le(ring_u16(l.avail_va + 4 + 2 * l.size as u64).load(Ordering::Relaxed));
        need_event(used_event, qs.used_idx, old)
    } else {
        u16::from_le(ring_u16(l.avail_va).load(Ordering::Relaxed)) & AVAIL_F_NO_INTERRUPT == 0
    };
    if signal {
        qs.signals += 1;
    }
}

/// (device address, length) of each segment of a chain.
type Segments = Vec<(u64, u32)>;

/// Resolve the chain at `head` of the ring at `l`: (readable, writable) segments.
/// Panics on a malformed chain (see [`FakeDevice::take_requests`]).
fn walk_chain(
    mem: &DmaMemory,
    l: &RingLayout,
    q: u16,
    head: u16,
    features: u64,
) -> (Segments, Segments) {
    macro_rules! bug {
        ($($arg:tt)*) => {
            panic!("driver bug: queue {q}, chain at head {head}: {}", format!($($arg)*))
        };
    }
    if head >= l.size {
        bug!("head out of range (queue size {})", l.size);
    }
    let (mut readable, mut writable) = (Vec::new(), Vec::new());
    // The table being walked: its address and entries; whether it is indirect.
    let (mut table, mut entries, mut indirect) = (l.desc_va, l.size as u64, false);
    let mut i = head as u64;
    let mut walked = 0u64;
    loop {
        if walked >= entries {
            bug!("more than {entries} descriptors in a table of {entries}: a loop");
        }
        walked += 1;
        let (addr, len, flags, next) = read_desc(table, i);
        if flags & DESC_F_INDIRECT != 0 {
            if indirect {
                bug!("an indirect descriptor inside an indirect table");
            }
            if features & tf::RING_INDIRECT_DESC == 0 {
                bug!("an indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC");
            }
            if flags & DESC_F_NEXT != 0 {
                bug!("an indirect descriptor with VIRTQ_DESC_F_NEXT");
            }
            if len == 0 || !(len as u64).is_multiple_of(DESC_SIZE) {
                bug!("an indirect table of {len} bytes (not a non-zero multiple of 16)");
            }
            table = translate(mem, addr, len as u64).unwrap_or_else(|| {
                bug!("the indirect table at {addr:#x} ({len} bytes) lies outside the DMA memory")
            });
            (entries, indirect, i, walked) = (len as u64 / DESC_SIZE, true, 0, 0);
            continue;
        }
        if translate(mem, addr, len as u64).is_none() {
            bug!("a buffer at {addr:#x} ({len} bytes) outside the DMA memory");
        }
        if flags & DESC_F_WRITE != 0 {
            writable.push((addr, len));
        } else if !writable.is_empty() {
            bug!("a device-readable descriptor after a device-writable one");
        } else {
            readable.push((addr, len));
        }
        if flags & DESC_F_NEXT == 0 {
            return (readable, writable);
        }
        i = next as u64;
        if i >= entries {
            bug!("next index {i} out of range (table of {entries})");
        }
    }
}

/// A kick of one queue of one connection.
struct Doorbell {
    dev: Weak<Mutex<Inner>>,
    conn: u64,
    count: Arc<AtomicU64>,
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doorbell")
            .field("conn", &self.conn)
            .field("count", &self.count)
            .finish()
    }
}

impl Kick for Doorbell {
    fn kick(&self, index: u16) -> Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let Some(inner) = self.dev.upgrade() else {
            return Ok(());
        };
        let dev = FakeDevice { inner };
        let hook = {
            let mut i = dev.lock();
            let live = i.live(self.conn).is_some_and(|c| !c.stopped);
            i.kick_hook.clone().filter(|_| live)
        };
        if let Some(h) = hook {
            h(&dev, index);
        }
        Ok(())
    }
}

/// The transport of one connection to a [`FakeDevice`].
struct FakeTransport {
    dev: FakeDevice,
    id: u64,
    mem: Arc<DmaMemory>,
    broken: Arc<AtomicBool>,
}

impl FakeTransport {
    fn closed(&self) -> Error {
        Error::io(
            format!("fake device connection {}", self.id),
            std::io::Error::new(std::io::ErrorKind::NotConnected, "the connection is gone"),
        )
    }

    /// Run `f` on the device state if this connection is the current one and alive.
    fn live<R>(&self, f: impl FnOnce(&mut Inner) -> Result<R>) -> Result<R> {
        let mut i = self.dev.lock();
        if i.live(self.id).is_none() {
            return Err(self.closed());
        }
        f(&mut i)
    }
}

impl Transport for FakeTransport {
    fn describe(&self) -> String {
        format!("fake device (connection {})", self.id)
    }

    fn device_features(&mut self) -> Result<u64> {
        self.live(|i| Ok(i.features))
    }

    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        let id = self.id;
        self.live(|i| {
            let extra = features & !i.features;
            if extra != 0 {
                return Err(Error::Features(format!(
                    "the fake device does not offer {extra:#x} (offered {:#x})",
                    i.features
                )));
            }
            if let Some(c) = i.live(id) {
                c.driver_features = features;
            }
            Ok(())
        })
    }

    fn max_queues(&mut self) -> Result<Option<u16>> {
        self.live(|i| Ok(Some(i.num_queues)))
    }

    fn max_queue_size(&mut self, index: u16) -> Result<Option<u16>> {
        self.live(|i| {
            Ok(Some(if index < i.num_queues {
                i.max_queue_size
            } else {
                0
            }))
        })
    }

    fn has_config(&self) -> bool {
        true
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        self.live(|i| {
            let start = offset as usize;
            let src = start
                .checked_add(buf.len())
                .and_then(|end| i.config.get(start..end))
                .ok_or_else(|| {
                    Error::io(
                        "fake device: configuration read",
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!(
                                "{} bytes at {offset} lie past the {}-byte configuration space",
                                buf.len(),
                                i.config.len()
                            ),
                        ),
                    )
                })?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn setup_queue(&mut self, index: u16, layout: &RingLayout) -> Result<Notifier> {
        let (id, weak) = (self.id, Arc::downgrade(&self.dev.inner));
        self.live(|i| {
            let (num_queues, max) = (i.num_queues, i.max_queue_size);
            let conn = i.live(id).ok_or_else(|| Error::InvalidQueue("gone".into()))?;
            let bad = |why: String| Err(Error::InvalidQueue(format!("queue {index}: {why}")));
            if index >= num_queues {
                return bad(format!("the fake device has {num_queues} queues"));
            }
            let n = layout.size as u64;
            let packed = conn.driver_features & tf::RING_PACKED != 0;
            if layout.packed != packed {
                return bad(format!(
                    "a {} ring, but VIRTIO_F_RING_PACKED was {}negotiated",
                    if layout.packed { "packed" } else { "split" },
                    if packed { "" } else { "not " }
                ));
            }
            if layout.size == 0
                || layout.size > max
                || (!packed && !layout.size.is_power_of_two())
            {
                return bad(format!(
                    "size {} is not {} of at most {max}",
                    layout.size,
                    if packed { "a size" } else { "a power of two" }
                ));
            }
            let regions = conn.mem.regions();
            let areas = if packed {
                [
                    ("descriptor ring", layout.desc_va, DESC_SIZE * n, 16),
                    ("driver area", layout.avail_va, 4, 4),
                    ("device area", layout.used_va, 4, 4),
                ]
            } else {
                [
                    ("descriptor table", layout.desc_va, DESC_SIZE * n, 16),
                    ("avail ring", layout.avail_va, 6 + 2 * n, 2),
                    ("used ring", layout.used_va, 6 + 8 * n, 4),
                ]
            };
            for (what, va, len, align) in areas {
                if !va.is_multiple_of(align) || !va_inside(&regions, va, len) {
                    return bad(format!(
                        "the {what} at {va:#x} ({len} bytes) is not {align}-byte aligned inside the DMA memory"
                    ));
                }
            }
            let count = Arc::new(AtomicU64::new(0));
            conn.queues[index as usize] = Some(QueueState {
                layout: *layout,
                last_avail: 0,
                used_idx: 0,
                signals: 0,
                outstanding: HashSet::new(),
                packed: packed.then(|| PackedDeviceRing::new(layout, conn.driver_features)),
                lied: false,
                kicks: count.clone(),
            });
            Ok(Notifier::Kick(Arc::new(Doorbell {
                dev: weak,
                conn: id,
                count,
            })))
        })
    }

    fn start(&mut self) -> Result<()> {
        let id = self.id;
        self.live(|i| {
            if let Some(c) = i.live(id) {
                c.started = true;
            }
            Ok(())
        })
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(c) = self.dev.lock().live(self.id) {
            c.stopped = true;
        }
        Ok(())
    }

    fn memory(&self) -> &Arc<DmaMemory> {
        &self.mem
    }

    fn broken_flag(&self) -> Arc<AtomicBool> {
        self.broken.clone()
    }

    fn reopener(&self) -> Option<Reopen> {
        let (dev, mem) = (self.dev.clone(), self.mem.clone());
        Some(Box::new(move |_timeout| {
            let refuse = {
                let mut d = dev.lock();
                d.attempts += 1;
                d.refuse
            };
            if refuse {
                return Err(Error::io(
                    "fake device: reconnect",
                    std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "the fake device refuses connections",
                    ),
                ));
            }
            Ok(dev.connect(&mem))
        }))
    }

    fn abort(&self) {
        self.broken.store(true, Ordering::Release);
        let mut dev = self.dev.lock();
        dev.aborts += 1;
        if let Some(c) = dev.live(self.id) {
            c.alive = false;
        }
    }
}
