//! Sense data (SPC-5 4.4): fixed (70h/71h) and descriptor (72h/73h) formats,
//! sense keys and the additional sense codes a target commonly reports.

use std::fmt;

use crate::cdb::{opcode, Cdb};
use crate::error::ParseError;
use crate::wire::{array_at, be32, be64_at};

/// Sense key (SPC-5 table 49). Every 4-bit value has a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseKey {
    /// 0h: no specific sense key information.
    NoSense,
    /// 1h: the command completed after recovery action.
    RecoveredError,
    /// 2h: the logical unit is not accessible.
    NotReady,
    /// 3h: a flaw in the medium or recorded data.
    MediumError,
    /// 4h: a non-recoverable hardware failure.
    HardwareError,
    /// 5h: an illegal parameter in the CDB or the parameter list.
    IllegalRequest,
    /// 6h: a unit attention condition (reset, capacity change, ...).
    UnitAttention,
    /// 7h: the command was refused by write protection or another protection.
    DataProtect,
    /// 8h: blank medium or format-defined end-of-data.
    BlankCheck,
    /// 9h: vendor specific.
    VendorSpecific,
    /// Ah: EXTENDED COPY aborted.
    CopyAborted,
    /// Bh: the device server aborted the command; it may be retried.
    AbortedCommand,
    /// Ch: reserved (formerly EQUAL).
    Reserved,
    /// Dh: a buffered device reached end-of-partition.
    VolumeOverflow,
    /// Eh: source data did not match (COMPARE AND WRITE, VERIFY).
    Miscompare,
    /// Fh: the command completed; sense data carries completion information.
    Completed,
}

impl SenseKey {
    /// Decodes the low 4 bits of `v`.
    pub const fn from_u8(v: u8) -> Self {
        match v & 0x0f {
            0x0 => SenseKey::NoSense,
            0x1 => SenseKey::RecoveredError,
            0x2 => SenseKey::NotReady,
            0x3 => SenseKey::MediumError,
            0x4 => SenseKey::HardwareError,
            0x5 => SenseKey::IllegalRequest,
            0x6 => SenseKey::UnitAttention,
            0x7 => SenseKey::DataProtect,
            0x8 => SenseKey::BlankCheck,
            0x9 => SenseKey::VendorSpecific,
            0xa => SenseKey::CopyAborted,
            0xb => SenseKey::AbortedCommand,
            0xc => SenseKey::Reserved,
            0xd => SenseKey::VolumeOverflow,
            0xe => SenseKey::Miscompare,
            _ => SenseKey::Completed,
        }
    }

    /// The 4-bit wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            SenseKey::NoSense => 0x0,
            SenseKey::RecoveredError => 0x1,
            SenseKey::NotReady => 0x2,
            SenseKey::MediumError => 0x3,
            SenseKey::HardwareError => 0x4,
            SenseKey::IllegalRequest => 0x5,
            SenseKey::UnitAttention => 0x6,
            SenseKey::DataProtect => 0x7,
            SenseKey::BlankCheck => 0x8,
            SenseKey::VendorSpecific => 0x9,
            SenseKey::CopyAborted => 0xa,
            SenseKey::AbortedCommand => 0xb,
            SenseKey::Reserved => 0xc,
            SenseKey::VolumeOverflow => 0xd,
            SenseKey::Miscompare => 0xe,
            SenseKey::Completed => 0xf,
        }
    }

    /// The name used by SPC.
    pub const fn name(self) -> &'static str {
        match self {
            SenseKey::NoSense => "NO SENSE",
            SenseKey::RecoveredError => "RECOVERED ERROR",
            SenseKey::NotReady => "NOT READY",
            SenseKey::MediumError => "MEDIUM ERROR",
            SenseKey::HardwareError => "HARDWARE ERROR",
            SenseKey::IllegalRequest => "ILLEGAL REQUEST",
            SenseKey::UnitAttention => "UNIT ATTENTION",
            SenseKey::DataProtect => "DATA PROTECT",
            SenseKey::BlankCheck => "BLANK CHECK",
            SenseKey::VendorSpecific => "VENDOR SPECIFIC",
            SenseKey::CopyAborted => "COPY ABORTED",
            SenseKey::AbortedCommand => "ABORTED COMMAND",
            SenseKey::Reserved => "RESERVED (0Ch)",
            SenseKey::VolumeOverflow => "VOLUME OVERFLOW",
            SenseKey::Miscompare => "MISCOMPARE",
            SenseKey::Completed => "COMPLETED",
        }
    }
}

impl fmt::Display for SenseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An additional sense code and its qualifier (ASC/ASCQ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asc {
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Asc {
    /// 00/00 NO ADDITIONAL SENSE INFORMATION.
    pub const NO_ADDITIONAL_SENSE: Asc = Asc::new(0x00, 0x00);
    /// 04/00 LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE.
    pub const NOT_READY_CAUSE_NOT_REPORTABLE: Asc = Asc::new(0x04, 0x00);
    /// 04/01 LOGICAL UNIT IS IN PROCESS OF BECOMING READY.
    pub const NOT_READY_BECOMING_READY: Asc = Asc::new(0x04, 0x01);
    /// 04/02 LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED (send START UNIT).
    pub const NOT_READY_INITIALIZING_COMMAND_REQUIRED: Asc = Asc::new(0x04, 0x02);
    /// 0C/00 WRITE ERROR.
    pub const WRITE_ERROR: Asc = Asc::new(0x0c, 0x00);
    /// 11/00 UNRECOVERED READ ERROR.
    pub const UNRECOVERED_READ_ERROR: Asc = Asc::new(0x11, 0x00);
    /// 1A/00 PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = Asc::new(0x1a, 0x00);
    /// 20/00 INVALID COMMAND OPERATION CODE.
    pub const INVALID_COMMAND_OPERATION_CODE: Asc = Asc::new(0x20, 0x00);
    /// 21/00 LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Asc = Asc::new(0x21, 0x00);
    /// 24/00 INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: Asc = Asc::new(0x24, 0x00);
    /// 25/00 LOGICAL UNIT NOT SUPPORTED.
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Asc = Asc::new(0x25, 0x00);
    /// 26/00 INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = Asc::new(0x26, 0x00);
    /// 27/00 WRITE PROTECTED.
    pub const WRITE_PROTECTED: Asc = Asc::new(0x27, 0x00);
    /// 29/00 POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const POWER_ON_RESET: Asc = Asc::new(0x29, 0x00);
    /// 29/01 POWER ON OCCURRED.
    pub const POWER_ON_OCCURRED: Asc = Asc::new(0x29, 0x01);
    /// 2A/01 MODE PARAMETERS CHANGED.
    pub const MODE_PARAMETERS_CHANGED: Asc = Asc::new(0x2a, 0x01);
    /// 2A/09 CAPACITY DATA HAS CHANGED.
    pub const CAPACITY_DATA_CHANGED: Asc = Asc::new(0x2a, 0x09);
    /// 2F/00 COMMANDS CLEARED BY ANOTHER INITIATOR.
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Asc = Asc::new(0x2f, 0x00);
    /// 39/00 SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = Asc::new(0x39, 0x00);
    /// 3A/00 MEDIUM NOT PRESENT.
    pub const MEDIUM_NOT_PRESENT: Asc = Asc::new(0x3a, 0x00);
    /// 3F/03 INQUIRY DATA HAS CHANGED.
    pub const INQUIRY_DATA_CHANGED: Asc = Asc::new(0x3f, 0x03);
    /// 3F/0E REPORTED LUNS DATA HAS CHANGED.
    pub const REPORTED_LUNS_DATA_CHANGED: Asc = Asc::new(0x3f, 0x0e);
    /// 44/00 INTERNAL TARGET FAILURE.
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc::new(0x44, 0x00);

    /// An ASC/ASCQ pair.
    pub const fn new(asc: u8, ascq: u8) -> Self {
        Asc { asc, ascq }
    }

    /// A short description for the codes named above, `None` for others.
    pub fn description(self) -> Option<&'static str> {
        let d = match (self.asc, self.ascq) {
            (0x00, 0x00) => "no additional sense information",
            (0x04, 0x00) => "logical unit not ready, cause not reportable",
            (0x04, 0x01) => "logical unit is in process of becoming ready",
            (0x04, 0x02) => "logical unit not ready, initializing command required",
            (0x0c, 0x00) => "write error",
            (0x11, 0x00) => "unrecovered read error",
            (0x1a, 0x00) => "parameter list length error",
            (0x20, 0x00) => "invalid command operation code",
            (0x21, 0x00) => "logical block address out of range",
            (0x24, 0x00) => "invalid field in CDB",
            (0x25, 0x00) => "logical unit not supported",
            (0x26, 0x00) => "invalid field in parameter list",
            (0x27, 0x00) => "write protected",
            (0x29, 0x00) => "power on, reset, or bus device reset occurred",
            (0x29, 0x01) => "power on occurred",
            (0x2a, 0x01) => "mode parameters changed",
            (0x2a, 0x09) => "capacity data has changed",
            (0x2f, 0x00) => "commands cleared by another initiator",
            (0x39, 0x00) => "saving parameters not supported",
            (0x3a, 0x00) => "medium not present",
            (0x3f, 0x03) => "inquiry data has changed",
            (0x3f, 0x0e) => "reported luns data has changed",
            (0x44, 0x00) => "internal target failure",
            _ => return None,
        };
        Some(d)
    }
}

impl fmt::Display for Asc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02X}h/{:02X}h", self.asc, self.ascq)?;
        if let Some(d) = self.description() {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

/// A decoded sense-key-specific FIELD POINTER (ILLEGAL REQUEST): which byte
/// and bit of the CDB or parameter list was invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// True when the field is in the CDB, false for the parameter list.
    pub in_cdb: bool,
    /// Byte offset of the field.
    pub byte: u16,
    /// Bit of the field (0-7), when reported.
    pub bit: Option<u8>,
}

impl FieldPointer {
    /// The three sense-key-specific bytes, SKSV bit included.
    pub fn to_bytes(self) -> [u8; 3] {
        let mut b0 = 0x80;
        if self.in_cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = self.bit {
            b0 |= 0x08 | (bit & 0x07);
        }
        let [hi, lo] = self.byte.to_be_bytes();
        [b0, hi, lo]
    }

    /// Decodes three sense-key-specific bytes (the SKSV bit is ignored).
    pub fn from_bytes(b: [u8; 3]) -> Self {
        let [b0, hi, lo] = b;
        FieldPointer {
            in_cdb: b0 & 0x40 != 0,
            byte: u16::from_be_bytes([hi, lo]),
            bit: (b0 & 0x08 != 0).then_some(b0 & 0x07),
        }
    }
}

/// Response codes of sense data.
const FIXED_CURRENT: u8 = 0x70;
const FIXED_DEFERRED: u8 = 0x71;
const DESC_CURRENT: u8 = 0x72;
const DESC_DEFERRED: u8 = 0x73;

/// Length of the sense data [`Sense::to_fixed`] produces.
pub const FIXED_SENSE_LEN: usize = 18;

/// Which of the two sense data formats a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenseFormat {
    /// Response code 70h or 71h.
    Fixed,
    /// Response code 72h or 73h.
    Descriptor,
}

/// Decoded sense data, in either format.
///
/// Only what the initiator acts on is kept; unknown descriptors and vendor
/// bytes are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: SenseKey,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// INFORMATION field when valid (e.g. the first failing LBA). The fixed
    /// format only carries 32 bits of it.
    pub info: Option<u64>,
    /// COMMAND-SPECIFIC INFORMATION (0 when absent).
    pub command_specific: u64,
    /// Sense-key-specific bytes when SKSV is set (SKSV bit cleared here).
    pub sense_key_specific: Option<[u8; 3]>,
    /// FIELD REPLACEABLE UNIT CODE (0 when absent).
    pub fru: u8,
    /// Deferred error (response code 71h/73h) rather than current.
    pub deferred: bool,
    /// FILEMARK bit.
    pub filemark: bool,
    /// EOM bit.
    pub eom: bool,
    /// ILI (incorrect length indicator) bit.
    pub ili: bool,
}

impl Sense {
    /// Current sense data with a key and ASC/ASCQ and nothing else.
    pub const fn new(key: SenseKey, asc: Asc) -> Self {
        Sense {
            key,
            asc: asc.asc,
            ascq: asc.ascq,
            info: None,
            command_specific: 0,
            sense_key_specific: None,
            fru: 0,
            deferred: false,
            filemark: false,
            eom: false,
            ili: false,
        }
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at `byte` (and `bit`).
    pub fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> Self {
        Sense::new(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB).with_field_pointer(
            FieldPointer {
                in_cdb: true,
                byte,
                bit,
            },
        )
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST pointing at `byte`
    /// (and `bit`) of the parameter list.
    pub fn invalid_field_in_parameter_list(byte: u16, bit: Option<u8>) -> Self {
        Sense::new(
            SenseKey::IllegalRequest,
            Asc::INVALID_FIELD_IN_PARAMETER_LIST,
        )
        .with_field_pointer(FieldPointer {
            in_cdb: false,
            byte,
            bit,
        })
    }

    /// Sets the INFORMATION field.
    pub const fn with_info(mut self, info: u64) -> Self {
        self.info = Some(info);
        self
    }

    /// Sets the sense-key-specific bytes to a field pointer.
    pub fn with_field_pointer(mut self, fp: FieldPointer) -> Self {
        let [b0, b1, b2] = fp.to_bytes();
        self.sense_key_specific = Some([b0 & 0x7f, b1, b2]);
        self
    }

    /// ASC and ASCQ together.
    pub const fn additional(&self) -> Asc {
        Asc::new(self.asc, self.ascq)
    }

    /// True if the key and ASC/ASCQ are these.
    pub fn is(&self, key: SenseKey, asc: Asc) -> bool {
        self.key == key && self.additional() == asc
    }

    /// The field pointer of an ILLEGAL REQUEST, if one was reported.
    pub fn field_pointer(&self) -> Option<FieldPointer> {
        match (self.key, self.sense_key_specific) {
            (SenseKey::IllegalRequest, Some(b)) => Some(FieldPointer::from_bytes(b)),
            _ => None,
        }
    }

    /// Sense key UNIT ATTENTION.
    pub fn is_unit_attention(&self) -> bool {
        self.key == SenseKey::UnitAttention
    }

    /// Sense key NOT READY.
    pub fn is_not_ready(&self) -> bool {
        self.key == SenseKey::NotReady
    }

    /// NOT READY because the unit needs a START STOP UNIT (04/02).
    pub fn needs_start_unit(&self) -> bool {
        self.is(
            SenseKey::NotReady,
            Asc::NOT_READY_INITIALIZING_COMMAND_REQUIRED,
        )
    }

    /// Sense key ILLEGAL REQUEST.
    pub fn is_illegal_request(&self) -> bool {
        self.key == SenseKey::IllegalRequest
    }

    /// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE: the command is not supported.
    pub fn is_unsupported_command(&self) -> bool {
        self.is(
            SenseKey::IllegalRequest,
            Asc::INVALID_COMMAND_OPERATION_CODE,
        )
    }

    /// Sense key MEDIUM ERROR.
    pub fn is_medium_error(&self) -> bool {
        self.key == SenseKey::MediumError
    }

    /// Sense key ABORTED COMMAND.
    pub fn is_aborted_command(&self) -> bool {
        self.key == SenseKey::AbortedCommand
    }

    /// Sense key NO SENSE or RECOVERED ERROR: the command actually succeeded
    /// (or sense carries no error).
    pub fn is_benign(&self) -> bool {
        matches!(
            self.key,
            SenseKey::NoSense | SenseKey::RecoveredError | SenseKey::Completed
        )
    }

    /// The format of the sense data in `buf`, from its response code.
    pub fn format_of(buf: &[u8]) -> Result<SenseFormat, ParseError> {
        let code = *buf.first().ok_or(ParseError::TooShort {
            what: "sense data",
            need: 1,
            got: 0,
        })? & 0x7f;
        match code {
            FIXED_CURRENT | FIXED_DEFERRED => Ok(SenseFormat::Fixed),
            DESC_CURRENT | DESC_DEFERRED => Ok(SenseFormat::Descriptor),
            other => Err(ParseError::UnsupportedSenseFormat(other)),
        }
    }

    /// Parses sense data of either format.
    ///
    /// `buf` may be shorter than the additional sense length announces (the
    /// sense buffer was too small): fields past its end read as absent, and a
    /// descriptor cut off by that end is ignored. Within the announced length
    /// a descriptor that overruns it is an error.
    pub fn parse(buf: &[u8]) -> Result<Sense, ParseError> {
        match Sense::format_of(buf)? {
            SenseFormat::Fixed => Sense::parse_fixed(buf),
            SenseFormat::Descriptor => Sense::parse_descriptor(buf),
        }
    }

    fn parse_fixed(buf: &[u8]) -> Result<Sense, ParseError> {
        let what = "fixed format sense data";
        let h = crate::wire::head::<8>(buf, what)?;
        let end = buf.len().min(8 + usize::from(h[7]));
        let body = buf.get(..end).unwrap_or(buf);
        let valid = h[0] & 0x80 != 0;
        let info = be32([h[3], h[4], h[5], h[6]]);
        let sks = array_at::<3>(body, 15).filter(|b| b[0] & 0x80 != 0);
        Ok(Sense {
            key: SenseKey::from_u8(h[2]),
            asc: body.get(12).copied().unwrap_or(0),
            ascq: body.get(13).copied().unwrap_or(0),
            info: valid.then_some(u64::from(info)),
            command_specific: array_at::<4>(body, 8).map_or(0, |b| u64::from(be32(b))),
            sense_key_specific: sks.map(|[b0, b1, b2]| [b0 & 0x7f, b1, b2]),
            fru: body.get(14).copied().unwrap_or(0),
            deferred: h[0] & 0x7f == FIXED_DEFERRED,
            filemark: h[2] & 0x80 != 0,
            eom: h[2] & 0x40 != 0,
            ili: h[2] & 0x20 != 0,
        })
    }

    fn parse_descriptor(buf: &[u8]) -> Result<Sense, ParseError> {
        let what = "descriptor format sense data";
        let h = crate::wire::head::<8>(buf, what)?;
        let announced = 8 + usize::from(h[7]);
        let truncated = buf.len() < announced;
        let list = buf.get(8..announced.min(buf.len())).unwrap_or(&[]);
        let mut s = Sense::new(SenseKey::from_u8(h[1]), Asc::new(h[2], h[3]));
        s.deferred = h[0] & 0x7f == DESC_DEFERRED;

        let mut off = 0usize;
        while off < list.len() {
            let rest = list.get(off..).unwrap_or(&[]);
            let (Some(&ty), Some(&add_len)) = (rest.first(), rest.get(1)) else {
                if truncated {
                    break;
                }
                return Err(ParseError::Overrun {
                    what,
                    offset: 8 + off,
                });
            };
            let len = 2 + usize::from(add_len);
            let Some(d) = rest.get(..len) else {
                if truncated {
                    break;
                }
                return Err(ParseError::Overrun {
                    what,
                    offset: 8 + off,
                });
            };
            s.apply_descriptor(ty, d)?;
            off += len;
        }
        Ok(s)
    }

    /// Applies one sense data descriptor `d` (header included) of type `ty`.
    fn apply_descriptor(&mut self, ty: u8, d: &[u8]) -> Result<(), ParseError> {
        let need = |min: usize, what: &'static str| -> Result<(), ParseError> {
            if d.len() < min {
                Err(ParseError::BadLength {
                    what,
                    value: d.len().saturating_sub(2),
                })
            } else {
                Ok(())
            }
        };
        match ty {
            0x00 => {
                need(12, "information sense descriptor")?;
                let valid = d.get(2).is_some_and(|b| b & 0x80 != 0);
                self.info = if valid { be64_at(d, 4) } else { None };
            }
            0x01 => {
                need(12, "command-specific information sense descriptor")?;
                self.command_specific = be64_at(d, 4).unwrap_or(0);
            }
            0x02 => {
                need(7, "sense key specific sense descriptor")?;
                self.sense_key_specific = array_at::<3>(d, 4)
                    .filter(|b| b[0] & 0x80 != 0)
                    .map(|[b0, b1, b2]| [b0 & 0x7f, b1, b2]);
            }
            0x03 => {
                need(4, "field replaceable unit sense descriptor")?;
                self.fru = d.get(3).copied().unwrap_or(0);
            }
            0x04 => {
                need(4, "stream commands sense descriptor")?;
                let b = d.get(3).copied().unwrap_or(0);
                self.filemark |= b & 0x80 != 0;
                self.eom |= b & 0x40 != 0;
                self.ili |= b & 0x20 != 0;
            }
            0x05 => {
                need(4, "block commands sense descriptor")?;
                self.ili |= d.get(3).is_some_and(|b| b & 0x20 != 0);
            }
            _ => {}
        }
        Ok(())
    }

    /// Encodes as fixed format sense data ([`FIXED_SENSE_LEN`] bytes).
    ///
    /// The fixed format has 32-bit INFORMATION and COMMAND-SPECIFIC
    /// INFORMATION fields: a larger INFORMATION is reported as not valid and a
    /// larger command-specific value is left out.
    pub fn to_fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = if self.deferred {
            FIXED_DEFERRED
        } else {
            FIXED_CURRENT
        };
        if let Some(info) = self.info.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key.to_u8()
            | if self.filemark { 0x80 } else { 0 }
            | if self.eom { 0x40 } else { 0 }
            | if self.ili { 0x20 } else { 0 };
        b[7] = (FIXED_SENSE_LEN - 8) as u8;
        let csi = u32::try_from(self.command_specific).unwrap_or(0);
        b[8..12].copy_from_slice(&csi.to_be_bytes());
        b[12] = self.asc;
        b[13] = self.ascq;
        b[14] = self.fru;
        if let Some([b0, b1, b2]) = self.sense_key_specific {
            b[15] = b0 | 0x80;
            b[16] = b1;
            b[17] = b2;
        }
        b
    }

    /// Encodes as descriptor format sense data: the 8-byte header followed by
    /// information, command-specific, sense-key-specific, FRU and stream or
    /// block commands descriptors, each only when it carries something.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut v = vec![
            if self.deferred {
                DESC_DEFERRED
            } else {
                DESC_CURRENT
            },
            self.key.to_u8(),
            self.asc,
            self.ascq,
            0,
            0,
            0,
            0,
        ];
        if let Some(info) = self.info {
            v.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
            v.extend_from_slice(&info.to_be_bytes());
        }
        if self.command_specific != 0 {
            v.extend_from_slice(&[0x01, 0x0a, 0, 0]);
            v.extend_from_slice(&self.command_specific.to_be_bytes());
        }
        if let Some([b0, b1, b2]) = self.sense_key_specific {
            v.extend_from_slice(&[0x02, 0x06, 0, 0, b0 | 0x80, b1, b2, 0]);
        }
        if self.fru != 0 {
            v.extend_from_slice(&[0x03, 0x02, 0, self.fru]);
        }
        let flags = if self.ili { 0x20 } else { 0 };
        if self.filemark || self.eom {
            let flags =
                flags | if self.filemark { 0x80 } else { 0 } | if self.eom { 0x40 } else { 0 };
            v.extend_from_slice(&[0x04, 0x02, 0, flags]);
        } else if self.ili {
            v.extend_from_slice(&[0x05, 0x02, 0, flags]);
        }
        // At most 8 + 12 + 12 + 8 + 4 + 4 = 48 bytes, so this cannot truncate.
        let add_len = u8::try_from(v.len() - 8).unwrap_or(u8::MAX);
        if let Some(b) = v.get_mut(7) {
            *b = add_len;
        }
        v
    }

    /// Encodes in the given format.
    pub fn encode(&self, format: SenseFormat) -> Vec<u8> {
        match format {
            SenseFormat::Fixed => self.to_fixed().to_vec(),
            SenseFormat::Descriptor => self.to_descriptor(),
        }
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, ASC/ASCQ {}", self.key, self.additional())?;
        if let Some(info) = self.info {
            write!(f, ", information {info:#x}")?;
        }
        if self.deferred {
            f.write_str(" (deferred)")?;
        }
        Ok(())
    }
}

/// REQUEST SENSE CDB (opcode 03h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSenseCdb {
    /// DESC: ask for descriptor format sense data.
    pub desc: bool,
    /// ALLOCATION LENGTH.
    pub alloc_len: u8,
}

impl RequestSenseCdb {
    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        Cdb::from_array([
            opcode::REQUEST_SENSE,
            u8::from(self.desc),
            0,
            0,
            self.alloc_len,
            0,
        ])
    }

    pub(crate) fn decode(b: &[u8; 6]) -> Self {
        RequestSenseCdb {
            desc: b[1] & 0x01 != 0,
            alloc_len: b[4],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Sense {
        Sense {
            key: SenseKey::MediumError,
            asc: 0x11,
            ascq: 0x00,
            info: Some(0x1234_5678),
            command_specific: 0xdead_beef,
            sense_key_specific: Some([0x01, 0x02, 0x03]),
            fru: 7,
            deferred: false,
            filemark: false,
            eom: false,
            ili: true,
        }
    }

    #[test]
    fn request_sense_cdb() {
        let c = RequestSenseCdb {
            desc: true,
            alloc_len: 252,
        };
        assert_eq!(c.to_cdb().as_bytes(), &[0x03, 1, 0, 0, 252, 0]);
        assert_eq!(
            RequestSenseCdb::decode(&[0x03, 0xfe, 0, 0, 18, 0xff]).alloc_len,
            18
        );
    }

    #[test]
    fn sense_key_round_trips() {
        for v in 0..16u8 {
            assert_eq!(SenseKey::from_u8(v).to_u8(), v);
        }
        assert_eq!(SenseKey::from_u8(0xf6), SenseKey::UnitAttention);
        assert_eq!(SenseKey::IllegalRequest.to_string(), "ILLEGAL REQUEST");
    }

    #[test]
    fn fixed_known_bytes() {
        // UNIT ATTENTION, POWER ON RESET, as a target sends it.
        let b = [
            0x70, 0, 0x06, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x29, 0x00, 0, 0, 0, 0,
        ];
        let s = Sense::parse(&b).unwrap();
        assert!(s.is_unit_attention());
        assert_eq!(s.additional(), Asc::POWER_ON_RESET);
        assert_eq!(s.info, None);
        assert_eq!(s, Sense::new(SenseKey::UnitAttention, Asc::POWER_ON_RESET));
        assert_eq!(s.to_fixed(), b);
    }

    #[test]
    fn fixed_round_trip() {
        let s = full();
        let b = s.to_fixed();
        assert_eq!(b[0], 0xf0);
        assert_eq!(&b[3..7], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(b[2], 0x23);
        assert_eq!(b[15], 0x81);
        assert_eq!(Sense::format_of(&b), Ok(SenseFormat::Fixed));
        assert_eq!(Sense::parse(&b).unwrap(), s);

        let mut d = s.clone();
        d.deferred = true;
        d.filemark = true;
        d.eom = true;
        d.ili = false;
        let b = d.to_fixed();
        assert_eq!(b[0] & 0x7f, 0x71);
        assert_eq!(Sense::parse(&b).unwrap(), d);
    }

    #[test]
    fn fixed_large_info_is_not_valid() {
        let s = Sense::new(SenseKey::MediumError, Asc::UNRECOVERED_READ_ERROR).with_info(1 << 40);
        let b = s.to_fixed();
        assert_eq!(b[0], 0x70);
        assert_eq!(Sense::parse(&b).unwrap().info, None);
    }

    #[test]
    fn fixed_truncated_buffer() {
        let b = full().to_fixed();
        // Only the header: key survives, ASC reads as 0.
        let s = Sense::parse(&b[..8]).unwrap();
        assert_eq!(s.key, SenseKey::MediumError);
        assert_eq!(s.asc, 0);
        assert_eq!(s.info, Some(0x1234_5678));
        // Up to ASC only.
        let s = Sense::parse(&b[..13]).unwrap();
        assert_eq!((s.asc, s.ascq), (0x11, 0));
        // Additional sense length short of the ASC: ASC not read.
        let mut short = b;
        short[7] = 4;
        let s = Sense::parse(&short).unwrap();
        assert_eq!(s.asc, 0);
        assert_eq!(s.command_specific, 0xdead_beef);
        assert_eq!(s.sense_key_specific, None);
    }

    #[test]
    fn errors() {
        assert_eq!(
            Sense::parse(&[]),
            Err(ParseError::TooShort {
                what: "sense data",
                need: 1,
                got: 0
            })
        );
        assert_eq!(
            Sense::parse(&[0x7f, 0, 0, 0, 0, 0, 0, 0]),
            Err(ParseError::UnsupportedSenseFormat(0x7f))
        );
        assert_eq!(
            Sense::parse(&[0x00]),
            Err(ParseError::UnsupportedSenseFormat(0))
        );
        assert!(matches!(
            Sense::parse(&[0x70, 0, 5]),
            Err(ParseError::TooShort {
                need: 8,
                got: 3,
                ..
            })
        ));
        assert!(matches!(
            Sense::parse(&[0x72, 5, 0x24]),
            Err(ParseError::TooShort {
                need: 8,
                got: 3,
                ..
            })
        ));
    }

    #[test]
    fn descriptor_known_bytes() {
        // ILLEGAL REQUEST, LBA OUT OF RANGE, information descriptor.
        let b = [
            0x72, 0x05, 0x21, 0x00, 0, 0, 0, 0x0c, 0x00, 0x0a, 0x80, 0, 0, 0, 0, 0x01, 0, 0, 0,
            0x10,
        ];
        let s = Sense::parse(&b).unwrap();
        assert_eq!(s.key, SenseKey::IllegalRequest);
        assert_eq!(s.additional(), Asc::LBA_OUT_OF_RANGE);
        assert_eq!(s.info, Some(0x1_0000_0010));
        assert_eq!(s.to_descriptor(), b);
    }

    #[test]
    fn descriptor_round_trip() {
        let mut s = full();
        s.info = Some(u64::MAX);
        s.command_specific = 1 << 50;
        let b = s.to_descriptor();
        assert_eq!(Sense::format_of(&b), Ok(SenseFormat::Descriptor));
        assert_eq!(usize::from(b[7]) + 8, b.len());
        assert_eq!(Sense::parse(&b).unwrap(), s);

        s.deferred = true;
        s.filemark = true;
        s.eom = true;
        let b = s.to_descriptor();
        assert_eq!(b[0], 0x73);
        assert_eq!(Sense::parse(&b).unwrap(), s);

        let plain = Sense::new(SenseKey::NotReady, Asc::NOT_READY_BECOMING_READY);
        let b = plain.encode(SenseFormat::Descriptor);
        assert_eq!(b.len(), 8);
        assert_eq!(Sense::parse(&b).unwrap(), plain);
        assert!(plain.is_not_ready());
    }

    #[test]
    fn descriptor_unknown_and_invalid() {
        // Unknown descriptor type 0x80 is skipped; info descriptor with VALID=0 ignored.
        let b = [
            0x72, 0x03, 0x11, 0x00, 0, 0, 0, 0x10, 0x80, 0x02, 0xaa, 0xbb, 0x00, 0x0a, 0x00, 0, 0,
            0, 0, 0, 0, 0, 0, 5,
        ];
        let s = Sense::parse(&b).unwrap();
        assert_eq!(s.info, None);
        assert!(s.is_medium_error());
    }

    #[test]
    fn descriptor_overruns() {
        // Descriptor claims 10 more bytes but the announced list ends after 4.
        let b = [0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0x04, 0x00, 0x0a, 0x80, 0];
        assert_eq!(
            Sense::parse(&b),
            Err(ParseError::Overrun {
                what: "descriptor format sense data",
                offset: 8
            })
        );
        // A lone type byte at the end of the announced list.
        let b = [0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0x01, 0x05];
        assert!(matches!(
            Sense::parse(&b),
            Err(ParseError::Overrun { offset: 8, .. })
        ));
        // Known descriptor with a too short additional length.
        let b = [0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0x04, 0x00, 0x02, 0x80, 0];
        assert!(matches!(
            Sense::parse(&b),
            Err(ParseError::BadLength { value: 2, .. })
        ));
        for (ty, min) in [(1u8, 12usize), (2, 7), (3, 4), (4, 4), (5, 4)] {
            let mut b = vec![0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0, ty, 0];
            b[7] = 2;
            assert!(
                matches!(Sense::parse(&b), Err(ParseError::BadLength { .. })),
                "type {ty} min {min}"
            );
        }
    }

    #[test]
    fn descriptor_truncated_buffer_is_tolerated() {
        let s = full();
        let b = s.to_descriptor();
        // Cut in the middle of the first descriptor: header fields survive.
        let t = Sense::parse(&b[..14]).unwrap();
        assert_eq!(t.key, s.key);
        assert_eq!(t.additional(), s.additional());
        assert_eq!(t.info, None);
        // Cut right after the type byte of the second descriptor.
        let t = Sense::parse(&b[..21]).unwrap();
        assert_eq!(t.info, s.info);
        assert_eq!(t.command_specific, 0);
    }

    #[test]
    fn field_pointer() {
        let s = Sense::invalid_field_in_cdb(1, Some(0));
        let fp = s.field_pointer().unwrap();
        assert_eq!(
            fp,
            FieldPointer {
                in_cdb: true,
                byte: 1,
                bit: Some(0)
            }
        );
        let b = s.to_fixed();
        assert_eq!(&b[15..18], &[0xc8, 0x00, 0x01]);
        assert_eq!(Sense::parse(&b).unwrap().field_pointer(), Some(fp));

        let s = Sense::invalid_field_in_parameter_list(300, None);
        let fp = s.field_pointer().unwrap();
        assert!(!fp.in_cdb);
        assert_eq!(fp.byte, 300);
        assert_eq!(fp.bit, None);
        assert_eq!(
            Sense::new(SenseKey::UnitAttention, Asc::POWER_ON_RESET).field_pointer(),
            None
        );
    }

    #[test]
    fn helpers_and_display() {
        let s = Sense::new(
            SenseKey::NotReady,
            Asc::NOT_READY_INITIALIZING_COMMAND_REQUIRED,
        );
        assert!(s.needs_start_unit());
        assert!(!s.is_benign());
        assert!(Sense::new(SenseKey::RecoveredError, Asc::NO_ADDITIONAL_SENSE).is_benign());
        let s = Sense::new(
            SenseKey::IllegalRequest,
            Asc::INVALID_COMMAND_OPERATION_CODE,
        );
        assert!(s.is_unsupported_command());
        assert!(s.is_illegal_request());
        assert!(!s.is_aborted_command());
        assert_eq!(
            s.to_string(),
            "ILLEGAL REQUEST, ASC/ASCQ 20h/00h (invalid command operation code)"
        );
        assert_eq!(Asc::new(0x99, 0x01).to_string(), "99h/01h");
        for a in [
            Asc::NOT_READY_CAUSE_NOT_REPORTABLE,
            Asc::WRITE_ERROR,
            Asc::PARAMETER_LIST_LENGTH_ERROR,
            Asc::LOGICAL_UNIT_NOT_SUPPORTED,
            Asc::WRITE_PROTECTED,
            Asc::POWER_ON_OCCURRED,
            Asc::MODE_PARAMETERS_CHANGED,
            Asc::CAPACITY_DATA_CHANGED,
            Asc::COMMANDS_CLEARED_BY_ANOTHER_INITIATOR,
            Asc::SAVING_PARAMETERS_NOT_SUPPORTED,
            Asc::MEDIUM_NOT_PRESENT,
            Asc::INQUIRY_DATA_CHANGED,
            Asc::REPORTED_LUNS_DATA_CHANGED,
            Asc::INTERNAL_TARGET_FAILURE,
        ] {
            assert!(a.description().is_some(), "{a:?}");
        }
        let s = Sense::new(SenseKey::MediumError, Asc::UNRECOVERED_READ_ERROR).with_info(9);
        let mut d = s.clone();
        d.deferred = true;
        assert_eq!(
            d.to_string(),
            "MEDIUM ERROR, ASC/ASCQ 11h/00h (unrecovered read error), information 0x9 (deferred)"
        );
    }
}
