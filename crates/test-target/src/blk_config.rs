//! virtio-blk target configuration: what the device offers (feature bits), its limits, and the
//! device configuration space (virtio 1.2, 5.2.4) the front-end reads with `GET_CONFIG`.

use std::path::PathBuf;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::TargetError;

/// virtio-blk addresses the disk in 512-byte sectors whatever the block size.
pub const SECTOR_SIZE: u64 = 512;

/// Size of the virtio-blk configuration space this target encodes (`struct virtio_blk_config`
/// of virtio 1.2, zoned characteristics included).
pub const BLK_CONFIG_SIZE: usize = 96;

/// Largest configuration space a vhost-user `GET_CONFIG` may address.
const VHOST_USER_CONFIG_SPACE: u64 = 0x1000;

/// Largest `max_discard_seg` / `max_write_zeroes_seg` (1 MiB of ranges per request).
pub const MAX_RANGES: u32 = 65536;

/// Largest number of queues: the backend maps queues to worker threads with a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;

/// Where the disk's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// An anonymous private mapping of `size_bytes` (pages are allocated on first write).
    Ram {
        /// Capacity in bytes; a multiple of the block size.
        size_bytes: u64,
    },
    /// A regular file (or block device) accessed with `pread`/`pwrite`.
    File {
        /// Path of the file.
        path: PathBuf,
        /// `None`: use the file as it is (capacity = its size, rounded down to the block size).
        /// `Some(n)`: create the file if missing and grow it (sparse) to `n` bytes if smaller;
        /// the capacity is `n`. A larger file is not truncated, only its first `n` bytes are used.
        size_bytes: Option<u64>,
    },
}

/// How the vhost-user-blk target behaves. `Default` gives a 64 MiB RAM disk with 512-byte
/// blocks, one queue of up to 256 entries and every optional command enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkTargetConfig {
    /// Where the data lives.
    pub backend: Backing,
    /// Logical block size in bytes: 512 or 4096 (`VIRTIO_BLK_F_BLK_SIZE`).
    pub block_size: u32,
    /// Request queues, 1..=64. More than one offers `VIRTIO_BLK_F_MQ`.
    pub num_queues: u16,
    /// Largest queue size the driver may set (a power of two, at most 32768; default 1024,
    /// QEMU's largest, so front-ends with larger defaults than 128 are served, e.g. SPDK's 512).
    pub queue_size: u16,
    /// Offer `VIRTIO_BLK_F_RO` and fail every write, discard and write-zeroes with IOERR.
    pub read_only: bool,
    /// Largest number of data segments in one request (`VIRTIO_BLK_F_SEG_MAX`); 0 = not offered,
    /// no limit.
    pub seg_max: u32,
    /// Largest single data segment in bytes (`VIRTIO_BLK_F_SIZE_MAX`); 0 = not offered, no limit.
    pub size_max: u32,
    /// Offer `VIRTIO_BLK_F_FLUSH`.
    pub flush: bool,
    /// Offer `VIRTIO_BLK_F_DISCARD`.
    pub discard: bool,
    /// Largest discard range in 512-byte sectors (non-zero when `discard`).
    pub max_discard_sectors: u32,
    /// Largest number of ranges in one discard (non-zero when `discard`).
    pub max_discard_seg: u32,
    /// Offer `VIRTIO_BLK_F_WRITE_ZEROES` (with `write_zeroes_may_unmap` = 1).
    pub write_zeroes: bool,
    /// Largest write-zeroes range in 512-byte sectors (non-zero when `write_zeroes`).
    pub max_write_zeroes_sectors: u32,
    /// Largest number of ranges in one write-zeroes (non-zero when `write_zeroes`).
    pub max_write_zeroes_seg: u32,
    /// Offer `VIRTIO_BLK_F_TOPOLOGY` (physical block = logical block, no alignment offset).
    pub topology: bool,
    /// Serial number returned by `GET_ID`, at most 20 bytes.
    pub serial: String,
    /// Offer `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// Offer `VIRTIO_RING_F_INDIRECT_DESC`.
    pub indirect_desc: bool,
    /// Fail with IOERR any request whose offset or length is not a multiple of `block_size`
    /// (what QEMU's virtio-blk does; the virtio spec itself only requires 512-byte units).
    pub enforce_block_alignment: bool,
}

impl Default for BlkTargetConfig {
    fn default() -> Self {
        BlkTargetConfig {
            backend: Backing::Ram {
                size_bytes: 64 << 20,
            },
            block_size: 512,
            num_queues: 1,
            queue_size: 1024,
            read_only: false,
            seg_max: 126,
            size_max: 1 << 20,
            flush: true,
            discard: true,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 1,
            write_zeroes: true,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 1,
            topology: true,
            serial: "vireo-target".to_string(),
            event_idx: true,
            indirect_desc: true,
            enforce_block_alignment: true,
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> TargetError {
    TargetError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

impl BlkTargetConfig {
    /// Checks every field that does not depend on the backing store.
    pub fn validate(&self) -> Result<(), TargetError> {
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(invalid(
                "block_size",
                format!("{} is not 512 or 4096", self.block_size),
            ));
        }
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(invalid(
                "num_queues",
                format!("{} is not in 1..={MAX_QUEUES}", self.num_queues),
            ));
        }
        if self.queue_size == 0 || !self.queue_size.is_power_of_two() || self.queue_size > 32768 {
            return Err(invalid(
                "queue_size",
                format!("{} is not a power of two in 1..=32768", self.queue_size),
            ));
        }
        if self.size_max != 0 && self.size_max < self.block_size {
            return Err(invalid(
                "size_max",
                format!(
                    "{} is smaller than the block size {}",
                    self.size_max, self.block_size
                ),
            ));
        }
        let sectors_per_block = self.block_size / SECTOR_SIZE as u32;
        if self.discard {
            if self.max_discard_seg == 0 || self.max_discard_seg > MAX_RANGES {
                return Err(invalid(
                    "max_discard_seg",
                    format!(
                        "{} is not in 1..={MAX_RANGES} with discard",
                        self.max_discard_seg
                    ),
                ));
            }
            if self.max_discard_sectors < sectors_per_block {
                return Err(invalid(
                    "max_discard_sectors",
                    format!(
                        "{} is less than one block ({sectors_per_block} sectors)",
                        self.max_discard_sectors
                    ),
                ));
            }
        }
        if self.write_zeroes {
            if self.max_write_zeroes_seg == 0 || self.max_write_zeroes_seg > MAX_RANGES {
                return Err(invalid(
                    "max_write_zeroes_seg",
                    format!(
                        "{} is not in 1..={MAX_RANGES} with write_zeroes",
                        self.max_write_zeroes_seg
                    ),
                ));
            }
            if self.max_write_zeroes_sectors < sectors_per_block {
                return Err(invalid(
                    "max_write_zeroes_sectors",
                    format!(
                        "{} is less than one block ({sectors_per_block} sectors)",
                        self.max_write_zeroes_sectors
                    ),
                ));
            }
        }
        if self.serial.len() > VIRTIO_BLK_ID_BYTES as usize {
            return Err(invalid(
                "serial",
                format!(
                    "{:?} is {} bytes, more than {VIRTIO_BLK_ID_BYTES}",
                    self.serial,
                    self.serial.len()
                ),
            ));
        }
        match &self.backend {
            Backing::Ram { size_bytes } => check_size("backend.size_bytes", *size_bytes, self)?,
            Backing::File {
                size_bytes: Some(size_bytes),
                ..
            } => check_size("backend.size_bytes", *size_bytes, self)?,
            Backing::File { .. } => {}
        }
        Ok(())
    }

    /// The virtio feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        let mut set = |on: bool, bit: u32| {
            if on {
                f |= 1u64 << bit;
            }
        };
        set(self.indirect_desc, VIRTIO_RING_F_INDIRECT_DESC);
        set(self.event_idx, VIRTIO_RING_F_EVENT_IDX);
        set(self.size_max != 0, VIRTIO_BLK_F_SIZE_MAX);
        set(self.seg_max != 0, VIRTIO_BLK_F_SEG_MAX);
        set(self.topology, VIRTIO_BLK_F_TOPOLOGY);
        set(self.flush, VIRTIO_BLK_F_FLUSH);
        set(self.num_queues > 1, VIRTIO_BLK_F_MQ);
        set(self.discard, VIRTIO_BLK_F_DISCARD);
        set(self.write_zeroes, VIRTIO_BLK_F_WRITE_ZEROES);
        set(self.read_only, VIRTIO_BLK_F_RO);
        f
    }

    /// The vhost-user protocol features the device offers.
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    /// Encodes `struct virtio_blk_config` (little endian) for a disk of `capacity_sectors`.
    pub fn config_space(&self, capacity_sectors: u64) -> [u8; BLK_CONFIG_SIZE] {
        let mut c = [0u8; BLK_CONFIG_SIZE];
        let put = |c: &mut [u8; BLK_CONFIG_SIZE], off: usize, bytes: &[u8]| {
            c[off..off + bytes.len()].copy_from_slice(bytes);
        };
        let sectors_per_block = self.block_size / SECTOR_SIZE as u32;
        put(&mut c, 0, &capacity_sectors.to_le_bytes());
        put(&mut c, 8, &self.size_max.to_le_bytes());
        put(&mut c, 12, &self.seg_max.to_le_bytes());
        // 16..20: geometry, not offered.
        put(&mut c, 20, &self.block_size.to_le_bytes());
        if self.topology {
            // physical_block_exp (24) and alignment_offset (25) stay 0: physical = logical.
            // min_io_size in logical blocks; opt_io_size (28) 0 = not reported.
            put(&mut c, 26, &1u16.to_le_bytes());
        }
        // 32: writeback (only meaningful with CONFIG_WCE, not offered).
        c[32] = u8::from(self.flush);
        put(&mut c, 34, &self.num_queues.to_le_bytes());
        if self.discard {
            put(&mut c, 36, &self.max_discard_sectors.to_le_bytes());
            put(&mut c, 40, &self.max_discard_seg.to_le_bytes());
            put(&mut c, 44, &sectors_per_block.to_le_bytes());
        }
        if self.write_zeroes {
            put(&mut c, 48, &self.max_write_zeroes_sectors.to_le_bytes());
            put(&mut c, 52, &self.max_write_zeroes_seg.to_le_bytes());
            c[56] = 1; // write_zeroes_may_unmap
        }
        // 60..72: secure erase, 72..96: zoned characteristics; neither offered.
        c
    }

    /// The serial as the 20 bytes `GET_ID` returns (zero padded, not NUL terminated when full).
    pub fn id_bytes(&self) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = self.serial.len().min(id.len());
        id[..n].copy_from_slice(&self.serial.as_bytes()[..n]);
        id
    }
}

fn check_size(field: &'static str, size: u64, cfg: &BlkTargetConfig) -> Result<(), TargetError> {
    if size == 0 || !size.is_multiple_of(u64::from(cfg.block_size)) {
        return Err(invalid(
            field,
            format!(
                "{size} is not a non-zero multiple of the block size {}",
                cfg.block_size
            ),
        ));
    }
    Ok(())
}

/// Answers a `GET_CONFIG` for `size` bytes at `offset` of `space`. Bytes past the encoded
/// structure read as zero (fields of features not offered); a window outside the vhost-user
/// config space or of size 0 yields an empty vector, which the vhost-user layer reports to the
/// front-end as a failed request.
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let end = u64::from(offset) + u64::from(size);
    if size == 0 || end > VHOST_USER_CONFIG_SPACE {
        return Vec::new();
    }
    let mut out = vec![0u8; size as usize];
    let start = offset as usize;
    if start < space.len() {
        let n = (space.len() - start).min(out.len());
        out[..n].copy_from_slice(&space[start..start + n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config;

    fn le32(c: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(c[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn config_offsets_match_the_spec_struct() {
        assert_eq!(std::mem::size_of::<virtio_blk_config>(), BLK_CONFIG_SIZE);
        assert_eq!(offset_of!(virtio_blk_config, capacity), 0);
        assert_eq!(offset_of!(virtio_blk_config, size_max), 8);
        assert_eq!(offset_of!(virtio_blk_config, seg_max), 12);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(offset_of!(virtio_blk_config, min_io_size), 26);
        assert_eq!(offset_of!(virtio_blk_config, wce), 32);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_seg), 40);
        assert_eq!(offset_of!(virtio_blk_config, discard_sector_alignment), 44);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
    }

    #[test]
    fn config_space_encodes_limits() {
        let cfg = BlkTargetConfig {
            block_size: 4096,
            num_queues: 3,
            seg_max: 7,
            size_max: 8192,
            max_discard_sectors: 1024,
            max_discard_seg: 4,
            max_write_zeroes_sectors: 2048,
            max_write_zeroes_seg: 2,
            ..Default::default()
        };
        let c = cfg.config_space(0x1_0000_0008);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            0x1_0000_0008
        );
        assert_eq!(le32(&c, 8), 8192);
        assert_eq!(le32(&c, 12), 7);
        assert_eq!(le32(&c, 20), 4096);
        assert_eq!(u16::from_le_bytes([c[26], c[27]]), 1);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3);
        assert_eq!(le32(&c, 36), 1024);
        assert_eq!(le32(&c, 40), 4);
        assert_eq!(le32(&c, 44), 8);
        assert_eq!(le32(&c, 48), 2048);
        assert_eq!(le32(&c, 52), 2);
        assert_eq!(c[56], 1);
        assert!(c[60..].iter().all(|&b| b == 0));
    }

    #[test]
    fn config_space_without_discard_has_zero_limits() {
        let cfg = BlkTargetConfig {
            discard: false,
            write_zeroes: false,
            ..Default::default()
        };
        let c = cfg.config_space(8);
        assert!(c[36..60].iter().all(|&b| b == 0));
    }

    #[test]
    fn read_config_windows() {
        let space: Vec<u8> = (0..BLK_CONFIG_SIZE as u8).collect();
        assert_eq!(read_config(&space, 0, 8), (0..8).collect::<Vec<u8>>());
        assert_eq!(read_config(&space, 20, 4), vec![20, 21, 22, 23]);
        // Straddling the end: zero padded.
        assert_eq!(read_config(&space, 94, 4), vec![94, 95, 0, 0]);
        // Past the structure but inside the config space: zeros.
        assert_eq!(read_config(&space, 200, 3), vec![0, 0, 0]);
        // Invalid windows.
        assert!(read_config(&space, 0, 0).is_empty());
        assert!(read_config(&space, 4095, 2).is_empty());
        assert!(read_config(&space, u32::MAX, 4).is_empty());
    }

    #[test]
    fn features_follow_config() {
        let base = BlkTargetConfig::default();
        let f = base.device_features();
        assert_ne!(f & 1 << VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & 1 << 30, 0, "VHOST_USER_F_PROTOCOL_FEATURES");
        assert_eq!(f & 1 << VIRTIO_BLK_F_MQ, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
        for bit in [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ] {
            assert_ne!(f & 1 << bit, 0, "bit {bit}");
        }
        let other = BlkTargetConfig {
            num_queues: 2,
            read_only: true,
            flush: false,
            discard: false,
            write_zeroes: false,
            seg_max: 0,
            size_max: 0,
            event_idx: false,
            ..Default::default()
        };
        let f = other.device_features();
        assert_ne!(f & 1 << VIRTIO_BLK_F_MQ, 0);
        assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
        for bit in [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_eq!(f & 1 << bit, 0, "bit {bit}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |cfg: BlkTargetConfig, field: &str| match cfg.validate() {
            Err(TargetError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected error on {field}, got {other:?}"),
        };
        bad(
            BlkTargetConfig {
                block_size: 1024,
                ..Default::default()
            },
            "block_size",
        );
        bad(
            BlkTargetConfig {
                num_queues: 0,
                ..Default::default()
            },
            "num_queues",
        );
        bad(
            BlkTargetConfig {
                num_queues: 65,
                ..Default::default()
            },
            "num_queues",
        );
        bad(
            BlkTargetConfig {
                queue_size: 100,
                ..Default::default()
            },
            "queue_size",
        );
        bad(
            BlkTargetConfig {
                serial: "x".repeat(21),
                ..Default::default()
            },
            "serial",
        );
        bad(
            BlkTargetConfig {
                max_discard_seg: 0,
                ..Default::default()
            },
            "max_discard_seg",
        );
        bad(
            BlkTargetConfig {
                block_size: 4096,
                backend: Backing::Ram { size_bytes: 4097 },
                ..Default::default()
            },
            "backend.size_bytes",
        );
        bad(
            BlkTargetConfig {
                block_size: 4096,
                size_max: 512,
                ..Default::default()
            },
            "size_max",
        );
        BlkTargetConfig::default().validate().unwrap();
    }

    #[test]
    fn id_bytes_pad_and_fill() {
        let cfg = BlkTargetConfig {
            serial: "abc".into(),
            ..Default::default()
        };
        let id = cfg.id_bytes();
        assert_eq!(&id[..3], b"abc");
        assert!(id[3..].iter().all(|&b| b == 0));
        let cfg = BlkTargetConfig {
            serial: "0123456789abcdefghij".into(),
            ..Default::default()
        };
        assert_eq!(&cfg.id_bytes(), b"0123456789abcdefghij");
    }
}
