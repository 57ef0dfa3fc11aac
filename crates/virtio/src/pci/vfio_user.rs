//! A vfio-user client (the protocol of libvfio-user's `docs/vfio-user.rst`, version
//! 0.1): a PCI function emulated by another process (SPDK's `vfu_virtio` endpoints, for
//! one) and reached over a unix socket. vireo sends the version handshake, asks for the
//! device's and its regions' information (with the sparse-mmap capability and the file
//! descriptors of mappable areas), reads and writes regions with messages, and passes
//! its DMA memory as file descriptors (`DMA_MAP`) at device addresses equal to its
//! virtual addresses.
//!
//! The server is untrusted: every reply is checked (type, message id, command, sizes,
//! the echoed fields, the error bit) and a reply that does not fit poisons the
//! connection instead of being guessed at. Every exchange is bounded in time as a whole
//! (a server that trickles a reply byte by byte is cut off at the deadline), and a hang-up
//! does not wait for an exchange in progress.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::error::{Error, Result};
use crate::memory::{DmaRegionInfo, RegionListener};

// Commands (section "Commands").
const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const DEVICE_GET_INFO: u16 = 4;
const DEVICE_GET_REGION_INFO: u16 = 5;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
const DEVICE_RESET: u16 = 13;

const HEADER: usize = 16;
const FLAG_TYPE_MASK: u32 = 0xf;
const TYPE_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;

/// The protocol version vireo speaks.
const MAJOR: u16 = 0;
const MINOR: u16 = 1;
/// What vireo proposes as `max_data_xfer_size` and assumes when the server is silent.
const DEFAULT_XFER: u32 = 1 << 20;
/// The largest reply vireo accepts: a region read of the largest transfer, or region
/// information with its capabilities.
const MAX_REPLY: usize = HEADER + 16 + DEFAULT_XFER as usize;
/// Room offered for region information with capabilities.
const REGION_INFO_ROOM: u32 = 32 + 4096;

/// `VFIO_DEVICE_FLAGS_RESET`, `VFIO_DEVICE_FLAGS_PCI`.
const DEVICE_FLAG_RESET: u32 = 1;
const DEVICE_FLAG_PCI: u32 = 2;
/// `VFIO_REGION_INFO_FLAG_*`.
const REGION_FLAG_MMAP: u32 = 1 << 2;
const REGION_FLAG_CAPS: u32 = 1 << 3;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
const CAP_SPARSE_MMAP: u16 = 1;

/// Index of the PCI configuration-space region.
pub const CONFIG_REGION: u32 = 7;
/// How long vireo waits for any reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What `DEVICE_GET_INFO` says.
#[derive(Debug, Clone, Copy)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
}

/// What `DEVICE_GET_REGION_INFO` says about one region.
#[derive(Debug)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Offset of the region in `fd` for mmap.
    pub offset: u64,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Areas that may be mapped (offset in the region, length): the whole region when it
    /// is mappable without a sparse capability.
    pub sparse: Vec<(u64, u64)>,
    /// The file to map them from.
    pub fd: Option<Arc<File>>,
}

struct Conn {
    stream: UnixStream,
    /// How long one exchange (the command sent, its whole reply read) may take.
    timeout: Duration,
    next_id: u16,
    /// A reply did not fit: the byte stream cannot be trusted any more.
    poisoned: Option<String>,
}

/// A connection to a vfio-user server.
pub struct VfuClient {
    path: PathBuf,
    conn: Mutex<Conn>,
    /// The same socket, to shut down without waiting for the lock an exchange holds.
    shut: UnixStream,
    max_xfer: u32,
    /// Raised when the connection fails (the server hung up, a reply was bad).
    broken: Arc<AtomicBool>,
}

impl std::fmt::Debug for VfuClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfuClient")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Set the socket's timeouts to what is left until `deadline` (at least a millisecond: a
/// zero timeout would mean none).
fn set_timeouts(s: &UnixStream, deadline: Instant) -> std::io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    let left = left.max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))
}

/// `read_exact` that ends at `deadline` however the bytes trickle in.
fn read_by(s: &mut UnixStream, mut buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        set_timeouts(s, deadline)?;
        match s.read(buf) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server hung up",
                ))
            }
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` that ends at `deadline` however slowly the server reads.
fn write_by(s: &mut UnixStream, mut buf: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        set_timeouts(s, deadline)?;
        match s.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn name(cmd: u16) -> &'static str {
    match cmd {
        VERSION => "VFIO_USER_VERSION",
        DMA_MAP => "VFIO_USER_DMA_MAP",
        DMA_UNMAP => "VFIO_USER_DMA_UNMAP",
        DEVICE_GET_INFO => "VFIO_USER_DEVICE_GET_INFO",
        DEVICE_GET_REGION_INFO => "VFIO_USER_DEVICE_GET_REGION_INFO",
        REGION_READ => "VFIO_USER_REGION_READ",
        REGION_WRITE => "VFIO_USER_REGION_WRITE",
        DEVICE_RESET => "VFIO_USER_DEVICE_RESET",
        _ => "a vfio-user command",
    }
}

/// Parse the sparse-mmap capabilities of a region-information payload (the 32-byte
/// `vfio_region_info` and what follows it); offsets are from the payload's start.
pub fn parse_sparse(payload: &[u8], cap_offset: u32) -> Result<Vec<(u64, u64)>> {
    let bad = |why: String| Error::Device(format!("vfio-user region capabilities: {why}"));
    let mut areas = Vec::new();
    let mut at = cap_offset as usize;
    // A capability list that does not end is refused after 16 entries.
    for _ in 0..16 {
        if at == 0 {
            return Ok(areas);
        }
        if at < 32 || at.checked_add(8).is_none_or(|e| e > payload.len()) {
            return Err(bad(format!(
                "a capability at {at} lies outside the {} bytes of the reply",
                payload.len()
            )));
        }
        let id = le16(payload, at);
        let next = le32(payload, at + 4) as usize;
        if id == CAP_SPARSE_MMAP {
            if at + 16 > payload.len() {
                return Err(bad("sparse-mmap capability cut short".into()));
            }
            let n = le32(payload, at + 8) as usize;
            let body = at + 16;
            if n > 256 || body + n * 16 > payload.len() {
                return Err(bad(format!(
                    "sparse-mmap capability claims {n} areas, which do not fit in the reply"
                )));
            }
            for i in 0..n {
                let o = le64(payload, body + i * 16);
                let s = le64(payload, body + i * 16 + 8);
                areas.push((o, s));
            }
        }
        if next != 0 && next <= at {
            return Err(bad(format!(
                "capability list goes backwards ({next} after {at})"
            )));
        }
        at = next;
    }
    Err(bad("capability list longer than 16 entries".into()))
}

impl VfuClient {
    /// Connect to the server at `path` and negotiate the protocol version.
    pub fn connect(path: &Path, timeout: Duration) -> Result<VfuClient> {
        let stream = crate::unix::connect_unix(path, timeout).map_err(|e| {
            Error::io(
                format!("cannot connect to the vfio-user socket {}", path.display()),
                e,
            )
        })?;
        let shut = stream
            .try_clone()
            .map_err(|e| Error::io("duplicating the vfio-user socket", e))?;
        let mut c = VfuClient {
            path: path.to_path_buf(),
            conn: Mutex::new(Conn {
                stream,
                timeout: timeout.max(Duration::from_millis(10)),
                next_id: 0,
                poisoned: None,
            }),
            shut,
            max_xfer: DEFAULT_XFER,
            broken: Arc::new(AtomicBool::new(false)),
        };
        c.negotiate().map_err(|e| {
            Error::Device(format!(
                "{} does not speak vfio-user ({e}); a vhost-user socket needs trtype \"user\"",
                path.display()
            ))
        })?;
        Ok(c)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The flag raised when the connection fails.
    pub fn broken_flag(&self) -> Arc<AtomicBool> {
        self.broken.clone()
    }

    /// Hang up (the server sees the client go; later requests fail, and one in progress
    /// ends now).
    pub fn hang_up(&self) {
        self.broken.store(true, Ordering::Release);
        let _ = self.shut.shutdown(std::net::Shutdown::Both);
    }

    fn negotiate(&mut self) -> Result<()> {
        let json = format!(
            "{{\"capabilities\":{{\"max_msg_fds\":1,\"max_data_xfer_size\":{DEFAULT_XFER}}}}}\0"
        );
        let mut p = Vec::with_capacity(4 + json.len());
        p.extend_from_slice(&MAJOR.to_le_bytes());
        p.extend_from_slice(&MINOR.to_le_bytes());
        p.extend_from_slice(json.as_bytes());
        let (reply, _) = self.request(VERSION, &p, &[])?;
        if reply.len() < 4 {
            return Err(Error::Device(format!(
                "version reply of {} bytes (at least 4)",
                reply.len()
            )));
        }
        let (major, minor) = (le16(&reply, 0), le16(&reply, 2));
        if major != MAJOR || minor > MINOR {
            return Err(Error::Device(format!(
                "the server answered protocol version {major}.{minor}; vireo proposed {MAJOR}.{MINOR}"
            )));
        }
        let data = &reply[4..];
        let text = data.split(|b| *b == 0).next().unwrap_or(&[]);
        if let Some(v) = json_number(text, "max_data_xfer_size") {
            if v < 256 {
                return Err(Error::Device(format!(
                    "the server's max_data_xfer_size {v} is too small for register access"
                )));
            }
            self.max_xfer = v.min(DEFAULT_XFER as u64) as u32;
        }
        Ok(())
    }

    /// Send a command with `payload` (and `fds`) and return the reply's payload and the
    /// files that came with it.
    fn request(&self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> Result<(Vec<u8>, Vec<File>)> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = &c.poisoned {
            return Err(Error::Device(format!(
                "vfio-user {}: the connection failed earlier ({p})",
                self.path.display()
            )));
        }
        match Self::exchange(&mut c, cmd, payload, fds) {
            Err(e) => {
                c.poisoned = Some(e.to_string());
                self.broken.store(true, Ordering::Release);
                Err(e)
            }
            // A refusal is an answer: the connection goes on.
            Ok((_, _, Some(errno))) => Err(Error::Device(format!(
                "the vfio-user server {} refused {}: {}",
                self.path.display(),
                name(cmd),
                std::io::Error::from_raw_os_error(errno as i32)
            ))),
            Ok((body, files, None)) => Ok((body, files)),
        }
    }

    /// One command and its reply: (payload, files, the error number of a refusal).
    fn exchange(
        c: &mut Conn,
        cmd: u16,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(Vec<u8>, Vec<File>, Option<u32>)> {
        let id = c.next_id;
        c.next_id = c.next_id.wrapping_add(1);
        let size = (HEADER + payload.len()) as u32;
        let mut msg = Vec::with_capacity(HEADER + payload.len());
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(&cmd.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        msg.extend_from_slice(payload);
        let what = name(cmd);
        let deadline = Instant::now() + c.timeout;
        let io = |e: std::io::Error, dir: &str| {
            let e = if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer in time (is the server frozen?)",
                )
            } else {
                e
            };
            Error::io(format!("vfio-user {what}: {dir}"), e)
        };
        let mut sent = 0;
        if !fds.is_empty() {
            set_timeouts(&c.stream, deadline).map_err(|e| io(e, "send"))?;
            sent = c
                .stream
                .send_with_fds(&[&msg[..]], fds)
                .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno()), "send"))?;
        }
        write_by(&mut c.stream, &msg[sent..], deadline).map_err(|e| io(e, "send"))?;
        // The header, with any file descriptors that come along.
        let mut hdr = [0u8; HEADER];
        let mut raw = [-1 as RawFd; 4];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: HEADER,
        }];
        set_timeouts(&c.stream, deadline).map_err(|e| io(e, "receive"))?;
        // SAFETY: the iovec points at `hdr`, which lives across the call; the received
        // descriptors are owned by us from here and wrapped in File below.
        let (got, nfds) = unsafe { c.stream.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno()), "receive"))?;
        let files: Vec<File> = raw[..nfds.min(raw.len())]
            .iter()
            .filter(|fd| **fd >= 0)
            // SAFETY: each descriptor was just received with SCM_RIGHTS and nothing
            // else owns it.
            .map(|fd| unsafe { File::from_raw_fd(*fd) })
            .collect();
        if got == 0 {
            return Err(io(
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server hung up"),
                "receive",
            ));
        }
        if got < HEADER {
            read_by(&mut c.stream, &mut hdr[got..], deadline).map_err(|e| io(e, "receive"))?;
        }
        let (rid, rcmd, rsize, rflags, rerr) = (
            le16(&hdr, 0),
            le16(&hdr, 2),
            le32(&hdr, 4) as usize,
            le32(&hdr, 8),
            le32(&hdr, 12),
        );
        let bad = |why: String| Error::Device(format!("vfio-user {what}: {why}"));
        if rflags & FLAG_TYPE_MASK != TYPE_REPLY {
            return Err(bad(format!(
                "the server sent a message of type {} (command {rcmd}) instead of a reply; vireo passes its memory as file descriptors and serves no server commands",
                rflags & FLAG_TYPE_MASK
            )));
        }
        if rid != id || rcmd != cmd {
            return Err(bad(format!(
                "reply to message {rid} (command {rcmd}) while message {id} (command {cmd}) waits"
            )));
        }
        if !(HEADER..=MAX_REPLY).contains(&rsize) {
            return Err(bad(format!(
                "reply size {rsize} outside {HEADER}..={MAX_REPLY}"
            )));
        }
        let mut body = vec![0u8; rsize - HEADER];
        read_by(&mut c.stream, &mut body, deadline).map_err(|e| io(e, "receive"))?;
        let refused = (rflags & FLAG_ERROR != 0).then_some(rerr);
        Ok((body, files, refused))
    }

    /// `DEVICE_GET_INFO`; the device must be a PCI device.
    pub fn device_info(&self) -> Result<DeviceInfo> {
        let mut p = [0u8; 16];
        p[0..4].copy_from_slice(&16u32.to_le_bytes());
        let (r, _) = self.request(DEVICE_GET_INFO, &p, &[])?;
        if r.len() < 16 {
            return Err(Error::Device(format!(
                "vfio-user device information of {} bytes (16 expected)",
                r.len()
            )));
        }
        let info = DeviceInfo {
            flags: le32(&r, 4),
            num_regions: le32(&r, 8),
        };
        if info.flags & DEVICE_FLAG_PCI == 0 {
            return Err(Error::Features(format!(
                "{}: the vfio-user device is not a PCI device (flags {:#x}); vireo drives virtio PCI devices",
                self.path.display(),
                info.flags
            )));
        }
        if info.num_regions <= CONFIG_REGION {
            return Err(Error::Device(format!(
                "{}: the vfio-user device has {} regions, without PCI configuration space (region {CONFIG_REGION})",
                self.path.display(),
                info.num_regions
            )));
        }
        Ok(info)
    }

    /// Whether `DEVICE_RESET` is supported according to `info`.
    pub fn resettable(info: &DeviceInfo) -> bool {
        info.flags & DEVICE_FLAG_RESET != 0
    }

    /// `DEVICE_GET_REGION_INFO` of region `index`.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let mut room = REGION_INFO_ROOM;
        for _ in 0..2 {
            let mut p = [0u8; 32];
            p[0..4].copy_from_slice(&room.to_le_bytes());
            p[8..12].copy_from_slice(&index.to_le_bytes());
            let (r, mut files) = self.request(DEVICE_GET_REGION_INFO, &p, &[])?;
            if r.len() < 32 {
                return Err(Error::Device(format!(
                    "vfio-user region {index} information of {} bytes (32 expected)",
                    r.len()
                )));
            }
            let (argsz, flags, rindex, cap_offset) =
                (le32(&r, 0), le32(&r, 4), le32(&r, 8), le32(&r, 12));
            if rindex != index {
                return Err(Error::Device(format!(
                    "vfio-user: information of region {rindex} when region {index} was asked for"
                )));
            }
            if argsz > room && (flags & REGION_FLAG_CAPS != 0) && r.len() < argsz as usize {
                if argsz > 1 << 16 {
                    return Err(Error::Device(format!(
                        "vfio-user region {index} information of {argsz} bytes"
                    )));
                }
                room = argsz;
                continue;
            }
            let (size, offset) = (le64(&r, 16), le64(&r, 24));
            let mut sparse = Vec::new();
            let mut fd = None;
            if flags & REGION_FLAG_MMAP != 0 && !files.is_empty() {
                fd = Some(Arc::new(files.swap_remove(0)));
                if flags & REGION_FLAG_CAPS != 0 && cap_offset != 0 {
                    sparse = parse_sparse(&r, cap_offset)?;
                } else {
                    sparse.push((0, size));
                }
                // Areas beyond the region are dropped (never mapped).
                sparse.retain(|(o, s)| *s > 0 && o.checked_add(*s).is_some_and(|e| e <= size));
            }
            return Ok(RegionInfo {
                size,
                offset,
                flags,
                sparse,
                fd,
            });
        }
        Err(Error::Device(format!(
            "vfio-user region {index}: the server kept asking for more room"
        )))
    }

    /// `REGION_READ` of `buf.len()` bytes at `offset` of region `index`.
    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        for (k, chunk) in buf.chunks_mut(self.max_xfer as usize).enumerate() {
            let off = offset + (k * self.max_xfer as usize) as u64;
            let mut p = [0u8; 16];
            p[0..8].copy_from_slice(&off.to_le_bytes());
            p[8..12].copy_from_slice(&index.to_le_bytes());
            p[12..16].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
            let (r, _) = self.request(REGION_READ, &p, &[])?;
            if r.len() != 16 + chunk.len()
                || le64(&r, 0) != off
                || le32(&r, 8) != index
                || le32(&r, 12) as usize != chunk.len()
            {
                let e = format!(
                    "vfio-user: a read of {} bytes at {off:#x} of region {index} was answered with {} bytes for {:#x}/{}/{}",
                    chunk.len(),
                    r.len(),
                    if r.len() >= 8 { le64(&r, 0) } else { 0 },
                    if r.len() >= 12 { le32(&r, 8) } else { 0 },
                    if r.len() >= 16 { le32(&r, 12) } else { 0 },
                );
                return Err(Error::Device(e));
            }
            chunk.copy_from_slice(&r[16..]);
        }
        Ok(())
    }

    /// `REGION_WRITE` of `data` at `offset` of region `index`.
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        for (k, chunk) in data.chunks(self.max_xfer as usize).enumerate() {
            let off = offset + (k * self.max_xfer as usize) as u64;
            let mut p = Vec::with_capacity(16 + chunk.len());
            p.extend_from_slice(&off.to_le_bytes());
            p.extend_from_slice(&index.to_le_bytes());
            p.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            p.extend_from_slice(chunk);
            let (r, _) = self.request(REGION_WRITE, &p, &[])?;
            if r.len() != 16
                || le64(&r, 0) != off
                || le32(&r, 8) != index
                || le32(&r, 12) as usize != chunk.len()
            {
                return Err(Error::Device(format!(
                    "vfio-user: a write of {} bytes at {off:#x} of region {index} was answered with {} bytes for {:#x}/{}/{}",
                    chunk.len(),
                    r.len(),
                    if r.len() >= 8 { le64(&r, 0) } else { 0 },
                    if r.len() >= 12 { le32(&r, 8) } else { 0 },
                    if r.len() >= 16 { le32(&r, 12) } else { 0 },
                )));
            }
        }
        Ok(())
    }

    /// `DMA_MAP` of a region of vireo's memory (readable and writable), passing its file.
    pub fn dma_map(&self, r: &DmaRegionInfo) -> Result<()> {
        let mut p = [0u8; 32];
        p[0..4].copy_from_slice(&32u32.to_le_bytes());
        p[4..8].copy_from_slice(&3u32.to_le_bytes());
        p[8..16].copy_from_slice(&r.fd_offset.to_le_bytes());
        p[16..24].copy_from_slice(&r.iova.to_le_bytes());
        p[24..32].copy_from_slice(&r.len.to_le_bytes());
        self.request(DMA_MAP, &p, &[r.fd]).map(|_| ())
    }

    /// `DMA_UNMAP` of a region mapped earlier.
    pub fn dma_unmap(&self, iova: u64, len: u64) -> Result<()> {
        let mut p = [0u8; 24];
        p[0..4].copy_from_slice(&24u32.to_le_bytes());
        p[8..16].copy_from_slice(&iova.to_le_bytes());
        p[16..24].copy_from_slice(&len.to_le_bytes());
        self.request(DMA_UNMAP, &p, &[]).map(|_| ())
    }

    /// `DEVICE_RESET`.
    pub fn reset(&self) -> Result<()> {
        self.request(DEVICE_RESET, &[], &[]).map(|_| ())
    }

    /// Tell the socket's descriptor (for tests).
    pub fn raw_fd(&self) -> RawFd {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stream
            .as_raw_fd()
    }
}

/// A number of the server's JSON capabilities (`"name": 123`), without a JSON parser:
/// the keys vireo reads are unique plain numbers.
fn json_number(text: &[u8], key: &str) -> Option<u64> {
    let s = std::str::from_utf8(text).ok()?;
    let at = s.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = s[at..].trim_start().strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Maps vireo's DMA regions into a vfio-user server (`DMA_MAP` with the region's file).
pub struct VfuDmaMapper {
    /// The connection.
    pub client: Arc<VfuClient>,
}

impl RegionListener for VfuDmaMapper {
    fn region_added(&self, region: &DmaRegionInfo) -> Result<()> {
        if self.client.broken.load(Ordering::Acquire) {
            // A connection that is gone needs no map; its successor maps all regions.
            return Ok(());
        }
        self.client.dma_map(region)
    }

    fn region_removed(&self, region: &DmaRegionInfo) {
        if !self.client.broken.load(Ordering::Acquire) {
            let _ = self.client.dma_unmap(region.iova, region.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap_payload(areas: &[(u64, u64)], next: u32) -> Vec<u8> {
        let mut p = vec![0u8; 32];
        p.extend_from_slice(&CAP_SPARSE_MMAP.to_le_bytes());
        p.extend_from_slice(&1u16.to_le_bytes());
        p.extend_from_slice(&next.to_le_bytes());
        p.extend_from_slice(&(areas.len() as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for (o, s) in areas {
            p.extend_from_slice(&o.to_le_bytes());
            p.extend_from_slice(&s.to_le_bytes());
        }
        p
    }

    #[test]
    fn sparse_areas_are_parsed_and_hostile_lists_refused() {
        let p = cap_payload(&[(0x3000, 0x1000)], 0);
        assert_eq!(parse_sparse(&p, 32).unwrap(), vec![(0x3000, 0x1000)]);
        // A capability pointing at itself.
        let p = cap_payload(&[(0x3000, 0x1000)], 32);
        assert!(parse_sparse(&p, 32).is_err());
        // More areas than the reply holds.
        let mut p = cap_payload(&[(0x3000, 0x1000)], 0);
        p[40..44].copy_from_slice(&9u32.to_le_bytes());
        assert!(parse_sparse(&p, 32)
            .unwrap_err()
            .to_string()
            .contains("9 areas"));
        // A capability offset inside the region information or past the end.
        assert!(parse_sparse(&p, 8).is_err());
        assert!(parse_sparse(&p, 4000).is_err());
    }

    /// A scripted server: reads one message, answers with what `answer` returns
    /// (flags, errno, payload, message id offset), for each step.
    type Step = Box<dyn Fn(u16, &[u8]) -> (u32, u32, Vec<u8>, u16) + Send>;

    fn sock_path() -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vireo-vfu-test-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn serve(steps: Vec<Step>) -> std::path::PathBuf {
        let path = sock_path();
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            for step in steps {
                let mut h = [0u8; HEADER];
                if s.read_exact(&mut h).is_err() {
                    return;
                }
                let mut p = vec![0u8; le32(&h, 4) as usize - HEADER];
                s.read_exact(&mut p).unwrap();
                let (id, cmd) = (le16(&h, 0), le16(&h, 2));
                let (flags, errno, body, skew) = step(cmd, &p);
                let mut m = Vec::new();
                m.extend_from_slice(&id.wrapping_add(skew).to_le_bytes());
                m.extend_from_slice(&cmd.to_le_bytes());
                m.extend_from_slice(&((HEADER + body.len()) as u32).to_le_bytes());
                m.extend_from_slice(&flags.to_le_bytes());
                m.extend_from_slice(&errno.to_le_bytes());
                m.extend_from_slice(&body);
                s.write_all(&m).unwrap();
            }
            // Keep the connection open until the client goes.
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
        });
        path
    }

    fn version(major: u16) -> Step {
        Box::new(move |cmd, _| {
            assert_eq!(cmd, VERSION);
            let mut b = major.to_le_bytes().to_vec();
            b.extend_from_slice(&MINOR.to_le_bytes());
            b.extend_from_slice(b"{\"capabilities\":{\"max_data_xfer_size\":65536}}\0");
            (TYPE_REPLY, 0, b, 0)
        })
    }

    fn connect(path: &Path) -> Result<VfuClient> {
        VfuClient::connect(path, Duration::from_secs(2))
    }

    #[test]
    fn a_reply_to_another_message_poisons_the_connection() {
        let echo_read: Step = Box::new(|_, p| {
            let mut b = p.to_vec();
            b.extend_from_slice(&[0u8; 4]);
            (TYPE_REPLY, 0, b, 1)
        });
        let path = serve(vec![version(0), echo_read]);
        let c = connect(&path).unwrap();
        let mut buf = [0u8; 4];
        let e = c.region_read(7, 0, &mut buf).unwrap_err().to_string();
        assert!(e.contains("reply to message"), "{e}");
        assert!(c.broken_flag().load(Ordering::Acquire));
        let e = c.region_read(7, 0, &mut buf).unwrap_err().to_string();
        assert!(e.contains("failed earlier"), "{e}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_refusal_fails_one_call_and_short_answers_are_caught() {
        let refuse: Step =
            Box::new(|_, _| (TYPE_REPLY | FLAG_ERROR, libc::EINVAL as u32, vec![], 0));
        // A read answered with fewer bytes than asked.
        let short_read: Step = Box::new(|_, p| {
            let mut b = p.to_vec();
            b[12..16].copy_from_slice(&2u32.to_le_bytes());
            b.extend_from_slice(&[0u8; 2]);
            (TYPE_REPLY, 0, b, 0)
        });
        let not_pci: Step = Box::new(|_, _| {
            let mut b = vec![0u8; 16];
            b[0..4].copy_from_slice(&16u32.to_le_bytes());
            b[8..12].copy_from_slice(&9u32.to_le_bytes());
            (TYPE_REPLY, 0, b, 0)
        });
        let path = serve(vec![version(0), refuse, not_pci, short_read]);
        let c = connect(&path).unwrap();
        let e = c.region_write(4, 0, &[1, 0]).unwrap_err().to_string();
        assert!(
            e.contains("refused VFIO_USER_REGION_WRITE") && e.contains("Invalid argument"),
            "{e}"
        );
        assert!(
            !c.broken_flag().load(Ordering::Acquire),
            "a refusal is an answer"
        );
        let e = c.device_info().unwrap_err().to_string();
        assert!(e.contains("not a PCI device"), "{e}");
        let mut buf = [0u8; 4];
        let e = c.region_read(7, 0, &mut buf).unwrap_err().to_string();
        assert!(e.contains("answered with"), "{e}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn another_protocol_version_or_silence_is_not_vfio_user() {
        let path = serve(vec![version(1)]);
        let e = connect(&path).unwrap_err().to_string();
        assert!(
            e.contains("does not speak vfio-user") && e.contains("version 1.1"),
            "{e}"
        );
        let _ = std::fs::remove_file(path);
        // A server that reads and never answers: bounded by the timeout.
        let path = serve(vec![Box::new(|_, _| {
            std::thread::sleep(Duration::from_secs(5));
            (TYPE_REPLY, 0, vec![], 0)
        })]);
        let e = VfuClient::connect(&path, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not speak vfio-user") && e.contains("no answer in time"),
            "{e}"
        );
        let _ = std::fs::remove_file(path);
    }

    /// A server that answers the version handshake and then hands its socket and the
    /// next message's (id, command, payload) to `then`.
    fn serve_then(
        then: impl FnOnce(UnixStream, u16, u16, Vec<u8>) + Send + 'static,
    ) -> std::path::PathBuf {
        let path = sock_path();
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let next = |mut s: &UnixStream| {
                let mut h = [0u8; HEADER];
                s.read_exact(&mut h).ok()?;
                let mut p = vec![0u8; le32(&h, 4) as usize - HEADER];
                s.read_exact(&mut p).ok()?;
                Some((le16(&h, 0), le16(&h, 2), p))
            };
            let Some((id, cmd, _)) = next(&s) else { return };
            let mut b = MAJOR.to_le_bytes().to_vec();
            b.extend_from_slice(&MINOR.to_le_bytes());
            b.extend_from_slice(b"{}\0");
            let mut m = header(id, cmd, b.len(), TYPE_REPLY);
            m.extend_from_slice(&b);
            s.write_all(&m).unwrap();
            let Some((id, cmd, p)) = next(&s) else { return };
            then(s, id, cmd, p);
        });
        path
    }

    fn header(id: u16, cmd: u16, body: usize, flags: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_le_bytes());
        m.extend_from_slice(&cmd.to_le_bytes());
        m.extend_from_slice(&((HEADER + body) as u32).to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m
    }

    #[test]
    fn a_trickled_reply_is_cut_off_at_the_deadline_of_the_whole_exchange() {
        // The header promises a megabyte; the body then comes a byte every 50 ms, each
        // well within the 300 ms timeout of one read.
        let path = serve_then(|mut s, id, cmd, _| {
            let _ = s.write_all(&header(id, cmd, MAX_REPLY - HEADER, TYPE_REPLY));
            for _ in 0..200 {
                std::thread::sleep(Duration::from_millis(50));
                if s.write_all(&[0]).is_err() {
                    return;
                }
            }
        });
        let c = VfuClient::connect(&path, Duration::from_millis(300)).unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 4];
        let e = c.region_read(7, 0, &mut buf).unwrap_err().to_string();
        assert!(e.contains("no answer in time"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(c.broken_flag().load(Ordering::Acquire));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_hang_up_ends_an_exchange_in_progress() {
        let path = serve_then(|s, _, _, _| {
            // Never answer; keep the socket until the client goes.
            let mut b = [0u8; 1];
            let _ = (&s).read(&mut b);
        });
        let c = Arc::new(VfuClient::connect(&path, Duration::from_secs(20)).unwrap());
        let c2 = c.clone();
        let t = Instant::now();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4];
            c2.region_read(7, 0, &mut buf)
        });
        std::thread::sleep(Duration::from_millis(200));
        c.hang_up();
        let r = reader.join().unwrap();
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_write_reply_must_echo_offset_and_region() {
        for (skew_off, skew_region) in [(4u64, 0u32), (0, 2)] {
            let path = serve_then(move |mut s, id, cmd, p| {
                let mut b = p[..16].to_vec();
                let off = le64(&b, 0) + skew_off;
                b[0..8].copy_from_slice(&off.to_le_bytes());
                let r = le32(&b, 8) + skew_region;
                b[8..12].copy_from_slice(&r.to_le_bytes());
                let mut m = header(id, cmd, b.len(), TYPE_REPLY);
                m.extend_from_slice(&b);
                let _ = s.write_all(&m);
                let mut x = [0u8; 1];
                let _ = s.read(&mut x);
            });
            let c = connect(&path).unwrap();
            let e = c.region_write(4, 0x10, &[1, 0]).unwrap_err().to_string();
            assert!(e.contains("was answered with"), "{e}");
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn json_numbers_are_read() {
        let t = br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size": 1048576,"migration":{"pgsize":4096}}}"#;
        assert_eq!(json_number(t, "max_data_xfer_size"), Some(1048576));
        assert_eq!(json_number(t, "max_msg_fds"), Some(8));
        assert_eq!(json_number(t, "nothing"), None);
    }
}
