//! SBC block commands: READ/WRITE (10 and 16), WRITE SAME(16), SYNCHRONIZE
//! CACHE (10 and 16) and START STOP UNIT, plus the limits that decide between
//! 10- and 16-byte CDBs.

use crate::cdb::{opcode, Cdb};
use crate::error::EncodeError;

/// Most blocks one READ(10)/WRITE(10) can move (16-bit TRANSFER LENGTH).
pub const MAX_RW10_BLOCKS: u32 = u16::MAX as u32;
/// Highest LBA a 10-byte CDB can address.
pub const MAX_RW10_LBA: u64 = u32::MAX as u64;
/// Most blocks one READ(16)/WRITE(16) can move (32-bit TRANSFER LENGTH).
pub const MAX_RW16_BLOCKS: u32 = u32::MAX;

/// READ or WRITE of `blocks` at `lba` with default flags (the I/O path's encoder):
/// (10) when it fits, else (16) when `allow16`, else `None`; a zero-block transfer
/// (which a 10-byte CDB does not mean literally) or one beyond (16) is `None`. The CDB
/// comes as its first 16 bytes in one little-endian integer (the rest of a padded CDB
/// is zero), composed in registers: the caller stores it where the device reads it,
/// with no byte-wise stores into an array that is copied afterwards with wide loads
/// (which defeats store-to-load forwarding: a stall per I/O).
#[inline]
pub fn read_write_head(write: bool, lba: u64, blocks: u64, allow16: bool) -> Option<u128> {
    if blocks == 0 {
        return None;
    }
    if rw10_fits(lba, blocks) {
        let op = if write {
            opcode::WRITE_10
        } else {
            opcode::READ_10
        };
        // Bytes 2..6: LBA (big-endian); 7..9: TRANSFER LENGTH (big-endian).
        Some(
            u128::from(op)
                | (u128::from((lba as u32).swap_bytes()) << 16)
                | (u128::from((blocks as u16).swap_bytes()) << 56),
        )
    } else if allow16 && blocks <= MAX_RW16_BLOCKS as u64 {
        let op = if write {
            opcode::WRITE_16
        } else {
            opcode::READ_16
        };
        // Bytes 2..10: LBA; 10..14: TRANSFER LENGTH (both big-endian).
        Some(
            u128::from(op)
                | (u128::from(lba.swap_bytes()) << 16)
                | (u128::from((blocks as u32).swap_bytes()) << 80),
        )
    } else {
        None
    }
}

/// True when a transfer of `blocks` at `lba` fits a 10-byte CDB: the LBA
/// fits 32 bits and the length 16 bits.
pub const fn rw10_fits(lba: u64, blocks: u64) -> bool {
    lba <= MAX_RW10_LBA && blocks <= MAX_RW10_BLOCKS as u64
}

/// True when a transfer fits a 16-byte CDB: the length fits 32 bits and
/// the range does not wrap the 64-bit address space.
pub const fn rw16_fits(lba: u64, blocks: u64) -> bool {
    blocks <= MAX_RW16_BLOCKS as u64 && lba.checked_add(blocks).is_some()
}

/// Flags of READ and WRITE CDBs (byte 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RwFlags {
    /// DPO: disable page out (do not keep the data in cache).
    pub dpo: bool,
    /// FUA: force unit access (write through to the medium, read from it).
    pub fua: bool,
    /// RDPROTECT / WRPROTECT (3 bits); 0 without protection information.
    pub protect: u8,
}

impl RwFlags {
    /// Flags with only FUA set as given.
    pub const fn fua(fua: bool) -> Self {
        RwFlags {
            dpo: false,
            fua,
            protect: 0,
        }
    }

    fn encode(self) -> u8 {
        ((self.protect & 0x7) << 5)
            | if self.dpo { 0x10 } else { 0 }
            | if self.fua { 0x08 } else { 0 }
    }

    fn decode(b: u8) -> Self {
        RwFlags {
            dpo: b & 0x10 != 0,
            fua: b & 0x08 != 0,
            protect: b >> 5,
        }
    }
}

/// READ(10) or WRITE(10); the direction is the [`Command`](crate::command::Command) variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadWrite10Cdb {
    /// First LBA.
    pub lba: u32,
    /// TRANSFER LENGTH in blocks (0 moves no data).
    pub blocks: u16,
    /// DPO, FUA, protection.
    pub flags: RwFlags,
}

impl ReadWrite10Cdb {
    /// A 10-byte transfer, or an error if `lba` or `blocks` do not fit.
    pub fn new(lba: u64, blocks: u64, flags: RwFlags) -> Result<Self, EncodeError> {
        let lba = u32::try_from(lba).map_err(|_| EncodeError::LbaTooLarge { lba, bits: 32 })?;
        let blocks = u16::try_from(blocks)
            .map_err(|_| EncodeError::BlockCountTooLarge { blocks, bits: 16 })?;
        Ok(ReadWrite10Cdb { lba, blocks, flags })
    }

    /// The CDB with operation code `op` (READ(10) or WRITE(10)).
    pub(crate) fn to_cdb(self, op: u8) -> Cdb {
        let mut b = [0u8; 10];
        b[0] = op;
        b[1] = self.flags.encode();
        b[2..6].copy_from_slice(&self.lba.to_be_bytes());
        b[7..9].copy_from_slice(&self.blocks.to_be_bytes());
        Cdb::from_array(b)
    }

    pub(crate) fn decode(b: &[u8; 10]) -> Self {
        ReadWrite10Cdb {
            lba: u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
            blocks: u16::from_be_bytes([b[7], b[8]]),
            flags: RwFlags::decode(b[1]),
        }
    }

    /// READ(10) CDB.
    pub fn read_cdb(self) -> Cdb {
        self.to_cdb(opcode::READ_10)
    }

    /// WRITE(10) CDB.
    pub fn write_cdb(self) -> Cdb {
        self.to_cdb(opcode::WRITE_10)
    }
}

/// READ(16) or WRITE(16); the direction is the [`Command`](crate::command::Command) variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadWrite16Cdb {
    /// First LBA.
    pub lba: u64,
    /// TRANSFER LENGTH in blocks (0 moves no data).
    pub blocks: u32,
    /// DPO, FUA, protection.
    pub flags: RwFlags,
}

impl ReadWrite16Cdb {
    /// A 16-byte transfer, or an error if `blocks` does not fit 32 bits or
    /// the range wraps.
    pub fn new(lba: u64, blocks: u64, flags: RwFlags) -> Result<Self, EncodeError> {
        let n = u32::try_from(blocks)
            .map_err(|_| EncodeError::BlockCountTooLarge { blocks, bits: 32 })?;
        if lba.checked_add(blocks).is_none() {
            return Err(EncodeError::LbaOverflow { lba, blocks });
        }
        Ok(ReadWrite16Cdb {
            lba,
            blocks: n,
            flags,
        })
    }

    pub(crate) fn to_cdb(self, op: u8) -> Cdb {
        let mut b = [0u8; 16];
        b[0] = op;
        b[1] = self.flags.encode();
        b[2..10].copy_from_slice(&self.lba.to_be_bytes());
        b[10..14].copy_from_slice(&self.blocks.to_be_bytes());
        Cdb::from_array(b)
    }

    pub(crate) fn decode(b: &[u8; 16]) -> Self {
        ReadWrite16Cdb {
            lba: u64::from_be_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]),
            blocks: u32::from_be_bytes([b[10], b[11], b[12], b[13]]),
            flags: RwFlags::decode(b[1]),
        }
    }

    /// READ(16) CDB.
    pub fn read_cdb(self) -> Cdb {
        self.to_cdb(opcode::READ_16)
    }

    /// WRITE(16) CDB.
    pub fn write_cdb(self) -> Cdb {
        self.to_cdb(opcode::WRITE_16)
    }
}

impl From<ReadWrite10Cdb> for ReadWrite16Cdb {
    fn from(c: ReadWrite10Cdb) -> Self {
        ReadWrite16Cdb {
            lba: u64::from(c.lba),
            blocks: u32::from(c.blocks),
            flags: c.flags,
        }
    }
}

/// The READ CDB for `blocks` at `lba`: READ(10) when it fits
/// ([`rw10_fits`]), READ(16) otherwise.
pub fn read_cdb(lba: u64, blocks: u32, flags: RwFlags) -> Cdb {
    rw_cdb(lba, blocks, flags, opcode::READ_10, opcode::READ_16)
}

/// The WRITE CDB for `blocks` at `lba`: WRITE(10) when it fits
/// ([`rw10_fits`]), WRITE(16) otherwise.
pub fn write_cdb(lba: u64, blocks: u32, flags: RwFlags) -> Cdb {
    rw_cdb(lba, blocks, flags, opcode::WRITE_10, opcode::WRITE_16)
}

fn rw_cdb(lba: u64, blocks: u32, flags: RwFlags, op10: u8, op16: u8) -> Cdb {
    match (u32::try_from(lba), u16::try_from(blocks)) {
        (Ok(lba), Ok(blocks)) => ReadWrite10Cdb { lba, blocks, flags }.to_cdb(op10),
        _ => ReadWrite16Cdb { lba, blocks, flags }.to_cdb(op16),
    }
}

/// SYNCHRONIZE CACHE(10).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCache10Cdb {
    /// IMMED: complete before the cache is flushed.
    pub immed: bool,
    /// First LBA to flush.
    pub lba: u32,
    /// NUMBER OF LOGICAL BLOCKS; 0 means through the last LBA.
    pub blocks: u16,
}

impl SyncCache10Cdb {
    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        let mut b = [0u8; 10];
        b[0] = opcode::SYNCHRONIZE_CACHE_10;
        b[1] = if self.immed { 0x02 } else { 0 };
        b[2..6].copy_from_slice(&self.lba.to_be_bytes());
        b[7..9].copy_from_slice(&self.blocks.to_be_bytes());
        Cdb::from_array(b)
    }

    pub(crate) fn decode(b: &[u8; 10]) -> Self {
        SyncCache10Cdb {
            immed: b[1] & 0x02 != 0,
            lba: u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
            blocks: u16::from_be_bytes([b[7], b[8]]),
        }
    }
}

/// SYNCHRONIZE CACHE(16).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCache16Cdb {
    /// IMMED: complete before the cache is flushed.
    pub immed: bool,
    /// First LBA to flush.
    pub lba: u64,
    /// NUMBER OF LOGICAL BLOCKS; 0 means through the last LBA.
    pub blocks: u32,
}

impl SyncCache16Cdb {
    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        let mut b = [0u8; 16];
        b[0] = opcode::SYNCHRONIZE_CACHE_16;
        b[1] = if self.immed { 0x02 } else { 0 };
        b[2..10].copy_from_slice(&self.lba.to_be_bytes());
        b[10..14].copy_from_slice(&self.blocks.to_be_bytes());
        Cdb::from_array(b)
    }

    pub(crate) fn decode(b: &[u8; 16]) -> Self {
        SyncCache16Cdb {
            immed: b[1] & 0x02 != 0,
            lba: u64::from_be_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]),
            blocks: u32::from_be_bytes([b[10], b[11], b[12], b[13]]),
        }
    }
}

/// WRITE SAME(16): writes one block of data-out (or zeros with NDOB) to a
/// range, or unmaps it with UNMAP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteSame16Cdb {
    /// First LBA.
    pub lba: u64,
    /// NUMBER OF LOGICAL BLOCKS (0: through the last LBA, if WSNZ allows).
    pub blocks: u32,
    /// UNMAP: the range may be unmapped instead of written.
    pub unmap: bool,
    /// ANCHOR: anchor rather than deallocate.
    pub anchor: bool,
    /// NDOB: no data-out buffer; the blocks are written as zeros.
    pub ndob: bool,
    /// WRPROTECT (3 bits).
    pub protect: u8,
}

impl WriteSame16Cdb {
    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        let mut b = [0u8; 16];
        b[0] = opcode::WRITE_SAME_16;
        b[1] = ((self.protect & 0x7) << 5)
            | if self.anchor { 0x10 } else { 0 }
            | if self.unmap { 0x08 } else { 0 }
            | if self.ndob { 0x01 } else { 0 };
        b[2..10].copy_from_slice(&self.lba.to_be_bytes());
        b[10..14].copy_from_slice(&self.blocks.to_be_bytes());
        Cdb::from_array(b)
    }

    pub(crate) fn decode(b: &[u8; 16]) -> Self {
        WriteSame16Cdb {
            lba: u64::from_be_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]),
            blocks: u32::from_be_bytes([b[10], b[11], b[12], b[13]]),
            unmap: b[1] & 0x08 != 0,
            anchor: b[1] & 0x10 != 0,
            ndob: b[1] & 0x01 != 0,
            protect: b[1] >> 5,
        }
    }
}

/// START STOP UNIT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartStopUnitCdb {
    /// IMMED: complete before the operation does.
    pub immed: bool,
    /// POWER CONDITION (4 bits); 0 means use START and LOEJ.
    pub power_condition: u8,
    /// POWER CONDITION MODIFIER (4 bits).
    pub power_condition_modifier: u8,
    /// NO_FLUSH: do not flush the cache before stopping.
    pub no_flush: bool,
    /// LOEJ: load or eject the medium.
    pub loej: bool,
    /// START: make the unit ready (true) or stop it.
    pub start: bool,
}

impl StartStopUnitCdb {
    /// START UNIT: make the logical unit ready.
    pub const fn start() -> Self {
        StartStopUnitCdb {
            immed: false,
            power_condition: 0,
            power_condition_modifier: 0,
            no_flush: false,
            loej: false,
            start: true,
        }
    }

    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        Cdb::from_array([
            opcode::START_STOP_UNIT,
            u8::from(self.immed),
            0,
            self.power_condition_modifier & 0x0f,
            ((self.power_condition & 0x0f) << 4)
                | if self.no_flush { 0x04 } else { 0 }
                | if self.loej { 0x02 } else { 0 }
                | u8::from(self.start),
            0,
        ])
    }

    pub(crate) fn decode(b: &[u8; 6]) -> Self {
        StartStopUnitCdb {
            immed: b[1] & 0x01 != 0,
            power_condition: b[4] >> 4,
            power_condition_modifier: b[3] & 0x0f,
            no_flush: b[4] & 0x04 != 0,
            loej: b[4] & 0x02 != 0,
            start: b[4] & 0x01 != 0,
        }
    }
}

#[cfg(test)]
mod padded_tests {
    use super::*;

    #[test]
    fn padded_encoder_matches_the_builders() {
        for &(lba, blocks) in &[
            (0u64, 1u64),
            (7, 8),
            (0x0102_0304, 0x0506),
            (u32::MAX as u64, 65535),
            (1 << 33, 9),
            (0, 70_000),
            (0x0123_4567_89ab_cdef, 0x0102_0304),
        ] {
            for write in [false, true] {
                let mut p = [0u8; Cdb::MAX_LEN];
                p[..16].copy_from_slice(
                    &read_write_head(write, lba, blocks, true)
                        .unwrap()
                        .to_le_bytes(),
                );
                let want = if rw10_fits(lba, blocks) {
                    let x = ReadWrite10Cdb::new(lba, blocks, RwFlags::default()).unwrap();
                    if write {
                        x.write_cdb()
                    } else {
                        x.read_cdb()
                    }
                } else {
                    let x = ReadWrite16Cdb::new(lba, blocks, RwFlags::default()).unwrap();
                    if write {
                        x.write_cdb()
                    } else {
                        x.read_cdb()
                    }
                };
                assert_eq!(&p, want.padded(), "lba {lba} blocks {blocks} write {write}");
            }
        }
        assert_eq!(read_write_head(false, 1 << 33, 1, false), None);
        assert_eq!(read_write_head(false, 0, 0, true), None);
        assert_eq!(read_write_head(false, 0, 1 << 32, true), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits() {
        assert!(rw10_fits(0, 0));
        assert!(rw10_fits(u64::from(u32::MAX), 65535));
        assert!(!rw10_fits(u64::from(u32::MAX) + 1, 1));
        assert!(!rw10_fits(0, 65536));
        assert!(rw16_fits(u64::MAX - 10, 10));
        assert!(!rw16_fits(u64::MAX - 10, 11));
        assert!(!rw16_fits(0, 1 << 32));
    }

    #[test]
    fn read10_known_bytes() {
        let c = ReadWrite10Cdb::new(0x0102_0304, 0x0506, RwFlags::fua(true))
            .unwrap()
            .read_cdb();
        assert_eq!(c.as_bytes(), &[0x28, 0x08, 1, 2, 3, 4, 0, 5, 6, 0]);
        let c = ReadWrite10Cdb::new(0, 1, RwFlags::default())
            .unwrap()
            .write_cdb();
        assert_eq!(c.as_bytes(), &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn rw16_known_bytes() {
        let f = RwFlags {
            dpo: true,
            fua: true,
            protect: 0,
        };
        let c = ReadWrite16Cdb::new(0x0102_0304_0506_0708, 0x0a0b_0c0d, f)
            .unwrap()
            .write_cdb();
        assert_eq!(
            c.as_bytes(),
            &[0x8a, 0x18, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d, 0, 0]
        );
        assert_eq!(
            ReadWrite16Cdb::new(1, 1, f).unwrap().read_cdb().opcode(),
            0x88
        );
    }

    #[test]
    fn constructors_refuse_what_does_not_fit() {
        let f = RwFlags::default();
        assert_eq!(
            ReadWrite10Cdb::new(1 << 32, 1, f),
            Err(EncodeError::LbaTooLarge {
                lba: 1 << 32,
                bits: 32
            })
        );
        assert_eq!(
            ReadWrite10Cdb::new(0, 65536, f),
            Err(EncodeError::BlockCountTooLarge {
                blocks: 65536,
                bits: 16
            })
        );
        assert_eq!(
            ReadWrite16Cdb::new(0, 1 << 32, f),
            Err(EncodeError::BlockCountTooLarge {
                blocks: 1 << 32,
                bits: 32
            })
        );
        assert_eq!(
            ReadWrite16Cdb::new(u64::MAX, 2, f),
            Err(EncodeError::LbaOverflow {
                lba: u64::MAX,
                blocks: 2
            })
        );
    }

    #[test]
    fn automatic_size() {
        let f = RwFlags::fua(true);
        let c = read_cdb(100, 65535, f);
        assert_eq!(c.len(), 10);
        assert_eq!(c.opcode(), opcode::READ_10);
        let c = read_cdb(100, 65536, f);
        assert_eq!(c.len(), 16);
        assert_eq!(c.opcode(), opcode::READ_16);
        let c = write_cdb(1 << 32, 1, f);
        assert_eq!(c.opcode(), opcode::WRITE_16);
        let c = write_cdb(u64::from(u32::MAX), 1, f);
        assert_eq!(c.opcode(), opcode::WRITE_10);
        // What the CDBs decode to: command::tests::builders_decode_to_their_commands.
    }

    #[test]
    fn widen() {
        let c10 = ReadWrite10Cdb {
            lba: 5,
            blocks: 6,
            flags: RwFlags::fua(true),
        };
        let c16 = ReadWrite16Cdb::from(c10);
        assert_eq!((c16.lba, c16.blocks, c16.flags), (5, 6, c10.flags));
    }

    #[test]
    fn sync_cache_known_bytes() {
        let c = SyncCache10Cdb::default().to_cdb();
        assert_eq!(c.as_bytes(), &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let c = SyncCache16Cdb {
            immed: true,
            lba: 2,
            blocks: 3,
        }
        .to_cdb();
        assert_eq!(
            c.as_bytes(),
            &[0x91, 0x02, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0]
        );
    }

    #[test]
    fn write_same_known_bytes() {
        let c = WriteSame16Cdb {
            lba: 0x10,
            blocks: 0x20,
            unmap: true,
            ndob: true,
            ..Default::default()
        }
        .to_cdb();
        assert_eq!(
            c.as_bytes(),
            &[0x93, 0x09, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x20, 0, 0]
        );
    }

    #[test]
    fn start_stop_known_bytes() {
        let c = StartStopUnitCdb::start().to_cdb();
        assert_eq!(c.as_bytes(), &[0x1b, 0, 0, 0, 1, 0]);
        let c = StartStopUnitCdb {
            immed: true,
            power_condition: 3,
            power_condition_modifier: 1,
            no_flush: true,
            loej: true,
            start: false,
        }
        .to_cdb();
        assert_eq!(c.as_bytes(), &[0x1b, 1, 0, 1, 0x36, 0]);
    }
}
