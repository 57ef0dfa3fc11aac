//! [`spawn_scsi_target`] and the [`ScsiTargetHandle`] tests drive a running scsi target with:
//! counters, fault switches, and logical units added, removed and resized at run time.

use std::path::Path;
use std::sync::Arc;

use tracing::info;
use vireo_scsi::Asc;

use crate::faults::{Faults, StatCounters};
use crate::scsi_backend::ScsiFactory;
use crate::scsi_config::{LunConfig, ScsiTargetConfig};
use crate::scsi_device::ScsiDevice;
use crate::scsi_faults::ScsiFaults;
use crate::scsi_stats::{LunStats, ScsiStats};
use crate::server::{Server, TargetStopper};
use crate::{LunError, TargetError};

/// A running vhost-user-scsi target. Dropping it stops the target, like
/// [`ScsiTargetHandle::stop`].
pub struct ScsiTargetHandle {
    server: Server,
    device: Arc<ScsiDevice>,
    faults: Arc<Faults>,
    scsi_faults: Arc<ScsiFaults>,
}

impl std::fmt::Debug for ScsiTargetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiTargetHandle")
            .field("socket_path", &self.server.socket_path())
            .field("running", &self.server.running())
            .field("luns", &self.device.luns())
            .finish()
    }
}

/// Starts a vhost-user-scsi target listening on `socket_path` (an existing socket file there is
/// replaced). The socket accepts connections as soon as this returns; front-ends are served one
/// at a time, each new one after the previous disconnected, until the target is stopped. Every
/// new front-end finds the logical units in their configured initial state (readiness, power-on
/// unit attention), with their data kept.
pub fn spawn_scsi_target(
    socket_path: &Path,
    cfg: ScsiTargetConfig,
) -> Result<ScsiTargetHandle, TargetError> {
    let transport = Arc::new(StatCounters::default());
    let faults = Arc::new(Faults::default());
    let scsi_faults = Arc::new(ScsiFaults::default());
    let device = Arc::new(ScsiDevice::new(
        cfg,
        Arc::clone(&transport),
        Arc::clone(&faults),
        Arc::clone(&scsi_faults),
    )?);
    let server = Server::spawn(
        socket_path,
        "scsi",
        transport,
        ScsiFactory {
            device: Arc::clone(&device),
        },
    )?;
    info!(
        "vhost-user-scsi target on {} ({} logical units)",
        socket_path.display(),
        device.luns().len()
    );
    Ok(ScsiTargetHandle {
        server,
        device,
        faults,
        scsi_faults,
    })
}

impl ScsiTargetHandle {
    /// The vhost-user socket front-ends connect to.
    pub fn socket_path(&self) -> &Path {
        self.server.socket_path()
    }

    /// The transport fault switches (fail next N commands, delays, reordering, lying lengths,
    /// bad used ids, disconnects); settable while front-ends run I/O. How a failed command
    /// fails is set in [`ScsiTargetHandle::scsi_faults`].
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The transport fault switches, to hand to another thread.
    pub fn faults_shared(&self) -> Arc<Faults> {
        Arc::clone(&self.faults)
    }

    /// The scsi fault switches: the failure kind, media-only failures, unanswered TMFs.
    pub fn scsi_faults(&self) -> &ScsiFaults {
        &self.scsi_faults
    }

    /// The scsi fault switches, to hand to another thread.
    pub fn scsi_faults_shared(&self) -> Arc<ScsiFaults> {
        Arc::clone(&self.scsi_faults)
    }

    /// A snapshot of the target's counters.
    pub fn stats(&self) -> ScsiStats {
        self.device.stats()
    }

    /// A snapshot of one logical unit's counters; `None` when it does not exist.
    pub fn lun_stats(&self, target: u8, lun: u16) -> Option<LunStats> {
        self.device.lun_stats(target, lun)
    }

    /// The configuration the target started with (the logical units may have changed since;
    /// see [`ScsiTargetHandle::luns`]).
    pub fn config(&self) -> &ScsiTargetConfig {
        self.device.config()
    }

    /// The current logical units, by `(target, LUN)`, ascending.
    pub fn luns(&self) -> Vec<(u8, u16)> {
        self.device.luns()
    }

    /// Capacity of a logical unit in logical blocks.
    pub fn capacity_blocks(&self, target: u8, lun: u16) -> Option<u64> {
        self.device.capacity_blocks(target, lun)
    }

    /// Logical block size of a logical unit.
    pub fn block_size(&self, target: u8, lun: u16) -> Option<u32> {
        self.device.block_size(target, lun)
    }

    /// Hot-adds a logical unit: REPORT LUNS lists it at once, the other units of the target get
    /// REPORTED LUNS DATA HAS CHANGED (if configured), and a front-end that negotiated
    /// `VIRTIO_SCSI_F_HOTPLUG` gets a `VIRTIO_SCSI_T_TRANSPORT_RESET` event with reason RESCAN
    /// (EVENTS_MISSED on a later event if it had no event buffer). `target` and `lun` must be
    /// within the config space's `max_target` and `max_lun`.
    pub fn add_lun(&self, target: u8, lun: u16, cfg: LunConfig) -> Result<(), LunError> {
        self.device.add_lun(target, lun, cfg)
    }

    /// Hot-removes a logical unit, with a transport reset event of reason REMOVED. Commands in
    /// flight on it complete normally; later ones see a missing LUN (or a missing target, when it
    /// was the last unit of its target).
    pub fn remove_lun(&self, target: u8, lun: u16) -> Result<(), LunError> {
        self.device.remove_lun(target, lun)
    }

    /// Changes a logical unit's capacity to `size_bytes`: the unit reports UNIT ATTENTION /
    /// CAPACITY DATA HAS CHANGED (2A/09), and a front-end that negotiated
    /// `VIRTIO_SCSI_F_CHANGE` gets a `VIRTIO_SCSI_T_PARAM_CHANGE` event with that ASC/ASCQ.
    pub fn resize_lun(&self, target: u8, lun: u16, size_bytes: u64) -> Result<(), LunError> {
        self.device.resize_lun(target, lun, size_bytes)
    }

    /// Establishes a unit attention condition on a logical unit (reported on its next command,
    /// INQUIRY, REPORT LUNS and REQUEST SENSE excepted).
    pub fn raise_unit_attention(&self, target: u8, lun: u16, asc: Asc) -> Result<(), LunError> {
        self.device.raise_unit_attention(target, lun, asc)
    }

    /// Makes the next `turs` TEST UNIT READYs of a logical unit answer NOT READY / BECOMING
    /// READY (media access commands too meanwhile).
    pub fn set_not_ready(&self, target: u8, lun: u16, turs: u32) -> Result<(), LunError> {
        self.device.set_not_ready(target, lun, turs)
    }

    /// Drops the connected front-end, if any (the target then accepts the next one); false when
    /// none was connected.
    pub fn drop_connection(&self) -> bool {
        self.server.drop_connection()
    }

    /// A handle that can stop the target from elsewhere.
    pub fn stopper(&self) -> TargetStopper {
        self.server.stopper()
    }

    /// Blocks until the target is stopped through a [`TargetStopper`].
    pub fn wait(mut self) {
        self.server.wait();
    }

    /// Stops the target: drops the connected front-end if any, stops accepting, removes the
    /// socket and joins every thread.
    pub fn stop(mut self) {
        self.server.stop_and_join();
    }
}
