//! MODE SENSE(6) and MODE SENSE(10) (SPC-5 6.14, 6.15, 7.5): CDBs, the mode
//! parameter header, block descriptors, mode pages and the caching page.

use crate::cdb::{opcode, Cdb};
use crate::error::{EncodeError, ParseError};
use crate::wire::{be16, be16_at, be32_at, be64_at, head};

/// Page codes.
pub mod page {
    /// Caching mode page.
    pub const CACHING: u8 = 0x08;
    /// Control mode page.
    pub const CONTROL: u8 = 0x0a;
    /// Return all pages.
    pub const ALL: u8 = 0x3f;
}

/// PC field of MODE SENSE: which values to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PageControl {
    /// 00b: current values.
    #[default]
    Current,
    /// 01b: changeable values (a mask).
    Changeable,
    /// 10b: default values.
    Default,
    /// 11b: saved values.
    Saved,
}

impl PageControl {
    /// Decodes the low 2 bits.
    pub const fn from_u8(v: u8) -> Self {
        match v & 0x03 {
            0 => PageControl::Current,
            1 => PageControl::Changeable,
            2 => PageControl::Default,
            _ => PageControl::Saved,
        }
    }

    /// The 2-bit value.
    pub const fn to_u8(self) -> u8 {
        match self {
            PageControl::Current => 0,
            PageControl::Changeable => 1,
            PageControl::Default => 2,
            PageControl::Saved => 3,
        }
    }
}

/// MODE SENSE(6) CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModeSense6Cdb {
    /// DBD: disable block descriptors.
    pub dbd: bool,
    /// PC.
    pub pc: PageControl,
    /// PAGE CODE (6 bits).
    pub page: u8,
    /// SUBPAGE CODE.
    pub subpage: u8,
    /// ALLOCATION LENGTH.
    pub alloc_len: u8,
}

impl ModeSense6Cdb {
    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        Cdb::from_array([
            opcode::MODE_SENSE_6,
            if self.dbd { 0x08 } else { 0 },
            (self.pc.to_u8() << 6) | (self.page & 0x3f),
            self.subpage,
            self.alloc_len,
            0,
        ])
    }

    pub(crate) fn decode(b: &[u8; 6]) -> Self {
        ModeSense6Cdb {
            dbd: b[1] & 0x08 != 0,
            pc: PageControl::from_u8(b[2] >> 6),
            page: b[2] & 0x3f,
            subpage: b[3],
            alloc_len: b[4],
        }
    }
}

/// MODE SENSE(10) CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModeSense10Cdb {
    /// LLBAA: long LBA block descriptors accepted.
    pub llbaa: bool,
    /// DBD: disable block descriptors.
    pub dbd: bool,
    /// PC.
    pub pc: PageControl,
    /// PAGE CODE (6 bits).
    pub page: u8,
    /// SUBPAGE CODE.
    pub subpage: u8,
    /// ALLOCATION LENGTH.
    pub alloc_len: u16,
}

impl ModeSense10Cdb {
    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        let mut b = [0u8; 10];
        b[0] = opcode::MODE_SENSE_10;
        b[1] = if self.llbaa { 0x10 } else { 0 } | if self.dbd { 0x08 } else { 0 };
        b[2] = (self.pc.to_u8() << 6) | (self.page & 0x3f);
        b[3] = self.subpage;
        b[7..9].copy_from_slice(&self.alloc_len.to_be_bytes());
        Cdb::from_array(b)
    }

    pub(crate) fn decode(b: &[u8; 10]) -> Self {
        ModeSense10Cdb {
            llbaa: b[1] & 0x10 != 0,
            dbd: b[1] & 0x08 != 0,
            pc: PageControl::from_u8(b[2] >> 6),
            page: b[2] & 0x3f,
            subpage: b[3],
            alloc_len: u16::from_be_bytes([b[7], b[8]]),
        }
    }
}

/// Mode parameter header of MODE SENSE(6) (4 bytes) or MODE SENSE(10) (8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModeHeader {
    /// MODE DATA LENGTH: bytes that follow the length field itself.
    pub mode_data_len: u16,
    /// MEDIUM TYPE.
    pub medium_type: u8,
    /// WP (device-specific parameter bit 7): the medium is write protected.
    pub write_protect: bool,
    /// DPOFUA (device-specific parameter bit 4): DPO and FUA are supported.
    pub dpofua: bool,
    /// LONGLBA (10-byte header only): block descriptors are 16 bytes.
    pub long_lba: bool,
    /// BLOCK DESCRIPTOR LENGTH.
    pub block_descriptor_len: u16,
}

/// Length of the MODE SENSE(6) header.
pub const MODE_HEADER_6_LEN: usize = 4;
/// Length of the MODE SENSE(10) header.
pub const MODE_HEADER_10_LEN: usize = 8;

fn device_specific(wp: bool, dpofua: bool) -> u8 {
    (if wp { 0x80 } else { 0 }) | if dpofua { 0x10 } else { 0 }
}

impl ModeHeader {
    /// Total bytes of mode data the header announces (length field included).
    pub fn total_len(&self, ten: bool) -> usize {
        usize::from(self.mode_data_len) + if ten { 2 } else { 1 }
    }

    fn check(self, ten: bool, what: &'static str) -> Result<Self, ParseError> {
        let header = if ten {
            MODE_HEADER_10_LEN
        } else {
            MODE_HEADER_6_LEN
        };
        if self.total_len(ten) < header + usize::from(self.block_descriptor_len) {
            return Err(ParseError::BadLength {
                what,
                value: usize::from(self.mode_data_len),
            });
        }
        Ok(self)
    }

    /// Parses the MODE SENSE(6) header. The mode data length must cover the
    /// header and the block descriptors.
    pub fn parse6(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "MODE SENSE(6) header";
        let b = head::<MODE_HEADER_6_LEN>(buf, what)?;
        ModeHeader {
            mode_data_len: u16::from(b[0]),
            medium_type: b[1],
            write_protect: b[2] & 0x80 != 0,
            dpofua: b[2] & 0x10 != 0,
            long_lba: false,
            block_descriptor_len: u16::from(b[3]),
        }
        .check(false, what)
    }

    /// Parses the MODE SENSE(10) header. The mode data length must cover the
    /// header and the block descriptors.
    pub fn parse10(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "MODE SENSE(10) header";
        let b = head::<MODE_HEADER_10_LEN>(buf, what)?;
        ModeHeader {
            mode_data_len: be16(b[0], b[1]),
            medium_type: b[2],
            write_protect: b[3] & 0x80 != 0,
            dpofua: b[3] & 0x10 != 0,
            long_lba: b[4] & 0x01 != 0,
            block_descriptor_len: be16(b[6], b[7]),
        }
        .check(true, what)
    }

    /// Encodes a MODE SENSE(6) header. Lengths above 255 are an error;
    /// `long_lba` has no place in it and is ignored.
    pub fn encode6(&self) -> Result<[u8; MODE_HEADER_6_LEN], EncodeError> {
        let byte = |v: u16, what| {
            u8::try_from(v).map_err(|_| EncodeError::OutOfRange {
                what,
                value: u64::from(v),
                max: 255,
            })
        };
        Ok([
            byte(self.mode_data_len, "MODE SENSE(6) mode data length")?,
            self.medium_type,
            device_specific(self.write_protect, self.dpofua),
            byte(
                self.block_descriptor_len,
                "MODE SENSE(6) block descriptor length",
            )?,
        ])
    }

    /// Encodes a MODE SENSE(10) header.
    pub fn encode10(&self) -> [u8; MODE_HEADER_10_LEN] {
        let [m0, m1] = self.mode_data_len.to_be_bytes();
        let [d0, d1] = self.block_descriptor_len.to_be_bytes();
        [
            m0,
            m1,
            self.medium_type,
            device_specific(self.write_protect, self.dpofua),
            u8::from(self.long_lba),
            0,
            d0,
            d1,
        ]
    }
}

/// A direct-access block descriptor (SBC-4 6.5.2): short (8 bytes) or long
/// LBA (16 bytes) on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockDescriptor {
    /// NUMBER OF LOGICAL BLOCKS (short form: FFFFFFFFh when it does not fit).
    pub blocks: u64,
    /// LOGICAL BLOCK LENGTH (24 bits in the short form).
    pub block_len: u32,
}

/// Largest block length a short block descriptor carries.
const SHORT_BLOCK_LEN_MAX: u32 = 0x00ff_ffff;

impl BlockDescriptor {
    fn parse_short(b: &[u8]) -> Option<Self> {
        Some(BlockDescriptor {
            blocks: u64::from(be32_at(b, 0)?),
            block_len: be32_at(b, 4)? & SHORT_BLOCK_LEN_MAX,
        })
    }

    fn parse_long(b: &[u8]) -> Option<Self> {
        Some(BlockDescriptor {
            blocks: be64_at(b, 0)?,
            block_len: be32_at(b, 12)?,
        })
    }

    fn encode_short(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if self.block_len > SHORT_BLOCK_LEN_MAX {
            return Err(EncodeError::OutOfRange {
                what: "short block descriptor block length",
                value: u64::from(self.block_len),
                max: u64::from(SHORT_BLOCK_LEN_MAX),
            });
        }
        let blocks = u32::try_from(self.blocks).unwrap_or(u32::MAX);
        out.extend_from_slice(&blocks.to_be_bytes());
        out.extend_from_slice(&self.block_len.to_be_bytes());
        Ok(())
    }

    fn encode_long(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.blocks.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.block_len.to_be_bytes());
    }
}

/// One mode page, undecoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModePage {
    /// PAGE CODE (6 bits).
    pub page: u8,
    /// SUBPAGE CODE when the page is in sub_page format (SPF=1).
    pub subpage: Option<u8>,
    /// PS: the page can be saved.
    pub ps: bool,
    /// The page bytes after its header.
    pub data: Vec<u8>,
}

impl ModePage {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let ps = if self.ps { 0x80 } else { 0 };
        match self.subpage {
            None => {
                let len = u8::try_from(self.data.len()).map_err(|_| EncodeError::FieldTooLong {
                    what: "mode page",
                    len: self.data.len(),
                    max: 255,
                })?;
                out.extend_from_slice(&[ps | (self.page & 0x3f), len]);
            }
            Some(sub) => {
                let len =
                    u16::try_from(self.data.len()).map_err(|_| EncodeError::FieldTooLong {
                        what: "mode subpage",
                        len: self.data.len(),
                        max: usize::from(u16::MAX),
                    })?;
                let [l0, l1] = len.to_be_bytes();
                out.extend_from_slice(&[ps | 0x40 | (self.page & 0x3f), sub, l0, l1]);
            }
        }
        out.extend_from_slice(&self.data);
        Ok(())
    }
}

/// Length of the caching mode page after its 2-byte header.
const CACHING_PAGE_LEN: usize = 0x12;

/// The caching mode page (08h), reduced to what a disk initiator needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CachingPage {
    /// WCE: write cache enabled (writes need SYNCHRONIZE CACHE to be durable).
    pub wce: bool,
    /// RCD: read cache disabled.
    pub rcd: bool,
}

impl CachingPage {
    /// The page, with PS clear and all other fields zero.
    pub fn to_page(self) -> ModePage {
        let mut data = vec![0u8; CACHING_PAGE_LEN];
        if let Some(b) = data.first_mut() {
            *b = if self.wce { 0x04 } else { 0 } | u8::from(self.rcd);
        }
        ModePage {
            page: page::CACHING,
            subpage: None,
            ps: false,
            data,
        }
    }

    /// Decodes the page.
    pub fn from_page(p: &ModePage) -> Result<Self, ParseError> {
        let what = "caching mode page";
        if p.page != page::CACHING || p.subpage.is_some() {
            return Err(ParseError::WrongPage {
                what,
                expected: page::CACHING,
                got: p.page,
            });
        }
        let &b = p
            .data
            .first()
            .ok_or(ParseError::BadLength { what, value: 0 })?;
        Ok(CachingPage {
            wce: b & 0x04 != 0,
            rcd: b & 0x01 != 0,
        })
    }
}

/// Complete mode parameter data: header, block descriptors and pages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModeParameters {
    /// MEDIUM TYPE.
    pub medium_type: u8,
    /// WP: the medium is write protected.
    pub write_protect: bool,
    /// DPOFUA: DPO and FUA are supported.
    pub dpofua: bool,
    /// LONGLBA: block descriptors are long (MODE SENSE(10) only).
    pub long_lba: bool,
    /// Block descriptors.
    pub block_descriptors: Vec<BlockDescriptor>,
    /// Mode pages, in order.
    pub pages: Vec<ModePage>,
}

impl ModeParameters {
    /// The page with this code and subpage (`None` for page_0 format).
    pub fn page(&self, code: u8, subpage: Option<u8>) -> Option<&ModePage> {
        self.pages
            .iter()
            .find(|p| p.page == code && p.subpage == subpage)
    }

    /// The caching page, if present and well formed.
    pub fn caching(&self) -> Option<CachingPage> {
        self.page(page::CACHING, None)
            .and_then(|p| CachingPage::from_page(p).ok())
    }

    /// Parses MODE SENSE(6) data.
    pub fn parse6(buf: &[u8]) -> Result<Self, ParseError> {
        let h = ModeHeader::parse6(buf)?;
        Self::parse_body(buf, h, false, "MODE SENSE(6) data")
    }

    /// Parses MODE SENSE(10) data.
    pub fn parse10(buf: &[u8]) -> Result<Self, ParseError> {
        let h = ModeHeader::parse10(buf)?;
        Self::parse_body(buf, h, true, "MODE SENSE(10) data")
    }

    fn parse_body(
        buf: &[u8],
        h: ModeHeader,
        ten: bool,
        what: &'static str,
    ) -> Result<Self, ParseError> {
        let total = h.total_len(ten);
        let data = buf.get(..total).ok_or(ParseError::Truncated {
            what,
            need: total,
            got: buf.len(),
        })?;
        let header = if ten {
            MODE_HEADER_10_LEN
        } else {
            MODE_HEADER_6_LEN
        };
        let bdl = usize::from(h.block_descriptor_len);
        let desc_size = if h.long_lba { 16 } else { 8 };
        if bdl % desc_size != 0 {
            return Err(ParseError::BadLength { what, value: bdl });
        }
        // The header check guarantees header + bdl <= total.
        let descs = data.get(header..header + bdl).unwrap_or(&[]);
        let block_descriptors = descs
            .chunks_exact(desc_size)
            .filter_map(|c| {
                if h.long_lba {
                    BlockDescriptor::parse_long(c)
                } else {
                    BlockDescriptor::parse_short(c)
                }
            })
            .collect();

        let mut pages = Vec::new();
        let mut off = header + bdl;
        while off < data.len() {
            let overrun = ParseError::Overrun { what, offset: off };
            let rest = data.get(off..).unwrap_or(&[]);
            let (&b0, &b1) = rest.first().zip(rest.get(1)).ok_or(overrun)?;
            let spf = b0 & 0x40 != 0;
            let (hdr, len, subpage) = if spf {
                let len = be16_at(rest, 2).ok_or(overrun)?;
                (4, usize::from(len), Some(b1))
            } else {
                (2, usize::from(b1), None)
            };
            let page_data = rest.get(hdr..hdr + len).ok_or(overrun)?;
            pages.push(ModePage {
                page: b0 & 0x3f,
                subpage,
                ps: b0 & 0x80 != 0,
                data: page_data.to_vec(),
            });
            off += hdr + len;
        }
        Ok(ModeParameters {
            medium_type: h.medium_type,
            write_protect: h.write_protect,
            dpofua: h.dpofua,
            long_lba: ten && h.long_lba,
            block_descriptors,
            pages,
        })
    }

    fn body(&self, long: bool) -> Result<(Vec<u8>, usize), EncodeError> {
        let mut v = Vec::new();
        for d in &self.block_descriptors {
            if long {
                d.encode_long(&mut v);
            } else {
                d.encode_short(&mut v)?;
            }
        }
        let bdl = v.len();
        for p in &self.pages {
            p.encode(&mut v)?;
        }
        Ok((v, bdl))
    }

    /// Encodes MODE SENSE(6) data (short block descriptors; `long_lba` is
    /// ignored). The whole must fit the 8-bit mode data length.
    pub fn encode6(&self) -> Result<Vec<u8>, EncodeError> {
        let (body, bdl) = self.body(false)?;
        let mdl = body.len() + MODE_HEADER_6_LEN - 1;
        let header = ModeHeader {
            mode_data_len: u16::try_from(mdl).unwrap_or(u16::MAX),
            medium_type: self.medium_type,
            write_protect: self.write_protect,
            dpofua: self.dpofua,
            long_lba: false,
            block_descriptor_len: u16::try_from(bdl).unwrap_or(u16::MAX),
        }
        .encode6()?;
        let mut v = header.to_vec();
        v.extend_from_slice(&body);
        Ok(v)
    }

    /// Encodes MODE SENSE(10) data. The whole must fit the 16-bit mode data
    /// length.
    pub fn encode10(&self) -> Result<Vec<u8>, EncodeError> {
        let (body, bdl) = self.body(self.long_lba)?;
        let mdl = body.len() + MODE_HEADER_10_LEN - 2;
        let too_long = |len: usize| EncodeError::FieldTooLong {
            what: "MODE SENSE(10) data",
            len,
            max: usize::from(u16::MAX),
        };
        let header = ModeHeader {
            mode_data_len: u16::try_from(mdl).map_err(|_| too_long(mdl))?,
            medium_type: self.medium_type,
            write_protect: self.write_protect,
            dpofua: self.dpofua,
            long_lba: self.long_lba,
            block_descriptor_len: u16::try_from(bdl).map_err(|_| too_long(bdl))?,
        }
        .encode10();
        let mut v = header.to_vec();
        v.extend_from_slice(&body);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> ModeParameters {
        ModeParameters {
            medium_type: 0,
            write_protect: false,
            dpofua: true,
            long_lba: false,
            block_descriptors: vec![BlockDescriptor {
                blocks: 0x20_0000,
                block_len: 512,
            }],
            pages: vec![CachingPage {
                wce: true,
                rcd: false,
            }
            .to_page()],
        }
    }

    #[test]
    fn mode_sense6_known_bytes() {
        let m = disk();
        let b = m.encode6().unwrap();
        assert_eq!(b.len(), 4 + 8 + 20);
        assert_eq!(&b[..4], &[31, 0, 0x10, 8]);
        assert_eq!(&b[4..12], &[0, 0x20, 0, 0, 0, 0, 2, 0]);
        assert_eq!(&b[12..15], &[0x08, 0x12, 0x04]);
        assert_eq!(ModeParameters::parse6(&b).unwrap(), m);
        let h = ModeHeader::parse6(&b).unwrap();
        assert!(!h.write_protect);
        assert!(h.dpofua);
        assert_eq!(h.block_descriptor_len, 8);
        assert_eq!(h.encode6().unwrap(), b[..4]);
        assert_eq!(
            ModeParameters::parse6(&b).unwrap().caching(),
            Some(CachingPage {
                wce: true,
                rcd: false
            })
        );
    }

    #[test]
    fn mode_sense10_round_trip() {
        let mut m = disk();
        m.write_protect = true;
        m.long_lba = true;
        m.block_descriptors[0].blocks = 1 << 40;
        m.pages.push(ModePage {
            page: 0x1c,
            subpage: Some(0x01),
            ps: true,
            data: vec![1, 2, 3],
        });
        let b = m.encode10().unwrap();
        assert_eq!(b.len(), 8 + 16 + 20 + 7);
        assert_eq!(&b[..8], &[0, 49, 0, 0x90, 1, 0, 0, 16]);
        assert_eq!(&b[44..48], &[0xdc, 0x01, 0, 3]);
        let p = ModeParameters::parse10(&b).unwrap();
        assert_eq!(p, m);
        assert_eq!(p.page(0x1c, Some(1)).unwrap().data, vec![1, 2, 3]);
        assert!(p.page(0x1c, None).is_none());
        let h = ModeHeader::parse10(&b).unwrap();
        assert!(h.write_protect);
        assert!(h.long_lba);
        assert_eq!(h.encode10(), b[..8]);
        // Short descriptors in MODE SENSE(6) clamp the block count.
        let b6 = m.encode6().unwrap();
        let p6 = ModeParameters::parse6(&b6).unwrap();
        assert_eq!(p6.block_descriptors[0].blocks, u64::from(u32::MAX));
        assert!(!p6.long_lba);
    }

    #[test]
    fn minimal_no_descriptors() {
        let m = ModeParameters {
            write_protect: true,
            ..Default::default()
        };
        assert_eq!(m.encode6().unwrap(), [3, 0, 0x80, 0]);
        assert_eq!(m.encode10().unwrap(), [0, 6, 0, 0x80, 0, 0, 0, 0]);
        assert_eq!(ModeParameters::parse6(&[3, 0, 0x80, 0]).unwrap(), m);
        assert_eq!(m.caching(), None);
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            ModeHeader::parse6(&[3, 0, 0]),
            Err(ParseError::TooShort {
                what: "MODE SENSE(6) header",
                need: 4,
                got: 3
            })
        );
        assert!(matches!(
            ModeHeader::parse10(&[0; 7]),
            Err(ParseError::TooShort { need: 8, .. })
        ));
        // Mode data length shorter than the header plus block descriptors.
        assert_eq!(
            ModeHeader::parse6(&[2, 0, 0, 0]),
            Err(ParseError::BadLength {
                what: "MODE SENSE(6) header",
                value: 2
            })
        );
        assert!(matches!(
            ModeHeader::parse6(&[10, 0, 0, 8]),
            Err(ParseError::BadLength { value: 10, .. })
        ));
        assert!(matches!(
            ModeHeader::parse10(&[0, 5, 0, 0, 0, 0, 0, 0]),
            Err(ParseError::BadLength { value: 5, .. })
        ));
        let h = ModeHeader {
            mode_data_len: 300,
            ..Default::default()
        };
        assert!(matches!(
            h.encode6(),
            Err(EncodeError::OutOfRange { value: 300, .. })
        ));
        let h = ModeHeader {
            block_descriptor_len: 256,
            ..Default::default()
        };
        assert!(matches!(
            h.encode6(),
            Err(EncodeError::OutOfRange { value: 256, .. })
        ));
    }

    #[test]
    fn data_errors() {
        let b = disk().encode6().unwrap();
        // Truncated by the allocation length.
        assert_eq!(
            ModeParameters::parse6(&b[..20]),
            Err(ParseError::Truncated {
                what: "MODE SENSE(6) data",
                need: 32,
                got: 20
            })
        );
        // Block descriptor length not a multiple of 8.
        let mut bad = b.clone();
        bad[3] = 7;
        assert_eq!(
            ModeParameters::parse6(&bad),
            Err(ParseError::BadLength {
                what: "MODE SENSE(6) data",
                value: 7
            })
        );
        // Page length pointing past the mode data.
        let mut bad = b.clone();
        bad[13] = 0x13;
        assert_eq!(
            ModeParameters::parse6(&bad),
            Err(ParseError::Overrun {
                what: "MODE SENSE(6) data",
                offset: 12
            })
        );
        // A lone page code byte.
        let bad = [5, 0, 0, 0, 0x08, 0];
        assert!(matches!(
            ModeParameters::parse6(&[4, 0, 0, 0, 0x08]),
            Err(ParseError::Overrun { offset: 4, .. })
        ));
        assert!(ModeParameters::parse6(&bad).is_ok());
        // Sub-page header cut short.
        assert!(matches!(
            ModeParameters::parse6(&[6, 0, 0, 0, 0x48, 1, 0]),
            Err(ParseError::Overrun { offset: 4, .. })
        ));
        // Long LBA descriptors must come in 16s.
        let mut m = disk();
        m.long_lba = true;
        let mut b10 = m.encode10().unwrap();
        b10[7] = 8;
        assert!(matches!(
            ModeParameters::parse10(&b10),
            Err(ParseError::BadLength { value: 8, .. })
        ));
    }

    #[test]
    fn encode_errors() {
        let mut m = disk();
        m.block_descriptors[0].block_len = 1 << 24;
        assert!(matches!(m.encode6(), Err(EncodeError::OutOfRange { .. })));
        let mut m = disk();
        m.pages.push(ModePage {
            page: 1,
            subpage: None,
            ps: false,
            data: vec![0; 256],
        });
        assert!(matches!(
            m.encode10(),
            Err(EncodeError::FieldTooLong { len: 256, .. })
        ));
        let mut m = disk();
        m.pages.push(ModePage {
            page: 1,
            subpage: None,
            ps: false,
            data: vec![0; 250],
        });
        assert!(matches!(m.encode6(), Err(EncodeError::OutOfRange { .. })));
        assert!(m.encode10().is_ok());
        let mut m = disk();
        m.pages.push(ModePage {
            page: 1,
            subpage: Some(1),
            ps: false,
            data: vec![0; 65536],
        });
        assert!(matches!(
            m.encode10(),
            Err(EncodeError::FieldTooLong { .. })
        ));
        let mut m = disk();
        m.pages = vec![
            ModePage {
                page: 1,
                subpage: Some(1),
                ps: false,
                data: vec![0; 65000],
            };
            2
        ];
        assert!(matches!(
            m.encode10(),
            Err(EncodeError::FieldTooLong { .. })
        ));
    }

    #[test]
    fn caching_page() {
        let c = CachingPage {
            wce: false,
            rcd: true,
        };
        let p = c.to_page();
        assert_eq!(p.data.len(), 0x12);
        assert_eq!(CachingPage::from_page(&p), Ok(c));
        let other = ModePage {
            page: 0x0a,
            subpage: None,
            ps: false,
            data: vec![0; 10],
        };
        assert!(matches!(
            CachingPage::from_page(&other),
            Err(ParseError::WrongPage { .. })
        ));
        let empty = ModePage {
            page: 0x08,
            subpage: None,
            ps: false,
            data: vec![],
        };
        assert!(matches!(
            CachingPage::from_page(&empty),
            Err(ParseError::BadLength { value: 0, .. })
        ));
    }

    #[test]
    fn cdbs() {
        let c = ModeSense6Cdb {
            dbd: true,
            pc: PageControl::Current,
            page: page::CACHING,
            subpage: 0,
            alloc_len: 0xff,
        };
        assert_eq!(c.to_cdb().as_bytes(), &[0x1a, 0x08, 0x08, 0, 0xff, 0]);
        let c = ModeSense10Cdb {
            llbaa: true,
            dbd: false,
            pc: PageControl::Saved,
            page: page::ALL,
            subpage: 0xff,
            alloc_len: 0x0400,
        };
        assert_eq!(
            c.to_cdb().as_bytes(),
            &[0x5a, 0x10, 0xff, 0xff, 0, 0, 0, 0x04, 0x00, 0]
        );
        for v in 0..4 {
            assert_eq!(PageControl::from_u8(v).to_u8(), v);
        }
    }
}
