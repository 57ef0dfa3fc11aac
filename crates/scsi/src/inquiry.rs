//! INQUIRY: the CDB, the peripheral byte shared with VPD pages, and standard
//! INQUIRY data (SPC-5 6.7).

use crate::cdb::{opcode, Cdb};
use crate::error::{CdbError, EncodeError, ParseError};
use crate::wire::{be16_at, check_text, head, put_text, text};

/// INQUIRY CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InquiryCdb {
    /// `None` for standard INQUIRY data, `Some(page)` for a VPD page (EVPD=1).
    pub page: Option<u8>,
    /// ALLOCATION LENGTH.
    pub alloc_len: u16,
}

impl InquiryCdb {
    /// Standard INQUIRY data.
    pub const fn standard(alloc_len: u16) -> Self {
        InquiryCdb {
            page: None,
            alloc_len,
        }
    }

    /// A VPD page.
    pub const fn vpd(page: u8, alloc_len: u16) -> Self {
        InquiryCdb {
            page: Some(page),
            alloc_len,
        }
    }

    /// The CDB.
    pub fn to_cdb(self) -> Cdb {
        let [hi, lo] = self.alloc_len.to_be_bytes();
        Cdb::from_array([
            opcode::INQUIRY,
            u8::from(self.page.is_some()),
            self.page.unwrap_or(0),
            hi,
            lo,
            0,
        ])
    }

    pub(crate) fn decode(b: &[u8; 6]) -> Result<Self, CdbError> {
        if b[1] & 0x02 != 0 {
            return Err(CdbError::InvalidField {
                byte: 1,
                bit: Some(1),
                what: "CMDDT is obsolete",
            });
        }
        let evpd = b[1] & 0x01 != 0;
        if !evpd && b[2] != 0 {
            return Err(CdbError::InvalidField {
                byte: 2,
                bit: None,
                what: "page code without EVPD",
            });
        }
        Ok(InquiryCdb {
            page: evpd.then_some(b[2]),
            alloc_len: u16::from_be_bytes([b[3], b[4]]),
        })
    }
}

/// Byte 0 of INQUIRY data and VPD pages: peripheral qualifier and device type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peripheral {
    /// PERIPHERAL QUALIFIER (3 bits).
    pub qualifier: u8,
    /// PERIPHERAL DEVICE TYPE (5 bits).
    pub device_type: u8,
}

impl Peripheral {
    /// Qualifier 000b: a device of this type is (or may be) connected.
    pub const QUALIFIER_CONNECTED: u8 = 0;
    /// Qualifier 001b: supported but not currently connected.
    pub const QUALIFIER_NOT_CONNECTED: u8 = 1;
    /// Qualifier 011b: the logical unit is not supported.
    pub const QUALIFIER_NOT_SUPPORTED: u8 = 3;
    /// Device type 00h: direct access block device (a disk).
    pub const TYPE_DISK: u8 = 0x00;
    /// Device type 05h: CD/DVD device.
    pub const TYPE_CDROM: u8 = 0x05;
    /// Device type 0Dh: enclosure services device.
    pub const TYPE_ENCLOSURE: u8 = 0x0d;
    /// Device type 14h: host managed zoned block device.
    pub const TYPE_ZBC: u8 = 0x14;
    /// Device type 1Fh: unknown or no device type.
    pub const TYPE_UNKNOWN: u8 = 0x1f;

    /// A connected direct access block device (byte 00h).
    pub const DISK: Peripheral = Peripheral {
        qualifier: Peripheral::QUALIFIER_CONNECTED,
        device_type: Peripheral::TYPE_DISK,
    };

    /// What a target reports for a LUN it does not have (byte 7Fh).
    pub const NO_LUN: Peripheral = Peripheral {
        qualifier: Peripheral::QUALIFIER_NOT_SUPPORTED,
        device_type: Peripheral::TYPE_UNKNOWN,
    };

    /// Decodes byte 0.
    pub const fn from_byte(b: u8) -> Self {
        Peripheral {
            qualifier: b >> 5,
            device_type: b & 0x1f,
        }
    }

    /// Encodes byte 0 (out-of-range bits are masked).
    pub const fn to_byte(self) -> u8 {
        ((self.qualifier & 0x07) << 5) | (self.device_type & 0x1f)
    }

    /// A connected direct access block device.
    pub const fn is_disk(self) -> bool {
        self.qualifier == Peripheral::QUALIFIER_CONNECTED
            && self.device_type == Peripheral::TYPE_DISK
    }

    /// The qualifier says a logical unit is present at this LUN.
    pub const fn is_present(self) -> bool {
        self.qualifier == Peripheral::QUALIFIER_CONNECTED
    }
}

/// Length of the fixed part of standard INQUIRY data.
pub const STANDARD_INQUIRY_MIN_LEN: usize = 36;
/// Offset of the first version descriptor.
const VERSION_DESCRIPTORS_OFFSET: usize = 58;
/// Number of version descriptor slots.
pub const MAX_VERSION_DESCRIPTORS: usize = 8;

/// VERSION 06h: SPC-4.
pub const VERSION_SPC4: u8 = 0x06;
/// VERSION 07h: SPC-5.
pub const VERSION_SPC5: u8 = 0x07;

/// Standard INQUIRY data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandardInquiry {
    /// Peripheral qualifier and device type.
    pub peripheral: Peripheral,
    /// RMB: removable medium.
    pub removable: bool,
    /// VERSION of the standard claimed (e.g. [`VERSION_SPC5`]).
    pub version: u8,
    /// NORMACA: supports NACA=1 in CONTROL.
    pub normaca: bool,
    /// HISUP: hierarchical LUN addressing.
    pub hisup: bool,
    /// RESPONSE DATA FORMAT (2 for SPC-2 and later).
    pub response_data_format: u8,
    /// SCCS: embedded storage array controller.
    pub sccs: bool,
    /// ACC: access controls coordinator.
    pub acc: bool,
    /// TPGS: target port group support (2 bits).
    pub tpgs: u8,
    /// 3PC: third-party copy.
    pub third_party_copy: bool,
    /// PROTECT: protection information supported.
    pub protect: bool,
    /// ENCSERV: embedded enclosure services.
    pub encserv: bool,
    /// MULTIP: multi-port device.
    pub multip: bool,
    /// CMDQUE: command queuing.
    pub cmdque: bool,
    /// T10 VENDOR IDENTIFICATION, trimmed (at most 8 characters).
    pub vendor: String,
    /// PRODUCT IDENTIFICATION, trimmed (at most 16 characters).
    pub product: String,
    /// PRODUCT REVISION LEVEL, trimmed (at most 4 characters).
    pub revision: String,
    /// Non-zero VERSION DESCRIPTORs (at most 8).
    pub version_descriptors: Vec<u16>,
}

impl StandardInquiry {
    /// Minimal data for a connected disk: SPC-5, response data format 2,
    /// command queuing.
    pub fn disk(vendor: &str, product: &str, revision: &str) -> Self {
        StandardInquiry {
            peripheral: Peripheral::DISK,
            removable: false,
            version: VERSION_SPC5,
            normaca: false,
            hisup: true,
            response_data_format: 2,
            sccs: false,
            acc: false,
            tpgs: 0,
            third_party_copy: false,
            protect: false,
            encserv: false,
            multip: false,
            cmdque: true,
            vendor: vendor.to_owned(),
            product: product.to_owned(),
            revision: revision.to_owned(),
            version_descriptors: Vec::new(),
        }
    }

    /// Parses standard INQUIRY data.
    ///
    /// Needs the 36-byte fixed part, and an ADDITIONAL LENGTH that covers it.
    /// Data past the fixed part may be cut short by the allocation length;
    /// version descriptors are read as far as both the buffer and the
    /// additional length reach.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let what = "standard INQUIRY data";
        let b = head::<STANDARD_INQUIRY_MIN_LEN>(buf, what)?;
        let total = 5 + usize::from(b[4]);
        if total < STANDARD_INQUIRY_MIN_LEN {
            return Err(ParseError::BadLength {
                what,
                value: usize::from(b[4]),
            });
        }
        let end = total.min(buf.len());
        let version_descriptors = (0..MAX_VERSION_DESCRIPTORS)
            .map(|i| VERSION_DESCRIPTORS_OFFSET + 2 * i)
            .filter(|&off| off + 2 <= end)
            .filter_map(|off| be16_at(buf, off))
            .filter(|&v| v != 0)
            .collect();
        Ok(StandardInquiry {
            peripheral: Peripheral::from_byte(b[0]),
            removable: b[1] & 0x80 != 0,
            version: b[2],
            normaca: b[3] & 0x20 != 0,
            hisup: b[3] & 0x10 != 0,
            response_data_format: b[3] & 0x0f,
            sccs: b[5] & 0x80 != 0,
            acc: b[5] & 0x40 != 0,
            tpgs: (b[5] >> 4) & 0x03,
            third_party_copy: b[5] & 0x08 != 0,
            protect: b[5] & 0x01 != 0,
            encserv: b[6] & 0x40 != 0,
            multip: b[6] & 0x10 != 0,
            cmdque: b[7] & 0x02 != 0,
            vendor: text(&b[8..16]),
            product: text(&b[16..32]),
            revision: text(&b[32..36]),
            version_descriptors,
        })
    }

    /// Encodes the data: 36 bytes, or 58 + 2 per version descriptor when
    /// there are any. Text fields must be printable ASCII that fits.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        check_text(&self.vendor, 8, "INQUIRY vendor identification")?;
        check_text(&self.product, 16, "INQUIRY product identification")?;
        check_text(&self.revision, 4, "INQUIRY product revision level")?;
        if self.version_descriptors.len() > MAX_VERSION_DESCRIPTORS {
            return Err(EncodeError::FieldTooLong {
                what: "INQUIRY version descriptors",
                len: self.version_descriptors.len(),
                max: MAX_VERSION_DESCRIPTORS,
            });
        }
        let mut b = [0u8; STANDARD_INQUIRY_MIN_LEN];
        b[0] = self.peripheral.to_byte();
        b[1] = if self.removable { 0x80 } else { 0 };
        b[2] = self.version;
        b[3] = if self.normaca { 0x20 } else { 0 }
            | if self.hisup { 0x10 } else { 0 }
            | (self.response_data_format & 0x0f);
        b[5] = if self.sccs { 0x80 } else { 0 }
            | if self.acc { 0x40 } else { 0 }
            | ((self.tpgs & 0x03) << 4)
            | if self.third_party_copy { 0x08 } else { 0 }
            | u8::from(self.protect);
        b[6] = if self.encserv { 0x40 } else { 0 } | if self.multip { 0x10 } else { 0 };
        b[7] = if self.cmdque { 0x02 } else { 0 };
        put_text(&mut b[8..16], &self.vendor);
        put_text(&mut b[16..32], &self.product);
        put_text(&mut b[32..36], &self.revision);
        let mut v = b.to_vec();
        if !self.version_descriptors.is_empty() {
            v.resize(VERSION_DESCRIPTORS_OFFSET, 0);
            for d in &self.version_descriptors {
                v.extend_from_slice(&d.to_be_bytes());
            }
        }
        // At most 74 bytes, so the additional length fits a byte.
        let add_len = u8::try_from(v.len() - 5).unwrap_or(u8::MAX);
        if let Some(l) = v.get_mut(4) {
            *l = add_len;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard INQUIRY data as QEMU's scsi-hd returns it (trimmed to 36 bytes).
    const QEMU: [u8; 36] = [
        0x00, 0x00, 0x05, 0x12, 0x1f, 0x00, 0x00, 0x12, b'Q', b'E', b'M', b'U', b' ', b' ', b' ',
        b' ', b'Q', b'E', b'M', b'U', b' ', b'H', b'A', b'R', b'D', b'D', b'I', b'S', b'K', b' ',
        b' ', b' ', b'2', b'.', b'5', b'+',
    ];

    #[test]
    fn qemu_bytes() {
        let i = StandardInquiry::parse(&QEMU).unwrap();
        assert!(i.peripheral.is_disk());
        assert_eq!(i.version, 5);
        assert_eq!(i.response_data_format, 2);
        assert!(i.hisup);
        assert!(i.cmdque);
        assert!(!i.removable);
        assert_eq!(i.vendor, "QEMU");
        assert_eq!(i.product, "QEMU HARDDISK");
        assert_eq!(i.revision, "2.5+");
        assert!(i.version_descriptors.is_empty());
        // Byte 7 also has the obsolete SYNC bit set (0x10); it is not kept.
        let mut expect = QEMU;
        expect[7] = 0x02;
        assert_eq!(i.encode().unwrap(), expect);
    }

    #[test]
    fn full_96_byte_data_with_version_descriptors() {
        // Layout a vhost-device-scsi LUN returns: 96 bytes, additional length
        // 91, SPC-6 version, three version descriptors at byte 58.
        let mut b = vec![0x00, 0x00, 0x07, 0x12, 91, 0, 0, 0];
        b.extend_from_slice(b"rust-vmmvhost-user-scsi v0  ");
        b.resize(58, 0);
        for d in [0x00c0u16, 0x05c0, 0x0600, 0, 0, 0, 0, 0] {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.resize(96, 0);
        let i = StandardInquiry::parse(&b).unwrap();
        assert_eq!(i.version, 7);
        assert!(i.hisup);
        assert!(!i.cmdque);
        assert_eq!(i.vendor, "rust-vmm");
        assert_eq!(i.product, "vhost-user-scsi");
        assert_eq!(i.revision, "v0");
        assert_eq!(i.version_descriptors, vec![0x00c0, 0x05c0, 0x0600]);
        // Cut by an allocation length of 36: the fixed part still parses.
        let short = StandardInquiry::parse(&b[..36]).unwrap();
        assert_eq!(short.product, "vhost-user-scsi");
        assert!(short.version_descriptors.is_empty());
        assert_eq!(StandardInquiry::parse(&i.encode().unwrap()).unwrap(), i);
    }

    #[test]
    fn round_trip_all_fields() {
        let mut i = StandardInquiry::disk("VIREO", "RAM DISK", "0.1");
        i.removable = true;
        i.normaca = true;
        i.sccs = true;
        i.acc = true;
        i.tpgs = 3;
        i.third_party_copy = true;
        i.protect = true;
        i.encserv = true;
        i.multip = true;
        i.peripheral = Peripheral {
            qualifier: 1,
            device_type: 0x0d,
        };
        i.version_descriptors = vec![0x00c0, 0x0600, 0x04c0];
        let b = i.encode().unwrap();
        assert_eq!(b.len(), 64);
        assert_eq!(usize::from(b[4]), 59);
        assert_eq!(StandardInquiry::parse(&b).unwrap(), i);
        // Truncated after the fixed part: descriptors that did not arrive are gone.
        let t = StandardInquiry::parse(&b[..61]).unwrap();
        assert_eq!(t.version_descriptors, vec![0x00c0]);
        let t = StandardInquiry::parse(&b[..36]).unwrap();
        assert!(t.version_descriptors.is_empty());
    }

    #[test]
    fn text_fields_are_trimmed_and_checked() {
        let mut b = QEMU;
        b[8..16].copy_from_slice(b"  AB\0\0\0\0");
        b[16] = 0xff;
        let i = StandardInquiry::parse(&b).unwrap();
        assert_eq!(i.vendor, "AB");
        assert_eq!(i.product, "?EMU HARDDISK");
        // The sanitized form encodes again.
        assert!(i.encode().is_ok());

        let mut i = StandardInquiry::disk("TOO LONG VENDOR", "p", "r");
        assert_eq!(
            i.encode(),
            Err(EncodeError::FieldTooLong {
                what: "INQUIRY vendor identification",
                len: 15,
                max: 8
            })
        );
        i.vendor = "é".into();
        assert_eq!(
            i.encode(),
            Err(EncodeError::NotAscii {
                what: "INQUIRY vendor identification"
            })
        );
        let mut i = StandardInquiry::disk("v", "p", "r");
        i.version_descriptors = vec![1; 9];
        assert!(matches!(
            i.encode(),
            Err(EncodeError::FieldTooLong { len: 9, max: 8, .. })
        ));
    }

    #[test]
    fn errors() {
        assert_eq!(
            StandardInquiry::parse(&QEMU[..35]),
            Err(ParseError::TooShort {
                what: "standard INQUIRY data",
                need: 36,
                got: 35
            })
        );
        let mut b = QEMU;
        b[4] = 30;
        assert_eq!(
            StandardInquiry::parse(&b),
            Err(ParseError::BadLength {
                what: "standard INQUIRY data",
                value: 30
            })
        );
    }

    #[test]
    fn peripheral() {
        assert_eq!(Peripheral::from_byte(0x7f), Peripheral::NO_LUN);
        assert_eq!(Peripheral::NO_LUN.to_byte(), 0x7f);
        assert!(!Peripheral::NO_LUN.is_present());
        assert!(Peripheral::DISK.is_disk());
        assert!(!Peripheral::from_byte(0x05).is_disk());
        assert!(Peripheral::from_byte(0x05).is_present());
        assert_eq!(Peripheral::from_byte(0x20).qualifier, 1);
    }

    #[test]
    fn cdb_known_bytes() {
        assert_eq!(
            InquiryCdb::standard(36).to_cdb().as_bytes(),
            &[0x12, 0, 0, 0, 36, 0]
        );
        assert_eq!(
            InquiryCdb::vpd(0x83, 0x1000).to_cdb().as_bytes(),
            &[0x12, 1, 0x83, 0x10, 0, 0]
        );
        // EVPD with page 0 is the supported pages page, not standard data.
        assert_eq!(
            InquiryCdb::decode(&[0x12, 1, 0, 0, 255, 0]),
            Ok(InquiryCdb::vpd(0, 255))
        );
    }
}
