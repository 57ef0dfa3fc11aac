//! vhost-user front-end transport: vireo drives a vhost-user back-end over a unix
//! socket. The control plane is rust-vmm's `vhost` crate; the data plane (rings, kicks)
//! is ours.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};
use crate::features::transport as tf;
use crate::memory::{DmaMemory, DmaRegionInfo, RegionListener};
use crate::notify::Notifier;
use crate::ring::RingLayout;
use crate::transport::{InflightBuffer, Transport};

/// Regions `SET_MEM_TABLE` can carry.
pub const MAX_MEM_TABLE_REGIONS: usize = 8;
/// How long to wait for the back-end to accept the connection, and to answer one
/// control message.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Queue index limit of the vhost-user protocol.
const MAX_VRINGS: u64 = 0x8000;

/// Back-ends known to serve one front-end at a time, for messages about a back-end that
/// turns a connection away.
const ONE_FRONT_END: &str =
    "qemu-storage-daemon and vhost-device-scsi accept one front-end at a time";

/// Whether `e` says the peer hung up (end of file, a reset or broken socket) rather
/// than sending something that is not vhost-user.
fn connection_closed(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as U;
    matches!(
        e,
        vhost::Error::VhostUserProtocol(
            U::Disconnected | U::PartialMessage | U::SocketBroken(_) | U::SocketError(_)
        )
    )
}

/// Protocol features vireo understands and acks when offered (`INFLIGHT_SHMFD` only
/// for a controller that reconnects, see [`VhostUserTransport::connect_with_options`]).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// Whom a connection's log lines are about: its controller (when the caller named
/// one) and its socket. A warning without them does not say which of several
/// controllers it concerns.
#[derive(Debug, Clone)]
struct Who {
    controller: Option<Arc<str>>,
    socket: Arc<Path>,
}

impl Who {
    fn warn(&self, msg: std::fmt::Arguments<'_>) {
        let socket = self.socket.display();
        match &self.controller {
            Some(c) => tracing::warn!(controller = %c, socket = %socket, "{msg}"),
            None => tracing::warn!(socket = %socket, "{msg}"),
        }
    }
}

struct Vring {
    _kick: Arc<EventFd>,
    call: Arc<EventFd>,
}

/// Shares new DMA regions with the back-end as the memory grows.
struct MemoryShare {
    frontend: Mutex<Frontend>,
    /// REPLY_ACK was negotiated: every message is acknowledged.
    reply_ack: bool,
    mem_slots: Option<u64>,
    regions: Mutex<Vec<DmaRegionInfo>>,
    broken: Arc<AtomicBool>,
    watchdog: Arc<Watchdog>,
    timeout: Duration,
    who: Who,
}

fn region_msg(r: &DmaRegionInfo) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: r.iova,
        memory_size: r.len,
        userspace_addr: r.va,
        mmap_offset: r.fd_offset,
        mmap_handle: r.fd,
    }
}

/// A SET_MEM_TABLE body: regions sorted by guest address (back-ends built on
/// rust-vmm's vm-memory refuse unsorted tables).
fn mem_table(regions: &[DmaRegionInfo]) -> Vec<VhostUserMemoryRegionInfo> {
    let mut v: Vec<_> = regions.iter().map(region_msg).collect();
    v.sort_by_key(|r| r.guest_phys_addr);
    v
}

impl MemoryShare {
    fn share(&self, r: &DmaRegionInfo) -> Result<()> {
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        let mut fe = self.frontend.lock().unwrap_or_else(|e| e.into_inner());
        match self.mem_slots {
            Some(slots) => {
                if regions.len() as u64 >= slots {
                    return Err(Error::RegionRejected(format!(
                        "the back-end has {slots} memory slots, all in use"
                    )));
                }
                fe.add_mem_region(&region_msg(r))
                    .map_err(|e| Error::transport("vhost-user ADD_MEM_REG", e))?;
                regions.push(*r);
            }
            None => {
                if regions.len() >= MAX_MEM_TABLE_REGIONS {
                    return Err(Error::RegionRejected(format!(
                        "SET_MEM_TABLE carries at most {MAX_MEM_TABLE_REGIONS} regions and the back-end does not offer CONFIGURE_MEM_SLOTS; use a larger first DMA region (vireo: --dma-region-size)"
                    )));
                }
                regions.push(*r);
                if let Err(e) = fe.set_mem_table(&mem_table(&regions)) {
                    regions.pop();
                    return Err(Error::transport("vhost-user SET_MEM_TABLE", e));
                }
            }
        }
        if !self.reply_ack {
            // The region must be mapped by the back-end before a buffer in it is used.
            fe.get_features()
                .map_err(|e| Error::transport("vhost-user GET_FEATURES (sync)", e))?;
        }
        Ok(())
    }
}

impl RegionListener for MemoryShare {
    fn region_added(&self, region: &DmaRegionInfo) -> Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            // A dead back-end does not need the region; its I/O fails anyway.
            return Ok(());
        }
        let armed = self.watchdog.arm(self.timeout);
        let r = self.share(region);
        drop(armed);
        match r {
            // It stopped answering (the watchdog cut it off) or hung up meanwhile: like a
            // back-end already dead, it does not need the region (a reconnection shares
            // every region anew), and the memory grows for the other controllers.
            Err(e) if self.broken.load(Ordering::Acquire) => {
                self.who.warn(format_args!(
                    "not sharing a new DMA region with a back-end that is gone: {e}"
                ));
                Ok(())
            }
            r => r,
        }
    }

    fn region_removed(&self, region: &DmaRegionInfo) {
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = regions.iter().position(|r| r.index == region.index) {
            regions.remove(pos);
            if self.broken.load(Ordering::Relaxed) {
                return;
            }
            let mut fe = self.frontend.lock().unwrap_or_else(|e| e.into_inner());
            // Bounded like every control message: a silent back-end is cut off.
            let armed = self.watchdog.arm(self.timeout);
            let _ = match self.mem_slots {
                Some(_) => fe.remove_mem_region(&region_msg(region)),
                None => fe.set_mem_table(&mem_table(&regions)).map(|_| ()),
            };
            drop(armed);
        }
    }
}

/// A connection to a vhost-user back-end.
pub struct VhostUserTransport {
    path: PathBuf,
    who: Who,
    frontend: Frontend,
    mem: Arc<DmaMemory>,
    protocol: VhostUserProtocolFeatures,
    offered: u64,
    queue_num: Option<u64>,
    vrings: Vec<Option<Vring>>,
    share: Option<Arc<MemoryShare>>,
    broken: Arc<AtomicBool>,
    watchdog: Arc<Watchdog>,
    timeout: Duration,
    monitor: Option<std::thread::JoinHandle<()>>,
    stop_monitor: Arc<EventFd>,
    started: bool,
    /// The socket, to shut down when vireo gives up on a silent back-end.
    abort_stream: UnixStream,
}

impl std::fmt::Debug for VhostUserTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserTransport")
            .field("path", &self.path)
            .finish()
    }
}

impl VhostUserTransport {
    /// Connect to the back-end listening on `path` and negotiate the protocol.
    pub fn connect(path: &Path, mem: Arc<DmaMemory>) -> Result<VhostUserTransport> {
        Self::connect_with_timeout(path, mem, DEFAULT_REPLY_TIMEOUT)
    }

    /// As [`connect`](Self::connect), with a bound on the connect and on every
    /// control-message reply.
    pub fn connect_with_timeout(
        path: &Path,
        mem: Arc<DmaMemory>,
        timeout: Duration,
    ) -> Result<VhostUserTransport> {
        Self::connect_with_options(path, mem, timeout, false, None)
    }

    /// As [`connect_with_timeout`](Self::connect_with_timeout); `track_inflight`: ack
    /// `INFLIGHT_SHMFD` when offered (for a controller that reconnects: the back-end
    /// then resends what it had in flight, see [`Transport::get_inflight`]);
    /// `controller`: the name the connection's warnings carry (field `controller`).
    pub fn connect_with_options(
        path: &Path,
        mem: Arc<DmaMemory>,
        timeout: Duration,
        track_inflight: bool,
        controller: Option<&str>,
    ) -> Result<VhostUserTransport> {
        let who = Who {
            controller: controller.map(Arc::from),
            socket: Arc::from(path),
        };
        let ctx = |what: &str| format!("vhost-user {}: {what}", path.display());
        let stream = crate::unix::connect_unix(path, timeout).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                Error::NotAccepting {
                    path: path.to_path_buf(),
                    timeout,
                }
            } else {
                Error::io(
                    format!(
                        "cannot connect to vhost-user socket {} (is the target running and the path right?)",
                        path.display()
                    ),
                    e,
                )
            }
        })?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| Error::io(ctx("cannot set socket timeout"), e))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| Error::io(ctx("cannot set socket timeout"), e))?;
        let monitor_stream = stream
            .try_clone()
            .map_err(|e| Error::io(ctx("cannot duplicate socket"), e))?;
        let abort_stream = stream
            .try_clone()
            .map_err(|e| Error::io(ctx("cannot duplicate socket"), e))?;
        let broken = Arc::new(AtomicBool::new(false));
        let watchdog = Arc::new(Watchdog::default());
        let stop_monitor = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io(ctx("cannot create eventfd"), e))?,
        );
        let monitor = {
            let broken = broken.clone();
            let stop = stop_monitor.clone();
            let wd = watchdog.clone();
            let who = who.clone();
            std::thread::Builder::new()
                .name("vhost-user-monitor".into())
                .spawn(move || monitor_socket(monitor_stream, &stop, &broken, &wd, &who))
                .map_err(|e| Error::io(ctx("cannot start monitor thread"), e))?
        };
        let mut frontend = Frontend::from_stream(stream, MAX_VRINGS);
        let wd = watchdog.clone();
        // Whether the back-end answered a message yet: a back-end that closes the
        // connection before its first answer is turning this front-end away.
        let answered = std::cell::Cell::new(false);
        let not_vhost = |e: vhost::Error| {
            let why = if wd.fired() {
                // A connection waits in the listen queue until the back-end accepts
                // it: a back-end serving another front-end may never do so.
                format!(
                    "no reply within {}: the back-end may be serving another front-end ({ONE_FRONT_END}) and take this one only once that one disconnects; or it is frozen",
                    crate::unix::secs(timeout)
                )
            } else if connection_closed(&e) && !answered.get() {
                format!(
                    "the back-end closed the connection without answering: it may be serving another front-end ({ONE_FRONT_END}); disconnect that one first"
                )
            } else if connection_closed(&e) {
                "the back-end closed the connection during the handshake (its log may say why)"
                    .to_string()
            } else {
                "the answer is not a valid vhost-user message (is this a vhost-user back-end socket?)"
                    .to_string()
            };
            Error::transport(format!("{}: {why}", ctx("handshake")), e)
        };
        let armed = watchdog.arm(timeout);
        let handshake = (|| -> Result<_> {
            frontend.set_owner().map_err(&not_vhost)?;
            let offered = frontend.get_features().map_err(&not_vhost)?;
            answered.set(true);
            let mut protocol = VhostUserProtocolFeatures::empty();
            if offered & tf::VHOST_USER_PROTOCOL_FEATURES != 0 {
                let theirs = frontend.get_protocol_features().map_err(&not_vhost)?;
                let mut wanted = wanted_protocol_features();
                if track_inflight {
                    wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
                }
                protocol = theirs & wanted;
                frontend
                    .set_protocol_features(protocol)
                    .map_err(&not_vhost)?;
                if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                }
            }
            let queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
                Some(frontend.get_queue_num().map_err(&not_vhost)?)
            } else {
                None
            };
            Ok((offered, protocol, queue_num))
        })();
        drop(armed);
        let (offered, protocol, queue_num) = match handshake {
            Ok(v) => v,
            Err(e) => {
                let _ = stop_monitor.write(1);
                let _ = monitor.join();
                return Err(e);
            }
        };
        Ok(VhostUserTransport {
            path: path.to_path_buf(),
            who,
            frontend,
            mem,
            protocol,
            offered,
            queue_num,
            vrings: Vec::new(),
            share: None,
            broken,
            watchdog,
            timeout,
            monitor: Some(monitor),
            stop_monitor,
            started: false,
            abort_stream,
        })
    }

    /// Protocol features both sides agreed on.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Run a control-plane call under the reply deadline.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let wd = self.watchdog.clone();
        let armed = wd.arm(self.timeout);
        let r = f(self);
        drop(armed);
        if r.is_err() && wd.fired() {
            return r.map_err(|e| {
                Error::transport(
                    format!(
                        "vhost-user {}: no reply within {} ms",
                        self.path.display(),
                        self.timeout.as_millis()
                    ),
                    e,
                )
            });
        }
        r
    }

    fn ctx(&self, what: &str) -> String {
        format!("vhost-user {}: {what}", self.path.display())
    }

    fn share_memory(&mut self) -> Result<()> {
        let mem_slots = if self
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        {
            Some(
                self.frontend
                    .get_max_mem_slots()
                    .map_err(|e| Error::transport(self.ctx("GET_MAX_MEM_SLOTS"), e))?,
            )
        } else {
            None
        };
        let share = Arc::new(MemoryShare {
            frontend: Mutex::new(self.frontend.clone()),
            mem_slots,
            reply_ack: self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK),
            regions: Mutex::new(Vec::new()),
            broken: self.broken.clone(),
            watchdog: self.watchdog.clone(),
            timeout: self.timeout,
            who: self.who.clone(),
        });
        let weak: std::sync::Weak<dyn RegionListener> =
            Arc::downgrade(&(share.clone() as Arc<dyn RegionListener>));
        let initial = self.mem.add_listener(weak);
        match mem_slots {
            Some(_) => {
                for r in initial.iter() {
                    share.share(r)?;
                }
            }
            None => {
                if initial.len() > MAX_MEM_TABLE_REGIONS {
                    return Err(Error::RegionRejected(format!(
                        "DMA memory has {} regions but SET_MEM_TABLE carries at most {MAX_MEM_TABLE_REGIONS}",
                        initial.len()
                    )));
                }
                self.frontend
                    .set_mem_table(&mem_table(&initial))
                    .map_err(|e| Error::transport(self.ctx("SET_MEM_TABLE"), e))?;
                *share.regions.lock().unwrap_or_else(|e| e.into_inner()) = initial.to_vec();
            }
        }
        self.share = Some(share);
        Ok(())
    }
}

/// Bounds control-plane calls: the `vhost` crate retries a socket that has no data
/// forever, so a back-end that never answers would hang us. When an armed deadline
/// passes, the monitor shuts the socket down and the pending call fails.
///
/// The reply deadlines of the control calls under way on one connection: each call
/// (from any thread: an attach, a reconnection, a DMA region shared on another
/// controller's behalf) has its own, and the monitor cuts the connection when any one
/// passes.
#[derive(Debug, Default)]
struct Watchdog {
    deadlines: Mutex<Vec<(u64, Instant)>>,
    next: std::sync::atomic::AtomicU64,
    fired: AtomicBool,
}

/// One armed deadline; disarmed when dropped.
struct Armed<'a> {
    wd: &'a Watchdog,
    id: u64,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.wd.lock().retain(|(i, _)| *i != self.id);
    }
}

impl Watchdog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Instant)>> {
        self.deadlines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arm(&self, timeout: Duration) -> Armed<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().push((id, Instant::now() + timeout));
        Armed { wd: self, id }
    }

    /// Forget every deadline (the connection was cut).
    fn clear(&self) {
        self.lock().clear();
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    fn expired(&self) -> bool {
        let now = Instant::now();
        self.lock().iter().any(|(_, d)| now >= *d)
    }
}

/// Wait until the peer hangs up (or we are told to stop) and raise the broken flag;
/// enforce the watchdog's deadline.
fn monitor_socket(
    stream: UnixStream,
    stop: &EventFd,
    broken: &AtomicBool,
    wd: &Watchdog,
    who: &Who,
) {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if wd.expired() {
            who.warn(format_args!(
                "vhost-user back-end did not answer in time; closing the connection"
            ));
            wd.fired.store(true, Ordering::Release);
            broken.store(true, Ordering::Release);
            let _ = stream.shutdown(std::net::Shutdown::Both);
            wd.clear();
        }
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            who.warn(format_args!("vhost-user back-end closed the connection"));
            broken.store(true, Ordering::Release);
            return;
        }
    }
}

impl Transport for VhostUserTransport {
    fn describe(&self) -> String {
        format!("vhost-user back-end at {}", self.path.display())
    }

    fn device_features(&mut self) -> Result<u64> {
        Ok(self.offered & !tf::VHOST_USER_PROTOCOL_FEATURES)
    }

    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        self.guarded(|t| t.set_driver_features_inner(features))
    }

    fn max_queues(&mut self) -> Result<Option<u16>> {
        Ok(self.queue_num.map(|n| n.min(u16::MAX as u64) as u16))
    }

    fn max_queue_size(&mut self, _index: u16) -> Result<Option<u16>> {
        Ok(None)
    }

    fn has_config(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::CONFIG)
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        self.guarded(|t| t.read_config_inner(offset, buf))
    }

    fn setup_queue(&mut self, index: u16, layout: &RingLayout) -> Result<Notifier> {
        // SET_VRING_BASE of a fresh ring: the next avail index 0; a packed ring's carries
        // its wrap counter in bit 15 as well, which starts at 1 (virtio 1.2 2.8.1; QEMU
        // sends 0x8000 too, and DPDK-based back-ends such as SPDK take the counter from
        // that bit: a 0 would make them wait for descriptors of the wrong lap).
        let base = if layout.packed { 0x8000 } else { 0 };
        self.guarded(|t| t.setup_queue_inner(index, layout, base))
    }

    fn resume_queue(&mut self, index: u16, layout: &RingLayout, base: u16) -> Result<Notifier> {
        if layout.packed {
            // A packed ring's state is two positions with their wrap counters, which
            // only the back-end's packed in-flight records restore (SPDK does so only
            // with its packed-ring recovery switched on): vireo does not resume packed
            // rings; a reconnection gives them fresh rings and resends.
            return Err(Error::InvalidQueue(format!(
                "{}: queue {index} is a packed ring, which vireo does not resume on a new connection (fresh rings are set up instead)",
                self.describe()
            )));
        }
        self.guarded(|t| t.setup_queue_inner(index, layout, base))
    }

    fn get_inflight(&mut self, num_queues: u16, queue_size: u16) -> Result<Option<InflightBuffer>> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Ok(None);
        }
        let ask = VhostUserInflight::new(0, 0, num_queues, queue_size);
        let r = self.guarded(|t| {
            t.frontend
                .get_inflight_fd(&ask)
                .map_err(|e| Error::transport(t.ctx("GET_INFLIGHT_FD"), e))
        });
        match r {
            Ok((info, file)) if info.mmap_size > 0 => Ok(Some(InflightBuffer {
                file: Arc::new(file),
                mmap_size: info.mmap_size,
                mmap_offset: info.mmap_offset,
                num_queues,
                queue_size,
            })),
            Ok(_) => Ok(None),
            Err(e) if !self.broken.load(Ordering::Relaxed) => {
                // The back-end offered tracking but cannot give a buffer: go without
                // (vireo resends from its own records).
                self.who.warn(format_args!(
                    "{e}; reconnection resends from vireo's records"
                ));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn tracks_inflight(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_inflight(&mut self, buf: &InflightBuffer) -> Result<()> {
        use std::os::fd::AsRawFd;
        let info = VhostUserInflight::new(
            buf.mmap_size,
            buf.mmap_offset,
            buf.num_queues,
            buf.queue_size,
        );
        let fd = buf.file.as_raw_fd();
        self.guarded(|t| {
            t.frontend
                .set_inflight_fd(&info, fd)
                .map_err(|e| Error::transport(t.ctx("SET_INFLIGHT_FD"), e))
        })
    }

    fn start(&mut self) -> Result<()> {
        self.guarded(|t| t.start_inner())
    }

    fn shutdown(&mut self) -> Result<()> {
        self.guarded(|t| t.shutdown_inner())
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

    fn reopener(&self) -> Option<crate::transport::Reopen> {
        let (path, mem, limit) = (self.path.clone(), self.mem.clone(), self.timeout);
        let controller = self.who.controller.clone();
        let inflight = self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        Some(Box::new(move |timeout: Duration| {
            Ok(Box::new(VhostUserTransport::connect_with_options(
                &path,
                mem.clone(),
                timeout.min(limit),
                inflight,
                controller.as_deref(),
            )?) as Box<dyn Transport>)
        }))
    }

    fn abort(&self) {
        self.who.warn(format_args!(
            "{}: dropping the connection to a back-end that stopped answering",
            self.describe()
        ));
        self.broken.store(true, Ordering::Release);
        let _ = self.abort_stream.shutdown(std::net::Shutdown::Both);
    }
}

impl VhostUserTransport {
    fn set_driver_features_inner(&mut self, features: u64) -> Result<()> {
        let extra = self.offered & tf::VHOST_USER_PROTOCOL_FEATURES;
        let ack = (features & self.offered) | extra;
        self.frontend
            .set_features(ack)
            .map_err(|e| Error::transport(self.ctx("SET_FEATURES"), e))?;
        self.share_memory()
    }

    fn read_config_inner(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::Features(format!(
                "{} does not offer the CONFIG protocol feature, so the device configuration cannot be read",
                self.describe()
            )));
        }
        let zero = vec![0u8; buf.len()];
        let (_, payload) = self
            .frontend
            .get_config(
                offset,
                buf.len() as u32,
                VhostUserConfigFlags::WRITABLE,
                &zero,
            )
            .map_err(|e| Error::transport(self.ctx("GET_CONFIG"), e))?;
        if payload.len() != buf.len() {
            return Err(Error::Device(format!(
                "GET_CONFIG returned {} bytes, asked for {}",
                payload.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&payload);
        Ok(())
    }

    fn setup_queue_inner(
        &mut self,
        index: u16,
        layout: &RingLayout,
        base: u16,
    ) -> Result<Notifier> {
        if let Some(n) = self.queue_num {
            if index as u64 >= n {
                return Err(Error::InvalidQueue(format!(
                    "queue {index} does not exist: the back-end has {n} queues"
                )));
            }
        }
        let i = index as usize;
        let fe = &self.frontend;
        let q = |what: &str| format!("vhost-user {}: {what} (queue {index})", self.path.display());
        fe.set_vring_num(i, layout.size)
            .map_err(|e| Error::QueueSizeRefused {
                index,
                size: layout.size,
                cause: format!("{}: {e}", q("SET_VRING_NUM")),
            })?;
        let cfg = VringConfigData {
            queue_max_size: layout.size,
            queue_size: layout.size,
            flags: 0,
            desc_table_addr: layout.desc_va,
            used_ring_addr: layout.used_va,
            avail_ring_addr: layout.avail_va,
            log_addr: None,
        };
        fe.set_vring_addr(i, &cfg)
            .map_err(|e| Error::transport(q("SET_VRING_ADDR"), e))?;
        fe.set_vring_base(i, base)
            .map_err(|e| Error::transport(q("SET_VRING_BASE"), e))?;
        let call = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io(q("eventfd"), e))?);
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io(q("eventfd"), e))?);
        fe.set_vring_call(i, &call)
            .map_err(|e| Error::transport(q("SET_VRING_CALL"), e))?;
        fe.set_vring_kick(i, &kick)
            .map_err(|e| Error::transport(q("SET_VRING_KICK"), e))?;
        if self.vrings.len() <= i {
            self.vrings.resize_with(i + 1, || None);
        }
        self.vrings[i] = Some(Vring {
            _kick: kick.clone(),
            call,
        });
        Ok(Notifier::EventFd(kick))
    }

    fn start_inner(&mut self) -> Result<()> {
        if self.offered & tf::VHOST_USER_PROTOCOL_FEATURES != 0 {
            for i in 0..self.vrings.len() {
                if self.vrings[i].is_some() {
                    self.frontend
                        .set_vring_enable(i, true)
                        .map_err(|e| Error::transport(self.ctx("SET_VRING_ENABLE"), e))?;
                }
            }
        }
        self.sync()?;
        self.started = true;
        Ok(())
    }

    /// Make sure the back-end has processed every message sent so far. Without
    /// REPLY_ACK, messages like SET_VRING_ENABLE get no answer, and a kick sent right
    /// after could reach a ring the back-end has not enabled yet; a GET_FEATURES
    /// round trip orders them (as QEMU does).
    fn sync(&mut self) -> Result<()> {
        if !self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend
                .get_features()
                .map_err(|e| Error::transport(self.ctx("GET_FEATURES (sync)"), e))?;
        }
        Ok(())
    }

    fn shutdown_inner(&mut self) -> Result<()> {
        if self.started && !self.broken.load(Ordering::Relaxed) {
            self.started = false;
            for i in 0..self.vrings.len() {
                if self.vrings[i].is_none() {
                    continue;
                }
                if self.offered & tf::VHOST_USER_PROTOCOL_FEATURES != 0 {
                    let _ = self.frontend.set_vring_enable(i, false);
                }
                // GET_VRING_BASE stops the ring on the back-end side.
                let _ = self.frontend.get_vring_base(i);
            }
        }
        self.vrings.clear();
        Ok(())
    }
}

impl Drop for VhostUserTransport {
    fn drop(&mut self) {
        let _ = Transport::shutdown(self);
        let _ = self.stop_monitor.write(1);
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two control calls under way at once (an attach and a DMA region shared for
    /// another controller): the first one's end does not disarm the second's deadline
    /// (one shared deadline did, and a silent back-end then hung the second for ever).
    #[test]
    fn each_control_call_keeps_its_own_deadline() {
        let wd = Watchdog::default();
        let first = wd.arm(Duration::from_secs(60));
        let second = wd.arm(Duration::from_millis(1));
        drop(first);
        std::thread::sleep(Duration::from_millis(5));
        assert!(wd.expired(), "the second call's deadline was disarmed");
        drop(second);
        assert!(!wd.expired());
        let _third = wd.arm(Duration::from_millis(1));
        wd.clear();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!wd.expired(), "a cut connection has no deadlines left");
    }
}
