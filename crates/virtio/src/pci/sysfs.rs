//! PCI functions as sysfs shows them: addresses, ids, driver binding, IOMMU group.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};

/// virtio's PCI vendor id.
pub const VIRTIO_VENDOR: u16 = 0x1af4;

/// A PCI address, `domain:bus:device.function` (`0000:00:04.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus.
    pub bus: u8,
    /// Device (0..=31).
    pub device: u8,
    /// Function (0..=7).
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = Error;

    /// `0000:00:04.0`, or `00:04.0` in domain 0.
    fn from_str(s: &str) -> Result<PciAddress> {
        let bad = || {
            Error::Features(format!(
                "\"{s}\" is not a PCI address; write domain:bus:device.function in hex, e.g. 0000:00:04.0"
            ))
        };
        let (rest, func) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, dev) = match parts.as_slice() {
            [d, b, v] => (*d, *b, *v),
            [b, v] => ("0", *b, *v),
            _ => return Err(bad()),
        };
        let hex = |t: &str, max: u32| {
            u32::from_str_radix(t, 16)
                .ok()
                .filter(|v| *v <= max && !t.is_empty() && t.len() <= 8)
        };
        Ok(PciAddress {
            domain: hex(domain, 0xffff_ffff).ok_or_else(bad)?,
            bus: hex(bus, 0xff).ok_or_else(bad)? as u8,
            device: hex(dev, 0x1f).ok_or_else(bad)? as u8,
            function: hex(func, 7).ok_or_else(bad)? as u8,
        })
    }
}

/// The virtio device type a function implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioKind {
    /// virtio-blk (device id 2).
    Blk,
    /// virtio-scsi (device id 8).
    Scsi,
    /// Another virtio device (its virtio device id).
    Other(u16),
}

impl VirtioKind {
    fn from_id(id: u16) -> VirtioKind {
        match id {
            2 => VirtioKind::Blk,
            8 => VirtioKind::Scsi,
            n => VirtioKind::Other(n),
        }
    }

    /// `blk`, `scsi` or `virtio-N`.
    pub fn name(&self) -> String {
        match self {
            VirtioKind::Blk => "blk".into(),
            VirtioKind::Scsi => "scsi".into(),
            VirtioKind::Other(n) => format!("virtio-{n}"),
        }
    }
}

/// What a function is bound to, as far as vireo is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// vfio-pci: driven through VFIO (with an IOMMU, or in no-IOMMU mode).
    Vfio,
    /// uio_pci_generic: BARs through sysfs, physical addresses.
    Uio,
    /// Another kernel driver (virtio-pci: the kernel drives it).
    Kernel(String),
    /// No driver.
    None,
}

/// One PCI function of interest.
#[derive(Debug, Clone)]
pub struct PciFunction {
    /// Its address.
    pub addr: PciAddress,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Subsystem device id (the virtio type of transitional devices).
    pub subsystem_device: u16,
    /// The virtio type, if it is a virtio function.
    pub kind: Option<VirtioKind>,
    /// Whether it is transitional (a legacy interface beside the modern one).
    pub transitional: bool,
    /// The driver it is bound to.
    pub binding: Binding,
    /// Its IOMMU group, if any.
    pub iommu_group: Option<u32>,
}

/// The virtio type of a function with these ids (`None`: not virtio) and whether it is
/// transitional.
pub fn virtio_kind(vendor: u16, device: u16, subsystem_device: u16) -> (Option<VirtioKind>, bool) {
    if vendor != VIRTIO_VENDOR {
        (None, false)
    } else if (0x1000..=0x103f).contains(&device) {
        (Some(VirtioKind::from_id(subsystem_device)), true)
    } else if (0x1040..=0x107f).contains(&device) {
        (Some(VirtioKind::from_id(device - 0x1040)), false)
    } else {
        (None, false)
    }
}

/// The sysfs directory of PCI functions (overridable for tests).
pub fn sysfs_root() -> PathBuf {
    std::env::var_os("VIREO_SYSFS_PCI")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/bus/pci/devices"))
}

fn read_hex(dir: &Path, name: &str) -> Option<u16> {
    let s = std::fs::read_to_string(dir.join(name)).ok()?;
    u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

fn link_name(p: &Path) -> Option<String> {
    std::fs::read_link(p)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

impl PciFunction {
    /// Read a function's description from sysfs.
    pub fn probe(addr: PciAddress) -> Result<PciFunction> {
        let dir = sysfs_root().join(addr.to_string());
        if !dir.exists() {
            return Err(Error::Features(format!(
                "no PCI function {addr} ({} does not exist); list candidates with `vireo pci`",
                dir.display()
            )));
        }
        let vendor = read_hex(&dir, "vendor").unwrap_or(0);
        let device = read_hex(&dir, "device").unwrap_or(0);
        let subsystem_device = read_hex(&dir, "subsystem_device").unwrap_or(0);
        let (kind, transitional) = virtio_kind(vendor, device, subsystem_device);
        let binding = match link_name(&dir.join("driver")).as_deref() {
            Some("vfio-pci") => Binding::Vfio,
            Some("uio_pci_generic") => Binding::Uio,
            Some(other) => Binding::Kernel(other.to_string()),
            None => Binding::None,
        };
        let iommu_group = link_name(&dir.join("iommu_group")).and_then(|n| n.parse().ok());
        Ok(PciFunction {
            addr,
            vendor,
            device,
            subsystem_device,
            kind,
            transitional,
            binding,
            iommu_group,
        })
    }

    /// The sysfs directory of the function.
    pub fn sysfs_dir(&self) -> PathBuf {
        sysfs_root().join(self.addr.to_string())
    }
}

/// Every virtio PCI function, sorted by address.
pub fn virtio_functions() -> Result<Vec<PciFunction>> {
    let root = sysfs_root();
    let rd = match std::fs::read_dir(&root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("cannot list {}", root.display()), e)),
    };
    let mut v = Vec::new();
    for e in rd.flatten() {
        let Ok(addr) = e.file_name().to_string_lossy().parse::<PciAddress>() else {
            continue;
        };
        if let Ok(f) = PciFunction::probe(addr) {
            if f.kind.is_some() {
                v.push(f);
            }
        }
    }
    v.sort_by_key(|f| f.addr);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        let a: PciAddress = "0000:00:04.0".parse().unwrap();
        assert_eq!(a.to_string(), "0000:00:04.0");
        let b: PciAddress = "3:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "0000:03:1f.7");
        let c: PciAddress = "10000:ff:00.1".parse().unwrap();
        assert_eq!(c.domain, 0x10000);
        for bad in [
            "",
            "00:04",
            "0000:00:20.0",
            "0000:00:04.8",
            "x:00:04.0",
            "0:0:0:0.0",
            "0000:100:00.0",
        ] {
            let e = bad.parse::<PciAddress>().unwrap_err().to_string();
            assert!(e.contains("0000:00:04.0"), "{bad}: {e}");
        }
    }
}
