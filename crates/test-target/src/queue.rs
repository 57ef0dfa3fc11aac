//! Serving a virtqueue, whatever the device: pop descriptor chains, hand each to the device
//! model, and put the answers in the used ring, applying the injected transport faults on the
//! way (delays, reordering, lying used lengths, out-of-range used ids, disconnects). Shared by
//! the blk and the scsi targets.

use std::io;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use tracing::{info, warn};
use vhost_user_backend::{ShutdownHandle, VringRwLock, VringT};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use crate::faults::{add, bump, Faults, StatCounters, LIE_EXTRA_BYTES};
use crate::inflight::Inflight;

/// The guest memory of one connection, as vhost-user-backend hands it over.
pub(crate) type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The current front-end connection, so that a fault (or `stop`) can drop it from any thread.
#[derive(Default)]
pub(crate) struct ConnectionSlot {
    handle: Mutex<Option<ShutdownHandle>>,
    /// Set by `shutdown`: queue threads cut injected delays short.
    closing: AtomicBool,
    /// The connection's inflight buffer (INFLIGHT_SHMFD), if the front-end uses one.
    inflight: Mutex<Option<Arc<Inflight>>>,
}

impl ConnectionSlot {
    pub(crate) fn set(&self, handle: Option<ShutdownHandle>) {
        let mut slot = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        if handle.is_some() {
            self.closing.store(false, Ordering::Release);
        }
        *slot = handle;
    }

    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The inflight buffer of the current connection.
    pub(crate) fn inflight(&self) -> Option<Arc<Inflight>> {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Install (or, for a new connection, clear) the inflight buffer.
    pub(crate) fn set_inflight(&self, i: Option<Arc<Inflight>>) {
        *self.inflight.lock().unwrap_or_else(|p| p.into_inner()) = i;
    }

    /// Shuts the current connection down; false when there is none.
    pub(crate) fn shutdown(&self) -> bool {
        let slot = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        self.closing.store(true, Ordering::Release);
        match &*slot {
            Some(handle) => {
                handle.shutdown();
                true
            }
            None => false,
        }
    }
}

/// Whether the transport faults of [`Faults`] apply to a queue. Request queues get them; the
/// control and event queues of virtio-scsi do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultPolicy {
    /// Delays, reordering, lying lengths, bad ids and disconnects apply.
    Inject,
    /// Every chain is completed as the device says, at once.
    Off,
}

/// A request served, waiting for its used-ring entry.
#[derive(Debug, Clone, Copy)]
struct Completion {
    head: u16,
    used_len: u32,
    /// Report an out-of-range id instead of `head` (fault injection).
    bad_id: bool,
}

/// Serves the rings of one connection. One per backend; shared by its queue threads.
pub(crate) struct RingServer {
    faults: Arc<Faults>,
    connection: Arc<ConnectionSlot>,
    stats: Arc<StatCounters>,
    /// Set once an injected disconnect fired: the queues stop serving.
    dropped: AtomicBool,
    /// Queues that already served the requests left in flight by an earlier connection.
    resumed: Mutex<Vec<u16>>,
}

impl RingServer {
    pub(crate) fn new(
        faults: Arc<Faults>,
        connection: Arc<ConnectionSlot>,
        stats: Arc<StatCounters>,
    ) -> Self {
        RingServer {
            faults,
            connection,
            stats,
            dropped: AtomicBool::new(false),
            resumed: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Whether an injected disconnect fired on this connection.
    pub(crate) fn dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }

    /// Serves everything available on `vring`, re-checking after notifications are re-enabled
    /// so that no kick is lost. `serve` gets each chain's `(address, length, device_writable)`
    /// descriptors and returns the used length, or `None` to hold the chain forever (a device
    /// that never answers).
    pub(crate) fn process_queue<F>(
        &self,
        index: u16,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
        policy: FaultPolicy,
        mut serve: F,
    ) -> io::Result<()>
    where
        F: FnMut(&mut dyn Iterator<Item = (u64, u32, bool)>) -> Option<u32>,
    {
        let inflight = self.connection.inflight();
        if let Some(inf) = &inflight {
            let first = {
                let mut r = self.resumed.lock().unwrap_or_else(|p| p.into_inner());
                let first = !r.contains(&index);
                if first {
                    r.push(index);
                }
                first
            };
            if first {
                self.resubmit(index, inf, vring, mem, policy, &mut serve)?;
            }
        }
        let inflight = inflight.as_deref();
        let mut empty_passes = 0;
        loop {
            if self.dropped() {
                return Ok(());
            }
            vring.disable_notification().map_err(io::Error::other)?;
            let Some(served) = self.drain(index, inflight, vring, mem, policy, &mut serve)? else {
                return Ok(());
            };
            if !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
            // More is said to be available. A pass that found nothing twice in a row means the
            // driver's avail index is inconsistent (virtio-queue refuses it): do not spin.
            empty_passes = if served == 0 { empty_passes + 1 } else { 0 };
            if empty_passes >= 2 {
                warn!("available ring index is inconsistent; waiting for the next kick");
                return Ok(());
            }
        }
    }

    /// Pops and serves chains until the available ring is empty; returns how many, or `None`
    /// when an injected disconnect fired.
    fn drain<F>(
        &self,
        index: u16,
        inflight: Option<&Inflight>,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
        policy: FaultPolicy,
        serve: &mut F,
    ) -> io::Result<Option<usize>>
    where
        F: FnMut(&mut dyn Iterator<Item = (u64, u32, bool)>) -> Option<u32>,
    {
        let inject = policy == FaultPolicy::Inject;
        let window = if inject {
            self.faults.reorder_window()
        } else {
            0
        };
        let mut held: Vec<Completion> = Vec::new();
        let mut served = 0;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
            let Some(chain) = chain else { break };
            if let Some(inf) = inflight {
                inf.begin(index, chain.head_index());
            }
            if inject && self.faults.arrival_triggers_disconnect() {
                // The popped request is never completed: the driver sees the connection drop
                // with it in flight.
                self.complete(index, inflight, vring, mem, policy, held.drain(..).rev())?;
                self.inject_disconnect();
                return Ok(None);
            }
            served += 1;
            let head = chain.head_index();
            let mut descriptors = chain.map(|d| (d.addr().0, d.len(), d.is_write_only()));
            let Some(mut used_len) = serve(&mut descriptors) else {
                continue;
            };
            if inject && self.faults.take_lie() {
                used_len = used_len.saturating_add(LIE_EXTRA_BYTES);
                bump(&self.stats.lied_used_lens);
            }
            let bad_id = inject && self.faults.take_bad_id();
            held.push(Completion {
                head,
                used_len,
                bad_id,
            });
            if held.len() >= window.max(1) {
                self.complete_reversed(index, inflight, vring, mem, policy, &mut held)?;
            }
        }
        self.complete_reversed(index, inflight, vring, mem, policy, &mut held)?;
        Ok(Some(served))
    }

    /// Serve again, oldest first, the requests an earlier connection (or process) took
    /// from queue `index` and never completed, and go on after them in the available
    /// ring.
    fn resubmit<F>(
        &self,
        index: u16,
        inf: &Inflight,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
        policy: FaultPolicy,
        serve: &mut F,
    ) -> io::Result<()>
    where
        F: FnMut(&mut dyn Iterator<Item = (u64, u32, bool)>) -> Option<u32>,
    {
        let (used_ring, desc_table, size) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (q.used_ring(), q.desc_table(), q.size())
        };
        let used_idx: u16 = mem
            .read_obj(GuestAddress(used_ring).unchecked_add(2))
            .map(u16::from_le)
            .map_err(io::Error::other)?;
        let heads: Vec<u16> = inf
            .resume(index, used_idx)
            .into_iter()
            .filter(|&h| h < size)
            .collect();
        {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            q.set_next_avail(used_idx.wrapping_add(heads.len() as u16));
            q.set_next_used(used_idx);
        }
        if heads.is_empty() {
            return Ok(());
        }
        info!(
            "queue {index}: serving {} requests again that an earlier connection left in flight",
            heads.len()
        );
        add(&self.stats.resubmitted, heads.len() as u64);
        for head in heads {
            let Some(descriptors) = walk_chain(mem, desc_table, size, head) else {
                warn!("queue {index}: in-flight chain {head} is malformed; completing it empty");
                self.complete(
                    index,
                    Some(inf),
                    vring,
                    mem,
                    FaultPolicy::Off,
                    std::iter::once(Completion {
                        head,
                        used_len: 0,
                        bad_id: false,
                    }),
                )?;
                continue;
            };
            let Some(used_len) = serve(&mut descriptors.into_iter()) else {
                continue;
            };
            self.complete(
                index,
                Some(inf),
                vring,
                mem,
                policy,
                std::iter::once(Completion {
                    head,
                    used_len,
                    bad_id: false,
                }),
            )?;
        }
        Ok(())
    }

    /// Completes what is held, last first.
    fn complete_reversed(
        &self,
        index: u16,
        inflight: Option<&Inflight>,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
        policy: FaultPolicy,
        held: &mut Vec<Completion>,
    ) -> io::Result<()> {
        if held.len() > 1 {
            add(&self.stats.reordered_completions, held.len() as u64);
        }
        self.complete(index, inflight, vring, mem, policy, held.drain(..).rev())
    }

    /// Puts completions in the used ring (after the injected delay) and notifies the driver if
    /// it wants to be notified. Nothing once an injected disconnect has fired.
    fn complete(
        &self,
        index: u16,
        inflight: Option<&Inflight>,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
        policy: FaultPolicy,
        entries: impl Iterator<Item = Completion>,
    ) -> io::Result<()> {
        let mut added = false;
        for c in entries {
            let delay = match policy {
                FaultPolicy::Inject => self.faults.completion_delay(),
                FaultPolicy::Off => None,
            };
            let delayed = match delay {
                Some(delay) => {
                    self.sleep_unless_closing(delay);
                    true
                }
                None => false,
            };
            if self.dropped() {
                // An injected disconnect fired (here or on another queue) while this
                // completion waited: like a back-end that crashed, complete nothing more.
                // The request stays marked in flight for the next connection to serve.
                return Ok(());
            }
            if c.bad_id {
                self.add_used_bad_id(vring, mem, c)?;
                continue;
            }
            if let Some(inf) = inflight {
                inf.before_used(index, c.head);
            }
            vring
                .add_used(c.head, c.used_len)
                .map_err(io::Error::other)?;
            if let Some(inf) = inflight {
                let next = vring.get_ref().get_queue().next_used();
                inf.after_used(index, c.head, next);
            }
            if delayed {
                // A delayed completion must not wait for the ones behind it.
                self.notify(vring, mem)?;
            } else {
                added = true;
            }
        }
        if added {
            self.notify(vring, mem)?;
        }
        Ok(())
    }

    /// Puts one entry in the used ring and notifies the driver if it wants to be (event queue
    /// deliveries).
    pub(crate) fn complete_one(
        &self,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
        head: u16,
        used_len: u32,
    ) -> io::Result<()> {
        vring.add_used(head, used_len).map_err(io::Error::other)?;
        self.notify(vring, mem)
    }

    /// Publishes a used entry whose id is outside the ring (virtio-queue refuses to write one)
    /// and interrupts the driver unconditionally so that it looks at it.
    fn add_used_bad_id(
        &self,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
        c: Completion,
    ) -> io::Result<()> {
        {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let (size, next) = (queue.size(), queue.next_used());
            let id = u32::from(size) + u32::from(c.head);
            let used = GuestAddress(queue.used_ring());
            let entry = used
                .checked_add(4 + u64::from(next % size.max(1)) * 8)
                .ok_or_else(|| io::Error::other("used ring address overflows"))?;
            let idx_addr = used
                .checked_add(2)
                .ok_or_else(|| io::Error::other("used ring address overflows"))?;
            mem.write_obj(id.to_le(), entry).map_err(io::Error::other)?;
            mem.write_obj(c.used_len.to_le(), entry.unchecked_add(4))
                .map_err(io::Error::other)?;
            // The entry must be visible before the index that publishes it.
            fence(Ordering::Release);
            let next = next.wrapping_add(1);
            mem.write_obj(next.to_le(), idx_addr)
                .map_err(io::Error::other)?;
            queue.set_next_used(next);
        }
        bump(&self.stats.bad_used_ids);
        fence(Ordering::SeqCst);
        bump(&self.stats.interrupts);
        vring.signal_used_queue()
    }

    /// Sleeps for an injected delay, cut short when the connection is going away so that
    /// stopping the target never waits for it.
    fn sleep_unless_closing(&self, delay: Duration) {
        let end = Instant::now() + delay;
        loop {
            let now = Instant::now();
            if now >= end || self.connection.closing() {
                return;
            }
            thread::sleep((end - now).min(Duration::from_millis(5)));
        }
    }

    /// Signals the used ring if the driver asked for it (event index, or the avail ring's
    /// NO_INTERRUPT flag without event index).
    pub(crate) fn notify(
        &self,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
    ) -> io::Result<()> {
        if !vring.needs_notification().map_err(io::Error::other)? {
            return Ok(());
        }
        let (event_idx, avail_ring) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (queue.event_idx_enabled(), queue.avail_ring())
        };
        if !event_idx {
            // virtio-queue does not look at VRING_AVAIL_F_NO_INTERRUPT; honour it here.
            fence(Ordering::SeqCst);
            let flags: u16 = mem
                .read_obj(GuestAddress(avail_ring))
                .map(u16::from_le)
                .unwrap_or(0);
            if flags & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0 {
                return Ok(());
            }
        }
        bump(&self.stats.interrupts);
        vring.signal_used_queue()
    }

    fn inject_disconnect(&self) {
        self.dropped.store(true, Ordering::Release);
        bump(&self.stats.injected_disconnects);
        info!("fault injection: dropping the front-end connection");
        if !self.connection.shutdown() {
            warn!("fault injection: no connection to drop");
        }
    }
}

/// The descriptors of the chain at `head` (following an indirect table), as
/// `(address, length, device-writable)`; `None` if the chain is malformed.
fn walk_chain(
    mem: &GuestMemoryMmap<()>,
    desc_table: u64,
    size: u16,
    head: u16,
) -> Option<Vec<(u64, u32, bool)>> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    let read = |table: u64, i: u16| -> Option<(u64, u32, u16, u16)> {
        let at = GuestAddress(table).checked_add(u64::from(i) * 16)?;
        let addr: u64 = mem.read_obj(at).ok()?;
        let len: u32 = mem.read_obj(at.checked_add(8)?).ok()?;
        let flags: u16 = mem.read_obj(at.checked_add(12)?).ok()?;
        let next: u16 = mem.read_obj(at.checked_add(14)?).ok()?;
        Some((
            u64::from_le(addr),
            u32::from_le(len),
            u16::from_le(flags),
            u16::from_le(next),
        ))
    };
    let mut out = Vec::new();
    let (mut table, mut limit, mut i) = (desc_table, size, head);
    let mut steps = 0u32;
    loop {
        if i >= limit {
            return None;
        }
        let (addr, len, flags, next) = read(table, i)?;
        steps += 1;
        if steps > 4096 {
            return None;
        }
        if flags & INDIRECT != 0 {
            if table != desc_table || len == 0 || !len.is_multiple_of(16) {
                return None;
            }
            table = addr;
            limit = u16::try_from(len / 16).ok()?;
            i = 0;
            continue;
        }
        out.push((addr, len, flags & WRITE != 0));
        if flags & NEXT == 0 {
            return Some(out);
        }
        i = next;
    }
}

/// The device's index of the `local`-th queue of a worker thread that serves the queues
/// set in `mask`. vhost-user-backend numbers a thread's events by position among that
/// thread's own queues (a thread serving only queue 3 sees event 0), while the in-flight
/// records and the logs go by the device's queue index.
pub(crate) fn device_queue_index(mask: u64, local: u16) -> Option<u16> {
    (0..64u16)
        .filter(|q| mask >> q & 1 == 1)
        .nth(usize::from(local))
}

/// The exit event of a back-end's worker threads: without one they would never end
/// when the connection goes.
pub(crate) fn worker_exit_event() -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
        Ok(pair) => Some(pair),
        Err(e) => {
            tracing::warn!("cannot create a worker exit event: {e}");
            None
        }
    }
}

#[cfg(test)]
mod index_tests {
    use super::device_queue_index;

    #[test]
    fn a_thread_s_events_map_to_the_device_s_queue_indices() {
        assert_eq!(device_queue_index(0b1, 0), Some(0));
        assert_eq!(device_queue_index(0b1000, 0), Some(3));
        assert_eq!(device_queue_index(0b1010, 1), Some(3));
        assert_eq!(device_queue_index(0b1010, 2), None);
        assert_eq!(device_queue_index(1 << 63, 0), Some(63));
        assert_eq!(device_queue_index(0, 0), None);
    }
}
