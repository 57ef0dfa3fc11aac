//! Driver-side virtio core of vireo: DMA memory, split virtqueues, feature negotiation
//! and the transports (vhost-user front-end, virtio-pci through VFIO or uio, the kernel's
//! vhost-scsi and vhost-vdpa).
//!
//! The layers above (the virtio-blk and virtio-scsi drivers) see a [`transport::Transport`]
//! for the control plane and one [`ring::Virtqueue`] (a split or a packed ring) per
//! request queue for the data plane.

#![warn(missing_docs)]

pub mod clock;
pub mod error;
pub mod features;
pub mod memory;
pub mod notify;
pub mod pci;
pub mod request_queue;
pub mod ring;
pub mod testing;
pub mod transport;
pub mod unix;
pub mod vdpa;
pub mod vhost_kernel;
pub mod vhost_user;
pub mod wire;

pub use error::{Error, Result};
pub use memory::{
    Addressing, DmaBuf, DmaConfig, DmaMemory, DmaRegionInfo, ForeignBuf, RegionListener, Translator,
};
pub use notify::{wait_readable, Notifier};
pub use pci::{PciAddress, PciTransport};
pub use request_queue::{QueueFailure, RequestQueue};
pub use ring::{
    PackedQueue, QueueFull, QueueOptions, RingLayout, Segment, SplitQueue, Used, Virtqueue,
};
pub use transport::{create_queue, negotiate, InflightBuffer, Reopen, Transport, COMMON_FEATURES};
pub use vdpa::VdpaTransport;
pub use vhost_kernel::VhostScsiTransport;
pub use vhost_user::VhostUserTransport;
