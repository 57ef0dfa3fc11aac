//! The target-side decoder: which command an operation code names ([`Command`],
//! [`Command::parse`], [`Cdb::parse`]), the direction of its data, and the sense
//! data a target returns for a CDB it cannot decode ([`CdbError::sense`]).
//!
//! The command modules ([`block`](crate::block), [`inquiry`](crate::inquiry), ...)
//! know only [`cdb`](crate::cdb); this module is the one that knows them all.

use crate::block::{
    ReadWrite10Cdb, ReadWrite16Cdb, StartStopUnitCdb, SyncCache10Cdb, SyncCache16Cdb,
    WriteSame16Cdb,
};
use crate::capacity::ReadCapacity16Cdb;
use crate::cdb::{opcode, Cdb};
use crate::error::CdbError;
use crate::inquiry::InquiryCdb;
use crate::luns::ReportLunsCdb;
use crate::mode::{ModeSense10Cdb, ModeSense6Cdb};
use crate::sense::{Asc, RequestSenseCdb, Sense, SenseKey};
use crate::unmap::UnmapCdb;

/// Which way data moves for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirection {
    /// No data phase.
    None,
    /// Device to initiator (data-in).
    FromDevice,
    /// Initiator to device (data-out).
    ToDevice,
}

/// A decoded command: every command this crate knows, with its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// TEST UNIT READY.
    TestUnitReady,
    /// REQUEST SENSE.
    RequestSense(RequestSenseCdb),
    /// INQUIRY (standard data or a VPD page).
    Inquiry(InquiryCdb),
    /// MODE SENSE(6).
    ModeSense6(ModeSense6Cdb),
    /// START STOP UNIT.
    StartStopUnit(StartStopUnitCdb),
    /// READ CAPACITY(10).
    ReadCapacity10,
    /// READ(10).
    Read10(ReadWrite10Cdb),
    /// WRITE(10).
    Write10(ReadWrite10Cdb),
    /// SYNCHRONIZE CACHE(10).
    SynchronizeCache10(SyncCache10Cdb),
    /// UNMAP.
    Unmap(UnmapCdb),
    /// MODE SENSE(10).
    ModeSense10(ModeSense10Cdb),
    /// READ(16).
    Read16(ReadWrite16Cdb),
    /// WRITE(16).
    Write16(ReadWrite16Cdb),
    /// SYNCHRONIZE CACHE(16).
    SynchronizeCache16(SyncCache16Cdb),
    /// WRITE SAME(16).
    WriteSame16(WriteSame16Cdb),
    /// READ CAPACITY(16) (SERVICE ACTION IN(16), service action 10h).
    ReadCapacity16(ReadCapacity16Cdb),
    /// REPORT LUNS.
    ReportLuns(ReportLunsCdb),
}

/// The first `N` bytes of a CDB, or [`CdbError::TooShort`].
fn fixed<const N: usize>(cdb: &[u8], opcode: u8) -> Result<&[u8; N], CdbError> {
    cdb.first_chunk::<N>().ok_or(CdbError::TooShort {
        opcode,
        need: N,
        got: cdb.len(),
    })
}

impl Command {
    /// Decodes a CDB received by a target.
    ///
    /// Bytes past the command's length are ignored (virtio-scsi always
    /// carries `cdb_size` bytes), as are reserved bits and the CONTROL byte.
    /// Fields with values the command forbids give
    /// [`CdbError::InvalidField`]; see [`CdbError::sense`] for the sense data
    /// to return.
    pub fn parse(cdb: &[u8]) -> Result<Command, CdbError> {
        use opcode::*;
        let &op = cdb.first().ok_or(CdbError::Empty)?;
        let cmd = match op {
            TEST_UNIT_READY => {
                fixed::<6>(cdb, op)?;
                Command::TestUnitReady
            }
            REQUEST_SENSE => Command::RequestSense(RequestSenseCdb::decode(fixed(cdb, op)?)),
            INQUIRY => Command::Inquiry(InquiryCdb::decode(fixed(cdb, op)?)?),
            MODE_SENSE_6 => Command::ModeSense6(ModeSense6Cdb::decode(fixed(cdb, op)?)),
            START_STOP_UNIT => Command::StartStopUnit(StartStopUnitCdb::decode(fixed(cdb, op)?)),
            READ_CAPACITY_10 => {
                fixed::<10>(cdb, op)?;
                Command::ReadCapacity10
            }
            READ_10 => Command::Read10(ReadWrite10Cdb::decode(fixed(cdb, op)?)),
            WRITE_10 => Command::Write10(ReadWrite10Cdb::decode(fixed(cdb, op)?)),
            SYNCHRONIZE_CACHE_10 => {
                Command::SynchronizeCache10(SyncCache10Cdb::decode(fixed(cdb, op)?))
            }
            UNMAP => Command::Unmap(UnmapCdb::decode(fixed(cdb, op)?)),
            MODE_SENSE_10 => Command::ModeSense10(ModeSense10Cdb::decode(fixed(cdb, op)?)),
            READ_16 => Command::Read16(ReadWrite16Cdb::decode(fixed(cdb, op)?)),
            WRITE_16 => Command::Write16(ReadWrite16Cdb::decode(fixed(cdb, op)?)),
            SYNCHRONIZE_CACHE_16 => {
                Command::SynchronizeCache16(SyncCache16Cdb::decode(fixed(cdb, op)?))
            }
            WRITE_SAME_16 => Command::WriteSame16(WriteSame16Cdb::decode(fixed(cdb, op)?)),
            SERVICE_ACTION_IN_16 => {
                let b = fixed::<16>(cdb, op)?;
                let action = b[1] & 0x1f;
                if action != SA_READ_CAPACITY_16 {
                    return Err(CdbError::UnsupportedServiceAction { opcode: op, action });
                }
                Command::ReadCapacity16(ReadCapacity16Cdb::decode(b))
            }
            REPORT_LUNS => Command::ReportLuns(ReportLunsCdb::decode(fixed(cdb, op)?)),
            other => return Err(CdbError::UnsupportedOpcode(other)),
        };
        Ok(cmd)
    }

    /// Encodes the command as a CDB (CONTROL byte zero).
    pub fn to_cdb(&self) -> Cdb {
        match self {
            Command::TestUnitReady => Cdb::from_array([opcode::TEST_UNIT_READY, 0, 0, 0, 0, 0]),
            Command::RequestSense(c) => c.to_cdb(),
            Command::Inquiry(c) => c.to_cdb(),
            Command::ModeSense6(c) => c.to_cdb(),
            Command::StartStopUnit(c) => c.to_cdb(),
            Command::ReadCapacity10 => {
                let mut b = [0u8; 10];
                b[0] = opcode::READ_CAPACITY_10;
                Cdb::from_array(b)
            }
            Command::Read10(c) => c.to_cdb(opcode::READ_10),
            Command::Write10(c) => c.to_cdb(opcode::WRITE_10),
            Command::SynchronizeCache10(c) => c.to_cdb(),
            Command::Unmap(c) => c.to_cdb(),
            Command::ModeSense10(c) => c.to_cdb(),
            Command::Read16(c) => c.to_cdb(opcode::READ_16),
            Command::Write16(c) => c.to_cdb(opcode::WRITE_16),
            Command::SynchronizeCache16(c) => c.to_cdb(),
            Command::WriteSame16(c) => c.to_cdb(),
            Command::ReadCapacity16(c) => c.to_cdb(),
            Command::ReportLuns(c) => c.to_cdb(),
        }
    }

    /// The operation code.
    pub fn opcode(&self) -> u8 {
        use opcode::*;
        match self {
            Command::TestUnitReady => TEST_UNIT_READY,
            Command::RequestSense(_) => REQUEST_SENSE,
            Command::Inquiry(_) => INQUIRY,
            Command::ModeSense6(_) => MODE_SENSE_6,
            Command::StartStopUnit(_) => START_STOP_UNIT,
            Command::ReadCapacity10 => READ_CAPACITY_10,
            Command::Read10(_) => READ_10,
            Command::Write10(_) => WRITE_10,
            Command::SynchronizeCache10(_) => SYNCHRONIZE_CACHE_10,
            Command::Unmap(_) => UNMAP,
            Command::ModeSense10(_) => MODE_SENSE_10,
            Command::Read16(_) => READ_16,
            Command::Write16(_) => WRITE_16,
            Command::SynchronizeCache16(_) => SYNCHRONIZE_CACHE_16,
            Command::WriteSame16(_) => WRITE_SAME_16,
            Command::ReadCapacity16(_) => SERVICE_ACTION_IN_16,
            Command::ReportLuns(_) => REPORT_LUNS,
        }
    }

    /// The command's name as SPC/SBC spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::TestUnitReady => "TEST UNIT READY",
            Command::RequestSense(_) => "REQUEST SENSE",
            Command::Inquiry(_) => "INQUIRY",
            Command::ModeSense6(_) => "MODE SENSE(6)",
            Command::StartStopUnit(_) => "START STOP UNIT",
            Command::ReadCapacity10 => "READ CAPACITY(10)",
            Command::Read10(_) => "READ(10)",
            Command::Write10(_) => "WRITE(10)",
            Command::SynchronizeCache10(_) => "SYNCHRONIZE CACHE(10)",
            Command::Unmap(_) => "UNMAP",
            Command::ModeSense10(_) => "MODE SENSE(10)",
            Command::Read16(_) => "READ(16)",
            Command::Write16(_) => "WRITE(16)",
            Command::SynchronizeCache16(_) => "SYNCHRONIZE CACHE(16)",
            Command::WriteSame16(_) => "WRITE SAME(16)",
            Command::ReadCapacity16(_) => "READ CAPACITY(16)",
            Command::ReportLuns(_) => "REPORT LUNS",
        }
    }

    /// Direction of the data transfer, if any.
    pub fn direction(&self) -> DataDirection {
        match self {
            Command::TestUnitReady
            | Command::StartStopUnit(_)
            | Command::SynchronizeCache10(_)
            | Command::SynchronizeCache16(_) => DataDirection::None,
            Command::Write10(_) | Command::Write16(_) | Command::Unmap(_) => {
                DataDirection::ToDevice
            }
            Command::WriteSame16(c) if !c.ndob => DataDirection::ToDevice,
            Command::WriteSame16(_) => DataDirection::None,
            Command::RequestSense(_)
            | Command::Inquiry(_)
            | Command::ModeSense6(_)
            | Command::ModeSense10(_)
            | Command::ReadCapacity10
            | Command::ReadCapacity16(_)
            | Command::ReportLuns(_)
            | Command::Read10(_)
            | Command::Read16(_) => DataDirection::FromDevice,
        }
    }
}

impl Cdb {
    /// Decodes this CDB, see [`Command::parse`].
    pub fn parse(&self) -> Result<Command, CdbError> {
        Command::parse(self.as_bytes())
    }
}

impl CdbError {
    /// The sense data a target returns with CHECK CONDITION for this error:
    /// ILLEGAL REQUEST with INVALID COMMAND OPERATION CODE or INVALID FIELD
    /// IN CDB (with a field pointer where one is known).
    pub fn sense(&self) -> Sense {
        match *self {
            CdbError::Empty | CdbError::UnsupportedOpcode(_) => Sense::new(
                SenseKey::IllegalRequest,
                Asc::INVALID_COMMAND_OPERATION_CODE,
            ),
            CdbError::TooShort { .. } | CdbError::TooLong { .. } => {
                Sense::new(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB)
            }
            CdbError::UnsupportedServiceAction { .. } => Sense::invalid_field_in_cdb(1, Some(4)),
            CdbError::InvalidField { byte, bit, .. } => Sense::invalid_field_in_cdb(byte, bit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::RwFlags;
    use crate::cdb::cdb_len;
    use crate::mode::PageControl;

    /// The CDBs the command modules build decode to the command they mean.
    #[test]
    fn builders_decode_to_their_commands() {
        let f = RwFlags::fua(true);
        assert_eq!(
            Command::parse(crate::block::read_cdb(100, 65536, f).as_bytes()),
            Ok(Command::Read16(ReadWrite16Cdb {
                lba: 100,
                blocks: 65536,
                flags: f
            }))
        );
        assert_eq!(
            Command::parse(crate::block::write_cdb(u64::from(u32::MAX), 1, f).as_bytes()),
            Ok(Command::Write10(ReadWrite10Cdb {
                lba: u32::MAX,
                blocks: 1,
                flags: f
            }))
        );
        assert_eq!(
            Command::parse(crate::capacity::read_capacity_10_cdb().as_bytes()),
            Ok(Command::ReadCapacity10)
        );
        let ms = ModeSense10Cdb {
            llbaa: true,
            dbd: false,
            pc: PageControl::Saved,
            page: crate::mode::page::ALL,
            subpage: 0xff,
            alloc_len: 0x0400,
        };
        assert_eq!(
            Command::parse(ms.to_cdb().as_bytes()),
            Ok(Command::ModeSense10(ms))
        );
        assert!(matches!(
            Command::parse(&[0x5a, 0, 0]),
            Err(CdbError::TooShort { need: 10, .. })
        ));
        let u = UnmapCdb {
            anchor: false,
            param_len: 24,
        };
        assert_eq!(Command::parse(u.to_cdb().as_bytes()), Ok(Command::Unmap(u)));
    }

    #[test]
    fn cdb_parse() {
        let c = Cdb::from_slice(&[0x12, 1, 0x80, 0, 0xff, 0]).unwrap();
        assert_eq!(
            c.parse().unwrap(),
            Command::Inquiry(InquiryCdb {
                page: Some(0x80),
                alloc_len: 255
            })
        );
    }

    fn all_commands() -> Vec<Command> {
        let f = RwFlags {
            dpo: true,
            fua: true,
            protect: 5,
        };
        vec![
            Command::TestUnitReady,
            Command::RequestSense(RequestSenseCdb {
                desc: true,
                alloc_len: 252,
            }),
            Command::Inquiry(InquiryCdb::standard(96)),
            Command::Inquiry(InquiryCdb::vpd(0xb0, 64)),
            Command::ModeSense6(ModeSense6Cdb {
                dbd: true,
                pc: PageControl::Default,
                page: 0x3f,
                subpage: 0xff,
                alloc_len: 255,
            }),
            Command::StartStopUnit(StartStopUnitCdb {
                immed: true,
                power_condition: 0xa,
                power_condition_modifier: 0x3,
                no_flush: true,
                loej: true,
                start: true,
            }),
            Command::ReadCapacity10,
            Command::Read10(ReadWrite10Cdb {
                lba: 0xdead_beef,
                blocks: 0xffff,
                flags: f,
            }),
            Command::Write10(ReadWrite10Cdb {
                lba: 1,
                blocks: 8,
                flags: RwFlags::default(),
            }),
            Command::SynchronizeCache10(SyncCache10Cdb {
                immed: true,
                lba: 7,
                blocks: 9,
            }),
            Command::Unmap(UnmapCdb {
                anchor: true,
                param_len: 24,
            }),
            Command::ModeSense10(ModeSense10Cdb {
                llbaa: true,
                dbd: false,
                pc: PageControl::Changeable,
                page: 0x08,
                subpage: 0,
                alloc_len: 0x1234,
            }),
            Command::Read16(ReadWrite16Cdb {
                lba: u64::MAX - 5,
                blocks: u32::MAX,
                flags: f,
            }),
            Command::Write16(ReadWrite16Cdb {
                lba: 1 << 40,
                blocks: 1 << 20,
                flags: RwFlags {
                    dpo: false,
                    fua: true,
                    protect: 0,
                },
            }),
            Command::SynchronizeCache16(SyncCache16Cdb {
                immed: false,
                lba: 1 << 33,
                blocks: 0,
            }),
            Command::WriteSame16(WriteSame16Cdb {
                lba: 1 << 35,
                blocks: 1 << 31,
                unmap: true,
                anchor: false,
                ndob: true,
                protect: 0,
            }),
            Command::ReadCapacity16(ReadCapacity16Cdb { alloc_len: 32 }),
            Command::ReportLuns(ReportLunsCdb {
                select_report: 2,
                alloc_len: 4096,
            }),
        ]
    }

    #[test]
    fn every_command_round_trips() {
        for cmd in all_commands() {
            let cdb = cmd.to_cdb();
            assert_eq!(cdb.opcode(), cmd.opcode(), "{}", cmd.name());
            assert_eq!(Some(cdb.len()), cdb_len(cmd.opcode()), "{}", cmd.name());
            assert_eq!(Command::parse(cdb.as_bytes()), Ok(cmd), "{}", cmd.name());
            // Trailing bytes (a 32-byte virtio-scsi CDB) are ignored.
            let mut long = [0xffu8; 32];
            long[..cdb.len()].copy_from_slice(cdb.as_bytes());
            assert_eq!(Command::parse(&long), Ok(cmd), "{}", cmd.name());
            // Every truncation is a typed error.
            for n in 1..cdb.len() {
                assert_eq!(
                    Command::parse(&cdb.as_bytes()[..n]),
                    Err(CdbError::TooShort {
                        opcode: cmd.opcode(),
                        need: cdb.len(),
                        got: n
                    }),
                    "{} cut to {n}",
                    cmd.name()
                );
            }
        }
    }

    #[test]
    fn directions() {
        for cmd in all_commands() {
            let d = cmd.direction();
            match cmd {
                Command::Write10(_) | Command::Write16(_) | Command::Unmap(_) => {
                    assert_eq!(d, DataDirection::ToDevice)
                }
                Command::WriteSame16(_) | Command::TestUnitReady => {
                    assert_eq!(d, DataDirection::None)
                }
                Command::Read10(_) | Command::Inquiry(_) => {
                    assert_eq!(d, DataDirection::FromDevice)
                }
                _ => {}
            }
        }
        let ws = WriteSame16Cdb {
            lba: 0,
            blocks: 1,
            unmap: false,
            anchor: false,
            ndob: false,
            protect: 0,
        };
        assert_eq!(
            Command::WriteSame16(ws).direction(),
            DataDirection::ToDevice
        );
    }

    #[test]
    fn parse_errors() {
        assert_eq!(Command::parse(&[]), Err(CdbError::Empty));
        assert_eq!(
            Command::parse(&[0x2f, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(CdbError::UnsupportedOpcode(0x2f))
        );
        let mut sai = [0u8; 16];
        sai[0] = 0x9e;
        sai[1] = 0x11;
        assert_eq!(
            Command::parse(&sai),
            Err(CdbError::UnsupportedServiceAction {
                opcode: 0x9e,
                action: 0x11
            })
        );
        // INQUIRY with EVPD=0 and a page code.
        assert_eq!(
            Command::parse(&[0x12, 0, 0x80, 0, 36, 0]),
            Err(CdbError::InvalidField {
                byte: 2,
                bit: None,
                what: "page code without EVPD"
            })
        );
        // INQUIRY with CMDDT.
        assert!(matches!(
            Command::parse(&[0x12, 2, 0, 0, 36, 0]),
            Err(CdbError::InvalidField {
                byte: 1,
                bit: Some(1),
                ..
            })
        ));
    }

    #[test]
    fn error_sense() {
        let s = CdbError::UnsupportedOpcode(0x2f).sense();
        assert!(s.is_unsupported_command());
        let s = CdbError::Empty.sense();
        assert!(s.is_unsupported_command());
        let s = CdbError::TooShort {
            opcode: 0x28,
            need: 10,
            got: 6,
        }
        .sense();
        assert!(s.is(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
        assert!(s.field_pointer().is_none());
        let s = CdbError::TooLong { len: 40, max: 32 }.sense();
        assert!(s.is(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
        let s = CdbError::UnsupportedServiceAction {
            opcode: 0x9e,
            action: 1,
        }
        .sense();
        let fp = s.field_pointer().unwrap();
        assert_eq!((fp.in_cdb, fp.byte, fp.bit), (true, 1, Some(4)));
        let e = CdbError::InvalidField {
            byte: 2,
            bit: None,
            what: "x",
        };
        assert_eq!(e.to_string(), "invalid field in CDB byte 2: x");
        let fp = e.sense().field_pointer().unwrap();
        assert_eq!((fp.byte, fp.bit), (2, None));
        let e = CdbError::InvalidField {
            byte: 1,
            bit: Some(1),
            what: "y",
        };
        assert_eq!(e.to_string(), "invalid field in CDB byte 1 bit 1: y");
    }
}
