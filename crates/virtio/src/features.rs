//! Feature bits and constants from the virtio 1.2 specification.

/// Device-independent feature bits (virtio 1.2 section 6).
pub mod transport {
    /// Indirect descriptors (`VIRTIO_RING_F_INDIRECT_DESC`).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// Used/avail event index suppression (`VIRTIO_RING_F_EVENT_IDX`).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Modern device (`VIRTIO_F_VERSION_1`).
    pub const VERSION_1: u64 = 1 << 32;
    /// Device uses a platform IOMMU (`VIRTIO_F_ACCESS_PLATFORM`).
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
    /// Packed virtqueues (`VIRTIO_F_RING_PACKED`).
    pub const RING_PACKED: u64 = 1 << 34;
    /// In-order completion (`VIRTIO_F_IN_ORDER`).
    pub const IN_ORDER: u64 = 1 << 35;
    /// vhost-user: protocol features can be negotiated.
    pub const VHOST_USER_PROTOCOL_FEATURES: u64 = 1 << 30;
}

/// virtio-blk feature bits (virtio 1.2 section 5.2.3).
pub mod blk {
    /// Maximum segment size is in `size_max`.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// Maximum number of segments is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// Disk-style geometry.
    pub const GEOMETRY: u64 = 1 << 4;
    /// Device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << 9;
    /// Topology information.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// Writeback cache mode can be toggled.
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// Multiple request queues.
    pub const MQ: u64 = 1 << 12;
    /// Discard command.
    pub const DISCARD: u64 = 1 << 13;
    /// Write zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Lifetime information.
    pub const LIFETIME: u64 = 1 << 15;
    /// Secure erase command.
    pub const SECURE_ERASE: u64 = 1 << 16;
}

/// virtio-scsi feature bits (virtio 1.2 section 5.6.3).
pub mod scsi {
    /// Requests may have both data-out and data-in buffers.
    pub const INOUT: u64 = 1 << 0;
    /// Hot-plug events on the event queue.
    pub const HOTPLUG: u64 = 1 << 1;
    /// Parameter change events.
    pub const CHANGE: u64 = 1 << 2;
    /// T10 protection information.
    pub const T10_PI: u64 = 1 << 3;
}

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The driver gave up.
    pub const FAILED: u8 = 128;
}
