//! virtio-scsi driver (virtio 1.2 section 5.6): every target and LUN as a bdev.
//!
//! Queue 0 is the control queue (task management), queue 1 the event queue (hot-plug
//! and parameter changes), queues 2.. carry commands. Attach scans targets
//! `0..=max_target`; each disk LUN becomes a bdev named `<name>t<target>` (LUN 0) or
//! `<name>t<target>l<lun>`.

mod queue;
pub mod scan;
pub mod wire;

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vireo_scsi::{
    rw10_fits, ReadWrite10Cdb, ReadWrite16Cdb, RwFlags, SyncCache10Cdb, SyncCache16Cdb, UnmapCdb,
    WriteSame16Cdb, MAX_UNMAP_DESCRIPTORS_PER_LIST,
};
use vireo_virtio::features::scsi as sf;
use vireo_virtio::features::transport as tf;
use vireo_virtio::{
    create_queue, negotiate, DmaBuf, DmaMemory, QueueOptions, Segment, SplitQueue, Transport,
    COMMON_FEATURES,
};

use crate::bdev::{
    Bdev, BdevDriver, BdevInfo, ChannelDriver, Child, ChildDone, Limits, OpSupport, ScsiAddress,
};
use crate::error::{BdevError, IoError};
use crate::health::Health;
use crate::io::IoOp;
use crate::pool::QueuePool;
use queue::{Geometry, ScsiQueue};
pub use scan::LunInfo;
use scan::Scanner;
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
    /// Request queues to use.
    pub vq_count: u16,
    /// Descriptors per queue.
    pub vq_size: u16,
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

struct Shared {
    name: String,
    geo: Geometry,
    mem: Arc<DmaMemory>,
    health: Health,
    queues: QueuePool,
    max_segments: usize,
    /// The device's transfer size hint (`max_sectors`, 512-byte units; 0: none).
    max_sectors: u32,
    control: Mutex<Option<ControlQueue>>,
}

/// The control queue: task management functions, one at a time.
struct ControlQueue {
    q: SplitQueue,
    buf: DmaBuf,
}

/// One LUN's bdev and driver.
struct LunEntry {
    info: LunInfo,
    bdev: Arc<Bdev>,
    ctx: Arc<LunCtx>,
}

/// An attached virtio-scsi controller.
pub struct ScsiController {
    transport: Mutex<Box<dyn Transport>>,
    shared: Arc<Shared>,
    luns: Arc<Mutex<Vec<LunEntry>>>,
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
    /// Bring up the device, scan every target and LUN, and create the bdevs.
    pub fn attach(
        params: &ScsiParams,
        mut transport: Box<dyn Transport>,
    ) -> Result<ScsiController, BdevError> {
        let name = params.name.as_str();
        let verr = |source| BdevError::virtio(name, source);
        if !params.vq_size.is_power_of_two() || params.vq_size < 4 {
            return Err(BdevError::Config(format!(
                "controller {name}: vq_size {} must be a power of two of at least 4",
                params.vq_size
            )));
        }
        let wanted = COMMON_FEATURES | sf::HOTPLUG | sf::CHANGE;
        let features = negotiate(transport.as_mut(), wanted).map_err(verr)?;
        let mut raw = [0u8; wire::CONFIG_LEN];
        transport.read_config(0, &mut raw).map_err(verr)?;
        let cfg = ScsiConfig::parse(&raw).ok_or_else(|| bad(name, "short configuration"))?;
        let has = |f: u64| features & f != 0;
        if cfg.num_queues == 0 {
            return Err(bad(name, "num_queues is 0"));
        }
        let cdb_size = match cfg.cdb_size {
            0 => 32,
            n if n < 16 => {
                return Err(bad(
                    name,
                    format!("cdb_size {n} is below the 16 bytes READ(16) needs"),
                ))
            }
            n => n.min(32) as usize,
        };
        let sense_size = match cfg.sense_size {
            0 => 96,
            n => (n as usize).min(wire::MAX_SENSE),
        };
        let geo = Geometry::new(cdb_size, sense_size);
        let dev_queues = cfg.num_queues.min(u16::MAX as u32 - 2) as u16;
        let transport_queues = transport.max_queues().map_err(verr)?;
        let avail = match transport_queues {
            Some(n) => dev_queues.min(n.saturating_sub(2)),
            None => dev_queues,
        };
        if params.vq_count == 0 || params.vq_count > avail {
            return Err(BdevError::Unsatisfiable {
                name: name.to_string(),
                reason: format!(
                    "vq_count={} request queues asked for, but the device offers {avail}",
                    params.vq_count
                ),
            });
        }
        let mut vq_size = params.vq_size;
        if let Some(max) = transport.max_queue_size(2).map_err(verr)? {
            while vq_size > max && vq_size > 4 {
                vq_size /= 2;
            }
        }
        let seg_max = if cfg.seg_max == 0 {
            u32::MAX
        } else {
            cfg.seg_max
        };
        let ring_room = vq_size as u32 - 2;
        let max_segments = seg_max.min(ring_room).max(1) as usize;
        let indirect_max = if has(tf::RING_INDIRECT_DESC) {
            ((max_segments + 2) as u32).min(vq_size as u32) as u16
        } else {
            0
        };
        let opts = QueueOptions {
            event_idx: has(tf::RING_EVENT_IDX),
            indirect_max,
        };
        let mem = transport.memory().clone();
        let mk = |t: &mut Box<dyn Transport>, i: u16, size: u16, o: QueueOptions| {
            create_queue(t.as_mut(), i, size, o).map_err(|e| BdevError::queue_setup(name, size, e))
        };
        let small = vq_size.min(64);
        let plain = QueueOptions {
            event_idx: opts.event_idx,
            indirect_max: 0,
        };
        let control_q = mk(&mut transport, 0, small, plain)?;
        let mut event_q = mk(&mut transport, 1, small, plain)?;
        let mut queues = Vec::new();
        for i in 0..params.vq_count {
            queues.push(mk(&mut transport, 2 + i, vq_size, opts)?);
        }
        transport
            .start()
            .map_err(|e| BdevError::queue_setup(name, vq_size, e))?;

        // Event buffers, when the device may send events.
        let events = has(sf::HOTPLUG) || has(sf::CHANGE);
        let ev_size = (cfg.event_info_size as usize).clamp(16, 64);
        let mut ev_buf = mem
            .alloc(ev_size * EVENT_BUFFERS as usize, 64)
            .map_err(verr)?;
        ev_buf.as_mut_slice().fill(0);
        for i in 0..if events { EVENT_BUFFERS.min(small) } else { 0 } {
            let seg = Segment {
                addr: ev_buf.iova() + (i as usize * ev_size) as u64,
                len: ev_size as u32,
            };
            let _ = event_q.add(&[seg], 0, i as u64);
        }
        event_q.publish().map_err(verr)?;
        let control_buf = mem.alloc(64, 64).map_err(verr)?;

        let shared = Arc::new(Shared {
            name: name.to_string(),
            geo,
            mem: mem.clone(),
            health: Health::new(name, transport.broken_flag()),
            queues: QueuePool::new(queues),
            max_segments,
            max_sectors: cfg.max_sectors,
            control: Mutex::new(Some(ControlQueue {
                q: control_q,
                buf: control_buf,
            })),
        });

        // Scan.
        let max_target = cfg.max_target.min(MAX_TARGET);
        let found;
        {
            let q = shared.queues.take_for(name)?;
            let mut sq = ScsiQueue::new(&mem, q, geo).map_err(|e| BdevError::Io {
                name: name.to_string(),
                what: "allocate request slots".into(),
                source: e,
            })?;
            let mut scanner = Scanner {
                q: &mut sq,
                mem: &mem,
                broken: shared.health.broken_flag(),
            };
            let r = scan_all(&mut scanner, max_target, name);
            match r {
                Ok(v) => found = v,
                Err(e) => {
                    sq.leak();
                    return Err(e);
                }
            }
            shared.queues.give(sq.into_queue());
        }
        let mut luns = Vec::new();
        let mut skipped = Vec::new();
        for info in found {
            if info.device_type != 0 {
                skipped.push(info);
                continue;
            }
            luns.push(make_lun(&shared, info, params, vq_size));
        }
        tracing::info!(controller = %name, luns = luns.len(), skipped = skipped.len(), "virtio-scsi controller attached");
        let luns = Arc::new(Mutex::new(luns));
        let stop_events = Arc::new(AtomicBool::new(false));
        let event_thread = if events {
            let ctx = EventCtx {
                shared: shared.clone(),
                luns: luns.clone(),
                params: params.clone(),
                vq_size,
                max_target,
                ev_buf,
                ev_size,
                stop: stop_events.clone(),
            };
            Some(
                std::thread::Builder::new()
                    .name(format!("{name}-events"))
                    .spawn(move || event_loop(ctx, event_q))
                    .map_err(|e| BdevError::Config(format!("cannot start event thread: {e}")))?,
            )
        } else {
            // Nobody polls the event queue: keep its memory alive with the controller.
            std::mem::forget(event_q);
            std::mem::forget(ev_buf);
            None
        };
        Ok(ScsiController {
            transport: Mutex::new(transport),
            shared,
            luns,
            skipped,
            features,
            config: cfg,
            event_thread,
            stop_events,
            params: params.clone(),
        })
    }

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

    /// Stop the device. Fails while channels are open.
    pub fn detach(mut self) -> Result<(), BdevError> {
        self.shared.queues.check_idle(&self.shared.name)?;
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
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn scan_all(s: &mut Scanner<'_>, max_target: u16, name: &str) -> Result<Vec<LunInfo>, BdevError> {
    let mut found = Vec::new();
    for t in 0..=max_target {
        let t = t as u8;
        let luns = match s.report_luns(t) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(
                e @ (IoError::Disconnected | IoError::ControllerFailed(_) | IoError::Timeout(_)),
            ) => {
                return Err(BdevError::Io {
                    name: name.to_string(),
                    what: format!("scan target {t}"),
                    source: e,
                })
            }
            Err(e) => {
                tracing::warn!(controller = %name, target = t, "REPORT LUNS failed: {e}; skipping target");
                continue;
            }
        };
        for l in luns {
            match s.lun(t, l) {
                Ok(Some(info)) => found.push(info),
                Ok(None) => {}
                Err(
                    e
                    @ (IoError::Disconnected | IoError::ControllerFailed(_) | IoError::Timeout(_)),
                ) => {
                    return Err(BdevError::Io {
                        name: name.to_string(),
                        what: format!("scan target {t} LUN {l}"),
                        source: e,
                    })
                }
                Err(e) => {
                    tracing::warn!(controller = %name, target = t, lun = l, "LUN not usable: {e}");
                }
            }
        }
    }
    Ok(found)
}

fn make_lun(shared: &Arc<Shared>, info: LunInfo, params: &ScsiParams, vq_size: u16) -> LunEntry {
    let bs = info.block_size as u64;
    // Read/write: VPD B0 maximum transfer length, segments, and 65535 blocks for 10-byte
    // CDBs unless the LUN needs (and has) 16-byte ones.
    let mut max_rw = (shared.max_segments as u64 * SEGMENT_BYTES / bs).min(u32::MAX as u64);
    if let Some(mt) = info.limits.and_then(|l| l.max_transfer()) {
        max_rw = max_rw.min(mt as u64);
    }
    if shared.max_sectors != 0 {
        max_rw = max_rw.min(shared.max_sectors as u64 * 512 / bs);
    }
    if !info.rw16 {
        max_rw = max_rw.min(vireo_scsi::MAX_RW10_BLOCKS as u64);
    }
    let max_rw = max_rw.max(1);
    // UNMAP: at most 4095 descriptors of at most 2^32-1 blocks, further bounded by VPD B0.
    let (mut per_desc, mut max_desc, mut max_lbas) =
        (u32::MAX as u64, MAX_UNMAP_DESCRIPTORS_PER_LIST, u64::MAX);
    if let Some(bl) = info.limits {
        if bl.max_unmap_lba_count != 0 && bl.max_unmap_lba_count != u32::MAX {
            max_lbas = bl.max_unmap_lba_count as u64;
            per_desc = per_desc.min(max_lbas);
        }
        if bl.max_unmap_descriptor_count != 0 && bl.max_unmap_descriptor_count != u32::MAX {
            max_desc = max_desc.min(bl.max_unmap_descriptor_count as usize);
        }
    }
    let max_unmap = (per_desc * max_desc as u64).min(max_lbas);
    let lbprz = info.provisioning.map(|p| p.lbprz & 1 == 1).unwrap_or(false);
    let lbpws = info.provisioning.map(|p| p.lbpws).unwrap_or(false);
    let max_ws = info
        .limits
        .map(|l| l.max_write_same_length)
        .filter(|&n| n != 0)
        .unwrap_or(65535)
        .min(u32::MAX as u64);
    let name = lun_name(&shared.name, info.target, info.lun);
    let bdev_info = BdevInfo {
        name: name.clone(),
        controller: shared.name.clone(),
        driver: "virtio_scsi",
        block_size: info.block_size,
        num_blocks: info.num_blocks,
        read_only: info.read_only,
        ops: OpSupport {
            read: true,
            write: !info.read_only,
            flush: true,
            unmap: info.unmap && !info.read_only,
            write_zeroes: info.write_same && !info.read_only,
            reset: true,
        },
        limits: Limits {
            max_rw_blocks: max_rw,
            max_segments: shared.max_segments as u32,
            max_segment_bytes: SEGMENT_BYTES as u32,
            max_unmap_blocks: if info.unmap { max_unmap } else { 0 },
            max_unmap_segments: if info.unmap { max_desc as u32 } else { 0 },
            max_write_zeroes_blocks: if info.write_same { max_ws } else { 0 },
            optimal_io_blocks: info.limits.map(|l| l.optimal_transfer_length).unwrap_or(0),
            physical_block_size: info.physical_block_size,
        },
        num_queues: params.vq_count,
        queue_size: vq_size,
        serial: info.serial.clone(),
        device_id: info.device_id.clone(),
        vendor: Some(info.vendor.clone()),
        product: Some(info.product.clone()),
        scsi: Some(ScsiAddress {
            target: info.target,
            lun: info.lun,
        }),
    };
    let ctx = Arc::new(LunCtx {
        lun: lun_bytes(info.target, info.lun),
        block_size: info.block_size,
        rw16: info.rw16,
        unmap_per_desc: per_desc,
        unmap_max_desc: max_desc,
        write_same_unmap: lbprz && lbpws,
        num_blocks: AtomicU64::new(info.num_blocks),
    });
    let driver = Arc::new(LunDriver {
        shared: shared.clone(),
        ctx: ctx.clone(),
        name,
    });
    let bdev = Arc::new(Bdev::new(bdev_info, driver, shared.mem.clone()));
    LunEntry { info, bdev, ctx }
}

struct LunDriver {
    shared: Arc<Shared>,
    ctx: Arc<LunCtx>,
    name: String,
}

impl BdevDriver for LunDriver {
    fn open_channel(&self) -> Result<Box<dyn ChannelDriver>, BdevError> {
        if self.shared.health.is_failed() {
            return Err(BdevError::Failed(self.shared.name.clone()));
        }
        let tq = thread_queue(&self.shared, &self.name)?;
        let id = tq.borrow_mut().register(self.ctx.clone());
        self.shared.queues.opened();
        Ok(Box::new(ScsiChannel { tq, id }))
    }

    fn reset(&self, timeout: Duration) -> Result<(), IoError> {
        lun_reset(&self.shared, &self.ctx.lun, timeout)
    }
}

/// Send a LOGICAL UNIT RESET on the control queue and wait for its answer.
fn lun_reset(shared: &Shared, lun: &[u8; 8], timeout: Duration) -> Result<(), IoError> {
    const TMF: u32 = 0;
    const LOGICAL_UNIT_RESET: u32 = 5;
    let mut guard = lock(&shared.control);
    let Some(ctl) = guard.as_mut() else {
        return Err(IoError::ControllerFailed(
            "the control queue is unusable after an unanswered task management request".into(),
        ));
    };
    // Request: type, subtype, lun[8], tag (24 bytes); response: 1 byte at offset 32.
    let mut req = [0u8; 24];
    req[0..4].copy_from_slice(&TMF.to_le_bytes());
    req[4..8].copy_from_slice(&LOGICAL_UNIT_RESET.to_le_bytes());
    req[8..16].copy_from_slice(lun);
    let b = ctl.buf.as_mut_slice();
    b[..24].copy_from_slice(&req);
    b[32] = wire::response::UNSET;
    let base = ctl.buf.iova();
    let segs = [
        Segment {
            addr: base,
            len: 24,
        },
        Segment {
            addr: base + 32,
            len: 1,
        },
    ];
    ctl.q
        .add(&segs, 1, 0)
        .map_err(|_| IoError::ControllerFailed("control queue full".into()))?;
    ctl.q
        .publish()
        .map_err(|e| IoError::ControllerFailed(e.to_string()))?;
    let start = Instant::now();
    loop {
        let mut got = false;
        ctl.q
            .poll(|_| got = true)
            .map_err(|e| IoError::ControllerFailed(e.to_string()))?;
        if got {
            let r = ctl.buf.as_slice()[32];
            return match r {
                wire::response::OK | wire::response::FUNCTION_SUCCEEDED => Ok(()),
                other => Err(IoError::Scsi(format!(
                    "LOGICAL UNIT RESET answered {}",
                    wire::response_name(other)
                ))),
            };
        }
        if shared.health.is_broken() {
            return Err(IoError::Disconnected);
        }
        if start.elapsed() > timeout {
            // The device still owns the request: never reuse or free this queue.
            if let Some(c) = guard.take() {
                std::mem::forget(c);
            }
            return Err(IoError::Timeout(format!(
                "LOGICAL UNIT RESET (no answer within {} ms; some targets never answer task management)",
                timeout.as_millis()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A channel's state inside its thread queue.
struct ChanState {
    ctx: Arc<LunCtx>,
    outbox: Vec<ChildDone>,
    in_flight: usize,
}

/// One request queue of a virtio-scsi controller, used by every LUN channel of one
/// thread (so a controller with a single request queue still serves all its LUNs).
struct ThreadQueue {
    sq: Option<ScsiQueue>,
    shared: Arc<Shared>,
    chans: Vec<Option<ChanState>>,
    /// The command in each slot: (channel id, request).
    slot_child: Vec<Option<(u32, Child)>>,
    slot_tries: Vec<u8>,
    slot_unmap: Vec<Option<DmaBuf>>,
    unmap_pool: Vec<DmaBuf>,
    zero: Option<DmaBuf>,
    data_segs: Vec<Segment>,
    used: Vec<vireo_virtio::Used>,
    retry: Vec<u16>,
    failed: Option<IoError>,
    idle_polls: u32,
    leak: bool,
}

impl ThreadQueue {
    fn register(&mut self, ctx: Arc<LunCtx>) -> u32 {
        let st = ChanState {
            ctx,
            outbox: Vec::new(),
            in_flight: 0,
        };
        if let Some(i) = self.chans.iter().position(Option::is_none) {
            self.chans[i] = Some(st);
            return i as u32;
        }
        self.chans.push(Some(st));
        (self.chans.len() - 1) as u32
    }

    /// Hand a finished command to its channel.
    fn deliver(&mut self, chan: u32, d: ChildDone) {
        if let Some(Some(c)) = self.chans.get_mut(chan as usize) {
            c.in_flight = c.in_flight.saturating_sub(1);
            c.outbox.push(d);
        }
    }

    fn fail_all(&mut self, e: IoError) {
        if self.failed.is_some() {
            return;
        }
        if !matches!(e, IoError::Disconnected) {
            self.shared.health.fail(&e.to_string());
            self.leak = true;
        }
        let taken: Vec<(u32, Child)> = self
            .slot_child
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for (chan, c) in taken {
            self.deliver(
                chan,
                ChildDone {
                    parent: c.parent,
                    result: Err(e.clone()),
                },
            );
        }
        self.failed = Some(e);
    }

    /// Build and queue the command of `c` (from channel `chan`) in `slot`.
    fn issue(&mut self, chan: u32, slot: u16, c: &Child) -> Result<(), IssueError> {
        // A copy of the LUN's parameters (no reference count traffic per I/O).
        let ctx = match self.chans.get(chan as usize) {
            Some(Some(st)) => LunParams::of(&st.ctx),
            _ => return Err(IoError::InvalidRequest("unknown channel".into()).into()),
        };
        let bs = ctx.block_size as u64;
        let cdb;
        let mut out_segs: [Segment; 1] = [Segment { addr: 0, len: 0 }];
        let mut n_out = 0usize;
        let mut data_in = false;
        match c.op {
            IoOp::Read | IoOp::Write => {
                let flags = RwFlags::default();
                cdb = if rw10_fits(c.lba, c.blocks) {
                    let x = ReadWrite10Cdb::new(c.lba, c.blocks, flags)
                        .map_err(|e| IoError::InvalidRequest(e.to_string()))?;
                    if c.op == IoOp::Read {
                        x.read_cdb()
                    } else {
                        x.write_cdb()
                    }
                } else if ctx.rw16 {
                    let x = ReadWrite16Cdb::new(c.lba, c.blocks, flags)
                        .map_err(|e| IoError::InvalidRequest(e.to_string()))?;
                    if c.op == IoOp::Read {
                        x.read_cdb()
                    } else {
                        x.write_cdb()
                    }
                } else {
                    return Err(IoError::InvalidRequest(format!(
                        "LBA {} / {} blocks need READ/WRITE(16), which the LUN lacks",
                        c.lba, c.blocks
                    ))
                    .into());
                };
                data_in = c.op == IoOp::Read;
            }
            IoOp::Flush => {
                let n = ctx.num_blocks;
                cdb = if n <= u32::MAX as u64 + 1 {
                    SyncCache10Cdb {
                        immed: false,
                        lba: 0,
                        blocks: 0,
                    }
                    .to_cdb()
                } else {
                    SyncCache16Cdb {
                        immed: false,
                        lba: 0,
                        blocks: 0,
                    }
                    .to_cdb()
                };
            }
            IoOp::Unmap => {
                let mut buf = match self.slot_unmap[slot as usize].take() {
                    Some(b) => b,
                    None => match self.unmap_pool.pop() {
                        Some(b) => b,
                        None => self
                            .shared
                            .mem
                            .alloc(UNMAP_LIST_BYTES, 4096)
                            .map_err(|e| IoError::NoMemory(e.to_string()))?,
                    },
                };
                let len = {
                    let mut w = vireo_scsi::UnmapListWriter::new(buf.as_mut_slice())
                        .map_err(|e| IoError::InvalidRequest(e.to_string()))?;
                    let (mut lba, mut left) = (c.lba, c.blocks);
                    let mut n = 0usize;
                    while left > 0 {
                        let k = left.min(ctx.unmap_per_desc);
                        w.push(lba, k)
                            .map_err(|e| IoError::InvalidRequest(e.to_string()))?;
                        lba += k;
                        left -= k;
                        n += 1;
                        if n > ctx.unmap_max_desc {
                            return Err(IoError::InvalidRequest(format!(
                                "unmap of {} blocks needs more than {} descriptors",
                                c.blocks, ctx.unmap_max_desc
                            ))
                            .into());
                        }
                    }
                    w.finish()
                };
                cdb = UnmapCdb {
                    anchor: false,
                    param_len: len,
                }
                .to_cdb();
                out_segs[0] = Segment {
                    addr: buf.iova(),
                    len: len as u32,
                };
                n_out = 1;
                self.slot_unmap[slot as usize] = Some(buf);
            }
            IoOp::WriteZeroes => {
                if self.zero.as_ref().is_some_and(|z| (z.len() as u64) < bs) {
                    self.zero = None;
                }
                if self.zero.is_none() {
                    let mut z = self
                        .shared
                        .mem
                        .alloc(bs as usize, 4096)
                        .map_err(|e| IoError::NoMemory(e.to_string()))?;
                    z.as_mut_slice().fill(0);
                    self.zero = Some(z);
                }
                let z = self.zero.as_ref().map_or(0, |z| z.iova());
                cdb = WriteSame16Cdb {
                    lba: c.lba,
                    blocks: u32::try_from(c.blocks).map_err(|_| {
                        IoError::InvalidRequest("WRITE SAME of more than 2^32-1 blocks".into())
                    })?,
                    unmap: ctx.write_same_unmap,
                    anchor: false,
                    ndob: false,
                    protect: 0,
                }
                .to_cdb();
                out_segs[0] = Segment {
                    addr: z,
                    len: bs as u32,
                };
                n_out = 1;
            }
        }
        let sq = self.sq.as_mut().ok_or(IoError::Disconnected)?;
        sq.prepare(slot, &ctx.lun, slot as u64, cdb.as_bytes());
        // Data segments of reads and writes.
        let mut data = std::mem::take(&mut self.data_segs);
        data.clear();
        if c.op.has_data() {
            let (mut addr, mut left) = (c.addr, c.len as u64);
            while left > 0 {
                let k = left.min(SEGMENT_BYTES);
                data.push(Segment {
                    addr,
                    len: k as u32,
                });
                addr += k;
                left -= k;
            }
        }
        let r = match (c.op, data_in) {
            (IoOp::Read, _) => sq.add(slot, &[], &data),
            (IoOp::Write, _) => sq.add(slot, &data, &[]),
            _ => sq.add(slot, &out_segs[..n_out], &[]),
        };
        self.data_segs = data;
        r.map_err(|()| IssueError::RingFull)
    }

    fn queue(&mut self, chan: u32, c: Child) -> Result<(), Child> {
        if let Some(e) = self.failed.clone() {
            if let Some(Some(st)) = self.chans.get_mut(chan as usize) {
                st.outbox.push(ChildDone {
                    parent: c.parent,
                    result: Err(e),
                });
            }
            return Ok(());
        }
        let Some(sq) = self.sq.as_mut() else {
            return Err(c);
        };
        let Some(slot) = sq.free.pop() else {
            return Err(c);
        };
        match self.issue(chan, slot, &c) {
            Ok(()) => {
                self.slot_child[slot as usize] = Some((chan, c));
                self.slot_tries[slot as usize] = 0;
                if let Some(Some(st)) = self.chans.get_mut(chan as usize) {
                    st.in_flight += 1;
                }
                Ok(())
            }
            Err(IssueError::RingFull) => {
                if let Some(sq) = self.sq.as_mut() {
                    sq.free.push(slot);
                }
                Err(c)
            }
            Err(IssueError::Failed(e)) => {
                if let Some(sq) = self.sq.as_mut() {
                    sq.free.push(slot);
                }
                if let Some(Some(st)) = self.chans.get_mut(chan as usize) {
                    st.outbox.push(ChildDone {
                        parent: c.parent,
                        result: Err(e),
                    });
                }
                Ok(())
            }
        }
    }

    fn publish(&mut self) {
        if self.failed.is_some() {
            return;
        }
        if let Some(sq) = self.sq.as_mut() {
            if let Err(e) = sq.q.publish() {
                self.fail_all(IoError::ControllerFailed(e.to_string()));
            }
        }
    }

    /// Reap the queue's completions into the channels' outboxes.
    fn poll_all(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let Some(sq) = self.sq.as_mut() else {
            return;
        };
        if !sq.q.has_used() {
            self.idle_polls = self.idle_polls.wrapping_add(1);
            if self.idle_polls.is_multiple_of(256)
                && sq.q.in_flight() > 0
                && self.shared.health.is_broken()
            {
                self.fail_all(IoError::Disconnected);
            }
            return;
        }
        let mut used = std::mem::take(&mut self.used);
        used.clear();
        let r = sq.q.poll(|u| used.push(u));
        let mut fatal: Option<IoError> = None;
        let mut retry = std::mem::take(&mut self.retry);
        retry.clear();
        for u in &used {
            let slot = u.token as u16;
            let Some((chan, c)) = self.slot_child.get(slot as usize).copied().flatten() else {
                continue;
            };
            let Some(sq) = self.sq.as_ref() else { break };
            let resp = sq.response(slot);
            let len = if c.op.has_data() { c.len } else { 0 };
            let result = match evaluate(&resp, len, false) {
                Outcome::Done { .. } => Ok(()),
                Outcome::Retry(why) => {
                    if self.slot_tries[slot as usize] < MAX_RETRIES {
                        retry.push(slot);
                        continue;
                    }
                    Err(IoError::Scsi(format!(
                        "gave up after {MAX_RETRIES} retries: {why}"
                    )))
                }
                Outcome::Check(s) => {
                    if sense_is_retryable(&s) && self.slot_tries[slot as usize] < MAX_RETRIES {
                        retry.push(slot);
                        continue;
                    }
                    Err(sense_error(&s))
                }
                Outcome::Fail(e) => {
                    if matches!(e, IoError::ControllerFailed(_)) {
                        fatal.get_or_insert(e.clone());
                    }
                    Err(e)
                }
            };
            self.slot_child[slot as usize] = None;
            if let Some(b) = self.slot_unmap[slot as usize].take() {
                self.unmap_pool.push(b);
            }
            if let Some(sq) = self.sq.as_mut() {
                sq.free.push(slot);
            }
            self.deliver(
                chan,
                ChildDone {
                    parent: c.parent,
                    result,
                },
            );
        }
        self.used = used;
        // Retries reuse their slot; the ring has room since their chains were freed.
        for &slot in &retry {
            self.slot_tries[slot as usize] += 1;
            let Some((chan, c)) = self.slot_child[slot as usize] else {
                continue;
            };
            if let Err(e) = self.issue(chan, slot, &c) {
                // The retried chain was just freed, so the ring has room for it again.
                let e = match e {
                    IssueError::Failed(e) => e,
                    IssueError::RingFull => {
                        IoError::ControllerFailed("no ring space to retry a command".into())
                    }
                };
                self.slot_child[slot as usize] = None;
                if let Some(sq) = self.sq.as_mut() {
                    sq.free.push(slot);
                }
                self.deliver(
                    chan,
                    ChildDone {
                        parent: c.parent,
                        result: Err(e),
                    },
                );
            }
        }
        let retried = !retry.is_empty();
        self.retry = retry;
        if retried {
            // Nobody else publishes on behalf of a retry.
            self.publish();
        }
        if let Err(e) = r {
            self.fail_all(IoError::ControllerFailed(e.to_string()));
        } else if let Some(e) = fatal {
            self.fail_all(e);
        }
    }
}

impl Drop for ThreadQueue {
    fn drop(&mut self) {
        let Some(sq) = self.sq.take() else { return };
        if self.leak || sq.q.in_flight() > 0 || self.failed.is_some() {
            if self.failed.is_none() || self.leak {
                // The device may still use this ring and these buffers.
                sq.leak();
                for b in self.slot_unmap.iter_mut().filter_map(Option::take) {
                    std::mem::forget(b);
                }
                std::mem::forget(self.zero.take());
            }
            return;
        }
        self.shared.queues.give(sq.into_queue());
    }
}

/// Why a command did not go on the ring.
enum IssueError {
    /// No room now: the command waits in its channel.
    RingFull,
    /// The command cannot be sent at all.
    Failed(IoError),
}

impl From<IoError> for IssueError {
    fn from(e: IoError) -> Self {
        IssueError::Failed(e)
    }
}

/// A LUN channel: a handle on its thread's queue of the controller.
struct ScsiChannel {
    tq: Rc<RefCell<ThreadQueue>>,
    id: u32,
}

impl ChannelDriver for ScsiChannel {
    fn queue(&mut self, c: Child) -> Result<(), Child> {
        self.tq.borrow_mut().queue(self.id, c)
    }

    fn publish(&mut self) {
        self.tq.borrow_mut().publish();
    }

    fn poll(&mut self, out: &mut Vec<ChildDone>) -> usize {
        let mut tq = self.tq.borrow_mut();
        tq.poll_all();
        match tq.chans.get_mut(self.id as usize) {
            Some(Some(st)) => {
                let n = st.outbox.len();
                out.append(&mut st.outbox);
                n
            }
            _ => 0,
        }
    }

    fn in_flight(&self) -> usize {
        let tq = self.tq.borrow();
        if tq.failed.is_some() {
            return 0;
        }
        match tq.chans.get(self.id as usize) {
            Some(Some(st)) => st.in_flight,
            _ => 0,
        }
    }
}

impl Drop for ScsiChannel {
    fn drop(&mut self) {
        let mut tq = self.tq.borrow_mut();
        tq.shared.queues.closed();
        if let Some(slot) = tq.chans.get_mut(self.id as usize) {
            *slot = None;
        }
    }
}

thread_local! {
    /// This thread's queue of each controller, shared by its LUN channels.
    static THREAD_QUEUES: RefCell<Vec<(usize, Weak<RefCell<ThreadQueue>>)>> =
        const { RefCell::new(Vec::new()) };
}

/// The calling thread's queue of the controller: shared if one is open, else a free
/// queue of the controller's pool.
fn thread_queue(shared: &Arc<Shared>, bdev: &str) -> Result<Rc<RefCell<ThreadQueue>>, BdevError> {
    let key = Arc::as_ptr(shared) as usize;
    let existing = THREAD_QUEUES.with(|t| {
        let mut t = t.borrow_mut();
        t.retain(|(_, w)| w.strong_count() > 0);
        t.iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
    });
    if let Some(tq) = existing {
        return Ok(tq);
    }
    let q = shared.queues.take_for(bdev)?;
    let n = q.size() as usize;
    let sq = ScsiQueue::new(&shared.mem, q, shared.geo).map_err(|e| BdevError::Io {
        name: shared.name.clone(),
        what: "allocate request slots".into(),
        source: e,
    })?;
    let tq = Rc::new(RefCell::new(ThreadQueue {
        sq: Some(sq),
        shared: shared.clone(),
        chans: Vec::new(),
        slot_child: vec![None; n],
        slot_tries: vec![0; n],
        slot_unmap: (0..n).map(|_| None).collect(),
        unmap_pool: Vec::new(),
        zero: None,
        data_segs: Vec::new(),
        used: Vec::with_capacity(n),
        retry: Vec::new(),
        failed: None,
        idle_polls: 0,
        leak: false,
    }));
    THREAD_QUEUES.with(|t| t.borrow_mut().push((key, Rc::downgrade(&tq))));
    Ok(tq)
}

/// What the event thread needs.
struct EventCtx {
    shared: Arc<Shared>,
    luns: Arc<Mutex<Vec<LunEntry>>>,
    params: ScsiParams,
    vq_size: u16,
    max_target: u16,
    ev_buf: DmaBuf,
    ev_size: usize,
    stop: Arc<AtomicBool>,
}

/// Poll the event queue; apply hot-plug and parameter-change events.
fn event_loop(ctx: EventCtx, mut q: SplitQueue) {
    let mut deferred: Vec<wire::Event> = Vec::new();
    while !ctx.stop.load(Ordering::Acquire) {
        if ctx.shared.health.is_broken() || ctx.shared.health.is_failed() {
            break;
        }
        let mut got = Vec::new();
        if let Err(e) = q.poll(|u| got.push(u)) {
            ctx.shared.health.fail(&format!("event queue: {e}"));
            break;
        }
        // Events that needed a request queue while every queue was held by a channel
        // are tried again until one is free.
        deferred.retain(|ev| !handle_event(&ctx, *ev));
        for u in got {
            let i = u.token as usize;
            let off = i * ctx.ev_size;
            let ev = wire::Event::parse(&ctx.ev_buf.as_slice()[off..off + ctx.ev_size]);
            if let Some(ev) = ev {
                if !handle_event(&ctx, ev) {
                    tracing::info!(controller = %ctx.shared.name, "every request queue is held by a channel; the event waits for a free one");
                    deferred.push(ev);
                }
            }
            // Give the buffer back to the device.
            let seg = Segment {
                addr: ctx.ev_buf.iova() + off as u64,
                len: ctx.ev_size as u32,
            };
            let _ = q.add(&[seg], 0, u.token);
        }
        let _ = q.publish();
        std::thread::sleep(Duration::from_millis(5));
    }
    // The device may still hold the event buffers.
    std::mem::forget(q);
    std::mem::forget(ctx.ev_buf);
}

/// A free request queue for control-path commands, if there is one now.
fn borrow_queue(shared: &Shared) -> Option<ScsiQueue> {
    let q = shared.queues.take()?;
    ScsiQueue::new(&shared.mem, q, shared.geo).ok()
}

/// Apply one event; `false` when it needs a request queue and none is free.
fn handle_event(ctx: &EventCtx, ev: wire::Event) -> bool {
    use wire::event::*;
    let missed = ev.event & EVENTS_MISSED != 0;
    let code = ev.event & !EVENTS_MISSED;
    tracing::info!(controller = %ctx.shared.name, event = code, reason = ev.reason, missed, lun = ?ev.address(), "virtio-scsi event");
    if missed && !rescan_all(ctx) {
        return false;
    }
    let Some((t, l)) = ev.address() else {
        return true;
    };
    match (code, ev.reason) {
        (TRANSPORT_RESET, REASON_REMOVED) => {
            remove_lun(ctx, t, l);
            true
        }
        (TRANSPORT_RESET, REASON_RESCAN) => add_lun(ctx, t, l),
        // Capacity data changed (2A/09) or anything else: re-read capacity.
        (PARAM_CHANGE, _) => refresh_capacity(ctx, t, l),
        _ => true,
    }
}

fn with_scanner<R>(ctx: &EventCtx, f: impl FnOnce(&mut Scanner<'_>) -> R) -> Option<R> {
    let mut sq = borrow_queue(&ctx.shared)?;
    let r = {
        let mut s = Scanner {
            q: &mut sq,
            mem: &ctx.shared.mem,
            broken: ctx.shared.health.broken_flag(),
        };
        f(&mut s)
    };
    if sq.q.in_flight() > 0 {
        sq.leak();
    } else {
        ctx.shared.queues.give(sq.into_queue());
    }
    Some(r)
}

fn add_lun(ctx: &EventCtx, t: u8, l: u16) -> bool {
    if lock(&ctx.luns)
        .iter()
        .any(|e| e.info.target == t && e.info.lun == l)
    {
        return true;
    }
    let Some(r) = with_scanner(ctx, |s| s.lun(t, l)) else {
        return false;
    };
    match r {
        Ok(Some(info)) if info.device_type == 0 => {
            let entry = make_lun(&ctx.shared, info, &ctx.params, ctx.vq_size);
            tracing::info!(bdev = %entry.bdev.name(), "LUN added");
            lock(&ctx.luns).push(entry);
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(controller = %ctx.shared.name, target = t, lun = l, "hot-added LUN not usable: {e}")
        }
    }
    true
}

fn remove_lun(ctx: &EventCtx, t: u8, l: u16) {
    let mut luns = lock(&ctx.luns);
    if let Some(pos) = luns
        .iter()
        .position(|e| e.info.target == t && e.info.lun == l)
    {
        let e = luns.remove(pos);
        e.bdev.mark_removed();
        tracing::info!(bdev = %e.bdev.name(), "LUN removed");
    }
}

fn refresh_capacity(ctx: &EventCtx, t: u8, l: u16) -> bool {
    let Some(r) = with_scanner(ctx, |s| s.lun(t, l)) else {
        return false;
    };
    let Ok(Some(info)) = r else {
        return true;
    };
    let luns = lock(&ctx.luns);
    if let Some(e) = luns.iter().find(|e| e.info.target == t && e.info.lun == l) {
        e.ctx.num_blocks.store(info.num_blocks, Ordering::Relaxed);
        e.bdev.set_num_blocks(info.num_blocks);
        tracing::info!(bdev = %e.bdev.name(), blocks = info.num_blocks, "capacity changed");
    }
    true
}

fn rescan_all(ctx: &EventCtx) -> bool {
    let name = ctx.shared.name.clone();
    let Some(r) = with_scanner(ctx, |s| scan_all(s, ctx.max_target, &name)) else {
        return false;
    };
    let Ok(found) = r else { return true };
    let mut luns = lock(&ctx.luns);
    luns.retain(|e| {
        let keep = found
            .iter()
            .any(|f| f.target == e.info.target && f.lun == e.info.lun);
        if !keep {
            e.bdev.mark_removed();
        }
        keep
    });
    for info in found {
        if info.device_type != 0
            || luns
                .iter()
                .any(|e| e.info.target == info.target && e.info.lun == info.lun)
        {
            continue;
        }
        luns.push(make_lun(&ctx.shared, info, &ctx.params, ctx.vq_size));
    }
    true
}
