//! The vhost-user side of the blk target: one [`BlkBackend`] per front-end connection, plugged
//! into rust-vmm's `vhost-user-backend` daemon. Each request queue has its own worker thread;
//! the backend pops descriptor chains, hands them to the shared [`BlkDevice`], and applies the
//! injected faults (failures, delays, reordering, lying lengths, disconnects) on the way to the
//! used ring.

use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blk_config::{read_config, BlkTargetConfig};
use crate::blk_device::BlkDevice;
use crate::faults::{add, bump, Faults, LIE_EXTRA_BYTES};

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The current front-end connection, so that a fault (or `stop`) can drop it from any thread.
#[derive(Default)]
pub(crate) struct ConnectionSlot {
    handle: Mutex<Option<ShutdownHandle>>,
    /// Set by `shutdown`: queue threads cut injected delays short.
    closing: AtomicBool,
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

/// A request served, waiting for its used-ring entry.
#[derive(Debug, Clone, Copy)]
struct Completion {
    head: u16,
    used_len: u32,
    /// Report an out-of-range id instead of `head` (fault injection).
    bad_id: bool,
}

/// vhost-user backend of one connection to a blk target.
pub(crate) struct BlkBackend {
    device: Arc<BlkDevice>,
    faults: Arc<Faults>,
    connection: Arc<ConnectionSlot>,
    mem: RwLock<Memory>,
    acked_features: AtomicU64,
    /// Set once an injected disconnect fired: the queues stop serving.
    dropped: AtomicBool,
}

impl BlkBackend {
    pub(crate) fn new(
        device: Arc<BlkDevice>,
        faults: Arc<Faults>,
        connection: Arc<ConnectionSlot>,
        mem: Memory,
    ) -> Self {
        BlkBackend {
            device,
            faults,
            connection,
            mem: RwLock::new(mem),
            acked_features: AtomicU64::new(0),
            dropped: AtomicBool::new(false),
        }
    }

    fn cfg(&self) -> &BlkTargetConfig {
        self.device.config()
    }

    /// Serves everything available on `vring`, re-checking after notifications are re-enabled
    /// so that no kick is lost.
    fn process_queue(&self, vring: &VringRwLock<Memory>) -> io::Result<()> {
        let mem = self.mem.read().unwrap_or_else(|p| p.into_inner()).memory();
        let mut empty_passes = 0;
        loop {
            if self.dropped.load(Ordering::Acquire) {
                return Ok(());
            }
            vring.disable_notification().map_err(io::Error::other)?;
            let Some(served) = self.drain(vring, &mem)? else {
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
    fn drain(
        &self,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
    ) -> io::Result<Option<usize>> {
        let window = self.faults.reorder_window();
        let acked = self.acked_features.load(Ordering::Acquire);
        let mut held: Vec<Completion> = Vec::new();
        let mut served = 0;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
            let Some(chain) = chain else { break };
            if self.faults.arrival_triggers_disconnect() {
                // The popped request is never completed: the driver sees the connection drop
                // with it in flight.
                self.complete(vring, mem, held.drain(..).rev())?;
                self.inject_disconnect();
                return Ok(None);
            }
            served += 1;
            let head = chain.head_index();
            let inject_failure = self.faults.take_failure();
            let outcome = self.device.execute(
                mem,
                chain.map(|d| (d.addr().0, d.len(), d.is_write_only())),
                acked,
                inject_failure,
            );
            let mut used_len = outcome.used_len;
            if self.faults.take_lie() {
                used_len = used_len.saturating_add(LIE_EXTRA_BYTES);
                bump(&self.device.stats().lied_used_lens);
            }
            let bad_id = self.faults.take_bad_id();
            held.push(Completion {
                head,
                used_len,
                bad_id,
            });
            if held.len() >= window.max(1) {
                self.complete_reversed(vring, mem, &mut held)?;
            }
        }
        self.complete_reversed(vring, mem, &mut held)?;
        Ok(Some(served))
    }

    /// Completes what is held, last first.
    fn complete_reversed(
        &self,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
        held: &mut Vec<Completion>,
    ) -> io::Result<()> {
        if held.len() > 1 {
            add(
                &self.device.stats().reordered_completions,
                held.len() as u64,
            );
        }
        self.complete(vring, mem, held.drain(..).rev())
    }

    /// Puts completions in the used ring (after the injected delay) and notifies the driver if
    /// it wants to be notified.
    fn complete(
        &self,
        vring: &VringRwLock<Memory>,
        mem: &GuestMemoryMmap<()>,
        entries: impl Iterator<Item = Completion>,
    ) -> io::Result<()> {
        let mut added = false;
        for c in entries {
            let delayed = match self.faults.completion_delay() {
                Some(delay) => {
                    self.sleep_unless_closing(delay);
                    true
                }
                None => false,
            };
            if c.bad_id {
                self.add_used_bad_id(vring, mem, c)?;
                continue;
            }
            vring
                .add_used(c.head, c.used_len)
                .map_err(io::Error::other)?;
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
        bump(&self.device.stats().bad_used_ids);
        fence(Ordering::SeqCst);
        bump(&self.device.stats().interrupts);
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

    fn notify(&self, vring: &VringRwLock<Memory>, mem: &GuestMemoryMmap<()>) -> io::Result<()> {
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
        bump(&self.device.stats().interrupts);
        vring.signal_used_queue()
    }

    fn inject_disconnect(&self) {
        self.dropped.store(true, Ordering::Release);
        bump(&self.device.stats().injected_disconnects);
        info!("fault injection: dropping the front-end connection");
        if !self.connection.shutdown() {
            warn!("fault injection: no connection to drop");
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Memory>;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg().num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg().queue_size)
    }

    fn features(&self) -> u64 {
        self.cfg().device_features()
    }

    fn acked_features(&self, features: u64) {
        debug!("front-end acked features {features:#x}");
        self.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        BlkTargetConfig::protocol_features()
    }

    fn reset_device(&self) {
        self.acked_features.store(0, Ordering::Release);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track EVENT_IDX themselves (vhost-user-backend sets it on each queue).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(self.device.config_space(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing in the virtio-blk config is writable without CONFIG_WCE, which is not
        // offered: ignore the write like a device ignores writes to read-only fields.
        debug!(
            "ignoring SET_CONFIG of {} bytes at offset {offset}",
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.cfg().num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the worker threads would never end when the connection goes.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<Memory>],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            debug!("queue thread {thread_id}: ignoring event set {evset:?}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            debug!("queue thread {thread_id}: no vring for event {device_event}");
            return Ok(());
        };
        bump(&self.device.stats().kicks);
        // An error here would end the worker thread for good; a broken ring only fails this
        // pass (the front-end must reset the ring anyway).
        if let Err(e) = self.process_queue(vring) {
            warn!("queue thread {thread_id}: {e}");
        }
        Ok(())
    }
}
