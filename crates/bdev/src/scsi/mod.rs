//! virtio-scsi driver (virtio 1.2 section 5.6): every target and LUN as a bdev.
//!
//! Queue 0 is the control queue (task management), queue 1 the event queue (hot-plug
//! and parameter changes), queues 2.. carry commands. Attach scans targets
//! `0..=max_target`; each disk LUN becomes a bdev named `<name>t<target>` (LUN 0) or
//! `<name>t<target>l<lun>`.
//!
//! Layout: `attach` (negotiation, queues, scan, LUN bdevs), `io` (the per-thread request
//! queue shared by a thread's LUN channels: CDBs, completions, retries), `tmf` (task
//! management on the control queue), `events` (the event thread: hot-plug, capacity
//! changes, rescans), `queue` (command slots on the generic request queue), `scan`
//! (INQUIRY, VPD, capacity, probes), `wire` (responses, events, config).

mod attach;
mod events;
mod io;
mod queue;
pub(crate) mod scan;
mod tmf;
pub mod wire;

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vireo_scsi::{
    SyncCache10Cdb, SyncCache16Cdb, UnmapCdb, WriteSame16Cdb, MAX_UNMAP_DESCRIPTORS_PER_LIST,
};
use vireo_virtio::features::scsi as sf;
use vireo_virtio::features::transport as tf;
use vireo_virtio::{
    create_queue, negotiate, DmaBuf, DmaMemory, QueueFailure, QueueOptions, RequestQueue, Segment,
    Transport, Virtqueue, COMMON_FEATURES,
};

use crate::bdev::{Bdev, BdevInfo, Limits, OpSupport, ScsiAddress};
use crate::driver::{BdevDriver, ChannelDriver, Child, ChildDone};
use crate::error::{BdevError, IoError};
use crate::health::Health;
use crate::io::IoOp;
use crate::pool::QueuePool;
use crate::reconnect::{Link, NewRing, ReconnectError, ReconnectStatus};
use attach::{make_lun, scan_all};
use events::{event_loop, EventCtx};
use io::open_channel;
use queue::{Geometry, ScsiQueue};
pub use scan::LunInfo;
use scan::Scanner;
use tmf::lun_reset;
use wire::{evaluate, lun_bytes, sense_error, sense_is_retryable, Outcome, ScsiConfig};

/// Retries of one command (BUSY, UNIT ATTENTION, transport resets).
const MAX_RETRIES: u8 = 8;
/// Segment size vireo uses (virtio-scsi has no size_max).
const SEGMENT_BYTES: u64 = 1 << 22;
/// Event buffers kept on the event queue.
const EVENT_BUFFERS: u16 = 16;
/// Largest target id the LUN field can carry.
const MAX_TARGET: u16 = 255;
/// Bytes of one UNMAP parameter list buffer (header + 4095 descriptors fit).
const UNMAP_LIST_BYTES: usize = 65536;

/// Parameters of a virtio-scsi controller.
#[derive(Debug, Clone)]
pub struct ScsiParams {
    /// Controller name (bdev names derive from it).
    pub name: String,
    /// Request queues to use; 0: every queue the device offers.
    pub vq_count: u16,
    /// Descriptors per queue.
    pub vq_size: u16,
    /// How long I/O waits while vireo reconnects to a back-end that went away
    /// (vhost-user); `None`: no reconnection, I/O fails at once.
    pub reconnect_timeout: Option<Duration>,
    /// Packed or split rings.
    pub packed_ring: crate::config::PackedRing,
}

/// A LUN found after attach (hot-plug, rescan) that has no bdev: its bdev name is
/// held by another controller. It is tried again on the next event or rescan that
/// reports it (after the other controller is detached, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunNotAdded {
    /// Target id.
    pub target: u8,
    /// LUN.
    pub lun: u16,
    /// The bdev name it would have.
    pub bdev: String,
    /// Why it has none.
    pub reason: String,
}

/// What a channel needs to know of its LUN.
#[derive(Debug)]
struct LunCtx {
    lun: [u8; 8],
    block_size: u32,
    rw16: bool,
    unmap_per_desc: u64,
    unmap_max_desc: usize,
    write_same_unmap: bool,
    num_blocks: AtomicU64,
    /// The bdev's write cache flag (set once the bdev exists): raised when the LUN
    /// reports MODE PARAMETERS CHANGED, so flushes reach it until a rescan says otherwise.
    write_cache: std::sync::OnceLock<Arc<AtomicBool>>,
}

/// What one command needs of its LUN, copied out of [`LunCtx`].
#[derive(Clone, Copy)]
struct LunParams {
    lun: [u8; 8],
    block_size: u32,
    rw16: bool,
    unmap_per_desc: u64,
    unmap_max_desc: usize,
    write_same_unmap: bool,
    num_blocks: u64,
}

impl LunParams {
    #[inline]
    fn of(c: &LunCtx) -> LunParams {
        LunParams {
            lun: c.lun,
            block_size: c.block_size,
            rw16: c.rw16,
            unmap_per_desc: c.unmap_per_desc,
            unmap_max_desc: c.unmap_max_desc,
            write_same_unmap: c.write_same_unmap,
            num_blocks: c.num_blocks.load(Ordering::Relaxed),
        }
    }
}

struct ScsiShared {
    name: String,
    geo: Geometry,
    mem: Arc<DmaMemory>,
    health: Health,
    queues: QueuePool,
    max_segments: usize,
    /// The device's transfer size hint (`max_sectors`, 512-byte units; 0: none).
    max_sectors: u32,
    /// The queues are packed rings.
    packed_ring: bool,
    control: Mutex<Option<ControlQueue>>,
    link: Arc<crate::reconnect::Link>,
    /// A command saw REPORTED LUNS DATA HAS CHANGED (3F/0E) or CAPACITY DATA HAS
    /// CHANGED (2A/09): the event thread rescans (a device need not send events).
    rescan_wanted: AtomicBool,
}

/// The control queue: task management functions, one at a time.
type ControlQueue = RequestQueue<vireo_virtio::wire::scsi::TmfSlot>;

/// One LUN's bdev and driver.
struct LunEntry {
    info: LunInfo,
    bdev: Arc<Bdev>,
    ctx: Arc<LunCtx>,
}

impl crate::reconnect::ControllerShared for ScsiShared {
    fn parts(&self) -> (&Health, &QueuePool, &Link) {
        (&self.health, &self.queues, &self.link)
    }
}

/// An attached virtio-scsi controller.
pub struct ScsiController {
    transport: Arc<Mutex<Box<dyn Transport>>>,
    shared: Arc<ScsiShared>,
    luns: Arc<Mutex<Vec<LunEntry>>>,
    /// LUNs found later whose bdev name was taken.
    not_added: Arc<Mutex<Vec<LunNotAdded>>>,
    skipped: Vec<LunInfo>,
    features: u64,
    config: ScsiConfig,
    event_thread: Option<std::thread::JoinHandle<()>>,
    stop_events: Arc<AtomicBool>,
    params: ScsiParams,
}

impl std::fmt::Debug for ScsiController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiController")
            .field("name", &self.shared.name)
            .field("config", &self.config)
            .finish()
    }
}

fn bad(name: &str, reason: impl Into<String>) -> BdevError {
    BdevError::BadDevice {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// Bdev name of a LUN.
pub fn lun_name(controller: &str, target: u8, lun: u16) -> String {
    if lun == 0 {
        format!("{controller}t{target}")
    } else {
        format!("{controller}t{target}l{lun}")
    }
}

impl ScsiController {
    /// The current bdevs (LUNs can come and go at run time).
    pub fn bdevs(&self) -> Vec<Arc<Bdev>> {
        lock(&self.luns).iter().map(|l| l.bdev.clone()).collect()
    }

    /// Every LUN found, disks and others.
    pub fn luns(&self) -> Vec<LunInfo> {
        let mut v: Vec<LunInfo> = lock(&self.luns).iter().map(|l| l.info.clone()).collect();
        v.extend(self.skipped.iter().cloned());
        v
    }

    /// LUNs found but not made bdevs (not disks).
    pub fn skipped(&self) -> &[LunInfo] {
        &self.skipped
    }

    /// Disk LUNs found after attach (hot-plug, rescan) that got no bdev because another
    /// controller has their bdev name.
    pub fn luns_not_added(&self) -> Vec<LunNotAdded> {
        lock(&self.not_added).clone()
    }

    /// The device configuration.
    pub fn config(&self) -> &ScsiConfig {
        &self.config
    }

    /// Negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Controller parameters.
    pub fn params(&self) -> &ScsiParams {
        &self.params
    }

    /// Why the controller failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.health.failure()
    }

    /// Successful reconnections to the back-end so far.
    pub fn reconnects(&self) -> u64 {
        self.shared.link.reconnects()
    }

    /// Give up on a device that stopped answering: drop the connection; with
    /// `reconnect_timeout` the controller connects again and the commands outstanding
    /// on the old connection fail with [`IoError::Aborted`]; without, it is gone.
    pub fn reset(&self) -> Result<(), IoError> {
        self.shared.link.force(self.shared.link.generation())
    }

    /// The device is gone (back-end hung up, PCI function removed).
    pub fn is_gone(&self) -> bool {
        self.shared.health.is_broken()
    }

    /// I/O channels open on the controller.
    pub fn channels_open(&self) -> u64 {
        self.shared.queues.open_channels()
    }

    /// From now on no channel opens (the first step of a detach); refused, and nothing
    /// changed, while channels are open.
    pub fn stop_opening(&self) -> Result<(), BdevError> {
        self.shared.queues.check_idle(&self.shared.name)
    }

    /// Stop the device. Fails while channels are open.
    pub fn detach(mut self) -> Result<(), BdevError> {
        self.shared.queues.check_idle(&self.shared.name)?;
        self.shared.link.stop();
        self.stop_event_thread();
        for l in lock(&self.luns).iter() {
            l.bdev.mark_removed();
        }
        let mut t = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        t.shutdown().map_err(|source| BdevError::Virtio {
            name: self.shared.name.clone(),
            source,
        })
    }

    fn stop_event_thread(&mut self) {
        self.stop_events.store(true, Ordering::Release);
        if let Some(h) = self.event_thread.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ScsiController {
    fn drop(&mut self) {
        self.stop_event_thread();
        // A reconnection (or PCI device reset) under way ends before the controller
        // does: the transport's own shutdown (a PCI device reset, bus mastering off)
        // runs when its last holder lets go, not never because the process exited
        // while the reconnection thread held it.
        self.shared.link.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct LunDriver {
    shared: Arc<ScsiShared>,
    ctx: Arc<LunCtx>,
    name: String,
}

impl BdevDriver for LunDriver {
    fn open_channel(&self) -> Result<Box<dyn ChannelDriver>, BdevError> {
        open_channel(&self.shared, &self.ctx, &self.name)
    }

    fn open_exclusive_channel(&self) -> Result<Box<dyn ChannelDriver + Send>, BdevError> {
        io::open_exclusive_channel(&self.shared, &self.ctx, &self.name)
    }

    fn reset(&self, timeout: Duration) -> Result<(), IoError> {
        lun_reset(&self.shared, &self.ctx.lun, timeout)
    }

    fn reset_controller(&self) -> Result<(), IoError> {
        self.shared.link.force(self.shared.link.generation())
    }
}
