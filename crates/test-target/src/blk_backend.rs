//! The vhost-user side of the blk target: one [`BlkBackend`] per front-end connection, plugged
//! into rust-vmm's `vhost-user-backend` daemon. Each request queue has its own worker thread;
//! the backend pops descriptor chains (through the shared [`RingServer`], which applies the
//! injected transport faults) and hands them to the shared [`BlkDevice`].

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::blk_config::{read_config, BlkTargetConfig};
use crate::blk_device::BlkDevice;
use crate::faults::{bump, Faults};
use crate::queue::{
    device_queue_index, worker_exit_event, ConnectionSlot, FaultPolicy, Memory, RingServer,
};

/// The queues worker thread `thread` serves: one each.
fn thread_queues(thread: usize) -> u64 {
    1u64.checked_shl(thread as u32).unwrap_or(0)
}

/// vhost-user backend of one connection to a blk target.
pub(crate) struct BlkBackend {
    device: Arc<BlkDevice>,
    rings: RingServer,
    mem: RwLock<Memory>,
    acked_features: AtomicU64,
}

impl BlkBackend {
    pub(crate) fn new(
        device: Arc<BlkDevice>,
        faults: Arc<Faults>,
        connection: Arc<ConnectionSlot>,
        mem: Memory,
    ) -> Self {
        let stats = device.stats_shared();
        BlkBackend {
            device,
            rings: RingServer::new(faults, connection, stats),
            mem: RwLock::new(mem),
            acked_features: AtomicU64::new(0),
        }
    }

    fn cfg(&self) -> &BlkTargetConfig {
        self.device.config()
    }

    /// Serves everything available on `vring`.
    fn process_queue(&self, index: u16, vring: &VringRwLock<Memory>) -> io::Result<()> {
        let mem = self.mem.read().unwrap_or_else(|p| p.into_inner()).memory();
        let acked = self.acked_features.load(Ordering::Acquire);
        self.rings
            .process_queue(index, vring, &mem, FaultPolicy::Inject, |descriptors| {
                let inject_failure = self.rings.faults().take_failure();
                Some(
                    self.device
                        .execute(&mem, descriptors, acked, inject_failure)
                        .used_len,
                )
            })
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
        (0..usize::from(self.cfg().num_queues))
            .map(thread_queues)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        worker_exit_event()
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
        // `device_event` counts within this thread's queues.
        let Some(index) = device_queue_index(thread_queues(thread_id), device_event) else {
            debug!("queue thread {thread_id}: no queue for event {device_event}");
            return Ok(());
        };
        bump(&self.device.stats().kicks);
        // An error here would end the worker thread for good; a broken ring only fails this
        // pass (the front-end must reset the ring anyway).
        if let Err(e) = self.process_queue(index, vring) {
            warn!("queue thread {thread_id}: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::thread_queues;
    use crate::queue::device_queue_index;

    #[test]
    fn each_queue_thread_reports_its_queue_s_device_index() {
        assert_eq!(device_queue_index(thread_queues(0), 0), Some(0));
        assert_eq!(device_queue_index(thread_queues(3), 0), Some(3));
        assert_eq!(device_queue_index(thread_queues(3), 1), None);
    }
}
