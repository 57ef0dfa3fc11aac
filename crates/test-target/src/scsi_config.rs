//! virtio-scsi target configuration: the targets and logical units, what each logical unit
//! advertises (and enforces), the feature bits, and the device configuration space (virtio 1.2,
//! 5.6.4) the front-end reads with `GET_CONFIG`.

use std::collections::BTreeMap;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vireo_scsi::SenseFormat;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_scsi::{VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG};

pub use crate::blk_config::Backing;
use crate::TargetError;

/// Size of `struct virtio_scsi_config`.
pub const SCSI_CONFIG_SIZE: usize = 36;

/// Size of `struct virtio_scsi_event` (`event_info_size` in the config space).
pub const EVENT_INFO_SIZE: u32 = 16;

/// Default `sense_size` of the config space.
pub const DEFAULT_SENSE_SIZE: u32 = 96;

/// Default `cdb_size` of the config space.
pub const DEFAULT_CDB_SIZE: u32 = 32;

/// Largest `sense_size` a driver may write (SPC limits sense data to 252 bytes).
pub const MAX_SENSE_SIZE: u32 = 252;

/// Largest `cdb_size` a driver may write (the longest variable-length CDB).
pub const MAX_CDB_SIZE: u32 = 260;

/// Largest target number: `lun[1]` of the virtio-scsi LUN field is one byte.
pub const MAX_TARGET: u16 = 255;

/// Largest LUN: the virtio-scsi LUN field carries a 14-bit flat space LUN.
pub const MAX_LUN: u16 = 0x3fff;

/// Largest number of request queues (control + event + requests stay within the 64 queues the
/// backend can map to worker threads).
pub const MAX_REQUEST_QUEUES: u16 = 62;

/// Offsets of the config space fields the driver may write.
const SENSE_SIZE_OFFSET: usize = 20;
const CDB_SIZE_OFFSET: usize = 24;

/// Largest configuration space a vhost-user `GET_CONFIG` may address.
const VHOST_USER_CONFIG_SPACE: u32 = 0x1000;

/// The block limits (VPD page B0h) a logical unit advertises. The target enforces the transfer,
/// unmap and write-same limits: a command beyond them ends with CHECK CONDITION and is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimitsConfig {
    /// MAXIMUM TRANSFER LENGTH in blocks; READ/WRITE with more blocks end with ILLEGAL REQUEST /
    /// INVALID FIELD IN CDB. 0: no limit reported or enforced.
    pub max_transfer_length: u32,
    /// OPTIMAL TRANSFER LENGTH in blocks (0: not reported).
    pub optimal_transfer_length: u32,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY in blocks (0: not reported).
    pub optimal_transfer_granularity: u16,
    /// MAXIMUM UNMAP LBA COUNT: most blocks one UNMAP may name, summed over its descriptors
    /// (`u32::MAX`: no limit). Reported as 0 when the unit does not support UNMAP.
    pub max_unmap_lba_count: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (`u32::MAX`: no limit beyond the 4095 a parameter
    /// list can carry). Reported as 0 when the unit does not support UNMAP.
    pub max_unmap_descriptor_count: u32,
    /// OPTIMAL UNMAP GRANULARITY in blocks (0: not reported).
    pub optimal_unmap_granularity: u32,
    /// MAXIMUM WRITE SAME LENGTH in blocks; longer WRITE SAME(16) end with INVALID FIELD IN CDB.
    /// 0: no limit reported or enforced.
    pub max_write_same_length: u64,
}

impl Default for BlockLimitsConfig {
    fn default() -> Self {
        BlockLimitsConfig {
            max_transfer_length: 0,
            optimal_transfer_length: 0,
            optimal_transfer_granularity: 0,
            max_unmap_lba_count: u32::MAX,
            max_unmap_descriptor_count: u32::MAX,
            optimal_unmap_granularity: 0,
            max_write_same_length: 0,
        }
    }
}

/// One logical unit (a disk) of the scsi target. `Default` gives a 64 MiB RAM disk with 512-byte
/// blocks that supports every command of the emulation and is ready at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunConfig {
    /// Where the data lives. A sparse file can hold more than 2^32 blocks.
    pub backend: Backing,
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    /// Write protected: MODE SENSE reports WP, and writes, UNMAP and WRITE SAME end with DATA
    /// PROTECT / WRITE PROTECTED.
    pub read_only: bool,
    /// UNMAP supported (VPD B2h LBPU, READ CAPACITY(16) LBPME and LBPRZ; unmapped blocks read as
    /// zeros). Without it UNMAP is an invalid operation code.
    pub support_unmap: bool,
    /// WRITE SAME(16) supported (with UNMAP: VPD B2h LBPWS). Without it WRITE SAME(16) is an
    /// invalid operation code.
    pub support_write_same: bool,
    /// READ(16), WRITE(16) and SYNCHRONIZE CACHE(16) supported. Without them those are invalid
    /// operation codes (an SBC-2 style disk); the capacity must then fit 32-bit LBAs.
    pub support_16: bool,
    /// The block limits advertised in VPD B0h (and enforced).
    pub limits: BlockLimitsConfig,
    /// WCE of the caching mode page: writes need SYNCHRONIZE CACHE to be durable.
    pub write_cache: bool,
    /// T10 VENDOR IDENTIFICATION (at most 8 printable ASCII characters).
    pub vendor: String,
    /// PRODUCT IDENTIFICATION (at most 16).
    pub product: String,
    /// PRODUCT REVISION LEVEL (at most 4).
    pub revision: String,
    /// Unit serial number (VPD 80h, and the base of the 83h designators); `None` derives a
    /// unique one from the target and LUN numbers.
    pub serial: Option<String>,
    /// The first K TEST UNIT READYs after each connect end with NOT READY / LOGICAL UNIT IS IN
    /// PROCESS OF BECOMING READY (04/01); media access commands get the same meanwhile.
    pub not_ready_tur_count: u32,
    /// The unit is stopped after each connect: TEST UNIT READY and media access commands end with
    /// NOT READY / INITIALIZING COMMAND REQUIRED (04/02) until a START STOP UNIT with START.
    pub start_required: bool,
}

impl Default for LunConfig {
    fn default() -> Self {
        LunConfig {
            backend: Backing::Ram {
                size_bytes: 64 << 20,
            },
            block_size: 512,
            read_only: false,
            support_unmap: true,
            support_write_same: true,
            support_16: true,
            limits: BlockLimitsConfig::default(),
            write_cache: true,
            vendor: "VIREO".to_string(),
            product: "TEST TARGET".to_string(),
            revision: "0001".to_string(),
            serial: None,
            not_ready_tur_count: 0,
            start_required: false,
        }
    }
}

/// How the vhost-user-scsi target behaves. `Default` gives target 0 with one default
/// [`LunConfig`] as LUN 0, one request queue of up to 256 entries and every optional feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiTargetConfig {
    /// The logical units at start, by `(target, LUN)`. A target exists while it has at least one
    /// logical unit; commands to any other target end with `VIRTIO_SCSI_S_BAD_TARGET`.
    pub luns: BTreeMap<(u8, u16), LunConfig>,
    /// `max_target` of the config space: the driver scans targets `0..=max_target`, and LUNs may
    /// be hot-added to any of them. `None`: the highest target of `luns` (0 when empty).
    pub max_target: Option<u16>,
    /// `max_lun` of the config space (at most 16383).
    pub max_lun: u32,
    /// Request queues (`num_queues` of the config space), 1..=62; the device has two more, the
    /// control and the event queue.
    pub num_request_queues: u16,
    /// Largest queue size the driver may set (a power of two, at most 32768; default 1024,
    /// QEMU's largest, so front-ends with larger defaults than 128 are served, e.g. SPDK's 512).
    pub queue_size: u16,
    /// `seg_max`: most data segments (descriptors of data-in or data-out) in one command; a
    /// command with more ends with `VIRTIO_SCSI_S_FAILURE` and is counted. At least 1.
    pub seg_max: u32,
    /// `max_sectors`: the transfer size hint in 512-byte sectors. Not enforced (the spec calls it
    /// a hint); larger transfers are counted.
    pub max_sectors: u32,
    /// `cmd_per_lun` hint.
    pub cmd_per_lun: u32,
    /// Offer `VIRTIO_SCSI_F_HOTPLUG` (transport reset events when LUNs come and go).
    pub hotplug: bool,
    /// Offer `VIRTIO_SCSI_F_CHANGE` (parameter change events, e.g. on resize).
    pub change: bool,
    /// Offer `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// Offer `VIRTIO_RING_F_INDIRECT_DESC`.
    pub indirect_desc: bool,
    /// Report UNIT ATTENTION / POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29/00) on the first
    /// command to each logical unit after each connect (INQUIRY, REPORT LUNS and REQUEST SENSE
    /// excepted, as SPC-5 says).
    pub power_on_unit_attention: bool,
    /// Establish the UNIT ATTENTION SAM-5 requires after a LOGICAL UNIT RESET (29/03) or an
    /// I_T NEXUS RESET (29/07) task management function.
    pub reset_unit_attention: bool,
    /// Establish REPORTED LUNS DATA HAS CHANGED (3F/0E) on the other logical units of a target
    /// when a LUN is added to or removed from it (SPC-5; QEMU and LIO do it).
    pub luns_changed_unit_attention: bool,
    /// Format of the sense data of CHECK CONDITION (the control mode page's D_SENSE reports it).
    pub sense_format: SenseFormat,
    /// Never complete task management functions (some real targets never answer them); can
    /// also be switched at run time with [`ScsiFaults`](crate::ScsiFaults).
    pub tmf_never_answer: bool,
    /// Offer the vhost-user `CONFIG` protocol feature. `false` behaves like SPDK's
    /// vhost-scsi, which has no readable configuration space: the front-end must make do
    /// with `GET_QUEUE_NUM` and the spec's defaults.
    pub config_space: bool,
}

impl Default for ScsiTargetConfig {
    fn default() -> Self {
        ScsiTargetConfig {
            luns: BTreeMap::from([((0, 0), LunConfig::default())]),
            max_target: None,
            max_lun: u32::from(MAX_LUN),
            num_request_queues: 1,
            queue_size: 1024,
            seg_max: 254,
            max_sectors: 0xffff,
            cmd_per_lun: 128,
            hotplug: true,
            change: true,
            event_idx: true,
            indirect_desc: true,
            power_on_unit_attention: false,
            reset_unit_attention: true,
            luns_changed_unit_attention: true,
            sense_format: SenseFormat::Fixed,
            tmf_never_answer: false,
            config_space: true,
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> TargetError {
    TargetError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

impl LunConfig {
    /// Checks every field that does not depend on the backing store.
    pub fn validate(&self) -> Result<(), TargetError> {
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(invalid(
                "lun.block_size",
                format!("{} is not 512 or 4096", self.block_size),
            ));
        }
        let size = match &self.backend {
            Backing::Ram { size_bytes } => Some(*size_bytes),
            Backing::File { size_bytes, .. } => *size_bytes,
        };
        if let Some(size) = size {
            if size == 0 || !size.is_multiple_of(u64::from(self.block_size)) {
                return Err(invalid(
                    "lun.backend.size_bytes",
                    format!(
                        "{size} is not a non-zero multiple of the block size {}",
                        self.block_size
                    ),
                ));
            }
            self.check_capacity(size / u64::from(self.block_size))?;
        }
        if self.support_unmap
            && (self.limits.max_unmap_lba_count == 0 || self.limits.max_unmap_descriptor_count == 0)
        {
            return Err(invalid(
                "lun.limits.max_unmap_lba_count",
                "UNMAP limits must be non-zero when UNMAP is supported (0 means not supported)",
            ));
        }
        for (field, value, max) in [
            ("lun.vendor", &self.vendor, 8),
            ("lun.product", &self.product, 16),
            ("lun.revision", &self.revision, 4),
        ] {
            if !printable(value) || value.len() > max {
                return Err(invalid(
                    field,
                    format!("{value:?} is not printable ASCII of at most {max} characters"),
                ));
            }
        }
        if let Some(serial) = &self.serial {
            if serial.is_empty() || !printable(serial) || serial.len() > 64 {
                return Err(invalid(
                    "lun.serial",
                    format!("{serial:?} is not 1 to 64 printable ASCII characters"),
                ));
            }
        }
        Ok(())
    }

    /// Checks a capacity in blocks against what the unit's CDBs can address.
    pub(crate) fn check_capacity(&self, blocks: u64) -> Result<(), TargetError> {
        if !self.support_16 && blocks > 1 << 32 {
            return Err(invalid(
                "lun.support_16",
                format!("{blocks} blocks need 64-bit LBAs, which only 16-byte CDBs carry"),
            ));
        }
        Ok(())
    }
}

impl ScsiTargetConfig {
    /// `targets` targets of `luns_per_target` logical units each (LUNs `0..luns_per_target`),
    /// every unit made by `make(target, lun)`; `max_target` is the last target.
    pub fn grid(
        targets: u8,
        luns_per_target: u16,
        mut make: impl FnMut(u8, u16) -> LunConfig,
    ) -> Self {
        let mut luns = BTreeMap::new();
        for t in 0..targets {
            for l in 0..luns_per_target {
                luns.insert((t, l), make(t, l));
            }
        }
        ScsiTargetConfig {
            luns,
            max_target: Some(u16::from(targets.saturating_sub(1))),
            ..Default::default()
        }
    }

    /// The `max_target` the config space reports.
    pub fn effective_max_target(&self) -> u16 {
        self.max_target.unwrap_or_else(|| {
            self.luns
                .keys()
                .map(|&(t, _)| u16::from(t))
                .max()
                .unwrap_or(0)
        })
    }

    /// Checks every field that does not depend on the backing stores.
    pub fn validate(&self) -> Result<(), TargetError> {
        let max_target = self.effective_max_target();
        if max_target > MAX_TARGET {
            return Err(invalid(
                "max_target",
                format!("{max_target} is more than {MAX_TARGET}"),
            ));
        }
        if self.max_lun > u32::from(MAX_LUN) {
            return Err(invalid(
                "max_lun",
                format!("{} is more than {MAX_LUN}", self.max_lun),
            ));
        }
        for (&(t, l), lun) in &self.luns {
            if u16::from(t) > max_target {
                return Err(invalid(
                    "luns",
                    format!("target {t} is beyond max_target {max_target}"),
                ));
            }
            if u32::from(l) > self.max_lun {
                return Err(invalid(
                    "luns",
                    format!("LUN {l} of target {t} is beyond max_lun {}", self.max_lun),
                ));
            }
            lun.validate()?;
        }
        if self.num_request_queues == 0 || self.num_request_queues > MAX_REQUEST_QUEUES {
            return Err(invalid(
                "num_request_queues",
                format!(
                    "{} is not in 1..={MAX_REQUEST_QUEUES}",
                    self.num_request_queues
                ),
            ));
        }
        if self.queue_size == 0 || !self.queue_size.is_power_of_two() || self.queue_size > 32768 {
            return Err(invalid(
                "queue_size",
                format!("{} is not a power of two in 1..=32768", self.queue_size),
            ));
        }
        for (field, value) in [
            ("seg_max", self.seg_max),
            ("max_sectors", self.max_sectors),
            ("cmd_per_lun", self.cmd_per_lun),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// All queues of the device: control, event and the request queues.
    pub fn total_queues(&self) -> usize {
        2 + usize::from(self.num_request_queues)
    }

    /// The virtio feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut set = |on: bool, bit: u32| {
            if on {
                f |= 1u64 << bit;
            }
        };
        set(self.indirect_desc, VIRTIO_RING_F_INDIRECT_DESC);
        set(self.event_idx, VIRTIO_RING_F_EVENT_IDX);
        set(self.hotplug, VIRTIO_SCSI_F_HOTPLUG);
        set(self.change, VIRTIO_SCSI_F_CHANGE);
        f
    }

    /// The vhost-user protocol features the device offers (`CONFIG` only with
    /// [`config_space`](Self::config_space)).
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.config_space {
            f | VhostUserProtocolFeatures::CONFIG
        } else {
            f
        }
    }

    /// Encodes `struct virtio_scsi_config` (little endian) with the default sense and CDB sizes.
    pub fn config_space(&self) -> [u8; SCSI_CONFIG_SIZE] {
        let mut c = [0u8; SCSI_CONFIG_SIZE];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &u32::from(self.num_request_queues).to_le_bytes());
        put(4, &self.seg_max.to_le_bytes());
        put(8, &self.max_sectors.to_le_bytes());
        put(12, &self.cmd_per_lun.to_le_bytes());
        put(16, &EVENT_INFO_SIZE.to_le_bytes());
        put(SENSE_SIZE_OFFSET, &DEFAULT_SENSE_SIZE.to_le_bytes());
        put(CDB_SIZE_OFFSET, &DEFAULT_CDB_SIZE.to_le_bytes());
        put(28, &0u16.to_le_bytes()); // max_channel
        put(30, &self.effective_max_target().to_le_bytes());
        put(32, &self.max_lun.to_le_bytes());
        c
    }
}

/// The sense and CDB sizes of a config space.
pub(crate) fn sizes_of(space: &[u8; SCSI_CONFIG_SIZE]) -> (u32, u32) {
    let le32 = |off: usize| {
        u32::from_le_bytes([space[off], space[off + 1], space[off + 2], space[off + 3]])
    };
    (le32(SENSE_SIZE_OFFSET), le32(CDB_SIZE_OFFSET))
}

/// Why a `SET_CONFIG` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigWriteError {
    /// The write covers bytes outside `sense_size` and `cdb_size`, the only writable fields.
    #[error(
        "config bytes {offset}..+{len} are not all in the writable sense_size/cdb_size fields"
    )]
    ReadOnlyField {
        /// Offset of the write.
        offset: u32,
        /// Length of the write.
        len: usize,
    },
    /// The resulting `sense_size` or `cdb_size` is out of range.
    #[error("{field} {value} is not in 1..={max}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value written.
        value: u32,
        /// Largest value accepted.
        max: u32,
    },
}

/// Applies a driver's `SET_CONFIG` of `buf` at `offset` to `space`: only `sense_size` and
/// `cdb_size` are writable (virtio 1.2, 5.6.4), within bounds; anything else is refused and
/// leaves `space` as it was (the backend then ignores the write).
pub(crate) fn write_config(
    space: &mut [u8; SCSI_CONFIG_SIZE],
    offset: u32,
    buf: &[u8],
) -> Result<(), ConfigWriteError> {
    let start = offset as usize;
    let refused = ConfigWriteError::ReadOnlyField {
        offset,
        len: buf.len(),
    };
    let end = start.checked_add(buf.len()).ok_or(refused.clone())?;
    if start < SENSE_SIZE_OFFSET || end > CDB_SIZE_OFFSET + 4 {
        return Err(refused);
    }
    let mut next = *space;
    next[start..end].copy_from_slice(buf);
    let (sense, cdb) = sizes_of(&next);
    if sense == 0 || sense > MAX_SENSE_SIZE {
        return Err(ConfigWriteError::OutOfRange {
            field: "sense_size",
            value: sense,
            max: MAX_SENSE_SIZE,
        });
    }
    if cdb == 0 || cdb > MAX_CDB_SIZE {
        return Err(ConfigWriteError::OutOfRange {
            field: "cdb_size",
            value: cdb,
            max: MAX_CDB_SIZE,
        });
    }
    *space = next;
    Ok(())
}

/// Answers a `GET_CONFIG` for `size` bytes at `offset` of `space`: bytes past the structure read
/// as zero; a window outside the vhost-user config space or of size 0 yields an empty vector
/// (a failed request for the front-end).
pub(crate) fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    if size == 0 || u64::from(offset) + u64::from(size) > u64::from(VHOST_USER_CONFIG_SPACE) {
        return Vec::new();
    }
    crate::blk_config::read_config(space, offset, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use virtio_bindings::virtio_scsi::virtio_scsi_config;

    fn le32(c: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(c[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn config_offsets_match_the_spec_struct() {
        assert_eq!(std::mem::size_of::<virtio_scsi_config>(), SCSI_CONFIG_SIZE);
        assert_eq!(offset_of!(virtio_scsi_config, num_queues), 0);
        assert_eq!(offset_of!(virtio_scsi_config, seg_max), 4);
        assert_eq!(offset_of!(virtio_scsi_config, max_sectors), 8);
        assert_eq!(offset_of!(virtio_scsi_config, cmd_per_lun), 12);
        assert_eq!(offset_of!(virtio_scsi_config, event_info_size), 16);
        assert_eq!(
            offset_of!(virtio_scsi_config, sense_size),
            SENSE_SIZE_OFFSET
        );
        assert_eq!(offset_of!(virtio_scsi_config, cdb_size), CDB_SIZE_OFFSET);
        assert_eq!(offset_of!(virtio_scsi_config, max_channel), 28);
        assert_eq!(offset_of!(virtio_scsi_config, max_target), 30);
        assert_eq!(offset_of!(virtio_scsi_config, max_lun), 32);
    }

    #[test]
    fn config_space_encodes_the_layout() {
        let cfg = ScsiTargetConfig {
            num_request_queues: 3,
            seg_max: 17,
            max_sectors: 1024,
            cmd_per_lun: 8,
            max_lun: 255,
            ..ScsiTargetConfig::grid(4, 4, |_, _| LunConfig::default())
        };
        cfg.validate().unwrap();
        let c = cfg.config_space();
        assert_eq!(le32(&c, 0), 3);
        assert_eq!(le32(&c, 4), 17);
        assert_eq!(le32(&c, 8), 1024);
        assert_eq!(le32(&c, 12), 8);
        assert_eq!(le32(&c, 16), 16);
        assert_eq!(le32(&c, 20), 96);
        assert_eq!(le32(&c, 24), 32);
        assert_eq!(u16::from_le_bytes([c[28], c[29]]), 0);
        assert_eq!(u16::from_le_bytes([c[30], c[31]]), 3);
        assert_eq!(le32(&c, 32), 255);
        assert_eq!(cfg.total_queues(), 5);
        assert_eq!(cfg.luns.len(), 16);
    }

    #[test]
    fn max_target_defaults_to_the_highest_target() {
        let mut cfg = ScsiTargetConfig::default();
        cfg.luns.insert((7, 2), LunConfig::default());
        assert_eq!(cfg.effective_max_target(), 7);
        cfg.luns.clear();
        assert_eq!(cfg.effective_max_target(), 0);
        cfg.validate().unwrap();
        cfg.max_target = Some(31);
        assert_eq!(cfg.effective_max_target(), 31);
    }

    #[test]
    fn features_follow_config() {
        let f = ScsiTargetConfig::default().device_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_SCSI_F_HOTPLUG,
            VIRTIO_SCSI_F_CHANGE,
            30, // VHOST_USER_F_PROTOCOL_FEATURES
        ] {
            assert_ne!(f & 1 << bit, 0, "bit {bit}");
        }
        // Never offered: INOUT (0) and T10_PI (3).
        assert_eq!(f & (1 << 0 | 1 << 3), 0);
        let f = ScsiTargetConfig {
            hotplug: false,
            change: false,
            event_idx: false,
            indirect_desc: false,
            ..Default::default()
        }
        .device_features();
        for bit in [
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_SCSI_F_HOTPLUG,
            VIRTIO_SCSI_F_CHANGE,
        ] {
            assert_eq!(f & 1 << bit, 0, "bit {bit}");
        }
    }

    #[test]
    fn only_sense_and_cdb_size_are_writable() {
        let cfg = ScsiTargetConfig::default();
        let mut space = cfg.config_space();
        write_config(&mut space, 20, &128u32.to_le_bytes()).unwrap();
        write_config(&mut space, 24, &16u32.to_le_bytes()).unwrap();
        assert_eq!(sizes_of(&space), (128, 16));
        // One byte of a field.
        write_config(&mut space, 20, &[100]).unwrap();
        assert_eq!(sizes_of(&space), (100, 16));
        let before = space;
        assert!(matches!(
            write_config(&mut space, 0, &[1, 0, 0, 0]),
            Err(ConfigWriteError::ReadOnlyField { .. })
        ));
        assert!(matches!(
            write_config(&mut space, 24, &[0; 8]),
            Err(ConfigWriteError::ReadOnlyField { .. })
        ));
        assert!(matches!(
            write_config(&mut space, 20, &0u32.to_le_bytes()),
            Err(ConfigWriteError::OutOfRange {
                field: "sense_size",
                ..
            })
        ));
        assert!(matches!(
            write_config(&mut space, 24, &1000u32.to_le_bytes()),
            Err(ConfigWriteError::OutOfRange {
                field: "cdb_size",
                ..
            })
        ));
        assert!(write_config(&mut space, u32::MAX, &[1]).is_err());
        assert_eq!(space, before);
    }

    #[test]
    fn read_config_windows() {
        let space = ScsiTargetConfig::default().config_space();
        assert_eq!(read_config(&space, 20, 4), 96u32.to_le_bytes());
        assert_eq!(read_config(&space, 32, 4), 0x3fffu32.to_le_bytes());
        // Straddling the end: zero padded.
        assert_eq!(read_config(&space, 33, 4), vec![0x3f, 0, 0, 0]);
        assert!(read_config(&space, 0, 0).is_empty());
        assert!(read_config(&space, 4095, 2).is_empty());
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |cfg: ScsiTargetConfig, field: &str| match cfg.validate() {
            Err(TargetError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected error on {field}, got {other:?}"),
        };
        let lun = |l: LunConfig| ScsiTargetConfig {
            luns: BTreeMap::from([((0, 0), l)]),
            ..Default::default()
        };
        bad(
            lun(LunConfig {
                block_size: 1024,
                ..Default::default()
            }),
            "lun.block_size",
        );
        bad(
            lun(LunConfig {
                block_size: 4096,
                backend: Backing::Ram { size_bytes: 6144 },
                ..Default::default()
            }),
            "lun.backend.size_bytes",
        );
        bad(
            lun(LunConfig {
                support_16: false,
                backend: Backing::File {
                    path: "/nonexistent".into(),
                    size_bytes: Some((1 << 32) * 512 + 512),
                },
                ..Default::default()
            }),
            "lun.support_16",
        );
        bad(
            lun(LunConfig {
                limits: BlockLimitsConfig {
                    max_unmap_descriptor_count: 0,
                    ..Default::default()
                },
                ..Default::default()
            }),
            "lun.limits.max_unmap_lba_count",
        );
        bad(
            lun(LunConfig {
                vendor: "TOO LONG VENDOR".into(),
                ..Default::default()
            }),
            "lun.vendor",
        );
        bad(
            lun(LunConfig {
                serial: Some("tab\there".into()),
                ..Default::default()
            }),
            "lun.serial",
        );
        bad(
            ScsiTargetConfig {
                max_target: Some(1),
                luns: BTreeMap::from([((2, 0), LunConfig::default())]),
                ..Default::default()
            },
            "luns",
        );
        bad(
            ScsiTargetConfig {
                max_lun: 7,
                luns: BTreeMap::from([((0, 8), LunConfig::default())]),
                ..Default::default()
            },
            "luns",
        );
        bad(
            ScsiTargetConfig {
                max_target: Some(256),
                ..Default::default()
            },
            "max_target",
        );
        bad(
            ScsiTargetConfig {
                max_lun: 0x4000,
                ..Default::default()
            },
            "max_lun",
        );
        bad(
            ScsiTargetConfig {
                num_request_queues: 63,
                ..Default::default()
            },
            "num_request_queues",
        );
        bad(
            ScsiTargetConfig {
                queue_size: 100,
                ..Default::default()
            },
            "queue_size",
        );
        bad(
            ScsiTargetConfig {
                seg_max: 0,
                ..Default::default()
            },
            "seg_max",
        );
        ScsiTargetConfig::default().validate().unwrap();
    }
}
