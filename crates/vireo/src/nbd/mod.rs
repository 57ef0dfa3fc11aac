//! NBD export of bdevs (`vireo serve --nbd unix:PATH|tcp:HOST:PORT`): the fixed
//! newstyle handshake (`NBD_OPT_GO`/`INFO`/`LIST`/`EXPORT_NAME`, structured replies,
//! the `base:allocation` meta context), READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES,
//! CACHE, BLOCK_STATUS and DISC. This is how bdevs reach other programs (`qemu-img`,
//! `qemu-io`, fio, libnbd's tools, `nbd-client`) and other hosts.
//!
//! `--nbd-threads N` I/O threads each run one event loop (`ioloop.rs`) over their client
//! sockets and their channels: a request is read, submitted, completed and answered on
//! one thread. A connection's handshake runs on a short-lived thread of its own (within
//! `--nbd-timeout`), which then hands the socket to the least busy I/O thread
//! (`Placement`); that thread opens a channel on the bdev, on a queue of its own while
//! the controller has free queues, and otherwise gives the client to a thread that has
//! a channel on it (the queue is shared then). So a bdev's connections (multi-conn)
//! spread over the threads and the controller's queues.
//!
//! [`rpc`] holds the JSON-RPC methods that manage the exports (nbd_start_disk,
//! nbd_stop_disk, nbd_get_disks).

mod ioloop;
mod proto;
pub mod rpc;
mod tls;

pub use tls::{Tls, TlsMode};

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vireo_bdev::{Bdev, Registry};

/// Clients served at once (handshakes included).
const MAX_CLIENTS: usize = 64;
/// Handshakes under way at once. Past that a new connection is closed at once: clients
/// that never finish a handshake (no certificate needed to open a socket) can neither
/// take the served clients' room nor make the server look full, which would close
/// served clients that are idle.
const MAX_HANDSHAKES: usize = 16;
/// Refusals (a full server telling a client so) under way at once; past that, a
/// client of a full server is closed at once.
const MAX_REFUSALS: usize = 8;
/// Outstanding payload above which the memory given back later is worth a trim.
const TRIM_ABOVE: usize = 32 << 20;

/// Where the server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A unix socket path.
    Unix(std::path::PathBuf),
    /// A TCP address.
    Tcp(String),
}

impl std::str::FromStr for Listen {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Listen> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                bail!("--nbd unix: needs a socket path (unix:/tmp/vireo-nbd.sock)");
            }
            Ok(Listen::Unix(p.into()))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            if !a.contains(':') {
                bail!("--nbd tcp: needs HOST:PORT (tcp:127.0.0.1:10809)");
            }
            Ok(Listen::Tcp(a.to_string()))
        } else {
            bail!("--nbd takes unix:PATH or tcp:HOST:PORT, got {s:?}")
        }
    }
}

/// Why an export cannot be started or stopped (`nbd_start_disk`, `nbd_stop_disk`);
/// the JSON-RPC methods answer each with the code of its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportError {
    /// `vireo serve` runs without `--nbd`.
    NotListening,
    /// No bdev of that name (-ENODEV, like every unknown bdev).
    NoSuchBdev(String),
    /// No export of that name (-ENODEV).
    NoSuchExport(String),
    /// The export name is empty or longer than NBD allows (its length; invalid params).
    BadExportName(usize),
    /// The export name serves another bdev (-EEXIST).
    ExportTaken {
        /// The export name.
        export: String,
        /// The bdev it serves.
        bdev: String,
    },
}

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportError::NotListening => f.write_str(
                "no NBD listener: start vireo serve with --nbd unix:PATH or --nbd tcp:HOST:PORT",
            ),
            ExportError::NoSuchBdev(b) => write!(f, "no bdev named {b:?}"),
            ExportError::NoSuchExport(e) => {
                write!(f, "no NBD export named {e:?} (nbd_get_disks lists them)")
            }
            ExportError::BadExportName(len) => write!(
                f,
                "an export name is 1 to 4096 bytes, this one has {len}"
            ),
            ExportError::ExportTaken { export, bdev } => write!(
                f,
                "export {export:?} already serves bdev {bdev:?}: stop it first (nbd_stop_disk) or choose another name"
            ),
        }
    }
}

impl std::error::Error for ExportError {}

/// How an I/O thread waits when a pass found nothing to do (as `vireo perf
/// --wait-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Spin while the thread has clients (lowest latency; a CPU busy per thread).
    Poll,
    /// Sleep on the sockets and the completion eventfds at once.
    Sleep,
    /// Spin this long after the last progress, then sleep.
    Hybrid(Duration),
}

/// Server settings (`vireo serve --nbd-*`).
#[derive(Debug, Clone)]
pub struct Options {
    /// I/O threads.
    pub threads: usize,
    /// Time limit of a handshake, of a half-sent request and of a reply the client
    /// does not take.
    pub timeout: Duration,
    /// Clients with nothing outstanding are closed after this long (none: never).
    pub idle_timeout: Option<Duration>,
    /// Payload bytes all clients together may have outstanding (one request may
    /// exceed it alone).
    pub max_memory: usize,
    /// How I/O threads wait.
    pub wait: Wait,
    /// TLS (`NBD_OPT_STARTTLS`), required or allowed.
    pub tls: Option<Tls>,
    /// Plain TCP on an address other than loopback is allowed.
    pub insecure: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: default_threads(),
            timeout: Duration::from_secs(30),
            idle_timeout: None,
            max_memory: 256 << 20,
            wait: Wait::Hybrid(Duration::from_micros(50)),
            tls: None,
            insecure: false,
        }
    }
}

/// One I/O thread per CPU this process may run on (it respects `taskset`).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `--nbd-wait-mode`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitArg {
    /// Spin while the thread has clients.
    Poll,
    /// Sleep on the sockets and completion eventfds.
    Sleep,
    /// Spin --nbd-hybrid-spin-us after the last progress, then sleep.
    Hybrid,
}

/// The NBD flags of `vireo serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct NbdArgs {
    /// Export every bdev over NBD under its own name: unix:PATH or tcp:HOST:PORT
    /// (nbd_start_disk / nbd_stop_disk / nbd_get_disks manage the exports).
    #[arg(long)]
    pub nbd: Option<Listen>,
    /// NBD I/O threads; a bdev's connections spread over them, each thread with its
    /// own channel (its own queue while the controller has free ones). Default: one
    /// per CPU the process may use.
    #[arg(long, value_name = "N")]
    pub nbd_threads: Option<usize>,
    /// Seconds a handshake, a half-sent request or a reply the client does not take
    /// may last before the connection is closed.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub nbd_timeout: u64,
    /// Close NBD clients with nothing outstanding after this many seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub nbd_idle_timeout: u64,
    /// Payload bytes all NBD clients together may have outstanding (suffixes k, m, g).
    #[arg(long, value_name = "BYTES", default_value = "256m", value_parser = crate::units::parse_size)]
    pub nbd_max_memory: usize,
    /// How NBD I/O threads wait for work.
    #[arg(long, value_enum, default_value = "hybrid")]
    pub nbd_wait_mode: WaitArg,
    /// Spin time of --nbd-wait-mode hybrid, in microseconds.
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub nbd_hybrid_spin_us: u64,
    /// TLS credentials for NBD (NBD_OPT_STARTTLS): a directory with ca-cert.pem,
    /// server-cert.pem and server-key.pem, as QEMU's tls-creds-x509 reads it. Clients
    /// must present a certificate signed by that CA.
    #[arg(long, value_name = "DIR")]
    pub nbd_tls_creds: Option<std::path::PathBuf>,
    /// With --nbd-tls-creds: clients must start TLS (require, the default) or may
    /// (allow).
    #[arg(long, value_enum)]
    pub nbd_tls: Option<TlsMode>,
    /// Serve NBD over TCP on an address other than loopback without requiring TLS
    /// (anyone who reaches the address reads and writes the bdevs).
    #[arg(long)]
    pub nbd_insecure: bool,
}

impl NbdArgs {
    /// The server settings these flags ask for.
    pub fn options(&self) -> Result<Options> {
        let threads = self.nbd_threads.unwrap_or_else(default_threads);
        if threads == 0 || threads > 256 {
            bail!("--nbd-threads takes 1 to 256, got {threads}");
        }
        if self.nbd_timeout == 0 {
            bail!("--nbd-timeout must be at least 1 second");
        }
        if self.nbd_max_memory < (1 << 20) {
            bail!("--nbd-max-memory must be at least 1m");
        }
        Ok(Options {
            threads,
            timeout: Duration::from_secs(self.nbd_timeout),
            idle_timeout: (self.nbd_idle_timeout > 0)
                .then(|| Duration::from_secs(self.nbd_idle_timeout)),
            max_memory: self.nbd_max_memory,
            wait: match self.nbd_wait_mode {
                WaitArg::Poll => Wait::Poll,
                WaitArg::Sleep => Wait::Sleep,
                WaitArg::Hybrid => Wait::Hybrid(Duration::from_micros(self.nbd_hybrid_spin_us)),
            },
            tls: match (&self.nbd_tls_creds, self.nbd_tls) {
                (Some(dir), mode) => Some(Tls::load(dir, mode.unwrap_or(TlsMode::Require))?),
                (None, Some(_)) => bail!("--nbd-tls needs --nbd-tls-creds DIR"),
                (None, None) => None,
            },
            insecure: self.nbd_insecure,
        })
    }
}

/// A client socket.
pub(crate) enum Sock {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Sock {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Sock::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Sock::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_nonblocking(on),
            Sock::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(buf),
            Sock::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(buf),
            Sock::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write_vectored(bufs),
            Sock::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Which I/O threads serve which bdevs: the client counts behind the choice of a
/// thread for a new connection, and whether a thread has a channel on a bdev.
#[derive(Default)]
struct Placement {
    threads: Vec<ThreadLoad>,
}

#[derive(Default)]
struct ThreadLoad {
    clients: usize,
    /// Per bdev (by address): (clients placed here, a channel is open here).
    bdevs: HashMap<usize, (usize, bool)>,
}

fn key(b: &Arc<Bdev>) -> usize {
    Arc::as_ptr(b) as usize
}

/// Exports, their I/O threads and the limits all clients share.
pub struct NbdServer {
    reg: Arc<Registry>,
    /// Export every bdev under its own name (unless stopped).
    auto: bool,
    /// Explicit exports: export name -> the bdev (gone with it).
    explicit: Mutex<BTreeMap<String, Weak<Bdev>>>,
    /// Bdevs whose automatic export was stopped.
    stopped: Mutex<Vec<Weak<Bdev>>>,
    listening: bool,
    opts: Options,
    /// Bumped when exports stop: I/O threads check their clients' exports then.
    generation: AtomicU64,
    /// Clients connected (handshakes included).
    clients: AtomicUsize,
    /// Handshakes under way.
    handshaking: AtomicUsize,
    refusals: AtomicUsize,
    /// A client was turned away since the count last dropped below the limit: idle
    /// clients are closed after the timeout.
    full: AtomicBool,
    /// Payload bytes admitted and not yet given back, all clients together.
    used: AtomicUsize,
    /// A client waits for `used` to drop.
    starved: AtomicBool,
    /// `used` went above TRIM_ABOVE since the last trim.
    grown: AtomicBool,
    stopping: AtomicBool,
    placement: Mutex<Placement>,
    threads: OnceLock<Vec<Arc<ioloop::Handle>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NbdServer {
    /// A server for `reg`'s bdevs with default settings; `auto` exports every bdev
    /// under its own name.
    pub fn new(reg: Arc<Registry>, auto: bool, listening: bool) -> Arc<NbdServer> {
        NbdServer::with_options(reg, auto, listening, Options::default())
    }

    /// A server with these settings.
    pub fn with_options(
        reg: Arc<Registry>,
        auto: bool,
        listening: bool,
        opts: Options,
    ) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            reg,
            auto,
            explicit: Mutex::new(BTreeMap::new()),
            stopped: Mutex::new(Vec::new()),
            listening,
            generation: AtomicU64::new(0),
            clients: AtomicUsize::new(0),
            handshaking: AtomicUsize::new(0),
            refusals: AtomicUsize::new(0),
            full: AtomicBool::new(false),
            used: AtomicUsize::new(0),
            starved: AtomicBool::new(false),
            grown: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            placement: Mutex::new(Placement {
                threads: (0..opts.threads).map(|_| ThreadLoad::default()).collect(),
            }),
            threads: OnceLock::new(),
            opts,
        })
    }

    /// A bdev that is still attached (not one of a detached controller, nor replaced
    /// by a new bdev of its name).
    fn live(&self, b: &Arc<Bdev>) -> bool {
        !b.is_removed() && self.reg.bdev(b.name()).is_some_and(|x| Arc::ptr_eq(&x, b))
    }

    /// Current exports and their bdevs. Exports of bdevs that are gone go with them.
    fn export_bdevs(&self) -> Vec<(String, Arc<Bdev>)> {
        let mut v = Vec::new();
        lock(&self.explicit).retain(|e, w| match w.upgrade() {
            Some(b) if self.live(&b) => {
                v.push((e.clone(), b));
                true
            }
            _ => false,
        });
        if self.auto {
            let mut stopped = lock(&self.stopped);
            stopped.retain(|w| w.upgrade().is_some_and(|b| self.live(&b)));
            for b in self.reg.bdevs() {
                let stop = stopped
                    .iter()
                    .any(|w| w.upgrade().is_some_and(|x| Arc::ptr_eq(&x, &b)));
                if !stop && !v.iter().any(|(e, _)| e == b.name()) {
                    v.push((b.name().to_string(), b));
                }
            }
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Current exports: (export name, bdev name).
    pub fn exports(&self) -> Vec<(String, String)> {
        self.export_bdevs()
            .into_iter()
            .map(|(e, b)| (e, b.name().to_string()))
            .collect()
    }

    fn resolve(&self, export: &str) -> Option<Arc<Bdev>> {
        self.export_bdevs()
            .into_iter()
            .find(|(e, _)| e == export)
            .map(|(_, b)| b)
    }

    /// `nbd_start_disk`: export `bdev` as `export` (default: the bdev's name).
    pub fn start_disk(
        &self,
        bdev: &str,
        export: Option<&str>,
    ) -> std::result::Result<String, ExportError> {
        if !self.listening {
            return Err(ExportError::NotListening);
        }
        let export = export.unwrap_or(bdev).to_string();
        if export.is_empty() || export.len() > 4096 {
            return Err(ExportError::BadExportName(export.len()));
        }
        let Some(b) = self.reg.bdev(bdev) else {
            return Err(ExportError::NoSuchBdev(bdev.to_string()));
        };
        if let Some((_, other)) = self
            .exports()
            .into_iter()
            .find(|(e, b)| *e == export && b != bdev)
        {
            return Err(ExportError::ExportTaken {
                export,
                bdev: other,
            });
        }
        if export == bdev {
            lock(&self.stopped).retain(|w| w.upgrade().is_some_and(|x| !Arc::ptr_eq(&x, &b)));
        }
        lock(&self.explicit).insert(export.clone(), Arc::downgrade(&b));
        Ok(export)
    }

    /// `nbd_stop_disk`: stop exporting `export`; its clients are disconnected (their
    /// requests in flight finish first), so its bdev's controller can be detached.
    pub fn stop_disk(&self, export: &str) -> std::result::Result<(), ExportError> {
        let found = self.export_bdevs().into_iter().find(|(e, _)| e == export);
        let Some((_, bdev)) = found else {
            return Err(ExportError::NoSuchExport(export.to_string()));
        };
        lock(&self.explicit).remove(export);
        if self.auto && export == bdev.name() {
            lock(&self.stopped).push(Arc::downgrade(&bdev));
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.wake_all();
        Ok(())
    }

    fn wake_all(&self) {
        if let Some(t) = self.threads.get() {
            for h in t {
                h.wake();
            }
        }
    }

    /// Admit `cost` payload bytes against the budget of all clients (always when
    /// nothing is outstanding, so that any one request goes through).
    fn admit(&self, cost: usize) -> bool {
        if cost == 0 {
            return true;
        }
        let max = self.opts.max_memory;
        let ok = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u == 0 || u + cost <= max).then_some(u + cost)
            });
        match ok {
            Ok(u) => {
                if u + cost > TRIM_ABOVE {
                    self.grown.store(true, Ordering::Release);
                }
                true
            }
            Err(_) => {
                self.starved.store(true, Ordering::Release);
                // Freed meanwhile? Then whoever freed it may have missed the flag.
                self.used.load(Ordering::Acquire) + cost <= max && self.admit_again(cost)
            }
        }
    }

    fn admit_again(&self, cost: usize) -> bool {
        let max = self.opts.max_memory;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u == 0 || u + cost <= max).then_some(u + cost)
            })
            .is_ok()
    }

    /// Give back `bytes` admitted by [`admit`](Self::admit); wakes the threads whose
    /// clients wait for it.
    fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        if self.starved.swap(false, Ordering::AcqRel) {
            self.wake_all();
        }
    }

    /// Give free DMA memory back to the system once clients that made it grow are done
    /// with it.
    fn maybe_trim(&self, bdev: &Bdev) {
        if self.used.load(Ordering::Acquire) == 0 && self.grown.swap(false, Ordering::AcqRel) {
            let n = bdev.memory().trim();
            tracing::debug!("nbd: gave {} MiB of DMA memory back", n >> 20);
        }
    }

    /// The thread for a new connection to `bdev`: the one with the fewest clients,
    /// one that has a channel on the bdev on a tie.
    fn place(&self, bdev: &Arc<Bdev>) -> usize {
        let mut p = lock(&self.placement);
        let k = key(bdev);
        let best = (0..p.threads.len())
            .min_by_key(|&i| {
                let t = &p.threads[i];
                let chan = t.bdevs.get(&k).is_some_and(|x| x.1);
                (t.clients, !chan)
            })
            .unwrap_or(0);
        let t = &mut p.threads[best];
        t.clients += 1;
        t.bdevs.entry(k).or_insert((0, false)).0 += 1;
        best
    }

    /// Thread `t` opened a channel on `bdev`.
    fn placement_opened(&self, t: usize, bdev: &Arc<Bdev>) {
        let mut p = lock(&self.placement);
        if let Some(x) = p.threads[t].bdevs.get_mut(&key(bdev)) {
            x.1 = true;
        }
    }

    /// Thread `from` has no queue for `c`'s bdev: give `c` to the least busy thread
    /// with a channel on it, or opening one (or back, when there is none).
    fn redirect(
        &self,
        from: usize,
        mut c: ioloop::NewConn,
    ) -> std::result::Result<(), ioloop::NewConn> {
        let k = key(&c.neg.bdev);
        let to = {
            let mut p = lock(&self.placement);
            // A thread with a channel on the bdev, or one that is opening it (a client
            // of the bdev is placed there); those with a channel first. A connection
            // that went round every thread gives up.
            let to = (0..p.threads.len())
                .filter(|&i| i != from && c.hops < p.threads.len())
                .filter_map(|i| {
                    let (n, chan) = *p.threads[i].bdevs.get(&k)?;
                    (n > 0).then_some((!chan, p.threads[i].clients, i))
                })
                .min()
                .map(|x| x.2);
            let Some(to) = to else {
                return Err(c);
            };
            Self::unplace(&mut p, from, k);
            c.hops += 1;
            let t = &mut p.threads[to];
            t.clients += 1;
            t.bdevs.entry(k).or_insert((0, true)).0 += 1;
            to
        };
        match self.threads.get() {
            Some(t) => {
                t[to].give(c);
                Ok(())
            }
            None => Err(c),
        }
    }

    fn unplace(p: &mut Placement, t: usize, k: usize) -> bool {
        let t = &mut p.threads[t];
        t.clients = t.clients.saturating_sub(1);
        if let Some(x) = t.bdevs.get_mut(&k) {
            x.0 = x.0.saturating_sub(1);
            if x.0 == 0 {
                t.bdevs.remove(&k);
                return true;
            }
        }
        false
    }

    /// A client of `bdev` on thread `t` is gone; returns whether it was the thread's
    /// last one on the bdev (the thread closes its channel then).
    fn client_gone(&self, t: usize, bdev: &Arc<Bdev>) -> bool {
        self.client_left();
        Self::unplace(&mut lock(&self.placement), t, key(bdev))
    }

    /// A client left (or its handshake ended without it): there is room again.
    fn client_left(&self) {
        self.clients.fetch_sub(1, Ordering::AcqRel);
        self.full.store(false, Ordering::Release);
    }

    /// Start the I/O threads (once).
    fn start_threads(self: &Arc<Self>) -> Result<Vec<std::thread::JoinHandle<()>>> {
        let mut handles = Vec::new();
        let mut joins = Vec::new();
        for i in 0..self.opts.threads {
            let (h, j) =
                ioloop::spawn(self.clone(), i).context("cannot start an NBD I/O thread")?;
            handles.push(h);
            joins.push(j);
        }
        let _ = self.threads.set(handles);
        Ok(joins)
    }

    /// Let the I/O threads end: their clients are closed once their requests finish.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        self.wake_all();
    }
}

/// A bound NBD listener; a unix socket file is removed when it is dropped.
pub struct Listener {
    inner: ListenerKind,
    _file: Option<crate::socket::SocketFile>,
    what: String,
}

enum ListenerKind {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

impl Listener {
    /// Bind `listen` (a unix socket is made private to the owner, mode 0600). Plain
    /// TCP (TLS not required) on an address other than loopback is refused unless
    /// `opts.insecure`.
    pub fn bind(listen: &Listen, opts: &Options) -> Result<Listener> {
        match listen {
            Listen::Unix(path) => {
                let l = crate::socket::bind(path)?;
                let file = crate::socket::SocketFile(path.clone());
                l.set_nonblocking(true)?;
                Ok(Listener {
                    inner: ListenerKind::Unix(l),
                    _file: Some(file),
                    what: format!("unix:{}", path.display()),
                })
            }
            Listen::Tcp(addr) => {
                let tls_required = opts
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.mode == TlsMode::Require);
                if !tls_required && !opts.insecure {
                    use std::net::ToSocketAddrs;
                    let addrs: Vec<std::net::SocketAddr> = addr
                        .to_socket_addrs()
                        .with_context(|| format!("cannot resolve {addr}"))?
                        .collect();
                    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
                        bail!(
                            "refusing NBD over plain TCP on {a}, which is not a loopback address: anyone who reaches it could read and write every bdev. Require TLS (--nbd-tls-creds DIR, --nbd-tls require), use a unix socket, or say --nbd-insecure"
                        );
                    }
                }
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("cannot listen for NBD on {addr}"))?;
                l.set_nonblocking(true)?;
                let what = format!("tcp:{}", l.local_addr()?);
                Ok(Listener {
                    inner: ListenerKind::Tcp(l),
                    _file: None,
                    what,
                })
            }
        }
    }

    fn accept(&self) -> std::io::Result<Sock> {
        match &self.inner {
            ListenerKind::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(Sock::Unix(s))
            }
            ListenerKind::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Sock::Tcp(s))
            }
        }
    }

    fn fd(&self) -> RawFd {
        match &self.inner {
            ListenerKind::Unix(l) => l.as_raw_fd(),
            ListenerKind::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// Accept connections on `listener` until `stop()` says so, then close the clients
/// (their requests in flight finish) and end the I/O threads.
pub fn serve(server: Arc<NbdServer>, listener: Listener, stop: fn() -> bool) -> Result<()> {
    let joins = server.start_threads()?;
    eprintln!(
        "vireo: NBD on {} ({} I/O threads)",
        listener.what, server.opts.threads
    );
    while !stop() {
        match listener.accept() {
            Ok(c) => accept(&server, c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                vireo_virtio::wait_readable(&[listener.fd()], Duration::from_millis(100));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("nbd: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    server.shutdown();
    for j in joins {
        let _ = j.join();
    }
    Ok(())
}

/// A new connection: its handshake on a thread of its own, or a refusal when the
/// server is full.
fn accept(server: &Arc<NbdServer>, c: Sock) {
    if server.handshaking.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
        server.handshaking.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(
            "nbd: {MAX_HANDSHAKES} handshakes already under way; connection closed (clients that connect and stall are dropped after --nbd-timeout)"
        );
        return;
    }
    // Ends the handshake's count however it ends.
    struct Handshaking(Arc<NbdServer>);
    impl Drop for Handshaking {
        fn drop(&mut self) {
            self.0.handshaking.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let hs = Handshaking(server.clone());
    if server.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
        server.clients.fetch_sub(1, Ordering::AcqRel);
        server.full.store(true, Ordering::Release);
        if server.refusals.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSALS {
            server.refusals.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("nbd: more than {MAX_CLIENTS} clients; connection closed");
            return;
        }
        tracing::warn!("nbd: more than {MAX_CLIENTS} clients; connection refused");
        let s = server.clone();
        let spawned = std::thread::Builder::new()
            .name("vireo-nbd-refuse".into())
            .spawn(move || {
                let mut d = proto::Deadlined {
                    sock: c,
                    deadline: Instant::now() + s.opts.timeout.min(Duration::from_secs(5)),
                };
                let why = format!(
                    "server full: vireo serves at most {MAX_CLIENTS} NBD clients at once; try again later"
                );
                let _ = proto::refuse(&mut d, &why);
                s.refusals.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            server.refusals.fetch_sub(1, Ordering::AcqRel);
        }
        return;
    }
    let s = server.clone();
    let spawned = std::thread::Builder::new()
        .name("vireo-nbd-handshake".into())
        .spawn(move || {
            let r = handshake(&s, c);
            drop(hs);
            match r {
                Ok(Some(conn)) => {
                    let t = s.place(&conn.neg.bdev);
                    match s.threads.get() {
                        Some(threads) => threads[t].give(conn),
                        None => {
                            s.client_gone(t, &conn.neg.bdev);
                        }
                    }
                    return;
                }
                Ok(None) => {}
                Err(e) => tracing::info!("nbd client: {e:#}"),
            }
            s.client_left();
        });
    if spawned.is_err() {
        server.client_left();
    }
}

/// The handshake, within the server's timeout: the connection to hand to an I/O
/// thread, or `None` when the client aborted.
fn handshake(server: &NbdServer, sock: Sock) -> Result<Option<ioloop::NewConn>> {
    let mut d = proto::Deadlined {
        sock,
        deadline: Instant::now() + server.opts.timeout,
    };
    d.write_all(&proto::hello())?;
    let no_zeroes = proto::client_flags(&mut d)?;
    let state = match &server.opts.tls {
        None => proto::TlsState::Off,
        Some(t) if t.mode == TlsMode::Require => proto::TlsState::Required,
        Some(_) => proto::TlsState::Allowed,
    };
    let (neg, stream) = match proto::options(server, &mut d, no_zeroes, state)? {
        proto::Outcome::Serve(n) => (n, tls::Stream::Plain(d.sock)),
        proto::Outcome::Aborted => return Ok(None),
        proto::Outcome::StartTls => {
            let tls = server.opts.tls.as_ref().context("TLS is not configured")?;
            let mut s = rustls::StreamOwned::new(tls.connection()?, d);
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).context("TLS handshake")?;
            }
            let neg = match proto::options(server, &mut s, no_zeroes, proto::TlsState::On)? {
                proto::Outcome::Serve(n) => n,
                proto::Outcome::Aborted => return Ok(None),
                proto::Outcome::StartTls => bail!("STARTTLS twice"),
            };
            s.flush()?;
            let rustls::StreamOwned { conn, sock: d } = s;
            (neg, tls::Stream::Tls(d.sock, Box::new(conn)))
        }
    };
    let sock = stream.sock();
    sock.set_timeouts(None)?;
    sock.set_nonblocking(true)?;
    Ok(Some(ioloop::NewConn {
        stream,
        neg,
        hops: 0,
    }))
}
