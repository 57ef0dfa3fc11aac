//! `/dev/ublk-control`: the control commands (ADD_DEV, SET_PARAMS, START_DEV, ...)
//! sent as io_uring `URING_CMD`s on a ring of 128-byte entries, one at a time.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::sys::{self, CtrlCmd, DevInfo, Params};
use super::UblkError;

/// Path of the control device.
pub const CONTROL: &str = "/dev/ublk-control";

/// The control device and the ring its commands go through.
pub struct Control {
    file: File,
    ring: Mutex<IoUring<squeue::Entry128, cqueue::Entry>>,
    /// `UBLK_F_*` the driver supports (GET_FEATURES).
    pub features: u64,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("features", &format_args!("{:#x}", self.features))
            .finish()
    }
}

impl Control {
    /// Open the control device and ask the driver what it supports.
    pub fn open() -> Result<Control, UblkError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENXIO) | Some(libc::ENODEV) => UblkError::NoDriver,
                Some(libc::EACCES) | Some(libc::EPERM) => UblkError::NotPermitted(e),
                _ => UblkError::Io("open /dev/ublk-control", e),
            })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(UblkError::NoIoUring)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(UblkError::NoIoUring)?;
        if !probe.is_supported(opcode::UringCmd80::CODE) {
            return Err(UblkError::NoUringCmd);
        }
        let mut c = Control {
            file,
            ring: Mutex::new(ring),
            features: 0,
        };
        let mut features = 0u64;
        let cmd = CtrlCmd {
            dev_id: u32::MAX,
            queue_id: u16::MAX,
            len: 8,
            addr: &mut features as *mut u64 as u64,
            ..Default::default()
        };
        match c.command(sys::CMD_GET_FEATURES, cmd) {
            Ok(_) => {}
            Err(UblkError::Command { errno, .. })
                if errno == libc::EINVAL || errno == libc::EOPNOTSUPP =>
            {
                return Err(UblkError::DriverTooOld)
            }
            Err(e) => return Err(e),
        }
        if features & sys::F_CMD_IOCTL_ENCODE == 0 {
            return Err(UblkError::DriverTooOld);
        }
        c.features = features;
        Ok(c)
    }

    /// Send one command and wait for its answer (its non-negative result).
    pub fn command(&self, op: u32, cmd: CtrlCmd) -> Result<i32, UblkError> {
        let name = op_name(op);
        let entry = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(cmd.bytes())
            .build()
            .user_data(1);
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the entry points at `cmd`'s buffer (`addr`, `len`), which the caller
        // keeps alive until this function returns, and we wait for the completion
        // before returning.
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| UblkError::Io(name, std::io::Error::other("control ring full")))?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(UblkError::Io(name, e)),
            }
            if let Some(c) = ring.completion().next() {
                let res = c.result();
                if res < 0 {
                    return Err(UblkError::Command {
                        cmd: name,
                        dev_id: cmd.dev_id,
                        errno: -res,
                    });
                }
                return Ok(res);
            }
        }
    }

    /// ADD_DEV: a new device as `info` says (dev_id u32::MAX: the driver picks one);
    /// returns the info the driver filled in.
    pub fn add_dev(&self, mut info: DevInfo) -> Result<DevInfo, UblkError> {
        let cmd = CtrlCmd {
            dev_id: info.dev_id,
            queue_id: u16::MAX,
            len: std::mem::size_of::<DevInfo>() as u16,
            addr: &mut info as *mut DevInfo as u64,
            ..Default::default()
        };
        self.command(sys::CMD_ADD_DEV, cmd)?;
        Ok(info)
    }

    /// GET_DEV_INFO.
    pub fn dev_info(&self, dev_id: u32) -> Result<DevInfo, UblkError> {
        let mut info = DevInfo::default();
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            len: std::mem::size_of::<DevInfo>() as u16,
            addr: &mut info as *mut DevInfo as u64,
            ..Default::default()
        };
        self.command(sys::CMD_GET_DEV_INFO, cmd)?;
        Ok(info)
    }

    /// SET_PARAMS.
    pub fn set_params(&self, dev_id: u32, mut p: Params) -> Result<(), UblkError> {
        p.len = std::mem::size_of::<Params>() as u32;
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            len: p.len as u16,
            addr: &mut p as *mut Params as u64,
            ..Default::default()
        };
        self.command(sys::CMD_SET_PARAMS, cmd).map(|_| ())
    }

    /// A command that carries only the device id (and the server's pid in `data`).
    pub fn simple(&self, op: u32, dev_id: u32, data: u64) -> Result<(), UblkError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            data,
            ..Default::default()
        };
        self.command(op, cmd).map(|_| ())
    }
}

fn op_name(op: u32) -> &'static str {
    match op {
        sys::CMD_GET_DEV_INFO => "GET_DEV_INFO",
        sys::CMD_ADD_DEV => "ADD_DEV",
        sys::CMD_DEL_DEV => "DEL_DEV",
        sys::CMD_START_DEV => "START_DEV",
        sys::CMD_STOP_DEV => "STOP_DEV",
        sys::CMD_SET_PARAMS => "SET_PARAMS",
        sys::CMD_START_USER_RECOVERY => "START_USER_RECOVERY",
        sys::CMD_END_USER_RECOVERY => "END_USER_RECOVERY",
        sys::CMD_GET_FEATURES => "GET_FEATURES",
        _ => "ublk command",
    }
}
