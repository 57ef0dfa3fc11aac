//! virtio-blk request parsing and validation (virtio 1.2, 5.2.6). Pure functions over bytes and
//! lengths: no guest memory, no I/O, so every rule is unit tested on its own.

use std::fmt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use crate::blk_config::{BlkTargetConfig, SECTOR_SIZE};

/// Size of the request header (`type`, `reserved`/`ioprio`, `sector`).
pub const REQUEST_HEADER_SIZE: usize = 16;

/// Size of one discard / write-zeroes range (`sector`, `num_sectors`, `flags`).
pub const RANGE_SIZE: usize = 16;

/// The `unmap` flag of a write-zeroes range.
pub const RANGE_FLAG_UNMAP: u32 = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// The request types this target knows; anything else is `Unknown` and answered with UNSUPP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read.
    In,
    /// `VIRTIO_BLK_T_OUT`: write.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the serial.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Any other value of the type field.
    Unknown(u32),
}

impl RequestType {
    /// Decodes the type field of a request header.
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unknown(other),
        }
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// What the request does.
    pub request_type: RequestType,
    /// The `reserved` (legacy `ioprio`) field, ignored.
    pub ioprio: u32,
    /// First 512-byte sector of `IN`/`OUT`; unused by the other types.
    pub sector: u64,
}

/// Decodes the first [`REQUEST_HEADER_SIZE`] bytes of `bytes`.
pub fn parse_header(bytes: &[u8]) -> Result<RequestHeader, RequestError> {
    let Some(h) = bytes.get(..REQUEST_HEADER_SIZE) else {
        return Err(RequestError::ShortHeader { len: bytes.len() });
    };
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&h[8..16]);
    Ok(RequestHeader {
        request_type: RequestType::from_raw(le32(&h[0..4])),
        ioprio: le32(&h[4..8]),
        sector: u64::from_le_bytes(sector),
    })
}

/// One range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First 512-byte sector.
    pub sector: u64,
    /// Length in 512-byte sectors.
    pub num_sectors: u32,
    /// Flags; only [`RANGE_FLAG_UNMAP`] is defined, and only for write-zeroes.
    pub flags: u32,
}

impl Range {
    /// Encodes the range as the driver puts it in guest memory.
    pub fn to_bytes(self) -> [u8; RANGE_SIZE] {
        let mut b = [0u8; RANGE_SIZE];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// Decodes the range list that follows the header of a discard or write-zeroes request.
pub fn parse_ranges(bytes: &[u8]) -> Result<Vec<Range>, RequestError> {
    if !bytes.len().is_multiple_of(RANGE_SIZE) {
        return Err(RequestError::RangeListLength { len: bytes.len() });
    }
    Ok(bytes
        .chunks_exact(RANGE_SIZE)
        .map(|r| {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&r[0..8]);
            Range {
                sector: u64::from_le_bytes(sector),
                num_sectors: u32::from_le_bytes([r[8], r[9], r[10], r[11]]),
                flags: u32::from_le_bytes([r[12], r[13], r[14], r[15]]),
            }
        })
        .collect())
}

/// The two range-based commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOp {
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
}

impl fmt::Display for RangeOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RangeOp::Discard => "discard",
            RangeOp::WriteZeroes => "write-zeroes",
        })
    }
}

/// Which advertised limit a request broke (each is counted separately in the stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// `seg_max` or `size_max` of an `IN`/`OUT`.
    Data,
    /// `max_discard_seg` or `max_discard_sectors`.
    Discard,
    /// `max_write_zeroes_seg` or `max_write_zeroes_sectors`.
    WriteZeroes,
}

/// Why a request is refused. [`RequestError::status`] gives the status byte the driver sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Fewer readable bytes than a request header.
    #[error("request header is {len} bytes, less than {REQUEST_HEADER_SIZE}")]
    ShortHeader {
        /// Readable bytes in the chain.
        len: usize,
    },
    /// Data of an `IN`/`OUT` that is not whole 512-byte sectors.
    #[error("data length {len} is not a multiple of {SECTOR_SIZE}")]
    PartialSector {
        /// Data bytes.
        len: u64,
    },
    /// Sectors beyond the end of the disk.
    #[error("sectors {sector}..+{sectors} reach beyond the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Capacity in sectors.
        capacity: u64,
    },
    /// Offset or length not a multiple of the logical block size.
    #[error("sector {sector} + {sectors} sectors is not aligned to the block size {block_size}")]
    Misaligned {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Block size in bytes.
        block_size: u32,
    },
    /// More data segments than `seg_max`.
    #[error("{count} data segments, more than seg_max {max}")]
    TooManySegments {
        /// Data segments in the request.
        count: usize,
        /// Advertised `seg_max`.
        max: u32,
    },
    /// A data segment larger than `size_max`.
    #[error("a data segment of {len} bytes, more than size_max {max}")]
    SegmentTooLarge {
        /// Segment length.
        len: u64,
        /// Advertised `size_max`.
        max: u32,
    },
    /// A range list that is not whole 16-byte ranges.
    #[error("range list of {len} bytes is not a multiple of {RANGE_SIZE}")]
    RangeListLength {
        /// Bytes after the header.
        len: usize,
    },
    /// A discard or write-zeroes without any range.
    #[error("{op} without any range")]
    EmptyRangeList {
        /// The command.
        op: RangeOp,
    },
    /// More ranges than `max_*_seg`.
    #[error("{op} with {count} ranges, more than the limit {max}")]
    TooManyRanges {
        /// The command.
        op: RangeOp,
        /// Ranges in the request.
        count: usize,
        /// Advertised limit.
        max: u32,
    },
    /// A range longer than `max_*_sectors`.
    #[error("{op} range of {sectors} sectors, more than the limit {max}")]
    RangeTooLarge {
        /// The command.
        op: RangeOp,
        /// Range length in sectors.
        sectors: u32,
        /// Advertised limit.
        max: u32,
    },
    /// Flags the device does not know, or `unmap` on a discard.
    #[error("{op} range with unsupported flags {flags:#x}")]
    UnsupportedFlags {
        /// The command.
        op: RangeOp,
        /// The flags field.
        flags: u32,
    },
}

impl RequestError {
    /// The status byte for the driver: UNSUPP for unknown flags (virtio 1.2, 5.2.6.2), IOERR for
    /// everything else.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedFlags { .. } => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// The advertised limit this error is about, if any.
    pub fn limit_kind(&self) -> Option<LimitKind> {
        match self {
            RequestError::TooManySegments { .. } | RequestError::SegmentTooLarge { .. } => {
                Some(LimitKind::Data)
            }
            RequestError::TooManyRanges { op, .. } | RequestError::RangeTooLarge { op, .. } => {
                Some(match op {
                    RangeOp::Discard => LimitKind::Discard,
                    RangeOp::WriteZeroes => LimitKind::WriteZeroes,
                })
            }
            _ => None,
        }
    }

    /// Whether the request addressed sectors the disk does not have (or misaligned ones).
    pub fn is_out_of_range(&self) -> bool {
        matches!(
            self,
            RequestError::OutOfRange { .. } | RequestError::Misaligned { .. }
        )
    }
}

/// The limits requests are checked against; 0 in `seg_max` or `size_max` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Whether offsets and lengths must be multiples of `block_size`.
    pub enforce_block_alignment: bool,
    /// `seg_max`.
    pub seg_max: u32,
    /// `size_max`.
    pub size_max: u32,
    /// `max_discard_sectors`.
    pub max_discard_sectors: u32,
    /// `max_discard_seg`.
    pub max_discard_seg: u32,
    /// `max_write_zeroes_sectors`.
    pub max_write_zeroes_sectors: u32,
    /// `max_write_zeroes_seg`.
    pub max_write_zeroes_seg: u32,
}

impl Limits {
    /// The limits of `cfg` for a disk of `capacity_sectors`.
    pub fn new(cfg: &BlkTargetConfig, capacity_sectors: u64) -> Self {
        Limits {
            capacity_sectors,
            block_size: cfg.block_size,
            enforce_block_alignment: cfg.enforce_block_alignment,
            seg_max: cfg.seg_max,
            size_max: cfg.size_max,
            max_discard_sectors: cfg.max_discard_sectors,
            max_discard_seg: cfg.max_discard_seg,
            max_write_zeroes_sectors: cfg.max_write_zeroes_sectors,
            max_write_zeroes_seg: cfg.max_write_zeroes_seg,
        }
    }

    /// Checks that `sectors` sectors from `sector` lie on the disk (and on block boundaries
    /// when alignment is enforced).
    pub fn check_extent(&self, sector: u64, sectors: u64) -> Result<(), RequestError> {
        let end = sector.checked_add(sectors);
        if end.is_none_or(|end| end > self.capacity_sectors) {
            return Err(RequestError::OutOfRange {
                sector,
                sectors,
                capacity: self.capacity_sectors,
            });
        }
        let per_block = u64::from(self.block_size) / SECTOR_SIZE;
        if self.enforce_block_alignment
            && (!sector.is_multiple_of(per_block) || !sectors.is_multiple_of(per_block))
        {
            return Err(RequestError::Misaligned {
                sector,
                sectors,
                block_size: self.block_size,
            });
        }
        Ok(())
    }

    /// Validates an `IN`/`OUT` of the given data segment lengths starting at `sector`; returns
    /// the total data bytes. Segment limits are checked first so that an oversize request is
    /// always reported as such.
    pub fn check_data(&self, sector: u64, segment_lens: &[u64]) -> Result<u64, RequestError> {
        if self.seg_max != 0 && segment_lens.len() > self.seg_max as usize {
            return Err(RequestError::TooManySegments {
                count: segment_lens.len(),
                max: self.seg_max,
            });
        }
        if self.size_max != 0 {
            if let Some(&len) = segment_lens
                .iter()
                .find(|&&len| len > u64::from(self.size_max))
            {
                return Err(RequestError::SegmentTooLarge {
                    len,
                    max: self.size_max,
                });
            }
        }
        let total: u64 = segment_lens.iter().sum();
        if !total.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::PartialSector { len: total });
        }
        self.check_extent(sector, total / SECTOR_SIZE)?;
        Ok(total)
    }

    /// Validates the ranges of a discard or write-zeroes.
    pub fn check_ranges(&self, op: RangeOp, ranges: &[Range]) -> Result<(), RequestError> {
        let (max_seg, max_sectors, allowed_flags) = match op {
            RangeOp::Discard => (self.max_discard_seg, self.max_discard_sectors, 0),
            RangeOp::WriteZeroes => (
                self.max_write_zeroes_seg,
                self.max_write_zeroes_sectors,
                RANGE_FLAG_UNMAP,
            ),
        };
        if ranges.is_empty() {
            return Err(RequestError::EmptyRangeList { op });
        }
        if ranges.len() > max_seg as usize {
            return Err(RequestError::TooManyRanges {
                op,
                count: ranges.len(),
                max: max_seg,
            });
        }
        for r in ranges {
            if r.flags & !allowed_flags != 0 {
                return Err(RequestError::UnsupportedFlags { op, flags: r.flags });
            }
            if r.num_sectors > max_sectors {
                return Err(RequestError::RangeTooLarge {
                    op,
                    sectors: r.num_sectors,
                    max: max_sectors,
                });
            }
            self.check_extent(r.sector, u64::from(r.num_sectors))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            capacity_sectors: 1024,
            block_size: 512,
            enforce_block_alignment: true,
            seg_max: 4,
            size_max: 4096,
            max_discard_sectors: 64,
            max_discard_seg: 2,
            max_write_zeroes_sectors: 32,
            max_write_zeroes_seg: 1,
        }
    }

    fn header(t: u32, sector: u64) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&t.to_le_bytes());
        h.extend_from_slice(&7u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    #[test]
    fn header_parse() {
        let h = parse_header(&header(VIRTIO_BLK_T_OUT, 0x1122_3344_5566)).unwrap();
        assert_eq!(h.request_type, RequestType::Out);
        assert_eq!(h.ioprio, 7);
        assert_eq!(h.sector, 0x1122_3344_5566);
        // Longer input: only the first 16 bytes count.
        let mut long = header(VIRTIO_BLK_T_IN, 9);
        long.extend_from_slice(&[0xff; 5]);
        assert_eq!(parse_header(&long).unwrap().sector, 9);
        assert_eq!(
            parse_header(&[0u8; 15]),
            Err(RequestError::ShortHeader { len: 15 })
        );
        assert_eq!(parse_header(&[]), Err(RequestError::ShortHeader { len: 0 }));
    }

    #[test]
    fn request_types() {
        for (raw, t) in [
            (0, RequestType::In),
            (1, RequestType::Out),
            (4, RequestType::Flush),
            (8, RequestType::GetId),
            (11, RequestType::Discard),
            (13, RequestType::WriteZeroes),
            (2, RequestType::Unknown(2)),
            (10, RequestType::Unknown(10)),
            (14, RequestType::Unknown(14)),
            (u32::MAX, RequestType::Unknown(u32::MAX)),
        ] {
            assert_eq!(RequestType::from_raw(raw), t);
        }
    }

    #[test]
    fn ranges_roundtrip_and_length() {
        let r = Range {
            sector: 5,
            num_sectors: 6,
            flags: 1,
        };
        let mut bytes = r.to_bytes().to_vec();
        bytes.extend_from_slice(
            &Range {
                sector: u64::MAX,
                num_sectors: u32::MAX,
                flags: 0,
            }
            .to_bytes(),
        );
        let parsed = parse_ranges(&bytes).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0], r);
        assert_eq!(parsed[1].sector, u64::MAX);
        assert_eq!(
            parse_ranges(&bytes[..17]),
            Err(RequestError::RangeListLength { len: 17 })
        );
        assert!(parse_ranges(&[]).unwrap().is_empty());
    }

    #[test]
    fn data_limits() {
        let l = limits();
        assert_eq!(l.check_data(0, &[512, 4096]), Ok(4608));
        assert_eq!(l.check_data(1023, &[512]), Ok(512));
        assert_eq!(l.check_data(0, &[]), Ok(0));
        let e = l.check_data(0, &[512; 5]).unwrap_err();
        assert_eq!(e, RequestError::TooManySegments { count: 5, max: 4 });
        assert_eq!(e.limit_kind(), Some(LimitKind::Data));
        assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8);
        let e = l.check_data(0, &[512, 8192]).unwrap_err();
        assert_eq!(
            e,
            RequestError::SegmentTooLarge {
                len: 8192,
                max: 4096
            }
        );
        assert_eq!(e.limit_kind(), Some(LimitKind::Data));
        // Oversize wins over out-of-range.
        assert!(matches!(
            l.check_data(5000, &[8192]),
            Err(RequestError::SegmentTooLarge { .. })
        ));
        assert_eq!(
            l.check_data(0, &[100, 412, 1]),
            Err(RequestError::PartialSector { len: 513 })
        );
        let e = l.check_data(1023, &[1024]).unwrap_err();
        assert!(e.is_out_of_range());
        assert_eq!(e.limit_kind(), None);
        assert!(l
            .check_data(u64::MAX, &[512])
            .unwrap_err()
            .is_out_of_range());
        let unlimited = Limits {
            seg_max: 0,
            size_max: 0,
            capacity_sectors: u64::MAX,
            ..limits()
        };
        assert_eq!(unlimited.check_data(0, &[1 << 30; 300]), Ok(300 << 30));
    }

    #[test]
    fn block_alignment() {
        let l = Limits {
            block_size: 4096,
            ..limits()
        };
        assert!(l.check_extent(8, 8).is_ok());
        assert!(matches!(
            l.check_extent(1, 8),
            Err(RequestError::Misaligned { .. })
        ));
        assert!(matches!(
            l.check_extent(8, 1),
            Err(RequestError::Misaligned { .. })
        ));
        let lax = Limits {
            enforce_block_alignment: false,
            ..l
        };
        assert!(lax.check_extent(1, 1).is_ok());
    }

    #[test]
    fn range_limits() {
        let l = limits();
        let r = |sector, num_sectors, flags| Range {
            sector,
            num_sectors,
            flags,
        };
        assert!(l
            .check_ranges(RangeOp::Discard, &[r(0, 64, 0), r(100, 1, 0)])
            .is_ok());
        assert_eq!(
            l.check_ranges(RangeOp::Discard, &[]),
            Err(RequestError::EmptyRangeList {
                op: RangeOp::Discard
            })
        );
        let e = l
            .check_ranges(RangeOp::Discard, &[r(0, 1, 0); 3])
            .unwrap_err();
        assert_eq!(e.limit_kind(), Some(LimitKind::Discard));
        let e = l
            .check_ranges(RangeOp::Discard, &[r(0, 65, 0)])
            .unwrap_err();
        assert_eq!(
            e,
            RequestError::RangeTooLarge {
                op: RangeOp::Discard,
                sectors: 65,
                max: 64
            }
        );
        // Unmap is not a discard flag.
        let e = l
            .check_ranges(RangeOp::Discard, &[r(0, 1, RANGE_FLAG_UNMAP)])
            .unwrap_err();
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        assert!(l
            .check_ranges(RangeOp::WriteZeroes, &[r(0, 32, RANGE_FLAG_UNMAP)])
            .is_ok());
        let e = l
            .check_ranges(RangeOp::WriteZeroes, &[r(0, 1, 2)])
            .unwrap_err();
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        let e = l
            .check_ranges(RangeOp::WriteZeroes, &[r(0, 1, 0); 2])
            .unwrap_err();
        assert_eq!(e.limit_kind(), Some(LimitKind::WriteZeroes));
        let e = l
            .check_ranges(RangeOp::WriteZeroes, &[r(0, 33, 0)])
            .unwrap_err();
        assert_eq!(e.limit_kind(), Some(LimitKind::WriteZeroes));
        let e = l
            .check_ranges(RangeOp::WriteZeroes, &[r(1000, 30, 0)])
            .unwrap_err();
        assert!(e.is_out_of_range());
        let e = l
            .check_ranges(RangeOp::Discard, &[r(u64::MAX - 1, 4, 0)])
            .unwrap_err();
        assert!(e.is_out_of_range());
    }
}
