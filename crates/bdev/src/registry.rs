//! Attached controllers and their bdevs, by name.

use std::path::Path;
use std::sync::{Arc, Mutex};

use vireo_virtio::pci::{virtio_functions, Binding, VirtioKind};
use vireo_virtio::{
    DmaMemory, PciAddress, PciTransport, Transport, VdpaTransport, VhostScsiTransport,
    VhostUserTransport,
};

/// First DMA region of a PCI controller's own memory.
const PCI_INITIAL_DMA: usize = 16 << 20;

use crate::bdev::Bdev;
use crate::blk::{BlkController, BlkParams};
use crate::config::{AttachParams, ConfigCall, DevType, TrType};
use crate::error::{BdevError, IoError};
use crate::names::{NameClaims, NameOwner, Names};
use crate::scsi::{LunNotAdded, ScsiController, ScsiParams};

/// virtio device IDs (virtio 1.2 section 5).
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_SCSI: u32 = 8;

/// An attached controller of any type.
#[derive(Debug)]
pub enum Controller {
    /// virtio-blk.
    Blk(BlkController),
    /// virtio-scsi.
    Scsi(ScsiController),
}

impl Controller {
    /// The controller's bdevs.
    pub fn bdevs(&self) -> Vec<Arc<Bdev>> {
        match self {
            Controller::Blk(c) => vec![c.bdev().clone()],
            Controller::Scsi(c) => c.bdevs(),
        }
    }

    /// Successful reconnections to its back-end (`reconnect_timeout`).
    pub fn reconnects(&self) -> u64 {
        match self {
            Controller::Blk(c) => c.reconnects(),
            Controller::Scsi(c) => c.reconnects(),
        }
    }

    /// Why the controller failed, if it did.
    pub fn failure(&self) -> Option<String> {
        match self {
            Controller::Blk(c) => c.failure(),
            Controller::Scsi(c) => c.failure(),
        }
    }

    /// No channel opens from now on; refused while channels are open.
    fn stop_opening(&self) -> Result<(), BdevError> {
        match self {
            Controller::Blk(c) => c.stop_opening(),
            Controller::Scsi(c) => c.stop_opening(),
        }
    }

    /// The connection to the device is gone: for a PCI function, it was removed (its
    /// bdevs go away, and the controller is released once no channel is open on it);
    /// for vhost-user, the back-end hung up (with `reconnect_timeout`, a reconnection
    /// may bring it back).
    pub fn is_gone(&self) -> bool {
        match self {
            Controller::Blk(c) => c.is_gone(),
            Controller::Scsi(c) => c.is_gone(),
        }
    }

    /// The device is gone and nothing uses the controller: a removed PCI function is
    /// released (the kernel waits for that to complete the removal).
    fn reapable(&self, trtype: TrType) -> bool {
        let (gone, open) = match self {
            Controller::Blk(c) => (c.is_gone(), c.channels_open()),
            Controller::Scsi(c) => (c.is_gone(), c.channels_open()),
        };
        trtype == TrType::Pci && gone && open == 0
    }

    /// LUNs found after attach (hot-plug, rescan) that got no bdev because another
    /// controller has their bdev name (scsi; blk has none).
    pub fn luns_not_added(&self) -> Vec<LunNotAdded> {
        match self {
            Controller::Blk(_) => Vec::new(),
            Controller::Scsi(c) => c.luns_not_added(),
        }
    }

    fn detach(self) -> Result<(), BdevError> {
        match self {
            Controller::Blk(c) => c.detach(),
            Controller::Scsi(c) => c.detach(),
        }
    }
}

struct Entry {
    params: AttachParams,
    controller: Controller,
    /// The controller's name and its bdevs' names, given back when the entry goes.
    names: NameOwner,
    /// The PCI function a PCI controller holds.
    pci: Option<PciClaim>,
}

impl Entry {
    /// Leave the registry: the names are free at once; the device is torn down by the
    /// caller, outside the registry lock (a frozen device takes the control-plane
    /// deadline to answer, and nothing else waits for it). The PCI function stays held
    /// until the caller drops the claim, after the teardown.
    fn leave(self) -> (AttachParams, Controller, Option<PciClaim>) {
        drop(self.names);
        (self.params, self.controller, self.pci)
    }
}

/// PCI functions attached or being attached, and by which controller.
type PciClaims = Arc<Mutex<Vec<(PciAddress, String)>>>;

/// One PCI function held by one controller; released when dropped.
struct PciClaim {
    set: PciClaims,
    addr: PciAddress,
}

impl Drop for PciClaim {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(a, _)| *a != self.addr);
    }
}

/// All controllers of a process.
pub struct Registry {
    memory: Arc<DmaMemory>,
    entries: Mutex<Vec<Entry>>,
    /// Every controller and bdev name, including those of attaches in progress (taken
    /// before connecting, so concurrent attaches of one name fail at once instead of
    /// queueing on the back-end).
    names: Arc<Names>,
    /// PCI functions held (an attach of a function already attached is refused before
    /// the function is opened: under uio_pci_generic, opening resets the live device).
    pci: PciClaims,
    hotplug: Mutex<Option<(bool, Option<u64>)>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry whose controllers share `memory`.
    pub fn new(memory: Arc<DmaMemory>) -> Registry {
        Registry {
            memory,
            entries: Mutex::new(Vec::new()),
            names: Arc::new(Names::default()),
            pci: Arc::default(),
            hotplug: Mutex::new(None),
        }
    }

    /// The DMA memory shared by all controllers.
    pub fn memory(&self) -> &Arc<DmaMemory> {
        &self.memory
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attach a controller and return its bdevs. The parameters are checked first
    /// ([`AttachParams::validate`]). A back-end that refuses the queue size
    /// is tried again, on a new connection, with half the size (down to 16).
    ///
    /// Controller and bdev names are unique across the registry: an attach whose name,
    /// or one of whose bdevs' names, another controller has fails with
    /// [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists) and leaves nothing
    /// behind (the connection is closed, the name is free again).
    ///
    /// `trtype` "pci" with `traddr` "*" attaches every virtio PCI function of
    /// `dev_type` that is bound to vfio-pci or uio_pci_generic, as controllers named
    /// `NAME-BDF` (the seed's `Dev Pci`).
    pub fn attach(&self, params: &AttachParams) -> Result<Vec<Arc<Bdev>>, BdevError> {
        params.validate()?;
        if params.trtype == TrType::Pci && params.traddr == "*" {
            return self.attach_all_pci(params);
        }
        let mut names = Some(self.names.reserve(&params.name)?);
        let mut pci = match params.trtype {
            TrType::Pci => Some(self.claim_pci(params)?),
            _ => None,
        };
        let mut p = params.clone();
        let mut first: Option<BdevError> = None;
        loop {
            match self.attach_once(&p, &mut names, &mut pci) {
                Err(e @ (BdevError::QueueSizeRefused { .. } | BdevError::QueueSetup { .. }))
                    if p.vq_size > 16 =>
                {
                    tracing::warn!(
                        controller = %p.name,
                        "{e}; retrying with queue size {}",
                        p.vq_size / 2
                    );
                    first.get_or_insert(e);
                    p.vq_size /= 2;
                }
                // A retry that fails otherwise (a single-connection back-end may be gone)
                // reports the first failure, which says what to change.
                Err(e) => {
                    return Err(match first {
                        Some(f) => BdevError::Config(format!(
                            "{f} (a retry with queue size {} failed too: {e})",
                            p.vq_size
                        )),
                        None => e,
                    })
                }
                Ok(b) => return Ok(b),
            }
        }
    }

    /// Hold the PCI function of `params` for its controller (refused when another
    /// controller has it).
    fn claim_pci(&self, params: &AttachParams) -> Result<PciClaim, BdevError> {
        let addr: PciAddress = params.traddr.parse().map_err(|source| BdevError::Virtio {
            name: params.name.clone(),
            source,
        })?;
        let mut held = self.pci.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, holder)) = held.iter().find(|(a, _)| *a == addr) {
            return Err(BdevError::PciFunctionInUse {
                name: params.name.clone(),
                addr: addr.to_string(),
                holder: holder.clone(),
            });
        }
        held.push((addr, params.name.clone()));
        Ok(PciClaim {
            set: self.pci.clone(),
            addr,
        })
    }

    fn attach_all_pci(&self, params: &AttachParams) -> Result<Vec<Arc<Bdev>>, BdevError> {
        let want = match params.dev_type {
            DevType::Blk => VirtioKind::Blk,
            DevType::Scsi => VirtioKind::Scsi,
        };
        let all = virtio_functions().map_err(|source| BdevError::Virtio {
            name: params.name.clone(),
            source,
        })?;
        let usable: Vec<_> = all
            .iter()
            .filter(|f| f.kind == Some(want) && matches!(f.binding, Binding::Vfio | Binding::Uio))
            .collect();
        if usable.is_empty() {
            let seen: Vec<String> = all
                .iter()
                .filter(|f| f.kind == Some(want))
                .map(|f| format!("{} ({:?})", f.addr, f.binding))
                .collect();
            return Err(BdevError::Unsatisfiable {
                name: params.name.clone(),
                reason: format!(
                    "traddr \"*\": no virtio-{} PCI function is bound to vfio-pci or uio_pci_generic (found: {}); bind them with `vireo setup bind BDF`",
                    want.name(),
                    if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
                ),
            });
        }
        // All or nothing: a function that fails takes back the ones attached before it.
        // A function another controller already holds is left to it.
        let mut bdevs = Vec::new();
        let mut done: Vec<String> = Vec::new();
        for f in usable {
            let mut p = params.clone();
            p.name = format!("{}-{}", params.name, f.addr);
            p.traddr = f.addr.to_string();
            match self.attach(&p) {
                Ok(b) => {
                    bdevs.extend(b);
                    done.push(p.name);
                }
                Err(BdevError::PciFunctionInUse { holder, .. }) => {
                    tracing::info!(controller = %params.name, "traddr \"*\": {} is attached as {holder} already; left to it", f.addr);
                }
                Err(e) => {
                    for name in done.iter().rev() {
                        if let Err(d) = self.detach(name) {
                            tracing::warn!(controller = %name, "taking back an attach of traddr \"*\": {d}");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(bdevs)
    }

    /// One try of an attach; `names` holds the controller's reserved name and goes to
    /// its entry when the attach succeeds.
    fn attach_once(
        &self,
        params: &AttachParams,
        names: &mut Option<NameOwner>,
        pci: &mut Option<PciClaim>,
    ) -> Result<Vec<Arc<Bdev>>, BdevError> {
        let claims: NameClaims = match names {
            Some(n) => n.claims().clone(),
            None => return Err(BdevError::NameTaken(params.name.clone())),
        };
        let transport: Box<dyn Transport> = match params.trtype {
            TrType::Pci => {
                let addr: PciAddress =
                    params.traddr.parse().map_err(|source| BdevError::Virtio {
                        name: params.name.clone(),
                        source,
                    })?;
                // A PCI controller has memory of its own: its addressing (IOMMU windows or
                // physical addresses) depends on how the function is reached. It starts
                // small and grows like the shared memory.
                let mut dma = self.memory.config().clone();
                dma.initial_region_size = dma.initial_region_size.min(PCI_INITIAL_DMA);
                Box::new(
                    PciTransport::open(addr, &dma).map_err(|source| BdevError::Virtio {
                        name: params.name.clone(),
                        source,
                    })?,
                )
            }
            TrType::VfioUser => {
                let t = PciTransport::open_vfio_user(
                    Path::new(&params.traddr),
                    self.memory.clone(),
                    vireo_virtio::pci::vfio_user::REPLY_TIMEOUT,
                )
                .map_err(|source| BdevError::Virtio {
                    name: params.name.clone(),
                    source,
                })?;
                let want = match params.dev_type {
                    DevType::Blk => VirtioKind::Blk,
                    DevType::Scsi => VirtioKind::Scsi,
                };
                match t.kind() {
                    Some(k) if k == want => {}
                    k => {
                        return Err(BdevError::Unsatisfiable {
                            name: params.name.clone(),
                            reason: format!(
                                "the vfio-user device at {} is a virtio-{} device, not virtio-{}: attach it with dev_type \"{}\"",
                                params.traddr,
                                k.map(|k| k.name()).unwrap_or_default(),
                                want.name(),
                                k.map(|k| k.name()).unwrap_or_default()
                            ),
                        })
                    }
                }
                Box::new(t)
            }
            TrType::User => Box::new(
                VhostUserTransport::connect_with_options(
                    Path::new(&params.traddr),
                    self.memory.clone(),
                    vireo_virtio::vhost_user::DEFAULT_REPLY_TIMEOUT,
                    // The back-end's in-flight tracking is for virtio-blk reconnection.
                    params.reconnect_timeout.is_some() && params.dev_type == DevType::Blk,
                    Some(&params.name),
                )
                .map_err(|source| BdevError::Virtio {
                    name: params.name.clone(),
                    source,
                })?,
            ),
            TrType::Vdpa => Box::new(
                VdpaTransport::open(
                    Path::new(&params.traddr),
                    self.memory.clone(),
                    match params.dev_type {
                        DevType::Blk => VIRTIO_ID_BLOCK,
                        DevType::Scsi => VIRTIO_ID_SCSI,
                    },
                )
                .map_err(|source| BdevError::Virtio {
                    name: params.name.clone(),
                    source,
                })?,
            ),
            TrType::VhostKernel => Box::new(
                VhostScsiTransport::open(
                    Path::new(&params.traddr),
                    params.wwpn.as_deref().unwrap_or_default(),
                    self.memory.clone(),
                )
                .map_err(|source| BdevError::Virtio {
                    name: params.name.clone(),
                    source,
                })?,
            ),
        };
        // How long I/O waits for the device to come back: vhost-user reconnection, or a
        // PCI device reset (the last step of io_timeout escalation; 5 s to come back).
        let reconnect = match params.trtype {
            TrType::User | TrType::VfioUser => params.reconnect_timeout,
            TrType::Pci => params.io_timeout.map(|_| std::time::Duration::from_secs(5)),
            TrType::Vdpa | TrType::VhostKernel => None,
        };
        let r = match params.dev_type {
            DevType::Blk => BlkController::attach(
                &BlkParams {
                    name: params.name.clone(),
                    vq_count: params.vq_count,
                    vq_size: params.vq_size,
                    reconnect_timeout: reconnect,
                    packed_ring: params.packed_ring,
                },
                transport,
            )
            .map(Controller::Blk),
            DevType::Scsi => ScsiController::attach_claiming(
                &ScsiParams {
                    name: params.name.clone(),
                    vq_count: params.vq_count,
                    vq_size: params.vq_size,
                    reconnect_timeout: reconnect,
                    packed_ring: params.packed_ring,
                },
                transport,
                claims.clone(),
            )
            .map(Controller::Scsi),
        };
        let controller = r.map_err(|e| wrong_type_hint(e, params))?;
        let bdevs = controller.bdevs();
        for b in &bdevs {
            b.set_default_timeout(params.io_timeout);
        }
        let mut entries = self.lock();
        // The bdevs' names, all or none, with the controller joining the registry (LUNs
        // a scsi controller's event thread adds from now on claim theirs one by one).
        let bdev_names: Vec<&str> = bdevs.iter().map(|b| b.name()).collect();
        if let Err(e) = claims.claim_bdevs(&bdev_names) {
            drop(entries);
            tracing::warn!(controller = %params.name, "attach refused: {e}");
            if let Err(d) = controller.detach() {
                tracing::warn!(controller = %params.name, "closing the refused controller: {d}");
            }
            return Err(e);
        }
        let Some(names) = names.take() else {
            return Err(BdevError::NameTaken(params.name.clone()));
        };
        names.joined();
        entries.push(Entry {
            params: params.clone(),
            controller,
            names,
            pci: pci.take(),
        });
        Ok(bdevs)
    }

    /// Apply a parsed configuration.
    pub fn apply(&self, calls: &[ConfigCall]) -> Result<Vec<Arc<Bdev>>, BdevError> {
        let mut all = Vec::new();
        for c in calls {
            match c {
                ConfigCall::Attach(p) => all.extend(self.attach(p)?),
                ConfigCall::BlkHotplug { enable, period_us } => {
                    *self.hotplug.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((*enable, *period_us));
                }
            }
        }
        Ok(all)
    }

    /// Detach a controller by name. It leaves the registry (with its names) at once;
    /// the device is stopped afterwards, without holding up other controllers.
    pub fn detach(&self, name: &str) -> Result<(), BdevError> {
        let e = {
            let mut entries = self.lock();
            let pos = entries
                .iter()
                .position(|e| e.params.name == name)
                .ok_or_else(|| BdevError::NotFound(name.to_string()))?;
            // Refused, and nothing touched, while channels are open: detaching would
            // reset the device under their I/O. Past this point no channel opens (a
            // holder of a bdev that opened one between a count and the stop used to
            // leave the controller serving I/O outside the registry).
            entries[pos].controller.stop_opening()?;
            entries.remove(pos)
        };
        let (params, controller, pci) = e.leave();
        let r = controller.detach();
        // The function is free again once its controller let go of it.
        drop(pci);
        if let Err(err) = r {
            tracing::warn!(controller = %params.name, "detach failed: {err}");
            return Err(err);
        }
        Ok(())
    }

    /// Detach PCI controllers whose function was removed (hot-unplug, unbind) once no
    /// channel is open on them: their bdevs go away and the function is released.
    /// Returns the names of the controllers removed.
    pub fn reap_removed(&self) -> Vec<String> {
        let gone: Vec<Entry> = {
            let mut entries = self.lock();
            let mut gone = Vec::new();
            let mut i = 0;
            while i < entries.len() {
                if entries[i].controller.reapable(entries[i].params.trtype) {
                    gone.push(entries.remove(i));
                } else {
                    i += 1;
                }
            }
            gone
        };
        // Released outside the registry lock, like a detach.
        let mut reaped = Vec::new();
        for e in gone {
            let (params, controller, pci) = e.leave();
            tracing::warn!(controller = %params.name, "PCI function {} is gone: controller and its bdevs removed", params.traddr);
            if let Err(err) = controller.detach() {
                tracing::warn!(controller = %params.name, "release after removal: {err}");
            }
            drop(pci);
            reaped.push(params.name);
        }
        reaped
    }

    /// Every bdev, in attach order (removed PCI functions are reaped first).
    pub fn bdevs(&self) -> Vec<Arc<Bdev>> {
        self.reap_removed();
        self.lock()
            .iter()
            .flat_map(|e| e.controller.bdevs())
            .collect()
    }

    /// A bdev by name.
    pub fn bdev(&self, name: &str) -> Option<Arc<Bdev>> {
        self.bdevs().into_iter().find(|b| b.name() == name)
    }

    /// Run `f` on the controller named `name`.
    pub fn with_controller<R>(&self, name: &str, f: impl FnOnce(&Controller) -> R) -> Option<R> {
        self.lock()
            .iter()
            .find(|e| e.params.name == name)
            .map(|e| f(&e.controller))
    }

    /// SCSI LUNs that were found but are not disks: (controller, LUN).
    pub fn skipped_luns(&self) -> Vec<(String, crate::scsi::LunInfo)> {
        self.lock()
            .iter()
            .flat_map(|e| match &e.controller {
                Controller::Scsi(c) => c
                    .skipped()
                    .iter()
                    .map(|l| (e.params.name.clone(), l.clone()))
                    .collect(),
                Controller::Blk(_) => Vec::new(),
            })
            .collect()
    }

    /// Controllers: (params, failure).
    pub fn controllers(&self) -> Vec<(AttachParams, Option<String>)> {
        self.reap_removed();
        self.lock()
            .iter()
            .map(|e| (e.params.clone(), e.controller.failure()))
            .collect()
    }

    /// The `bdev_virtio_blk_set_hotplug` setting applied, if any: (enable, period in µs).
    pub fn hotplug(&self) -> Option<(bool, Option<u64>)> {
        *self.hotplug.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Errors that a device of the other type produces (a scsi back-end read as blk has no
/// request queues in the blk layout and does not answer GET_ID; a blk back-end read as
/// scsi has no queues beyond 2 or answers no SCSI command) get a hint about `dev_type`.
/// A `vq_count` above what the device offers is no such evidence (every device offers
/// some number of queues), unless a scsi device offers none: a blk device has no more
/// than its request queues, which the scsi layout takes for control and event queues.
fn wrong_type_hint(e: BdevError, params: &AttachParams) -> BdevError {
    let suspicious = match &e {
        BdevError::TooFewQueues { offered, .. } => {
            *offered == 0 && params.dev_type == DevType::Scsi
        }
        BdevError::Unsatisfiable { .. } | BdevError::BadDevice { .. } => true,
        BdevError::Io { source, .. } => matches!(
            source,
            IoError::ControllerFailed(_) | IoError::Timeout(_) | IoError::Scsi(_)
        ),
        _ => false,
    };
    if !suspicious {
        return e;
    }
    let (asked, other) = match params.dev_type {
        DevType::Blk => ("blk", "scsi"),
        DevType::Scsi => ("scsi", "blk"),
    };
    BdevError::WrongDeviceType {
        source: Box::new(e),
        asked,
        other,
        traddr: params.traddr.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PackedRing;

    fn pci(name: &str, traddr: &str) -> AttachParams {
        AttachParams {
            name: name.into(),
            trtype: TrType::Pci,
            traddr: traddr.into(),
            dev_type: DevType::Blk,
            vq_count: 1,
            vq_size: 128,
            io_timeout: None,
            reconnect_timeout: None,
            packed_ring: PackedRing::default(),
            wwpn: None,
        }
    }

    /// A PCI function is held by one controller at a time, whatever the spelling of its
    /// address, and free again once that claim goes (an RPC attach of a function already
    /// attached used to open it again, which under uio_pci_generic resets it).
    #[test]
    fn a_pci_function_is_held_by_one_controller_at_a_time() {
        let reg = Registry::new(DmaMemory::new(vireo_virtio::DmaConfig::default()).unwrap());
        let a = reg.claim_pci(&pci("A", "0000:00:04.0")).unwrap();
        let e = reg.claim_pci(&pci("B", "0000:00:04.0")).err().unwrap();
        assert!(
            matches!(&e, BdevError::PciFunctionInUse { holder, .. } if holder == "A"),
            "{e}"
        );
        assert_eq!(e.kind(), crate::ErrorKind::AlreadyExists);
        let _c = reg.claim_pci(&pci("C", "0000:00:05.0")).unwrap();
        drop(a);
        assert!(reg.claim_pci(&pci("B", "0000:00:04.0")).is_ok());
    }
}
