//! Command descriptor blocks: the fixed-size [`Cdb`] buffer the initiator
//! sends and the operation codes. A leaf: the command modules build and decode
//! their CDBs with it; the dispatch from an operation code to a command (the
//! target-side decoder [`Command::parse`](crate::command::Command::parse)) is in
//! [`command`](crate::command).

use std::fmt;

use crate::error::CdbError;

/// Operation codes of the commands this crate knows.
pub mod opcode {
    /// TEST UNIT READY (6).
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// REQUEST SENSE (6).
    pub const REQUEST_SENSE: u8 = 0x03;
    /// INQUIRY (6).
    pub const INQUIRY: u8 = 0x12;
    /// MODE SENSE(6).
    pub const MODE_SENSE_6: u8 = 0x1a;
    /// START STOP UNIT (6).
    pub const START_STOP_UNIT: u8 = 0x1b;
    /// READ CAPACITY(10).
    pub const READ_CAPACITY_10: u8 = 0x25;
    /// READ(10).
    pub const READ_10: u8 = 0x28;
    /// WRITE(10).
    pub const WRITE_10: u8 = 0x2a;
    /// SYNCHRONIZE CACHE(10).
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    /// UNMAP (10).
    pub const UNMAP: u8 = 0x42;
    /// MODE SENSE(10).
    pub const MODE_SENSE_10: u8 = 0x5a;
    /// READ(16).
    pub const READ_16: u8 = 0x88;
    /// WRITE(16).
    pub const WRITE_16: u8 = 0x8a;
    /// SYNCHRONIZE CACHE(16).
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    /// WRITE SAME(16).
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16); READ CAPACITY(16) is its service action 10h.
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    /// REPORT LUNS (12).
    pub const REPORT_LUNS: u8 = 0xa0;

    /// Service action of SERVICE ACTION IN(16) for READ CAPACITY(16).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
}

/// The CDB length implied by the group code of `opcode` (SPC-5 4.2.5.1), or
/// `None` for the variable-length, reserved and vendor-specific groups.
pub const fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A command descriptor block of up to [`Cdb::MAX_LEN`] bytes, stored inline
/// (no allocation): what the initiator copies into a virtio-scsi request.
#[derive(Clone, Copy)]
pub struct Cdb {
    bytes: [u8; Cdb::MAX_LEN],
    len: u8,
}

impl Cdb {
    /// Largest CDB this type holds (the virtio-scsi default `cdb_size`).
    pub const MAX_LEN: usize = 32;

    /// Copies a CDB from bytes.
    pub fn from_slice(b: &[u8]) -> Result<Self, CdbError> {
        if b.is_empty() {
            return Err(CdbError::Empty);
        }
        let mut bytes = [0u8; Cdb::MAX_LEN];
        bytes
            .get_mut(..b.len())
            .ok_or(CdbError::TooLong {
                len: b.len(),
                max: Cdb::MAX_LEN,
            })?
            .copy_from_slice(b);
        Ok(Cdb {
            bytes,
            len: b.len() as u8,
        })
    }

    /// A CDB from a fixed-size array (checked at compile time).
    pub(crate) fn from_array<const N: usize>(a: [u8; N]) -> Self {
        const { assert!(N > 0 && N <= Cdb::MAX_LEN) };
        let mut bytes = [0u8; Cdb::MAX_LEN];
        for (dst, src) in bytes.iter_mut().zip(a) {
            *dst = src;
        }
        Cdb {
            bytes,
            len: N as u8,
        }
    }

    /// The CDB zero-padded to [`Cdb::MAX_LEN`] bytes (a fixed-size copy for a request).
    pub fn padded(&self) -> &[u8; Cdb::MAX_LEN] {
        &self.bytes
    }

    /// The CDB bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false: a CDB has at least its operation code.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The operation code (byte 0).
    pub fn opcode(&self) -> u8 {
        self.bytes[0]
    }
}

impl AsRef<[u8]> for Cdb {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for Cdb {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Cdb {}

impl fmt::Debug for Cdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cdb[")?;
        for (i, b) in self.as_bytes().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdb_type() {
        let c = Cdb::from_slice(&[0x12, 1, 0x80, 0, 0xff, 0]).unwrap();
        assert_eq!(c.len(), 6);
        assert!(!c.is_empty());
        assert_eq!(c.opcode(), 0x12);
        assert_eq!(c.as_ref(), &[0x12, 1, 0x80, 0, 0xff, 0]);
        assert_eq!(format!("{c:?}"), "Cdb[12 01 80 00 ff 00]");
        assert_eq!(Cdb::from_slice(&[]), Err(CdbError::Empty));
        assert_eq!(
            Cdb::from_slice(&[0u8; 33]),
            Err(CdbError::TooLong { len: 33, max: 32 })
        );
        assert!(Cdb::from_slice(&[0u8; 32]).is_ok());
    }

    #[test]
    fn group_lengths() {
        assert_eq!(cdb_len(0x00), Some(6));
        assert_eq!(cdb_len(0x28), Some(10));
        assert_eq!(cdb_len(0x5a), Some(10));
        assert_eq!(cdb_len(0x7f), None);
        assert_eq!(cdb_len(0x88), Some(16));
        assert_eq!(cdb_len(0xa0), Some(12));
        assert_eq!(cdb_len(0xc0), None);
    }
}
