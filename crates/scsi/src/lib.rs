//! SCSI codec for vireo: command descriptor blocks, data-in structures,
//! sense data and parameter lists, in both directions.
//!
//! The crate does no I/O. The initiator builds CDBs and parses what a device
//! returns; the in-tree test target parses CDBs and encodes responses. Every
//! parser takes untrusted bytes and returns a typed error
//! ([`ParseError`], [`CdbError`]) instead of panicking; encoders return
//! [`EncodeError`] for values the wire format cannot carry.
//!
//! Layouts follow SPC-5 and SBC-4.
//!
//! | module | contents |
//! | --- | --- |
//! | [`cdb`] | [`Cdb`], operation codes (a leaf: every command module builds on it) |
//! | [`command`] | [`Command`], [`Command::parse`]: the dispatch from an operation code to a command |
//! | [`block`] | READ/WRITE 10/16, WRITE SAME(16), SYNCHRONIZE CACHE, START STOP UNIT, 10-vs-16 limits |
//! | [`inquiry`] | INQUIRY CDB, [`StandardInquiry`], [`Peripheral`] |
//! | [`vpd`] | VPD pages 00h, 80h, 83h, B0h, B1h, B2h |
//! | [`capacity`] | READ CAPACITY(10)/(16) |
//! | [`luns`] | REPORT LUNS, [`Lun`] |
//! | [`mode`] | MODE SENSE(6)/(10), caching page |
//! | [`unmap`] | UNMAP CDB and parameter list |
//! | [`sense`] | sense data, sense keys, ASC/ASCQ, REQUEST SENSE |
//! | [`status`] | SCSI status byte |

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]
#![warn(missing_docs)]

pub mod block;
pub mod capacity;
pub mod cdb;
pub mod command;
mod error;
pub mod inquiry;
pub mod luns;
pub mod mode;
pub mod sense;
pub mod status;
pub mod unmap;
pub mod vpd;
mod wire;

pub use block::{
    read_cdb, read_write_head, rw10_fits, rw16_fits, write_cdb, ReadWrite10Cdb, ReadWrite16Cdb,
    RwFlags, StartStopUnitCdb, SyncCache10Cdb, SyncCache16Cdb, WriteSame16Cdb, MAX_RW10_BLOCKS,
    MAX_RW16_BLOCKS,
};
pub use capacity::{read_capacity_10_cdb, ReadCapacity10, ReadCapacity16, ReadCapacity16Cdb};
pub use cdb::{cdb_len, opcode, Cdb};
pub use command::{Command, DataDirection};
pub use error::{CdbError, EncodeError, ParseError};
pub use inquiry::{InquiryCdb, Peripheral, StandardInquiry};
pub use luns::{Lun, LunAddress, ReportLuns, ReportLunsCdb};
pub use mode::{
    BlockDescriptor, CachingPage, ModeHeader, ModePage, ModeParameters, ModeSense10Cdb,
    ModeSense6Cdb, PageControl,
};
pub use sense::{Asc, FieldPointer, RequestSenseCdb, Sense, SenseFormat, SenseKey};
pub use status::Status;
pub use unmap::{
    UnmapCdb, UnmapDescriptor, UnmapLimits, UnmapListWriter, UnmapParameterList,
    MAX_UNMAP_BLOCKS_PER_DESCRIPTOR, MAX_UNMAP_DESCRIPTORS_PER_LIST,
};
pub use vpd::{
    Association, BlockDeviceCharacteristics, BlockLimits, CodeSet, Designator, DesignatorType,
    DeviceIdentification, LogicalBlockProvisioning, ProvisioningType, SupportedPages,
    UnitSerialNumber, VpdPage,
};
