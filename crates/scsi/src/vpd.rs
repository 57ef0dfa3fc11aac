//! Vital product data pages (SPC-5 7.7, SBC-4 6.6): supported pages (00h),
//! unit serial number (80h), device identification (83h), block limits
//! (B0h), block device characteristics (B1h), logical block provisioning
//! (B2h).
//!
//! Every page starts with a 4-byte header: peripheral byte, page code and a
//! 16-bit PAGE LENGTH. Parsers check the page code and return
//! [`ParseError::Truncated`] when the page length reaches past the buffer, so
//! the caller can ask again with a larger allocation length. Encoders take
//! the [`Peripheral`] byte to put in the header.

use crate::error::{EncodeError, ParseError};
use crate::inquiry::Peripheral;
use crate::wire::{be16_at, be32_at, be64_at, check_text, text};

/// Page codes.
pub mod page {
    /// Supported VPD pages.
    pub const SUPPORTED_PAGES: u8 = 0x00;
    /// Unit serial number.
    pub const UNIT_SERIAL_NUMBER: u8 = 0x80;
    /// Device identification.
    pub const DEVICE_IDENTIFICATION: u8 = 0x83;
    /// Block limits.
    pub const BLOCK_LIMITS: u8 = 0xb0;
    /// Block device characteristics.
    pub const BLOCK_DEVICE_CHARACTERISTICS: u8 = 0xb1;
    /// Logical block provisioning.
    pub const LOGICAL_BLOCK_PROVISIONING: u8 = 0xb2;
}

/// The page code of a VPD page in `buf` (byte 1).
pub fn page_code(buf: &[u8]) -> Result<u8, ParseError> {
    buf.get(1).copied().ok_or(ParseError::TooShort {
        what: "VPD page",
        need: 4,
        got: buf.len(),
    })
}

/// Checks the header of page `expected` and returns its body (the bytes
/// after the header that the page length covers).
fn body<'a>(buf: &'a [u8], expected: u8, what: &'static str) -> Result<&'a [u8], ParseError> {
    let h = crate::wire::head::<4>(buf, what)?;
    if h[1] != expected {
        return Err(ParseError::WrongPage {
            what,
            expected,
            got: h[1],
        });
    }
    let need = 4 + usize::from(u16::from_be_bytes([h[2], h[3]]));
    buf.get(4..need).ok_or(ParseError::Truncated {
        what,
        need,
        got: buf.len(),
    })
}

/// Checks that a page body has at least `min` bytes.
fn min_body(body: &[u8], min: usize, what: &'static str) -> Result<(), ParseError> {
    if body.len() < min {
        Err(ParseError::BadLength {
            what,
            value: body.len(),
        })
    } else {
        Ok(())
    }
}

/// Builds a page from its body.
fn page_bytes(
    peripheral: Peripheral,
    code: u8,
    body: &[u8],
    what: &'static str,
) -> Result<Vec<u8>, EncodeError> {
    let len = u16::try_from(body.len()).map_err(|_| EncodeError::FieldTooLong {
        what,
        len: body.len(),
        max: usize::from(u16::MAX),
    })?;
    let mut v = Vec::with_capacity(4 + body.len());
    v.push(peripheral.to_byte());
    v.push(code);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(body);
    Ok(v)
}

/// Supported VPD pages (00h).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SupportedPages {
    /// Page codes, in the order reported (ascending by SPC).
    pub pages: Vec<u8>,
}

impl SupportedPages {
    /// True if `page` is listed.
    pub fn contains(&self, page: u8) -> bool {
        self.pages.contains(&page)
    }

    /// Parses the page.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let b = body(buf, page::SUPPORTED_PAGES, "supported VPD pages page")?;
        Ok(SupportedPages { pages: b.to_vec() })
    }

    /// Encodes the page.
    pub fn encode(&self, peripheral: Peripheral) -> Result<Vec<u8>, EncodeError> {
        page_bytes(
            peripheral,
            page::SUPPORTED_PAGES,
            &self.pages,
            "supported VPD pages",
        )
    }
}

/// Unit serial number (80h).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitSerialNumber {
    /// PRODUCT SERIAL NUMBER, trimmed of spaces and NULs; bytes outside
    /// printable ASCII read as `?`.
    pub serial: String,
}

impl UnitSerialNumber {
    /// Parses the page.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let b = body(buf, page::UNIT_SERIAL_NUMBER, "unit serial number page")?;
        Ok(UnitSerialNumber { serial: text(b) })
    }

    /// Encodes the page; the serial must be printable ASCII.
    pub fn encode(&self, peripheral: Peripheral) -> Result<Vec<u8>, EncodeError> {
        let what = "unit serial number";
        check_text(&self.serial, usize::from(u16::MAX), what)?;
        page_bytes(
            peripheral,
            page::UNIT_SERIAL_NUMBER,
            self.serial.as_bytes(),
            what,
        )
    }
}

/// CODE SET of a designator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodeSet {
    /// 1h: binary.
    Binary,
    /// 2h: ASCII printable characters.
    Ascii,
    /// 3h: UTF-8.
    Utf8,
    /// Any other (reserved) 4-bit value.
    Other(u8),
}

impl CodeSet {
    /// Decodes the low 4 bits.
    pub const fn from_u8(v: u8) -> Self {
        match v & 0x0f {
            1 => CodeSet::Binary,
            2 => CodeSet::Ascii,
            3 => CodeSet::Utf8,
            o => CodeSet::Other(o),
        }
    }

    /// The 4-bit value.
    pub const fn to_u8(self) -> u8 {
        match self {
            CodeSet::Binary => 1,
            CodeSet::Ascii => 2,
            CodeSet::Utf8 => 3,
            CodeSet::Other(o) => o & 0x0f,
        }
    }
}

/// ASSOCIATION of a designator: what it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Association {
    /// 0: the logical unit.
    LogicalUnit,
    /// 1: the target port the command came through.
    TargetPort,
    /// 2: the SCSI target device containing the logical unit.
    TargetDevice,
    /// 3: reserved.
    Reserved,
}

impl Association {
    /// Decodes the low 2 bits.
    pub const fn from_u8(v: u8) -> Self {
        match v & 0x03 {
            0 => Association::LogicalUnit,
            1 => Association::TargetPort,
            2 => Association::TargetDevice,
            _ => Association::Reserved,
        }
    }

    /// The 2-bit value.
    pub const fn to_u8(self) -> u8 {
        match self {
            Association::LogicalUnit => 0,
            Association::TargetPort => 1,
            Association::TargetDevice => 2,
            Association::Reserved => 3,
        }
    }
}

/// DESIGNATOR TYPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DesignatorType {
    /// 0h: vendor specific.
    VendorSpecific,
    /// 1h: T10 vendor ID based.
    T10VendorId,
    /// 2h: EUI-64 based.
    Eui64,
    /// 3h: NAA.
    Naa,
    /// 4h: relative target port identifier.
    RelativeTargetPort,
    /// 5h: target port group.
    TargetPortGroup,
    /// 6h: logical unit group.
    LogicalUnitGroup,
    /// 7h: MD5 logical unit identifier.
    Md5LogicalUnit,
    /// 8h: SCSI name string.
    ScsiNameString,
    /// 9h: protocol specific port identifier.
    ProtocolSpecificPort,
    /// Ah: UUID.
    Uuid,
    /// Any other (reserved) 4-bit value.
    Other(u8),
}

impl DesignatorType {
    /// Decodes the low 4 bits.
    pub const fn from_u8(v: u8) -> Self {
        match v & 0x0f {
            0x0 => DesignatorType::VendorSpecific,
            0x1 => DesignatorType::T10VendorId,
            0x2 => DesignatorType::Eui64,
            0x3 => DesignatorType::Naa,
            0x4 => DesignatorType::RelativeTargetPort,
            0x5 => DesignatorType::TargetPortGroup,
            0x6 => DesignatorType::LogicalUnitGroup,
            0x7 => DesignatorType::Md5LogicalUnit,
            0x8 => DesignatorType::ScsiNameString,
            0x9 => DesignatorType::ProtocolSpecificPort,
            0xa => DesignatorType::Uuid,
            o => DesignatorType::Other(o),
        }
    }

    /// The 4-bit value.
    pub const fn to_u8(self) -> u8 {
        match self {
            DesignatorType::VendorSpecific => 0x0,
            DesignatorType::T10VendorId => 0x1,
            DesignatorType::Eui64 => 0x2,
            DesignatorType::Naa => 0x3,
            DesignatorType::RelativeTargetPort => 0x4,
            DesignatorType::TargetPortGroup => 0x5,
            DesignatorType::LogicalUnitGroup => 0x6,
            DesignatorType::Md5LogicalUnit => 0x7,
            DesignatorType::ScsiNameString => 0x8,
            DesignatorType::ProtocolSpecificPort => 0x9,
            DesignatorType::Uuid => 0xa,
            DesignatorType::Other(o) => o & 0x0f,
        }
    }
}

/// One designation descriptor of the device identification page.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Designator {
    /// PROTOCOL IDENTIFIER (4 bits), meaningful only with `piv`.
    pub protocol_id: u8,
    /// CODE SET.
    pub code_set: CodeSet,
    /// PIV: the protocol identifier is valid.
    pub piv: bool,
    /// ASSOCIATION.
    pub association: Association,
    /// DESIGNATOR TYPE.
    pub designator_type: DesignatorType,
    /// The DESIGNATOR bytes (at most 255).
    pub designator: Vec<u8>,
}

impl Designator {
    /// A logical unit designator of the given type and code set.
    pub fn logical_unit(ty: DesignatorType, code_set: CodeSet, designator: Vec<u8>) -> Self {
        Designator {
            protocol_id: 0,
            code_set,
            piv: false,
            association: Association::LogicalUnit,
            designator_type: ty,
            designator,
        }
    }

    /// A T10 vendor ID based designator: the 8-byte vendor field followed by
    /// a vendor specific identifier.
    pub fn t10_vendor_id(vendor: &str, id: &str) -> Result<Self, EncodeError> {
        check_text(vendor, 8, "T10 vendor ID designator vendor")?;
        check_text(id, 255 - 8, "T10 vendor ID designator identifier")?;
        let mut d = vec![b' '; 8];
        crate::wire::put_text(&mut d, vendor);
        d.extend_from_slice(id.as_bytes());
        Ok(Designator::logical_unit(
            DesignatorType::T10VendorId,
            CodeSet::Ascii,
            d,
        ))
    }

    /// The designator as text: ASCII and UTF-8 code sets as trimmed printable
    /// text, binary ones as lowercase hex.
    pub fn to_text(&self) -> String {
        match self.code_set {
            CodeSet::Ascii | CodeSet::Utf8 => text(&self.designator),
            _ => self.designator.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// Device identification (83h).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceIdentification {
    /// Designation descriptors, in page order.
    pub designators: Vec<Designator>,
}

impl DeviceIdentification {
    /// Parses the page. A descriptor that runs past the page length is
    /// [`ParseError::Overrun`].
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "device identification page";
        let b = body(buf, page::DEVICE_IDENTIFICATION, what)?;
        let mut designators = Vec::new();
        let mut off = 0usize;
        while off < b.len() {
            let overrun = ParseError::Overrun {
                what,
                offset: 4 + off,
            };
            let h = b
                .get(off..)
                .and_then(|r| r.first_chunk::<4>())
                .ok_or(overrun)?;
            let len = usize::from(h[3]);
            let d = b.get(off + 4..off + 4 + len).ok_or(overrun)?;
            designators.push(Designator {
                protocol_id: h[0] >> 4,
                code_set: CodeSet::from_u8(h[0]),
                piv: h[1] & 0x80 != 0,
                association: Association::from_u8(h[1] >> 4),
                designator_type: DesignatorType::from_u8(h[1]),
                designator: d.to_vec(),
            });
            off += 4 + len;
        }
        Ok(DeviceIdentification { designators })
    }

    /// Encodes the page.
    pub fn encode(&self, peripheral: Peripheral) -> Result<Vec<u8>, EncodeError> {
        let mut body = Vec::new();
        for d in &self.designators {
            let len = u8::try_from(d.designator.len()).map_err(|_| EncodeError::FieldTooLong {
                what: "designator",
                len: d.designator.len(),
                max: 255,
            })?;
            body.push(((d.protocol_id & 0x0f) << 4) | d.code_set.to_u8());
            body.push(
                if d.piv { 0x80 } else { 0 }
                    | (d.association.to_u8() << 4)
                    | d.designator_type.to_u8(),
            );
            body.push(0);
            body.push(len);
            body.extend_from_slice(&d.designator);
        }
        page_bytes(
            peripheral,
            page::DEVICE_IDENTIFICATION,
            &body,
            "device identification page",
        )
    }

    /// The first designator of `ty` associated with the logical unit.
    pub fn find(&self, ty: DesignatorType) -> Option<&Designator> {
        self.designators
            .iter()
            .find(|d| d.association == Association::LogicalUnit && d.designator_type == ty)
    }

    /// The most specific logical unit identifier: NAA, then EUI-64, UUID,
    /// SCSI name string, T10 vendor ID.
    pub fn preferred(&self) -> Option<&Designator> {
        [
            DesignatorType::Naa,
            DesignatorType::Eui64,
            DesignatorType::Uuid,
            DesignatorType::ScsiNameString,
            DesignatorType::T10VendorId,
        ]
        .into_iter()
        .find_map(|t| self.find(t))
    }
}

/// Page length of a full block limits page (SBC-3 and later).
const BLOCK_LIMITS_PAGE_LEN: usize = 0x3c;
/// Shortest block limits page accepted (the SBC-2 layout, through the
/// OPTIMAL TRANSFER LENGTH).
const BLOCK_LIMITS_MIN_LEN: usize = 0x0c;

/// Block limits (B0h). A field of 0 means the device reports no limit or
/// no preference; fields past a short (SBC-2) page read as 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockLimits {
    /// WSNZ: WRITE SAME with 0 blocks is not supported.
    pub wsnz: bool,
    /// MAXIMUM COMPARE AND WRITE LENGTH, in blocks.
    pub max_compare_and_write: u8,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY, in blocks.
    pub optimal_transfer_granularity: u16,
    /// MAXIMUM TRANSFER LENGTH, in blocks.
    pub max_transfer_length: u32,
    /// OPTIMAL TRANSFER LENGTH, in blocks.
    pub optimal_transfer_length: u32,
    /// MAXIMUM PREFETCH LENGTH, in blocks.
    pub max_prefetch_length: u32,
    /// MAXIMUM UNMAP LBA COUNT: most blocks one UNMAP may name
    /// (FFFFFFFFh: no limit).
    pub max_unmap_lba_count: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (FFFFFFFFh: no limit).
    pub max_unmap_descriptor_count: u32,
    /// OPTIMAL UNMAP GRANULARITY, in blocks.
    pub optimal_unmap_granularity: u32,
    /// UNMAP GRANULARITY ALIGNMENT (31 bits), `None` when UGAVALID is clear.
    pub unmap_granularity_alignment: Option<u32>,
    /// MAXIMUM WRITE SAME LENGTH, in blocks.
    pub max_write_same_length: u64,
}

impl BlockLimits {
    /// The maximum transfer length, `None` when not reported.
    pub fn max_transfer(&self) -> Option<u32> {
        (self.max_transfer_length != 0).then_some(self.max_transfer_length)
    }

    /// Parses the page.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "block limits page";
        let b = body(buf, page::BLOCK_LIMITS, what)?;
        min_body(b, BLOCK_LIMITS_MIN_LEN, what)?;
        // Offsets below are page offsets; the body starts at page offset 4.
        let u32_at = |off: usize| be32_at(b, off - 4).unwrap_or(0);
        let uga = u32_at(32);
        Ok(BlockLimits {
            wsnz: b.first().is_some_and(|v| v & 0x01 != 0),
            max_compare_and_write: b.get(1).copied().unwrap_or(0),
            optimal_transfer_granularity: be16_at(b, 2).unwrap_or(0),
            max_transfer_length: u32_at(8),
            optimal_transfer_length: u32_at(12),
            max_prefetch_length: u32_at(16),
            max_unmap_lba_count: u32_at(20),
            max_unmap_descriptor_count: u32_at(24),
            optimal_unmap_granularity: u32_at(28),
            unmap_granularity_alignment: (uga & 0x8000_0000 != 0).then_some(uga & 0x7fff_ffff),
            max_write_same_length: be64_at(b, 32).unwrap_or(0),
        })
    }

    /// Encodes a full (3Ch page length) page. An alignment above 31 bits is
    /// masked to 31 bits.
    pub fn encode(&self, peripheral: Peripheral) -> Vec<u8> {
        let mut b = [0u8; 4 + BLOCK_LIMITS_PAGE_LEN];
        b[0] = peripheral.to_byte();
        b[1] = page::BLOCK_LIMITS;
        b[3] = BLOCK_LIMITS_PAGE_LEN as u8;
        b[4] = u8::from(self.wsnz);
        b[5] = self.max_compare_and_write;
        b[6..8].copy_from_slice(&self.optimal_transfer_granularity.to_be_bytes());
        b[8..12].copy_from_slice(&self.max_transfer_length.to_be_bytes());
        b[12..16].copy_from_slice(&self.optimal_transfer_length.to_be_bytes());
        b[16..20].copy_from_slice(&self.max_prefetch_length.to_be_bytes());
        b[20..24].copy_from_slice(&self.max_unmap_lba_count.to_be_bytes());
        b[24..28].copy_from_slice(&self.max_unmap_descriptor_count.to_be_bytes());
        b[28..32].copy_from_slice(&self.optimal_unmap_granularity.to_be_bytes());
        if let Some(a) = self.unmap_granularity_alignment {
            b[32..36].copy_from_slice(&(0x8000_0000 | (a & 0x7fff_ffff)).to_be_bytes());
        }
        b[36..44].copy_from_slice(&self.max_write_same_length.to_be_bytes());
        b.to_vec()
    }
}

/// Block device characteristics (B1h).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockDeviceCharacteristics {
    /// MEDIUM ROTATION RATE: 0 not reported, 1 non-rotating (solid state),
    /// otherwise revolutions per minute.
    pub medium_rotation_rate: u16,
    /// PRODUCT TYPE.
    pub product_type: u8,
    /// WABEREQ (2 bits).
    pub wabereq: u8,
    /// WACEREQ (2 bits).
    pub wacereq: u8,
    /// NOMINAL FORM FACTOR (4 bits): 0 not reported, 1 5.25", 2 3.5",
    /// 3 2.5", 4 1.8", 5 less than 1.8".
    pub nominal_form_factor: u8,
    /// ZONED (2 bits).
    pub zoned: u8,
    /// FUAB: SYNCHRONIZE CACHE honours FUA semantics.
    pub fuab: bool,
    /// VBULS: VERIFY with BYTCHK=0 checks unmapped blocks.
    pub vbuls: bool,
}

impl BlockDeviceCharacteristics {
    /// MEDIUM ROTATION RATE of a non-rotating medium.
    pub const NON_ROTATING: u16 = 1;
    /// Page length of the page [`encode`](Self::encode) writes.
    const PAGE_LEN: usize = 0x3c;

    /// True for solid-state media.
    pub fn is_non_rotating(&self) -> bool {
        self.medium_rotation_rate == Self::NON_ROTATING
    }

    /// Parses the page (at least the 4 bytes through the form factor).
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "block device characteristics page";
        let b = body(buf, page::BLOCK_DEVICE_CHARACTERISTICS, what)?;
        min_body(b, 4, what)?;
        let b3 = b.get(3).copied().unwrap_or(0);
        let b4 = b.get(4).copied().unwrap_or(0);
        Ok(BlockDeviceCharacteristics {
            medium_rotation_rate: be16_at(b, 0).unwrap_or(0),
            product_type: b.get(2).copied().unwrap_or(0),
            wabereq: b3 >> 6,
            wacereq: (b3 >> 4) & 0x03,
            nominal_form_factor: b3 & 0x0f,
            zoned: (b4 >> 4) & 0x03,
            fuab: b4 & 0x02 != 0,
            vbuls: b4 & 0x01 != 0,
        })
    }

    /// Encodes a full (3Ch page length) page.
    pub fn encode(&self, peripheral: Peripheral) -> Vec<u8> {
        let mut b = [0u8; 4 + Self::PAGE_LEN];
        b[0] = peripheral.to_byte();
        b[1] = page::BLOCK_DEVICE_CHARACTERISTICS;
        b[3] = Self::PAGE_LEN as u8;
        b[4..6].copy_from_slice(&self.medium_rotation_rate.to_be_bytes());
        b[6] = self.product_type;
        b[7] = ((self.wabereq & 0x03) << 6)
            | ((self.wacereq & 0x03) << 4)
            | (self.nominal_form_factor & 0x0f);
        b[8] = ((self.zoned & 0x03) << 4) | if self.fuab { 0x02 } else { 0 } | u8::from(self.vbuls);
        b.to_vec()
    }
}

/// PROVISIONING TYPE of the logical block provisioning page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProvisioningType {
    /// 0: fully provisioned (or not reported).
    Full,
    /// 1: resource provisioned.
    Resource,
    /// 2: thin provisioned.
    Thin,
    /// Any other (reserved) 3-bit value.
    Other(u8),
}

impl ProvisioningType {
    /// Decodes the low 3 bits.
    pub const fn from_u8(v: u8) -> Self {
        match v & 0x07 {
            0 => ProvisioningType::Full,
            1 => ProvisioningType::Resource,
            2 => ProvisioningType::Thin,
            o => ProvisioningType::Other(o),
        }
    }

    /// The 3-bit value.
    pub const fn to_u8(self) -> u8 {
        match self {
            ProvisioningType::Full => 0,
            ProvisioningType::Resource => 1,
            ProvisioningType::Thin => 2,
            ProvisioningType::Other(o) => o & 0x07,
        }
    }
}

/// Logical block provisioning (B2h). The provisioning group descriptor is
/// not kept (the page is encoded without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogicalBlockProvisioning {
    /// THRESHOLD EXPONENT.
    pub threshold_exponent: u8,
    /// LBPU: UNMAP is supported.
    pub lbpu: bool,
    /// LBPWS: WRITE SAME(16) with UNMAP is supported.
    pub lbpws: bool,
    /// LBPWS10: WRITE SAME(10) with UNMAP is supported.
    pub lbpws10: bool,
    /// LBPRZ (3 bits): xx1b unmapped blocks read as zeros, 010b as the
    /// provisioning initialization pattern, 000b vendor specific.
    pub lbprz: u8,
    /// ANC_SUP: anchored LBAs supported.
    pub anc_sup: bool,
    /// MINIMUM PERCENTAGE (5 bits).
    pub minimum_percentage: u8,
    /// PROVISIONING TYPE.
    pub provisioning_type: ProvisioningType,
    /// THRESHOLD PERCENTAGE.
    pub threshold_percentage: u8,
}

impl Default for LogicalBlockProvisioning {
    fn default() -> Self {
        LogicalBlockProvisioning {
            threshold_exponent: 0,
            lbpu: false,
            lbpws: false,
            lbpws10: false,
            lbprz: 0,
            anc_sup: false,
            minimum_percentage: 0,
            provisioning_type: ProvisioningType::Full,
            threshold_percentage: 0,
        }
    }
}

impl LogicalBlockProvisioning {
    /// Unmapped blocks read back as zeros.
    pub fn unmapped_reads_zero(&self) -> bool {
        self.lbprz & 0x01 != 0
    }

    /// Parses the page (at least 4 bytes of body).
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "logical block provisioning page";
        let b = body(buf, page::LOGICAL_BLOCK_PROVISIONING, what)?;
        min_body(b, 4, what)?;
        let (b0, b1, b2, b3) = match *b {
            [b0, b1, b2, b3, ..] => (b0, b1, b2, b3),
            _ => (0, 0, 0, 0),
        };
        Ok(LogicalBlockProvisioning {
            threshold_exponent: b0,
            lbpu: b1 & 0x80 != 0,
            lbpws: b1 & 0x40 != 0,
            lbpws10: b1 & 0x20 != 0,
            lbprz: (b1 >> 2) & 0x07,
            anc_sup: b1 & 0x02 != 0,
            minimum_percentage: b2 >> 3,
            provisioning_type: ProvisioningType::from_u8(b2),
            threshold_percentage: b3,
        })
    }

    /// Encodes the page (page length 4, DP clear).
    pub fn encode(&self, peripheral: Peripheral) -> Vec<u8> {
        vec![
            peripheral.to_byte(),
            page::LOGICAL_BLOCK_PROVISIONING,
            0,
            4,
            self.threshold_exponent,
            if self.lbpu { 0x80 } else { 0 }
                | if self.lbpws { 0x40 } else { 0 }
                | if self.lbpws10 { 0x20 } else { 0 }
                | ((self.lbprz & 0x07) << 2)
                | if self.anc_sup { 0x02 } else { 0 },
            ((self.minimum_percentage & 0x1f) << 3) | self.provisioning_type.to_u8(),
            self.threshold_percentage,
        ]
    }
}

/// Any VPD page, decoded by its page code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VpdPage {
    /// 00h.
    SupportedPages(SupportedPages),
    /// 80h.
    UnitSerialNumber(UnitSerialNumber),
    /// 83h.
    DeviceIdentification(DeviceIdentification),
    /// B0h.
    BlockLimits(BlockLimits),
    /// B1h.
    BlockDeviceCharacteristics(BlockDeviceCharacteristics),
    /// B2h.
    LogicalBlockProvisioning(LogicalBlockProvisioning),
    /// Any other page: its code and body.
    Other {
        /// Page code.
        page: u8,
        /// The bytes the page length covers.
        data: Vec<u8>,
    },
}

impl VpdPage {
    /// Parses whichever page `buf` holds.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let code = page_code(buf)?;
        Ok(match code {
            page::SUPPORTED_PAGES => VpdPage::SupportedPages(SupportedPages::parse(buf)?),
            page::UNIT_SERIAL_NUMBER => VpdPage::UnitSerialNumber(UnitSerialNumber::parse(buf)?),
            page::DEVICE_IDENTIFICATION => {
                VpdPage::DeviceIdentification(DeviceIdentification::parse(buf)?)
            }
            page::BLOCK_LIMITS => VpdPage::BlockLimits(BlockLimits::parse(buf)?),
            page::BLOCK_DEVICE_CHARACTERISTICS => {
                VpdPage::BlockDeviceCharacteristics(BlockDeviceCharacteristics::parse(buf)?)
            }
            page::LOGICAL_BLOCK_PROVISIONING => {
                VpdPage::LogicalBlockProvisioning(LogicalBlockProvisioning::parse(buf)?)
            }
            other => VpdPage::Other {
                page: other,
                data: body(buf, other, "VPD page")?.to_vec(),
            },
        })
    }

    /// The page code.
    pub fn code(&self) -> u8 {
        match self {
            VpdPage::SupportedPages(_) => page::SUPPORTED_PAGES,
            VpdPage::UnitSerialNumber(_) => page::UNIT_SERIAL_NUMBER,
            VpdPage::DeviceIdentification(_) => page::DEVICE_IDENTIFICATION,
            VpdPage::BlockLimits(_) => page::BLOCK_LIMITS,
            VpdPage::BlockDeviceCharacteristics(_) => page::BLOCK_DEVICE_CHARACTERISTICS,
            VpdPage::LogicalBlockProvisioning(_) => page::LOGICAL_BLOCK_PROVISIONING,
            VpdPage::Other { page, .. } => *page,
        }
    }

    /// Encodes the page.
    pub fn encode(&self, peripheral: Peripheral) -> Result<Vec<u8>, EncodeError> {
        match self {
            VpdPage::SupportedPages(p) => p.encode(peripheral),
            VpdPage::UnitSerialNumber(p) => p.encode(peripheral),
            VpdPage::DeviceIdentification(p) => p.encode(peripheral),
            VpdPage::BlockLimits(p) => Ok(p.encode(peripheral)),
            VpdPage::BlockDeviceCharacteristics(p) => Ok(p.encode(peripheral)),
            VpdPage::LogicalBlockProvisioning(p) => Ok(p.encode(peripheral)),
            VpdPage::Other { page, data } => page_bytes(peripheral, *page, data, "VPD page"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Peripheral = Peripheral::DISK;

    #[test]
    fn supported_pages() {
        let b = [0x00, 0x00, 0x00, 0x04, 0x00, 0x80, 0x83, 0xb0];
        let p = SupportedPages::parse(&b).unwrap();
        assert_eq!(p.pages, vec![0x00, 0x80, 0x83, 0xb0]);
        assert!(p.contains(0xb0));
        assert!(!p.contains(0xb2));
        assert_eq!(p.encode(P).unwrap(), b);
        assert_eq!(
            SupportedPages::parse(&b[..7]),
            Err(ParseError::Truncated {
                what: "supported VPD pages page",
                need: 8,
                got: 7
            })
        );
        assert_eq!(
            SupportedPages::parse(&b[..3]),
            Err(ParseError::TooShort {
                what: "supported VPD pages page",
                need: 4,
                got: 3
            })
        );
        let too_many = SupportedPages {
            pages: vec![0; 65536],
        };
        assert!(matches!(
            too_many.encode(P),
            Err(EncodeError::FieldTooLong { len: 65536, .. })
        ));
    }

    #[test]
    fn wrong_page() {
        let b = BlockLimits::default().encode(P);
        assert_eq!(
            SupportedPages::parse(&b),
            Err(ParseError::WrongPage {
                what: "supported VPD pages page",
                expected: 0,
                got: 0xb0
            })
        );
        assert!(matches!(
            UnitSerialNumber::parse(&b),
            Err(ParseError::WrongPage { .. })
        ));
        assert!(matches!(
            DeviceIdentification::parse(&b),
            Err(ParseError::WrongPage { .. })
        ));
        assert!(matches!(
            BlockDeviceCharacteristics::parse(&b),
            Err(ParseError::WrongPage { .. })
        ));
        assert!(matches!(
            LogicalBlockProvisioning::parse(&b),
            Err(ParseError::WrongPage { .. })
        ));
        let b = LogicalBlockProvisioning::default().encode(P);
        assert!(matches!(
            BlockLimits::parse(&b),
            Err(ParseError::WrongPage { .. })
        ));
    }

    #[test]
    fn unit_serial() {
        let b = [
            0x00, 0x80, 0x00, 0x08, b' ', b' ', b'S', b'N', b'1', b'2', 0, 0,
        ];
        let s = UnitSerialNumber::parse(&b).unwrap();
        assert_eq!(s.serial, "SN12");
        let e = s.encode(P).unwrap();
        assert_eq!(e, [0x00, 0x80, 0x00, 0x04, b'S', b'N', b'1', b'2']);
        assert_eq!(UnitSerialNumber::parse(&e).unwrap(), s);
        assert!(matches!(
            UnitSerialNumber::parse(&b[..10]),
            Err(ParseError::Truncated {
                need: 12,
                got: 10,
                ..
            })
        ));
        let bad = UnitSerialNumber {
            serial: "\u{7f}".into(),
        };
        assert!(matches!(bad.encode(P), Err(EncodeError::NotAscii { .. })));
    }

    fn sample_ids() -> DeviceIdentification {
        DeviceIdentification {
            designators: vec![
                Designator::t10_vendor_id("VIREO", "disk-0").unwrap(),
                Designator::logical_unit(
                    DesignatorType::Naa,
                    CodeSet::Binary,
                    vec![0x60, 0x01, 0x40, 0x50, 0xde, 0xad, 0xbe, 0xef],
                ),
                Designator {
                    protocol_id: 6,
                    code_set: CodeSet::Binary,
                    piv: true,
                    association: Association::TargetPort,
                    designator_type: DesignatorType::RelativeTargetPort,
                    designator: vec![0, 0, 0, 1],
                },
                Designator {
                    protocol_id: 0,
                    code_set: CodeSet::Other(0xf),
                    piv: false,
                    association: Association::Reserved,
                    designator_type: DesignatorType::Other(0xc),
                    designator: vec![],
                },
            ],
        }
    }

    #[test]
    fn device_identification_round_trip() {
        let ids = sample_ids();
        let b = ids.encode(P).unwrap();
        // T10 vendor id header: ASCII code set, LU association, type 1, length 14.
        assert_eq!(&b[4..8], &[0x02, 0x01, 0x00, 14]);
        assert_eq!(&b[8..22], b"VIREO   disk-0");
        // Relative target port: protocol 6, binary, PIV, target port association.
        assert_eq!(&b[34..38], &[0x61, 0x94, 0x00, 4]);
        let p = DeviceIdentification::parse(&b).unwrap();
        assert_eq!(p, ids);
        assert_eq!(p.preferred().unwrap().designator_type, DesignatorType::Naa);
        assert_eq!(p.preferred().unwrap().to_text(), "60014050deadbeef");
        assert_eq!(
            p.find(DesignatorType::T10VendorId).unwrap().to_text(),
            "VIREO   disk-0"
        );
        assert!(p.find(DesignatorType::RelativeTargetPort).is_none());
        assert!(DeviceIdentification::default().preferred().is_none());
    }

    #[test]
    fn device_identification_errors() {
        let b = sample_ids().encode(P).unwrap();
        // Designator length pointing past the page.
        let mut bad = b.clone();
        bad[7] = 200;
        assert_eq!(
            DeviceIdentification::parse(&bad),
            Err(ParseError::Overrun {
                what: "device identification page",
                offset: 4
            })
        );
        // Page length cutting a designator header short.
        let mut bad = b[..6].to_vec();
        bad[3] = 2;
        assert!(matches!(
            DeviceIdentification::parse(&bad),
            Err(ParseError::Overrun { offset: 4, .. })
        ));
        // Page longer than the buffer.
        assert!(matches!(
            DeviceIdentification::parse(&b[..b.len() - 1]),
            Err(ParseError::Truncated { .. })
        ));
        // Designator too long to encode.
        let big = DeviceIdentification {
            designators: vec![Designator::logical_unit(
                DesignatorType::VendorSpecific,
                CodeSet::Binary,
                vec![0; 256],
            )],
        };
        assert!(matches!(
            big.encode(P),
            Err(EncodeError::FieldTooLong {
                len: 256,
                max: 255,
                ..
            })
        ));
        assert!(Designator::t10_vendor_id("NINECHARS", "x").is_err());
        // Enough designators to overflow the page length.
        let huge = DeviceIdentification {
            designators: vec![
                Designator::logical_unit(
                    DesignatorType::VendorSpecific,
                    CodeSet::Binary,
                    vec![0; 255]
                );
                260
            ],
        };
        assert!(matches!(
            huge.encode(P),
            Err(EncodeError::FieldTooLong { .. })
        ));
    }

    #[test]
    fn enums_round_trip() {
        for v in 0..16u8 {
            assert_eq!(CodeSet::from_u8(v).to_u8(), v);
            assert_eq!(DesignatorType::from_u8(v).to_u8(), v);
        }
        for v in 0..4u8 {
            assert_eq!(Association::from_u8(v).to_u8(), v);
        }
        for v in 0..8u8 {
            assert_eq!(ProvisioningType::from_u8(v).to_u8(), v);
        }
    }

    fn sample_limits() -> BlockLimits {
        BlockLimits {
            wsnz: true,
            max_compare_and_write: 1,
            optimal_transfer_granularity: 8,
            max_transfer_length: 0x4000,
            optimal_transfer_length: 0x100,
            max_prefetch_length: 0x200,
            max_unmap_lba_count: 0x0040_0000,
            max_unmap_descriptor_count: 255,
            optimal_unmap_granularity: 8,
            unmap_granularity_alignment: Some(0),
            max_write_same_length: 0x1_0000_0000,
        }
    }

    #[test]
    fn block_limits_known_bytes() {
        let l = sample_limits();
        let b = l.encode(P);
        assert_eq!(b.len(), 64);
        assert_eq!(&b[..4], &[0x00, 0xb0, 0x00, 0x3c]);
        assert_eq!(&b[4..8], &[0x01, 0x01, 0x00, 0x08]);
        assert_eq!(&b[8..12], &[0x00, 0x00, 0x40, 0x00]);
        assert_eq!(&b[20..24], &[0x00, 0x40, 0x00, 0x00]);
        assert_eq!(&b[24..28], &[0, 0, 0, 255]);
        assert_eq!(&b[32..36], &[0x80, 0, 0, 0]);
        assert_eq!(&b[36..44], &[0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(BlockLimits::parse(&b).unwrap(), l);
        assert_eq!(l.max_transfer(), Some(0x4000));
        assert_eq!(BlockLimits::default().max_transfer(), None);
        let mut no_uga = l;
        no_uga.unmap_granularity_alignment = None;
        let b = no_uga.encode(P);
        assert_eq!(&b[32..36], &[0, 0, 0, 0]);
        assert_eq!(BlockLimits::parse(&b).unwrap(), no_uga);
    }

    #[test]
    fn block_limits_short_pages() {
        let l = sample_limits();
        let full = l.encode(P);
        // SBC-2 layout: page length 0Ch, unmap fields absent.
        let mut old = full[..16].to_vec();
        old[3] = 0x0c;
        let p = BlockLimits::parse(&old).unwrap();
        assert_eq!(p.max_transfer_length, 0x4000);
        assert_eq!(p.optimal_transfer_length, 0x100);
        assert_eq!(p.max_unmap_lba_count, 0);
        assert_eq!(p.unmap_granularity_alignment, None);
        assert_eq!(p.max_write_same_length, 0);
        // Shorter than that is a bad length.
        let mut tiny = full[..12].to_vec();
        tiny[3] = 8;
        assert_eq!(
            BlockLimits::parse(&tiny),
            Err(ParseError::BadLength {
                what: "block limits page",
                value: 8
            })
        );
        // Returned data cut short of the page length.
        assert_eq!(
            BlockLimits::parse(&full[..40]),
            Err(ParseError::Truncated {
                what: "block limits page",
                need: 64,
                got: 40
            })
        );
    }

    #[test]
    fn block_device_characteristics() {
        let c = BlockDeviceCharacteristics {
            medium_rotation_rate: BlockDeviceCharacteristics::NON_ROTATING,
            product_type: 0,
            wabereq: 1,
            wacereq: 2,
            nominal_form_factor: 3,
            zoned: 1,
            fuab: true,
            vbuls: true,
        };
        let b = c.encode(P);
        assert_eq!(
            &b[..9],
            &[0x00, 0xb1, 0x00, 0x3c, 0x00, 0x01, 0x00, 0x63, 0x13]
        );
        let p = BlockDeviceCharacteristics::parse(&b).unwrap();
        assert_eq!(p, c);
        assert!(p.is_non_rotating());
        // A 4-byte body has no byte 8 flags.
        let short = [0x00, 0xb1, 0x00, 0x04, 0x1c, 0x20, 0x00, 0x02];
        let p = BlockDeviceCharacteristics::parse(&short).unwrap();
        assert_eq!(p.medium_rotation_rate, 7200);
        assert_eq!(p.nominal_form_factor, 2);
        assert!(!p.fuab);
        assert!(matches!(
            BlockDeviceCharacteristics::parse(&[0x00, 0xb1, 0x00, 0x03, 0, 0, 0]),
            Err(ParseError::BadLength { value: 3, .. })
        ));
    }

    #[test]
    fn logical_block_provisioning() {
        let p = LogicalBlockProvisioning {
            threshold_exponent: 3,
            lbpu: true,
            lbpws: true,
            lbpws10: false,
            lbprz: 1,
            anc_sup: true,
            minimum_percentage: 0x1f,
            provisioning_type: ProvisioningType::Thin,
            threshold_percentage: 9,
        };
        let b = p.encode(P);
        assert_eq!(b, [0x00, 0xb2, 0x00, 0x04, 3, 0xc6, 0xfa, 9]);
        let q = LogicalBlockProvisioning::parse(&b).unwrap();
        assert_eq!(q, p);
        assert!(q.unmapped_reads_zero());
        // With DP and a provisioning group descriptor: descriptor ignored.
        let mut with_desc = b.clone();
        with_desc[3] = 8;
        with_desc[5] |= 0x01;
        with_desc.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(LogicalBlockProvisioning::parse(&with_desc).unwrap(), p);
        assert!(matches!(
            LogicalBlockProvisioning::parse(&[0x00, 0xb2, 0x00, 0x02, 0, 0]),
            Err(ParseError::BadLength { value: 2, .. })
        ));
        let mut pattern = p;
        pattern.lbprz = 2;
        assert!(!pattern.unmapped_reads_zero());
    }

    #[test]
    fn any_page() {
        let pages = [
            VpdPage::SupportedPages(SupportedPages {
                pages: vec![0, 0x80],
            }),
            VpdPage::UnitSerialNumber(UnitSerialNumber {
                serial: "abc".into(),
            }),
            VpdPage::DeviceIdentification(sample_ids()),
            VpdPage::BlockLimits(sample_limits()),
            VpdPage::BlockDeviceCharacteristics(BlockDeviceCharacteristics::default()),
            VpdPage::LogicalBlockProvisioning(LogicalBlockProvisioning::default()),
            VpdPage::Other {
                page: 0x86,
                data: vec![1, 2, 3],
            },
        ];
        for p in pages {
            let b = p.encode(Peripheral::DISK).unwrap();
            assert_eq!(page_code(&b), Ok(p.code()));
            assert_eq!(VpdPage::parse(&b).unwrap(), p);
        }
        assert!(matches!(
            VpdPage::parse(&[0]),
            Err(ParseError::TooShort { .. })
        ));
        assert!(matches!(
            VpdPage::parse(&[0, 0x86, 0]),
            Err(ParseError::TooShort { .. })
        ));
    }
}
