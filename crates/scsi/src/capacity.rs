//! READ CAPACITY(10) and READ CAPACITY(16) (SBC-4 5.20, 5.21): CDB and
//! parameter data.

use crate::cdb::{opcode, Cdb};
use crate::error::ParseError;
use crate::wire::head;

/// READ CAPACITY(10) parameter data length.
pub const READ_CAPACITY_10_LEN: usize = 8;
/// READ CAPACITY(16) parameter data length.
pub const READ_CAPACITY_16_LEN: usize = 32;
/// Shortest READ CAPACITY(16) data accepted: LBA and block length.
const READ_CAPACITY_16_MIN_LEN: usize = 12;

/// READ CAPACITY(10) CDB (no fields: LBA and PMI are obsolete).
pub fn read_capacity_10_cdb() -> Cdb {
    let mut b = [0u8; 10];
    b[0] = opcode::READ_CAPACITY_10;
    Cdb::from_array(b)
}

/// READ CAPACITY(16) CDB: SERVICE ACTION IN(16), service action 10h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCapacity16Cdb {
    /// ALLOCATION LENGTH (normally [`READ_CAPACITY_16_LEN`]).
    pub alloc_len: u32,
}

impl Default for ReadCapacity16Cdb {
    fn default() -> Self {
        ReadCapacity16Cdb {
            alloc_len: READ_CAPACITY_16_LEN as u32,
        }
    }
}

impl ReadCapacity16Cdb {
    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        let mut b = [0u8; 16];
        b[0] = opcode::SERVICE_ACTION_IN_16;
        b[1] = opcode::SA_READ_CAPACITY_16;
        b[10..14].copy_from_slice(&self.alloc_len.to_be_bytes());
        Cdb::from_array(b)
    }

    pub(crate) fn decode(b: &[u8; 16]) -> Self {
        ReadCapacity16Cdb {
            alloc_len: u32::from_be_bytes([b[10], b[11], b[12], b[13]]),
        }
    }
}

fn check_block_len(block_len: u32, what: &'static str) -> Result<(), ParseError> {
    if block_len == 0 {
        Err(ParseError::Inconsistent {
            what,
            detail: "logical block length is zero",
        })
    } else {
        Ok(())
    }
}

/// READ CAPACITY(10) parameter data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCapacity10 {
    /// RETURNED LOGICAL BLOCK ADDRESS: the last LBA; FFFFFFFFh means the
    /// capacity does not fit and READ CAPACITY(16) must be used.
    pub last_lba: u32,
    /// LOGICAL BLOCK LENGTH IN BYTES.
    pub block_len: u32,
}

impl ReadCapacity10 {
    /// The capacity needs READ CAPACITY(16).
    pub fn needs_16(&self) -> bool {
        self.last_lba == u32::MAX
    }

    /// Number of logical blocks (last LBA + 1).
    pub fn block_count(&self) -> u64 {
        u64::from(self.last_lba) + 1
    }

    /// Parses the 8-byte data; a zero block length is an error.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "READ CAPACITY(10) data";
        let b = head::<READ_CAPACITY_10_LEN>(buf, what)?;
        let block_len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        check_block_len(block_len, what)?;
        Ok(ReadCapacity10 {
            last_lba: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            block_len,
        })
    }

    /// Encodes the data.
    pub fn encode(&self) -> [u8; READ_CAPACITY_10_LEN] {
        let mut b = [0u8; READ_CAPACITY_10_LEN];
        b[..4].copy_from_slice(&self.last_lba.to_be_bytes());
        b[4..].copy_from_slice(&self.block_len.to_be_bytes());
        b
    }

    /// What a target returns for a device of `blocks` blocks: the last LBA,
    /// or FFFFFFFFh when it does not fit 32 bits. `blocks` must be non-zero.
    pub fn for_capacity(blocks: u64, block_len: u32) -> Self {
        let last = blocks.saturating_sub(1);
        ReadCapacity10 {
            last_lba: u32::try_from(last).unwrap_or(u32::MAX),
            block_len,
        }
    }
}

/// READ CAPACITY(16) parameter data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCapacity16 {
    /// RETURNED LOGICAL BLOCK ADDRESS: the last LBA.
    pub last_lba: u64,
    /// LOGICAL BLOCK LENGTH IN BYTES.
    pub block_len: u32,
    /// P_TYPE (3 bits): protection type minus one, when `prot_en`.
    pub p_type: u8,
    /// PROT_EN: protection information is enabled.
    pub prot_en: bool,
    /// P_I_EXPONENT (4 bits).
    pub p_i_exponent: u8,
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (4 bits).
    pub lbppbe: u8,
    /// LBPME: logical block provisioning (thin provisioning, UNMAP) is enabled.
    pub lbpme: bool,
    /// LBPRZ: unmapped blocks read as zeros.
    pub lbprz: bool,
    /// LOWEST ALIGNED LOGICAL BLOCK ADDRESS (14 bits).
    pub lowest_aligned_lba: u16,
}

impl ReadCapacity16 {
    /// Data for a plain disk of `blocks` blocks (non-zero) of `block_len` bytes.
    pub fn new(blocks: u64, block_len: u32) -> Self {
        ReadCapacity16 {
            last_lba: blocks.saturating_sub(1),
            block_len,
            p_type: 0,
            prot_en: false,
            p_i_exponent: 0,
            lbppbe: 0,
            lbpme: false,
            lbprz: false,
            lowest_aligned_lba: 0,
        }
    }

    /// Number of logical blocks (last LBA + 1; parsing guarantees no overflow).
    pub fn block_count(&self) -> u64 {
        self.last_lba.saturating_add(1)
    }

    /// Physical block size in bytes, `None` if it overflows.
    pub fn physical_block_len(&self) -> Option<u32> {
        1u32.checked_shl(u32::from(self.lbppbe))
            .and_then(|n| n.checked_mul(self.block_len))
    }

    /// Capacity in bytes, `None` if it overflows 64 bits.
    pub fn capacity_bytes(&self) -> Option<u64> {
        self.block_count().checked_mul(u64::from(self.block_len))
    }

    /// Parses the data. At least the 12 bytes of LBA and block length are
    /// needed; flags past a shorter buffer read as clear. A zero block length
    /// or a last LBA of 2^64-1 (a block count that overflows) is an error.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "READ CAPACITY(16) data";
        let b = head::<READ_CAPACITY_16_MIN_LEN>(buf, what)?;
        let last_lba = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let block_len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        check_block_len(block_len, what)?;
        if last_lba == u64::MAX {
            return Err(ParseError::Inconsistent {
                what,
                detail: "last LBA of 2^64-1 gives more than 2^64 blocks",
            });
        }
        let at = |i: usize| buf.get(i).copied().unwrap_or(0);
        let (b12, b13, b14, b15) = (at(12), at(13), at(14), at(15));
        Ok(ReadCapacity16 {
            last_lba,
            block_len,
            p_type: (b12 >> 1) & 0x07,
            prot_en: b12 & 0x01 != 0,
            p_i_exponent: b13 >> 4,
            lbppbe: b13 & 0x0f,
            lbpme: b14 & 0x80 != 0,
            lbprz: b14 & 0x40 != 0,
            lowest_aligned_lba: u16::from_be_bytes([b14 & 0x3f, b15]),
        })
    }

    /// Encodes the 32-byte data.
    pub fn encode(&self) -> [u8; READ_CAPACITY_16_LEN] {
        let mut b = [0u8; READ_CAPACITY_16_LEN];
        b[..8].copy_from_slice(&self.last_lba.to_be_bytes());
        b[8..12].copy_from_slice(&self.block_len.to_be_bytes());
        b[12] = ((self.p_type & 0x07) << 1) | u8::from(self.prot_en);
        b[13] = ((self.p_i_exponent & 0x0f) << 4) | (self.lbppbe & 0x0f);
        let [hi, lo] = self.lowest_aligned_lba.to_be_bytes();
        b[14] = if self.lbpme { 0x80 } else { 0 } | if self.lbprz { 0x40 } else { 0 } | (hi & 0x3f);
        b[15] = lo;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rc10_known_bytes() {
        let b = [0x00, 0x1f, 0xff, 0xff, 0x00, 0x00, 0x02, 0x00];
        let c = ReadCapacity10::parse(&b).unwrap();
        assert_eq!(c.last_lba, 0x1f_ffff);
        assert_eq!(c.block_len, 512);
        assert_eq!(c.block_count(), 0x20_0000);
        assert!(!c.needs_16());
        assert_eq!(c.encode(), b);
        // Extra bytes are ignored.
        let mut long = b.to_vec();
        long.push(0xff);
        assert_eq!(ReadCapacity10::parse(&long).unwrap(), c);
    }

    #[test]
    fn rc10_for_capacity() {
        let c = ReadCapacity10::for_capacity(1 << 33, 512);
        assert!(c.needs_16());
        assert_eq!(c.block_count(), 1 << 32);
        // Exactly 2^32 blocks: the last LBA is FFFFFFFFh, which already means "use 16".
        assert!(ReadCapacity10::for_capacity(1 << 32, 512).needs_16());
        let c = ReadCapacity10::for_capacity((1 << 32) - 1, 4096);
        assert_eq!(c.last_lba, u32::MAX - 1);
        assert!(!c.needs_16());
        assert_eq!(ReadCapacity10::parse(&c.encode()).unwrap(), c);
    }

    #[test]
    fn rc10_errors() {
        assert_eq!(
            ReadCapacity10::parse(&[0; 7]),
            Err(ParseError::TooShort {
                what: "READ CAPACITY(10) data",
                need: 8,
                got: 7
            })
        );
        assert_eq!(
            ReadCapacity10::parse(&[0, 0, 0, 1, 0, 0, 0, 0]),
            Err(ParseError::Inconsistent {
                what: "READ CAPACITY(10) data",
                detail: "logical block length is zero"
            })
        );
    }

    #[test]
    fn rc16_round_trip() {
        let c = ReadCapacity16 {
            last_lba: (1 << 40) - 1,
            block_len: 512,
            p_type: 1,
            prot_en: true,
            p_i_exponent: 2,
            lbppbe: 3,
            lbpme: true,
            lbprz: true,
            lowest_aligned_lba: 0x3fff,
        };
        let b = c.encode();
        assert_eq!(
            &b[..16],
            &[0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 2, 0, 0x03, 0x23, 0xff, 0xff]
        );
        assert!(b[16..].iter().all(|&x| x == 0));
        let p = ReadCapacity16::parse(&b).unwrap();
        assert_eq!(p, c);
        assert_eq!(p.block_count(), 1 << 40);
        assert_eq!(p.physical_block_len(), Some(4096));
        assert_eq!(p.capacity_bytes(), Some(512 << 40));
    }

    #[test]
    fn rc16_thin_provisioned_bytes() {
        // 2 GiB of 512-byte blocks, LBPME and LBPRZ set, nothing else.
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&0x003f_ffffu64.to_be_bytes());
        b[8..12].copy_from_slice(&512u32.to_be_bytes());
        b[14] = 0xc0;
        let c = ReadCapacity16::parse(&b).unwrap();
        assert!(c.lbpme);
        assert!(c.lbprz);
        assert_eq!(c.block_count(), 1 << 22);
        assert_eq!(c.lowest_aligned_lba, 0);
        assert_eq!(c.physical_block_len(), Some(512));
        assert_eq!(c.encode(), b);
    }

    #[test]
    fn rc16_short_and_errors() {
        let c = ReadCapacity16::new(1 << 20, 4096);
        let b = c.encode();
        assert_eq!(ReadCapacity16::parse(&b[..12]).unwrap(), c);
        assert_eq!(ReadCapacity16::parse(&b[..16]).unwrap(), c);
        assert_eq!(
            ReadCapacity16::parse(&b[..11]),
            Err(ParseError::TooShort {
                what: "READ CAPACITY(16) data",
                need: 12,
                got: 11
            })
        );
        let mut z = b;
        z[8..12].copy_from_slice(&[0; 4]);
        assert!(matches!(
            ReadCapacity16::parse(&z),
            Err(ParseError::Inconsistent { .. })
        ));
        let mut m = b;
        m[..8].copy_from_slice(&[0xff; 8]);
        assert!(matches!(
            ReadCapacity16::parse(&m),
            Err(ParseError::Inconsistent { .. })
        ));
        let huge = ReadCapacity16::new(1 << 60, 1 << 20);
        assert_eq!(huge.capacity_bytes(), None);
        let mut odd = huge;
        odd.lbppbe = 15;
        odd.block_len = 1 << 20;
        assert_eq!(odd.physical_block_len(), None);
    }

    #[test]
    fn cdbs() {
        assert_eq!(
            read_capacity_10_cdb().as_bytes(),
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let c = ReadCapacity16Cdb::default().to_cdb();
        assert_eq!(
            c.as_bytes(),
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]
        );
    }
}
