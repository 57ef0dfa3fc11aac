//! UNMAP (SBC-4 5.30): the CDB and its parameter list of an 8-byte header
//! and 16-byte block descriptors.
//!
//! The parameter list length is a 16-bit CDB field, so a list is at most
//! 65535 bytes: [`MAX_UNMAP_DESCRIPTORS_PER_LIST`] descriptors of at most
//! [`MAX_UNMAP_BLOCKS_PER_DESCRIPTOR`] blocks each. [`UnmapListWriter`]
//! builds a list in a caller's buffer (no allocation, for the I/O path) and
//! refuses anything past those limits.

use crate::cdb::{opcode, Cdb};
use crate::error::{EncodeError, ParseError};
use crate::wire::{be64_at, head, put};

/// Bytes of the parameter list header.
pub const UNMAP_HEADER_LEN: usize = 8;
/// Bytes of one block descriptor.
pub const UNMAP_DESCRIPTOR_LEN: usize = 16;
/// Most descriptors in one list: 8 + 16 * n must stay below 65536.
pub const MAX_UNMAP_DESCRIPTORS_PER_LIST: usize = 4095;
/// Most blocks one descriptor names (32-bit NUMBER OF LOGICAL BLOCKS).
pub const MAX_UNMAP_BLOCKS_PER_DESCRIPTOR: u64 = u32::MAX as u64;

/// Bytes of a parameter list with `descriptors` descriptors.
pub const fn unmap_list_len(descriptors: usize) -> usize {
    UNMAP_HEADER_LEN + UNMAP_DESCRIPTOR_LEN * descriptors
}

/// UNMAP CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnmapCdb {
    /// ANCHOR: anchor the blocks instead of deallocating them.
    pub anchor: bool,
    /// PARAMETER LIST LENGTH in bytes.
    pub param_len: u16,
}

impl UnmapCdb {
    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        let mut b = [0u8; 10];
        b[0] = opcode::UNMAP;
        b[1] = u8::from(self.anchor);
        b[7..9].copy_from_slice(&self.param_len.to_be_bytes());
        Cdb::from_array(b)
    }

    pub(crate) fn decode(b: &[u8; 10]) -> Self {
        UnmapCdb {
            anchor: b[1] & 0x01 != 0,
            param_len: u16::from_be_bytes([b[7], b[8]]),
        }
    }
}

/// One UNMAP block descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnmapDescriptor {
    /// First LBA to unmap.
    pub lba: u64,
    /// Number of blocks.
    pub blocks: u32,
}

/// Builds an UNMAP parameter list in a caller-provided buffer.
///
/// ```
/// # use vireo_scsi::unmap::UnmapListWriter;
/// let mut buf = [0u8; 40];
/// let mut w = UnmapListWriter::new(&mut buf).unwrap();
/// w.push(0, 2048).unwrap();
/// w.push(1 << 40, 8).unwrap();
/// let len = w.finish();
/// assert_eq!(len, 40);
/// ```
#[derive(Debug)]
pub struct UnmapListWriter<'a> {
    buf: &'a mut [u8],
    count: usize,
    blocks: u64,
}

/// What one UNMAP command may carry, from the block limits VPD page and the
/// parameter list format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapLimits {
    /// Most blocks, summed over all descriptors (MAXIMUM UNMAP LBA COUNT).
    pub max_blocks: u64,
    /// Most descriptors (MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT, at most
    /// [`MAX_UNMAP_DESCRIPTORS_PER_LIST`]).
    pub max_descriptors: usize,
}

impl UnmapLimits {
    /// Only the limits of the parameter list format.
    pub const FORMAT: UnmapLimits = UnmapLimits {
        max_blocks: u64::MAX,
        max_descriptors: MAX_UNMAP_DESCRIPTORS_PER_LIST,
    };

    /// Limits from the block limits page; `None` when either count is 0,
    /// which SBC-4 defines as "UNMAP not implemented". FFFFFFFFh means no
    /// limit beyond the format.
    pub fn from_block_limits(bl: &crate::vpd::BlockLimits) -> Option<Self> {
        let (lbas, descs) = (bl.max_unmap_lba_count, bl.max_unmap_descriptor_count);
        if lbas == 0 || descs == 0 {
            return None;
        }
        Some(UnmapLimits {
            max_blocks: if lbas == u32::MAX {
                u64::MAX
            } else {
                u64::from(lbas)
            },
            max_descriptors: usize::try_from(descs)
                .unwrap_or(usize::MAX)
                .min(MAX_UNMAP_DESCRIPTORS_PER_LIST),
        })
    }
}

impl<'a> UnmapListWriter<'a> {
    /// A writer over `buf`, which must hold at least the header.
    pub fn new(buf: &'a mut [u8]) -> Result<Self, EncodeError> {
        if buf.len() < UNMAP_HEADER_LEN {
            return Err(EncodeError::BufferTooSmall {
                need: UNMAP_HEADER_LEN,
                got: buf.len(),
            });
        }
        Ok(UnmapListWriter {
            buf,
            count: 0,
            blocks: 0,
        })
    }

    /// Appends a descriptor. Refuses a block count above 2^32-1, a range
    /// that wraps the address space, a 4096th descriptor, or a full buffer;
    /// nothing is written then.
    pub fn push(&mut self, lba: u64, blocks: u64) -> Result<(), EncodeError> {
        let n = u32::try_from(blocks)
            .map_err(|_| EncodeError::BlockCountTooLarge { blocks, bits: 32 })?;
        if lba.checked_add(blocks).is_none() {
            return Err(EncodeError::LbaOverflow { lba, blocks });
        }
        if self.count >= MAX_UNMAP_DESCRIPTORS_PER_LIST {
            return Err(EncodeError::TooManyDescriptors {
                count: self.count + 1,
                max: MAX_UNMAP_DESCRIPTORS_PER_LIST,
            });
        }
        let mut d = [0u8; UNMAP_DESCRIPTOR_LEN];
        d[..8].copy_from_slice(&lba.to_be_bytes());
        d[8..12].copy_from_slice(&n.to_be_bytes());
        let off = unmap_list_len(self.count);
        if !put(self.buf, off, &d) {
            return Err(EncodeError::BufferTooSmall {
                need: off + UNMAP_DESCRIPTOR_LEN,
                got: self.buf.len(),
            });
        }
        self.count += 1;
        self.blocks += blocks;
        Ok(())
    }

    /// Appends descriptors covering as much of `blocks` blocks from `lba` as
    /// one command allows: each descriptor at most 2^32-1 blocks, and the
    /// list within `limits` (blocks already in the list count) and the
    /// buffer. Returns the blocks covered; the caller sends the command and
    /// continues with a new list from `lba` plus that count. A range that
    /// wraps the address space is refused.
    pub fn fill(
        &mut self,
        lba: u64,
        blocks: u64,
        limits: &UnmapLimits,
    ) -> Result<u64, EncodeError> {
        if lba.checked_add(blocks).is_none() {
            return Err(EncodeError::LbaOverflow { lba, blocks });
        }
        let max_descriptors = limits.max_descriptors.min(MAX_UNMAP_DESCRIPTORS_PER_LIST);
        let mut done = 0u64;
        while done < blocks && self.count < max_descriptors && self.remaining() > 0 {
            let budget = limits.max_blocks.saturating_sub(self.blocks);
            let n = (blocks - done)
                .min(MAX_UNMAP_BLOCKS_PER_DESCRIPTOR)
                .min(budget);
            if n == 0 {
                break;
            }
            self.push(lba + done, n)?;
            done += n;
        }
        Ok(done)
    }

    /// Blocks named by the descriptors written so far.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Descriptors written so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True before the first descriptor.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Room for more descriptors (list limit and buffer both).
    pub fn remaining(&self) -> usize {
        let by_buf = (self.buf.len() - unmap_list_len(self.count)) / UNMAP_DESCRIPTOR_LEN;
        by_buf.min(MAX_UNMAP_DESCRIPTORS_PER_LIST - self.count)
    }

    /// Writes the header and returns the list length, the PARAMETER LIST
    /// LENGTH to put in the CDB.
    pub fn finish(self) -> u16 {
        let total = unmap_list_len(self.count);
        // count <= 4095, so these fit 16 bits.
        let data_len = (total - 2) as u16;
        let desc_len = (total - UNMAP_HEADER_LEN) as u16;
        let mut h = [0u8; UNMAP_HEADER_LEN];
        h[..2].copy_from_slice(&data_len.to_be_bytes());
        h[2..4].copy_from_slice(&desc_len.to_be_bytes());
        put(self.buf, 0, &h);
        total as u16
    }
}

/// A parsed UNMAP parameter list (target side).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnmapParameterList {
    /// The block descriptors, in list order.
    pub descriptors: Vec<UnmapDescriptor>,
}

impl UnmapParameterList {
    /// Parses a parameter list of the length the CDB gave.
    ///
    /// A PARAMETER LIST LENGTH of 0 means no list and is not passed here;
    /// 1 to 7 bytes is [`ParseError::TooShort`] (PARAMETER LIST LENGTH
    /// ERROR). A descriptor data length past the buffer is
    /// [`ParseError::Truncated`], one that is not a multiple of 16 is
    /// [`ParseError::BadLength`], and an UNMAP DATA LENGTH that does not
    /// cover the descriptors is [`ParseError::Inconsistent`].
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "UNMAP parameter list";
        let h = head::<UNMAP_HEADER_LEN>(buf, what)?;
        let data_len = usize::from(u16::from_be_bytes([h[0], h[1]]));
        let desc_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        if desc_len % UNMAP_DESCRIPTOR_LEN != 0 {
            return Err(ParseError::BadLength {
                what,
                value: desc_len,
            });
        }
        if data_len < desc_len + 6 {
            return Err(ParseError::Inconsistent {
                what,
                detail: "UNMAP DATA LENGTH does not cover the block descriptors",
            });
        }
        let need = UNMAP_HEADER_LEN + desc_len;
        let list = buf
            .get(UNMAP_HEADER_LEN..need)
            .ok_or(ParseError::Truncated {
                what,
                need,
                got: buf.len(),
            })?;
        let descriptors = list
            .chunks_exact(UNMAP_DESCRIPTOR_LEN)
            .filter_map(|d| {
                Some(UnmapDescriptor {
                    lba: be64_at(d, 0)?,
                    blocks: crate::wire::be32_at(d, 8)?,
                })
            })
            .collect();
        Ok(UnmapParameterList { descriptors })
    }

    /// Encodes the list as it is (no range checks: a target-side value may
    /// hold anything the wire can); more than
    /// [`MAX_UNMAP_DESCRIPTORS_PER_LIST`] descriptors is an error. Initiators
    /// build lists with [`UnmapListWriter`], which also refuses wrapping ranges.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let n = self.descriptors.len();
        if n > MAX_UNMAP_DESCRIPTORS_PER_LIST {
            return Err(EncodeError::TooManyDescriptors {
                count: n,
                max: MAX_UNMAP_DESCRIPTORS_PER_LIST,
            });
        }
        let total = unmap_list_len(n);
        // n <= 4095, so both lengths fit 16 bits.
        let mut v = Vec::with_capacity(total);
        v.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        v.extend_from_slice(&((total - UNMAP_HEADER_LEN) as u16).to_be_bytes());
        v.extend_from_slice(&[0; 4]);
        for d in &self.descriptors {
            v.extend_from_slice(&d.lba.to_be_bytes());
            v.extend_from_slice(&d.blocks.to_be_bytes());
            v.extend_from_slice(&[0; 4]);
        }
        Ok(v)
    }

    /// Sum of the block counts.
    pub fn total_blocks(&self) -> u64 {
        self.descriptors.iter().map(|d| u64::from(d.blocks)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(unmap_list_len(MAX_UNMAP_DESCRIPTORS_PER_LIST), 65528);
        assert!(unmap_list_len(MAX_UNMAP_DESCRIPTORS_PER_LIST + 1) > usize::from(u16::MAX));
    }

    #[test]
    fn known_bytes() {
        let mut buf = [0xeeu8; 40];
        let mut w = UnmapListWriter::new(&mut buf).unwrap();
        assert!(w.is_empty());
        assert_eq!(w.remaining(), 2);
        w.push(0x0102_0304_0506_0708, 0x0a0b_0c0d).unwrap();
        w.push(0, 0).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w.remaining(), 0);
        assert_eq!(w.finish(), 40);
        assert_eq!(&buf[..8], &[0, 38, 0, 32, 0, 0, 0, 0]);
        assert_eq!(
            &buf[8..24],
            &[1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d, 0, 0, 0, 0]
        );
        assert_eq!(&buf[24..40], &[0; 16]);
        let p = UnmapParameterList::parse(&buf).unwrap();
        assert_eq!(
            p.descriptors,
            vec![
                UnmapDescriptor {
                    lba: 0x0102_0304_0506_0708,
                    blocks: 0x0a0b_0c0d
                },
                UnmapDescriptor { lba: 0, blocks: 0 }
            ]
        );
        assert_eq!(p.total_blocks(), 0x0a0b_0c0d);
        assert_eq!(p.encode().unwrap(), buf);
    }

    #[test]
    fn writer_refusals() {
        let mut small = [0u8; 7];
        assert_eq!(
            UnmapListWriter::new(&mut small).unwrap_err(),
            EncodeError::BufferTooSmall { need: 8, got: 7 }
        );
        let mut buf = [0u8; 30];
        let mut w = UnmapListWriter::new(&mut buf).unwrap();
        assert_eq!(
            w.push(0, 1 << 32),
            Err(EncodeError::BlockCountTooLarge {
                blocks: 1 << 32,
                bits: 32
            })
        );
        assert_eq!(
            w.push(u64::MAX, 1),
            Err(EncodeError::LbaOverflow {
                lba: u64::MAX,
                blocks: 1
            })
        );
        w.push(0, u32::MAX.into()).unwrap();
        assert_eq!(
            w.push(5, 5),
            Err(EncodeError::BufferTooSmall { need: 40, got: 30 })
        );
        assert_eq!(w.len(), 1);
        assert_eq!(w.finish(), 24);
    }

    #[test]
    fn writer_stops_at_4095() {
        let mut buf = vec![0u8; unmap_list_len(MAX_UNMAP_DESCRIPTORS_PER_LIST + 10)];
        let mut w = UnmapListWriter::new(&mut buf).unwrap();
        for i in 0..MAX_UNMAP_DESCRIPTORS_PER_LIST as u64 {
            w.push(i * 10, 10).unwrap();
        }
        assert_eq!(w.remaining(), 0);
        assert_eq!(
            w.push(1 << 40, 1),
            Err(EncodeError::TooManyDescriptors {
                count: 4096,
                max: 4095
            })
        );
        let len = w.finish();
        assert_eq!(len, 65528);
        let p = UnmapParameterList::parse(&buf[..usize::from(len)]).unwrap();
        assert_eq!(p.descriptors.len(), MAX_UNMAP_DESCRIPTORS_PER_LIST);
        assert_eq!(p.total_blocks(), 40950);

        let too_many = UnmapParameterList {
            descriptors: vec![UnmapDescriptor::default(); 4096],
        };
        assert_eq!(
            too_many.encode(),
            Err(EncodeError::TooManyDescriptors {
                count: 4096,
                max: 4095
            })
        );
        // A wrapping range is carried as is: the target checks ranges.
        let wraps = UnmapParameterList {
            descriptors: vec![UnmapDescriptor {
                lba: u64::MAX,
                blocks: 1,
            }],
        };
        assert_eq!(
            UnmapParameterList::parse(&wraps.encode().unwrap()).unwrap(),
            wraps
        );
    }

    #[test]
    fn limits_from_block_limits() {
        let mut bl = crate::vpd::BlockLimits {
            max_unmap_lba_count: u32::MAX,
            max_unmap_descriptor_count: u32::MAX,
            ..Default::default()
        };
        assert_eq!(
            UnmapLimits::from_block_limits(&bl),
            Some(UnmapLimits::FORMAT)
        );
        bl.max_unmap_lba_count = 1024;
        bl.max_unmap_descriptor_count = 16;
        assert_eq!(
            UnmapLimits::from_block_limits(&bl),
            Some(UnmapLimits {
                max_blocks: 1024,
                max_descriptors: 16
            })
        );
        bl.max_unmap_descriptor_count = 0;
        assert_eq!(UnmapLimits::from_block_limits(&bl), None);
        bl.max_unmap_descriptor_count = 1;
        bl.max_unmap_lba_count = 0;
        assert_eq!(UnmapLimits::from_block_limits(&bl), None);
    }

    /// Splits `blocks` at `lba` into UNMAP commands the way a driver would,
    /// returning (descriptors, blocks) per command after checking each list.
    fn split(lba: u64, blocks: u64, limits: &UnmapLimits) -> Vec<(usize, u64)> {
        let mut buf = vec![0u8; unmap_list_len(MAX_UNMAP_DESCRIPTORS_PER_LIST)];
        let mut cmds = Vec::new();
        let mut done = 0;
        while done < blocks {
            let mut w = UnmapListWriter::new(&mut buf).unwrap();
            let n = w.fill(lba + done, blocks - done, limits).unwrap();
            assert!(n > 0);
            let count = w.len();
            assert_eq!(w.blocks(), n);
            let len = usize::from(w.finish());
            let list = UnmapParameterList::parse(&buf[..len]).unwrap();
            assert_eq!(list.descriptors.len(), count);
            assert_eq!(list.total_blocks(), n);
            assert!(list.total_blocks() <= limits.max_blocks);
            assert!(count <= limits.max_descriptors);
            // Descriptors are contiguous from where the last command stopped.
            let mut next = lba + done;
            for d in &list.descriptors {
                assert_eq!(d.lba, next);
                next += u64::from(d.blocks);
            }
            cmds.push((count, n));
            done += n;
        }
        cmds
    }

    #[test]
    fn fill_ten_tib_of_512_byte_blocks() {
        let blocks = (10u64 << 40) / 512;
        // Format limits only: one command, six descriptors (five full ones).
        let cmds = split(0, blocks, &UnmapLimits::FORMAT);
        assert_eq!(cmds, vec![(6, blocks)]);
        // MAXIMUM UNMAP LBA COUNT of 4 Mi blocks: 5120 commands of one descriptor.
        let l = UnmapLimits {
            max_blocks: 4 << 20,
            max_descriptors: 4095,
        };
        let cmds = split(7, blocks, &l);
        assert_eq!(cmds.len(), 5120);
        assert!(cmds.iter().all(|&c| c == (1, 4 << 20)));
        // Two descriptors per command and no block limit: three commands.
        let l = UnmapLimits {
            max_blocks: u64::MAX,
            max_descriptors: 2,
        };
        let cmds = split(0, blocks, &l);
        let full = MAX_UNMAP_BLOCKS_PER_DESCRIPTOR;
        assert_eq!(
            cmds,
            vec![(2, 2 * full), (2, 2 * full), (2, blocks - 4 * full)]
        );
    }

    #[test]
    fn fill_respects_what_is_already_there() {
        let mut buf = vec![0u8; unmap_list_len(3)];
        let mut w = UnmapListWriter::new(&mut buf).unwrap();
        let l = UnmapLimits {
            max_blocks: 100,
            max_descriptors: 4095,
        };
        assert_eq!(w.fill(0, 60, &l), Ok(60));
        assert_eq!(w.fill(1000, 60, &l), Ok(40));
        assert_eq!(w.fill(2000, 60, &l), Ok(0));
        assert_eq!(w.len(), 2);
        // The buffer runs out before the limits do.
        let mut buf = vec![0u8; unmap_list_len(1)];
        let mut w = UnmapListWriter::new(&mut buf).unwrap();
        assert_eq!(
            w.fill(0, 1 << 33, &UnmapLimits::FORMAT),
            Ok(u64::from(u32::MAX))
        );
        assert_eq!(
            w.fill(u64::MAX, 1, &UnmapLimits::FORMAT),
            Err(EncodeError::LbaOverflow {
                lba: u64::MAX,
                blocks: 1
            })
        );
        assert_eq!(w.fill(5, 0, &UnmapLimits::FORMAT), Ok(0));
    }

    #[test]
    fn parse_errors() {
        let what = "UNMAP parameter list";
        assert_eq!(
            UnmapParameterList::parse(&[0; 7]),
            Err(ParseError::TooShort {
                what,
                need: 8,
                got: 7
            })
        );
        assert_eq!(
            UnmapParameterList::parse(&[0, 6, 0, 0, 0, 0, 0, 0]).unwrap(),
            UnmapParameterList::default()
        );
        // Descriptor data length not a multiple of 16.
        assert_eq!(
            UnmapParameterList::parse(&[0, 30, 0, 24, 0, 0, 0, 0]),
            Err(ParseError::BadLength { what, value: 24 })
        );
        // Data length too small for the descriptors.
        assert!(matches!(
            UnmapParameterList::parse(&[0, 6, 0, 16, 0, 0, 0, 0]),
            Err(ParseError::Inconsistent { .. })
        ));
        // Descriptors announced past the end of the list.
        let mut b = vec![0, 38, 0, 32, 0, 0, 0, 0];
        b.extend_from_slice(&[0; 16]);
        assert_eq!(
            UnmapParameterList::parse(&b),
            Err(ParseError::Truncated {
                what,
                need: 40,
                got: 24
            })
        );
        // Trailing bytes past the descriptors are ignored.
        b[1] = 22;
        b[3] = 16;
        b.extend_from_slice(&[0xff; 5]);
        assert_eq!(UnmapParameterList::parse(&b).unwrap().descriptors.len(), 1);
    }

    #[test]
    fn cdb_known_bytes() {
        let c = UnmapCdb {
            anchor: false,
            param_len: 24,
        };
        assert_eq!(c.to_cdb().as_bytes(), &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]);
    }
}
