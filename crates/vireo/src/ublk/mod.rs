//! ublk export of bdevs: each one a kernel block device, `/dev/ublkbN` (`vireo serve
//! --ublk BDEV[:ID]`, or SPDK's RPCs `ublk_create_target`, `ublk_start_disk`, ...).
//!
//! The kernel's ublk driver (`ublk_drv`, Linux 6.x) hands each request of the block
//! device to this server through io_uring `URING_CMD`s on `/dev/ublkcN`. Each of a
//! device's queues runs on its own thread with its own bdev channel (its own virtqueue
//! while the controller has free ones): a request is fetched, submitted, completed and
//! committed on that thread (`queue.rs`). The control commands go through
//! `/dev/ublk-control` (`ctrl.rs`).
//!
//! Devices are added with `UBLK_F_USER_RECOVERY` and `UBLK_F_USER_RECOVERY_REISSUE`
//! when the driver has them: when vireo dies the kernel keeps the device, quiesced,
//! and requeues what the dead server held; a new vireo takes it back with
//! `ublk_recover_disk` and no request fails.
//!
//! Data moves through a buffer per tag that lies in the bdev's DMA memory (the kernel
//! copies into and out of it), so vireo copies nothing; `UBLK_F_USER_COPY` (which
//! would take the same one copy, by a syscall per request) is not used.

mod ctrl;
mod queue;
pub mod rpc;
mod sys;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vireo_bdev::{Bdev, Registry};

use ctrl::Control;
use sys::{DevInfo, Params};

/// Tags per queue unless asked (SPDK's default).
pub const DEFAULT_QUEUE_DEPTH: u16 = 128;
/// Queues per device unless asked (SPDK's default).
pub const DEFAULT_NUM_QUEUES: u16 = 1;
/// Largest request the kernel sends (bytes per tag buffer).
const MAX_IO_BYTES: u32 = 256 << 10;

/// What went wrong with ublk.
#[derive(Debug)]
pub enum UblkError {
    /// `/dev/ublk-control` does not exist.
    NoDriver,
    /// Opening the control device was refused.
    NotPermitted(std::io::Error),
    /// io_uring is missing or disabled.
    NoIoUring(std::io::Error),
    /// io_uring has no `URING_CMD`.
    NoUringCmd,
    /// The driver predates GET_FEATURES / ioctl-encoded commands.
    DriverTooOld,
    /// No target: `ublk_create_target` first.
    NoTarget,
    /// `ublk_create_target` twice.
    TargetExists,
    /// No bdev of that name.
    NoSuchBdev(String),
    /// No ublk device of that id.
    NoSuchDisk(u32),
    /// A device of that id exists (in vireo, or in the kernel).
    DiskExists(u32),
    /// Bad parameters.
    Invalid(String),
    /// The bdev cannot be a ublk device.
    Unsuitable(String),
    /// A control command failed.
    Command {
        /// Command name.
        cmd: &'static str,
        /// Device.
        dev_id: u32,
        /// errno.
        errno: i32,
    },
    /// A queue could not be set up.
    Queue(String),
    /// A system call failed.
    Io(&'static str, std::io::Error),
    /// The device is not waiting to be recovered.
    NotQuiesced(u32, u16),
}

impl std::fmt::Display for UblkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UblkError::NoDriver => f.write_str(
                "/dev/ublk-control does not exist: load the kernel's ublk driver (modprobe ublk_drv; \
                 Linux 6.5 or later built with CONFIG_BLK_DEV_UBLK)",
            ),
            UblkError::NotPermitted(e) => write!(
                f,
                "cannot open /dev/ublk-control ({e}): run vireo as root (CAP_SYS_ADMIN)"
            ),
            UblkError::NoIoUring(e) => write!(
                f,
                "io_uring with 128-byte entries is not available ({e}): ublk needs Linux 5.19 or \
                 later with io_uring enabled (sysctl kernel.io_uring_disabled=0)"
            ),
            UblkError::NoUringCmd => f.write_str(
                "this kernel's io_uring has no URING_CMD, which ublk needs: upgrade to Linux 6.5 or later",
            ),
            UblkError::DriverTooOld => f.write_str(
                "this kernel's ublk driver has no GET_FEATURES or ioctl-encoded commands: upgrade to Linux 6.5 or later",
            ),
            UblkError::NoTarget => {
                f.write_str("no ublk target: call ublk_create_target first (or vireo serve --ublk)")
            }
            UblkError::TargetExists => f.write_str("the ublk target exists already"),
            UblkError::NoSuchBdev(b) => write!(f, "no bdev named {b:?}"),
            UblkError::NoSuchDisk(id) => {
                write!(f, "no ublk device {id} (ublk_get_disks lists them)")
            }
            UblkError::DiskExists(id) => write!(
                f,
                "ublk device {id} exists already: stop it (ublk_stop_disk) or choose another ublk_id"
            ),
            UblkError::Invalid(m) | UblkError::Unsuitable(m) | UblkError::Queue(m) => {
                f.write_str(m)
            }
            UblkError::Command { cmd, dev_id, errno } => write!(
                f,
                "ublk {cmd} for device {dev_id} failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
            UblkError::Io(what, e) => write!(f, "{what}: {e}"),
            UblkError::NotQuiesced(id, state) => write!(
                f,
                "ublk device {id} is not waiting for recovery (state {}): only a device whose server died can be recovered",
                match *state {
                    sys::S_DEV_DEAD => "dead: not started",
                    sys::S_DEV_LIVE => "live: another server has it",
                    _ => "unknown",
                }
            ),
        }
    }
}

impl std::error::Error for UblkError {}

impl UblkError {
    /// The negative errno SPDK's ublk RPCs answer with.
    pub fn errno(&self) -> i32 {
        match self {
            UblkError::NoDriver | UblkError::NoSuchBdev(_) | UblkError::NoSuchDisk(_) => {
                -libc::ENODEV
            }
            UblkError::NotPermitted(_) => -libc::EPERM,
            UblkError::NoIoUring(_) | UblkError::NoUringCmd | UblkError::DriverTooOld => {
                -libc::ENOTSUP
            }
            UblkError::NoTarget => -libc::ENODEV,
            UblkError::TargetExists | UblkError::DiskExists(_) => -libc::EEXIST,
            UblkError::Invalid(_) | UblkError::Unsuitable(_) => -libc::EINVAL,
            UblkError::Command { errno, .. } => -errno,
            UblkError::NotQuiesced(..) => -libc::EBUSY,
            UblkError::Queue(_) | UblkError::Io(..) => -libc::EIO,
        }
    }
}

/// One exported bdev.
struct Disk {
    id: u32,
    bdev: Arc<Bdev>,
    queue_depth: u16,
    num_queues: u16,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    kicks: Vec<Arc<OwnedFd>>,
}

/// What `ublk_get_disks` lists of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// N of /dev/ublkbN.
    pub id: u32,
    /// The bdev.
    pub bdev_name: String,
    /// Tags per queue.
    pub queue_depth: u16,
    /// Queues.
    pub num_queues: u16,
}

/// The ublk target: the control device and the devices (`ublk_create_target`).
pub struct UblkTarget {
    ctrl: Control,
    cpumask: Option<String>,
    /// The CPUs of `cpumask` (empty without one): queue `q` of a device runs on
    /// `cpus[q % cpus.len()]`, as SPDK spreads its ublk queues over the mask's cores.
    cpus: Vec<usize>,
    disks: Mutex<BTreeMap<u32, Disk>>,
    /// Ids of devices being started or recovered: the device table is not held across
    /// their waits (the driver's, up to seconds), so that listing, stopping and saving
    /// the configuration answer meanwhile.
    starting: Mutex<std::collections::BTreeSet<u32>>,
    reg: Arc<Registry>,
    watcher_stop: Arc<AtomicBool>,
}

/// Device `id` reserved while it starts (see `UblkTarget::starting`).
struct Starting<'a>(&'a UblkTarget, u32);

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.0
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// The target of `vireo serve`, created and destroyed by RPCs.
pub struct UblkServer {
    reg: Arc<Registry>,
    target: Mutex<Option<Arc<UblkTarget>>>,
}

impl UblkServer {
    /// No target yet.
    pub fn new(reg: Arc<Registry>) -> Arc<UblkServer> {
        Arc::new(UblkServer {
            reg,
            target: Mutex::new(None),
        })
    }

    /// `ublk_create_target`.
    pub fn create_target(&self, cpumask: Option<String>) -> Result<(), UblkError> {
        let mut t = self.target.lock().unwrap_or_else(|p| p.into_inner());
        if t.is_some() {
            return Err(UblkError::TargetExists);
        }
        *t = Some(UblkTarget::new(self.reg.clone(), cpumask)?);
        Ok(())
    }

    /// The target, if created.
    pub fn target(&self) -> Result<Arc<UblkTarget>, UblkError> {
        self.target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(UblkError::NoTarget)
    }

    /// The target if there is one.
    pub fn target_opt(&self) -> Option<Arc<UblkTarget>> {
        self.target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `ublk_destroy_target`: stop every device, then drop the target.
    pub fn destroy_target(&self) -> Result<(), UblkError> {
        let t = self
            .target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(UblkError::NoTarget)?;
        t.shutdown();
        Ok(())
    }
}

impl UblkTarget {
    /// Open the control device (the errors say what to load or upgrade) and start the
    /// watcher that removes the devices of bdevs that go away.
    pub fn new(reg: Arc<Registry>, cpumask: Option<String>) -> Result<Arc<UblkTarget>, UblkError> {
        let cpus = match &cpumask {
            None => Vec::new(),
            Some(m) => crate::cpus::allowed_cpus()
                .and_then(|allowed| crate::cpus::parse_cores("cpumask", m, &allowed))
                .map_err(|e| UblkError::Invalid(format!("{e:#}")))?,
        };
        let ctrl = Control::open()?;
        tracing::info!("ublk: driver features {:#x}", ctrl.features);
        let t = Arc::new(UblkTarget {
            ctrl,
            cpumask,
            cpus,
            disks: Mutex::new(BTreeMap::new()),
            starting: Mutex::new(std::collections::BTreeSet::new()),
            reg,
            watcher_stop: Arc::new(AtomicBool::new(false)),
        });
        let weak = Arc::downgrade(&t);
        let stop = t.watcher_stop.clone();
        std::thread::Builder::new()
            .name("vireo-ublk-watch".into())
            .spawn(move || watch(weak, stop))
            .map_err(|e| UblkError::Io("start the ublk watcher thread", e))?;
        Ok(t)
    }

    /// The cpumask given at creation.
    pub fn cpumask(&self) -> Option<&str> {
        self.cpumask.as_deref()
    }

    fn disks(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Disk>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every device, by id.
    pub fn list(&self) -> Vec<DiskInfo> {
        self.disks()
            .values()
            .map(|d| DiskInfo {
                id: d.id,
                bdev_name: d.bdev.name().to_string(),
                queue_depth: d.queue_depth,
                num_queues: d.num_queues,
            })
            .collect()
    }

    fn flags(&self) -> u64 {
        let mut f = sys::F_CMD_IOCTL_ENCODE | sys::F_URING_CMD_COMP_IN_TASK;
        if self.ctrl.features & sys::F_USER_RECOVERY != 0 {
            f |= sys::F_USER_RECOVERY;
            if self.ctrl.features & sys::F_USER_RECOVERY_REISSUE != 0 {
                f |= sys::F_USER_RECOVERY_REISSUE;
            }
        }
        f
    }

    fn lookup(&self, bdev: &str) -> Result<Arc<Bdev>, UblkError> {
        match self.reg.bdev(bdev) {
            Some(b) if !b.is_removed() => Ok(b),
            _ => Err(UblkError::NoSuchBdev(bdev.to_string())),
        }
    }

    /// `ublk_start_disk`: export `bdev` as /dev/ublkb`id`; returns the id.
    pub fn start_disk(
        &self,
        bdev: &str,
        id: u32,
        num_queues: u16,
        queue_depth: u16,
    ) -> Result<u32, UblkError> {
        if num_queues == 0 || num_queues > 256 {
            return Err(UblkError::Invalid(format!(
                "num_queues must be 1 to 256, got {num_queues}"
            )));
        }
        if queue_depth == 0 || queue_depth > sys::MAX_QUEUE_DEPTH {
            return Err(UblkError::Invalid(format!(
                "queue_depth must be 1 to {}, got {queue_depth}",
                sys::MAX_QUEUE_DEPTH
            )));
        }
        if id == u32::MAX {
            return Err(UblkError::Invalid("ublk_id must be below 2^32-1".into()));
        }
        let b = self.lookup(bdev)?;
        let vqs = b.info().num_queues;
        if num_queues > vqs {
            return Err(UblkError::Invalid(format!(
                "bdev {bdev} has {vqs} request queue(s) (the controller's vq_count) and each ublk \
                 queue needs its own: num_queues must be at most {vqs}"
            )));
        }
        let _starting = self.reserve(id)?;
        let params = params_of(&b)?;
        let info = DevInfo {
            nr_hw_queues: num_queues,
            queue_depth,
            max_io_buf_bytes: MAX_IO_BYTES,
            dev_id: id,
            flags: self.flags(),
            ..Default::default()
        };
        let info = self.ctrl.add_dev(info).map_err(|e| match e {
            UblkError::Command { errno, .. } if errno == libc::EEXIST => UblkError::DiskExists(id),
            e => e,
        })?;
        let cleanup = |e: UblkError| {
            if let Err(e2) = self.ctrl.simple(sys::CMD_DEL_DEV, id, 0) {
                tracing::warn!("ublk: removing device {id} after a failed start: {e2}");
            }
            e
        };
        self.ctrl.set_params(id, params).map_err(cleanup)?;
        let disk = self.start_queues(&b, &info).map_err(cleanup)?;
        let pid = std::process::id() as u64;
        if let Err(e) = self.ctrl.simple(sys::CMD_START_DEV, id, pid) {
            stop_threads(disk);
            return Err(cleanup(e));
        }
        tracing::info!("ublk: bdev {} is /dev/ublkb{id}", b.name());
        self.install(disk)?;
        Ok(id)
    }

    /// Reserve device `id` for a start or a recovery (refused once the target shuts
    /// down, or when the id is in use or being started).
    fn reserve(&self, id: u32) -> Result<Starting<'_>, UblkError> {
        let disks = self.disks();
        self.not_shut_down()?;
        let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        if disks.contains_key(&id) || !starting.insert(id) {
            return Err(UblkError::DiskExists(id));
        }
        Ok(Starting(self, id))
    }

    /// A started device joins the table, unless the target shut down meanwhile (then
    /// it is stopped: nothing else would stop it).
    fn install(&self, disk: Disk) -> Result<(), UblkError> {
        let mut disks = self.disks();
        if let Err(e) = self.not_shut_down() {
            drop(disks);
            let id = disk.id;
            if let Err(e2) = self.remove(disk) {
                tracing::warn!("ublk: stopping device {id} started during the shutdown: {e2}");
            }
            return Err(e);
        }
        disks.insert(disk.id, disk);
        Ok(())
    }

    /// `ublk_recover_disk`: take back device `id`, whose server died, serving `bdev`.
    pub fn recover_disk(&self, bdev: &str, id: u32) -> Result<u32, UblkError> {
        let b = self.lookup(bdev)?;
        let _starting = self.reserve(id)?;
        // The driver quiesces the device once it has seen the old server go.
        let deadline = Instant::now() + Duration::from_secs(10);
        let info = loop {
            let info = self.ctrl.dev_info(id).map_err(|e| match e {
                UblkError::Command { errno, .. } if errno == libc::ENODEV => {
                    UblkError::NoSuchDisk(id)
                }
                e => e,
            })?;
            if info.state == sys::S_DEV_QUIESCED {
                break info;
            }
            if Instant::now() > deadline {
                return Err(UblkError::NotQuiesced(id, info.state));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if info.flags & sys::F_USER_RECOVERY == 0 {
            return Err(UblkError::Invalid(format!(
                "ublk device {id} was added without UBLK_F_USER_RECOVERY: it cannot be recovered"
            )));
        }
        self.ctrl
            .simple(sys::CMD_START_USER_RECOVERY, id, 0)
            .map_err(|e| {
                if let UblkError::Command { errno, .. } = e {
                    if errno == libc::EBUSY {
                        return UblkError::NotQuiesced(id, info.state);
                    }
                }
                e
            })?;
        let disk = self.start_queues(&b, &info)?;
        let pid = std::process::id() as u64;
        if let Err(e) = self.ctrl.simple(sys::CMD_END_USER_RECOVERY, id, pid) {
            stop_threads(disk);
            return Err(e);
        }
        tracing::info!("ublk: recovered /dev/ublkb{id} on bdev {}", b.name());
        self.install(disk)?;
        Ok(id)
    }

    /// Open /dev/ublkcN and start a thread per queue, each with every tag fetched.
    fn start_queues(&self, b: &Arc<Bdev>, info: &DevInfo) -> Result<Disk, UblkError> {
        let id = info.dev_id;
        let path = format!("/dev/ublkc{id}");
        // The node appears as the driver adds the device (devtmpfs or udev).
        let deadline = Instant::now() + Duration::from_secs(5);
        let cdev = loop {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
            {
                Ok(f) => break f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(UblkError::Io("open the ublk char device", e)),
            }
        };
        let cdev: Arc<File> = Arc::new(cdev);
        let stop = Arc::new(AtomicBool::new(false));
        let mut disk = Disk {
            id,
            bdev: b.clone(),
            queue_depth: info.queue_depth,
            num_queues: info.nr_hw_queues,
            threads: Vec::new(),
            stop: stop.clone(),
            kicks: Vec::new(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        for q_id in 0..info.nr_hw_queues {
            let kick = Arc::new(queue::eventfd().map_err(|e| UblkError::Io("eventfd", e))?);
            disk.kicks.push(kick.clone());
            let spec = queue::QueueSpec {
                cdev: cdev.clone(),
                q_id,
                depth: info.queue_depth,
                max_io: info.max_io_buf_bytes as usize,
                bdev: b.clone(),
                stop: stop.clone(),
                kick,
            };
            let tx = tx.clone();
            let cpu = (!self.cpus.is_empty()).then(|| self.cpus[q_id as usize % self.cpus.len()]);
            let t = std::thread::Builder::new()
                .name(format!("vireo-ublk{id}q{q_id}"))
                .spawn(move || {
                    if let Some(c) = cpu {
                        if let Err(e) = crate::cpus::pin_to(c) {
                            tracing::warn!(
                                cpu = c,
                                "ublk queue {q_id}: cannot pin to its CPU: {e}"
                            );
                        }
                    }
                    queue::run(spec, tx)
                })
                .map_err(|e| UblkError::Io("start a ublk queue thread", e));
            match t {
                Ok(t) => disk.threads.push(t),
                Err(e) => {
                    stop_threads(disk);
                    return Err(e);
                }
            }
        }
        drop(tx);
        for _ in 0..info.nr_hw_queues {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(m)) => {
                    stop_threads(disk);
                    return Err(UblkError::Queue(m));
                }
                Err(_) => {
                    stop_threads(disk);
                    return Err(UblkError::Queue("a ublk queue thread died".into()));
                }
            }
        }
        Ok(disk)
    }

    /// `ublk_stop_disk`: remove /dev/ublkb`id` (the kernel fails what it still has
    /// queued) and its queues.
    pub fn stop_disk(&self, id: u32) -> Result<(), UblkError> {
        let disk = self.disks().remove(&id).ok_or(UblkError::NoSuchDisk(id))?;
        self.remove(disk)
    }

    fn remove(&self, disk: Disk) -> Result<(), UblkError> {
        let id = disk.id;
        let r = self.ctrl.simple(sys::CMD_STOP_DEV, id, 0);
        stop_threads(disk);
        let r2 = self.ctrl.simple(sys::CMD_DEL_DEV, id, 0);
        tracing::info!("ublk: /dev/ublkb{id} removed");
        r.and(r2)
    }

    /// Refuse a new device once `shutdown` began (it sets the flag before it takes the
    /// device table; `reserve` and `install` check under that table's lock): a device
    /// started on a target that `ublk_destroy_target` took away would run with nothing
    /// to stop it.
    fn not_shut_down(&self) -> Result<(), UblkError> {
        if self.watcher_stop.load(Ordering::Acquire) {
            return Err(UblkError::NoTarget);
        }
        Ok(())
    }

    /// Stop every device and the watcher.
    pub fn shutdown(&self) {
        self.watcher_stop.store(true, Ordering::Release);
        let all: Vec<Disk> = std::mem::take(&mut *self.disks()).into_values().collect();
        for d in all {
            let id = d.id;
            if let Err(e) = self.remove(d) {
                tracing::warn!("ublk: stopping device {id}: {e}");
            }
        }
    }

    /// Remove the devices whose bdev went away (a removed PCI function, a detach). A
    /// vhost-user back-end that hangs up does not count: it may come back (reconnect),
    /// and until then the device's I/O fails.
    fn reap(&self) {
        let pci: Vec<String> = self
            .reg
            .controllers()
            .into_iter()
            .filter(|(a, _)| a.trtype == vireo_bdev::TrType::Pci)
            .map(|(a, _)| a.name)
            .collect();
        let gone: Vec<u32> = self
            .disks()
            .values()
            .filter(|d| {
                let ctrl = d.bdev.info().controller;
                d.bdev.is_removed()
                    || (pci.contains(&ctrl)
                        && self
                            .reg
                            .with_controller(&ctrl, |c| c.is_gone())
                            .unwrap_or(true))
                    || !self
                        .reg
                        .bdev(d.bdev.name())
                        .is_some_and(|b| Arc::ptr_eq(&b, &d.bdev))
            })
            .map(|d| d.id)
            .collect();
        for id in gone {
            let Some(d) = self.disks().remove(&id) else {
                continue;
            };
            tracing::warn!(
                "ublk: bdev {} went away: removing /dev/ublkb{id}",
                d.bdev.name()
            );
            if let Err(e) = self.remove(d) {
                tracing::warn!("ublk: removing device {id}: {e}");
            }
            // Its channels are closed: a removed function's controller can go now.
            self.reg.reap_removed();
        }
    }
}

fn watch(t: Weak<UblkTarget>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(200));
        match t.upgrade() {
            Some(t) => t.reap(),
            None => return,
        }
    }
}

fn stop_threads(disk: Disk) {
    disk.stop.store(true, Ordering::Release);
    for k in &disk.kicks {
        queue::kick(k);
    }
    for t in disk.threads {
        if t.join().is_err() {
            tracing::warn!("ublk: a queue thread of device {} panicked", disk.id);
        }
    }
}

/// The kernel's view of `b`: block sizes, capacity, largest request, discard, cache.
fn params_of(b: &Bdev) -> Result<Params, UblkError> {
    let i = b.info();
    let bs = i.block_size;
    if !bs.is_power_of_two() || !(512..=4096).contains(&bs) {
        return Err(UblkError::Unsuitable(format!(
            "bdev {} has {bs}-byte blocks: a ublk device takes 512 to 4096, a power of two",
            i.name
        )));
    }
    let shift = |v: u32| v.trailing_zeros() as u8;
    let phys = i.limits.physical_block_size.max(bs);
    let phys = if phys.is_power_of_two() { phys } else { bs };
    let mut attrs = 0;
    if i.read_only || !i.ops.write {
        attrs |= sys::ATTR_READ_ONLY;
    }
    if i.volatile_write_cache {
        attrs |= sys::ATTR_VOLATILE_CACHE;
    }
    let mut p = Params {
        types: sys::PARAM_TYPE_BASIC,
        basic: sys::ParamBasic {
            attrs,
            logical_bs_shift: shift(bs),
            physical_bs_shift: shift(phys),
            io_opt_shift: 0,
            io_min_shift: shift(bs),
            max_sectors: MAX_IO_BYTES >> 9,
            chunk_sectors: 0,
            dev_sectors: i.capacity_bytes() >> 9,
            virt_boundary_mask: 0,
        },
        ..Default::default()
    };
    // The channel splits requests past the device's limits: the kernel may send up to
    // 4 GiB at once.
    const MAX_SECTORS: u32 = 1 << 23;
    if (i.ops.unmap || i.ops.write_zeroes) && !i.read_only {
        p.types |= sys::PARAM_TYPE_DISCARD;
        p.discard = sys::ParamDiscard {
            discard_alignment: 0,
            discard_granularity: phys,
            max_discard_sectors: if i.ops.unmap { MAX_SECTORS } else { 0 },
            max_write_zeroes_sectors: if i.ops.write_zeroes { MAX_SECTORS } else { 0 },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    Ok(p)
}
