//! Typed attach parameters and configuration calls. The SPDK JSON format that carries
//! them is the `vireo` binary's business (its `config` module).

use serde::Serialize;

/// Default number of request queues.
pub const DEFAULT_VQ_COUNT: u16 = 1;
/// Default descriptors per queue: QEMU's size for vhost-user devices, accepted by every
/// back-end we test (vhost-device-scsi allows at most 128).
pub const DEFAULT_VQ_SIZE: u16 = 128;

/// How the controller is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrType {
    /// vhost-user socket.
    User,
    /// virtio-pci function.
    Pci,
}

/// Which virtio device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DevType {
    /// virtio-scsi.
    Scsi,
    /// virtio-blk.
    Blk,
}

/// Parameters of `bdev_virtio_attach_controller`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachParams {
    /// Controller name (bdev names derive from it).
    pub name: String,
    /// Transport.
    pub trtype: TrType,
    /// Socket path or PCI address.
    pub traddr: String,
    /// Device type.
    pub dev_type: DevType,
    /// Request queues.
    pub vq_count: u16,
    /// Descriptors per queue.
    pub vq_size: u16,
    /// Default time limit of every I/O on the controller's bdevs (`io_timeout`, seconds
    /// in JSON; `None`/0: none). An I/O past it completes with a timeout error and the
    /// controller escalates (see `IoRequest::timeout`).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "seconds")]
    pub io_timeout: Option<std::time::Duration>,
    /// How long I/O waits while vireo reconnects to a vhost-user back-end that went
    /// away (`reconnect_timeout`, seconds in JSON; `None`/0: no reconnection, I/O fails
    /// at once). Requests the old connection had not completed are sent again.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "seconds")]
    pub reconnect_timeout: Option<std::time::Duration>,
}

fn seconds<S: serde::Serializer>(d: &Option<std::time::Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// One method call of a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigCall {
    /// `bdev_virtio_attach_controller`.
    Attach(AttachParams),
    /// `bdev_virtio_blk_set_hotplug`.
    BlkHotplug {
        /// Enabled.
        enable: bool,
        /// Period of the scan.
        period_us: Option<u64>,
    },
}
