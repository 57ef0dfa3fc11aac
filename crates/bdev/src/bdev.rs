//! Block devices: what a bdev is ([`BdevInfo`], its operations and limits) and the
//! shared [`Bdev`] handle. The per-thread I/O path is [`crate::channel::IoChannel`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use vireo_virtio::{DmaBuf, DmaMemory};

use crate::channel::{IoChannel, MovableChannel};
use crate::driver::BdevDriver;
use crate::error::{BdevError, IoError};
use crate::stats::{BdevStats, IoStats};

/// Which operations a bdev supports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpSupport {
    /// Reads.
    pub read: bool,
    /// Writes.
    pub write: bool,
    /// Flush. Accepted by every bdev: on a device without a volatile write cache
    /// (see [`BdevInfo::volatile_write_cache`]) writes are durable when they complete,
    /// and a flush completes at once without a device request.
    pub flush: bool,
    /// Unmap / discard.
    pub unmap: bool,
    /// Write zeroes.
    pub write_zeroes: bool,
    /// Reset.
    pub reset: bool,
}

impl OpSupport {
    /// Whether the bdev takes I/O of kind `op`.
    #[inline]
    pub fn supports(&self, op: crate::io::IoOp) -> bool {
        use crate::io::IoOp;
        match op {
            IoOp::Read => self.read,
            IoOp::Write => self.write,
            IoOp::Flush => self.flush,
            IoOp::Unmap => self.unmap,
            IoOp::WriteZeroes => self.write_zeroes,
        }
    }
}

/// Per-request limits of the device, in blocks unless named otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Largest read or write one device request may carry.
    pub max_rw_blocks: u64,
    /// Largest number of data segments in one device request.
    pub max_segments: u32,
    /// Largest data segment in bytes.
    pub max_segment_bytes: u32,
    /// Largest unmap one device request may carry.
    pub max_unmap_blocks: u64,
    /// Largest number of ranges in one unmap request.
    pub max_unmap_segments: u32,
    /// Largest write-zeroes one device request may carry.
    pub max_write_zeroes_blocks: u64,
    /// Optimal I/O size reported by the device (0: unknown).
    pub optimal_io_blocks: u32,
    /// Physical block size in bytes.
    pub physical_block_size: u32,
}

/// SCSI address of a LUN bdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ScsiAddress {
    /// Target id.
    pub target: u8,
    /// Logical unit number.
    pub lun: u16,
}

/// What a bdev is.
#[derive(Debug, Clone, Serialize)]
pub struct BdevInfo {
    /// Bdev name.
    pub name: String,
    /// Name of the controller it belongs to.
    pub controller: String,
    /// `virtio_blk` or `virtio_scsi`.
    pub driver: &'static str,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// The device has a volatile write cache: writes are durable only after a flush
    /// (virtio-blk: `VIRTIO_BLK_F_FLUSH` offered; SCSI: WCE in the caching mode page,
    /// assumed when the page is not reported). Flushes reach the device only then.
    pub volatile_write_cache: bool,
    /// Supported operations.
    pub ops: OpSupport,
    /// Device limits.
    pub limits: Limits,
    /// Request queues of the controller.
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// The queues are packed rings (`VIRTIO_F_RING_PACKED` negotiated), else split.
    pub packed_ring: bool,
    /// Serial number, when the device reports one.
    pub serial: Option<String>,
    /// Device identifier (SCSI VPD 83h designator).
    pub device_id: Option<String>,
    /// Vendor (SCSI).
    pub vendor: Option<String>,
    /// Product (SCSI).
    pub product: Option<String>,
    /// SCSI address (SCSI).
    pub scsi: Option<ScsiAddress>,
}

impl BdevInfo {
    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }
}

/// A named block device.
pub struct Bdev {
    pub(crate) info: BdevInfo,
    /// Current size (a device may change capacity at run time).
    num_blocks: AtomicU64,
    /// The device is gone (hot-removed): I/O is refused.
    removed: AtomicBool,
    /// The device has a volatile write cache (may change at run time: SCSI mode pages).
    pub(crate) volatile_write_cache: Arc<AtomicBool>,
    pub(crate) driver: Arc<dyn BdevDriver>,
    memory: Arc<DmaMemory>,
    pub(crate) stats: BdevStats,
    /// Default I/O time limit in nanoseconds (0: none), from the controller's
    /// `io_timeout`.
    default_timeout_ns: AtomicU64,
}

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bdev").field("info", &self.info).finish()
    }
}

impl Bdev {
    /// A bdev served by `driver`.
    pub(crate) fn new(info: BdevInfo, driver: Arc<dyn BdevDriver>, memory: Arc<DmaMemory>) -> Bdev {
        Bdev {
            num_blocks: AtomicU64::new(info.num_blocks),
            removed: AtomicBool::new(false),
            volatile_write_cache: Arc::new(AtomicBool::new(info.volatile_write_cache)),
            info,
            driver,
            memory,
            stats: BdevStats::default(),
            default_timeout_ns: AtomicU64::new(0),
        }
    }

    /// The bdev's description (with its current size and write cache state).
    pub fn info(&self) -> BdevInfo {
        let mut i = self.info.clone();
        i.num_blocks = self.num_blocks();
        i.volatile_write_cache = self.volatile_write_cache.load(Ordering::Relaxed);
        i
    }

    /// The flag that says whether flushes must reach the device; a driver that learns
    /// the device's write cache changed (or may have) updates it.
    pub fn write_cache_flag(&self) -> Arc<AtomicBool> {
        self.volatile_write_cache.clone()
    }

    /// Current number of blocks.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Relaxed)
    }

    /// The device reported a new capacity.
    pub fn set_num_blocks(&self, n: u64) {
        self.num_blocks.store(n, Ordering::Relaxed);
    }

    /// The device is gone: refuse further I/O.
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }

    /// Whether the device was hot-removed.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Reset the controller behind the bdev: drop the connection and reconnect (a
    /// vhost-user controller with `reconnect_timeout`). Every request outstanding on
    /// it fails with [`IoError::Aborted`], without its buffer.
    pub fn reset_controller(&self) -> Result<(), IoError> {
        self.driver.reset_controller().map_err(|e| match e {
            IoError::Unsupported { op, bdev } if bdev.is_empty() => IoError::Unsupported {
                op,
                bdev: self.info.name.clone(),
            },
            e => e,
        })
    }

    /// Reset the device behind the bdev (not supported by every driver).
    pub fn reset(&self, timeout: std::time::Duration) -> Result<(), IoError> {
        self.driver.reset(timeout).map_err(|e| match e {
            IoError::Unsupported { op, .. } => IoError::Unsupported {
                op,
                bdev: self.info.name.clone(),
            },
            e => e,
        })
    }

    /// The bdev's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The time limit of I/O that names none (`io_timeout` of the controller).
    pub fn default_timeout(&self) -> Option<std::time::Duration> {
        match self.default_timeout_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(std::time::Duration::from_nanos(ns)),
        }
    }

    /// Set the time limit of I/O that names none (`None`: no limit).
    pub fn set_default_timeout(&self, t: Option<std::time::Duration>) {
        let ns = t.map_or(0, |d| d.as_nanos().clamp(1, u64::MAX as u128) as u64);
        self.default_timeout_ns.store(ns, Ordering::Relaxed);
    }

    /// DMA memory the device can address: buffers from here are used without a copy.
    pub fn memory(&self) -> &Arc<DmaMemory> {
        &self.memory
    }

    /// Allocate a zero-copy I/O buffer of `len` bytes, aligned to the block size.
    pub fn alloc_buf(&self, len: usize) -> Result<DmaBuf, IoError> {
        self.memory
            .alloc(len, (self.info.block_size as usize).clamp(512, 4096))
            .map_err(|e| IoError::NoMemory(e.to_string()))
    }

    /// Totals of all channels.
    pub fn iostat(&self) -> IoStats {
        self.stats.total()
    }

    /// Open an I/O channel for the calling thread.
    pub fn open_channel(self: &Arc<Self>) -> Result<IoChannel, BdevError> {
        IoChannel::open(self)
    }

    /// Open an I/O channel on a request queue of its own (never shared with the calling
    /// thread's other channels, as [`open_channel`](Self::open_channel)'s scsi channels
    /// share theirs), which may move to another thread between uses: the C API's queues.
    pub fn open_movable_channel(self: &Arc<Self>) -> Result<MovableChannel, BdevError> {
        IoChannel::open_movable(self)
    }
}
