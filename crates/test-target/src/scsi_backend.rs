//! The vhost-user side of the scsi target: one [`ScsiBackend`] per front-end connection.
//!
//! Worker thread 0 owns the control queue (0), the event queue (1) and the device's event fd
//! (posted hot-plug and parameter change events); each request queue (2..) has a worker thread
//! of its own. Request queues go through the shared [`RingServer`] with the transport faults;
//! the control and event queues do not.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, RwLock};

use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::chain::{slice_segments, ChainLayout};
use crate::faults::{bump, Faults};
use crate::queue::{
    device_queue_index, worker_exit_event, ConnectionSlot, FaultPolicy, Memory, RingServer,
};
use crate::scsi_config::{read_config, ScsiTargetConfig};
use crate::scsi_device::ScsiDevice;
use crate::scsi_lun::write_stream;
use crate::scsi_request::{Event, EVENT_SIZE};
use crate::server::BackendFactory;

/// Queue index of the control queue.
const CONTROL_QUEUE: u16 = 0;
/// Index of the event queue, within worker thread 0's vrings as well.
const EVENT_QUEUE: u16 = 1;

/// The queues worker thread `thread` serves: thread 0 the control and event queues, then
/// one thread per request queue (2..).
fn thread_queues(thread: usize) -> u64 {
    match thread {
        0 => 0b11,
        t => 1u64.checked_shl(t as u32 + 1).unwrap_or(0),
    }
}

/// vhost-user backend of one connection to a scsi target.
pub(crate) struct ScsiBackend {
    device: Arc<ScsiDevice>,
    rings: RingServer,
    mem: RwLock<Memory>,
}

impl ScsiBackend {
    fn cfg(&self) -> &ScsiTargetConfig {
        self.device.config()
    }

    fn memory(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap<()>> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).memory()
    }

    /// The custom event id of the device's event fd on worker thread 0 (ids up to the number of
    /// queues are reserved by vhost-user-backend).
    fn posted_event_id(&self) -> u64 {
        self.cfg().total_queues() as u64 + 1
    }

    fn process_requests(&self, index: u16, vring: &VringRwLock<Memory>) -> io::Result<()> {
        let mem = self.memory();
        self.rings
            .process_queue(index, vring, &mem, FaultPolicy::Inject, |descriptors| {
                Some(self.device.execute_request(&mem, descriptors))
            })
    }

    fn process_control(&self, vring: &VringRwLock<Memory>) -> io::Result<()> {
        let mem = self.memory();
        self.rings.process_queue(
            CONTROL_QUEUE,
            vring,
            &mem,
            FaultPolicy::Off,
            |descriptors| self.device.execute_control(&mem, descriptors),
        )
    }

    /// Delivers the pending events into the driver's event buffers, one buffer per event. With
    /// no buffer left, the remaining events are dropped and the next event delivered carries
    /// EVENTS_MISSED; when only that flag is pending, a NO_EVENT carries it as soon as the driver
    /// adds a buffer (as QEMU does).
    fn deliver_events(&self, vring: &VringRwLock<Memory>) -> io::Result<()> {
        let mem = self.memory();
        let c = self.device.counters();
        loop {
            vring.disable_notification().map_err(io::Error::other)?;
            loop {
                let mut ev = self.device.events();
                if ev.pending.is_empty() && !ev.missed {
                    break;
                }
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
                let Some(chain) = chain else {
                    let dropped = ev.pending.len() as u64;
                    if dropped > 0 {
                        crate::faults::add(&c.events_dropped, dropped);
                        ev.pending.clear();
                        ev.missed = true;
                    }
                    break;
                };
                let head = chain.head_index();
                let mut event = ev.pending.pop_front().unwrap_or_else(Event::no_event);
                if ev.missed {
                    event = event.with_missed();
                    ev.missed = false;
                }
                drop(ev);
                let layout = ChainLayout::from_descriptors(
                    chain.map(|d| (d.addr().0, d.len(), d.is_write_only())),
                );
                let written = match layout {
                    Ok(l) if l.writable_len() >= EVENT_SIZE as u64 => {
                        let segs = slice_segments(&l.writable, 0, EVENT_SIZE as u64);
                        write_stream(&mem, &segs, &event.to_bytes()).is_ok()
                    }
                    _ => false,
                };
                if written {
                    bump(&c.events_sent);
                    self.rings
                        .complete_one(vring, &mem, head, EVENT_SIZE as u32)?;
                } else {
                    debug!("unusable event buffer; the event is reported missed");
                    bump(&c.malformed);
                    bump(&c.events_dropped);
                    self.device.events().missed = true;
                    self.rings.complete_one(vring, &mem, head, 0)?;
                }
            }
            let more = vring.enable_notification().map_err(io::Error::other)?;
            let waiting = {
                let ev = self.device.events();
                !ev.pending.is_empty() || ev.missed
            };
            // Buffers the driver added while notifications were off: use them if something is
            // waiting for one; otherwise they stay for later events.
            if !(more && waiting) {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for ScsiBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Memory>;

    fn num_queues(&self) -> usize {
        self.cfg().total_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg().queue_size)
    }

    fn features(&self) -> u64 {
        self.cfg().device_features()
    }

    fn acked_features(&self, features: u64) {
        debug!("front-end acked features {features:#x}");
        self.device.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.cfg().protocol_features()
    }

    fn reset_device(&self) {
        self.device.set_acked_features(0);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track EVENT_IDX themselves (vhost-user-backend sets it on each queue).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(&self.device.config_space(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Like a device ignores writes to read-only fields, a refused write is ignored: an
        // error here would end the whole connection in vhost-user-backend.
        if let Err(e) = self.device.set_config(offset, buf) {
            debug!("ignoring SET_CONFIG: {e}");
        }
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..=usize::from(self.cfg().num_request_queues))
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
        let result = if thread_id == 0 {
            let posted = u64::from(device_event) == self.posted_event_id();
            if posted {
                // Consume the wake-up; everything pending is delivered below.
                let _ = self.device.event_fd().read();
            } else {
                bump(&self.device.transport().kicks);
            }
            match (posted, device_event, vrings) {
                (true, _, [_, events, ..]) | (false, EVENT_QUEUE, [_, events, ..]) => {
                    self.deliver_events(events)
                }
                (false, CONTROL_QUEUE, [control, ..]) => self.process_control(control),
                _ => {
                    debug!("queue thread 0: no vring for event {device_event}");
                    Ok(())
                }
            }
        } else {
            bump(&self.device.transport().kicks);
            // `device_event` counts within this thread's queues; the in-flight records go
            // by the device's queue index.
            let index = device_queue_index(thread_queues(thread_id), device_event);
            match (vrings.get(usize::from(device_event)), index) {
                (Some(vring), Some(index)) => self.process_requests(index, vring),
                _ => {
                    debug!("queue thread {thread_id}: no vring for event {device_event}");
                    Ok(())
                }
            }
        };
        // An error here would end the worker thread for good; a broken ring only fails this
        // pass (the front-end must reset the ring anyway).
        if let Err(e) = result {
            warn!("queue thread {thread_id}: {e}");
        }
        Ok(())
    }
}

/// Makes a [`ScsiBackend`] per connection, all on the same device.
pub(crate) struct ScsiFactory {
    pub device: Arc<ScsiDevice>,
}

impl BackendFactory for ScsiFactory {
    type Backend = ScsiBackend;

    fn create(&self, mem: Memory, connection: &Arc<ConnectionSlot>) -> Arc<ScsiBackend> {
        self.device.reset_for_connection();
        let faults: Arc<Faults> = Arc::clone(self.device.faults());
        Arc::new(ScsiBackend {
            rings: RingServer::new(
                faults,
                Arc::clone(connection),
                Arc::clone(self.device.transport()),
            ),
            device: Arc::clone(&self.device),
            mem: RwLock::new(mem),
        })
    }

    fn attach(
        &self,
        backend: &Arc<ScsiBackend>,
        daemon: &VhostUserDaemon<Arc<ScsiBackend>>,
    ) -> Result<(), String> {
        let handlers = daemon.get_epoll_handlers();
        let handler = handlers
            .first()
            .ok_or("the vhost-user daemon has no worker thread")?;
        handler
            .register_listener(
                self.device.event_fd().as_raw_fd(),
                EventSet::IN,
                backend.posted_event_id(),
            )
            .map_err(|e| format!("cannot watch the event fd: {e}"))
    }

    fn connected(&self, connected: bool) {
        self.device.set_connected(connected);
    }
}

#[cfg(test)]
mod tests {
    use super::thread_queues;
    use crate::queue::device_queue_index;

    #[test]
    fn request_queue_threads_report_the_device_s_queue_index() {
        assert_eq!(device_queue_index(thread_queues(0), 0), Some(0));
        assert_eq!(device_queue_index(thread_queues(0), 1), Some(1));
        // Each request queue thread sees its one queue as event 0.
        assert_eq!(device_queue_index(thread_queues(1), 0), Some(2));
        assert_eq!(device_queue_index(thread_queues(5), 0), Some(6));
        assert_eq!(device_queue_index(thread_queues(1), 1), None);
    }
}
