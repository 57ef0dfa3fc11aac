//! The control plane of a virtio device, whatever carries it.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::features::transport as tf;
use crate::memory::DmaMemory;
use crate::notify::Notifier;
use crate::ring::{QueueOptions, RingLayout, Virtqueue};
use std::sync::atomic::AtomicU64;

/// What a driver needs from a transport (vhost-user, virtio-pci) to bring a device up.
///
/// Call order: [`device_features`](Transport::device_features),
/// [`read_config`](Transport::read_config) as needed,
/// [`set_driver_features`](Transport::set_driver_features), one
/// [`setup_queue`](Transport::setup_queue) per queue, [`start`](Transport::start).
pub trait Transport: Send {
    /// A short name of the transport and its address, for messages.
    fn describe(&self) -> String;

    /// Features the device offers (transport-internal bits such as vhost-user's protocol
    /// feature bit are removed).
    fn device_features(&mut self) -> Result<u64>;

    /// Accept `features` (a subset of the offered ones). The device may still refuse.
    fn set_driver_features(&mut self, features: u64) -> Result<()>;

    /// Largest number of queues the device supports, if the transport can tell.
    fn max_queues(&mut self) -> Result<Option<u16>>;

    /// Largest size of queue `index`, if the transport can tell.
    fn max_queue_size(&mut self, index: u16) -> Result<Option<u16>>;

    /// Whether [`read_config`](Transport::read_config) can work: a vhost-user back-end
    /// without the `CONFIG` protocol feature (SPDK's vhost-scsi, for one) has no readable
    /// configuration space, and drivers then fall back to parameters and spec defaults.
    fn has_config(&self) -> bool;

    /// Read `buf.len()` bytes of the device-specific configuration at `offset`.
    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()>;

    /// Read the device-specific configuration structure from its start into `buf`,
    /// field by field: `fields` are its fields as (offset, width in bytes: 1, 2, 4 or 8),
    /// in order, within `buf`. Where the transport reads registers (virtio-pci) each
    /// field is read at its own width (virtio 1.2 4.1.3.1; a 64-bit field as two 32-bit
    /// reads) under one configuration generation, and fields past the end of the
    /// device's structure read as zero (a device may expose only the fields of the
    /// features it has). Elsewhere, one read of the whole structure.
    fn read_config_fields(&mut self, fields: &[(u32, u8)], buf: &mut [u8]) -> Result<()> {
        let _ = fields;
        self.read_config(0, buf)
    }

    /// Hand queue `index` with `layout` to the device; returns its doorbell.
    fn setup_queue(&mut self, index: u16, layout: &RingLayout) -> Result<Notifier>;

    /// All queues are set up: the device may start processing.
    fn start(&mut self) -> Result<()>;

    /// Stop the device; queues must not be used afterwards.
    fn shutdown(&mut self) -> Result<()>;

    /// The DMA memory the device can address.
    fn memory(&self) -> &Arc<DmaMemory>;

    /// A shared flag that turns true when the device is gone, for I/O channels.
    fn broken_flag(&self) -> Arc<std::sync::atomic::AtomicBool>;

    /// The eventfd the device signals on a completion of queue `index` while the queue
    /// has interrupts enabled (vhost-user's call eventfd); `None` when the transport
    /// only polls.
    fn completion_signal(&self, _index: u16) -> Option<Arc<vmm_sys_util::eventfd::EventFd>> {
        None
    }

    /// How to reach the same device again after it went away (vhost-user: connect to
    /// the socket anew), for reconnection; `None` when the transport cannot.
    fn reopener(&self) -> Option<Reopen> {
        None
    }

    /// Drop the connection to the device now (the broken flag rises), as the last step
    /// of escalation for a device that stopped answering. The device may still be alive.
    fn abort(&self) {}

    /// Whether [`reinit`](Transport::reinit) can bring the device back in place (PCI:
    /// a device reset), for reconnection without a new transport.
    fn can_reinit(&self) -> bool {
        false
    }

    /// After [`abort`](Transport::abort): make the same transport ready for a new
    /// bring-up (features, queues, start) with a new broken flag.
    fn reinit(&mut self) -> Result<()> {
        Err(Error::Features(format!(
            "{} cannot be brought up again in place",
            self.describe()
        )))
    }

    /// Ask the device for a buffer it tracks in-flight requests in (vhost-user
    /// `INFLIGHT_SHMFD`), before the queues are set up; `None` when it has none.
    fn get_inflight(
        &mut self,
        _num_queues: u16,
        _queue_size: u16,
    ) -> Result<Option<InflightBuffer>> {
        Ok(None)
    }

    /// Whether the device tracks in-flight requests on this connection (vhost-user
    /// `INFLIGHT_SHMFD` negotiated).
    fn tracks_inflight(&self) -> bool {
        false
    }

    /// Hand a device on a new connection the buffer an earlier one tracked in-flight
    /// requests in; it sends those requests again itself.
    fn set_inflight(&mut self, _buf: &InflightBuffer) -> Result<()> {
        Err(Error::Features(format!(
            "{} cannot take back in-flight requests",
            self.describe()
        )))
    }

    /// Hand the device a ring that an earlier connection used, to go on at used index
    /// `base` (with [`set_inflight`](Transport::set_inflight)); returns its doorbell.
    fn resume_queue(&mut self, index: u16, _layout: &RingLayout, _base: u16) -> Result<Notifier> {
        Err(Error::InvalidQueue(format!(
            "{} cannot resume queue {index}",
            self.describe()
        )))
    }
}

/// An inflight-tracking buffer (vhost-user `INFLIGHT_SHMFD`): opaque to vireo, kept
/// across reconnections and handed back to the next connection.
#[derive(Debug, Clone)]
pub struct InflightBuffer {
    /// The shared memory file.
    pub file: Arc<std::fs::File>,
    /// Bytes of the buffer.
    pub mmap_size: u64,
    /// Offset of the buffer in the file.
    pub mmap_offset: u64,
    /// Queues it tracks.
    pub num_queues: u16,
    /// Their size.
    pub queue_size: u16,
}

/// Opens a new transport to the device an old one reached (see
/// [`Transport::reopener`]): each call is one attempt, every control-message reply of it
/// bounded by the given time.
pub type Reopen = Box<dyn Fn(std::time::Duration) -> Result<Box<dyn Transport>> + Send + Sync>;

/// Allocate queue `index` of `size` descriptors in the transport's memory (a packed ring
/// when `opts.packed`) and hand it to the device.
pub fn create_queue(
    t: &mut dyn Transport,
    index: u16,
    size: u16,
    opts: QueueOptions,
) -> Result<Virtqueue> {
    let mem = t.memory().clone();
    let placeholder = Notifier::Counter(Arc::new(AtomicU64::new(0)));
    let mut q = Virtqueue::new(&mem, index, size, opts, placeholder)?;
    let notifier = t.setup_queue(index, &q.layout())?;
    q.set_notifier(notifier);
    q.set_completion_signal(t.completion_signal(index));
    Ok(q)
}

/// Features vireo accepts on every device: modern interface, event index, indirect.
pub const COMMON_FEATURES: u64 = tf::VERSION_1 | tf::RING_EVENT_IDX | tf::RING_INDIRECT_DESC;

/// Negotiate: accept the offered subset of `wanted`; `VERSION_1` is required.
pub fn negotiate(t: &mut dyn Transport, wanted: u64) -> Result<u64> {
    let offered = t.device_features()?;
    if offered & tf::VERSION_1 == 0 {
        return Err(Error::Features(format!(
            "{} does not offer VIRTIO_F_VERSION_1 (legacy-only devices are not supported); offered {offered:#x}",
            t.describe()
        )));
    }
    let accepted = offered & wanted;
    t.set_driver_features(accepted)?;
    Ok(accepted)
}
