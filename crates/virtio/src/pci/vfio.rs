//! VFIO: a PCI function bound to vfio-pci, in a container of its own, with an IOMMU
//! (type-1: vireo's DMA regions are mapped at their IOVAs) or in no-IOMMU mode
//! (physical addresses, no mappings).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};
use crate::memory::{DmaRegionInfo, RegionListener};

// ioctl numbers: _IO(';', 100 + n) (linux/vfio.h).
const VFIO_TYPE: u64 = b';' as u64;
const fn vfio_io(n: u64) -> u64 {
    (VFIO_TYPE << 8) | (100 + n)
}
const GET_API_VERSION: u64 = vfio_io(0);
const CHECK_EXTENSION: u64 = vfio_io(1);
const SET_IOMMU: u64 = vfio_io(2);
const GROUP_GET_STATUS: u64 = vfio_io(3);
const GROUP_SET_CONTAINER: u64 = vfio_io(4);
const GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const DEVICE_SET_IRQS: u64 = vfio_io(10);
const IOMMU_MAP_DMA: u64 = vfio_io(13);
const IOMMU_UNMAP_DMA: u64 = vfio_io(14);

const API_VERSION: i32 = 0;
const TYPE1_IOMMU: u64 = 1;
const TYPE1V2_IOMMU: u64 = 3;
const NOIOMMU_IOMMU: u64 = 8;
const GROUP_FLAGS_VIABLE: u32 = 1;
const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const DMA_MAP_FLAG_READ: u32 = 1;
const DMA_MAP_FLAG_WRITE: u32 = 2;
/// Index of the configuration-space region of a PCI function.
pub const CONFIG_REGION: u32 = 7;
const REQ_IRQ_INDEX: u32 = 4;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct RegionInfoRaw {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
#[derive(Default)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
#[derive(Default)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct IrqSetOne {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fd: i32,
}

/// One region of a VFIO device.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Offset of the region in the device file.
    pub offset: u64,
    /// Whether it may be mapped.
    pub mmap: bool,
}

/// A VFIO container with one group and one device in it.
pub struct VfioDevice {
    container: Arc<File>,
    _group: File,
    /// The device file (regions are read, written and mapped through it).
    pub device: Arc<File>,
    /// Whether an IOMMU translates (type-1) or not (no-IOMMU).
    pub iommu: bool,
    /// Signalled when the kernel asks for the device back (hot-unplug, unbind).
    pub request: Option<EventFd>,
}

impl std::fmt::Debug for VfioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioDevice")
            .field("iommu", &self.iommu)
            .finish_non_exhaustive()
    }
}

fn ioctl_err(what: &str) -> Error {
    Error::io(format!("VFIO {what}"), std::io::Error::last_os_error())
}

fn open_rw(path: &str, hint: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("cannot open {path}{hint}"), e))
}

impl VfioDevice {
    /// Open function `bdf` of IOMMU group `group` (bound to vfio-pci).
    pub fn open(bdf: &str, group: u32) -> Result<VfioDevice> {
        let typed = format!("/dev/vfio/{group}");
        let noiommu = format!("/dev/vfio/noiommu-{group}");
        let (group_path, iommu) = if std::path::Path::new(&typed).exists() {
            (typed, true)
        } else if std::path::Path::new(&noiommu).exists() {
            (noiommu, false)
        } else {
            return Err(Error::Features(format!(
                "{bdf} is bound to vfio-pci but neither {typed} nor {noiommu} exists (is the vfio module loaded? without an IOMMU, load vfio with enable_unsafe_noiommu_mode=1 before binding, or bind the function to uio_pci_generic)"
            )));
        };
        let container = open_rw("/dev/vfio/vfio", " (load the vfio module)")?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument and only returns a value.
        let v = unsafe { libc::ioctl(container.as_raw_fd(), GET_API_VERSION as _) };
        if v != API_VERSION {
            return Err(Error::Features(format!(
                "unknown VFIO API version {v} (expected {API_VERSION})"
            )));
        }
        let group_file = open_rw(
            &group_path,
            " (is another process using the function? VFIO groups open once)",
        )?;
        let mut st = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: GROUP_GET_STATUS writes a vfio_group_status into `st`, which is a
        // properly sized repr(C) struct with argsz set.
        if unsafe { libc::ioctl(group_file.as_raw_fd(), GROUP_GET_STATUS as _, &mut st) } < 0 {
            return Err(ioctl_err("GROUP_GET_STATUS"));
        }
        if st.flags & GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::Features(format!(
                "IOMMU group {group} of {bdf} is not viable: every function of the group must be bound to vfio-pci (see /sys/kernel/iommu_groups/{group}/devices)"
            )));
        }
        let cfd: RawFd = container.as_raw_fd();
        // SAFETY: GROUP_SET_CONTAINER reads one int (the container fd) from the pointer.
        if unsafe { libc::ioctl(group_file.as_raw_fd(), GROUP_SET_CONTAINER as _, &cfd) } < 0 {
            return Err(ioctl_err("GROUP_SET_CONTAINER"));
        }
        let kind = if iommu {
            // SAFETY: CHECK_EXTENSION takes an integer argument and returns a value.
            let v2 = unsafe { libc::ioctl(cfd, CHECK_EXTENSION as _, TYPE1V2_IOMMU) } > 0;
            if v2 {
                TYPE1V2_IOMMU
            } else {
                TYPE1_IOMMU
            }
        } else {
            NOIOMMU_IOMMU
        };
        // SAFETY: SET_IOMMU takes an integer argument.
        if unsafe { libc::ioctl(cfd, SET_IOMMU as _, kind) } < 0 {
            return Err(ioctl_err(&format!("SET_IOMMU (type {kind})")));
        }
        let name = std::ffi::CString::new(bdf).map_err(|_| Error::Features("bad BDF".into()))?;
        // SAFETY: GROUP_GET_DEVICE_FD reads a NUL-terminated device name and returns a
        // new file descriptor.
        let dfd = unsafe {
            libc::ioctl(
                group_file.as_raw_fd(),
                GROUP_GET_DEVICE_FD as _,
                name.as_ptr(),
            )
        };
        if dfd < 0 {
            return Err(ioctl_err(&format!("GROUP_GET_DEVICE_FD {bdf}")));
        }
        // SAFETY: `dfd` is a fresh descriptor that nothing else owns.
        let device = Arc::new(unsafe { File::from_raw_fd(dfd) });
        let request = Self::request_eventfd(&device).ok();
        Ok(VfioDevice {
            container: Arc::new(container),
            _group: group_file,
            device,
            iommu,
            request,
        })
    }

    /// Ask the kernel to signal an eventfd when it wants the device back.
    fn request_eventfd(device: &File) -> Result<EventFd> {
        let efd = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
        let set = IrqSetOne {
            argsz: std::mem::size_of::<IrqSetOne>() as u32,
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index: REQ_IRQ_INDEX,
            start: 0,
            count: 1,
            fd: efd.as_raw_fd(),
        };
        // SAFETY: DEVICE_SET_IRQS reads a vfio_irq_set followed by `count` ints; IrqSetOne
        // is exactly that layout with count 1.
        if unsafe { libc::ioctl(device.as_raw_fd(), DEVICE_SET_IRQS as _, &set) } < 0 {
            return Err(ioctl_err("DEVICE_SET_IRQS (request)"));
        }
        Ok(efd)
    }

    /// Region `index` (BARs 0..=5, configuration space 7).
    pub fn region(&self, index: u32) -> Result<Region> {
        let mut r = RegionInfoRaw {
            argsz: std::mem::size_of::<RegionInfoRaw>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: DEVICE_GET_REGION_INFO fills a vfio_region_info of at most argsz bytes.
        if unsafe { libc::ioctl(self.device.as_raw_fd(), DEVICE_GET_REGION_INFO as _, &mut r) } < 0
        {
            return Err(ioctl_err(&format!("DEVICE_GET_REGION_INFO {index}")));
        }
        Ok(Region {
            size: r.size,
            offset: r.offset,
            mmap: r.flags & REGION_INFO_FLAG_MMAP != 0,
        })
    }

    /// A listener that maps DMA regions into the container's IOMMU domain.
    pub fn dma_mapper(&self, gone: Arc<AtomicBool>) -> Arc<DmaMapper> {
        Arc::new(DmaMapper {
            container: self.container.clone(),
            mapped: Mutex::new(Vec::new()),
            gone,
        })
    }
}

/// Maps vireo's DMA regions (IOVA windows of [`Addressing::Linear`](crate::memory::Addressing))
/// into a VFIO type-1 container.
pub struct DmaMapper {
    container: Arc<File>,
    mapped: Mutex<Vec<DmaRegionInfo>>,
    gone: Arc<AtomicBool>,
}

impl DmaMapper {
    /// Map one region.
    pub fn map(&self, r: &DmaRegionInfo) -> Result<()> {
        let m = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            vaddr: r.va,
            iova: r.iova,
            size: r.len,
        };
        // SAFETY: IOMMU_MAP_DMA reads a vfio_iommu_type1_dma_map; the range is a live
        // mapping of the DMA memory, which outlives the container (regions are never
        // freed while the memory lives, and the memory outlives its transports).
        if unsafe { libc::ioctl(self.container.as_raw_fd(), IOMMU_MAP_DMA as _, &m) } < 0 {
            let e = std::io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::ENOMEM) => " (locked-memory limit: raise `ulimit -l`, or run as root)",
                Some(libc::EINVAL) | Some(libc::EFAULT) => {
                    " (IOVA outside the IOMMU's address width?)"
                }
                _ => "",
            };
            return Err(Error::io(
                format!(
                    "VFIO IOMMU_MAP_DMA of {} bytes at IOVA {:#x}{hint}",
                    r.len, r.iova
                ),
                e,
            ));
        }
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(*r);
        Ok(())
    }

    fn unmap(&self, r: &DmaRegionInfo) {
        let u = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova: r.iova,
            size: r.len,
        };
        // SAFETY: IOMMU_UNMAP_DMA reads a vfio_iommu_type1_dma_unmap (and writes back the
        // unmapped size); the struct is properly sized.
        unsafe { libc::ioctl(self.container.as_raw_fd(), IOMMU_UNMAP_DMA as _, &u) };
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|m| m.iova != r.iova);
    }
}

impl RegionListener for DmaMapper {
    fn region_added(&self, region: &DmaRegionInfo) -> Result<()> {
        if self.gone.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.map(region)
    }

    fn region_removed(&self, region: &DmaRegionInfo) {
        self.unmap(region);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        assert_eq!(GET_API_VERSION, 0x3b64);
        assert_eq!(SET_IOMMU, 0x3b66);
        assert_eq!(GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(std::mem::size_of::<RegionInfoRaw>(), 32);
        assert_eq!(std::mem::size_of::<DmaMap>(), 32);
        assert_eq!(std::mem::size_of::<IrqSetOne>(), 24);
    }
}
