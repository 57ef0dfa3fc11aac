//! The bdev layer of vireo: named block devices over virtio controllers, per-thread
//! I/O channels with splitting and queue-full waiting, statistics, and typed attach parameters
//! (the binary reads SPDK's JSON configuration into them).
//!
//! Three ways to wait for I/O on an [`IoChannel`]: spin with [`IoChannel::poll`],
//! block with [`IoChannel::wait`] ([`WaitMode::Poll`], [`WaitMode::Sleep`] on the
//! queue's completion eventfd, [`WaitMode::Hybrid`]), or await futures through
//! [`AsyncChannel`] (module [`aio`]), driven either by its polling task or by an event
//! loop that waits on the fd [`IoChannel::arm`] returns (`examples/async_verify.rs`
//! does it with tokio's `AsyncFd`).

#![warn(missing_docs)]

pub mod aio;
pub mod bdev;
pub mod blk;
pub mod channel;
pub mod config;
pub(crate) mod driver;
pub mod error;
pub(crate) mod health;
pub mod io;
pub(crate) mod names;
pub(crate) mod pool;
pub(crate) mod queue_life;
pub(crate) mod reconnect;
pub mod registry;
pub mod scsi;
pub mod stats;

pub use aio::{AsyncChannel, IoFuture};
pub use bdev::{Bdev, BdevInfo, Limits, OpSupport, ScsiAddress};
pub use blk::{BlkConfig, BlkController, BlkParams};
pub use channel::{Armed, IoChannel, MovableChannel, WaitMode};
pub use config::{AttachParams, ConfigCall, DevType, PackedRing, TrType};
pub use error::{BdevError, ErrorKind, IoError};
pub use io::{Completion, IoBuf, IoOp, IoRequest, Rejected};
pub use registry::{Controller, Registry};
pub use scsi::{ScsiController, ScsiParams};
pub use stats::IoStats;

/// The device configuration field tables the drivers read by (virtio-pci reads each
/// field at its own width) tile their structures: in order, no gap, no overlap, each
/// field naturally aligned, to the structure's length.
#[cfg(test)]
mod config_field_tables {
    fn check(fields: &[(u32, u8)], len: usize) {
        let mut at = 0u32;
        for &(off, w) in fields {
            assert_eq!(off, at, "field at {off}: a gap or an overlap");
            assert!(matches!(w, 1 | 2 | 4 | 8), "width {w}");
            assert_eq!(off % (w.min(4) as u32), 0, "field at {off} misaligned");
            at = off + w as u32;
        }
        assert_eq!(at as usize, len);
    }

    #[test]
    fn blk_and_scsi_tables_tile_their_structures() {
        check(crate::blk::CONFIG_FIELDS, crate::blk::CONFIG_LEN);
        check(
            crate::scsi::wire::CONFIG_FIELDS,
            crate::scsi::wire::CONFIG_LEN,
        );
    }
}
