//! The NBD protocol's numbers and the option phase of the fixed newstyle handshake
//! (blocking, on the connection's own short-lived thread, within a deadline).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use vireo_bdev::Bdev;

use super::{NbdServer, Sock};

pub(super) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(super) const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub(super) const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(super) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
pub(super) const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub(super) const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
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

pub(super) const CMD_FLAG_FUA: u16 = 1;
pub(super) const CMD_FLAG_NO_HOLE: u16 = 2;
pub(super) const CMD_FLAG_DF: u16 = 4;
pub(super) const CMD_FLAG_REQ_ONE: u16 = 8;

pub(super) const CMD_READ: u16 = 0;
pub(super) const CMD_WRITE: u16 = 1;
pub(super) const CMD_DISC: u16 = 2;
pub(super) const CMD_FLUSH: u16 = 3;
pub(super) const CMD_TRIM: u16 = 4;
pub(super) const CMD_CACHE: u16 = 5;
pub(super) const CMD_WRITE_ZEROES: u16 = 6;
pub(super) const CMD_BLOCK_STATUS: u16 = 7;

pub(super) const REPLY_FLAG_DONE: u16 = 1;
pub(super) const REPLY_TYPE_NONE: u16 = 0;
pub(super) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(super) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(super) const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

pub(super) const EPERM: u32 = 1;
pub(super) const EIO: u32 = 5;
pub(super) const ENOMEM: u32 = 12;
pub(super) const EINVAL: u32 = 22;
pub(super) const ENOSPC: u32 = 28;

/// Largest READ/WRITE payload (advertised as the maximum block size).
pub(super) const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload a client may send.
const MAX_OPTION: u32 = 64 << 10;
/// The one meta context served: every block is data.
const BASE_ALLOCATION: &str = "base:allocation";
/// Its id in NBD_REP_META_CONTEXT and block status replies.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// What the option phase settled: the export to serve and how to talk.
pub(super) struct Negotiated {
    pub bdev: Arc<Bdev>,
    pub export: String,
    /// Structured replies (NBD_OPT_STRUCTURED_REPLY).
    pub structured: bool,
    /// `base:allocation` was selected (NBD_OPT_SET_META_CONTEXT).
    pub base_allocation: bool,
}

/// Transmission flags of `b`. A read-only export advertises no write command, nor FUA;
/// WRITE_ZEROES only where the bdev has write-zeroes (clients write zeros themselves
/// otherwise, as the Linux client and QEMU do).
pub(super) fn transmission_flags(b: &Bdev) -> u16 {
    let i = b.info();
    // A flush reaches the device and covers every completed write, whichever
    // connection sent it: multi-conn is safe.
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
    if i.read_only {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_FUA;
        if i.ops.write_zeroes {
            f |= TF_SEND_WRITE_ZEROES;
        }
        if i.ops.unmap {
            f |= TF_SEND_TRIM;
        }
    }
    f
}

/// A client socket with a deadline: every read and write of the handshake must finish
/// by it.
pub(super) struct Deadlined {
    pub sock: Sock,
    pub deadline: Instant,
}

impl Deadlined {
    fn left(&self) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        self.sock.set_timeouts(Some(left))
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.left()?;
        self.sock.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.left()?;
        self.sock.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

/// The server's greeting (fixed newstyle, no zeroes).
pub(super) fn hello() -> [u8; 18] {
    let mut h = [0u8; 18];
    h[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    h[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    h[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    h
}

/// One option from the client: (option, data).
fn read_option(c: &mut (impl Read + ?Sized)) -> Result<(u32, Vec<u8>)> {
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
    Ok((opt, data))
}

/// The client's flags after the greeting; returns whether it wants no zeroes.
pub(super) fn client_flags(c: &mut (impl Read + ?Sized)) -> Result<bool> {
    let client_flags = rd_u32(c)?;
    if client_flags & !(FLAG_FIXED_NEWSTYLE as u32 | FLAG_NO_ZEROES as u32) != 0 {
        bail!("unknown client flags {client_flags:#x}");
    }
    Ok(client_flags & FLAG_NO_ZEROES as u32 != 0)
}

/// Answer every option of a client the server cannot take (`why`), up to a few, then
/// give up on it: so that it learns why instead of seeing a closed connection.
pub(super) fn refuse(c: &mut (impl Read + Write + ?Sized), why: &str) -> Result<()> {
    c.write_all(&hello())?;
    client_flags(c)?;
    for _ in 0..4 {
        let (opt, _) = read_option(c)?;
        if opt == OPT_ABORT {
            let _ = opt_reply(c, opt, REP_ACK, &[]);
            return Ok(());
        }
        opt_reply(c, opt, REP_ERR_POLICY, why.as_bytes())?;
        if opt == OPT_EXPORT_NAME {
            break;
        }
    }
    Ok(())
}

/// Parse the export name and queries of a LIST/SET_META_CONTEXT option.
fn meta_queries(data: &[u8]) -> Option<(String, Vec<String>)> {
    let n = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = String::from_utf8_lossy(data.get(4..4 + n)?).into_owned();
    let mut at = 4 + n;
    let count = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
    at += 4;
    let mut qs = Vec::new();
    for _ in 0..count {
        let l = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        qs.push(String::from_utf8_lossy(data.get(at..at + l)?).into_owned());
        at += l;
    }
    (at == data.len()).then_some((name, qs))
}

/// How the option phase treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TlsState {
    /// No TLS configured: STARTTLS is unsupported.
    Off,
    /// TLS may be started.
    Allowed,
    /// TLS must be started before anything else.
    Required,
    /// TLS is running.
    On,
}

/// How the option phase ended.
pub(super) enum Outcome {
    /// Serve this export.
    Serve(Negotiated),
    /// The client aborted.
    Aborted,
    /// STARTTLS was acknowledged: go on with the option phase over TLS.
    StartTls,
}

/// The option phase after the greeting and the client's flags. `c` is the (possibly
/// TLS) stream; `tls` says what STARTTLS does.
pub(super) fn options(
    server: &NbdServer,
    c: &mut dyn ReadWrite,
    no_zeroes: bool,
    tls: TlsState,
) -> Result<Outcome> {
    let mut structured = false;
    let mut base_allocation = false;
    loop {
        let (opt, data) = read_option(c)?;
        if tls == TlsState::Required && !matches!(opt, OPT_STARTTLS | OPT_ABORT) {
            if opt == OPT_EXPORT_NAME {
                bail!("client asked for an export without TLS, which this server requires");
            }
            opt_reply(
                c,
                opt,
                REP_ERR_TLS_REQD,
                b"this server requires TLS (NBD_OPT_STARTTLS) first",
            )?;
            continue;
        }
        match opt {
            OPT_STARTTLS => match tls {
                TlsState::Off => opt_reply(
                    c,
                    opt,
                    REP_ERR_UNSUP,
                    b"TLS is not configured on this server",
                )?,
                TlsState::On => {
                    opt_reply(c, opt, REP_ERR_INVALID, b"TLS is already running")?;
                }
                TlsState::Allowed | TlsState::Required => {
                    if !data.is_empty() {
                        opt_reply(c, opt, REP_ERR_INVALID, b"STARTTLS takes no data")?;
                        continue;
                    }
                    opt_reply(c, opt, REP_ACK, &[])?;
                    // Whatever was negotiated before TLS does not count.
                    return Ok(Outcome::StartTls);
                }
            },
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
                return Ok(Outcome::Serve(Negotiated {
                    bdev: b,
                    export: name,
                    structured,
                    base_allocation: base_allocation && structured,
                }));
            }
            OPT_ABORT => {
                let _ = opt_reply(c, opt, REP_ACK, &[]);
                return Ok(Outcome::Aborted);
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
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    opt_reply(c, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                structured = true;
                opt_reply(c, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let Some((_, queries)) = meta_queries(&data) else {
                    opt_reply(c, opt, REP_ERR_INVALID, b"malformed meta context request")?;
                    continue;
                };
                if opt == OPT_SET_META_CONTEXT && !structured {
                    opt_reply(
                        c,
                        opt,
                        REP_ERR_INVALID,
                        b"meta contexts need structured replies first",
                    )?;
                    continue;
                }
                let listing = opt == OPT_LIST_META_CONTEXT;
                let wanted = queries
                    .iter()
                    .any(|q| q == BASE_ALLOCATION || (listing && (q == "base:" || q.is_empty())))
                    || (listing && queries.is_empty());
                if opt == OPT_SET_META_CONTEXT {
                    base_allocation = wanted;
                }
                if wanted {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    opt_reply(c, opt, REP_META_CONTEXT, &d)?;
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
                    return Ok(Outcome::Serve(Negotiated {
                        bdev: b,
                        export: name,
                        structured,
                        base_allocation: base_allocation && structured,
                    }));
                }
            }
            _ => {
                opt_reply(c, opt, REP_ERR_UNSUP, b"not supported by vireo")?;
            }
        }
    }
}

/// A stream the option phase reads and writes.
pub(super) trait ReadWrite: Read + Write {}
impl<T: Read + Write + ?Sized> ReadWrite for T {}

/// A request header (28 bytes).
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const LEN: usize = 28;

    /// Parse a header; `None` when the magic is wrong.
    pub fn parse(b: &[u8]) -> Option<Request> {
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(0) != REQUEST_MAGIC {
            return None;
        }
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(x)
        };
        Some(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            cmd: u16::from_be_bytes([b[6], b[7]]),
            handle: u64_at(8),
            offset: u64_at(16),
            length: u32_at(24),
        })
    }
}
