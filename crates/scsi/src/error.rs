//! Error types of the codec: one enum per direction of travel.
//!
//! * [`CdbError`]: a command descriptor block could not be decoded (target side).
//! * [`ParseError`]: data-in, sense data or a parameter list could not be decoded.
//! * [`EncodeError`]: a value cannot be expressed on the wire.

use thiserror::Error;

/// Failure to decode a CDB. Each variant maps onto the sense data a target
/// returns for it (see [`CdbError::sense`](crate::CdbError::sense)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CdbError {
    /// The CDB has no bytes at all.
    #[error("empty CDB")]
    Empty,
    /// The CDB is longer than [`Cdb::MAX_LEN`](crate::Cdb::MAX_LEN).
    #[error("CDB of {len} bytes is longer than the {max} bytes supported")]
    TooLong {
        /// Length that was given.
        len: usize,
        /// Largest supported length.
        max: usize,
    },
    /// The CDB is shorter than its operation code requires.
    #[error("CDB for opcode {opcode:#04x} needs {need} bytes, got {got}")]
    TooShort {
        /// Operation code of the CDB.
        opcode: u8,
        /// Bytes the command needs.
        need: usize,
        /// Bytes that were given.
        got: usize,
    },
    /// The operation code is not one this codec knows.
    #[error("unsupported operation code {0:#04x}")]
    UnsupportedOpcode(u8),
    /// The service action of a multi-function opcode is not supported.
    #[error("unsupported service action {action:#04x} of opcode {opcode:#04x}")]
    UnsupportedServiceAction {
        /// Operation code of the CDB.
        opcode: u8,
        /// Service action found in it.
        action: u8,
    },
    /// A field of the CDB holds a value the command does not allow.
    #[error("invalid field in CDB byte {byte}{}: {what}", bit_suffix(*bit))]
    InvalidField {
        /// Byte offset of the field in the CDB.
        byte: u16,
        /// Most significant bit of the field, when it is not a whole byte.
        bit: Option<u8>,
        /// What is wrong.
        what: &'static str,
    },
}

fn bit_suffix(bit: Option<u8>) -> String {
    match bit {
        Some(b) => format!(" bit {b}"),
        None => String::new(),
    }
}

/// Failure to decode data sent by the other side (data-in, sense data, a
/// parameter list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ParseError {
    /// The buffer is shorter than the fixed part of the structure.
    #[error("{what}: need at least {need} bytes, got {got}")]
    TooShort {
        /// Structure being parsed.
        what: &'static str,
        /// Bytes the fixed part needs.
        need: usize,
        /// Bytes that were given.
        got: usize,
    },
    /// A length field announces more data than the buffer holds: the
    /// allocation length was too small. Re-issue the command with at least
    /// `need` bytes.
    #[error("{what}: {need} bytes announced by the length field, only {got} returned")]
    Truncated {
        /// Structure being parsed.
        what: &'static str,
        /// Bytes the length field announces (header included).
        need: usize,
        /// Bytes that were given.
        got: usize,
    },
    /// A length field holds a value the structure cannot have (below the
    /// minimum, or not a multiple of the element size).
    #[error("{what}: invalid length field {value}")]
    BadLength {
        /// Structure being parsed.
        what: &'static str,
        /// Value of the length field.
        value: usize,
    },
    /// An inner descriptor or page runs past the end of its enclosing list.
    #[error("{what}: element at offset {offset} runs past the end of its list")]
    Overrun {
        /// Structure being parsed.
        what: &'static str,
        /// Byte offset of the element.
        offset: usize,
    },
    /// A VPD page or mode page has another page code than the one expected.
    #[error("{what}: expected page code {expected:#04x}, got {got:#04x}")]
    WrongPage {
        /// Structure being parsed.
        what: &'static str,
        /// Page code that was asked for.
        expected: u8,
        /// Page code in the data.
        got: u8,
    },
    /// The sense data has a response code other than 70h-73h.
    #[error("unsupported sense data response code {0:#04x}")]
    UnsupportedSenseFormat(u8),
    /// A field holds a value that contradicts the structure or another field.
    #[error("{what}: {detail}")]
    Inconsistent {
        /// Structure being parsed.
        what: &'static str,
        /// What is wrong.
        detail: &'static str,
    },
}

/// Failure to put a value on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The output buffer is too small.
    #[error("output buffer of {got} bytes, {need} needed")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// More UNMAP block descriptors than one parameter list can carry.
    #[error("{count} UNMAP block descriptors, at most {max} fit in one parameter list")]
    TooManyDescriptors {
        /// Descriptors requested.
        count: usize,
        /// Largest number allowed.
        max: usize,
    },
    /// A block count does not fit its field.
    #[error("block count {blocks} does not fit in a {bits}-bit field")]
    BlockCountTooLarge {
        /// Block count requested.
        blocks: u64,
        /// Width of the field in bits.
        bits: u8,
    },
    /// A logical block address does not fit its field.
    #[error("LBA {lba} does not fit in a {bits}-bit field")]
    LbaTooLarge {
        /// LBA requested.
        lba: u64,
        /// Width of the field in bits.
        bits: u8,
    },
    /// LBA plus block count goes past the last addressable block.
    #[error("LBA {lba} + {blocks} blocks overflows the address space")]
    LbaOverflow {
        /// First LBA.
        lba: u64,
        /// Number of blocks.
        blocks: u64,
    },
    /// A string or byte field is longer than the wire format allows.
    #[error("{what}: {len} bytes, at most {max} allowed")]
    FieldTooLong {
        /// Field being encoded.
        what: &'static str,
        /// Length given.
        len: usize,
        /// Largest length allowed.
        max: usize,
    },
    /// A text field holds characters outside printable ASCII.
    #[error("{what}: only printable ASCII is allowed")]
    NotAscii {
        /// Field being encoded.
        what: &'static str,
    },
    /// A field holds a value outside its range.
    #[error("{what}: value {value} out of range (max {max})")]
    OutOfRange {
        /// Field being encoded.
        what: &'static str,
        /// Value given.
        value: u64,
        /// Largest value allowed.
        max: u64,
    },
}
