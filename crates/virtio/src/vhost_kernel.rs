//! The kernel's vhost ioctl family (`<linux/vhost.h>`): one core for the two transports
//! that use it, the kernel's vhost-scsi ([`VhostScsiTransport`], `/dev/vhost-scsi`, the
//! LIO SCSI target) and vhost-vdpa ([`crate::vdpa::VdpaTransport`],
//! `/dev/vhost-vdpa-N`).
//!
//! The ioctl numbers and structures are rust-vmm `vhost`'s bindings; the calls are ours
//! (its `VhostKernBackend` wants a vm-memory guest address space, which vireo's DMA
//! memory is not). Every `unsafe` ioctl of both transports is in [`VhostFd`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_kern::vhost_binding as b;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref};

use crate::error::{Error, Result};
use crate::memory::{DmaMemory, DmaRegionInfo, RegionListener};
use crate::notify::Notifier;
use crate::ring::RingLayout;
use crate::transport::Transport;

/// `VHOST_F_LOG_ALL`: dirty-page logging for live migration, a vhost-internal bit.
const VHOST_F_LOG_ALL: u64 = 1 << 26;

mod resume {
    #![allow(missing_docs)]
    // `<linux/vhost.h>` 6.4+, not in rust-vmm's bindings yet.
    vmm_sys_util::ioctl_io_nr!(VHOST_VDPA_RESUME, super::b::VHOST, 0x7e);
}
use resume::VHOST_VDPA_RESUME;

/// An open vhost character device: the ioctls of `<linux/vhost.h>` on it.
#[derive(Debug)]
pub struct VhostFd {
    file: File,
    path: PathBuf,
    what: &'static str,
}

/// A device that is not what the configuration says (another kind, another type, a
/// target that does not exist): the message says what, the cause what to check.
pub(crate) fn refused(msg: String) -> Error {
    Error::transport(
        msg,
        std::io::Error::other(
            "check the controller's \"trtype\", \"traddr\", \"dev_type\" and \"wwpn\"",
        ),
    )
}

/// What a failed ioctl returned.
fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn check(rc: i32) -> std::io::Result<()> {
    if rc < 0 {
        Err(last_err())
    } else {
        Ok(())
    }
}

impl AsRawFd for VhostFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

impl VhostFd {
    /// Open the character device at `path`; `what` names it in messages ("vhost-scsi
    /// device", "vhost-vdpa device").
    pub fn open(path: &Path, what: &'static str, module: &str) -> Result<VhostFd> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound => format!(
                        " (no such device: is the kernel module {module} loaded{}?)",
                        if module == "vhost_vdpa" {
                            " and the vDPA device bound to it (vdpa dev add ...)"
                        } else {
                            ""
                        }
                    ),
                    _ if e.raw_os_error() == Some(libc::EBUSY) => {
                        " (busy: another process has it open; a vhost-vdpa device takes one user at a time)".to_string()
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        " (no permission: run as root or give this user read and write access to the device node)".to_string()
                    }
                    _ => String::new(),
                };
                Error::io(format!("cannot open {what} {}{hint}", path.display()), e)
            })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_char_device() {
            return Err(refused(format!(
                "{} is not a character device, so not a {what}",
                path.display()
            )));
        }
        Ok(VhostFd {
            file,
            path: path.to_path_buf(),
            what,
        })
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("{} {what}", self.path.display()), e)
    }

    /// `VHOST_SET_OWNER`: this process owns the device (first call on a new fd: every
    /// other vhost ioctl but vDPA's device ID needs it).
    pub fn set_owner(&self) -> Result<()> {
        // SAFETY: a vhost ioctl without argument on an fd we own.
        check(unsafe { ioctl(self, b::VHOST_SET_OWNER()) }).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTTY) {
                refused(format!(
                    "{} is not a {} (it does not answer vhost ioctls)",
                    self.path.display(),
                    self.what
                ))
            } else {
                self.err("VHOST_SET_OWNER", e)
            }
        })
    }

    /// `VHOST_GET_FEATURES`.
    pub fn get_features(&self) -> Result<u64> {
        let mut f = 0u64;
        // SAFETY: the kernel writes one u64 to `f`, which lives across the call.
        check(unsafe { ioctl_with_mut_ref(self, b::VHOST_GET_FEATURES(), &mut f) })
            .map_err(|e| self.err("VHOST_GET_FEATURES", e))?;
        Ok(f)
    }

    /// `VHOST_SET_FEATURES`.
    pub fn set_features(&self, f: u64) -> Result<()> {
        // SAFETY: the kernel reads one u64 from `f`.
        check(unsafe { ioctl_with_ref(self, b::VHOST_SET_FEATURES(), &f) })
            .map_err(|e| self.err(&format!("VHOST_SET_FEATURES {f:#x}"), e))
    }

    /// `VHOST_GET_BACKEND_FEATURES`; `None` when the device has none (`ENOTTY`).
    pub fn get_backend_features(&self) -> Result<Option<u64>> {
        let mut f = 0u64;
        // SAFETY: the kernel writes one u64 to `f`.
        match check(unsafe { ioctl_with_mut_ref(self, b::VHOST_GET_BACKEND_FEATURES(), &mut f) }) {
            Ok(()) => Ok(Some(f)),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Ok(None),
            Err(e) => Err(self.err("VHOST_GET_BACKEND_FEATURES", e)),
        }
    }

    /// `VHOST_SET_BACKEND_FEATURES`.
    pub fn set_backend_features(&self, f: u64) -> Result<()> {
        // SAFETY: the kernel reads one u64 from `f`.
        check(unsafe { ioctl_with_ref(self, b::VHOST_SET_BACKEND_FEATURES(), &f) })
            .map_err(|e| self.err("VHOST_SET_BACKEND_FEATURES", e))
    }

    /// `VHOST_SET_MEM_TABLE`: the regions as (device address, length, process address).
    pub fn set_mem_table(&self, regions: &[DmaRegionInfo]) -> Result<()> {
        let n = regions.len();
        // struct vhost_memory { u32 nregions; u32 padding; struct vhost_memory_region[] }
        // built in u64 words so that the regions are aligned.
        let words = 1 + 4 * n;
        let mut buf = vec![0u64; words];
        buf[0] = n as u64; // nregions (low half, little endian), padding 0
        for (i, r) in regions.iter().enumerate() {
            let at = 1 + 4 * i;
            buf[at] = r.iova; // guest_phys_addr: what descriptors carry
            buf[at + 1] = r.len;
            buf[at + 2] = r.va; // userspace_addr
            buf[at + 3] = 0;
        }
        // SAFETY: `buf` holds a complete struct vhost_memory with `n` regions (the
        // layout above, u64-aligned); the kernel copies it during the call.
        check(unsafe {
            ioctl_with_ptr(
                self,
                b::VHOST_SET_MEM_TABLE(),
                buf.as_ptr() as *const b::vhost_memory,
            )
        })
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::E2BIG) {
                Error::RegionRejected(format!(
                    "{} takes no more than its module parameter vhost.max_mem_regions regions (asked for {n}); use a larger initial DMA region or hugepages",
                    self.path.display()
                ))
            } else {
                self.err("VHOST_SET_MEM_TABLE", e)
            }
        })
    }

    fn vring_state(&self, nr: libc::c_ulong, what: &str, index: u16, num: u32) -> Result<()> {
        let s = b::vhost_vring_state {
            index: index as u32,
            num,
        };
        // SAFETY: the kernel reads one struct vhost_vring_state from `s`.
        check(unsafe { ioctl_with_ref(self, nr, &s) })
            .map_err(|e| self.err(&format!("{what} (queue {index})"), e))
    }

    /// `VHOST_SET_VRING_NUM`.
    pub fn set_vring_num(&self, index: u16, num: u16) -> Result<()> {
        self.vring_state(
            b::VHOST_SET_VRING_NUM(),
            "VHOST_SET_VRING_NUM",
            index,
            num as u32,
        )
    }

    /// `VHOST_SET_VRING_BASE`.
    pub fn set_vring_base(&self, index: u16, base: u32) -> Result<()> {
        self.vring_state(
            b::VHOST_SET_VRING_BASE(),
            "VHOST_SET_VRING_BASE",
            index,
            base,
        )
    }

    /// `VHOST_GET_VRING_BASE` (stops the ring on vhost-kernel devices).
    pub fn get_vring_base(&self, index: u16) -> Result<u32> {
        let mut s = b::vhost_vring_state {
            index: index as u32,
            num: 0,
        };
        // SAFETY: the kernel reads and writes one struct vhost_vring_state in `s`.
        check(unsafe { ioctl_with_mut_ref(self, b::VHOST_GET_VRING_BASE(), &mut s) })
            .map_err(|e| self.err(&format!("VHOST_GET_VRING_BASE (queue {index})"), e))?;
        Ok(s.num)
    }

    /// `VHOST_SET_VRING_ADDR` with the addresses the device uses for the ring parts.
    pub fn set_vring_addr(&self, index: u16, desc: u64, avail: u64, used: u64) -> Result<()> {
        let a = b::vhost_vring_addr {
            index: index as u32,
            flags: 0,
            desc_user_addr: desc,
            used_user_addr: used,
            avail_user_addr: avail,
            log_guest_addr: 0,
        };
        // SAFETY: the kernel reads one struct vhost_vring_addr from `a`.
        check(unsafe { ioctl_with_ref(self, b::VHOST_SET_VRING_ADDR(), &a) })
            .map_err(|e| self.err(&format!("VHOST_SET_VRING_ADDR (queue {index})"), e))
    }

    fn vring_file(&self, nr: libc::c_ulong, what: &str, index: u16, fd: &EventFd) -> Result<()> {
        let f = b::vhost_vring_file {
            index: index as u32,
            fd: fd.as_raw_fd(),
        };
        // SAFETY: the kernel reads one struct vhost_vring_file from `f`; the eventfd is
        // open (the kernel takes its own reference).
        check(unsafe { ioctl_with_ref(self, nr, &f) })
            .map_err(|e| self.err(&format!("{what} (queue {index})"), e))
    }

    /// `VHOST_SET_VRING_KICK`.
    pub fn set_vring_kick(&self, index: u16, fd: &EventFd) -> Result<()> {
        self.vring_file(b::VHOST_SET_VRING_KICK(), "VHOST_SET_VRING_KICK", index, fd)
    }

    /// `VHOST_SET_VRING_CALL`.
    pub fn set_vring_call(&self, index: u16, fd: &EventFd) -> Result<()> {
        self.vring_file(b::VHOST_SET_VRING_CALL(), "VHOST_SET_VRING_CALL", index, fd)
    }

    /// `VHOST_SCSI_GET_ABI_VERSION`.
    pub fn scsi_abi_version(&self) -> Result<i32> {
        let mut v: libc::c_int = 0;
        // SAFETY: the kernel writes one int to `v` (the ioctl is declared _IOW but
        // writes: `<linux/vhost.h>` says so).
        check(unsafe { ioctl_with_mut_ref(self, b::VHOST_SCSI_GET_ABI_VERSION(), &mut v) })
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOTTY) {
                    refused(format!(
                        "{} is not a vhost-scsi device (VHOST_SCSI_GET_ABI_VERSION: {e})",
                        self.path.display()
                    ))
                } else {
                    self.err("VHOST_SCSI_GET_ABI_VERSION", e)
                }
            })?;
        Ok(v)
    }

    /// `VHOST_SCSI_SET_ENDPOINT` (`set`) or `VHOST_SCSI_CLEAR_ENDPOINT`; the raw OS
    /// error for the caller to explain.
    pub fn scsi_endpoint(&self, t: &b::vhost_scsi_target, set: bool) -> std::io::Result<()> {
        let nr = if set {
            b::VHOST_SCSI_SET_ENDPOINT()
        } else {
            b::VHOST_SCSI_CLEAR_ENDPOINT()
        };
        // SAFETY: the kernel reads one struct vhost_scsi_target from `t`.
        check(unsafe { ioctl_with_ref(self, nr, t) })
    }

    /// `VHOST_VDPA_GET_DEVICE_ID`: the virtio device ID.
    pub fn vdpa_device_id(&self) -> Result<u32> {
        let mut id: u32 = 0;
        // SAFETY: the kernel writes one u32 to `id`.
        check(unsafe { ioctl_with_mut_ref(self, b::VHOST_VDPA_GET_DEVICE_ID(), &mut id) })
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOTTY) {
                    refused(format!(
                        "{} is not a vhost-vdpa device (VHOST_VDPA_GET_DEVICE_ID: {e})",
                        self.path.display()
                    ))
                } else {
                    self.err("VHOST_VDPA_GET_DEVICE_ID", e)
                }
            })?;
        Ok(id)
    }

    /// `VHOST_VDPA_GET_STATUS`.
    pub fn vdpa_status(&self) -> Result<u8> {
        let mut s: u8 = 0;
        // SAFETY: the kernel writes one u8 to `s`.
        check(unsafe { ioctl_with_mut_ref(self, b::VHOST_VDPA_GET_STATUS(), &mut s) })
            .map_err(|e| self.err("VHOST_VDPA_GET_STATUS", e))?;
        Ok(s)
    }

    /// `VHOST_VDPA_SET_STATUS`.
    pub fn vdpa_set_status(&self, s: u8) -> Result<()> {
        // SAFETY: the kernel reads one u8 from `s`.
        check(unsafe { ioctl_with_ref(self, b::VHOST_VDPA_SET_STATUS(), &s) })
            .map_err(|e| self.err(&format!("VHOST_VDPA_SET_STATUS {s:#x}"), e))
    }

    fn vdpa_u32(&self, nr: libc::c_ulong, what: &str) -> Result<Option<u32>> {
        let mut v: u32 = 0;
        // SAFETY: the kernel writes one u32 to `v`.
        match check(unsafe { ioctl_with_mut_ref(self, nr, &mut v) }) {
            Ok(()) => Ok(Some(v)),
            // Older kernels lack some of these ioctls.
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Ok(None),
            Err(e) => Err(self.err(what, e)),
        }
    }

    /// `VHOST_VDPA_GET_VQS_COUNT`; `None` on kernels without it.
    pub fn vdpa_vqs_count(&self) -> Result<Option<u32>> {
        self.vdpa_u32(b::VHOST_VDPA_GET_VQS_COUNT(), "VHOST_VDPA_GET_VQS_COUNT")
    }

    /// `VHOST_VDPA_GET_CONFIG_SIZE`; `None` on kernels without it.
    pub fn vdpa_config_size(&self) -> Result<Option<u32>> {
        self.vdpa_u32(
            b::VHOST_VDPA_GET_CONFIG_SIZE(),
            "VHOST_VDPA_GET_CONFIG_SIZE",
        )
    }

    /// `VHOST_VDPA_GET_VRING_NUM`: the largest queue size.
    pub fn vdpa_vring_num(&self) -> Result<u16> {
        let mut n: u16 = 0;
        // SAFETY: the kernel writes one u16 to `n`.
        check(unsafe { ioctl_with_mut_ref(self, b::VHOST_VDPA_GET_VRING_NUM(), &mut n) })
            .map_err(|e| self.err("VHOST_VDPA_GET_VRING_NUM", e))?;
        Ok(n)
    }

    /// `VHOST_VDPA_GET_IOVA_RANGE`: first and last usable device address; `None` on
    /// kernels without it.
    pub fn vdpa_iova_range(&self) -> Result<Option<(u64, u64)>> {
        let mut r = b::vhost_vdpa_iova_range { first: 0, last: 0 };
        // SAFETY: the kernel writes one struct vhost_vdpa_iova_range to `r`.
        match check(unsafe { ioctl_with_mut_ref(self, b::VHOST_VDPA_GET_IOVA_RANGE(), &mut r) }) {
            Ok(()) => Ok(Some((r.first, r.last))),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Ok(None),
            Err(e) => Err(self.err("VHOST_VDPA_GET_IOVA_RANGE", e)),
        }
    }

    /// `VHOST_VDPA_GET_CONFIG`: `buf.len()` bytes of the device configuration at `off`.
    pub fn vdpa_get_config(&self, off: u32, buf: &mut [u8]) -> Result<()> {
        // struct vhost_vdpa_config { u32 off; u32 len; u8 buf[]; } in u32 words.
        let mut raw = vec![0u32; 2 + buf.len().div_ceil(4)];
        raw[0] = off;
        raw[1] = buf.len() as u32;
        // SAFETY: `raw` holds the header and `len` bytes after it; the kernel writes at
        // most `len` bytes there.
        check(unsafe {
            ioctl_with_ptr(
                self,
                b::VHOST_VDPA_GET_CONFIG(),
                raw.as_mut_ptr() as *mut b::vhost_vdpa_config,
            )
        })
        .map_err(|e| {
            self.err(
                &format!("VHOST_VDPA_GET_CONFIG ({} bytes at {off})", buf.len()),
                e,
            )
        })?;
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = raw[2 + i / 4].to_ne_bytes()[i % 4];
        }
        Ok(())
    }

    /// `VHOST_VDPA_SET_VRING_ENABLE`.
    pub fn vdpa_set_vring_enable(&self, index: u16, on: bool) -> Result<()> {
        self.vring_state(
            b::VHOST_VDPA_SET_VRING_ENABLE(),
            "VHOST_VDPA_SET_VRING_ENABLE",
            index,
            on as u32,
        )
    }

    /// `VHOST_VDPA_SUSPEND` (`suspend`) or `VHOST_VDPA_RESUME`.
    pub fn vdpa_suspend(&self, suspend: bool) -> Result<()> {
        let (nr, what) = if suspend {
            (b::VHOST_VDPA_SUSPEND(), "VHOST_VDPA_SUSPEND")
        } else {
            (VHOST_VDPA_RESUME(), "VHOST_VDPA_RESUME")
        };
        // SAFETY: an ioctl without argument.
        check(unsafe { ioctl(self, nr) }).map_err(|e| self.err(what, e))
    }

    /// Write one IOTLB message (`VHOST_IOTLB_MSG_V2`, address space 0).
    pub fn iotlb(&self, kind: u8, iova: u64, size: u64, uaddr: u64) -> std::io::Result<()> {
        let mut m = b::vhost_msg_v2 {
            type_: b::VHOST_IOTLB_MSG_V2,
            ..Default::default()
        };
        m.__bindgen_anon_1.iotlb = b::vhost_iotlb_msg {
            iova,
            size,
            uaddr,
            perm: b::VHOST_ACCESS_RW,
            type_: kind,
        };
        let len = std::mem::size_of::<b::vhost_msg_v2>();
        // SAFETY: `m` is a complete struct vhost_msg_v2 of `len` bytes; write(2) only
        // reads it.
        let n = unsafe {
            libc::write(
                self.file.as_raw_fd(),
                &m as *const b::vhost_msg_v2 as *const libc::c_void,
                len,
            )
        };
        if n < 0 {
            Err(last_err())
        } else if n as usize != len {
            Err(std::io::Error::other(format!(
                "short IOTLB message write ({n} of {len} bytes)"
            )))
        } else {
            Ok(())
        }
    }
}

/// One queue's eventfds.
pub(crate) struct Vring {
    pub(crate) kick: Arc<EventFd>,
    pub(crate) call: Arc<EventFd>,
}

/// Set up queue `index` on `fd`: size, ring addresses (`addrs`: descriptor, driver and
/// device area as the device sees them), first index `base`, call and kick eventfds.
pub(crate) fn setup_vring(
    fd: &VhostFd,
    index: u16,
    size: u16,
    addrs: (u64, u64, u64),
    base: u32,
) -> Result<Vring> {
    fd.set_vring_num(index, size)
        .map_err(|e| Error::QueueSizeRefused {
            index,
            size,
            cause: e.to_string(),
        })?;
    fd.set_vring_addr(index, addrs.0, addrs.1, addrs.2)?;
    fd.set_vring_base(index, base)?;
    let ev = || {
        EventFd::new(EFD_NONBLOCK)
            .map(Arc::new)
            .map_err(|e| Error::io(format!("eventfd for queue {index}"), e))
    };
    let (call, kick) = (ev()?, ev()?);
    fd.set_vring_call(index, &call)?;
    fd.set_vring_kick(index, &kick)?;
    Ok(Vring { kick, call })
}

/// Keeps the vhost-kernel device's memory table equal to the DMA memory's regions
/// (`VHOST_SET_MEM_TABLE` again on every change; the kernel swaps tables atomically).
struct MemTable {
    fd: Arc<VhostFd>,
    regions: Mutex<Vec<DmaRegionInfo>>,
}

impl RegionListener for MemTable {
    fn region_added(&self, region: &DmaRegionInfo) -> Result<()> {
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        regions.push(*region);
        if let Err(e) = self.fd.set_mem_table(&regions) {
            regions.pop();
            return Err(e);
        }
        Ok(())
    }

    fn region_removed(&self, region: &DmaRegionInfo) {
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = regions.iter().position(|r| r.index == region.index) {
            regions.remove(pos);
            if !regions.is_empty() {
                let _ = self.fd.set_mem_table(&regions);
            }
        }
    }
}

/// The longest WWPN `struct vhost_scsi_target` carries (with its terminating NUL).
const WWPN_LEN: usize = 224;

/// The kernel's vhost-scsi (`/dev/vhost-scsi`): virtio-scsi queues served by the LIO
/// SCSI target's vhost fabric, the endpoint named by its WWPN (configured in configfs
/// under `/sys/kernel/config/target/vhost/WWPN/tpgt_N`, one virtio-scsi target per
/// TPG tag N). Memory is shared with `VHOST_SET_MEM_TABLE` (device addresses to this
/// process's addresses); the device has no configuration space (drivers use the spec's
/// defaults) and no status: it serves the rings once the endpoint is set.
pub struct VhostScsiTransport {
    fd: Arc<VhostFd>,
    wwpn: String,
    mem: Arc<DmaMemory>,
    offered: u64,
    vrings: Vec<Option<Vring>>,
    table: Option<Arc<MemTable>>,
    endpoint: bool,
    broken: Arc<AtomicBool>,
}

impl std::fmt::Debug for VhostScsiTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostScsiTransport")
            .field("path", &self.fd.path)
            .field("wwpn", &self.wwpn)
            .finish()
    }
}

/// Where configfs keeps the LIO vhost fabric's WWPNs.
const VHOST_CONFIGFS: &str = "/sys/kernel/config/target/vhost";

impl VhostScsiTransport {
    /// Open the vhost-scsi device at `path` (normally `/dev/vhost-scsi`) for the LIO
    /// vhost target `wwpn` (e.g. `naa.5001405000000001`).
    pub fn open(path: &Path, wwpn: &str, mem: Arc<DmaMemory>) -> Result<VhostScsiTransport> {
        if wwpn.is_empty() || wwpn.len() >= WWPN_LEN || wwpn.contains('\0') {
            return Err(refused(format!(
                "WWPN {wwpn:?} must be 1 to {} characters without NUL (e.g. naa.5001405000000001)",
                WWPN_LEN - 1
            )));
        }
        let fd = VhostFd::open(path, "vhost-scsi device", "vhost_scsi")?;
        fd.set_owner()?;
        let abi = fd.scsi_abi_version()?;
        if abi != b::VHOST_SCSI_ABI_VERSION as i32 {
            return Err(refused(format!(
                "{}: vhost-scsi ABI version {abi}, vireo speaks version {}",
                path.display(),
                b::VHOST_SCSI_ABI_VERSION
            )));
        }
        let offered = fd.get_features()?;
        let t = VhostScsiTransport {
            fd: Arc::new(fd),
            wwpn: wwpn.to_string(),
            mem,
            offered,
            vrings: Vec::new(),
            table: None,
            endpoint: false,
            broken: Arc::new(AtomicBool::new(false)),
        };
        Ok(t)
    }

    fn target(&self) -> b::vhost_scsi_target {
        let mut t = b::vhost_scsi_target {
            abi_version: b::VHOST_SCSI_ABI_VERSION as i32,
            ..Default::default()
        };
        for (d, s) in t.vhost_wwpn.iter_mut().zip(self.wwpn.bytes()) {
            *d = s as libc::c_char;
        }
        t
    }

    /// Why SET_ENDPOINT failed with `e`, in words.
    fn endpoint_error(&self, e: std::io::Error) -> Error {
        let dir = Path::new(VHOST_CONFIGFS).join(&self.wwpn);
        let why = match e.raw_os_error() {
            // The kernel answers ENODEV (EEXIST before 6.x) when no TPG of the WWPN is
            // free to attach.
            Some(libc::ENODEV | libc::EEXIST) if !Path::new(VHOST_CONFIGFS).exists() => format!(
                "no LIO vhost target with WWPN {} ({VHOST_CONFIGFS} does not exist: mount configfs and load target_core_mod and vhost_scsi)",
                self.wwpn
            ),
            Some(libc::ENODEV | libc::EEXIST) if !dir.exists() => format!(
                "WWPN {} not found: there is no {} (create the target with targetcli or in configfs)",
                self.wwpn,
                dir.display()
            ),
            Some(libc::ENODEV | libc::EEXIST) => format!(
                "WWPN {} has no TPG ready to attach: a tpgt_N under {} needs a nexus (echo the WWPN to tpgt_N/nexus) and must not be in use by another vhost-scsi user (a QEMU vhost-scsi-pci device, another vireo)",
                self.wwpn,
                dir.display()
            ),
            _ => {
                return Error::io(
                    format!(
                        "{}: VHOST_SCSI_SET_ENDPOINT {}",
                        self.fd.path.display(),
                        self.wwpn
                    ),
                    e,
                )
            }
        };
        refused(format!("{}: {why}", self.fd.path.display()))
    }
}

impl Transport for VhostScsiTransport {
    fn describe(&self) -> String {
        format!(
            "vhost-scsi device {} (WWPN {})",
            self.fd.path.display(),
            self.wwpn
        )
    }

    fn device_features(&mut self) -> Result<u64> {
        Ok(self.offered & !VHOST_F_LOG_ALL)
    }

    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        self.fd.set_features(features & self.offered)?;
        let table = Arc::new(MemTable {
            fd: self.fd.clone(),
            regions: Mutex::new(Vec::new()),
        });
        let weak: std::sync::Weak<dyn RegionListener> =
            Arc::downgrade(&(table.clone() as Arc<dyn RegionListener>));
        let initial = self.mem.add_listener(weak);
        {
            let mut regions = table.regions.lock().unwrap_or_else(|e| e.into_inner());
            *regions = initial.to_vec();
            if !regions.is_empty() {
                self.fd.set_mem_table(&regions)?;
            }
        }
        self.table = Some(table);
        // Attach the target once and detach it again: a WWPN that does not exist or is
        // not ready is refused now, with its reason, rather than after the queues. The
        // kernel wants the memory table first; no queue is set up yet, so it touches
        // no ring.
        let target = self.target();
        self.fd
            .scsi_endpoint(&target, true)
            .map_err(|e| self.endpoint_error(e))?;
        self.fd
            .scsi_endpoint(&target, false)
            .map_err(|e| self.fd.err("VHOST_SCSI_CLEAR_ENDPOINT", e))?;
        Ok(())
    }

    fn max_queues(&mut self) -> Result<Option<u16>> {
        // The kernel cannot tell (VHOST_SCSI_MAX_VQ, or its max_io_vqs parameter): a
        // queue beyond it is refused when set up.
        Ok(None)
    }

    fn max_queue_size(&mut self, _index: u16) -> Result<Option<u16>> {
        Ok(None)
    }

    fn has_config(&self) -> bool {
        false
    }

    fn read_config(&mut self, _offset: u32, _buf: &mut [u8]) -> Result<()> {
        Err(Error::Features(format!(
            "{} has no configuration space",
            self.describe()
        )))
    }

    fn setup_queue(&mut self, index: u16, layout: &RingLayout) -> Result<Notifier> {
        if layout.packed {
            return Err(Error::InvalidQueue(format!(
                "{}: the kernel's vhost has no packed rings",
                self.describe()
            )));
        }
        if self.endpoint {
            return Err(Error::InvalidQueue(format!(
                "{}: queue {index} set up after the device started",
                self.describe()
            )));
        }
        // The kernel reads the rings at this process's addresses, and the descriptors'
        // buffers through the memory table.
        let v = setup_vring(
            &self.fd,
            index,
            layout.size,
            (layout.desc_va, layout.avail_va, layout.used_va),
            0,
        )
        .map_err(|e| match e {
            Error::QueueSizeRefused { cause, .. } if cause.contains("No buffer space") => {
                Error::InvalidQueue(format!(
                    "{}: the device has no queue {index} (the kernel's vhost_scsi serves a control, an event and at most its max_io_vqs request queues)",
                    self.describe()
                ))
            }
            e => e,
        })?;
        let kick = v.kick.clone();
        let i = index as usize;
        if self.vrings.len() <= i {
            self.vrings.resize_with(i + 1, || None);
        }
        self.vrings[i] = Some(v);
        Ok(Notifier::EventFd(kick))
    }

    fn start(&mut self) -> Result<()> {
        let t = self.target();
        self.fd
            .scsi_endpoint(&t, true)
            .map_err(|e| self.endpoint_error(e))?;
        self.endpoint = true;
        Ok(())
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.endpoint {
            self.endpoint = false;
            let t = self.target();
            // Waits for the requests in flight and detaches the TPGs.
            let _ = self.fd.scsi_endpoint(&t, false);
            for i in 0..self.vrings.len() {
                if self.vrings[i].is_some() {
                    let _ = self.fd.get_vring_base(i as u16);
                }
            }
        }
        self.vrings.clear();
        Ok(())
    }

    fn memory(&self) -> &Arc<DmaMemory> {
        &self.mem
    }

    fn broken_flag(&self) -> Arc<AtomicBool> {
        self.broken.clone()
    }

    fn completion_signal(&self, index: u16) -> Option<Arc<EventFd>> {
        self.vrings
            .get(index as usize)?
            .as_ref()
            .map(|v| v.call.clone())
    }

    fn abort(&self) {
        // The kernel's target does not go away; its requests time out in LIO. Mark
        // the controller failed so that I/O stops waiting.
        self.broken.store(true, Ordering::Release);
    }
}

impl Drop for VhostScsiTransport {
    fn drop(&mut self) {
        let _ = Transport::shutdown(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Addressing, DmaConfig};

    fn mem() -> Arc<DmaMemory> {
        DmaMemory::new(DmaConfig {
            initial_region_size: 1 << 20,
            hugetlb: false,
            hugetlb_fallback: false,
            max_total_size: 8 << 20,
            addressing: Addressing::Virtual,
        })
        .unwrap()
    }

    #[test]
    fn missing_device_says_which_module() {
        let e = VhostScsiTransport::open(Path::new("/nonexistent/vhost-scsi"), "naa.1", mem())
            .unwrap_err()
            .to_string();
        assert!(e.contains("vhost_scsi"), "{e}");
    }

    #[test]
    fn a_file_that_is_no_vhost_device_is_refused() {
        let e = VhostScsiTransport::open(Path::new("/dev/null"), "naa.1", mem())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a vhost-scsi device"), "{e}");
        let f = std::env::temp_dir().join(format!("vireo-vk-{}", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        let e = VhostScsiTransport::open(&f, "naa.1", mem())
            .unwrap_err()
            .to_string();
        std::fs::remove_file(&f).unwrap();
        assert!(e.contains("not a character device"), "{e}");
    }

    #[test]
    fn wwpn_is_checked() {
        for w in ["", &"n".repeat(WWPN_LEN)] {
            let e = VhostScsiTransport::open(Path::new("/dev/null"), w, mem())
                .unwrap_err()
                .to_string();
            assert!(e.contains("WWPN"), "{e}");
        }
    }

    #[test]
    fn mem_table_layout_matches_the_kernel_structs() {
        assert_eq!(std::mem::size_of::<b::vhost_memory_region>(), 32);
        assert_eq!(std::mem::size_of::<b::vhost_memory>(), 8);
        assert_eq!(std::mem::size_of::<b::vhost_vdpa_config>(), 8);
        assert_eq!(std::mem::size_of::<b::vhost_msg_v2>(), 72);
    }
}
