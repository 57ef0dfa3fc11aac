//! NBD export of bdevs (`vireo serve --nbd unix:PATH|tcp:HOST:PORT`): the newstyle
//! fixed handshake with `NBD_OPT_GO`/`INFO`/`LIST`/`EXPORT_NAME`, simple replies,
//! READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES, CACHE and DISC. This is how bdevs
//! reach other programs (`qemu-img`, `qemu-io`, `nbd-client`) and other hosts.
//!
//! Each exported bdev has one I/O thread that owns its channel (several clients share
//! it, so a controller with one queue serves them all); each client connection has a
//! reader (requests in) and a writer (replies out) thread. The I/O thread sleeps on its
//! request channel while nothing is in flight and polls while something is.
//!
//! [`rpc`] holds the JSON-RPC methods that manage the exports (nbd_start_disk,
//! nbd_stop_disk, nbd_get_disks).

pub mod rpc;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vireo_bdev::{Bdev, Completion, IoBuf, IoError, IoOp, IoRequest, Registry};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 2;
const TF_SEND_FLUSH: u16 = 4;
const TF_SEND_FUA: u16 = 8;
const TF_SEND_TRIM: u16 = 32;
const TF_SEND_WRITE_ZEROES: u16 = 64;
const TF_CAN_MULTI_CONN: u16 = 256;
const TF_SEND_CACHE: u16 = 1024;

const CMD_FLAG_FUA: u16 = 1;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const ENOMEM: u32 = 12;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

/// Largest READ/WRITE payload (advertised as the maximum block size).
const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload a client may send.
const MAX_OPTION: u32 = 64 << 10;

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

/// One request handed to a bdev's I/O thread.
struct Job {
    handle: u64,
    cmd: u16,
    flags: u16,
    offset: u64,
    length: u32,
    /// A WRITE's payload, read straight into DMA memory when there is room.
    data: Option<IoBuf>,
    /// Payload bytes counted against the client's credit (given back with the reply).
    cost: usize,
    reply: Sender<Reply>,
}

/// One reply for a client's writer.
struct Reply {
    handle: u64,
    error: u32,
    data: Option<IoBuf>,
    cost: usize,
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

/// A bdev's I/O thread: the bdev it serves, its request channel and how many clients
/// use it. The thread ends, closing the bdev's channel, once the last client has left
/// (so the controller can be detached), and a new one starts with the next client.
struct Worker {
    bdev: Arc<Bdev>,
    jobs: Sender<Job>,
    clients: usize,
}

/// A client's use of its bdev's I/O thread, given back on drop.
struct WorkerLease<'a> {
    server: &'a NbdServer,
    bdev: Arc<Bdev>,
}

impl Drop for WorkerLease<'_> {
    fn drop(&mut self) {
        let mut w = lock(&self.server.workers);
        if let Some(x) = w.get_mut(self.bdev.name()) {
            if Arc::ptr_eq(&x.bdev, &self.bdev) {
                x.clients = x.clients.saturating_sub(1);
                if x.clients == 0 {
                    // The thread's last sender is the leaving client's own: once that
                    // is dropped too, the thread closes the channel and ends.
                    w.remove(self.bdev.name());
                }
            }
        }
    }
}

/// Exports and their I/O threads.
pub struct NbdServer {
    reg: Arc<Registry>,
    /// Export every bdev under its own name (unless stopped).
    auto: bool,
    /// Explicit exports: export name -> bdev name.
    explicit: Mutex<BTreeMap<String, String>>,
    /// Bdev names whose automatic export was stopped.
    stopped: Mutex<BTreeSet<String>>,
    workers: Mutex<HashMap<String, Worker>>,
    listening: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NbdServer {
    /// A server for `reg`'s bdevs; `auto` exports every bdev under its own name.
    pub fn new(reg: Arc<Registry>, auto: bool, listening: bool) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            reg,
            auto,
            explicit: Mutex::new(BTreeMap::new()),
            stopped: Mutex::new(BTreeSet::new()),
            workers: Mutex::new(HashMap::new()),
            listening,
        })
    }

    /// Current exports: (export name, bdev name).
    pub fn exports(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = lock(&self.explicit)
            .iter()
            .map(|(e, b)| (e.clone(), b.clone()))
            .collect();
        if self.auto {
            let stopped = lock(&self.stopped);
            for b in self.reg.bdevs() {
                let n = b.name().to_string();
                if !stopped.contains(&n) && !v.iter().any(|(e, _)| *e == n) {
                    v.push((n.clone(), n));
                }
            }
        }
        v.sort();
        v
    }

    fn resolve(&self, export: &str) -> Option<Arc<Bdev>> {
        let bdev = self
            .exports()
            .into_iter()
            .find(|(e, _)| e == export)
            .map(|(_, b)| b)?;
        self.reg.bdev(&bdev)
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
        if self.reg.bdev(bdev).is_none() {
            return Err(ExportError::NoSuchBdev(bdev.to_string()));
        }
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
            lock(&self.stopped).remove(bdev);
        }
        lock(&self.explicit).insert(export.clone(), bdev.to_string());
        Ok(export)
    }

    /// `nbd_stop_disk`: stop exporting `export` (new connections are refused; open ones
    /// finish).
    pub fn stop_disk(&self, export: &str) -> std::result::Result<(), ExportError> {
        let found = self.exports().into_iter().find(|(e, _)| e == export);
        let Some((_, bdev)) = found else {
            return Err(ExportError::NoSuchExport(export.to_string()));
        };
        lock(&self.explicit).remove(export);
        if self.auto && export == bdev {
            lock(&self.stopped).insert(bdev);
        }
        Ok(())
    }

    /// The request channel of `bdev`'s I/O thread (started if need be) for a new
    /// client, and the client's lease on it.
    fn worker(&self, bdev: &Arc<Bdev>) -> Result<(Sender<Job>, WorkerLease<'_>)> {
        let mut w = lock(&self.workers);
        // (Made only once the count is taken: its drop takes the lock.)
        let lease = || WorkerLease {
            server: self,
            bdev: bdev.clone(),
        };
        // The same bdev (not merely the same name: a re-attached controller has new
        // bdevs) and a worker still running.
        if let Some(x) = w.get_mut(bdev.name()) {
            if Arc::ptr_eq(&x.bdev, bdev) && !bdev.is_removed() {
                x.clients += 1;
                return Ok((x.jobs.clone(), lease()));
            }
        }
        let (tx, rx) = mpsc::channel();
        let b = bdev.clone();
        std::thread::Builder::new()
            .name(format!("vireo-nbd-{}", bdev.name()))
            .spawn(move || io_thread(b, rx))
            .context("cannot start an NBD I/O thread")?;
        w.insert(
            bdev.name().to_string(),
            Worker {
                bdev: bdev.clone(),
                jobs: tx.clone(),
                clients: 1,
            },
        );
        drop(w);
        Ok((tx, lease()))
    }

    fn forget_worker(&self, bdev: &str) {
        lock(&self.workers).remove(bdev);
    }

    /// Let the I/O threads end once their clients are gone (they close their channels).
    pub fn shutdown(&self) {
        lock(&self.workers).clear();
    }
}

/// Tell `ready` how binding went; pass the listener on.
fn announce<L>(bound: Result<L>, ready: &Sender<std::result::Result<(), String>>) -> Result<L> {
    match &bound {
        Ok(_) => {
            let _ = ready.send(Ok(()));
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
        }
    }
    bound
}

/// Accept connections until `stop()` says so; `ready` learns whether the listener is up.
pub fn serve(
    server: Arc<NbdServer>,
    listen: Listen,
    stop: fn() -> bool,
    ready: Sender<std::result::Result<(), String>>,
) -> Result<()> {
    match listen {
        Listen::Unix(path) => {
            let l = announce(
                crate::socket::bind(&path).and_then(|l| {
                    l.set_nonblocking(true)?;
                    Ok(l)
                }),
                &ready,
            )?;
            let _guard = crate::socket::SocketFile(path.clone());
            eprintln!("vireo: NBD on unix:{}", path.display());
            accept_loop(
                stop,
                || {
                    let (s, _) = l.accept()?;
                    s.set_nonblocking(false)?;
                    Ok(Box::new(s) as Box<dyn Conn>)
                },
                &server,
            );
        }
        Listen::Tcp(addr) => {
            let l = announce(
                std::net::TcpListener::bind(&addr)
                    .with_context(|| format!("cannot listen for NBD on {addr}"))
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        Ok(l)
                    }),
                &ready,
            )?;
            eprintln!("vireo: NBD on tcp:{}", l.local_addr()?);
            accept_loop(
                stop,
                || {
                    let (s, _) = l.accept()?;
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    Ok(Box::new(s) as Box<dyn Conn>)
                },
                &server,
            );
        }
    }
    server.shutdown();
    Ok(())
}

/// A client connection: a stream that can be split into reader and writer.
trait Conn: Read + Write + Send {
    /// A writer for the replies; writes give up after `timeout`.
    fn split(&self, timeout: Duration) -> std::io::Result<Box<dyn Write + Send>>;
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Conn for std::os::unix::net::UnixStream {
    fn split(&self, timeout: Duration) -> std::io::Result<Box<dyn Write + Send>> {
        let w = self.try_clone()?;
        w.set_write_timeout(Some(timeout))?;
        Ok(Box::new(w))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_write_timeout(self, t)
    }
}

impl Conn for std::net::TcpStream {
    fn split(&self, timeout: Duration) -> std::io::Result<Box<dyn Write + Send>> {
        let w = self.try_clone()?;
        w.set_write_timeout(Some(timeout))?;
        Ok(Box::new(w))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, t)
    }
}

/// Requests and payload bytes one client may have outstanding; its reader stops
/// reading requests until replies go out (so a client that never reads its replies
/// cannot make the server buffer without bound).
const MAX_CLIENT_REQUESTS: usize = 64;
const MAX_CLIENT_BYTES: usize = 64 << 20;
/// Clients served at once.
const MAX_CLIENTS: usize = 64;
/// A handshake must finish, and a reply be taken, within this.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Outstanding requests and bytes of one client.
#[derive(Default)]
struct Credit {
    used: Mutex<(usize, usize)>,
    freed: std::sync::Condvar,
}

impl Credit {
    fn take(&self, bytes: usize) {
        let mut u = lock(&self.used);
        while u.0 >= MAX_CLIENT_REQUESTS || (u.0 > 0 && u.1 + bytes > MAX_CLIENT_BYTES) {
            u = self.freed.wait(u).unwrap_or_else(|e| e.into_inner());
        }
        u.0 += 1;
        u.1 += bytes;
    }
    fn give(&self, bytes: usize) {
        let mut u = lock(&self.used);
        u.0 = u.0.saturating_sub(1);
        u.1 = u.1.saturating_sub(bytes);
        self.freed.notify_all();
    }
}

static CLIENTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn accept_loop(
    stop: fn() -> bool,
    mut accept: impl FnMut() -> std::io::Result<Box<dyn Conn>>,
    server: &Arc<NbdServer>,
) {
    while !stop() {
        match accept() {
            Ok(c) => {
                use std::sync::atomic::Ordering::AcqRel;
                if CLIENTS.fetch_add(1, AcqRel) >= MAX_CLIENTS {
                    CLIENTS.fetch_sub(1, AcqRel);
                    tracing::warn!("nbd: more than {MAX_CLIENTS} clients; connection refused");
                    continue;
                }
                let s = server.clone();
                let spawned = std::thread::Builder::new()
                    .name("vireo-nbd-client".into())
                    .spawn(move || {
                        if let Err(e) = client(&s, c) {
                            tracing::info!("nbd client: {e:#}");
                        }
                        CLIENTS.fetch_sub(1, AcqRel);
                    });
                if spawned.is_err() {
                    CLIENTS.fetch_sub(1, AcqRel);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("nbd: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn rd_u16(r: &mut (impl Read + ?Sized)) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn rd_u32(r: &mut (impl Read + ?Sized)) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn rd_u64(r: &mut (impl Read + ?Sized)) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn opt_reply(
    w: &mut (impl Write + ?Sized),
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)
}

fn transmission_flags(b: &Bdev) -> u16 {
    let i = b.info();
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES | TF_SEND_CACHE;
    // A flush reaches the device and covers every completed write, whichever
    // connection sent it.
    f |= TF_CAN_MULTI_CONN;
    if i.read_only {
        f |= TF_READ_ONLY;
    }
    if i.ops.unmap {
        f |= TF_SEND_TRIM;
    }
    f
}

/// The handshake; returns the bdev to serve, or `None` when the client aborted.
fn handshake(server: &NbdServer, c: &mut dyn Conn) -> Result<Option<Arc<Bdev>>> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    c.write_all(&hello)?;
    let client_flags = rd_u32(c)?;
    if client_flags & !(FLAG_FIXED_NEWSTYLE as u32 | FLAG_NO_ZEROES as u32) != 0 {
        bail!("unknown client flags {client_flags:#x}");
    }
    let no_zeroes = client_flags & FLAG_NO_ZEROES as u32 != 0;
    loop {
        if rd_u64(c)? != IHAVEOPT {
            bail!("option without IHAVEOPT");
        }
        let opt = rd_u32(c)?;
        let len = rd_u32(c)?;
        if len > MAX_OPTION {
            bail!("option {opt} of {len} bytes is too long");
        }
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(b) = server.resolve(&name) else {
                    // This option has no error reply: the connection closes.
                    bail!("client asked for unknown export {name:?}");
                };
                let mut m = Vec::new();
                m.extend_from_slice(&b.info().capacity_bytes().to_be_bytes());
                m.extend_from_slice(&transmission_flags(&b).to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                c.write_all(&m)?;
                return Ok(Some(b));
            }
            OPT_ABORT => {
                let _ = opt_reply(c, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(c, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for (e, _) in server.exports() {
                    let mut d = (e.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.as_bytes());
                    opt_reply(c, opt, REP_SERVER, &d)?;
                }
                opt_reply(c, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = (|| {
                    let n = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
                    let name = data.get(4..4 + n)?;
                    let k = u16::from_be_bytes(data.get(4 + n..6 + n)?.try_into().ok()?) as usize;
                    (data.len() == 6 + n + 2 * k)
                        .then(|| String::from_utf8_lossy(name).into_owned())
                })();
                let Some(name) = parsed else {
                    opt_reply(c, opt, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                let Some(b) = server.resolve(&name) else {
                    let msg = format!("no export named {name:?}; NBD_OPT_LIST shows them");
                    opt_reply(c, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let info = b.info();
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&info.capacity_bytes().to_be_bytes());
                d.extend_from_slice(&transmission_flags(&b).to_be_bytes());
                opt_reply(c, opt, REP_INFO, &d)?;
                let bs = info.block_size;
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&bs.to_be_bytes());
                d.extend_from_slice(&bs.max(4096).to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                opt_reply(c, opt, REP_INFO, &d)?;
                opt_reply(c, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(b));
                }
            }
            _ => {
                opt_reply(c, opt, REP_ERR_UNSUP, b"not supported by vireo")?;
            }
        }
    }
}

fn client(server: &Arc<NbdServer>, mut c: Box<dyn Conn>) -> Result<()> {
    c.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    // The handshake's replies too: a client that does not read them is dropped.
    c.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let Some(bdev) = handshake(server, c.as_mut())? else {
        return Ok(());
    };
    c.set_read_timeout(None)?;
    // Dropped in reverse order: the lease, then this client's sender of the jobs.
    let (jobs, _lease) = server.worker(&bdev)?;
    let mut w = c.split(CLIENT_TIMEOUT)?;
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
    let credit = Arc::new(Credit::default());
    let credit_w = credit.clone();
    let writer = std::thread::Builder::new()
        .name("vireo-nbd-writer".into())
        .spawn(move || {
            let mut ok = true;
            // Replies keep coming until every job of this client finished (a client
            // that went away still gets its requests completed, not dropped mid-I/O).
            for r in reply_rx {
                let bytes = r.cost;
                if !ok {
                    credit_w.give(bytes);
                    continue;
                }
                let mut m = Vec::with_capacity(16);
                m.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                m.extend_from_slice(&r.error.to_be_bytes());
                m.extend_from_slice(&r.handle.to_be_bytes());
                let res = w.write_all(&m).and_then(|_| match (&r.data, r.error) {
                    (Some(d), 0) => w.write_all(d.as_slice()),
                    _ => Ok(()),
                });
                ok = res.is_ok();
                credit_w.give(bytes);
            }
        })
        .context("cannot start an NBD writer thread")?;
    let result = (|| -> Result<()> {
        loop {
            let magic = match rd_u32(&mut c) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            if magic != REQUEST_MAGIC {
                bail!("bad request magic {magic:#x}");
            }
            let flags = rd_u16(&mut c)?;
            let cmd = rd_u16(&mut c)?;
            let handle = rd_u64(&mut c)?;
            let offset = rd_u64(&mut c)?;
            let length = rd_u32(&mut c)?;
            let mut data = None;
            if cmd == CMD_WRITE {
                if length > MAX_PAYLOAD {
                    bail!("WRITE of {length} bytes exceeds the advertised maximum {MAX_PAYLOAD}");
                }
                let mut d = match bdev.alloc_buf(length as usize) {
                    Ok(b) if length > 0 => IoBuf::Dma(b),
                    _ => IoBuf::Heap(vec![0u8; length as usize]),
                };
                c.read_exact(d.as_mut_slice())?;
                data = Some(d);
            }
            if cmd == CMD_DISC {
                return Ok(());
            }
            let cost = match cmd {
                CMD_READ | CMD_WRITE => (length as usize).min(MAX_PAYLOAD as usize),
                _ => 0,
            };
            credit.take(cost);
            let job = Job {
                handle,
                cmd,
                flags,
                offset,
                length,
                data,
                cost,
                reply: reply_tx.clone(),
            };
            if jobs.send(job).is_err() {
                server.forget_worker(bdev.name());
                bail!("the I/O thread of {} is gone", bdev.name());
            }
        }
    })();
    drop(reply_tx);
    let _ = writer.join();
    result
}

struct Pending {
    handle: u64,
    reply: Sender<Reply>,
    cost: usize,
    /// Write with FUA: a flush follows before the reply.
    fua: bool,
    read: bool,
}

fn errno(e: &IoError) -> u32 {
    match e {
        IoError::ReadOnly(_) => EPERM,
        IoError::NoMemory(_) => ENOMEM,
        IoError::OutOfRange { .. } => ENOSPC,
        IoError::InvalidRequest(_) | IoError::InvalidBuffer(_) => EINVAL,
        IoError::Unsupported { .. } | IoError::DeviceUnsupported => ENOTSUP,
        _ => EIO,
    }
}

/// The I/O thread of one bdev.
fn io_thread(bdev: Arc<Bdev>, rx: Receiver<Job>) {
    let mut ch = match bdev.open_channel() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(bdev = %bdev.name(), "nbd: cannot open an I/O channel: {e}");
            for j in rx {
                send_reply(&j.reply, j.handle, EIO, j.cost);
            }
            return;
        }
    };
    let info = bdev.info();
    let bs = info.block_size as u64;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut next_id = 1u64;
    let mut done: Vec<Completion> = Vec::new();
    let mut dead = false;
    loop {
        // A device that is gone (or a bdev that was removed): close the channel so the
        // controller can be released; clients get errors from a new worker.
        if (dead || bdev.is_removed()) && ch.in_flight() == 0 {
            tracing::warn!(bdev = %bdev.name(), "nbd: the device is gone; closing the export's channel");
            break;
        }
        let first = if ch.in_flight() == 0 {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(j) => Some(j),
                // Still poll: timed-out requests the device holds are reaped (and
                // escalated) only by polling.
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            rx.try_recv().ok()
        };
        let mut next = first;
        while let Some(j) = next {
            start(&mut ch, &bdev, bs, j, &mut pending, &mut next_id);
            next = rx.try_recv().ok();
        }
        ch.poll(&mut done);
        for c in done.drain(..) {
            let Some(p) = pending.remove(&c.user_data) else {
                continue;
            };
            if p.fua && c.result.is_ok() {
                let id = next_id;
                next_id += 1;
                if let Err(r) = ch.submit(IoRequest::no_data(IoOp::Flush, 0, 0, id)) {
                    send_reply(&p.reply, p.handle, errno(&r.error), p.cost);
                } else {
                    pending.insert(id, Pending { fua: false, ..p });
                }
                continue;
            }
            if let Err(e) = &c.result {
                dead |= matches!(
                    e.kind(),
                    vireo_bdev::ErrorKind::Disconnected | vireo_bdev::ErrorKind::ControllerFailed
                );
            }
            let error = c.result.as_ref().err().map_or(0, errno);
            let data = if p.read && error == 0 { c.buf } else { None };
            let _ = p.reply.send(Reply {
                handle: p.handle,
                error,
                data,
                cost: p.cost,
            });
        }
    }
}

fn start(
    ch: &mut vireo_bdev::IoChannel,
    bdev: &Arc<Bdev>,
    bs: u64,
    mut j: Job,
    pending: &mut HashMap<u64, Pending>,
    next_id: &mut u64,
) {
    let data = j.data.take();
    let reply_now = |error: u32| send_reply(&j.reply, j.handle, error, j.cost);
    let info = bdev.info();
    let len = j.length as u64;
    let with_range = matches!(
        j.cmd,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE
    );
    if with_range {
        let sized = matches!(j.cmd, CMD_READ | CMD_WRITE);
        if !j.offset.is_multiple_of(bs)
            || !len.is_multiple_of(bs)
            || (sized && len > MAX_PAYLOAD as u64)
        {
            return reply_now(EINVAL);
        }
        if j.offset
            .checked_add(len)
            .is_none_or(|end| end > info.capacity_bytes())
        {
            return reply_now(ENOSPC);
        }
    }
    let id = *next_id;
    *next_id += 1;
    let (lba, n) = (j.offset / bs, len / bs);
    let fua = j.flags & CMD_FLAG_FUA != 0;
    let req = match j.cmd {
        CMD_READ => match bdev.alloc_buf(len as usize) {
            Ok(b) => IoRequest::read(lba, n, IoBuf::Dma(b), id),
            Err(_) => IoRequest::read(lba, n, IoBuf::Heap(vec![0; len as usize]), id),
        },
        CMD_WRITE => IoRequest::write(lba, n, data.unwrap_or_else(|| IoBuf::Heap(Vec::new())), id),
        CMD_FLUSH => IoRequest::no_data(IoOp::Flush, 0, 0, id),
        CMD_TRIM => {
            if !info.ops.unmap || n == 0 {
                // TRIM is advisory.
                return reply_now(0);
            }
            IoRequest::no_data(IoOp::Unmap, lba, n, id)
        }
        CMD_WRITE_ZEROES => {
            if n == 0 {
                return reply_now(0);
            }
            if info.ops.write_zeroes {
                IoRequest::no_data(IoOp::WriteZeroes, lba, n, id)
            } else if len <= 1 << 20 {
                // Without device write-zeroes, small ranges are written as zeros; larger
                // ones are refused (ENOTSUP makes clients write zeros themselves).
                IoRequest::write(lba, n, IoBuf::Heap(vec![0; len as usize]), id)
            } else {
                return reply_now(ENOTSUP);
            }
        }
        CMD_CACHE => return reply_now(0),
        _ => return reply_now(EINVAL),
    };
    let read = j.cmd == CMD_READ;
    let fua = fua && matches!(j.cmd, CMD_WRITE | CMD_WRITE_ZEROES);
    match ch.submit(req) {
        Ok(()) => {
            pending.insert(
                id,
                Pending {
                    handle: j.handle,
                    reply: j.reply,
                    cost: j.cost,
                    fua,
                    read,
                },
            );
        }
        Err(r) => send_reply(&j.reply, j.handle, errno(&r.error), j.cost),
    }
}

fn send_reply(tx: &Sender<Reply>, handle: u64, error: u32, cost: usize) {
    let _ = tx.send(Reply {
        handle,
        error,
        data: None,
        cost,
    });
}
