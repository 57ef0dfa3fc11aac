//! virtio-blk driver (virtio 1.2 section 5.2).

mod queue;
mod reconnect;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_virtio::features::blk as bf;
use vireo_virtio::features::transport as tf;
use vireo_virtio::wire::blk::{SLOT_RANGES, WRITE_ZEROES_FLAG_UNMAP};
use vireo_virtio::{create_queue, negotiate, DmaMemory, QueueOptions, Transport, COMMON_FEATURES};

use crate::bdev::{Bdev, BdevInfo, Limits, OpSupport};
use crate::config::PackedRing;
use crate::driver::{BdevDriver, ChannelDriver};
use crate::error::{BdevError, IoError};
use crate::health::Health;
use crate::pool::{check_queue_size, QueuePool};
use crate::reconnect::{self as link, ControllerShared, Link};
use queue::BlkChannel;
use reconnect::BlkReconnect;

/// Ranges per discard / write-zeroes request we are prepared to send.
const MAX_RANGE_SEGS: u32 = SLOT_RANGES as u32;
const SECTOR: u64 = 512;
/// Bytes of `struct virtio_blk_config` vireo reads (through `write_zeroes_may_unmap`).
pub(crate) const CONFIG_LEN: usize = 60;
/// The fields of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its
/// padding, as (offset, width): each is read at its own width (virtio 1.2 4.1.3.1).
pub(crate) const CONFIG_FIELDS: &[(u32, u8)] = &[
    (0, 8),  // capacity
    (8, 4),  // size_max
    (12, 4), // seg_max
    (16, 2), // geometry.cylinders
    (18, 1), // geometry.heads
    (19, 1), // geometry.sectors
    (20, 4), // blk_size
    (24, 1), // topology.physical_block_exp
    (25, 1), // topology.alignment_offset
    (26, 2), // topology.min_io_size
    (28, 4), // topology.opt_io_size
    (32, 1), // writeback
    (33, 1), // unused0
    (34, 2), // num_queues
    (36, 4), // max_discard_sectors
    (40, 4), // max_discard_seg
    (44, 4), // discard_sector_alignment
    (48, 4), // max_write_zeroes_sectors
    (52, 4), // max_write_zeroes_seg
    (56, 1), // write_zeroes_may_unmap
    (57, 1), // unused1
    (58, 1),
    (59, 1),
];

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
    /// Request queues to use; 0: every queue the device offers.
    pub vq_count: u16,
    /// Descriptors per queue (a power of two).
    pub vq_size: u16,
    /// How long I/O waits while vireo reconnects to a back-end that went away
    /// (vhost-user); `None`: no reconnection, I/O fails at once.
    pub reconnect_timeout: Option<Duration>,
    /// Packed or split rings.
    pub packed_ring: PackedRing,
}

/// What channels need to know, fixed at attach time.
#[derive(Debug)]
struct BlkShared {
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

impl ControllerShared for BlkShared {
    fn parts(&self) -> (&Health, &QueuePool, &Link) {
        (&self.health, &self.queues, &self.link)
    }
}

/// An attached virtio-blk controller; serves one bdev.
pub struct BlkController {
    transport: Arc<Mutex<Box<dyn Transport>>>,
    shared: Arc<BlkShared>,
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

struct BlkBdevDriver(Arc<BlkShared>);

impl BlkBdevDriver {
    /// A channel on a queue of the pool (a blk channel always has its queue to itself).
    fn open(&self) -> Result<BlkChannel, BdevError> {
        self.0.link.wait_reconnected();
        if self.0.health.is_failed() {
            return Err(BdevError::Failed(self.0.name.clone()));
        }
        let q = self.0.queues.take_for(&self.0.name)?;
        BlkChannel::new(self.0.clone(), q).map_err(|e| BdevError::Io {
            name: self.0.name.clone(),
            what: if matches!(e, IoError::Removed(_)) {
                "open a channel".into()
            } else {
                "allocate request slots".into()
            },
            source: e,
        })
    }
}

impl BdevDriver for BlkBdevDriver {
    fn open_channel(&self) -> Result<Box<dyn ChannelDriver>, BdevError> {
        Ok(Box::new(self.open()?))
    }

    fn open_exclusive_channel(&self) -> Result<Box<dyn ChannelDriver + Send>, BdevError> {
        Ok(Box::new(self.open()?))
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
        check_queue_size(name, params.vq_size)?;
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
        let offered = transport.device_features().map_err(verr)?;
        let wanted = wanted
            | params
                .packed_ring
                .feature(offered)
                .map_err(|e| bad(name, e))?;
        let features = negotiate(transport.as_mut(), wanted).map_err(verr)?;
        let mut raw = [0u8; CONFIG_LEN];
        transport
            .read_config_fields(CONFIG_FIELDS, &mut raw)
            .map_err(verr)?;
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
        // 0: every queue the device offers (the C API's connect), up to 256: the
        // device's number does not size vireo's memory and eventfds unchecked.
        let vq_count = match params.vq_count {
            0 => avail.min(crate::pool::MAX_ALL_QUEUES),
            n => n,
        };
        if vq_count > avail {
            return Err(BdevError::TooFewQueues {
                name: name.to_string(),
                asked: vq_count,
                offered: avail,
                detail: format!(
                    " (num_queues {}, MQ {}, back-end queues {}); set \"vq_count\" to at most {avail}",
                    cfg.num_queues,
                    if has(bf::MQ) { "negotiated" } else { "not offered" },
                    if transport_queues == u16::MAX { "unknown".to_string() } else { transport_queues.to_string() },
                ),
            });
        }
        let mut vq_size = params.vq_size;
        if let Some(max) = transport.max_queue_size(0).map_err(verr)? {
            if max < 4 {
                return Err(bad(
                    name,
                    format!("queue 0 offers at most {max} entries; vireo needs at least 4"),
                ));
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
            packed: has(tf::RING_PACKED),
        };
        let mem = transport.memory().clone();
        // In-flight tracking by the back-end, for reconnections (INFLIGHT_SHMFD), with
        // split rings: a packed ring is not handed to a new connection (its state is
        // two positions with wrap counters that only the back-end's packed in-flight
        // records restore, and SPDK, one back-end with packed rings, does so only with
        // its recovery switched on); it is replaced by a fresh one, and vireo resends
        // what was in flight.
        let inflight = if params.reconnect_timeout.is_some() && !opts.packed {
            transport.get_inflight(vq_count, vq_size).map_err(verr)?
        } else {
            None
        };
        if params.reconnect_timeout.is_some() && opts.packed {
            tracing::info!(
                controller = name,
                "packed rings: a reconnection sets up fresh rings and resends the requests in flight (the back-end's in-flight tracking is used with split rings only)"
            );
        }
        let mut queues = Vec::new();
        for i in 0..vq_count {
            queues.push(
                create_queue(transport.as_mut(), i, vq_size, opts)
                    .map_err(|e| BdevError::queue_setup(name, vq_size, e))?,
            );
        }
        transport
            .start()
            .map_err(|e| BdevError::queue_setup(name, vq_size, e))?;

        let layouts: Vec<_> = queues.iter().map(|q| q.layout()).collect();
        let shared = Arc::new(BlkShared {
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
        let driver = BlkBdevDriver(shared.clone());

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
            num_queues: vq_count,
            queue_size: vq_size,
            packed_ring: opts.packed,
            serial,
            device_id: None,
            vendor: None,
            product: None,
            scsi: None,
        };
        let bdev = Arc::new(Bdev::new(info, Arc::new(driver), mem));
        tracing::info!(controller = %name, features = format_args!("{features:#x}"), ?cfg, "virtio-blk controller attached");
        let transport = Arc::new(Mutex::new(transport));
        let redo = BlkReconnect {
            mem: shared.mem.clone(),
            inflight,
            layouts,
            name: name.to_string(),
            wanted,
            features,
            block_size,
            sectors_per_block,
            capacity: cfg.capacity,
            vq_count,
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

    /// From now on no channel opens (the first step of a detach); refused, and nothing
    /// changed, while channels are open.
    pub fn stop_opening(&self) -> Result<(), BdevError> {
        self.shared.queues.check_idle(&self.shared.name)
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
impl Drop for BlkController {
    fn drop(&mut self) {
        // As for scsi: the reconnection thread ends with the controller, so that the
        // transport's shutdown runs when the last holder lets go.
        self.shared.link.stop();
    }
}

#[cfg(test)]
mod tests;
/// The same tests with the fake disk offering packed rings (see the file's `packed`):
/// loading the file twice is the point.
#[cfg(test)]
#[path = "tests.rs"]
#[allow(clippy::duplicate_mod)]
mod tests_packed;
