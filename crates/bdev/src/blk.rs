//! virtio-blk driver (virtio 1.2 section 5.2).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::mem::offset_of;
use vireo_virtio::features::blk as bf;
use vireo_virtio::features::transport as tf;
use vireo_virtio::wire::blk::{
    Range, ReqHeader, RequestSlot, ID_BYTES, SLOT_RANGES, S_IOERR, S_OK, S_UNSET, S_UNSUPP,
    T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES, WRITE_ZEROES_FLAG_UNMAP,
};
use vireo_virtio::{
    create_queue, negotiate, DmaMemory, QueueFailure, QueueOptions, RequestQueue, Segment,
    SplitQueue, Transport, COMMON_FEATURES,
};

use crate::bdev::{Bdev, BdevInfo, Limits, OpSupport};
use crate::driver::{BdevDriver, ChannelDriver, Child, ChildDone};
use crate::error::{BdevError, IoError};
use crate::health::Health;
use crate::io::IoOp;
use crate::link::{self, HasHealth, Link, LinkView, RedoCtx, RedoError, Renewed};
use crate::pool::{check_queue_params, QueuePool};

/// Ranges per discard / write-zeroes request we are prepared to send.
const MAX_RANGE_SEGS: u32 = SLOT_RANGES as u32;
const SECTOR: u64 = 512;
/// Bytes of `struct virtio_blk_config` vireo reads (through `write_zeroes_may_unmap`).
const CONFIG_LEN: usize = 60;

/// Parsed `struct virtio_blk_config`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment in bytes (SIZE_MAX).
    pub size_max: u32,
    /// Largest number of data segments (SEG_MAX).
    pub seg_max: u32,
    /// Logical block size (BLK_SIZE).
    pub blk_size: u32,
    /// log2(physical block / logical block) (TOPOLOGY).
    pub physical_block_exp: u8,
    /// Suggested minimum I/O size in blocks (TOPOLOGY).
    pub min_io_size: u16,
    /// Optimal I/O size in blocks (TOPOLOGY).
    pub opt_io_size: u32,
    /// Request queues (MQ).
    pub num_queues: u16,
    /// Largest discard in sectors per segment (DISCARD).
    pub max_discard_sectors: u32,
    /// Largest number of discard segments (DISCARD).
    pub max_discard_seg: u32,
    /// Discard alignment in sectors (DISCARD).
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors per segment (WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Largest number of write-zeroes segments (WRITE_ZEROES).
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may deallocate (WRITE_ZEROES).
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    /// Parse the first 60 bytes of the device configuration.
    pub fn parse(b: &[u8]) -> Option<BlkConfig> {
        if b.len() < CONFIG_LEN {
            return None;
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        Some(BlkConfig {
            capacity: u64_at(0),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56] != 0,
        })
    }
}

/// Parameters of a virtio-blk controller.
#[derive(Debug, Clone)]
pub struct BlkParams {
    /// Controller (and bdev) name.
    pub name: String,
    /// Request queues to use.
    pub vq_count: u16,
    /// Descriptors per queue (a power of two).
    pub vq_size: u16,
    /// How long I/O waits while vireo reconnects to a back-end that went away
    /// (vhost-user); `None`: no reconnection, I/O fails at once.
    pub reconnect_timeout: Option<Duration>,
}

/// What channels need to know, fixed at attach time.
#[derive(Debug)]
struct Shared {
    name: String,
    sectors_per_block: u64,
    max_segments: usize,
    segment_bytes: u64,
    range_sectors_unmap: u64,
    range_sectors_wz: u64,
    /// Flags of write-zeroes ranges: UNMAP only where the device said it may
    /// deallocate (`write_zeroes_may_unmap`); elsewhere the flag means nothing.
    write_zeroes_flags: u32,
    mem: Arc<DmaMemory>,
    health: Health,
    queues: QueuePool,
    link: Arc<Link>,
}

impl HasHealth for Shared {
    fn health(&self) -> &Health {
        &self.health
    }
    fn pool(&self) -> &QueuePool {
        &self.queues
    }
}

/// An attached virtio-blk controller; serves one bdev.
pub struct BlkController {
    transport: Arc<Mutex<Box<dyn Transport>>>,
    shared: Arc<Shared>,
    bdev: Arc<Bdev>,
    features: u64,
    config: BlkConfig,
}

impl std::fmt::Debug for BlkController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkController")
            .field("name", &self.shared.name)
            .field("features", &format_args!("{:#x}", self.features))
            .field("config", &self.config)
            .finish()
    }
}

struct Driver(Arc<Shared>);

impl BdevDriver for Driver {
    fn open_channel(&self) -> Result<Box<dyn ChannelDriver>, BdevError> {
        self.0.link.wait_reconnected();
        if self.0.health.is_failed() {
            return Err(BdevError::Failed(self.0.name.clone()));
        }
        let q = self.0.queues.take_for(&self.0.name)?;
        let ch = BlkChannel::new(self.0.clone(), q).map_err(|e| BdevError::Io {
            name: self.0.name.clone(),
            what: "allocate request slots".into(),
            source: e,
        })?;
        Ok(Box::new(ch))
    }

    fn reset_controller(&self) -> Result<(), IoError> {
        self.0.link.force(self.0.link.generation())
    }
}

fn bad(name: &str, reason: impl Into<String>) -> BdevError {
    BdevError::BadDevice {
        name: name.to_string(),
        reason: reason.into(),
    }
}

impl BlkController {
    /// Bring up the device behind `transport` and create its bdev.
    pub fn attach(
        params: &BlkParams,
        mut transport: Box<dyn Transport>,
    ) -> Result<BlkController, BdevError> {
        let name = params.name.as_str();
        let verr = |source| BdevError::virtio(name, source);
        check_queue_params(name, params.vq_count, params.vq_size)?;
        let wanted = COMMON_FEATURES
            | bf::SIZE_MAX
            | bf::SEG_MAX
            | bf::BLK_SIZE
            | bf::TOPOLOGY
            | bf::FLUSH
            | bf::MQ
            | bf::DISCARD
            | bf::WRITE_ZEROES
            | bf::RO;
        let features = negotiate(transport.as_mut(), wanted).map_err(verr)?;
        let mut raw = [0u8; CONFIG_LEN];
        transport.read_config(0, &mut raw).map_err(verr)?;
        let cfg = BlkConfig::parse(&raw).ok_or_else(|| bad(name, "short configuration"))?;
        let has = |f: u64| features & f != 0;

        let block_size = if has(bf::BLK_SIZE) { cfg.blk_size } else { 512 };
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(bad(
                name,
                format!("blk_size {block_size} is not a power of two between 512 and 65536"),
            ));
        }
        let sectors_per_block = block_size as u64 / SECTOR;
        let num_blocks = cfg.capacity / sectors_per_block;

        // Queues.
        let dev_queues = if has(bf::MQ) {
            cfg.num_queues.max(1)
        } else {
            1
        };
        let transport_queues = transport.max_queues().map_err(verr)?.unwrap_or(u16::MAX);
        let avail = dev_queues.min(transport_queues);
        if params.vq_count > avail {
            return Err(BdevError::Unsatisfiable {
                name: name.to_string(),
                reason: format!(
                    "vq_count={} request queues asked for, but the device offers {avail} (num_queues {}, MQ {}, back-end queues {})",
                    params.vq_count,
                    cfg.num_queues,
                    if has(bf::MQ) { "negotiated" } else { "not offered" },
                    if transport_queues == u16::MAX { "unknown".to_string() } else { transport_queues.to_string() },
                ),
            });
        }
        let mut vq_size = params.vq_size;
        if let Some(max) = transport.max_queue_size(0).map_err(verr)? {
            if max == 0 {
                return Err(bad(name, "queue 0 has size 0"));
            }
            while vq_size > max {
                vq_size /= 2;
            }
        }

        // Per-request segment limits.
        let seg_max = if has(bf::SEG_MAX) { cfg.seg_max } else { 1 };
        if seg_max == 0 {
            return Err(bad(name, "seg_max is 0"));
        }
        let indirect = has(tf::RING_INDIRECT_DESC);
        let ring_room = vq_size as u32 - 2;
        let max_segments = seg_max.min(ring_room).max(1) as usize;
        let indirect_max = if indirect {
            ((max_segments + 2) as u32).min(vq_size as u32) as u16
        } else {
            0
        };
        // A size_max of 0 (offered but unset, as some targets do) means no limit.
        let segment_bytes: u64 = if has(bf::SIZE_MAX) && cfg.size_max != 0 {
            cfg.size_max as u64
        } else {
            1 << 22
        };
        let max_rw_bytes = (max_segments as u64 * segment_bytes).min(u32::MAX as u64);
        let max_rw_blocks = max_rw_bytes / block_size as u64;
        if max_rw_blocks == 0 {
            return Err(bad(
                name,
                format!("seg_max {seg_max} x size_max {segment_bytes} is less than one {block_size}-byte block"),
            ));
        }
        let range = |max_sectors: u32, max_seg: u32| -> (u64, u32, u64) {
            let per_seg = if max_sectors == 0 {
                u32::MAX
            } else {
                max_sectors
            } as u64;
            let per_seg = per_seg / sectors_per_block * sectors_per_block;
            let segs = max_seg.clamp(1, MAX_RANGE_SEGS);
            (per_seg, segs, per_seg / sectors_per_block * segs as u64)
        };
        let (unmap_sectors, unmap_segs, max_unmap_blocks) =
            range(cfg.max_discard_sectors, cfg.max_discard_seg);
        let (wz_sectors, _, max_wz_blocks) =
            range(cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg);
        let discard = has(bf::DISCARD) && max_unmap_blocks > 0;
        let write_zeroes = has(bf::WRITE_ZEROES) && max_wz_blocks > 0;
        let read_only = has(bf::RO);

        let opts = QueueOptions {
            event_idx: has(tf::RING_EVENT_IDX),
            indirect_max,
        };
        let mem = transport.memory().clone();
        // In-flight tracking by the back-end, for reconnections (INFLIGHT_SHMFD).
        let inflight = if params.reconnect_timeout.is_some() {
            transport
                .get_inflight(params.vq_count, vq_size)
                .map_err(verr)?
        } else {
            None
        };
        let mut queues = Vec::new();
        for i in 0..params.vq_count {
            queues.push(
                create_queue(transport.as_mut(), i, vq_size, opts)
                    .map_err(|e| BdevError::queue_setup(name, vq_size, e))?,
            );
        }
        transport
            .start()
            .map_err(|e| BdevError::queue_setup(name, vq_size, e))?;

        let layouts: Vec<_> = queues.iter().map(|q| q.layout()).collect();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            sectors_per_block,
            max_segments,
            segment_bytes,
            range_sectors_unmap: unmap_sectors,
            range_sectors_wz: wz_sectors,
            write_zeroes_flags: if cfg.write_zeroes_may_unmap {
                WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            },
            mem: mem.clone(),
            health: Health::new(name, transport.broken_flag()),
            queues: QueuePool::new(queues),
            link: Link::new(name, params.reconnect_timeout),
        });
        let driver = Driver(shared.clone());

        // The serial number (GET_ID); a device that does not support it is fine.
        let serial = {
            let q = shared.queues.take_for(name)?;
            let mut ch = BlkChannel::new(shared.clone(), q).map_err(|e| BdevError::Io {
                name: name.to_string(),
                what: "allocate request slots".into(),
                source: e,
            })?;
            ch.get_id(Duration::from_secs(5))
                .map_err(|e| BdevError::Io {
                    name: name.to_string(),
                    what: "GET_ID".into(),
                    source: e,
                })?
        };

        let info = BdevInfo {
            name: name.to_string(),
            controller: name.to_string(),
            driver: "virtio_blk",
            block_size,
            num_blocks,
            read_only,
            // Without FLUSH (and CONFIG_WCE, not negotiated) the device is write-through
            // (virtio 1.2, 5.2.6.2): a flush completes at once.
            volatile_write_cache: has(bf::FLUSH),
            ops: OpSupport {
                read: true,
                write: !read_only,
                flush: true,
                unmap: discard && !read_only,
                write_zeroes: write_zeroes && !read_only,
                reset: false,
            },
            limits: Limits {
                max_rw_blocks,
                max_segments: max_segments as u32,
                max_segment_bytes: segment_bytes.min(u32::MAX as u64) as u32,
                max_unmap_blocks: if discard { max_unmap_blocks } else { 0 },
                max_unmap_segments: if discard { unmap_segs } else { 0 },
                max_write_zeroes_blocks: if write_zeroes { max_wz_blocks } else { 0 },
                optimal_io_blocks: if has(bf::TOPOLOGY) {
                    cfg.opt_io_size
                } else {
                    0
                },
                physical_block_size: if has(bf::TOPOLOGY) && cfg.physical_block_exp < 16 {
                    block_size << cfg.physical_block_exp
                } else {
                    block_size
                },
            },
            num_queues: params.vq_count,
            queue_size: vq_size,
            serial,
            device_id: None,
            vendor: None,
            product: None,
            scsi: None,
        };
        let bdev = Arc::new(Bdev::new(info, Arc::new(driver), mem));
        tracing::info!(controller = %name, features = format_args!("{features:#x}"), ?cfg, "virtio-blk controller attached");
        let transport = Arc::new(Mutex::new(transport));
        let redo = Redo {
            mem: shared.mem.clone(),
            inflight,
            layouts,
            name: name.to_string(),
            wanted,
            features,
            block_size,
            sectors_per_block,
            capacity: cfg.capacity,
            vq_count: params.vq_count,
            vq_size,
            opts,
            bdev: Arc::downgrade(&bdev),
        };
        link::start(name, &shared.link, &shared, &transport, Box::new(redo))?;
        Ok(BlkController {
            transport,
            shared,
            bdev,
            features,
            config: cfg,
        })
    }

    /// The controller's bdev.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// Negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The device configuration read at attach time.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Why the controller failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.health.failure()
    }

    /// The device is gone (back-end hung up, PCI function removed).
    pub fn is_gone(&self) -> bool {
        self.shared.health.is_broken()
    }

    /// I/O channels open on the controller.
    pub fn channels_open(&self) -> u64 {
        self.shared.queues.open_channels()
    }

    /// Channels currently open on this controller.
    pub fn open_channels(&self) -> u64 {
        self.shared.queues.open_channels()
    }

    /// Successful reconnections to the back-end so far.
    pub fn reconnects(&self) -> u64 {
        self.shared.link.reconnects()
    }

    /// Give up on a device that stopped answering: drop the connection; with
    /// `reconnect_timeout` the controller connects again and the requests outstanding on
    /// the old connection fail with [`IoError::Aborted`] (the old back-end may still be
    /// working on them); without, the controller is gone.
    pub fn reset(&self) -> Result<(), IoError> {
        self.shared.link.force(self.shared.link.generation())
    }

    /// Stop the device. Fails while channels are open.
    pub fn detach(self) -> Result<(), BdevError> {
        self.shared.queues.check_idle(&self.shared.name)?;
        self.shared.link.stop();
        // Holders of the bdev can open no new channel on a stopped device.
        self.bdev.mark_removed();
        let mut t = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        t.shutdown().map_err(|source| BdevError::Virtio {
            name: self.shared.name.clone(),
            source,
        })
    }
}

/// What a reconnection must bring back as it was.
struct Redo {
    mem: Arc<DmaMemory>,
    /// The back-end's in-flight tracking buffer (kept rings), if it has one.
    inflight: Option<vireo_virtio::InflightBuffer>,
    /// Where each queue's ring is (for handing kept rings to a new connection).
    layouts: Vec<vireo_virtio::RingLayout>,
    name: String,
    wanted: u64,
    features: u64,
    block_size: u32,
    sectors_per_block: u64,
    capacity: u64,
    vq_count: u16,
    vq_size: u16,
    opts: QueueOptions,
    bdev: std::sync::Weak<Bdev>,
}

impl link::Redo for Redo {
    fn keeps_rings(&self) -> bool {
        self.inflight.is_some() && self.layouts.len() == self.vq_count as usize
    }

    fn run(&mut self, t: &mut dyn Transport, ctx: &mut RedoCtx) -> Result<Vec<Renewed>, RedoError> {
        let transient = |e: vireo_virtio::Error| RedoError::Transient(e.to_string());
        let got = crate::link::renegotiate(t, self.wanted, self.features)?;
        let mut raw = [0u8; CONFIG_LEN];
        t.read_config(0, &mut raw).map_err(transient)?;
        let cfg = BlkConfig::parse(&raw)
            .ok_or_else(|| RedoError::Transient("short configuration".into()))?;
        let bs = if got & bf::BLK_SIZE != 0 {
            cfg.blk_size
        } else {
            512
        };
        if bs != self.block_size {
            return Err(RedoError::Permanent(format!(
                "the device came back with {bs}-byte blocks, not {} as before",
                self.block_size
            )));
        }
        if got & bf::MQ != 0 && cfg.num_queues.max(1) < self.vq_count {
            return Err(RedoError::Permanent(format!(
                "the device came back with {} queues; vq_count is {}",
                cfg.num_queues, self.vq_count
            )));
        }
        if cfg.capacity != self.capacity {
            let blocks = cfg.capacity / self.sectors_per_block;
            tracing::warn!(
                controller = %self.name,
                "the device came back with {} sectors (was {}): the bdev now has {blocks} blocks",
                cfg.capacity,
                self.capacity
            );
            self.capacity = cfg.capacity;
            if let Some(b) = self.bdev.upgrade() {
                b.set_num_blocks(blocks);
            }
        }
        let mut out = Vec::with_capacity(self.vq_count as usize);
        let keep = ctx.keep && t.tracks_inflight();
        if ctx.keep && !keep {
            // The back-end came back without in-flight tracking: fresh rings, and the
            // channels resend from their records.
            tracing::warn!(controller = %self.name, "the back-end no longer tracks in-flight requests; resending from vireo's records");
        }
        if keep {
            // The same rings, with the tracking buffer: the back-end resends what it had
            // taken and not completed; each ring goes on at its used index.
            let buf = self
                .inflight
                .as_ref()
                .ok_or_else(|| RedoError::Permanent("no in-flight buffer to hand back".into()))?;
            t.set_inflight(buf).map_err(transient)?;
            let mut renewed = Vec::new();
            for i in 0..self.vq_count {
                if ctx.lost.contains(&i) {
                    continue;
                }
                let layout = self.layouts[i as usize];
                let base =
                    vireo_virtio::ring::peek_used_index(&layout, &self.mem).ok_or_else(|| {
                        RedoError::Permanent(format!("queue {i}'s ring is not in DMA memory"))
                    })?;
                let notifier = t.resume_queue(i, &layout, base).map_err(transient)?;
                renewed.push((i, notifier, t.completion_signal(i)));
            }
            t.start().map_err(transient)?;
            for (index, notifier, signal) in renewed {
                if let Some(pos) = ctx.parked.iter().position(|q| q.index() == index) {
                    let mut ring = ctx.parked.swap_remove(pos);
                    ring.set_notifier(notifier);
                    ring.set_completion_signal(signal);
                    out.push(Renewed::Fresh {
                        ring,
                        aborted: false,
                    });
                } else {
                    out.push(Renewed::Same {
                        index,
                        notifier,
                        signal,
                    });
                }
            }
            return Ok(out);
        }
        // Fresh rings (and a fresh tracking buffer: the old one describes old rings).
        if self.inflight.is_some() {
            self.inflight = t
                .get_inflight(self.vq_count, self.vq_size)
                .map_err(transient)?;
        }
        let mut layouts = Vec::with_capacity(self.vq_count as usize);
        for i in 0..self.vq_count {
            let ring = create_queue(t, i, self.vq_size, self.opts).map_err(transient)?;
            layouts.push(ring.layout());
            out.push(Renewed::Fresh {
                ring,
                aborted: ctx.forced,
            });
        }
        t.start().map_err(transient)?;
        self.layouts = layouts;
        Ok(out)
    }
}

/// One queue of a virtio-blk controller, owned by one channel.
struct BlkChannel {
    rq: RequestQueue<RequestSlot>,
    shared: Arc<Shared>,
    /// Each slot's request, kept to send it again after a reconnection.
    slot_child: Box<[Child]>,
    segs: Vec<Segment>,
    /// Requests failed without reaching the device, handed out by the next poll.
    dead: Vec<ChildDone>,
    failed: Option<IoError>,
    /// The queue's index on the device.
    index: u16,
    /// The link generation of the queue's ring.
    generation: u64,
    /// The connection is gone and reconnection is under way.
    suspended: bool,
    /// Requests of a lost connection, sent again (before new ones) once it is back.
    resubmit: VecDeque<Child>,
}

const HDR_OFF: u64 = offset_of!(RequestSlot, hdr) as u64;
const STATUS_OFF: usize = offset_of!(RequestSlot, status);
const RANGES_OFF: u64 = offset_of!(RequestSlot, ranges) as u64;

fn queue_error(f: &QueueFailure) -> IoError {
    match f {
        QueueFailure::Disconnected => IoError::Disconnected,
        QueueFailure::Device(why) => IoError::ControllerFailed(why.clone()),
    }
}

impl BlkChannel {
    fn new(shared: Arc<Shared>, q: SplitQueue) -> Result<BlkChannel, IoError> {
        let n = q.size() as usize;
        let index = q.index();
        // The ring's generation and the flag to watch, read together (a ring of an
        // earlier connection gets a raised flag and is swapped for its new one).
        let (generation, flag) = shared.link.bind(&q, &shared.health);
        let rq = RequestQueue::new(&shared.mem, q, flag)
            .map_err(|e| IoError::NoMemory(e.to_string()))?;
        shared.queues.opened();
        Ok(BlkChannel {
            rq,
            slot_child: vec![Child::EMPTY; n].into_boxed_slice(),
            segs: Vec::with_capacity(shared.max_segments + 2),
            shared,
            dead: Vec::new(),
            failed: None,
            index,
            generation,
            suspended: false,
            resubmit: VecDeque::new(),
        })
    }

    /// The queue failed: with reconnection on and the back-end gone, keep its requests
    /// for the next connection; otherwise fail every request it held, and mark the
    /// controller failed when the device broke the protocol.
    fn fail_all(&mut self, f: QueueFailure) {
        if self.failed.is_some() || self.suspended {
            return;
        }
        if f == QueueFailure::Disconnected && self.shared.link.enabled() {
            // Wait for the connection; what becomes of the requests on the ring depends
            // on how it comes back (see `resume`).
            self.rq.fail(f);
            self.suspended = true;
            return;
        }
        if let QueueFailure::Device(why) = &f {
            self.shared.health.fail(why);
        }
        self.rq.fail(f.clone());
        self.fail_waiting(queue_error(&f));
    }

    /// Take the requests off the lost ring: to send again, or to fail as aborted.
    fn take_back(&mut self, aborted: bool) {
        for slot in self.rq.drain_in_flight() {
            let c = self.slot_child[slot as usize];
            if aborted {
                self.dead.push(ChildDone::new(
                    c.parent,
                    Err(IoError::Aborted(
                        "the device stopped answering and vireo reconnected".into(),
                    )),
                ));
            } else {
                self.resubmit.push_back(c);
            }
        }
    }

    /// Fail the requests kept for a reconnection, and everything after them.
    fn fail_waiting(&mut self, e: IoError) {
        for slot in self.rq.drain_in_flight() {
            self.dead.push(ChildDone::new(
                self.slot_child[slot as usize].parent,
                Err(e.clone()),
            ));
        }
        for c in self.resubmit.drain(..) {
            self.dead.push(ChildDone::new(c.parent, Err(e.clone())));
        }
        self.suspended = false;
        self.failed = Some(e);
    }

    /// While suspended: take the new ring once the connection is back and send the
    /// kept requests again.
    fn resume(&mut self) {
        match self.shared.link.check(self.generation, self.index) {
            LinkView::Waiting => {}
            LinkView::Failed(why, forced) => self.fail_waiting(link::failed_error(why, forced)),
            LinkView::Ready(generation, renewed) => match *renewed {
                Renewed::Same {
                    notifier, signal, ..
                } => {
                    // The new connection serves this ring and resends what it had.
                    if self
                        .rq
                        .reattach(notifier, signal, self.shared.health.broken_arc())
                    {
                        self.generation = generation;
                        self.suspended = false;
                    } else {
                        self.fail_waiting(IoError::ReconnectFailed(
                            "the request queue cannot be handed to the new connection".into(),
                        ));
                    }
                }
                Renewed::Fresh { ring, aborted } => {
                    self.take_back(aborted);
                    match RequestQueue::new(&self.shared.mem, ring, self.shared.health.broken_arc())
                    {
                        Ok(rq) => {
                            // The old queue leaks its memory (it failed): a back-end that
                            // went away must not write into reused memory.
                            drop(std::mem::replace(&mut self.rq, rq));
                            self.generation = generation;
                            self.suspended = false;
                            self.send_kept();
                        }
                        Err(e) => self.fail_waiting(IoError::NoMemory(e.to_string())),
                    }
                }
            },
        }
    }

    /// Send kept requests while the ring has room.
    fn send_kept(&mut self) {
        while let Some(c) = self.resubmit.pop_front() {
            if let Err(c) = self.submit_child(c) {
                self.resubmit.push_front(c);
                break;
            }
        }
        self.publish();
    }

    /// Fetch the serial number synchronously.
    fn get_id(&mut self, timeout: Duration) -> Result<Option<String>, IoError> {
        let mut id = self
            .shared
            .mem
            .alloc(ID_BYTES, 64)
            .map_err(|e| IoError::NoMemory(e.to_string()))?;
        id.as_mut_slice().fill(0);
        let slot = self
            .rq
            .take_slot()
            .ok_or_else(|| IoError::InvalidRequest("no slot".into()))?;
        let s = self.rq.slot_mut(slot);
        s.hdr = ReqHeader {
            type_: T_GET_ID.into(),
            ioprio: 0.into(),
            sector: 0.into(),
        };
        s.status = S_UNSET;
        let base = self.rq.slot_addr(slot);
        let segs = [
            Segment {
                addr: base + HDR_OFF,
                len: 16,
            },
            Segment {
                addr: id.iova(),
                len: ID_BYTES as u32,
            },
            Segment {
                addr: base + STATUS_OFF as u64,
                len: 1,
            },
        ];
        self.rq
            .submit(slot, &segs, 1)
            .map_err(|_| IoError::InvalidRequest("ring full".into()))?;
        if let Err(f) = self.rq.publish() {
            // The avail index may already be visible: the device may write the id.
            id.retire();
            self.fail_all(f.clone());
            return Err(queue_error(&f));
        }
        let start = Instant::now();
        let mut status = None;
        while status.is_none() {
            match self
                .rq
                .poll(|rq, s, _| status = Some(rq.read_at::<u8>(s, STATUS_OFF)))
            {
                Ok(_) => {}
                Err(f) => {
                    id.retire();
                    self.fail_all(f.clone());
                    return Err(queue_error(&f));
                }
            }
            if status.is_none() {
                if self.shared.health.is_broken() {
                    id.retire();
                    self.fail_all(QueueFailure::Disconnected);
                    return Err(IoError::Disconnected);
                }
                if start.elapsed() > timeout {
                    // The device still owns the id buffer.
                    id.retire();
                    let why = "GET_ID did not complete".to_string();
                    self.fail_all(QueueFailure::Device(why.clone()));
                    return Err(IoError::ControllerFailed(why));
                }
                std::thread::yield_now();
            }
        }
        self.rq.release_slot(slot);
        match status {
            Some(S_OK) => {
                let id = id.as_slice();
                let end = id.iter().position(|&c| c == 0).unwrap_or(ID_BYTES);
                let s: String = String::from_utf8_lossy(&id[..end])
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect();
                let s = s.trim().to_string();
                Ok(if s.is_empty() { None } else { Some(s) })
            }
            Some(S_IOERR | S_UNSUPP) => Ok(None),
            other => Err(IoError::ControllerFailed(format!(
                "invalid virtio-blk status byte {:#x} for GET_ID",
                other.unwrap_or(S_UNSET)
            ))),
        }
    }
}

impl ChannelDriver for BlkChannel {
    fn queue(&mut self, c: Child) -> Result<(), Child> {
        if let Some(e) = &self.failed {
            self.dead.push(ChildDone::new(c.parent, Err(e.clone())));
            return Ok(());
        }
        if self.suspended || !self.resubmit.is_empty() {
            // Waits for the connection (and the requests kept from the last one).
            return Err(c);
        }
        self.submit_child(c)
    }

    fn publish(&mut self) {
        if self.failed.is_some() || self.suspended {
            return;
        }
        if let Err(f) = self.rq.publish() {
            self.fail_all(f);
        }
    }

    fn poll(&mut self, out: &mut Vec<ChildDone>) -> usize {
        if self.suspended {
            self.resume();
        } else if !self.resubmit.is_empty() {
            self.send_kept();
        }
        self.poll_queue(out)
    }

    fn arm(&mut self) -> Option<(std::os::fd::RawFd, bool)> {
        if self.failed.is_some() || self.suspended || !self.dead.is_empty() {
            return None;
        }
        self.rq.arm()
    }

    fn reset_controller(&mut self) -> Result<(), IoError> {
        self.shared.link.force(self.generation)
    }

    fn disarm(&mut self) {
        self.rq.disarm();
    }
}

impl BlkChannel {
    /// Put one request on the ring (or give it back when the ring is full).
    #[inline]
    fn submit_child(&mut self, c: Child) -> Result<(), Child> {
        let Some(slot) = self.rq.take_slot() else {
            return Err(c);
        };
        let sh = &*self.shared;
        let base = self.rq.slot_addr(slot);
        let sector = c.lba * sh.sectors_per_block;
        if matches!(c.op, IoOp::Read | IoOp::Write) && c.len > 0 && c.len as u64 <= sh.segment_bytes
        {
            // The common read or write: one data segment, the chain built on the stack.
            let s = self.rq.slot_mut(slot);
            s.status = S_UNSET;
            let (ty, n_out) = if c.op == IoOp::Read {
                (T_IN, 1)
            } else {
                (T_OUT, 2)
            };
            s.hdr = ReqHeader {
                type_: ty.into(),
                ioprio: 0.into(),
                sector: sector.into(),
            };
            let segs = [
                Segment {
                    addr: base + HDR_OFF,
                    len: 16,
                },
                Segment {
                    addr: c.addr,
                    len: c.len,
                },
                Segment {
                    addr: base + STATUS_OFF as u64,
                    len: 1,
                },
            ];
            let r = self.rq.submit(slot, &segs, n_out);
            return self.settle(slot, c, r.is_ok());
        }
        let mut segs = std::mem::take(&mut self.segs);
        segs.clear();
        segs.push(Segment {
            addr: base + HDR_OFF,
            len: 16,
        });
        let s = self.rq.slot_mut(slot);
        s.status = S_UNSET;
        let n_out = match c.op {
            IoOp::Read | IoOp::Write => {
                let ty = if c.op == IoOp::Read { T_IN } else { T_OUT };
                s.hdr = ReqHeader {
                    type_: ty.into(),
                    ioprio: 0.into(),
                    sector: sector.into(),
                };
                let mut addr = c.addr;
                let mut left = c.len as u64;
                while left > 0 {
                    let n = left.min(sh.segment_bytes);
                    segs.push(Segment {
                        addr,
                        len: n as u32,
                    });
                    addr += n;
                    left -= n;
                }
                if c.op == IoOp::Read {
                    1
                } else {
                    segs.len()
                }
            }
            IoOp::Flush => {
                s.hdr = ReqHeader {
                    type_: T_FLUSH.into(),
                    ioprio: 0.into(),
                    sector: 0.into(),
                };
                1
            }
            IoOp::Unmap | IoOp::WriteZeroes => {
                let (ty, per, flags) = if c.op == IoOp::Unmap {
                    (T_DISCARD, sh.range_sectors_unmap, 0u32)
                } else {
                    (T_WRITE_ZEROES, sh.range_sectors_wz, sh.write_zeroes_flags)
                };
                s.hdr = ReqHeader {
                    type_: ty.into(),
                    ioprio: 0.into(),
                    sector: 0.into(),
                };
                let mut sec = sector;
                let mut left = c.blocks * sh.sectors_per_block;
                let mut i = 0usize;
                // The bdev layer splits to max_unmap_segments x range_sectors, at most
                // SLOT_RANGES ranges.
                while left > 0 && i < SLOT_RANGES {
                    let n = left.min(per);
                    s.ranges[i] = Range {
                        sector: sec.into(),
                        num_sectors: (n as u32).into(),
                        flags: flags.into(),
                    };
                    sec += n;
                    left -= n;
                    i += 1;
                }
                if left > 0 {
                    // The bdev layer's split keeps this unreachable; never send less.
                    self.rq.release_slot(slot);
                    self.segs = segs;
                    self.dead.push(ChildDone::new(
                        c.parent,
                        Err(IoError::InvalidRequest(format!(
                            "{} of {} blocks needs more than {SLOT_RANGES} ranges",
                            c.op.name(),
                            c.blocks
                        ))),
                    ));
                    return Ok(());
                }
                segs.push(Segment {
                    addr: base + RANGES_OFF,
                    len: (16 * i) as u32,
                });
                2
            }
        };
        segs.push(Segment {
            addr: base + STATUS_OFF as u64,
            len: 1,
        });
        let r = self.rq.submit(slot, &segs, n_out);
        self.segs = segs;
        self.settle(slot, c, r.is_ok())
    }

    /// After putting `c`'s chain in `slot` on the ring: record it, or give the slot
    /// back and the child to its caller (no ring space: it waits).
    #[inline]
    fn settle(&mut self, slot: u16, c: Child, on_ring: bool) -> Result<(), Child> {
        if on_ring {
            self.slot_child[slot as usize] = c;
            Ok(())
        } else {
            self.rq.release_slot(slot);
            Err(c)
        }
    }

    fn poll_queue(&mut self, out: &mut Vec<ChildDone>) -> usize {
        let before = out.len();
        if !self.dead.is_empty() {
            out.append(&mut self.dead);
        }
        if self.failed.is_some() || self.suspended {
            return out.len() - before;
        }
        let mut bad: Option<String> = None;
        let children = &self.slot_child;
        let r = self.rq.poll(|rq, slot, _len| {
            let result = match rq.read_at::<u8>(slot, STATUS_OFF) {
                S_OK => Ok(()),
                S_IOERR => Err(IoError::Device),
                S_UNSUPP => Err(IoError::DeviceUnsupported),
                S_UNSET => {
                    let why = "the device completed a request without writing its status";
                    bad.get_or_insert_with(|| why.to_string());
                    Err(IoError::ControllerFailed(why.into()))
                }
                other => {
                    let why = format!("invalid virtio-blk status byte {other:#x}");
                    bad.get_or_insert_with(|| why.clone());
                    Err(IoError::ControllerFailed(why))
                }
            };
            rq.release_slot(slot);
            out.push(ChildDone::new(children[slot as usize].parent, result));
        });
        match r {
            Err(f) => self.fail_all(f),
            Ok(_) => {
                if let Some(why) = bad {
                    self.fail_all(QueueFailure::Device(why));
                }
            }
        }
        out.append(&mut self.dead);
        out.len() - before
    }
}

impl Drop for BlkChannel {
    fn drop(&mut self) {
        self.shared.queues.closed();
        // A working queue with nothing on the device goes back to the pool; otherwise
        // the request queue keeps (leaks) what the device may still use.
        if !self.shared.link.enabled() {
            if let Some(q) = self.rq.take_ring() {
                self.shared.queues.give(q);
            }
            return;
        }
        let ring = if self.suspended {
            None
        } else {
            self.rq.take_ring()
        };
        let link = &self.shared.link;
        match ring {
            Some(mut q) => {
                q.set_tag(self.generation);
                link.give_back(q, self.rq.lost(), &self.shared.queues)
            }
            // The ring was lost with a connection: the queue's new one goes to the pool.
            None => link.release(self.index, &self.shared.queues),
        }
    }
}
