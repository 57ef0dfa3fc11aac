//! Typed attach parameters and configuration calls. The SPDK JSON format that carries
//! them is the `vireo` binary's business (its `config` module).

use std::time::Duration;

use serde::Serialize;

use crate::error::BdevError;

/// Default number of request queues.
pub const DEFAULT_VQ_COUNT: u16 = 1;
/// Default descriptors per queue: QEMU's size for vhost-user devices, accepted by every
/// back-end we test (vhost-device-scsi allows at most 128).
pub const DEFAULT_VQ_SIZE: u16 = 128;

/// How the controller is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrType {
    /// vhost-user socket.
    User,
    /// virtio-pci function.
    Pci,
    /// vDPA device through the kernel's vhost-vdpa (`/dev/vhost-vdpa-N`).
    Vdpa,
    /// The kernel's vhost-scsi (`/dev/vhost-scsi`, a LIO target named by `wwpn`).
    #[serde(rename = "vhost-kernel")]
    VhostKernel,
    /// A virtio PCI device served over a vfio-user socket (SPDK's spelling `vfio-user`).
    #[serde(rename = "vfio-user")]
    VfioUser,
}

impl TrType {
    /// Its name in a configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            TrType::User => "user",
            TrType::Pci => "pci",
            TrType::Vdpa => "vdpa",
            TrType::VhostKernel => "vhost-kernel",
            TrType::VfioUser => "vfio-user",
        }
    }
}

/// Which virtio device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DevType {
    /// virtio-scsi.
    Scsi,
    /// virtio-blk.
    Blk,
}

/// Whether a controller's queues are packed rings (`packed_ring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PackedRing {
    /// Packed rings when the device offers `VIRTIO_F_RING_PACKED`, else split rings.
    #[default]
    Auto,
    /// Packed rings; a device that does not offer them is refused.
    On,
    /// Split rings.
    Off,
}

impl PackedRing {
    /// The value of a configuration's `packed_ring` (`auto`, `on`, `off`).
    pub fn parse(s: &str) -> Option<PackedRing> {
        match s {
            "auto" => Some(PackedRing::Auto),
            "on" => Some(PackedRing::On),
            "off" => Some(PackedRing::Off),
            _ => None,
        }
    }

    /// Its name in a configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            PackedRing::Auto => "auto",
            PackedRing::On => "on",
            PackedRing::Off => "off",
        }
    }

    fn is_auto(&self) -> bool {
        *self == PackedRing::Auto
    }

    /// The ring feature to ask a device that offers `offered` for:
    /// `VIRTIO_F_RING_PACKED` or nothing; `Err` says why the device is refused (`on`
    /// and not offered).
    pub fn feature(self, offered: u64) -> Result<u64, String> {
        let packed = vireo_virtio::features::transport::RING_PACKED;
        match self {
            PackedRing::Off => Ok(0),
            PackedRing::Auto => Ok(offered & packed),
            PackedRing::On if offered & packed != 0 => Ok(packed),
            PackedRing::On => Err(format!(
                "\"packed_ring\" is \"on\" but the device does not offer VIRTIO_F_RING_PACKED (offered features {offered:#x}); use \"auto\" or \"off\" for split rings"
            )),
        }
    }
}

/// Parameters of `bdev_virtio_attach_controller`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachParams {
    /// Controller name (bdev names derive from it).
    pub name: String,
    /// Transport.
    pub trtype: TrType,
    /// Socket path or PCI address.
    pub traddr: String,
    /// Device type.
    pub dev_type: DevType,
    /// Request queues.
    pub vq_count: u16,
    /// Descriptors per queue.
    pub vq_size: u16,
    /// Default time limit of every I/O on the controller's bdevs (`io_timeout`, seconds
    /// in JSON; `None`/0: none). An I/O past it completes with a timeout error and the
    /// controller escalates (see `IoRequest::timeout`).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "seconds")]
    pub io_timeout: Option<Duration>,
    /// How long I/O waits while vireo reconnects to a vhost-user back-end that went
    /// away (`reconnect_timeout`, seconds in JSON; `None`/0: no reconnection, I/O fails
    /// at once). Requests the old connection had not completed are sent again.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "seconds")]
    pub reconnect_timeout: Option<Duration>,
    /// Packed or split rings (`packed_ring`: `auto`, the default, `on`, `off`; written
    /// back only when not `auto`, so that SPDK reads a saved configuration unchanged).
    #[serde(skip_serializing_if = "PackedRing::is_auto")]
    pub packed_ring: PackedRing,
    /// The LIO vhost target's WWPN (`wwpn`, e.g. `naa.5001405000000001`): trtype
    /// `vhost-kernel` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wwpn: Option<String>,
}

/// Seconds to the microsecond: the number [`timeout_from_secs`] reads back as the same
/// duration.
fn seconds<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(round_to_micros(*d).as_micros() as f64 / 1e6),
        None => s.serialize_none(),
    }
}

fn round_to_micros(d: Duration) -> Duration {
    Duration::from_micros(((d.as_nanos() + 500) / 1000).min(u64::MAX as u128) as u64)
}

/// The shortest `io_timeout` or `reconnect_timeout` other than none: configurations
/// give them in seconds, and a shorter one is a typo (every I/O would time out).
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// The longest `io_timeout` or `reconnect_timeout` (a day); none is 0, not a large
/// number.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// The accepted range of a timeout, for messages.
pub const TIMEOUT_RANGE: &str = "0 (none) or 0.001 to 86400 seconds";

/// A timeout in seconds (`io_timeout`, `reconnect_timeout` of a configuration): 0 is
/// none; otherwise [`MIN_TIMEOUT`]..=[`MAX_TIMEOUT`], kept to the microsecond so that
/// it is written back (as seconds) exactly. The error names `key` and the range.
pub fn timeout_from_secs(key: &str, secs: f64) -> Result<Option<Duration>, String> {
    if secs == 0.0 {
        return Ok(None);
    }
    let min = MIN_TIMEOUT.as_secs_f64();
    let max = MAX_TIMEOUT.as_secs_f64();
    if !secs.is_finite() || secs < 0.0 || secs > max {
        return Err(format!("\"{key}\" must be {TIMEOUT_RANGE}, got {secs:?}"));
    }
    if secs < min {
        return Err(format!(
            "\"{key}\" {secs:?} is below a millisecond (every I/O would time out): give 0 for none, or 0.001 to 86400 seconds"
        ));
    }
    Ok(Some(Duration::from_micros((secs * 1e6).round() as u64)))
}

/// What is wrong with a controller name, if anything: names are non-empty, without
/// whitespace or control characters (bdev names derive from them, and they appear in
/// logs, RPC answers and configuration files).
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.chars().any(char::is_whitespace) {
        Some("contains whitespace")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    }
}

impl AttachParams {
    /// Check the parameters by the rules every way of giving them follows (a JSON or
    /// INI configuration, an RPC, a program): a name [`name_problem`] accepts, a
    /// `traddr`, `vq_count` at least 1, `vq_size` a power of two of at least 4,
    /// timeouts none or [`MIN_TIMEOUT`]..=[`MAX_TIMEOUT`], `reconnect_timeout` only for
    /// vhost-user. Errors are [`BdevError::Config`] (kind InvalidInput) naming the key.
    pub fn validate(&self) -> Result<(), BdevError> {
        let bad = |what: String| {
            Err(BdevError::Config(format!(
                "controller {:?}: {what}",
                self.name
            )))
        };
        if let Some(why) = name_problem(&self.name) {
            return bad(format!(
                "\"name\" {why}: a name is non-empty, without whitespace or control characters"
            ));
        }
        if self.traddr.is_empty() || self.traddr.contains('\0') {
            return bad(format!(
                "\"traddr\" {:?} must be a socket path or a PCI address (non-empty, without NUL)",
                self.traddr
            ));
        }
        crate::pool::check_queue_params(&self.name, self.vq_count, self.vq_size)?;
        for (key, t) in [
            ("io_timeout", self.io_timeout),
            ("reconnect_timeout", self.reconnect_timeout),
        ] {
            if let Some(d) = t {
                if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&d) {
                    return bad(format!(
                        "\"{key}\" of {:.9} s must be {TIMEOUT_RANGE}",
                        d.as_secs_f64()
                    ));
                }
            }
        }
        if self.reconnect_timeout.is_some()
            && !matches!(self.trtype, TrType::User | TrType::VfioUser)
        {
            return bad(format!(
                "\"reconnect_timeout\" applies to vhost-user and vfio-user controllers (trtype \"user\", \"vfio-user\"); a {} device does not go away and come back",
                self.trtype.as_str()
            ));
        }
        match (self.trtype, &self.wwpn) {
            (TrType::VhostKernel, None) => {
                return bad(
                    "trtype \"vhost-kernel\" needs \"wwpn\", the LIO vhost target's WWPN (e.g. naa.5001405000000001)".into(),
                )
            }
            (TrType::VhostKernel, Some(w)) if w.is_empty() || w.len() > 223 || w.contains('\0') => {
                return bad(format!(
                    "\"wwpn\" {w:?} must be 1 to 223 characters without NUL"
                ))
            }
            (TrType::VhostKernel, Some(_)) if self.dev_type != DevType::Scsi => {
                return bad(
                    "trtype \"vhost-kernel\" serves virtio-scsi (the kernel's vhost-scsi): \"dev_type\" must be \"scsi\"".into(),
                )
            }
            (t, Some(_)) if t != TrType::VhostKernel => {
                return bad(format!(
                    "\"wwpn\" applies to trtype \"vhost-kernel\" only, not {:?}",
                    t.as_str()
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

/// One method call of a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigCall {
    /// `bdev_virtio_attach_controller`.
    Attach(AttachParams),
    /// `bdev_virtio_blk_set_hotplug`.
    BlkHotplug {
        /// Enabled.
        enable: bool,
        /// Period of the scan.
        period_us: Option<u64>,
    },
}
