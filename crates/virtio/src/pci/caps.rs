//! virtio-pci capabilities in PCI configuration space (virtio 1.2 section 4.1.4).
//!
//! Pure parsing of a configuration-space image: a device is untrusted, so every
//! pointer, length and BAR number is checked before the transport maps anything.

use crate::error::{Error, Result};

/// PCI capability id of vendor-specific capabilities (virtio uses these).
const CAP_ID_VENDOR: u8 = 0x09;
/// Status register bit: the function has a capability list.
const STATUS_CAP_LIST: u16 = 1 << 4;

/// `cfg_type` values of `struct virtio_pci_cap`.
pub const COMMON_CFG: u8 = 1;
/// Notifications.
pub const NOTIFY_CFG: u8 = 2;
/// Interrupt status.
pub const ISR_CFG: u8 = 3;
/// Device-specific configuration.
pub const DEVICE_CFG: u8 = 4;

/// Where one virtio structure lives: BAR, offset and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// BAR index (0..=5).
    pub bar: u8,
    /// Offset within the BAR.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
}

impl Location {
    /// Whether `[off, off+len)` lies within the structure.
    pub fn covers(&self, off: u64, len: u64) -> bool {
        off.checked_add(len)
            .is_some_and(|end| end <= self.length as u64)
    }
}

/// The virtio structures of a modern (or transitional) virtio-pci function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Common configuration.
    pub common: Location,
    /// Notification area.
    pub notify: Location,
    /// Multiplier of `queue_notify_off` within the notification area.
    pub notify_off_multiplier: u32,
    /// ISR status (unused by a polled driver, but required by the spec).
    pub isr: Option<Location>,
    /// Device-specific configuration, if the device has one.
    pub device: Option<Location>,
}

fn u16_at(cfg: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(cfg.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(cfg: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(cfg.get(off..off + 4)?.try_into().ok()?))
}

/// Parse the capability list of a configuration-space image (at least 256 bytes).
/// The first capability of each type that the driver can use is taken, as the spec
/// asks; a function without common/notify capabilities is legacy-only.
pub fn parse(cfg: &[u8], bdf: &str) -> Result<VirtioCaps> {
    let bad = |why: String| Error::Device(format!("{bdf}: {why}"));
    let status = u16_at(cfg, 0x06).ok_or_else(|| bad("configuration space too short".into()))?;
    let legacy = || {
        Error::Features(format!(
            "{bdf} is a legacy-only virtio device (no virtio 1.x capabilities); vireo drives the modern interface: give the device disable-legacy=off/on with virtio 1.x (QEMU: any machine type since 2.7), or use a modern device"
        ))
    };
    if status & STATUS_CAP_LIST == 0 {
        return Err(legacy());
    }
    let mut ptr = cfg.get(0x34).copied().unwrap_or(0) as usize & !3;
    let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
    let mut mult = 0u32;
    // At most 48 capabilities fit in 192 bytes: a longer walk is a loop.
    for _ in 0..48 {
        if ptr == 0 {
            break;
        }
        if ptr < 0x40 || ptr + 2 > cfg.len() {
            return Err(bad(format!(
                "capability pointer {ptr:#x} outside configuration space"
            )));
        }
        let id = cfg[ptr];
        let next = cfg[ptr + 1] as usize & !3;
        let cap_len = cfg.get(ptr + 2).copied().unwrap_or(0) as usize;
        // Only virtio's own capabilities are read past their header (other kinds, a PM
        // capability at 0xf8 say, may sit in the last bytes).
        if id == CAP_ID_VENDOR && cap_len >= 16 && ptr + 16 > cfg.len() {
            return Err(bad(format!(
                "virtio capability at {ptr:#x} runs past the configuration space"
            )));
        }
        if id == CAP_ID_VENDOR && cap_len >= 16 {
            let cfg_type = cfg[ptr + 3];
            let bar = cfg[ptr + 4];
            let loc = Location {
                bar,
                offset: u32_at(cfg, ptr + 8).unwrap_or(0),
                length: u32_at(cfg, ptr + 12).unwrap_or(0),
            };
            // BARs 0..=5 only; other values are reserved and must be ignored.
            if bar <= 5 {
                match cfg_type {
                    COMMON_CFG if common.is_none() => common = Some(loc),
                    NOTIFY_CFG if notify.is_none() && cap_len >= 20 => {
                        mult = u32_at(cfg, ptr + 16).ok_or_else(|| {
                            bad(format!(
                                "notification capability at {ptr:#x} runs past the configuration space"
                            ))
                        })?;
                        notify = Some(loc);
                    }
                    ISR_CFG if isr.is_none() => isr = Some(loc),
                    DEVICE_CFG if device.is_none() => device = Some(loc),
                    _ => {}
                }
            }
        }
        ptr = next;
    }
    let (Some(common), Some(notify)) = (common, notify) else {
        return Err(legacy());
    };
    if common.length < 0x38 {
        return Err(bad(format!(
            "common configuration is {} bytes, the spec's layout needs 56",
            common.length
        )));
    }
    // Virtio 1.2 4.1.4.3 and 4.1.4.4: the registers' alignment, which every access
    // relies on; a doorbell is a 16-bit store at notify offset + queue_notify_off x
    // multiplier.
    if !common.offset.is_multiple_of(4) || !notify.offset.is_multiple_of(2) {
        return Err(bad(format!(
            "misaligned virtio structures: common configuration at {:#x} (4-byte aligned in the spec), notifications at {:#x} (2-byte aligned)",
            common.offset, notify.offset
        )));
    }
    if mult != 0 && (mult < 2 || !mult.is_power_of_two()) {
        return Err(bad(format!(
            "notify_off_multiplier {mult} is neither 0 nor an even power of 2 (virtio 1.2 4.1.4.4)"
        )));
    }
    // The driver writes the common configuration, the doorbells and the device
    // configuration: none may alias another (a doorbell that lands on device_status
    // resets the device).
    let written = [
        ("common configuration", Some(common)),
        ("notifications", Some(notify)),
        ("device configuration", device),
    ];
    for (i, (na, a)) in written.iter().enumerate() {
        for (nb, b) in &written[i + 1..] {
            if let (Some(a), Some(b)) = (a, b) {
                let (a0, a1) = (a.offset as u64, a.offset as u64 + a.length as u64);
                let (b0, b1) = (b.offset as u64, b.offset as u64 + b.length as u64);
                if a.bar == b.bar && a0 < b1 && b0 < a1 {
                    return Err(bad(format!(
                        "the {na} ({:#x}+{:#x}) and the {nb} ({:#x}+{:#x}) overlap in BAR {}",
                        a.offset, a.length, b.offset, b.length, a.bar
                    )));
                }
            }
        }
    }
    Ok(VirtioCaps {
        common,
        notify,
        notify_off_multiplier: mult,
        isr,
        device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration space with `caps` = (cfg_type, bar, offset, length, extra).
    fn image(caps: &[(u8, u8, u32, u32, Option<u32>)]) -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0x06] = STATUS_CAP_LIST as u8;
        let mut at = 0x40usize;
        c[0x34] = at as u8;
        for (i, &(t, bar, off, len, extra)) in caps.iter().enumerate() {
            let size = if extra.is_some() { 20 } else { 16 };
            c[at] = CAP_ID_VENDOR;
            let next = if i + 1 == caps.len() { 0 } else { at + 20 };
            c[at + 1] = next as u8;
            c[at + 2] = size as u8;
            c[at + 3] = t;
            c[at + 4] = bar;
            c[at + 8..at + 12].copy_from_slice(&off.to_le_bytes());
            c[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
            if let Some(x) = extra {
                c[at + 16..at + 20].copy_from_slice(&x.to_le_bytes());
            }
            at += 20;
        }
        c
    }

    #[test]
    fn qemu_layout_is_parsed() {
        let c = image(&[
            (COMMON_CFG, 4, 0, 0x1000, None),
            (ISR_CFG, 4, 0x1000, 0x1000, None),
            (DEVICE_CFG, 4, 0x2000, 0x1000, None),
            (NOTIFY_CFG, 4, 0x3000, 0x1000, Some(4)),
            (5, 0, 0, 0, None),
        ]);
        let caps = parse(&c, "0000:00:04.0").unwrap();
        assert_eq!(caps.common.bar, 4);
        assert_eq!(caps.notify.offset, 0x3000);
        assert_eq!(caps.notify_off_multiplier, 4);
        assert_eq!(caps.device.unwrap().offset, 0x2000);
        assert!(caps.isr.is_some());
    }

    #[test]
    fn legacy_only_devices_are_named() {
        let mut c = vec![0u8; 256];
        c[0x06] = 0;
        let e = parse(&c, "0000:00:05.0").unwrap_err().to_string();
        assert!(e.contains("legacy-only"), "{e}");
        let c = image(&[(ISR_CFG, 0, 0, 4, None)]);
        assert!(parse(&c, "x")
            .unwrap_err()
            .to_string()
            .contains("legacy-only"));
    }

    #[test]
    fn reserved_bars_and_duplicates_are_skipped() {
        let c = image(&[
            (COMMON_CFG, 7, 0, 0x1000, None),
            (COMMON_CFG, 2, 0x100, 0x1000, None),
            (COMMON_CFG, 3, 0x200, 0x1000, None),
            (NOTIFY_CFG, 2, 0x3000, 0x1000, Some(0)),
        ]);
        let caps = parse(&c, "x").unwrap();
        assert_eq!(
            caps.common.bar, 2,
            "BAR 7 is reserved, then the first usable wins"
        );
        assert_eq!(caps.common.offset, 0x100);
    }

    #[test]
    fn hostile_lists_are_refused_not_followed_forever() {
        // A capability pointing at itself.
        let mut c = image(&[(ISR_CFG, 0, 0, 4, None)]);
        c[0x41] = 0x40;
        assert!(parse(&c, "x").is_err());
        // A pointer past the end.
        let mut c = image(&[(ISR_CFG, 0, 0, 4, None)]);
        c[0x34] = 0xfc;
        c[0xfc] = CAP_ID_VENDOR;
        c[0xfe] = 16;
        assert!(parse(&c, "x").unwrap_err().to_string().contains("past"));
        // A non-virtio capability in the last bytes is fine (then legacy-only here).
        let mut c = image(&[(ISR_CFG, 0, 0, 4, None)]);
        c[0x34] = 0xf8;
        c[0xf8] = 0x01; // PM
        c[0xf9] = 0;
        assert!(parse(&c, "x")
            .unwrap_err()
            .to_string()
            .contains("legacy-only"));
        // A common configuration too short for the registers.
        let c = image(&[
            (COMMON_CFG, 4, 0, 16, None),
            (NOTIFY_CFG, 4, 0x3000, 0x1000, Some(4)),
        ]);
        assert!(parse(&c, "x").unwrap_err().to_string().contains("56"));
    }

    #[test]
    fn misaligned_or_overlapping_structures_are_refused() {
        let err = |caps: &[(u8, u8, u32, u32, Option<u32>)]| {
            parse(&image(caps), "x").unwrap_err().to_string()
        };
        // Odd multiplier, and one that is not a power of 2.
        for m in [1, 3, 6] {
            let e = err(&[
                (COMMON_CFG, 4, 0, 0x1000, None),
                (NOTIFY_CFG, 4, 0x3000, 0x1000, Some(m)),
            ]);
            assert!(e.contains("notify_off_multiplier"), "{e}");
        }
        // Doorbells at an odd offset; a common configuration off 4 bytes.
        let e = err(&[
            (COMMON_CFG, 4, 0, 0x1000, None),
            (NOTIFY_CFG, 4, 0x3001, 0x1000, Some(4)),
        ]);
        assert!(e.contains("misaligned"), "{e}");
        let e = err(&[
            (COMMON_CFG, 4, 2, 0x1000, None),
            (NOTIFY_CFG, 4, 0x3000, 0x1000, Some(4)),
        ]);
        assert!(e.contains("misaligned"), "{e}");
        // Doorbells over the common configuration, and a device configuration inside it.
        let e = err(&[
            (COMMON_CFG, 4, 0, 0x1000, None),
            (NOTIFY_CFG, 4, 0, 0x1000, Some(2)),
        ]);
        assert!(e.contains("overlap"), "{e}");
        let e = err(&[
            (COMMON_CFG, 4, 0, 0x1000, None),
            (DEVICE_CFG, 4, 0xf00, 0x100, None),
            (NOTIFY_CFG, 4, 0x3000, 0x1000, Some(4)),
        ]);
        assert!(e.contains("overlap"), "{e}");
        // The same windows in different BARs are fine, and so is a multiplier of 0.
        let c = image(&[
            (COMMON_CFG, 4, 0, 0x1000, None),
            (NOTIFY_CFG, 2, 0, 0x1000, Some(0)),
        ]);
        assert!(parse(&c, "x").is_ok());
        // A notification capability whose multiplier lies past the configuration space.
        let mut c = image(&[(COMMON_CFG, 4, 0, 0x1000, None)]);
        c[0x41] = 0xf0;
        c[0xf0] = CAP_ID_VENDOR;
        c[0xf2] = 20;
        c[0xf3] = NOTIFY_CFG;
        c[0xf4] = 4;
        let e = parse(&c, "x").unwrap_err().to_string();
        assert!(e.contains("past"), "{e}");
    }
}
