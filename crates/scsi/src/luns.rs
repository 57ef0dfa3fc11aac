//! REPORT LUNS (SPC-5 6.33) and 8-byte logical unit numbers (SAM-5 4.7).

use std::fmt;

use crate::cdb::{opcode, Cdb};
use crate::error::{EncodeError, ParseError};
use crate::wire::head;

/// SELECT REPORT values.
pub mod select_report {
    /// 00h: logical units with an accessible logical unit (no well-known LUNs).
    pub const LOGICAL_UNITS: u8 = 0x00;
    /// 01h: well-known logical units only.
    pub const WELL_KNOWN: u8 = 0x01;
    /// 02h: all logical units.
    pub const ALL: u8 = 0x02;
}

/// REPORT LUNS CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportLunsCdb {
    /// SELECT REPORT.
    pub select_report: u8,
    /// ALLOCATION LENGTH (at least 16 by SPC).
    pub alloc_len: u32,
}

impl ReportLunsCdb {
    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        let mut b = [0u8; 12];
        b[0] = opcode::REPORT_LUNS;
        b[2] = self.select_report;
        b[6..10].copy_from_slice(&self.alloc_len.to_be_bytes());
        Cdb::from_array(b)
    }

    pub(crate) fn decode(b: &[u8; 12]) -> Self {
        ReportLunsCdb {
            select_report: b[2],
            alloc_len: u32::from_be_bytes([b[6], b[7], b[8], b[9]]),
        }
    }
}

/// The first level of a LUN, decoded by its ADDRESS METHOD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LunAddress {
    /// 00b peripheral device addressing: bus identifier (6 bits) and a
    /// target or LUN byte.
    Peripheral {
        /// BUS IDENTIFIER; 0 addresses a logical unit at the current level.
        bus: u8,
        /// TARGET OR LUN.
        target_or_lun: u8,
    },
    /// 01b flat space addressing: a 14-bit LUN.
    Flat(u16),
    /// 10b logical unit addressing.
    LogicalUnit {
        /// TARGET (6 bits).
        target: u8,
        /// BUS NUMBER (3 bits).
        bus: u8,
        /// LUN (5 bits).
        lun: u8,
    },
    /// 11b extended logical unit addressing, well-known LUN form (C1h xx).
    WellKnown(u8),
    /// 11b extended logical unit addressing, any other form.
    Extended {
        /// LENGTH (2 bits): the level is 2, 4, 6 or 8 bytes.
        length: u8,
        /// EXTENDED ADDRESS METHOD (4 bits).
        method: u8,
    },
}

/// An 8-byte logical unit number as it appears in REPORT LUNS data and
/// SCSI transport headers.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lun(pub [u8; 8]);

impl Lun {
    /// LUN 0.
    pub const ZERO: Lun = Lun([0; 8]);
    /// The REPORT LUNS well-known logical unit (C101h).
    pub const REPORT_LUNS_WLUN: Lun = Lun([0xc1, 0x01, 0, 0, 0, 0, 0, 0]);
    /// Largest LUN [`Lun::from_number`] encodes (flat space, 14 bits).
    pub const MAX_NUMBER: u16 = 0x3fff;

    /// The single-level LUN for `n`: peripheral device addressing below
    /// 256, flat space addressing up to [`Lun::MAX_NUMBER`].
    pub fn from_number(n: u16) -> Result<Lun, EncodeError> {
        let [hi, lo] = n.to_be_bytes();
        match n {
            0..=0xff => Ok(Lun([0, lo, 0, 0, 0, 0, 0, 0])),
            0x100..=Lun::MAX_NUMBER => Ok(Lun([0x40 | hi, lo, 0, 0, 0, 0, 0, 0])),
            _ => Err(EncodeError::OutOfRange {
                what: "LUN",
                value: u64::from(n),
                max: u64::from(Lun::MAX_NUMBER),
            }),
        }
    }

    /// The first addressing level.
    pub fn address(&self) -> LunAddress {
        let [b0, b1, ..] = self.0;
        match b0 >> 6 {
            0 => LunAddress::Peripheral {
                bus: b0 & 0x3f,
                target_or_lun: b1,
            },
            1 => LunAddress::Flat(u16::from_be_bytes([b0 & 0x3f, b1])),
            2 => LunAddress::LogicalUnit {
                target: b0 & 0x3f,
                bus: b1 >> 5,
                lun: b1 & 0x1f,
            },
            _ if b0 == 0xc1 => LunAddress::WellKnown(b1),
            _ => LunAddress::Extended {
                length: (b0 >> 4) & 0x03,
                method: b0 & 0x0f,
            },
        }
    }

    /// Length in bytes of the first level.
    fn first_level_len(&self) -> usize {
        match self.address() {
            LunAddress::Extended { length, .. } => 2 + 2 * usize::from(length),
            _ => 2,
        }
    }

    /// True when all bytes after the first level are zero.
    pub fn is_single_level(&self) -> bool {
        self.0
            .get(self.first_level_len()..)
            .is_none_or(|rest| rest.iter().all(|&b| b == 0))
    }

    /// The LUN as a number when it is single-level peripheral (bus 0) or
    /// flat space addressing, as initiators number LUNs; `None` otherwise.
    pub fn number(&self) -> Option<u16> {
        if !self.is_single_level() {
            return None;
        }
        match self.address() {
            LunAddress::Peripheral {
                bus: 0,
                target_or_lun,
            } => Some(u16::from(target_or_lun)),
            LunAddress::Flat(n) => Some(n),
            _ => None,
        }
    }

    /// True for a well-known logical unit.
    pub fn is_well_known(&self) -> bool {
        matches!(self.address(), LunAddress::WellKnown(_))
    }
}

impl fmt::Debug for Lun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.number() {
            Some(n) => write!(f, "Lun({n})"),
            None => write!(f, "Lun({:016x})", u64::from_be_bytes(self.0)),
        }
    }
}

/// Most LUNs one REPORT LUNS list can carry (LUN LIST LENGTH is 32 bits).
pub const MAX_REPORTED_LUNS: usize = (u32::MAX / 8) as usize;

/// REPORT LUNS parameter data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportLuns {
    /// The LUNs, in list order.
    pub luns: Vec<Lun>,
}

impl ReportLuns {
    /// Bytes of parameter data for `n` LUNs (header included).
    pub fn data_len(n: usize) -> usize {
        8usize.saturating_add(n.saturating_mul(8))
    }

    /// Parses the data. A LUN LIST LENGTH that is not a multiple of 8 is
    /// [`ParseError::BadLength`]; one that reaches past the buffer is
    /// [`ParseError::Truncated`] (ask again with `need` bytes).
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "REPORT LUNS data";
        let h = head::<8>(buf, what)?;
        let list_len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let list_len = usize::try_from(list_len).map_err(|_| ParseError::BadLength {
            what,
            value: usize::MAX,
        })?;
        if list_len % 8 != 0 {
            return Err(ParseError::BadLength {
                what,
                value: list_len,
            });
        }
        let need = list_len.saturating_add(8);
        let list = buf.get(8..need).ok_or(ParseError::Truncated {
            what,
            need,
            got: buf.len(),
        })?;
        let luns = list
            .chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(Lun))
            .collect();
        Ok(ReportLuns { luns })
    }

    /// Parses the LUNs that `buf` holds of a list that may be longer (SPC-5 6.33: an
    /// initiator may use a list truncated by its allocation length). The LUN LIST
    /// LENGTH must still be a multiple of 8.
    pub fn parse_prefix(buf: &[u8]) -> Result<Self, ParseError> {
        match Self::parse(buf) {
            Err(ParseError::Truncated { .. }) => {
                let luns = buf
                    .get(8..)
                    .unwrap_or_default()
                    .chunks_exact(8)
                    .filter_map(|c| c.try_into().ok().map(Lun))
                    .collect();
                Ok(ReportLuns { luns })
            }
            r => r,
        }
    }

    /// Reads only the LUN LIST LENGTH and returns the total data length the
    /// device has, to size the allocation length of a second REPORT LUNS.
    pub fn needed_len(buf: &[u8]) -> Result<usize, ParseError> {
        let h = head::<4>(buf, "REPORT LUNS data")?;
        let n = u32::from_be_bytes(*h);
        Ok(usize::try_from(n).unwrap_or(usize::MAX).saturating_add(8))
    }

    /// Encodes the data.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        if self.luns.len() > MAX_REPORTED_LUNS {
            return Err(EncodeError::FieldTooLong {
                what: "REPORT LUNS list",
                len: self.luns.len(),
                max: MAX_REPORTED_LUNS,
            });
        }
        let list_len =
            u32::try_from(self.luns.len() * 8).map_err(|_| EncodeError::FieldTooLong {
                what: "REPORT LUNS list",
                len: self.luns.len(),
                max: MAX_REPORTED_LUNS,
            })?;
        let mut v = Vec::with_capacity(ReportLuns::data_len(self.luns.len()));
        v.extend_from_slice(&list_len.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
        for l in &self.luns {
            v.extend_from_slice(&l.0);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_numbers() {
        assert_eq!(Lun::from_number(0).unwrap(), Lun::ZERO);
        let l = Lun::from_number(5).unwrap();
        assert_eq!(l.0, [0, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            l.address(),
            LunAddress::Peripheral {
                bus: 0,
                target_or_lun: 5
            }
        );
        assert_eq!(l.number(), Some(5));
        let l = Lun::from_number(0x1234).unwrap();
        assert_eq!(l.0, [0x52, 0x34, 0, 0, 0, 0, 0, 0]);
        assert_eq!(l.address(), LunAddress::Flat(0x1234));
        assert_eq!(l.number(), Some(0x1234));
        assert_eq!(format!("{l:?}"), "Lun(4660)");
        assert_eq!(
            Lun::from_number(0x4000),
            Err(EncodeError::OutOfRange {
                what: "LUN",
                value: 0x4000,
                max: 0x3fff
            })
        );
        // Flat addressing of a small LUN is the same LUN number.
        assert_eq!(Lun([0x40, 3, 0, 0, 0, 0, 0, 0]).number(), Some(3));
    }

    #[test]
    fn lun_formats() {
        // Peripheral addressing with a bus: not a plain LUN number.
        let l = Lun([0x01, 0x02, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            l.address(),
            LunAddress::Peripheral {
                bus: 1,
                target_or_lun: 2
            }
        );
        assert_eq!(l.number(), None);
        // Logical unit addressing.
        let l = Lun([0x85, 0x43, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            l.address(),
            LunAddress::LogicalUnit {
                target: 5,
                bus: 2,
                lun: 3
            }
        );
        assert_eq!(l.number(), None);
        // Well-known REPORT LUNS LUN.
        assert_eq!(Lun::REPORT_LUNS_WLUN.address(), LunAddress::WellKnown(0x01));
        assert!(Lun::REPORT_LUNS_WLUN.is_well_known());
        assert!(Lun::REPORT_LUNS_WLUN.is_single_level());
        assert_eq!(Lun::REPORT_LUNS_WLUN.number(), None);
        // Extended addressing, 4-byte level.
        let l = Lun([0xd2, 1, 2, 3, 0, 0, 0, 0]);
        assert_eq!(
            l.address(),
            LunAddress::Extended {
                length: 1,
                method: 2
            }
        );
        assert!(l.is_single_level());
        assert!(!Lun([0xd2, 1, 2, 3, 4, 0, 0, 0]).is_single_level());
        assert!(Lun([0xf2, 1, 2, 3, 4, 5, 6, 7]).is_single_level());
        // Two levels: hierarchical, no single number.
        let l = Lun([0x00, 0x01, 0x00, 0x02, 0, 0, 0, 0]);
        assert!(!l.is_single_level());
        assert_eq!(l.number(), None);
        assert_eq!(format!("{l:?}"), "Lun(0001000200000000)");
    }

    #[test]
    fn report_luns_known_bytes() {
        let b = [
            0, 0, 0, 16, 0, 0, 0, 0, //
            0, 0, 0, 0, 0, 0, 0, 0, //
            0x40, 0x01, 0, 0, 0, 0, 0, 0,
        ];
        let r = ReportLuns::parse(&b).unwrap();
        assert_eq!(r.luns.len(), 2);
        assert_eq!(r.luns[0].number(), Some(0));
        assert_eq!(r.luns[1].number(), Some(1));
        assert_eq!(r.encode().unwrap(), b);
        assert_eq!(ReportLuns::needed_len(&b), Ok(24));
    }

    #[test]
    fn report_luns_round_trip() {
        let r = ReportLuns {
            luns: (0..300u16).map(|n| Lun::from_number(n).unwrap()).collect(),
        };
        let b = r.encode().unwrap();
        assert_eq!(b.len(), ReportLuns::data_len(300));
        assert_eq!(ReportLuns::parse(&b).unwrap(), r);
        let empty = ReportLuns::default();
        assert_eq!(empty.encode().unwrap(), [0; 8]);
        assert_eq!(ReportLuns::parse(&[0; 8]).unwrap(), empty);
    }

    #[test]
    fn a_truncated_list_gives_the_luns_it_holds() {
        // 256 LUNs announced, the data holds two and half of a third.
        let mut b = vec![0, 0, 0x08, 0x00, 0, 0, 0, 0];
        b.extend_from_slice(&Lun::from_number(3).unwrap().0);
        b.extend_from_slice(&Lun::from_number(9).unwrap().0);
        b.extend_from_slice(&[0; 4]);
        let r = ReportLuns::parse_prefix(&b).unwrap();
        let nums: Vec<_> = r.luns.iter().filter_map(|l| l.number()).collect();
        assert_eq!(nums, vec![3, 9]);
        // A whole list parses as with `parse`; a bad length is still an error.
        let mut b = vec![0, 0, 0, 8, 0, 0, 0, 0];
        b.extend_from_slice(&Lun::from_number(1).unwrap().0);
        assert_eq!(ReportLuns::parse_prefix(&b), ReportLuns::parse(&b));
        assert!(ReportLuns::parse_prefix(&[0, 0, 0, 12, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn report_luns_errors() {
        assert_eq!(
            ReportLuns::parse(&[0; 7]),
            Err(ParseError::TooShort {
                what: "REPORT LUNS data",
                need: 8,
                got: 7
            })
        );
        assert_eq!(
            ReportLuns::parse(&[0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(ParseError::BadLength {
                what: "REPORT LUNS data",
                value: 12
            })
        );
        // 256 LUNs announced, allocation length only had room for one.
        let mut b = vec![0, 0, 0x08, 0x00, 0, 0, 0, 0];
        b.extend_from_slice(&[0; 8]);
        assert_eq!(
            ReportLuns::parse(&b),
            Err(ParseError::Truncated {
                what: "REPORT LUNS data",
                need: 2056,
                got: 16
            })
        );
        assert_eq!(ReportLuns::needed_len(&b), Ok(2056));
        assert!(ReportLuns::needed_len(&b[..3]).is_err());
        assert!(matches!(
            ReportLuns::parse(&[0xff, 0xff, 0xff, 0xf8, 0, 0, 0, 0]),
            Err(ParseError::Truncated { .. })
        ));
    }

    #[test]
    fn cdb_known_bytes() {
        let c = ReportLunsCdb {
            select_report: select_report::ALL,
            alloc_len: 0x0102_0304,
        }
        .to_cdb();
        assert_eq!(c.as_bytes(), &[0xa0, 0, 2, 0, 0, 0, 1, 2, 3, 4, 0, 0]);
    }
}
