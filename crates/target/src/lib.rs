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
//! Layout: [`blk_config`] (features, limits, config space), [`blk_request`] (request parsing
//! and validation), [`chain`] (descriptor chain shape), `blk_device` (executes a request),
//! `storage` (RAM / file), `blk_backend` (vhost-user glue, per-queue worker threads),
//! `server` (accept loop and [`TargetHandle`]), [`faults`] (fault switches and counters).

use std::io;
use std::path::PathBuf;

pub mod blk_config;
pub mod blk_request;
pub mod chain;
pub mod faults;

mod blk_backend;
mod blk_device;
mod server;
mod storage;

pub use blk_config::{Backing, BlkTargetConfig};
pub use faults::{Faults, Stats};
pub use server::{spawn_blk_target, TargetHandle, TargetStopper};

/// Why a target could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// A configuration field is out of range.
    #[error("invalid target configuration: {field}: {reason}")]
    InvalidConfig {
        /// The offending field of [`BlkTargetConfig`].
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
    /// The accept loop's epoll or stop event cannot be set up.
    #[error("cannot set up the accept loop: {0}")]
    Poll(io::Error),
    /// The accept thread cannot be started.
    #[error("cannot start the target thread: {0}")]
    SpawnThread(io::Error),
}
