//! Block devices and the per-thread I/O channel.

use std::cell::Cell;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use vireo_virtio::{clock, DmaBuf, DmaMemory, Translator};

use crate::error::{BdevError, IoError};
use crate::io::{Completion, IoBuf, IoOp, IoRequest, Rejected};
use crate::stats::{BdevStats, ChannelStats, IoStats};

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

/// One request as the device sees it, after splitting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    /// Parent I/O slot in the channel.
    pub parent: u32,
    /// Operation.
    pub op: IoOp,
    /// First block.
    pub lba: u64,
    /// Blocks (0 for flush).
    pub blocks: u64,
    /// Device address of the data (read/write).
    pub addr: u64,
    /// Data bytes (read/write).
    pub len: u32,
}

impl Child {
    /// A placeholder (an empty slot's record).
    pub const EMPTY: Child = Child {
        parent: 0,
        op: IoOp::Read,
        lba: 0,
        blocks: 0,
        addr: 0,
        len: 0,
    };
}

/// A finished device request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildDone {
    /// Parent I/O slot.
    pub parent: u32,
    /// Outcome. The error is boxed: a success is then 16 bytes in all, which moves
    /// from the driver to the channel in registers, not through a stack copy.
    pub result: Result<(), Box<IoError>>,
}

impl ChildDone {
    /// The outcome of one request of parent `parent`.
    #[inline]
    pub fn new(parent: u32, result: Result<(), IoError>) -> ChildDone {
        ChildDone {
            parent,
            result: result.map_err(Box::new),
        }
    }
}

/// The device-specific part of a channel: a request queue used by one thread.
pub trait ChannelDriver {
    /// Put a request on the ring; give it back when the ring is full. Nothing is
    /// visible to the device until [`publish`](ChannelDriver::publish).
    fn queue(&mut self, child: Child) -> Result<(), Child>;
    /// Make queued requests visible; notify the device if it asks for it.
    fn publish(&mut self);
    /// Reap completions into `out`; returns how many. A broken device completes
    /// every in-flight request with an error.
    fn poll(&mut self, out: &mut Vec<ChildDone>) -> usize;
    /// Requests on the ring.
    fn in_flight(&self) -> usize;
    /// Ask the device to signal the next completion on an eventfd: returns the fd and
    /// whether completions are already pending. `None`: the transport only polls.
    fn arm(&mut self) -> Option<(std::os::fd::RawFd, bool)> {
        None
    }
    /// Back to polling after [`arm`](ChannelDriver::arm).
    fn disarm(&mut self) {}
    /// Ask the device to abort request `parent`'s commands (SCSI: ABORT TASK), waiting
    /// at most `timeout` for each answer. The device then gives them back (aborted).
    fn abort(&mut self, _parent: u32, _timeout: std::time::Duration) -> Result<(), IoError> {
        Err(IoError::Unsupported {
            op: "abort",
            bdev: String::new(),
        })
    }
    /// Reset the controller behind this channel's connection (see
    /// [`BdevDriver::reset_controller`]); nothing if that connection is already gone.
    fn reset_controller(&mut self) -> Result<(), IoError> {
        Err(IoError::Unsupported {
            op: "controller reset",
            bdev: String::new(),
        })
    }
}

/// A device driver's handle to the bdev's device.
pub trait BdevDriver: Send + Sync {
    /// Take a request queue for a new channel.
    fn open_channel(&self) -> Result<Box<dyn ChannelDriver>, BdevError>;

    /// Reset the device behind the bdev (SCSI: LOGICAL UNIT RESET). Waits at most
    /// `timeout`.
    fn reset(&self, _timeout: std::time::Duration) -> Result<(), IoError> {
        Err(IoError::Unsupported {
            op: "reset",
            bdev: String::new(),
        })
    }

    /// Reset the controller behind the bdev, the last step for a device that stopped
    /// answering (vhost-user: drop the connection and reconnect; needs
    /// `reconnect_timeout`). Requests outstanding on it fail with [`IoError::Aborted`].
    fn reset_controller(&self) -> Result<(), IoError> {
        Err(IoError::Unsupported {
            op: "controller reset",
            bdev: String::new(),
        })
    }
}

/// A named block device.
pub struct Bdev {
    info: BdevInfo,
    /// Current size (a device may change capacity at run time).
    num_blocks: AtomicU64,
    /// The device is gone (hot-removed): I/O is refused.
    removed: AtomicBool,
    /// The device has a volatile write cache (may change at run time: SCSI mode pages).
    volatile_write_cache: Arc<AtomicBool>,
    driver: Arc<dyn BdevDriver>,
    memory: Arc<DmaMemory>,
    stats: BdevStats,
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
    pub fn new(info: BdevInfo, driver: Arc<dyn BdevDriver>, memory: Arc<DmaMemory>) -> Bdev {
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
        let drv = self.driver.open_channel()?;
        clock::init();
        let stats = self.stats.register();
        Ok(IoChannel {
            bdev: self.clone(),
            drv,
            parents: Vec::new(),
            free_parents: Vec::new(),
            pending: VecDeque::new(),
            translator: self.memory.translator(),
            bounce_pool: Vec::new(),
            local: IoStats::default(),
            published: stats,
            done_scratch: Vec::new(),
            completions: 0,
            stats_dirty: false,
            abandoned: false,
            last_completion: clock::ticks(),
            unpublished: false,
            stash: Vec::new(),
            armed: false,
            timed: 0,
            timed_out_held: 0,
            next_timeout_check: 0,
            _not_sync: PhantomData,
        })
    }
}

/// One submitted I/O, kept in place in the channel's slot table until it completes
/// (no moves of the whole record on the I/O path).
struct Parent {
    user_data: u64,
    op: IoOp,
    /// The slot holds an I/O.
    active: bool,
    bytes: u64,
    remaining: u32,
    error: Option<IoError>,
    buf: Option<IoBuf>,
    /// Vectored buffers of the request.
    iov: Vec<IoBuf>,
    bounce: Option<DmaBuf>,
    /// Submission time in [`clock`] ticks.
    start: u64,
    /// Clock ticks past which the I/O times out (0: no limit).
    deadline: u64,
    /// The caller got a timeout error; the device still holds the request.
    timed_out: bool,
    /// The escalation steps taken for it (0: none; 1: abort; 2: LUN reset; 3:
    /// controller reset).
    escalated: u8,
    /// The time limit in clock ticks (a step is taken each period).
    period: u64,
    /// A part of it was aborted by a controller reset: its buffers are never reused.
    aborted: bool,
}

/// A thread's I/O path to a bdev: submit and poll, no locks. It belongs to the thread
/// that opened it (neither `Send` nor `Sync`): channels of one thread on LUNs of the
/// same controller may share a queue.
pub struct IoChannel {
    bdev: Arc<Bdev>,
    drv: Box<dyn ChannelDriver>,
    parents: Vec<Parent>,
    free_parents: Vec<u32>,
    pending: VecDeque<Child>,
    translator: Translator,
    /// Bounce buffers by size class (power of two, from 4 KiB).
    bounce_pool: Vec<Vec<DmaBuf>>,
    local: IoStats,
    published: Arc<ChannelStats>,
    done_scratch: Vec<ChildDone>,
    completions: u64,
    /// Counters changed since they were last published.
    stats_dirty: bool,
    /// Closed without waiting for in-flight I/O (see [`IoChannel::abandon`]).
    abandoned: bool,
    /// Clock ticks of the last polling pass that found completions.
    last_completion: u64,
    /// Requests were queued since the last publish.
    unpublished: bool,
    /// Completions `run` reaped for other requests, handed out by the next `poll`.
    stash: Vec<Completion>,
    /// Interrupts are enabled on the queue (a waiter sleeps on its eventfd).
    armed: bool,
    /// Active I/Os with a deadline (timed-out ones included until the device returns
    /// them).
    timed: usize,
    /// Timed-out I/Os the device still holds.
    timed_out_held: usize,
    /// Clock ticks of the next deadline check.
    next_timeout_check: u64,
    _not_sync: PhantomData<Cell<()>>,
}

/// How [`IoChannel::wait`] waits for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Spin on the ring (lowest latency, one CPU busy).
    Poll,
    /// Sleep on the queue's completion eventfd (interrupts enabled only while
    /// sleeping, with the event index); a transport without one (polled PCI) naps.
    Sleep,
    /// Spin this long after the last completion, then sleep.
    Hybrid(std::time::Duration),
}

/// What [`IoChannel::arm`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Armed {
    /// Completions are pending: poll now instead of sleeping.
    Ready,
    /// Sleep until this fd is readable (or a timeout), then poll.
    Fd(std::os::fd::RawFd),
    /// The transport only polls (or nothing is in flight): poll, or nap and poll.
    NoFd,
}

/// Longest single sleep of [`IoChannel::wait`]: bounds the delay of work that is not
/// signalled by the device (retries after BUSY, requests waiting for ring space).
const MAX_NAP: std::time::Duration = std::time::Duration::from_millis(10);

impl std::fmt::Debug for IoChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoChannel")
            .field("bdev", &self.bdev.info.name)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

fn size_class(len: usize) -> usize {
    (len.max(4096).next_power_of_two().trailing_zeros() - 12) as usize
}

impl IoChannel {
    /// The bdev this channel serves.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// I/Os submitted and not yet returned by `poll` (including completions already
    /// reaped and waiting to be handed out).
    pub fn in_flight(&self) -> usize {
        self.parents.len() - self.free_parents.len() - self.timed_out_held + self.stash.len()
    }

    /// Requests the device holds, including timed-out ones whose completion the caller
    /// already got.
    fn device_outstanding(&self) -> usize {
        self.parents.len() - self.free_parents.len()
    }

    /// Ask for a signal on the next completion, for a caller's own event loop: sleep on
    /// the returned fd (poll/epoll for readability), then call [`poll`](Self::poll),
    /// which returns the queue to polling. Publishes queued submissions first.
    pub fn arm(&mut self) -> Armed {
        if !self.stash.is_empty() {
            return Armed::Ready;
        }
        if self.unpublished {
            self.flush();
        }
        if self.in_flight() == 0 {
            return Armed::NoFd;
        }
        match self.drv.arm() {
            Some((_, true)) => {
                self.armed = true;
                Armed::Ready
            }
            Some((fd, false)) => {
                self.armed = true;
                Armed::Fd(fd)
            }
            None => Armed::NoFd,
        }
    }

    /// Reap completions into `out` until at least `min` were added or `timeout`
    /// passed, waiting as `mode` says; returns how many were added. Returns early when
    /// nothing is in flight.
    pub fn wait(
        &mut self,
        out: &mut Vec<Completion>,
        min: usize,
        timeout: std::time::Duration,
        mode: WaitMode,
    ) -> usize {
        let start = std::time::Instant::now();
        let mut got = 0;
        let mut last_progress = start;
        loop {
            let n = self.poll(out);
            got += n;
            let now = std::time::Instant::now();
            if n > 0 {
                last_progress = now;
            }
            if got >= min || self.in_flight() == 0 {
                return got;
            }
            let elapsed = now - start;
            if elapsed >= timeout {
                return got;
            }
            let spin = match mode {
                WaitMode::Poll => true,
                WaitMode::Sleep => false,
                WaitMode::Hybrid(d) => now - last_progress < d,
            };
            if spin {
                std::hint::spin_loop();
                continue;
            }
            let nap = (timeout - elapsed).min(MAX_NAP);
            match self.arm() {
                Armed::Ready => {}
                Armed::Fd(fd) => {
                    vireo_virtio::wait_readable(&[fd], nap);
                }
                Armed::NoFd => std::thread::sleep(nap.min(std::time::Duration::from_micros(50))),
            }
        }
    }

    /// When the last polling pass that found completions ran, in [`clock`] ticks
    /// (`vireo_virtio::clock`): a free timestamp for callers that track progress.
    pub fn last_completion_ticks(&self) -> u64 {
        self.last_completion
    }

    /// Close the channel without waiting for its in-flight I/O (the caller gave up on a
    /// device that stopped answering). Their buffers are leaked, never reused: the
    /// device may still write them.
    pub fn abandon(mut self) {
        self.abandoned = true;
    }

    /// Counters of this channel.
    pub fn stats(&self) -> IoStats {
        self.local
    }

    fn validate(&self, req: &IoRequest) -> Result<(), IoError> {
        let info = &self.bdev.info;
        let ops = &info.ops;
        if self.bdev.is_removed() {
            return Err(IoError::Removed(info.name.clone()));
        }
        let num_blocks = self.bdev.num_blocks();
        let supported = match req.op {
            IoOp::Read => ops.read,
            IoOp::Write => ops.write,
            IoOp::Flush => ops.flush,
            IoOp::Unmap => ops.unmap,
            IoOp::WriteZeroes => ops.write_zeroes,
        };
        if info.read_only && req.op != IoOp::Read && req.op != IoOp::Flush {
            return Err(IoError::ReadOnly(info.name.clone()));
        }
        if !supported {
            return Err(IoError::Unsupported {
                op: req.op.name(),
                bdev: info.name.clone(),
            });
        }
        if req.op == IoOp::Flush {
            return Ok(());
        }
        if req.num_blocks == 0 {
            return Err(IoError::InvalidRequest(format!(
                "{} of zero blocks",
                req.op.name()
            )));
        }
        let end = req.offset_blocks.checked_add(req.num_blocks);
        match end {
            Some(end) if end <= num_blocks => {}
            _ => {
                return Err(IoError::OutOfRange {
                    offset: req.offset_blocks,
                    end: end.unwrap_or(u64::MAX),
                    num_blocks,
                })
            }
        }
        if req.op.has_data() && !req.iov.is_empty() {
            let want = req.num_blocks as u128 * info.block_size as u128;
            let have: u128 = req.iov.iter().map(|b| b.len() as u128).sum();
            if req.buf.is_some() || have != want {
                return Err(IoError::InvalidBuffer(format!(
                    "vectored {} of {} blocks needs {} bytes in its segments and no `buf`; the {} segments have {}",
                    req.op.name(),
                    req.num_blocks,
                    want,
                    req.iov.len(),
                    have
                )));
            }
            return Ok(());
        }
        if req.op.has_data() {
            let want = req.num_blocks as u128 * info.block_size as u128;
            match &req.buf {
                Some(b) if b.len() as u128 == want => {}
                Some(b) => {
                    return Err(IoError::InvalidBuffer(format!(
                        "{} of {} blocks needs {} bytes, the buffer has {}",
                        req.op.name(),
                        req.num_blocks,
                        want,
                        b.len()
                    )))
                }
                None => {
                    return Err(IoError::InvalidBuffer(format!(
                        "{} without a buffer",
                        req.op.name()
                    )))
                }
            }
        }
        Ok(())
    }

    fn take_bounce(&mut self, len: usize) -> Result<DmaBuf, IoError> {
        let class = size_class(len);
        if let Some(b) = self.bounce_pool.get_mut(class).and_then(Vec::pop) {
            return Ok(b);
        }
        self.bdev
            .memory
            .alloc(4096usize << class, 4096)
            .map_err(|e| IoError::NoMemory(e.to_string()))
    }

    fn give_bounce(&mut self, b: DmaBuf) {
        let class = size_class(b.len());
        if self.bounce_pool.len() <= class {
            self.bounce_pool.resize_with(class + 1, Vec::new);
        }
        // Keep a bounded pool per class.
        if self.bounce_pool[class].len() < 256 {
            self.bounce_pool[class].push(b);
        }
    }

    /// Submit an I/O. It reaches the device on the next [`poll`](Self::poll) (or
    /// [`flush`](Self::flush)); a full ring makes it wait in the channel, never fail.
    /// A request that is invalid for this bdev is refused at once.
    // The error hands the caller's buffers back by value: no allocation on a refusal,
    // and the Ok path, the hot one, carries nothing.
    #[allow(clippy::result_large_err)]
    pub fn submit(&mut self, mut req: IoRequest) -> Result<(), Rejected> {
        if let Err(error) = self.validate(&req) {
            return Err(Rejected {
                error,
                user_data: req.user_data,
                buf: req.buf.take(),
                iov: std::mem::take(&mut req.iov),
            });
        }
        tracing::trace!(
            target: "vireo_io",
            bdev = %self.bdev.info.name,
            op = req.op.name(),
            lba = req.offset_blocks,
            blocks = req.num_blocks,
            user_data = req.user_data,
            "submit"
        );
        let bs = self.bdev.info.block_size as u64;
        let bytes = req.num_blocks * bs;
        // Where the data lives for the device.
        let mut bounce = None;
        let mut addr = 0u64;
        if req.op.has_data() && !req.iov.is_empty() {
            // Vectored: one bounce buffer, gathered now for a write, scattered at
            // completion for a read.
            let total: usize = req.iov.iter().map(IoBuf::len).sum();
            let mut b = match self.take_bounce(total) {
                Ok(b) => b,
                Err(error) => {
                    return Err(Rejected {
                        error,
                        user_data: req.user_data,
                        buf: None,
                        iov: std::mem::take(&mut req.iov),
                    })
                }
            };
            if req.op == IoOp::Write {
                let mut at = 0;
                for seg in &req.iov {
                    let n = seg.len();
                    b.as_mut_slice()[at..at + n].copy_from_slice(seg.as_slice());
                    at += n;
                }
            }
            addr = b.iova();
            bounce = Some(b);
        } else if req.op.has_data() {
            let buf = req.buf.as_ref().expect("validated");
            let direct = match buf {
                IoBuf::Dma(b) => self.translator.translate(b.addr(), b.len() as u64),
                IoBuf::Heap(_) => None,
            };
            match direct {
                Some(a) => addr = a,
                None => {
                    let mut b = match self.take_bounce(buf.len()) {
                        Ok(b) => b,
                        Err(error) => {
                            return Err(Rejected {
                                error,
                                user_data: req.user_data,
                                buf: req.buf.take(),
                                iov: std::mem::take(&mut req.iov),
                            })
                        }
                    };
                    if req.op == IoOp::Write {
                        b.as_mut_slice()[..buf.len()].copy_from_slice(buf.as_slice());
                    }
                    addr = b.iova();
                    bounce = Some(b);
                }
            }
        }
        if req.op == IoOp::Flush && !self.bdev.volatile_write_cache.load(Ordering::Relaxed) {
            // Write-through device: every completed write is already durable.
            self.local.record(IoOp::Flush, 0, 0, true);
            self.stash.push(Completion {
                user_data: req.user_data,
                op: IoOp::Flush,
                result: Ok(()),
                buf: req.buf.take(),
                iov: Vec::new(),
                latency_ns: 0,
            });
            return Ok(());
        }
        let slot = match self.free_parents.pop() {
            Some(s) => s,
            None => {
                self.parents.push(Parent {
                    user_data: 0,
                    op: IoOp::Read,
                    active: false,
                    bytes: 0,
                    remaining: 0,
                    error: None,
                    buf: None,
                    iov: Vec::new(),
                    bounce: None,
                    start: 0,
                    deadline: 0,
                    timed_out: false,
                    escalated: 0,
                    period: 0,
                    aborted: false,
                });
                (self.parents.len() - 1) as u32
            }
        };
        {
            let p = &mut self.parents[slot as usize];
            p.user_data = req.user_data;
            p.op = req.op;
            p.active = true;
            p.bytes = bytes;
            p.remaining = 0;
            p.error = None;
            p.buf = req.buf.take();
            p.iov = std::mem::take(&mut req.iov);
            p.bounce = bounce;
            p.start = clock::ticks();
            p.timed_out = false;
            p.escalated = 0;
            p.aborted = false;
            p.deadline = match req.timeout.or_else(|| self.bdev.default_timeout()) {
                Some(d) => {
                    self.timed += 1;
                    p.period = clock::ns_to_ticks(d.as_nanos().min(u64::MAX as u128) as u64);
                    p.start.saturating_add(p.period).max(1)
                }
                None => 0,
            };
        }
        // Split to the device's limits.
        let limits = &self.bdev.info.limits;
        let per_child = match req.op {
            IoOp::Read | IoOp::Write => limits.max_rw_blocks,
            IoOp::Unmap => limits.max_unmap_blocks,
            IoOp::WriteZeroes => limits.max_write_zeroes_blocks,
            IoOp::Flush => 0,
        }
        .max(1);
        let mut children = 0u32;
        if req.op == IoOp::Flush {
            self.enqueue(Child {
                parent: slot,
                op: IoOp::Flush,
                lba: 0,
                blocks: 0,
                addr: 0,
                len: 0,
            });
            children = 1;
        } else {
            let mut lba = req.offset_blocks;
            let mut left = req.num_blocks;
            let mut a = addr;
            while left > 0 {
                let n = left.min(per_child);
                let len = if req.op.has_data() {
                    (n * bs) as u32
                } else {
                    0
                };
                self.enqueue(Child {
                    parent: slot,
                    op: req.op,
                    lba,
                    blocks: n,
                    addr: a,
                    len,
                });
                children += 1;
                lba += n;
                left -= n;
                if req.op.has_data() {
                    a += n * bs;
                }
            }
        }
        self.parents[slot as usize].remaining = children;
        Ok(())
    }

    fn enqueue(&mut self, child: Child) {
        self.local.device_requests += 1;
        self.unpublished = true;
        if !self.pending.is_empty() {
            self.pending.push_back(child);
            return;
        }
        if let Err(c) = self.drv.queue(child) {
            self.local.queue_full_waits += 1;
            self.pending.push_back(c);
        }
    }

    /// Make submitted I/Os visible to the device now.
    pub fn flush(&mut self) {
        if self.unpublished {
            self.unpublished = false;
            self.drv.publish();
        }
    }

    /// Reap finished I/Os into `out`; returns how many were added. Also moves waiting
    /// requests onto the ring as space frees up, and publishes submissions.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        if self.armed {
            self.armed = false;
            self.drv.disarm();
        }
        let stashed = self.stash.len();
        if stashed > 0 {
            out.append(&mut self.stash);
            // Completions that needed no device (flush on a write-through device) are
            // progress too.
            self.last_completion = clock::ticks();
        }
        let n = stashed + self.poll_device(out);
        n + self.maybe_check_timeouts(out)
    }

    /// Deadlines are checked about every millisecond, only while I/O with a time limit
    /// is out.
    #[inline]
    fn maybe_check_timeouts(&mut self, out: &mut Vec<Completion>) -> usize {
        if self.timed == 0 {
            return 0;
        }
        let now = clock::ticks();
        if now < self.next_timeout_check {
            return 0;
        }
        self.next_timeout_check = now + clock::ns_to_ticks(1_000_000);
        self.check_timeouts(now, out)
    }

    /// Complete I/O past its deadline with a timeout error (its buffer stays with the
    /// device), then escalate, one step per further period while the device still
    /// holds it: ABORT TASK (SCSI), LOGICAL UNIT RESET (SCSI), controller reset
    /// (reconnection; vhost-user with `reconnect_timeout`). A step the driver cannot
    /// take is skipped. Each step waits at most one period (and 5 s) for its answer.
    fn check_timeouts(&mut self, now: u64, out: &mut Vec<Completion>) -> usize {
        let mut n = 0;
        let mut aborts: Vec<u32> = Vec::new();
        let mut step = 0u8;
        let mut bound = std::time::Duration::from_secs(5);
        for (i, p) in self
            .parents
            .iter_mut()
            .enumerate()
            .filter(|(_, p)| p.active && p.deadline != 0)
        {
            if now < p.deadline {
                continue;
            }
            // Next step one period from now.
            p.deadline = now.saturating_add(p.period);
            bound = bound.min(std::time::Duration::from_nanos(
                clock::ticks_to_ns(p.period).max(1_000_000),
            ));
            if !p.timed_out {
                p.timed_out = true;
                self.timed_out_held += 1;
                let waited = clock::ticks_to_ns(now.saturating_sub(p.start));
                let limit = clock::ticks_to_ns(p.period);
                self.local.record(p.op, 0, waited, false);
                tracing::warn!(
                    bdev = %self.bdev.info.name,
                    op = p.op.name(),
                    user_data = p.user_data,
                    "I/O timed out after {:.3} s (limit {:.3} s); a buffer the device uses in place stays with it",
                    waited as f64 / 1e9,
                    limit as f64 / 1e9
                );
                // A caller's buffer the device uses in place stays with the device; one
                // that went through a bounce buffer (heap, vectored) is given back.
                let buf = if p.bounce.is_some() {
                    p.buf.take()
                } else {
                    None
                };
                out.push(Completion {
                    user_data: p.user_data,
                    op: p.op,
                    result: Err(IoError::Timeout(format!(
                        "{} ({} bytes) got no answer within {:.3} s",
                        p.op.name(),
                        p.bytes,
                        limit as f64 / 1e9
                    ))),
                    buf,
                    iov: std::mem::take(&mut p.iov),
                    latency_ns: waited,
                });
                n += 1;
            } else if p.escalated < 3 {
                p.escalated += 1;
                if p.escalated == 1 {
                    aborts.push(i as u32);
                }
                step = step.max(p.escalated);
            }
        }
        if !aborts.is_empty() || step > 0 {
            self.escalate(&aborts, step, bound);
        }
        n
    }

    /// Take escalation step `step` (1: abort `aborts`; 2: LUN reset; 3: controller
    /// reset); a step the driver cannot take falls through to the next.
    #[cold]
    fn escalate(&mut self, aborts: &[u32], step: u8, bound: std::time::Duration) {
        let name = self.bdev.info.name.clone();
        let mut step = step;
        if step == 1 {
            // The whole step waits at most `bound`, however many requests it aborts.
            let until = std::time::Instant::now() + bound;
            let mut unsupported = false;
            for &parent in aborts {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.drv.abort(parent, left) {
                    Ok(()) => {
                        tracing::warn!(bdev = %name, "timed-out I/O still outstanding: ABORT TASK sent")
                    }
                    Err(IoError::Unsupported { .. }) => unsupported = true,
                    Err(e) => {
                        tracing::warn!(bdev = %name, "timed-out I/O still outstanding; ABORT TASK: {e}")
                    }
                }
            }
            if !unsupported {
                return;
            }
            step = 2;
        }
        if step == 2 {
            match self.bdev.reset(bound) {
                Ok(()) => {
                    tracing::warn!(bdev = %name, "timed-out I/O still outstanding: the LUN was reset");
                    return;
                }
                Err(IoError::Unsupported { .. }) => step = 3,
                Err(e) => {
                    tracing::warn!(bdev = %name, "timed-out I/O still outstanding; LUN reset: {e}");
                    return;
                }
            }
        }
        if step == 3 {
            match self.drv.reset_controller() {
                Ok(()) => tracing::warn!(
                    bdev = %name,
                    "timed-out I/O still outstanding: resetting the controller (reconnecting); its outstanding requests fail as aborted"
                ),
                Err(e) => tracing::warn!(
                    bdev = %name,
                    "timed-out I/O still outstanding; no controller reset: {e}"
                ),
            }
        }
    }

    fn poll_device(&mut self, out: &mut Vec<Completion>) -> usize {
        if self.unpublished {
            self.unpublished = false;
            self.drv.publish();
        }
        let mut done = std::mem::take(&mut self.done_scratch);
        if self.drv.poll(&mut done) == 0 && self.pending.is_empty() {
            // Nothing finished and nothing waits for ring space: idle time, when
            // statistics are published for readers on other threads.
            self.done_scratch = done;
            if self.stats_dirty {
                self.stats_dirty = false;
                self.published.publish(&self.local);
            }
            return 0;
        }
        // One clock reading for every completion of this pass.
        let now = if done.is_empty() { 0 } else { clock::ticks() };
        if now != 0 {
            self.last_completion = now;
        }
        let mut n = 0;
        for d in done.drain(..) {
            if self.child_done(d, now, out) {
                n += 1;
            }
        }
        self.done_scratch = done;
        // Waiting requests go out as ring space frees up, including space freed by other
        // channels that share the queue.
        if !self.pending.is_empty() {
            while let Some(c) = self.pending.pop_front() {
                if let Err(c) = self.drv.queue(c) {
                    self.pending.push_front(c);
                    break;
                }
            }
            self.drv.publish();
        }
        if n > 0 {
            // Published every 64 completions, and by the next idle poll (not on the way
            // from a completion to the next submission).
            self.completions += n as u64;
            self.stats_dirty = true;
            if self.completions.is_multiple_of(64) {
                self.stats_dirty = false;
                self.published.publish(&self.local);
            }
        }
        n
    }

    fn child_done(&mut self, d: ChildDone, now: u64, out: &mut Vec<Completion>) -> bool {
        let Some(p) = self.parents.get_mut(d.parent as usize).filter(|p| p.active) else {
            return false;
        };
        if let Err(e) = d.result {
            let e = *e;
            if matches!(e, IoError::Aborted(_)) {
                p.aborted = true;
            }
            if p.error.is_none() {
                p.error = Some(e);
            }
        }
        p.remaining -= 1;
        if p.remaining > 0 {
            return false;
        }
        p.active = false;
        if p.deadline != 0 {
            self.timed -= 1;
        }
        // Aborted by a controller reset: the old back-end may still write the buffers,
        // which are never freed or handed back.
        let aborted = p.aborted;
        if aborted {
            if let Some(IoBuf::Dma(b)) = &p.buf {
                b.retire();
            }
            if let Some(b) = &p.bounce {
                b.retire();
            }
        }
        if p.timed_out {
            // The caller already got a timeout error: the device gave the request back
            // at last (or it was aborted), so its buffers are free now (or retired).
            p.buf = None;
            p.error = None;
            let bounce = p.bounce.take();
            self.timed_out_held -= 1;
            if let Some(b) = bounce {
                if !aborted {
                    self.give_bounce(b);
                }
            }
            self.free_parents.push(d.parent);
            return false;
        }
        if aborted {
            p.buf = None;
            p.bounce = None;
            p.iov.clear();
        }
        let mut buf = p.buf.take();
        let mut iov = std::mem::take(&mut p.iov);
        let error = p.error.take();
        let (op, bytes, user_data) = (p.op, p.bytes, p.user_data);
        let lat = clock::ticks_to_ns(now.saturating_sub(p.start));
        if let Some(b) = p.bounce.take() {
            if op == IoOp::Read && error.is_none() {
                if let Some(buf) = buf.as_mut() {
                    let n = buf.len();
                    buf.as_mut_slice().copy_from_slice(&b.as_slice()[..n]);
                }
                let mut at = 0;
                for seg in iov.iter_mut() {
                    let n = seg.len();
                    seg.as_mut_slice()
                        .copy_from_slice(&b.as_slice()[at..at + n]);
                    at += n;
                }
            }
            self.give_bounce(b);
        }
        self.free_parents.push(d.parent);
        self.local.record(op, bytes, lat, error.is_none());
        // I/O trace point (`-L io`); one relaxed load when off.
        tracing::trace!(
            target: "vireo_io",
            bdev = %self.bdev.info.name,
            op = op.name(),
            user_data,
            latency_ns = lat,
            error = ?error,
            "complete"
        );
        out.push(Completion {
            user_data,
            op,
            result: match error {
                None => Ok(()),
                Some(e) => Err(e),
            },
            buf,
            iov,
            latency_ns: lat,
        });
        true
    }

    /// Submit one I/O and poll until it completes (for control paths and tests).
    /// Completions of other requests that arrive meanwhile are kept for the next
    /// [`poll`](Self::poll).
    pub fn run(&mut self, req: IoRequest) -> Completion {
        let ud = req.user_data;
        let op = req.op;
        let stashed_before = self.stash.len();
        if let Err(r) = self.submit(req) {
            return Completion {
                user_data: r.user_data,
                op,
                result: Err(r.error),
                buf: r.buf,
                iov: r.iov,
                latency_ns: 0,
            };
        }
        if self.stash.len() > stashed_before {
            // Completed at once by submit (a flush on a write-through device): it is
            // the entry just pushed, whatever other stashed completions carry.
            if let Some(c) = self.stash.pop() {
                return c;
            }
        }
        let mut out = Vec::new();
        loop {
            self.poll_device(&mut out);
            self.maybe_check_timeouts(&mut out);
            if let Some(pos) = out.iter().position(|c| c.user_data == ud) {
                let c = out.remove(pos);
                self.stash.append(&mut out);
                return c;
            }
            std::hint::spin_loop();
        }
    }
}

impl Drop for IoChannel {
    fn drop(&mut self) {
        // Let in-flight I/O finish so buffers are not in use by the device when freed;
        // the driver fails everything at once if the device is gone.
        let wait = if self.abandoned {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs(5)
        };
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while self.device_outstanding() + self.stash.len() > 0 && Instant::now() < deadline {
            self.poll(&mut out);
            out.clear();
            std::thread::yield_now();
        }
        if self.device_outstanding() > 0 {
            // The device still owns these buffers: never hand them back to the allocator.
            tracing::error!(
                bdev = %self.bdev.info.name,
                in_flight = self.device_outstanding(),
                "channel closed with I/O still on the device; leaking its buffers"
            );
            for p in self.parents.iter_mut().filter(|p| p.active) {
                std::mem::forget(p.buf.take());
                std::mem::forget(p.bounce.take());
            }
        }
        self.published.publish(&self.local);
        self.bdev.stats.retire(&self.published, &self.local);
    }
}
