//! vireo's in-tree vhost-user test target.
//!
//! A vhost-user-blk device (virtio 1.2, section 5.2) built on rust-vmm's `vhost-user-backend`,
//! backed by RAM or a file, that checks every request against the limits it advertises and
//! injects faults on demand. Tests and `vireo perf`'s embedded default start one with
//! [`spawn_blk_target`]:
//!
//! ```no_run
//! use vireo_target::{spawn_blk_target, Backing, BlkTargetConfig};
//!
//! let target = spawn_blk_target(
//!     std::path::Path::new("/tmp/blk.sock"),
//!     BlkTargetConfig {
//!         backend: Backing::Ram { size_bytes: 256 << 20 },
//!         seg_max: 4,
//!         ..Default::default()
//!     },
//! )?;
//! // ... run a front-end against target.socket_path() ...
//! target.faults().fail_next(3);
//! assert_eq!(target.stats().oversize_rejected, 0);
//! target.stop();
//! # Ok::<(), vireo_target::TargetError>(())
//! ```
//!
//! A vhost-user-scsi device (virtio 1.2, section 5.6) with N targets x M logical units, each a
//! disk on RAM or a (sparse) file emulating the SPC-5/SBC-4 block command set, starts with
//! [`spawn_scsi_target`]. Its logical units advertise block limits (VPD B0h) that can be set
//! small and are enforced, can be hot-added, removed and resized while a front-end runs, and
//! report unit attentions and NOT READY on demand; every command is counted by operation code:
//!
//! ```no_run
//! use vireo_target::{spawn_scsi_target, LunConfig, ScsiTargetConfig};
//!
//! let target = spawn_scsi_target(
//!     std::path::Path::new("/tmp/scsi.sock"),
//!     ScsiTargetConfig::grid(4, 4, |_, _| LunConfig::default()),
//! )?;
//! // ... scan through target.socket_path() ...
//! target.add_lun(0, 7, LunConfig::default())?;
//! assert_eq!(target.stats().opcode_count(0x42), 0); // no UNMAP yet
//! target.stop();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layout: [`blk_config`] (features, limits, config space), [`blk_request`] (request parsing
//! and validation), [`chain`] (descriptor chain shape), `blk_device` (executes a request),
//! `storage` (RAM / file), `blk_backend` (vhost-user glue, per-queue worker threads),
//! `queue` (serving a ring, transport faults), `server` (accept loop and [`TargetHandle`]),
//! [`faults`] (fault switches and counters). The scsi side: [`scsi_config`] (targets, logical
//! units, features, config space), [`scsi_request`] (virtio-scsi framing, LUN addressing,
//! events), `scsi_lun` (the SCSI emulation of one logical unit), `scsi_device` (request
//! routing, task management, events), `scsi_backend` (vhost-user glue), `scsi_handle`
//! ([`ScsiTargetHandle`]), [`scsi_faults`] and `scsi_stats`.

use std::io;
use std::path::PathBuf;

pub mod blk_config;
pub mod blk_request;
pub mod chain;
pub mod faults;
pub mod scsi_config;
pub mod scsi_faults;
pub mod scsi_request;

mod blk_backend;
mod blk_device;
mod inflight;
mod queue;
mod relay;
mod scsi_backend;
mod scsi_device;
mod scsi_handle;
mod scsi_lun;
mod scsi_stats;
mod server;
mod storage;

pub use blk_config::{Backing, BlkTargetConfig};
pub use faults::{Faults, Stats};
pub use scsi_config::{BlockLimitsConfig, LunConfig, ScsiTargetConfig};
pub use scsi_faults::{ScsiFailure, ScsiFaults};
pub use scsi_handle::{spawn_scsi_target, ScsiTargetHandle};
pub use scsi_request::Response as ScsiResponse;
pub use scsi_stats::{LunStats, ScsiStats};
pub use server::{spawn_blk_target, TargetHandle, TargetStopper};

/// Why a logical unit of a running scsi target could not be added, removed or changed.
#[derive(Debug, thiserror::Error)]
pub enum LunError {
    /// No logical unit at that address.
    #[error("target {target} has no LUN {lun}")]
    NotFound {
        /// Target number.
        target: u8,
        /// LUN.
        lun: u16,
    },
    /// A logical unit exists at that address already.
    #[error("target {target} already has LUN {lun}")]
    Exists {
        /// Target number.
        target: u8,
        /// LUN.
        lun: u16,
    },
    /// The address is beyond what the config space lets a driver scan.
    #[error("target {target} LUN {lun} is beyond max_target {max_target} or max_lun {max_lun}")]
    OutOfRange {
        /// Target number.
        target: u8,
        /// LUN.
        lun: u16,
        /// `max_target` of the config space.
        max_target: u16,
        /// `max_lun` of the config space.
        max_lun: u32,
    },
    /// The logical unit cannot be created (configuration or backing store).
    #[error("cannot create the logical unit: {0}")]
    Create(#[source] TargetError),
    /// The backing store cannot be resized.
    #[error("cannot resize the logical unit: {0}")]
    Resize(#[source] TargetError),
}

/// Why a target could not be started (or a logical unit created).
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// A configuration field is out of range.
    #[error("invalid target configuration: {field}: {reason}")]
    InvalidConfig {
        /// The offending field of [`BlkTargetConfig`] or [`ScsiTargetConfig`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The backing file cannot be opened (or created).
    #[error("cannot open backing file {}: {source}", path.display())]
    OpenBacking {
        /// The file.
        path: PathBuf,
        /// The error from the OS.
        source: io::Error,
    },
    /// The backing file cannot be grown to the requested size.
    #[error("cannot resize backing file {} to {size} bytes: {source}", path.display())]
    ResizeBacking {
        /// The file.
        path: PathBuf,
        /// The requested size.
        size: u64,
        /// The error from the OS.
        source: io::Error,
    },
    /// The backing file is smaller than needed (and may not be grown).
    #[error("backing file {} has {size} bytes, {needed} needed", path.display())]
    BackingTooSmall {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The size needed.
        needed: u64,
    },
    /// The RAM disk cannot be mapped.
    #[error("cannot map {size} bytes of RAM for the disk: {source}")]
    MapRam {
        /// Requested size.
        size: u64,
        /// The mapping error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The vhost-user socket cannot be bound.
    #[error("cannot listen on vhost-user socket {}: {source}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The error from the vhost crate.
        source: vhost::vhost_user::Error,
    },
    /// Something other than a socket exists at the socket path (it is left alone).
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    SocketPathTaken {
        /// The socket path.
        path: PathBuf,
    },
    /// Another server is listening on the socket path (it is left alone).
    #[error("{} is in use by a running server; stop it or choose another path", path.display())]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The accept loop's epoll or stop event cannot be set up.
    #[error("cannot set up the accept loop: {0}")]
    Poll(io::Error),
    /// The accept thread cannot be started.
    #[error("cannot start the target thread: {0}")]
    SpawnThread(io::Error),
}
