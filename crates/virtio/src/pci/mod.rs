//! The virtio-pci transport (virtio 1.2 section 4.1): vireo drives a virtio PCI
//! function itself, through VFIO (with an IOMMU, or in no-IOMMU mode) or
//! uio_pci_generic, chosen from what the function is bound to. Polled: no interrupts
//! are set up (MSI-X vectors are left at `NO_VECTOR`).
//!
//! Every PCI controller has its own [`DmaMemory`]: with an IOMMU its regions are mapped
//! at compact IOVAs ([`Addressing::Linear`]); without one (uio_pci_generic, VFIO
//! no-IOMMU) the device sees physical addresses of huge pages
//! ([`Addressing::Physical`]).

pub mod bar;
pub mod caps;
pub mod sysfs;
pub mod vfio;
pub mod vfio_user;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::features::transport as tf;
use crate::memory::{Addressing, DmaConfig, DmaMemory, RegionListener};
use crate::notify::{Kick, Notifier};
use crate::ring::RingLayout;
use crate::transport::Transport;

pub use bar::Bar;
pub use caps::VirtioCaps;
pub use sysfs::{virtio_functions, Binding, PciAddress, PciFunction, VirtioKind};

/// First IOVA of a PCI controller's DMA memory behind an IOMMU: above 4 GiB, clear of
/// the x86 MSI window and low reserved ranges, and far below a 39-bit IOMMU's limit.
pub const IOVA_BASE: u64 = 1 << 32;

// Device status bits (virtio 1.2 section 2.1).
const S_ACKNOWLEDGE: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;
const S_NEEDS_RESET: u8 = 0x40;
const S_FAILED: u8 = 0x80;

// Common configuration registers (virtio 1.2 section 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const NO_VECTOR: u16 = 0xffff;

/// Features the transport accepts on the driver's behalf when offered:
/// `ACCESS_PLATFORM` (addresses go through the platform's IOMMU, or are physical) and
/// `ORDER_PLATFORM` (vireo's ring uses real memory barriers).
const PLATFORM_FEATURES: u64 = tf::ACCESS_PLATFORM | (1 << 36);

/// A window of a BAR holding one virtio structure.
#[derive(Debug, Clone)]
struct Window {
    bar: Arc<Bar>,
    base: u64,
    len: u64,
}

impl Window {
    fn at(&self, off: u64, size: u64) -> Result<u64> {
        if off.checked_add(size).is_none_or(|e| e > self.len) {
            return Err(Error::Device(format!(
                "register at {off:#x} outside a virtio structure of {} bytes",
                self.len
            )));
        }
        Ok(self.base + off)
    }
    fn r8(&self, off: u64) -> Result<u8> {
        self.bar.read8(self.at(off, 1)?)
    }
    fn r16(&self, off: u64) -> Result<u16> {
        self.bar.read16(self.at(off, 2)?)
    }
    fn r32(&self, off: u64) -> Result<u32> {
        self.bar.read32(self.at(off, 4)?)
    }
    fn w8(&self, off: u64, v: u8) -> Result<()> {
        self.bar.write8(self.at(off, 1)?, v)
    }
    fn w16(&self, off: u64, v: u16) -> Result<()> {
        self.bar.write16(self.at(off, 2)?, v)
    }
    fn w32(&self, off: u64, v: u32) -> Result<()> {
        self.bar.write32(self.at(off, 4)?, v)
    }
    /// A 64-bit register as two 32-bit writes, low half first (the spec's rule).
    fn w64(&self, off: u64, v: u64) -> Result<()> {
        self.w32(off, v as u32)?;
        self.w32(off + 4, (v >> 32) as u32)
    }
}

/// The doorbell of one queue: a 16-bit write of the queue index.
#[derive(Debug)]
struct Doorbell {
    window: Window,
    off: u64,
}

impl Kick for Doorbell {
    fn kick(&self, index: u16) -> Result<()> {
        self.window.w16(self.off, index)
    }
}

/// PCI configuration space of the function (VFIO region 7 or sysfs `config`, or a
/// vfio-user server's region 7).
#[derive(Debug, Clone)]
enum ConfigSpace {
    File { file: Arc<File>, offset: u64 },
    Remote(Arc<vfio_user::VfuClient>),
}

/// PCI command register: offset and the bits vireo sets.
const PCI_COMMAND: u64 = 0x04;
const CMD_MEMORY: u16 = 0x2;
const CMD_BUS_MASTER: u16 = 0x4;
const CMD_INTX_DISABLE: u16 = 0x400;

impl ConfigSpace {
    /// Set and clear bits of the command register.
    fn command(&self, set: u16, clear: u16) -> Result<()> {
        let mut cmd = [0u8; 2];
        self.read(PCI_COMMAND, &mut cmd)?;
        let c = (u16::from_le_bytes(cmd) | set) & !clear;
        self.write(PCI_COMMAND, &c.to_le_bytes())
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            ConfigSpace::File { file, offset } => file
                .read_exact_at(buf, offset + off)
                .map_err(|e| Error::io("PCI configuration space read", e)),
            ConfigSpace::Remote(c) => c.region_read(vfio_user::CONFIG_REGION, off, buf),
        }
    }
    fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
        match self {
            ConfigSpace::File { file, offset } => file
                .write_all_at(buf, offset + off)
                .map_err(|e| Error::io("PCI configuration space write", e)),
            ConfigSpace::Remote(c) => c.region_write(vfio_user::CONFIG_REGION, off, buf),
        }
    }
}

/// How the function is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// VFIO with an IOMMU (type-1).
    VfioIommu,
    /// VFIO in no-IOMMU mode.
    VfioNoIommu,
    /// uio_pci_generic.
    Uio,
    /// A device emulated by another process, over a vfio-user socket.
    VfioUser,
}

impl AccessMode {
    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            AccessMode::VfioIommu => "vfio (IOMMU)",
            AccessMode::VfioNoIommu => "vfio (no-IOMMU)",
            AccessMode::Uio => "uio_pci_generic",
            AccessMode::VfioUser => "vfio-user",
        }
    }
}

/// A virtio PCI function driven by vireo.
pub struct PciTransport {
    /// The function's address, or the vfio-user socket's path.
    name: String,
    function: Option<PciFunction>,
    /// The virtio device type, from the function's ids.
    kind: Option<VirtioKind>,
    mode: AccessMode,
    mem: Arc<DmaMemory>,
    common: Window,
    notify: Window,
    notify_mult: u32,
    device_cfg: Option<Window>,
    config: ConfigSpace,
    /// The function is gone (removed, all ones, a BAR fault): never usable again.
    gone: Arc<AtomicBool>,
    /// The queues' "connection is gone" flag: raised with `gone`, and by a reset vireo
    /// forces ([`Transport::abort`]); a [`Transport::reinit`] starts a new one.
    broken: Arc<AtomicBool>,
    /// vireo is resetting the device: the monitor looks away.
    resetting: Arc<AtomicBool>,
    vfio: Arc<Mutex<Option<vfio::VfioDevice>>>,
    _mapper: Option<Arc<dyn RegionListener>>,
    bars: Vec<Arc<Bar>>,
    /// The vfio-user connection, if the device is reached that way.
    vfu: Option<Arc<vfio_user::VfuClient>>,
    offered: u64,
    monitor: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    started: bool,
}

impl std::fmt::Debug for PciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciTransport")
            .field("addr", &self.name)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn bind_hint(bdf: &str) -> String {
    format!(
        "bind it first: `vireo setup bind {bdf}` (vfio-pci; with an IOMMU, or in no-IOMMU mode) or `vireo setup bind {bdf} --driver uio_pci_generic`"
    )
}

impl PciTransport {
    /// Open function `addr`; DMA memory is created from `dma` (sizes, limits) with the
    /// addressing the access mode needs.
    pub fn open(addr: PciAddress, dma: &DmaConfig) -> Result<PciTransport> {
        let function = PciFunction::probe(addr)?;
        let bdf = addr.to_string();
        if function.kind.is_none() {
            return Err(Error::Features(format!(
                "{bdf} is not a virtio function (vendor {:#06x}, device {:#06x}); list virtio functions with `vireo pci`",
                function.vendor, function.device
            )));
        }
        let gone = Arc::new(AtomicBool::new(false));
        let mut bars: Vec<Option<Arc<Bar>>> = vec![None; 6];
        let vfio_dev;
        let config;
        let mode;
        match &function.binding {
            Binding::Vfio => {
                let group = function.iommu_group.ok_or_else(|| {
                    Error::Features(format!("{bdf} is bound to vfio-pci but has no IOMMU group"))
                })?;
                let dev = vfio::VfioDevice::open(&bdf, group)?;
                mode = if dev.iommu {
                    AccessMode::VfioIommu
                } else {
                    AccessMode::VfioNoIommu
                };
                let cr = dev.region(vfio::CONFIG_REGION)?;
                config = ConfigSpace::File {
                    file: dev.device.clone(),
                    offset: cr.offset,
                };
                vfio_dev = Some(dev);
            }
            Binding::Uio => {
                mode = AccessMode::Uio;
                let path = function.sysfs_dir().join("config");
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| {
                        Error::io(format!("cannot open {} (root needed)", path.display()), e)
                    })?;
                config = ConfigSpace::File {
                    file: Arc::new(f),
                    offset: 0,
                };
                vfio_dev = None;
            }
            Binding::Kernel(drv) => {
                return Err(Error::Features(format!(
                    "{bdf} is bound to the kernel driver {drv}; {}",
                    bind_hint(&bdf)
                )))
            }
            Binding::None => {
                return Err(Error::Features(format!(
                    "{bdf} is bound to no driver; {}",
                    bind_hint(&bdf)
                )))
            }
        }
        // Memory space on (to reach the BARs); bus mastering stays off until the device
        // is reset, so a device left running by an earlier user cannot DMA to stale
        // addresses.
        config.command(CMD_MEMORY, CMD_BUS_MASTER)?;
        let mut image = [0u8; 256];
        config.read(0, &mut image)?;
        let caps = caps::parse(&image, &bdf)?;

        let mut open_bar = |index: u8| -> Result<Arc<Bar>> {
            if let Some(b) = &bars[index as usize] {
                return Ok(b.clone());
            }
            let bar = match &vfio_dev {
                Some(dev) => {
                    let r = dev.region(index as u32)?;
                    if r.size == 0 {
                        return Err(Error::Device(format!("{bdf}: BAR {index} does not exist")));
                    }
                    if r.mmap {
                        Bar::map(&dev.device, r.offset, r.size as usize, &gone)?
                    } else {
                        Bar::file(dev.device.clone(), r.offset, r.size)
                    }
                }
                None => {
                    let path = function.sysfs_dir().join(format!("resource{index}"));
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
                    let len = f
                        .metadata()
                        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?
                        .len();
                    Bar::map(&f, 0, len as usize, &gone)?
                }
            };
            let bar = Arc::new(bar);
            bars[index as usize] = Some(bar.clone());
            Ok(bar)
        };
        let mut window = |loc: caps::Location| -> Result<Window> {
            let bar = open_bar(loc.bar)?;
            if (loc.offset as u64)
                .checked_add(loc.length as u64)
                .is_none_or(|e| e > bar.len())
            {
                return Err(Error::Device(format!(
                    "{bdf}: a virtio structure at {:#x}+{:#x} lies outside BAR {} ({} bytes)",
                    loc.offset,
                    loc.length,
                    loc.bar,
                    bar.len()
                )));
            }
            Ok(Window {
                bar,
                base: loc.offset as u64,
                len: loc.length as u64,
            })
        };
        let common = window(caps.common)?;
        let notify = window(caps.notify)?;
        let device_cfg = caps.device.map(&mut window).transpose()?;

        let mut cfg = dma.clone();
        cfg.addressing = match mode {
            AccessMode::VfioIommu => Addressing::Linear { base: IOVA_BASE },
            AccessMode::VfioNoIommu | AccessMode::Uio => Addressing::Physical,
            AccessMode::VfioUser => Addressing::Virtual,
        };
        let mem = DmaMemory::new(cfg).map_err(|e| match e {
            Error::Physical(m) => Error::Physical(format!("{bdf} ({}): {m}", mode.name())),
            e => e,
        })?;
        let mapper: Option<Arc<dyn RegionListener>> = match (&vfio_dev, mode) {
            (Some(dev), AccessMode::VfioIommu) => {
                let m = dev.dma_mapper(gone.clone());
                let l: Arc<dyn RegionListener> = m.clone();
                for r in mem.add_listener(Arc::downgrade(&l)).iter() {
                    m.map(r)?;
                }
                Some(l)
            }
            _ => None,
        };
        let t = PciTransport {
            name: bdf,
            kind: function.kind,
            function: Some(function),
            mode,
            mem,
            common,
            notify,
            notify_mult: caps.notify_off_multiplier,
            device_cfg,
            config,
            gone,
            broken: Arc::new(AtomicBool::new(false)),
            resetting: Arc::new(AtomicBool::new(false)),
            vfio: Arc::new(Mutex::new(vfio_dev)),
            _mapper: mapper,
            bars: bars.into_iter().flatten().collect(),
            vfu: None,
            offered: 0,
            monitor: None,
            started: false,
        };
        t.bring_up()?;
        Ok(t)
    }

    /// Open the virtio PCI device a vfio-user server serves at `path`. Its DMA memory is
    /// `mem` (shared with other controllers; device addresses are virtual addresses),
    /// passed to the server region by region as files (`DMA_MAP`). Registers are
    /// reached with region messages, or mapped where the server offers sparse-mmap
    /// areas (SPDK offers the notification area, so doorbells are plain stores).
    pub fn open_vfio_user(
        path: &std::path::Path,
        mem: Arc<DmaMemory>,
        timeout: Duration,
    ) -> Result<PciTransport> {
        if mem.config().addressing != Addressing::Virtual {
            return Err(Error::Features(
                "a vfio-user device needs DMA memory addressed by virtual address".into(),
            ));
        }
        let client = Arc::new(vfio_user::VfuClient::connect(path, timeout)?);
        let name = path.display().to_string();
        let info = client.device_info()?;
        let config = ConfigSpace::Remote(client.clone());
        let mut image = [0u8; 256];
        config.read(0, &mut image)?;
        let id = |at: usize| u16::from_le_bytes([image[at], image[at + 1]]);
        let (vendor, device) = (id(0), id(2));
        let (kind, _) = sysfs::virtio_kind(vendor, device, id(0x2e));
        if kind.is_none() {
            return Err(Error::Features(format!(
                "the vfio-user device at {name} is not a virtio device (vendor {vendor:#06x}, device {device:#06x}); vireo drives virtio-blk and virtio-scsi"
            )));
        }
        if vfio_user::VfuClient::resettable(&info) {
            client.reset()?;
        }
        // vireo polls: INTx off too (no interrupt fds are set up; SPDK's endpoints would
        // otherwise try to raise INTx for every completion batch and log a failure).
        config.command(CMD_MEMORY | CMD_INTX_DISABLE, CMD_BUS_MASTER)?;
        let caps = caps::parse(&image, &name)?;
        let gone = Arc::new(AtomicBool::new(false));
        let mut regions: Vec<Option<vfio_user::RegionInfo>> = (0..6).map(|_| None).collect();
        let mut bars: Vec<Arc<Bar>> = Vec::new();
        let mut remote: Vec<Option<Arc<Bar>>> = vec![None; 6];
        let mut mapped: Vec<((u8, u64), Arc<Bar>)> = Vec::new();
        let page = 4096u64;
        let mut window = |loc: caps::Location| -> Result<Window> {
            let i = loc.bar as usize;
            if regions[i].is_none() {
                regions[i] = Some(client.region_info(loc.bar as u32)?);
            }
            let r = regions[i]
                .as_ref()
                .ok_or_else(|| Error::Device("no region".into()))?;
            let (off, len) = (loc.offset as u64, loc.length as u64);
            if r.size == 0 || off.checked_add(len).is_none_or(|e| e > r.size) {
                return Err(Error::Device(format!(
                    "{name}: a virtio structure at {off:#x}+{len:#x} lies outside BAR {} ({} bytes)",
                    loc.bar, r.size
                )));
            }
            // An area the server offers is mapped from the file offset `r.offset + ao`:
            // sums of the server's numbers, checked (a wrapped sum is no area).
            let area = r.sparse.iter().find_map(|&(ao, asz)| {
                let end = ao.checked_add(asz)?;
                let file_off = r.offset.checked_add(ao)?;
                (off >= ao && off + len <= end && file_off.is_multiple_of(page))
                    .then_some((ao, asz, file_off))
            });
            if let (Some((ao, asz, file_off)), Some(fd)) = (area, r.fd.as_ref()) {
                let bar = match mapped.iter().find(|(k, _)| *k == (loc.bar, ao)) {
                    Some((_, b)) => b.clone(),
                    None => {
                        let b = Arc::new(Bar::map(fd, file_off, asz as usize, &gone)?);
                        mapped.push(((loc.bar, ao), b.clone()));
                        bars.push(b.clone());
                        b
                    }
                };
                return Ok(Window {
                    bar,
                    base: off - ao,
                    len,
                });
            }
            let bar = match &remote[i] {
                Some(b) => b.clone(),
                None => {
                    let b = Arc::new(Bar::Remote {
                        client: client.clone(),
                        region: loc.bar as u32,
                        len: r.size,
                    });
                    remote[i] = Some(b.clone());
                    bars.push(b.clone());
                    b
                }
            };
            Ok(Window {
                bar,
                base: off,
                len,
            })
        };
        let common = window(caps.common)?;
        let notify = window(caps.notify)?;
        let device_cfg = caps.device.map(&mut window).transpose()?;
        let mapper = Arc::new(vfio_user::VfuDmaMapper {
            client: client.clone(),
        });
        let l: Arc<dyn RegionListener> = mapper.clone();
        for r in mem.add_listener(Arc::downgrade(&l)).iter() {
            client.dma_map(r)?;
        }
        let t = PciTransport {
            name,
            function: None,
            kind,
            mode: AccessMode::VfioUser,
            mem,
            common,
            notify,
            notify_mult: caps.notify_off_multiplier,
            device_cfg,
            config,
            gone,
            broken: Arc::new(AtomicBool::new(false)),
            resetting: Arc::new(AtomicBool::new(false)),
            vfio: Arc::new(Mutex::new(None)),
            _mapper: Some(l),
            bars,
            vfu: Some(client),
            offered: 0,
            monitor: None,
            started: false,
        };
        t.bring_up()?;
        Ok(t)
    }

    /// Reset the device, let it master the bus, acknowledge it.
    fn bring_up(&self) -> Result<()> {
        self.reset()?;
        self.config.command(CMD_BUS_MASTER, 0)?;
        self.set_status(S_ACKNOWLEDGE)?;
        self.set_status(S_ACKNOWLEDGE | S_DRIVER)
    }

    /// The function's description (`None` for a vfio-user device).
    pub fn function(&self) -> Option<&PciFunction> {
        self.function.as_ref()
    }

    /// The virtio device type, from the function's vendor and device ids.
    pub fn kind(&self) -> Option<VirtioKind> {
        self.kind
    }

    /// How the function is reached.
    pub fn mode(&self) -> AccessMode {
        self.mode
    }

    fn status(&self) -> Result<u8> {
        self.common.r8(DEVICE_STATUS)
    }

    fn set_status(&self, s: u8) -> Result<()> {
        self.common.w8(DEVICE_STATUS, s)
    }

    /// Reset the device and wait (at most a second) until it reads back 0.
    fn reset(&self) -> Result<()> {
        self.set_status(0)?;
        let t0 = Instant::now();
        loop {
            let s = self.status()?;
            if s == 0 {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(1) {
                return Err(Error::Device(format!(
                    "{}: device status is {s:#x} a second after reset (it must read 0)",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn fail_status(&self) {
        let s = self.status().unwrap_or(0);
        let _ = self.set_status(s | S_FAILED);
    }
}

/// Read `fields` ((offset, width)) of the structure in `w` into `buf`, each at its own
/// width (a 64-bit field as two 32-bit reads, low half first); fields past the end of
/// the structure read as zero.
fn read_fields(w: &Window, fields: &[(u32, u8)], buf: &mut [u8]) -> Result<()> {
    buf.fill(0);
    for &(off, width) in fields {
        let (o, n) = (off as usize, width as usize);
        let Some(dst) = buf.get_mut(o..o + n) else {
            return Err(Error::Device(format!(
                "configuration field at {off} (width {width}) outside the {} bytes read",
                buf.len()
            )));
        };
        // Past the device's structure: a field of a feature it does not have.
        if off as u64 + n as u64 > w.len {
            continue;
        }
        let off = off as u64;
        match width {
            1 => dst[0] = w.r8(off)?,
            2 => dst.copy_from_slice(&w.r16(off)?.to_le_bytes()),
            4 => dst.copy_from_slice(&w.r32(off)?.to_le_bytes()),
            8 => {
                dst[..4].copy_from_slice(&w.r32(off)?.to_le_bytes());
                dst[4..].copy_from_slice(&w.r32(off + 4)?.to_le_bytes());
            }
            _ => {
                return Err(Error::Device(format!(
                    "configuration field width {width} (1, 2, 4 or 8)"
                )))
            }
        }
    }
    Ok(())
}

impl Transport for PciTransport {
    fn describe(&self) -> String {
        match self.mode {
            AccessMode::VfioUser => format!("vfio-user {}", self.name),
            m => format!("virtio-pci {} ({})", self.name, m.name()),
        }
    }

    fn device_features(&mut self) -> Result<u64> {
        self.common.w32(DEVICE_FEATURE_SELECT, 0)?;
        let lo = self.common.r32(DEVICE_FEATURE)? as u64;
        self.common.w32(DEVICE_FEATURE_SELECT, 1)?;
        let hi = self.common.r32(DEVICE_FEATURE)? as u64;
        self.offered = lo | (hi << 32);
        Ok(self.offered)
    }

    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        if self.offered == 0 {
            self.device_features()?;
        }
        if self.mode == AccessMode::VfioIommu && self.offered & tf::ACCESS_PLATFORM == 0 {
            self.fail_status();
            return Err(Error::Features(format!(
                "{} is behind an IOMMU but does not offer VIRTIO_F_ACCESS_PLATFORM: it would bypass the IOMMU and DMA to guest-physical addresses. Give the device iommu_platform=on (QEMU), or bind it to uio_pci_generic / VFIO no-IOMMU",
                self.describe()
            )));
        }
        let f = features | (self.offered & PLATFORM_FEATURES);
        self.common.w32(DRIVER_FEATURE_SELECT, 0)?;
        self.common.w32(DRIVER_FEATURE, f as u32)?;
        self.common.w32(DRIVER_FEATURE_SELECT, 1)?;
        self.common.w32(DRIVER_FEATURE, (f >> 32) as u32)?;
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)?;
        if self.status()? & S_FEATURES_OK == 0 {
            self.fail_status();
            return Err(Error::Features(format!(
                "{} refused the features {f:#x} (FEATURES_OK not kept)",
                self.describe()
            )));
        }
        // Config vector off: vireo polls.
        self.common.w16(CONFIG_MSIX_VECTOR, NO_VECTOR)?;
        Ok(())
    }

    fn max_queues(&mut self) -> Result<Option<u16>> {
        Ok(Some(self.common.r16(NUM_QUEUES)?))
    }

    fn max_queue_size(&mut self, index: u16) -> Result<Option<u16>> {
        self.common.w16(QUEUE_SELECT, index)?;
        Ok(Some(self.common.r16(QUEUE_SIZE)?))
    }

    fn has_config(&self) -> bool {
        self.device_cfg.is_some()
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        let w = self.device_cfg.clone().ok_or_else(|| {
            Error::Features(format!("{} has no device configuration", self.describe()))
        })?;
        // Re-read until the generation is stable (the device may change the
        // configuration between accesses).
        for _ in 0..16 {
            let g0 = self.common.r8(CONFIG_GENERATION)?;
            let mut i = 0usize;
            while i < buf.len() {
                let off = offset as u64 + i as u64;
                let left = buf.len() - i;
                if off.is_multiple_of(4) && left >= 4 {
                    buf[i..i + 4].copy_from_slice(&w.r32(off)?.to_le_bytes());
                    i += 4;
                } else if off.is_multiple_of(2) && left >= 2 {
                    buf[i..i + 2].copy_from_slice(&w.r16(off)?.to_le_bytes());
                    i += 2;
                } else {
                    buf[i] = w.r8(off)?;
                    i += 1;
                }
            }
            if self.common.r8(CONFIG_GENERATION)? == g0 {
                return Ok(());
            }
        }
        Err(Error::Device(format!(
            "{}: configuration generation kept changing during 16 reads",
            self.describe()
        )))
    }

    fn read_config_fields(&mut self, fields: &[(u32, u8)], buf: &mut [u8]) -> Result<()> {
        let w = self.device_cfg.clone().ok_or_else(|| {
            Error::Features(format!("{} has no device configuration", self.describe()))
        })?;
        for _ in 0..16 {
            let g0 = self.common.r8(CONFIG_GENERATION)?;
            read_fields(&w, fields, buf)?;
            if self.common.r8(CONFIG_GENERATION)? == g0 {
                return Ok(());
            }
        }
        Err(Error::Device(format!(
            "{}: configuration generation kept changing during 16 reads",
            self.describe()
        )))
    }

    fn setup_queue(&mut self, index: u16, layout: &RingLayout) -> Result<Notifier> {
        self.common.w16(QUEUE_SELECT, index)?;
        let max = self.common.r16(QUEUE_SIZE)?;
        if max == 0 {
            return Err(Error::InvalidQueue(format!(
                "{}: queue {index} does not exist (size 0)",
                self.describe()
            )));
        }
        if layout.size > max {
            return Err(Error::QueueSizeRefused {
                index,
                size: layout.size,
                cause: format!("the device's maximum is {max}"),
            });
        }
        self.common.w16(QUEUE_SIZE, layout.size)?;
        self.common.w16(QUEUE_MSIX_VECTOR, NO_VECTOR)?;
        self.common.w64(QUEUE_DESC, layout.desc_iova)?;
        self.common.w64(QUEUE_DRIVER, layout.avail_iova)?;
        self.common.w64(QUEUE_DEVICE, layout.used_iova)?;
        let off = self.common.r16(QUEUE_NOTIFY_OFF)? as u64 * self.notify_mult as u64;
        // The doorbell must lie inside the notification structure.
        self.notify.at(off, 2).map_err(|_| {
            Error::Device(format!(
                "{}: queue {index}'s doorbell at {off:#x} lies outside the notification area ({} bytes)",
                self.describe(),
                self.notify.len
            ))
        })?;
        self.common.w16(QUEUE_ENABLE, 1)?;
        Ok(Notifier::Kick(Arc::new(Doorbell {
            window: self.notify.clone(),
            off,
        })))
    }

    fn start(&mut self) -> Result<()> {
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)?;
        let s = self.status()?;
        if s & S_NEEDS_RESET != 0 || s & S_DRIVER_OK == 0 {
            return Err(Error::Device(format!(
                "{}: device status {s:#x} after DRIVER_OK",
                self.describe()
            )));
        }
        self.started = true;
        let stop = Arc::new(AtomicBool::new(false));
        let m = Monitor {
            common: self.common.clone(),
            gone: self.gone.clone(),
            broken: self.broken.clone(),
            resetting: self.resetting.clone(),
            stop: stop.clone(),
            vfio: self.vfio.clone(),
            bars: self.bars.clone(),
            config: self.config.clone(),
            name: self.describe(),
        };
        let h = std::thread::Builder::new()
            .name("vireo-pci-mon".into())
            .spawn(move || m.run())
            .map_err(|e| Error::io("cannot start the PCI monitor thread", e))?;
        self.monitor = Some((stop, h));
        Ok(())
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some((stop, h)) = self.monitor.take() {
            stop.store(true, Ordering::Release);
            let _ = h.join();
        }
        if self.gone.load(Ordering::Acquire) {
            return Ok(());
        }
        self.reset()
    }

    fn memory(&self) -> &Arc<DmaMemory> {
        &self.mem
    }

    fn broken_flag(&self) -> Arc<AtomicBool> {
        self.broken.clone()
    }

    fn abort(&self) {
        tracing::warn!(
            "{}: resetting a device that stopped answering",
            self.describe()
        );
        self.resetting.store(true, Ordering::Release);
        // Reset it and turn bus mastering off: it stops all DMA before its requests
        // fail.
        let _ = self.set_status(0);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(100) {
            match self.status() {
                Ok(0) | Err(_) => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let _ = self.config.command(0, CMD_BUS_MASTER);
        self.broken.store(true, Ordering::Release);
    }

    fn can_reinit(&self) -> bool {
        true
    }

    fn reopener(&self) -> Option<crate::transport::Reopen> {
        let client = self.vfu.as_ref()?;
        let (path, mem) = (client.path().to_path_buf(), self.mem.clone());
        Some(Box::new(move |timeout: Duration| {
            Ok(Box::new(PciTransport::open_vfio_user(
                &path,
                mem.clone(),
                timeout.min(vfio_user::REPLY_TIMEOUT),
            )?) as Box<dyn Transport>)
        }))
    }

    fn reinit(&mut self) -> Result<()> {
        if let Some((stop, h)) = self.monitor.take() {
            stop.store(true, Ordering::Release);
            let _ = h.join();
        }
        if self.gone.load(Ordering::Acquire) {
            return Err(Error::Device(format!(
                "{}: the function is gone",
                self.describe()
            )));
        }
        self.bring_up()?;
        self.offered = 0;
        self.started = false;
        self.broken = Arc::new(AtomicBool::new(false));
        self.resetting.store(false, Ordering::Release);
        Ok(())
    }
}

impl Drop for PciTransport {
    fn drop(&mut self) {
        let _ = self.shutdown();
        // Bus mastering off: the device must not touch memory that is about to be freed.
        if !self.gone.load(Ordering::Acquire) {
            let _ = self.config.command(0, CMD_BUS_MASTER);
        }
        self.bars.clear();
    }
}

/// Watches the function: the kernel asking for it back (VFIO request), a device that
/// needs a reset, or one that vanished (status reads 0 or all ones).
struct Monitor {
    common: Window,
    gone: Arc<AtomicBool>,
    broken: Arc<AtomicBool>,
    resetting: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    vfio: Arc<Mutex<Option<vfio::VfioDevice>>>,
    bars: Vec<Arc<Bar>>,
    config: ConfigSpace,
    name: String,
}

impl Monitor {
    /// Reset the device (waiting at most 100 ms for status 0) and turn bus mastering off.
    fn quiesce(&self) {
        let _ = self.common.w8(DEVICE_STATUS, 0);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(100) {
            match self.common.r8(DEVICE_STATUS) {
                Ok(0) | Err(_) => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let _ = self.config.command(0, CMD_BUS_MASTER);
    }

    /// The kernel waits for every user of a VFIO device to let go before it completes a
    /// removal: revoke the BAR mappings and the device descriptor now, whoever still
    /// holds the transport's queues (they see a gone device and fail their I/O).
    fn release(&self) {
        for b in &self.bars {
            b.revoke();
        }
        if let ConfigSpace::File { file, .. } = &self.config {
            bar::revoke_file(file);
        }
        if let Some(dev) = self.vfio.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar::revoke_file(&dev.device);
        }
        tracing::warn!(transport = %self.name, "device released to the kernel");
    }

    fn run(self) {
        let mut released = false;
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
            // The kernel's request for the device back (hot-unplug, unbind) is answered
            // whatever state the device is in: the unbinding thread waits until the
            // device is released, and asks again only every 10 s.
            let requested = self
                .vfio
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .and_then(|d| d.request.as_ref())
                .is_some_and(|e| e.read().is_ok());
            let gone = self.gone.load(Ordering::Acquire);
            if requested && (gone || self.resetting.load(Ordering::Acquire)) {
                tracing::error!(transport = %self.name, "the kernel asks for the device back (hot-unplug or unbind); failing its I/O");
                self.quiesce();
                self.gone.store(true, Ordering::Release);
                self.broken.store(true, Ordering::Release);
                if !released {
                    released = true;
                    self.release();
                }
                continue;
            }
            if gone {
                // (Also raised by the SIGBUS guard of a vanished BAR.)
                self.broken.store(true, Ordering::Release);
                continue;
            }
            if self.resetting.load(Ordering::Acquire) {
                continue;
            }
            let why = if requested {
                Some("the kernel asks for the device back (hot-unplug or unbind)".to_string())
            } else {
                match self.common.r8(DEVICE_STATUS) {
                    Err(e) => Some(format!("status register unreadable: {e}")),
                    Ok(0xff) => Some("status reads all ones: the function is gone".into()),
                    Ok(s) if s & S_NEEDS_RESET != 0 => {
                        Some("the device needs a reset (DEVICE_NEEDS_RESET)".into())
                    }
                    Ok(s) if s & S_DRIVER_OK == 0 => Some(format!(
                        "the device was reset under the driver (status {s:#x})"
                    )),
                    Ok(_) => None,
                }
            };
            if self.resetting.load(Ordering::Acquire) {
                // vireo reset the device meanwhile (the status read may have seen it).
                continue;
            }
            if let Some(why) = why {
                tracing::error!(transport = %self.name, "{why}; failing its I/O");
                // Stop the device's DMA before its I/O fails (callers reuse their
                // buffers then): reset it and turn bus mastering off. Harmless for a
                // function that is gone.
                self.quiesce();
                self.gone.store(true, Ordering::Release);
                self.broken.store(true, Ordering::Release);
                if requested && !released {
                    released = true;
                    self.release();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A device configuration window of `len` bytes over a file holding `bytes`.
    fn window(bytes: &[u8], len: u64) -> Window {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vireo-cfg-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f.write_all(bytes).unwrap();
        Window {
            bar: Arc::new(Bar::file(Arc::new(f), 0, bytes.len() as u64)),
            base: 0,
            len,
        }
    }

    /// Each field lands where it belongs, and a structure shorter than the fields asked
    /// for (a device without the later features) reads as zero past its end instead of
    /// failing the attach.
    #[test]
    fn config_fields_are_read_in_place_and_zero_past_the_structure() {
        let bytes: Vec<u8> = (1..=64).collect();
        let fields = [(0, 8), (8, 4), (12, 2), (14, 1), (15, 1), (16, 4), (20, 4)];
        let mut buf = [0xeeu8; 24];
        read_fields(&window(&bytes, 64), &fields, &mut buf).unwrap();
        assert_eq!(&buf[..], &bytes[..24]);
        let mut buf = [0xeeu8; 24];
        read_fields(&window(&bytes, 16), &fields, &mut buf).unwrap();
        assert_eq!(&buf[..16], &bytes[..16]);
        assert_eq!(&buf[16..], &[0u8; 8], "past a 16-byte structure");
        assert!(read_fields(&window(&bytes, 64), &[(20, 8)], &mut [0u8; 24]).is_err());
        assert!(read_fields(&window(&bytes, 64), &[(0, 3)], &mut [0u8; 24]).is_err());
    }
}
