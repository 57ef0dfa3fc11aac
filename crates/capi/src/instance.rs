//! A `struct blkio`: one controller, one bdev, its properties and its queues.
//!
//! States as libblkio has them: *created* (driver chosen, connection properties set),
//! *connected* (the controller attached with every queue the device offers, device
//! properties readable, queue counts settable), *started* (queues open).

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_bdev::{Bdev, BlkController, BlkParams, ScsiController, ScsiParams};
use vireo_virtio::vhost_user::DEFAULT_REPLY_TIMEOUT;
use vireo_virtio::{
    DmaBuf, DmaConfig, DmaMemory, PciAddress, PciTransport, Transport, VdpaTransport,
    VhostUserTransport,
};

use crate::error::{busy, invalid, Fail, Res};
use crate::queue::{Queue, QueueBox};

/// Memory-region alignment: a page.
pub const MEM_REGION_ALIGNMENT: u64 = 4096;
/// The default queue size: vireo's, which every peer tested takes (libblkio's 256 is
/// more than QEMU's vhost-user devices use and than vhost-device-scsi accepts; it may be
/// set higher with "queue-size").
const DEFAULT_QUEUE_SIZE: u16 = vireo_bdev::config::DEFAULT_VQ_SIZE;
/// The smallest queue size tried when a back-end refuses a larger one.
const MIN_QUEUE_SIZE: u16 = 16;
/// vhost-user memory slots vireo asks for (more regions than this may be refused).
const MAX_MEM_REGIONS: u64 = 509;

/// The drivers, by libblkio name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    BlkVhostUser,
    BlkVfioPci,
    ScsiVhostUser,
    ScsiVfioPci,
    BlkVhostVdpa,
    ScsiVhostVdpa,
}

impl Driver {
    pub fn from_name(name: &str) -> Option<Driver> {
        Some(match name {
            "virtio-blk-vhost-user" => Driver::BlkVhostUser,
            "virtio-blk-vfio-pci" => Driver::BlkVfioPci,
            "virtio-scsi-vhost-user" => Driver::ScsiVhostUser,
            "virtio-scsi-vfio-pci" => Driver::ScsiVfioPci,
            "virtio-blk-vhost-vdpa" => Driver::BlkVhostVdpa,
            "virtio-scsi-vhost-vdpa" => Driver::ScsiVhostVdpa,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::BlkVhostUser => "virtio-blk-vhost-user",
            Driver::BlkVfioPci => "virtio-blk-vfio-pci",
            Driver::ScsiVhostUser => "virtio-scsi-vhost-user",
            Driver::ScsiVfioPci => "virtio-scsi-vfio-pci",
            Driver::BlkVhostVdpa => "virtio-blk-vhost-vdpa",
            Driver::ScsiVhostVdpa => "virtio-scsi-vhost-vdpa",
        }
    }

    fn scsi(self) -> bool {
        matches!(
            self,
            Driver::ScsiVhostUser | Driver::ScsiVfioPci | Driver::ScsiVhostVdpa
        )
    }

    fn vdpa(self) -> bool {
        matches!(self, Driver::BlkVhostVdpa | Driver::ScsiVhostVdpa)
    }

    fn pci(self) -> bool {
        matches!(self, Driver::BlkVfioPci | Driver::ScsiVfioPci)
    }

    /// Every driver name, for messages.
    pub const ALL: &'static str = "virtio-blk-vhost-user, virtio-blk-vfio-pci, virtio-blk-vhost-vdpa, virtio-scsi-vhost-user, virtio-scsi-vfio-pci, virtio-scsi-vhost-vdpa";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Created,
    Connected,
    Started,
}

enum Ctrl {
    Blk(BlkController),
    Scsi(ScsiController),
}

impl Ctrl {
    fn detach(self) {
        let r = match self {
            Ctrl::Blk(c) => c.detach(),
            Ctrl::Scsi(c) => c.detach(),
        };
        if let Err(e) = r {
            tracing::warn!("closing the controller: {e}");
        }
    }
}

/// What `blkio_connect` brought up.
struct Conn {
    ctrl: Option<Ctrl>,
    bdev: Arc<Bdev>,
    /// Request queues the controller has.
    queues: u16,
    /// The queue size the controller was brought up with.
    queue_size: u16,
}

/// A region the caller allocated with `blkio_alloc_mem_region`.
struct Allocated {
    buf: DmaBuf,
}

/// A `struct blkio`.
pub struct Blkio {
    pub driver: Driver,
    pub state: State,
    path: Option<String>,
    read_only: bool,
    direct: bool,
    target: i32,
    lun: i32,
    num_queues: i32,
    num_poll_queues: i32,
    queue_size: i32,
    /// Request queues the device offers (known once connected).
    max_queues: u16,
    conn: Option<Conn>,
    /// Started queues (None: removed), then poll queues.
    pub queues: Vec<Option<QueueBox>>,
    pub poll_queues: Vec<Option<QueueBox>>,
    allocated: Vec<Allocated>,
    /// Regions mapped with `blkio_map_mem_region`: (addr, len, shared by us).
    mapped: Vec<(u64, u64, bool)>,
}

/// A property's value, typed.
#[derive(Debug, Clone)]
pub enum Value {
    Bool(bool),
    Int(i32),
    U64(u64),
    Str(String),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::U64(_) => "uint64",
            Value::Str(_) => "str",
        }
    }

    pub fn to_text(&self) -> String {
        match self {
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::U64(u) => u.to_string(),
            Value::Str(s) => s.clone(),
        }
    }
}

/// A device property before `blkio_connect`: -ENODEV, as libblkio answers.
fn not_connected() -> Fail {
    Fail::new(
        libc::ENODEV,
        "the device must be connected first (blkio_connect)",
    )
}

fn not_found(name: &str) -> Fail {
    Fail::new(libc::ENOENT, format!("unknown property {name:?}"))
}

impl Blkio {
    pub fn new(driver: Driver) -> Blkio {
        Blkio {
            driver,
            state: State::Created,
            path: None,
            read_only: false,
            direct: false,
            target: 0,
            lun: 0,
            num_queues: 1,
            num_poll_queues: 0,
            max_queues: 0,
            queue_size: DEFAULT_QUEUE_SIZE as i32,
            conn: None,
            queues: Vec::new(),
            poll_queues: Vec::new(),
            allocated: Vec::new(),
            mapped: Vec::new(),
        }
    }

    fn conn(&self) -> Res<&Conn> {
        self.conn.as_ref().ok_or_else(not_connected)
    }

    pub fn bdev(&self) -> Option<&Arc<Bdev>> {
        self.conn.as_ref().map(|c| &c.bdev)
    }

    /// Read a property.
    pub fn get(&self, name: &str) -> Res<Value> {
        let connected = || -> Res<&Conn> { self.conn() };
        Ok(match name {
            "driver" => Value::Str(self.driver.name().into()),
            "can-add-queues" => Value::Bool(false),
            "read-only" => {
                Value::Bool(self.read_only || self.bdev().is_some_and(|b| b.info().read_only))
            }
            "path" => Value::Str(self.path.clone().unwrap_or_default()),
            "direct" => Value::Bool(self.direct),
            "target" | "lun" if self.driver.scsi() => Value::Int(if name == "target" {
                self.target
            } else {
                self.lun
            }),
            _ => {
                let c = connected().map_err(|e| {
                    if is_device_property(name) {
                        e
                    } else {
                        not_found(name)
                    }
                })?;
                self.device_property(c, name)?
            }
        })
    }

    fn device_property(&self, c: &Conn, name: &str) -> Res<Value> {
        let info = c.bdev.info();
        let bs = info.block_size as u64;
        let l = info.limits;
        let clamp_int = |v: u64| Value::Int(v.min(i32::MAX as u64) as i32);
        Ok(match name {
            "capacity" => Value::U64(c.bdev.num_blocks() * bs),
            "max-queues" => Value::Int(self.max_queues as i32),
            "num-queues" => Value::Int(self.num_queues),
            "num-poll-queues" => Value::Int(self.num_poll_queues),
            "supports-poll-queues" => Value::Bool(true),
            "max-mem-regions" => Value::U64(MAX_MEM_REGIONS),
            // A vDPA device may pin what is mapped into it (hardware ones do).
            "may-pin-mem-regions" => Value::Bool(self.driver.pci() || self.driver.vdpa()),
            "mem-region-alignment" => Value::U64(MEM_REGION_ALIGNMENT),
            "needs-mem-regions" => Value::Bool(false),
            "needs-mem-region-fd" => Value::Bool(!self.driver.pci()),
            "request-alignment" => clamp_int(bs),
            "optimal-io-alignment" => clamp_int(bs.max(l.physical_block_size as u64).max(bs)),
            "optimal-io-size" => {
                let align = bs.max(l.physical_block_size as u64);
                let opt = l.optimal_io_blocks as u64 * bs;
                clamp_int(if align != 0 && opt.is_multiple_of(align) {
                    opt
                } else {
                    0
                })
            }
            "buf-alignment" => Value::Int(1),
            "optimal-buf-alignment" => Value::Int(MEM_REGION_ALIGNMENT as i32),
            // Vectored requests go through one buffer: no per-request segment limit.
            "max-segments" => Value::Int(libc::UIO_MAXIOV),
            "max-segment-len" => Value::Int(0),
            // Larger requests are split to the device's limits.
            "max-transfer" => Value::Int(0),
            "can-grow" => Value::Bool(false),
            "supports-fua-natively" => Value::Bool(false),
            "flush-needed" => Value::Bool(info.volatile_write_cache),
            "max-write-zeroes-len" => Value::U64(0),
            "max-discard-len" => Value::U64(0),
            "discard-alignment" => clamp_int(if info.ops.unmap { bs } else { 0 }),
            "discard-alignment-offset" => Value::Int(0),
            "queue-size" => Value::Int(self.queue_size),
            "max-queue-size" => Value::Int(if self.driver.pci() {
                c.queue_size as i32
            } else {
                // vhost-user has no way to ask; the virtio limit.
                32768
            }),
            _ => return Err(not_found(name)),
        })
    }

    /// Write a property.
    pub fn set(&mut self, name: &str, v: Value) -> Res<()> {
        let created = self.state == State::Created;
        let connected = self.state == State::Connected;
        let want_created = |what: &str| {
            busy(format!(
                "{what:?} can only be set before blkio_connect (the instance is {})",
                self.state_name()
            ))
        };
        let want_connected = |what: &str| {
            busy(format!(
                "{what:?} can only be set between blkio_connect and blkio_start (the instance is {})",
                self.state_name()
            ))
        };
        match name {
            "path" => {
                let Value::Str(s) = v else {
                    return Err(wrong_type(name, "str", &v));
                };
                if !created {
                    return Err(want_created(name));
                }
                if s.is_empty() {
                    return Err(invalid("\"path\" is empty"));
                }
                self.path = Some(s);
            }
            "read-only" | "direct" => {
                let Value::Bool(b) = v else {
                    return Err(wrong_type(name, "bool", &v));
                };
                if !created {
                    return Err(want_created(name));
                }
                if name == "direct" {
                    // vireo's virtio drivers never go through a page cache.
                    self.direct = b;
                } else {
                    self.read_only = b;
                }
            }
            "target" | "lun" if self.driver.scsi() => {
                let Value::Int(i) = v else {
                    return Err(wrong_type(name, "int", &v));
                };
                if !created {
                    return Err(want_created(name));
                }
                let max = if name == "target" { 255 } else { 16383 };
                if !(0..=max).contains(&i) {
                    return Err(invalid(format!("{name:?} {i} must be 0 to {max}")));
                }
                if name == "target" {
                    self.target = i;
                } else {
                    self.lun = i;
                }
            }
            "num-queues" | "num-poll-queues" | "queue-size" => {
                // The state first: before connect these cannot be read, so
                // blkio_set_str passes its text through, and must get the same answer
                // as blkio_set_int.
                if !connected {
                    if created {
                        return Err(not_connected());
                    }
                    return Err(want_connected(name));
                }
                let Value::Int(i) = v else {
                    return Err(wrong_type(name, "int", &v));
                };
                self.conn()?;
                match name {
                    "queue-size" => {
                        if !(4..=32768).contains(&i) || (i as u32).count_ones() != 1 {
                            return Err(invalid(format!(
                                "\"queue-size\" {i} must be a power of two from 4 to 32768"
                            )));
                        }
                        self.queue_size = i;
                    }
                    _ => {
                        if i < 0 || i > self.max_queues as i32 {
                            return Err(invalid(format!(
                                "{name:?} {i} must be 0 to {} (\"max-queues\")",
                                self.max_queues
                            )));
                        }
                        if name == "num-queues" {
                            self.num_queues = i;
                        } else {
                            self.num_poll_queues = i;
                        }
                    }
                }
            }
            _ => {
                // A known read-only property, or none at all.
                if self.get(name).is_ok() || is_device_property(name) || is_created_property(name) {
                    return Err(Fail::new(
                        libc::EACCES,
                        format!("property {name:?} is read-only"),
                    ));
                }
                return Err(not_found(name));
            }
        }
        Ok(())
    }

    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Created => "created",
            State::Connected => "connected",
            State::Started => "started",
        }
    }

    /// Bring the controller up with `queue_size` (halved while the back-end refuses it).
    /// Bring the controller up; `mem`: the DMA memory to use (vhost-user and vhost-vdpa;
    /// a PCI function's memory comes with its transport), else new memory.
    fn attach(&self, queue_size: u16, vq_count: u16, mem: Option<Arc<DmaMemory>>) -> Res<Conn> {
        let Some(path) = self.path.clone() else {
            return Err(invalid(format!(
                "set \"path\" before blkio_connect ({})",
                if self.driver.pci() {
                    "the device's sysfs directory, e.g. /sys/bus/pci/devices/0000:00:04.0"
                } else if self.driver.vdpa() {
                    "the vhost-vdpa character device, e.g. /dev/vhost-vdpa-0"
                } else {
                    "the vhost-user socket"
                }
            )));
        };
        let mut size = queue_size;
        loop {
            match self.attach_once(&path, size, vq_count, mem.clone()) {
                Err(e)
                    if size > MIN_QUEUE_SIZE
                        && matches!(
                            e,
                            vireo_bdev::BdevError::QueueSizeRefused { .. }
                                | vireo_bdev::BdevError::QueueSetup { .. }
                        ) =>
                {
                    tracing::info!("{e}; trying queue size {}", size / 2);
                    size /= 2;
                }
                Err(e) => return Err(e.into()),
                Ok(c) => return Ok(c),
            }
        }
    }

    fn attach_once(
        &self,
        path: &str,
        queue_size: u16,
        vq_count: u16,
        mem: Option<Arc<DmaMemory>>,
    ) -> Result<Conn, vireo_bdev::BdevError> {
        // The memory given, else new memory (not for PCI: its transport makes its own).
        let memory = || mem.clone().map_or_else(|| DmaMemory::new(dma_config()), Ok);
        let name = "blkio";
        let verr = |source| vireo_bdev::BdevError::Virtio {
            name: name.into(),
            source,
        };
        let transport: Box<dyn Transport> = if self.driver.pci() {
            // libblkio's path is the sysfs directory; its last component is the address.
            let bdf = Path::new(path)
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or(path);
            let addr: PciAddress = bdf.parse().map_err(verr)?;
            let dma = dma_config();
            Box::new(PciTransport::open(addr, &dma).map_err(verr)?)
        } else if self.driver.vdpa() {
            // The character device, e.g. /dev/vhost-vdpa-0.
            let mem = memory().map_err(verr)?;
            let id = if self.driver.scsi() { 8 } else { 2 };
            Box::new(VdpaTransport::open(Path::new(path), mem, id).map_err(verr)?)
        } else {
            let mem = memory().map_err(verr)?;
            Box::new(
                VhostUserTransport::connect_with_options(
                    Path::new(path),
                    mem,
                    DEFAULT_REPLY_TIMEOUT,
                    false,
                    Some(name),
                )
                .map_err(verr)?,
            )
        };
        let (ctrl, bdev) = if self.driver.scsi() {
            let c = ScsiController::attach(
                &ScsiParams {
                    name: name.into(),
                    vq_count,
                    vq_size: queue_size,
                    reconnect_timeout: None,
                    packed_ring: Default::default(),
                },
                transport,
            )?;
            let bdev = match select_lun(&c, self.target, self.lun) {
                Ok(b) => b,
                Err(e) => {
                    let _ = c.detach();
                    return Err(e);
                }
            };
            (Ctrl::Scsi(c), bdev)
        } else {
            let c = BlkController::attach(
                &BlkParams {
                    name: name.into(),
                    vq_count,
                    vq_size: queue_size,
                    reconnect_timeout: None,
                    packed_ring: Default::default(),
                },
                transport,
            )?;
            let bdev = c.bdev().clone();
            (Ctrl::Blk(c), bdev)
        };
        let info = bdev.info();
        Ok(Conn {
            queues: info.num_queues,
            queue_size: info.queue_size,
            bdev,
            ctrl: Some(ctrl),
        })
    }

    pub fn connect(&mut self) -> Res<()> {
        if self.state != State::Created {
            return Err(busy(format!(
                "blkio_connect on an instance that is {}",
                self.state_name()
            )));
        }
        let conn = match self.reuse_parked()? {
            Some(c) => c,
            // Every queue the device offers: "max-queues" is known from here on.
            None => self.attach(DEFAULT_QUEUE_SIZE, 0, None)?,
        };
        self.queue_size = conn.queue_size as i32;
        self.max_queues = conn.queues;
        self.conn = Some(conn);
        self.state = State::Connected;
        Ok(())
    }

    /// The connection an earlier instance of this process left parked for this device.
    fn reuse_parked(&self) -> Res<Option<Conn>> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let Some(ctrl) = unpark(self.driver, path) else {
            return Ok(None);
        };
        let bdev = match &ctrl {
            Ctrl::Blk(c) => c.bdev().clone(),
            Ctrl::Scsi(c) => match select_lun(c, self.target, self.lun) {
                Ok(b) => b,
                Err(e) => {
                    ctrl.detach();
                    return Err(e.into());
                }
            },
        };
        let info = bdev.info();
        Ok(Some(Conn {
            queues: info.num_queues,
            queue_size: info.queue_size,
            bdev,
            ctrl: Some(ctrl),
        }))
    }

    pub fn start(&mut self) -> Res<()> {
        if self.state != State::Connected {
            return Err(busy(format!(
                "blkio_start on an instance that is {}",
                self.state_name()
            )));
        }
        let (nq, npq) = (self.num_queues, self.num_poll_queues);
        let c = self.conn()?;
        if nq + npq == 0 {
            return Err(invalid("\"num-queues\" and \"num-poll-queues\" are both 0"));
        }
        if nq + npq > self.max_queues as i32 {
            return Err(invalid(format!(
                "\"num-queues\" {nq} + \"num-poll-queues\" {npq} exceed the {} queues of the device (\"max-queues\")",
                self.max_queues
            )));
        }
        let need = (nq + npq) as u16;
        if self.queue_size != c.queue_size as i32 || c.queues > need {
            // The controller came up with every queue the device offers, and with the
            // default size: bring it up again with the queues that will be used (a
            // polling back-end serves every enabled queue: SPDK's vhost-blk at QD1 ran
            // at a quarter of its speed with its 32 queues enabled) and the size asked for.
            let size = self.queue_size as u16;
            // The same DMA memory goes on (but for a PCI function, whose memory comes
            // with its transport): regions allocated since connect stay valid.
            let keep = if self.driver.pci() {
                None
            } else {
                self.conn.as_ref().map(|c| c.bdev.memory().clone())
            };
            if let Some(old) = self.conn.take().and_then(|mut c| c.ctrl.take()) {
                old.detach();
            }
            let conn = self.attach(size, need, keep)?;
            if conn.queue_size != size {
                let got = conn.queue_size;
                self.conn = Some(conn);
                return Err(invalid(format!(
                    "the device refused queue size {size} (it takes {got}; see \"max-queue-size\")"
                )));
            }
            self.conn = Some(conn);
        }
        let bdev = self.conn()?.bdev.clone();
        let mut queues = Vec::new();
        for i in 0..(nq + npq) {
            let poll = i >= nq;
            queues.push(Some(QueueBox::new(Queue::open(
                &bdev,
                poll,
                self.read_only,
            )?)));
        }
        self.poll_queues = queues.split_off(nq as usize);
        self.queues = queues;
        self.state = State::Started;
        Ok(())
    }

    fn memory(&self) -> Res<Arc<DmaMemory>> {
        Ok(self.conn()?.bdev.memory().clone())
    }

    /// `blkio_alloc_mem_region`: page-aligned memory the device can use in place, with
    /// the file backing it.
    pub fn alloc_mem_region(&mut self, len: usize) -> Res<(u64, u64, i32, u64)> {
        // From connect on (as libblkio), but for a PCI function, whose DMA memory is
        // made again when blkio_start brings the controller up with its final queues.
        let ok = match self.state {
            State::Started => true,
            State::Connected => !self.driver.pci(),
            _ => false,
        };
        if !ok {
            return Err(busy(if self.driver.pci() {
                "blkio_alloc_mem_region before blkio_start (virtio-blk-vfio-pci: the DMA memory is made at start)"
            } else {
                "blkio_alloc_mem_region before blkio_connect"
            }));
        }
        if len == 0 || !(len as u64).is_multiple_of(MEM_REGION_ALIGNMENT) {
            return Err(invalid(format!(
                "length {len} must be a non-zero multiple of \"mem-region-alignment\" ({MEM_REGION_ALIGNMENT})"
            )));
        }
        let mem = self.memory()?;
        let buf = mem
            .alloc(len, MEM_REGION_ALIGNMENT as usize)
            .map_err(|e| Fail::new(libc::ENOMEM, e.to_string()))?;
        let addr = buf.addr();
        let region = mem
            .regions()
            .iter()
            .find(|r| r.contains(addr, len as u64))
            .copied()
            .ok_or_else(|| Fail::new(libc::EIO, "allocated memory is in no region"))?;
        let fd_offset = region.fd_offset + (addr - region.va);
        self.allocated.push(Allocated { buf });
        Ok((addr, len as u64, region.fd, fd_offset))
    }

    /// `blkio_free_mem_region`.
    pub fn free_mem_region(&mut self, addr: u64, len: u64) {
        self.mapped.retain(|&(a, l, _)| !(a == addr && l == len));
        self.allocated
            .retain(|a| !(a.buf.addr() == addr && a.buf.len() as u64 == len));
    }

    /// `blkio_map_mem_region`.
    pub fn map_mem_region(
        &mut self,
        addr: u64,
        len: u64,
        fd: Option<BorrowedFd<'_>>,
        fd_offset: u64,
    ) -> Res<()> {
        if self.state != State::Started {
            return Err(busy("blkio_map_mem_region before blkio_start"));
        }
        if addr.checked_add(len).is_none() {
            return Err(invalid(format!(
                "[{addr:#x}, +{len}) runs past the end of the address space"
            )));
        }
        if self
            .mapped
            .iter()
            .any(|&(a, l, _)| addr < a + l && a < addr.saturating_add(len))
        {
            return Err(invalid(format!(
                "[{addr:#x}, +{len}) overlaps a region already mapped"
            )));
        }
        // Memory from blkio_alloc_mem_region is shared with the device already.
        let ours = self
            .allocated
            .iter()
            .any(|a| a.buf.addr() <= addr && addr + len <= a.buf.addr() + a.buf.len() as u64);
        if !ours {
            if !addr.is_multiple_of(MEM_REGION_ALIGNMENT)
                || !len.is_multiple_of(MEM_REGION_ALIGNMENT)
                || len == 0
            {
                return Err(invalid(format!(
                    "addr {addr:#x} and len {len} must be non-zero multiples of \"mem-region-alignment\" ({MEM_REGION_ALIGNMENT})"
                )));
            }
            let mut shared = true;
            if fd.is_none() && !self.driver.pci() {
                // vhost-user shares memory through its file: find it, as the kernel knows
                // it (a shared file or memfd mapping); private memory cannot be shared and
                // is bounced, the mapping is then only a promise the caller keeps.
                match file_of_mapping(addr, len) {
                    Some((file, off)) => {
                        use std::os::fd::AsFd;
                        self.memory()?
                            .add_external(addr, len, Some(file.as_fd()), off)
                            .map_err(|e| invalid(e.to_string()))?;
                    }
                    None => {
                        tracing::info!(
                            "memory region [{addr:#x}, +{len}) has no file to share with a vhost-user device (fd -1, not a shared file mapping): I/O in it is copied through vireo's memory"
                        );
                        shared = false;
                    }
                }
            } else {
                self.memory()?
                    .add_external(addr, len, fd, fd_offset)
                    .map_err(|e| invalid(e.to_string()))?;
            }
            self.mapped.push((addr, len, shared));
            return Ok(());
        }
        self.mapped.push((addr, len, false));
        Ok(())
    }

    /// `blkio_unmap_mem_region`.
    pub fn unmap_mem_region(&mut self, addr: u64, len: u64) {
        let Some(pos) = self
            .mapped
            .iter()
            .position(|&(a, l, _)| a == addr && l == len)
        else {
            return;
        };
        let (_, _, external) = self.mapped.remove(pos);
        if external {
            if let Ok(mem) = self.memory() {
                mem.remove_external(addr, len);
            }
        }
    }
}

impl Drop for Blkio {
    fn drop(&mut self) {
        // Queues first (their requests end), then the caller's memory, then the device.
        self.queues.clear();
        self.poll_queues.clear();
        let mapped = std::mem::take(&mut self.mapped);
        for (addr, len, external) in mapped {
            if external {
                if let Ok(mem) = self.memory() {
                    mem.remove_external(addr, len);
                }
            }
        }
        self.allocated.clear();
        if let Some(ctrl) = self.conn.as_mut().and_then(|c| c.ctrl.take()) {
            match (&self.state, &self.path) {
                // Never started: the next instance of this process may want it.
                (State::Connected, Some(path)) => park(self.driver, path.clone(), ctrl),
                _ => ctrl.detach(),
            }
        }
    }
}

/// The file behind `[addr, addr+len)` when one shared file mapping (a memfd, a file
/// mapped `MAP_SHARED`) holds it: the file (from `/proc/self/map_files`) and the offset of
/// `addr` in it.
fn file_of_mapping(addr: u64, len: u64) -> Option<(std::fs::File, u64)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    for line in maps.lines() {
        // start-end perms offset dev inode [path]
        let mut f = line.split_whitespace();
        let range = f.next()?;
        let perms = f.next()?;
        let offset = u64::from_str_radix(f.next()?, 16).ok()?;
        let (s, e) = range.split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(s, 16).ok()?,
            u64::from_str_radix(e, 16).ok()?,
        );
        if addr < start || addr >= end {
            continue;
        }
        if addr.checked_add(len).is_none_or(|e| e > end) || !perms.ends_with('s') {
            return None;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/map_files/{range}"))
            .ok()?;
        return Some((file, offset + (addr - start)));
    }
    None
}

/// The library's DMA memory: huge pages when the system has them reserved, else normal
/// pages (as `vireo perf --hugepages=auto`): some back-ends need memory in 2 MiB units
/// (SPDK's vhost target fails on anything else). 16 MiB to start, growing on demand.
fn dma_config() -> DmaConfig {
    DmaConfig {
        initial_region_size: 16 << 20,
        hugetlb: true,
        hugetlb_fallback: true,
        ..DmaConfig::default()
    }
}

/// The bdev of LUN `target`/`lun` of a scsi controller.
fn select_lun(
    c: &ScsiController,
    target: i32,
    lun: i32,
) -> Result<Arc<Bdev>, vireo_bdev::BdevError> {
    let found = c.bdevs().into_iter().find(|b| {
        b.info()
            .scsi
            .is_some_and(|a| (a.target as i32, a.lun as i32) == (target, lun))
    });
    found.ok_or_else(|| {
        let luns: Vec<String> = c
            .bdevs()
            .iter()
            .filter_map(|b| b.info().scsi.map(|a| format!("{}/{}", a.target, a.lun)))
            .collect();
        vireo_bdev::BdevError::NotFound(format!(
            "no LUN at target {target} lun {lun} (set \"target\" and \"lun\"; the device has {})",
            if luns.is_empty() {
                "none".to_string()
            } else {
                luns.join(", ")
            }
        ))
    })
}

/// How long the connection of an instance destroyed before `blkio_start` waits for the
/// process's next instance of the same device.
const LINGER: Duration = Duration::from_secs(5);

/// A connection of an instance that was connected, never started, and destroyed.
struct Parked {
    driver: Driver,
    path: String,
    ctrl: Ctrl,
    since: Instant,
}

/// Connections waiting for reuse: a program that connects to read the device's
/// properties, destroys the instance and connects again for its I/O (fio's libblkio
/// engine does) then reaches back-ends that serve one front-end connection in their
/// life as well as those that serve many.
static PARKED: Mutex<Vec<Parked>> = Mutex::new(Vec::new());

fn parked() -> std::sync::MutexGuard<'static, Vec<Parked>> {
    PARKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Close the parked connections older than [`LINGER`].
fn close_expired() {
    let expired: Vec<Parked> = {
        let mut p = parked();
        let (old, keep): (Vec<Parked>, Vec<Parked>) =
            p.drain(..).partition(|x| x.since.elapsed() >= LINGER);
        *p = keep;
        old
    };
    for x in expired {
        x.ctrl.detach();
    }
}

/// Before the process forks (fio runs its jobs in forked processes unless `--thread`),
/// parked connections are closed: a child must not share them with its parent, and
/// back-ends that serve one connection at a time must be free for the child's.
extern "C" fn close_parked_before_fork() {
    let all: Vec<Parked> = std::mem::take(&mut *parked());
    for x in all {
        x.ctrl.detach();
    }
}

fn park(driver: Driver, path: String, ctrl: Ctrl) {
    static AT_FORK: std::sync::Once = std::sync::Once::new();
    AT_FORK.call_once(|| {
        // SAFETY: registers a handler that only touches this library's own state; it
        // stays valid for the life of the process (the library is never unloaded while
        // it has parked connections: they hold its threads).
        let r = unsafe { libc::pthread_atfork(Some(close_parked_before_fork), None, None) };
        if r != 0 {
            tracing::warn!("pthread_atfork failed ({r}): connections are not closed at fork");
        }
    });
    parked().push(Parked {
        driver,
        path,
        ctrl,
        since: Instant::now(),
    });
    // Closed after LINGER if nobody takes it.
    let _ = std::thread::Builder::new()
        .name("blkio-linger".into())
        .spawn(|| {
            std::thread::sleep(LINGER + Duration::from_millis(50));
            close_expired();
        });
}

/// A parked connection to `path` with `driver`, if there is one.
fn unpark(driver: Driver, path: &str) -> Option<Ctrl> {
    close_expired();
    let mut p = parked();
    let i = p
        .iter()
        .position(|x| x.driver == driver && x.path == path)?;
    Some(p.remove(i).ctrl)
}

fn wrong_type(name: &str, want: &str, got: &Value) -> Fail {
    Fail::new(
        libc::ENOTTY,
        format!("property {name:?} is a {want}, not a {}", got.type_name()),
    )
}

/// Properties that exist once connected.
fn is_device_property(name: &str) -> bool {
    matches!(
        name,
        "capacity"
            | "max-queues"
            | "num-queues"
            | "num-poll-queues"
            | "supports-poll-queues"
            | "max-mem-regions"
            | "may-pin-mem-regions"
            | "mem-region-alignment"
            | "needs-mem-regions"
            | "needs-mem-region-fd"
            | "request-alignment"
            | "optimal-io-alignment"
            | "optimal-io-size"
            | "buf-alignment"
            | "optimal-buf-alignment"
            | "max-segments"
            | "max-segment-len"
            | "max-transfer"
            | "can-grow"
            | "supports-fua-natively"
            | "flush-needed"
            | "max-write-zeroes-len"
            | "max-discard-len"
            | "discard-alignment"
            | "discard-alignment-offset"
            | "queue-size"
            | "max-queue-size"
    )
}

fn is_created_property(name: &str) -> bool {
    matches!(name, "driver" | "can-add-queues")
}
