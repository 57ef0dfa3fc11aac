//! Wire formats shared with devices, as typed `#[repr(C)]` little-endian structs
//! (virtio 1.2 sections 5.2.6 and 5.6.6), with the constants of `virtio-bindings`.
//!
//! Every struct here is plain data: any bit pattern is a valid value, so a device that
//! writes garbage into one can only produce values the driver then validates.

use std::mem::size_of;

macro_rules! le_int {
    ($name:ident, $t:ty) => {
        /// A little-endian integer as it lies in device-shared memory.
        #[repr(transparent)]
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub struct $name($t);

        impl $name {
            /// Encode `v`.
            #[inline]
            pub const fn new(v: $t) -> Self {
                $name(v.to_le())
            }
            /// Decode.
            #[inline]
            pub const fn get(self) -> $t {
                <$t>::from_le(self.0)
            }
        }

        impl From<$t> for $name {
            fn from(v: $t) -> Self {
                $name::new(v)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.get().fmt(f)
            }
        }
    };
}

le_int!(Le16, u16);
le_int!(Le32, u32);
le_int!(Le64, u64);

/// Marker for structs that may live in memory a device writes: `#[repr(C)]`, made of
/// integers and byte arrays only, so every bit pattern is a valid value.
///
/// # Safety
/// Implement it only for such types.
pub unsafe trait DeviceShared: Copy + 'static {
    /// Offset of the part a completion reads back (the status or response the device
    /// writes), when the type is a request slot: polling prefetches its cache line.
    const READ_BACK_OFFSET: usize = 0;
}

// SAFETY: integers and arrays of them accept every bit pattern.
unsafe impl DeviceShared for u8 {}
// SAFETY: as above.
unsafe impl DeviceShared for Le16 {}
// SAFETY: as above.
unsafe impl DeviceShared for Le32 {}
// SAFETY: as above.
unsafe impl DeviceShared for Le64 {}
// SAFETY: as above.
unsafe impl<const N: usize> DeviceShared for [u8; N] {}

/// virtio-blk (section 5.2.6).
pub mod blk {
    use super::*;
    use virtio_bindings::virtio_blk as vb;

    /// Read.
    pub const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
    /// Write.
    pub const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
    /// Flush.
    pub const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
    /// Device id (serial).
    pub const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
    /// Discard.
    pub const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
    /// Write zeroes.
    pub const T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
    /// Success.
    pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
    /// I/O error.
    pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
    /// Unsupported request.
    pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;
    /// Written before submission: a device that completes without a status is caught.
    pub const S_UNSET: u8 = 0xff;
    /// Write-zeroes range flag: the device may deallocate.
    pub const WRITE_ZEROES_FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    /// Bytes of the device id.
    pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

    /// `struct virtio_blk_outhdr`: the header every request starts with.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ReqHeader {
        /// `T_*`.
        pub type_: Le32,
        /// Priority (unused).
        pub ioprio: Le32,
        /// First 512-byte sector (reads and writes).
        pub sector: Le64,
    }

    /// `struct virtio_blk_discard_write_zeroes`: one range of a discard or write-zeroes.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Range {
        /// First sector.
        pub sector: Le64,
        /// Sectors.
        pub num_sectors: Le32,
        /// `WRITE_ZEROES_FLAG_UNMAP` or 0.
        pub flags: Le32,
    }

    /// Ranges one discard or write-zeroes request carries at most (in vireo's slots).
    pub const SLOT_RANGES: usize = 64;

    /// One request slot of vireo's virtio-blk driver: the header the device reads, the
    /// status byte it writes, and the ranges of a discard or write-zeroes.
    #[repr(C, align(64))]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RequestSlot {
        /// Request header.
        pub hdr: ReqHeader,
        /// Status (device-written).
        pub status: u8,
        /// Padding to 32 bytes.
        pub _pad: [u8; 15],
        /// Discard / write-zeroes ranges.
        pub ranges: [Range; SLOT_RANGES],
    }

    impl Default for RequestSlot {
        fn default() -> Self {
            RequestSlot {
                hdr: ReqHeader::default(),
                status: S_UNSET,
                _pad: [0; 15],
                ranges: [Range::default(); SLOT_RANGES],
            }
        }
    }

    const _: () = assert!(
        size_of::<ReqHeader>() == 16
            && size_of::<Range>() == 16
            && size_of::<RequestSlot>().is_multiple_of(64)
    );
    // SAFETY: repr(C) struct of the plain-data structs above and bytes.
    unsafe impl DeviceShared for RequestSlot {
        const READ_BACK_OFFSET: usize = std::mem::offset_of!(RequestSlot, status);
    }
    // SAFETY: repr(C) structs of little-endian integers.
    unsafe impl DeviceShared for ReqHeader {}
    // SAFETY: as above.
    unsafe impl DeviceShared for Range {}
}

/// virtio-scsi (section 5.6.6).
pub mod scsi {
    use super::*;
    use virtio_bindings::virtio_scsi as vs;

    /// CDB bytes vireo reserves (the spec's default `cdb_size`, also its maximum use).
    pub const CDB_SIZE: usize = vs::VIRTIO_SCSI_CDB_DEFAULT_SIZE as usize;
    /// The spec's default `sense_size`.
    pub const DEFAULT_SENSE_SIZE: usize = vs::VIRTIO_SCSI_SENSE_DEFAULT_SIZE as usize;
    /// Largest sense buffer vireo offers, whatever the device asks for.
    pub const MAX_SENSE: usize = 252;
    /// Bytes of a command request before the CDB.
    pub const REQ_HEADER: usize = 19;
    /// Bytes of a command response before the sense data.
    pub const RESP_HEADER: usize = 12;
    /// Task management request type.
    pub const T_TMF: u32 = vs::VIRTIO_SCSI_T_TMF;
    /// TMF: ABORT TASK.
    pub const TMF_ABORT_TASK: u32 = vs::VIRTIO_SCSI_T_TMF_ABORT_TASK;
    /// TMF: LOGICAL UNIT RESET.
    pub const TMF_LOGICAL_UNIT_RESET: u32 = vs::VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET;

    /// `struct virtio_scsi_cmd_req` with a 32-byte CDB (the device reads
    /// `REQ_HEADER + cdb_size` bytes of it).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CmdReq {
        /// LUN address.
        pub lun: [u8; 8],
        /// Command identifier.
        pub tag: Le64,
        /// Task attribute (0: SIMPLE).
        pub task_attr: u8,
        /// Priority.
        pub prio: u8,
        /// Command reference number.
        pub crn: u8,
        /// The CDB, zero padded.
        pub cdb: [u8; CDB_SIZE],
    }

    /// The fixed part of `struct virtio_scsi_cmd_resp`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RespHeader {
        /// Sense bytes written.
        pub sense_len: Le32,
        /// Residual bytes.
        pub resid: Le32,
        /// Status qualifier.
        pub status_qualifier: Le16,
        /// SCSI status.
        pub status: u8,
        /// virtio-scsi response code.
        pub response: u8,
    }

    /// `struct virtio_scsi_cmd_resp` with room for [`MAX_SENSE`] sense bytes (the device
    /// writes `RESP_HEADER + sense_size` bytes of it).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CmdResp {
        /// Status, response and lengths.
        pub header: RespHeader,
        /// Sense data.
        pub sense: [u8; MAX_SENSE],
    }

    /// One request slot of vireo's virtio-scsi driver: the command the device reads and
    /// the response it writes, each starting a cache line of its own (the device's
    /// writes never share a line with the driver's, and the response header is one
    /// line).
    #[repr(C, align(64))]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CmdSlot {
        /// Command.
        pub req: CmdReq,
        /// Keeps the response on the next cache line.
        pub _pad: [u8; 8],
        /// Response (device-written).
        pub resp: CmdResp,
    }

    /// `struct virtio_scsi_ctrl_tmf_req`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TmfReq {
        /// [`T_TMF`].
        pub type_: Le32,
        /// `TMF_*`.
        pub subtype: Le32,
        /// LUN address.
        pub lun: [u8; 8],
        /// Tag of the command (ABORT TASK).
        pub tag: Le64,
    }

    /// One task management request slot: the request the device reads and the one-byte
    /// response it writes (`struct virtio_scsi_ctrl_tmf_resp`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TmfSlot {
        /// Request.
        pub req: TmfReq,
        /// Response code (device-written).
        pub response: u8,
    }

    impl Default for CmdReq {
        fn default() -> Self {
            CmdReq {
                lun: [0; 8],
                tag: Le64::default(),
                task_attr: 0,
                prio: 0,
                crn: 0,
                cdb: [0; CDB_SIZE],
            }
        }
    }

    impl Default for CmdResp {
        fn default() -> Self {
            CmdResp {
                header: RespHeader::default(),
                sense: [0; MAX_SENSE],
            }
        }
    }

    const _: () = assert!(
        std::mem::offset_of!(CmdReq, cdb) == REQ_HEADER
            && std::mem::offset_of!(CmdResp, sense) == RESP_HEADER
            && size_of::<RespHeader>() == RESP_HEADER
            && std::mem::offset_of!(CmdSlot, resp) == 64
            && size_of::<CmdSlot>().is_multiple_of(64)
            && size_of::<TmfReq>() == 24
            && std::mem::offset_of!(TmfSlot, response) == 24
    );
    // SAFETY: repr(C) structs of little-endian integers and byte arrays.
    unsafe impl DeviceShared for CmdReq {}
    // SAFETY: as above.
    unsafe impl DeviceShared for CmdResp {}
    // SAFETY: as above.
    unsafe impl DeviceShared for RespHeader {}
    // SAFETY: as above.
    unsafe impl DeviceShared for CmdSlot {
        const READ_BACK_OFFSET: usize = std::mem::offset_of!(CmdSlot, resp);
    }
    // SAFETY: as above.
    unsafe impl DeviceShared for TmfReq {}
    // SAFETY: as above.
    unsafe impl DeviceShared for TmfSlot {
        const READ_BACK_OFFSET: usize = std::mem::offset_of!(TmfSlot, response);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn little_endian_round_trip() {
        let v = Le32::new(0x1234_5678);
        assert_eq!(v.get(), 0x1234_5678);
        // In memory: least significant byte first, whatever the host's order.
        let raw = v.0.to_ne_bytes();
        assert_eq!(raw, [0x78, 0x56, 0x34, 0x12]);
        assert_eq!(Le64::from(7u64).get(), 7);
        assert_eq!(Le16::new(0xabcd).get(), 0xabcd);
    }
}
