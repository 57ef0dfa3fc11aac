//! The kernel's ublk UAPI (`include/uapi/linux/ublk_cmd.h`, Linux 6.x): the control
//! and I/O commands, their ioctl encodings (`UBLK_F_CMD_IOCTL_ENCODE`), the structures
//! they carry and the feature flags. Plain data; no I/O here.

/// `_IOC(dir, 'u', nr, size)`.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const fn iowr(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}
const fn ior(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ, nr, size)
}

const CTRL: usize = std::mem::size_of::<CtrlCmd>();
const IO: usize = std::mem::size_of::<IoCmd>();

/// `UBLK_U_CMD_GET_DEV_INFO`.
pub const CMD_GET_DEV_INFO: u32 = ior(0x02, CTRL);
/// `UBLK_U_CMD_ADD_DEV`.
pub const CMD_ADD_DEV: u32 = iowr(0x04, CTRL);
/// `UBLK_U_CMD_DEL_DEV`.
pub const CMD_DEL_DEV: u32 = iowr(0x05, CTRL);
/// `UBLK_U_CMD_START_DEV`.
pub const CMD_START_DEV: u32 = iowr(0x06, CTRL);
/// `UBLK_U_CMD_STOP_DEV`.
pub const CMD_STOP_DEV: u32 = iowr(0x07, CTRL);
/// `UBLK_U_CMD_SET_PARAMS`.
pub const CMD_SET_PARAMS: u32 = iowr(0x08, CTRL);
/// `UBLK_U_CMD_START_USER_RECOVERY`.
pub const CMD_START_USER_RECOVERY: u32 = iowr(0x10, CTRL);
/// `UBLK_U_CMD_END_USER_RECOVERY`.
pub const CMD_END_USER_RECOVERY: u32 = iowr(0x11, CTRL);
/// `UBLK_U_CMD_GET_FEATURES`.
pub const CMD_GET_FEATURES: u32 = ior(0x13, CTRL);

/// `UBLK_U_IO_FETCH_REQ`.
pub const IO_FETCH_REQ: u32 = iowr(0x20, IO);
/// `UBLK_U_IO_COMMIT_AND_FETCH_REQ`.
pub const IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, IO);

/// A fetch completed with a request to serve.
pub const IO_RES_OK: i32 = 0;
/// The device is going away: the tag will get no more requests.
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

/// Where the descriptor array of queue 0 is mapped on `/dev/ublkcN`.
pub const CMD_BUF_OFFSET: i64 = 0;
/// Queue depth the kernel allows at most.
pub const MAX_QUEUE_DEPTH: u16 = 4096;
/// Bytes between two queues' descriptor arrays in the mapping.
pub const MAX_CMD_BUF_BYTES: i64 = MAX_QUEUE_DEPTH as i64 * std::mem::size_of::<IoDesc>() as i64;

/// Requests completed in the server's task (the default of kernels that know it).
pub const F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
/// A server that dies leaves the device quiesced for a new one to take back.
pub const F_USER_RECOVERY: u64 = 1 << 3;
/// With `F_USER_RECOVERY`: the requests the dead server held are issued again to the
/// new one (none fails).
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// Commands use ioctl encodings (`UBLK_U_*`).
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;

/// `UBLK_S_DEV_*`.
pub const S_DEV_DEAD: u16 = 0;
/// Started and served.
pub const S_DEV_LIVE: u16 = 1;
/// Its server died; waiting for `START_USER_RECOVERY`.
pub const S_DEV_QUIESCED: u16 = 2;

/// `UBLK_IO_OP_*`.
pub const OP_READ: u8 = 0;
/// Write.
pub const OP_WRITE: u8 = 1;
/// Flush.
pub const OP_FLUSH: u8 = 2;
/// Discard.
pub const OP_DISCARD: u8 = 3;
/// Write zeroes.
pub const OP_WRITE_ZEROES: u8 = 5;

/// `UBLK_ATTR_*` of the basic parameters.
pub const ATTR_READ_ONLY: u32 = 1 << 0;
/// The device has a volatile write cache: the kernel sends flushes.
pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;

/// `UBLK_PARAM_TYPE_BASIC`.
pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
/// `UBLK_PARAM_TYPE_DISCARD`.
pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;

/// `struct ublksrv_ctrl_cmd`: the 32 bytes of a control command.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CtrlCmd {
    /// Device the command is for.
    pub dev_id: u32,
    /// Queue (u16::MAX: none).
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// Buffer the command reads or fills.
    pub addr: u64,
    /// Inline data (the server's pid for START_DEV and END_USER_RECOVERY).
    pub data: u64,
    /// Unprivileged devices' path length (unused).
    pub dev_path_len: u16,
    /// Padding.
    pub pad: u16,
    /// Reserved.
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DevInfo {
    /// Queues.
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// `S_DEV_*`.
    pub state: u16,
    /// Padding.
    pub pad0: u16,
    /// Largest request in bytes.
    pub max_io_buf_bytes: u32,
    /// Device number (N of /dev/ublkbN).
    pub dev_id: u32,
    /// Server pid.
    pub ublksrv_pid: i32,
    /// Padding.
    pub pad1: u32,
    /// `F_*`.
    pub flags: u64,
    /// The server's own flags (the kernel keeps them).
    pub ublksrv_flags: u64,
    /// Owner uid.
    pub owner_uid: u32,
    /// Owner gid.
    pub owner_gid: u32,
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ParamBasic {
    /// `ATTR_*`.
    pub attrs: u32,
    /// log2 of the logical block size.
    pub logical_bs_shift: u8,
    /// log2 of the physical block size.
    pub physical_bs_shift: u8,
    /// log2 of the optimal I/O size.
    pub io_opt_shift: u8,
    /// log2 of the minimal I/O size.
    pub io_min_shift: u8,
    /// Largest request in 512-byte sectors.
    pub max_sectors: u32,
    /// Boundary requests do not cross (0: none).
    pub chunk_sectors: u32,
    /// Capacity in 512-byte sectors.
    pub dev_sectors: u64,
    /// Segment boundary mask (0: none).
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ParamDiscard {
    /// Alignment in bytes.
    pub discard_alignment: u32,
    /// Granularity in bytes.
    pub discard_granularity: u32,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors (0: none).
    pub max_write_zeroes_sectors: u32,
    /// Ranges per discard (the kernel takes 1).
    pub max_discard_segments: u16,
    /// Reserved.
    pub reserved0: u16,
}

/// `struct ublk_params` up to the discard parameters.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Params {
    /// Bytes of this structure.
    pub len: u32,
    /// `PARAM_TYPE_*` present.
    pub types: u32,
    /// Basic parameters.
    pub basic: ParamBasic,
    /// Discard parameters.
    pub discard: ParamDiscard,
}

/// `struct ublksrv_io_desc`: one request, in the shared descriptor array.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoDesc {
    /// Op in bits 0-7, `UBLK_IO_F_*` above.
    pub op_flags: u32,
    /// Length in 512-byte sectors.
    pub nr_sectors: u32,
    /// First sector.
    pub start_sector: u64,
    /// The tag's buffer (as the server gave it).
    pub addr: u64,
}

/// `struct ublksrv_io_cmd`: the 16 bytes of a FETCH or COMMIT_AND_FETCH.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoCmd {
    /// Queue.
    pub q_id: u16,
    /// Tag.
    pub tag: u16,
    /// Result of the request being committed (bytes, or a negative errno).
    pub result: i32,
    /// The tag's buffer for the next request.
    pub addr: u64,
}

impl IoCmd {
    /// The bytes of the SQE's command area.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

impl CtrlCmd {
    /// The bytes of a 128-byte SQE's command area.
    pub fn bytes(&self) -> [u8; 80] {
        let mut b = [0u8; 80];
        b[0..4].copy_from_slice(&self.dev_id.to_ne_bytes());
        b[4..6].copy_from_slice(&self.queue_id.to_ne_bytes());
        b[6..8].copy_from_slice(&self.len.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b[16..24].copy_from_slice(&self.data.to_ne_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes and encodings of the kernel header (values from ublk_cmd.h's macros).
    #[test]
    fn layout_and_encodings_match_the_kernel() {
        assert_eq!(std::mem::size_of::<CtrlCmd>(), 32);
        assert_eq!(std::mem::size_of::<DevInfo>(), 64);
        assert_eq!(std::mem::size_of::<IoDesc>(), 24);
        assert_eq!(std::mem::size_of::<IoCmd>(), 16);
        assert_eq!(std::mem::size_of::<ParamBasic>(), 32);
        assert_eq!(std::mem::size_of::<ParamDiscard>(), 20);
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        let c = IoCmd {
            q_id: 1,
            tag: 2,
            result: -5,
            addr: 0x1000,
        };
        let b = c.bytes();
        assert_eq!(&b[0..2], &1u16.to_ne_bytes());
        assert_eq!(&b[4..8], &(-5i32).to_ne_bytes());
    }
}
