//! A vhost-user message relay between a front-end and the daemon that serves it.
//!
//! The daemon (rust-vmm `vhost-user-backend`) ends the whole connection when it finds a
//! `GET_CONFIG` malformed: a body longer than its `size` field says (SPDK's front-end
//! always sends the whole 256-byte region and a `size` of just the bytes it wants), a
//! size of 0 or a window past the config space. A device would answer or refuse such a
//! read, not drop the front-end. The relay forwards every message unchanged (with its
//! file descriptors) except `GET_CONFIG`: a longer body is cut to `size` and the reply
//! padded back to the length of the request's body (as QEMU's libvhost-user answers,
//! and as SPDK's front-end checks), and a read it cannot serve is answered here with the
//! protocol's error reply (a payload of size 0), so the front-end stays connected.
//!
//! A new call eventfd is signalled once the daemon has installed it (`SET_VRING_CALL`),
//! as QEMU's libvhost-user does: the front-end may swap a running ring's call fd
//! without waiting (QEMU, starting a device, unmasks its queues by replacing the masked
//! notifier it installed at init with the guest's notifier, then lets the guest run), so
//! a completion the daemon's queue thread signals in between goes to the old fd, which
//! nobody reads any more. The daemon (rust-vmm `vhost-user-backend`) has no hook for the
//! swap, so the relay follows each `SET_VRING_CALL` with a `GET_FEATURES` of its own:
//! the daemon handles messages in order, so that reply means the new fd is in place;
//! the relay then signals it (a spurious interrupt at worst) and drops the reply.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use tracing::{debug, info, warn};

use crate::inflight::Inflight;
use crate::queue::ConnectionSlot;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `VHOST_USER_GET_FEATURES`, `VHOST_USER_SET_VRING_CALL` and `VHOST_USER_GET_CONFIG`.
const GET_FEATURES: u32 = 1;
const SET_VRING_CALL: u32 = 13;
const GET_CONFIG: u32 = 24;
/// Header flags: protocol version 1, and the reply bit.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
/// Bytes of the message header: request, flags, size.
const HEADER: usize = 12;
/// Bytes of `VhostUserConfig` before its payload: offset, size, flags.
const CONFIG_HEADER: usize = 12;
/// The config space a `GET_CONFIG` may address (vhost-user's `VHOST_USER_CONFIG_SIZE`).
const CONFIG_SPACE: u64 = 0x1000;
/// Largest message body relayed (the protocol's messages are far smaller).
const MAX_BODY: usize = 0x1_0000;
/// File descriptors one message may carry (vhost-user's `MAX_ATTACHED_FD_ENTRIES`).
const MAX_FDS: usize = 32;

/// One message: header, body and attached descriptors.
struct Message {
    header: [u8; HEADER],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn set_size(&mut self, n: usize) {
        self.header[8..12].copy_from_slice(&(n as u32).to_le_bytes());
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Read one message; `Ok(None)` at a clean end of stream.
fn read_message(s: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr() as *mut libc::c_void,
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points at `header`, which lives through the call and may take
    // any bytes; recvmsg writes at most HEADER bytes into it.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: recvmsg installed these `nfds` descriptors in this process; nothing else
    // owns them, so each gets exactly one owner here.
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut r = s;
    if n < HEADER {
        r.read_exact(&mut header[n..])?;
    }
    let size = u32_at(&header, 8) as usize;
    if size > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body)?;
    Ok(Some(Message { header, body, fds }))
}

fn write_message(s: &UnixStream, m: &Message) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER + m.body.len());
    bytes.extend_from_slice(&m.header);
    bytes.extend_from_slice(&m.body);
    use std::os::fd::AsRawFd;
    let fds: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = s
        .send_with_fds(&[bytes.as_slice()], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < bytes.len() {
        let mut w = s;
        w.write_all(&bytes[sent..])?;
    }
    Ok(())
}

/// What to do with a front-end message.
enum Verdict {
    /// Pass it on (possibly trimmed).
    Forward(Message),
    /// Answer the front-end with this reply; the daemon never sees the request.
    Answer(Message),
}

/// Trim a `GET_CONFIG` to its `size`, or refuse it with an error reply. `pending` keeps
/// the body length of a forwarded `GET_CONFIG` for its reply.
fn check(mut m: Message, pending: &AtomicUsize) -> Verdict {
    if m.request() != GET_CONFIG {
        return Verdict::Forward(m);
    }
    let refuse = |m: &Message, offset: u32, flags: u32, why: &str| {
        debug!("refusing GET_CONFIG: {why}");
        let mut body = Vec::with_capacity(CONFIG_HEADER);
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
        let mut header = m.header;
        header[4..8].copy_from_slice(&(VERSION_1 | REPLY).to_le_bytes());
        header[8..12].copy_from_slice(&(CONFIG_HEADER as u32).to_le_bytes());
        Verdict::Answer(Message {
            header,
            body,
            fds: Vec::new(),
        })
    };
    if m.body.len() < CONFIG_HEADER {
        return refuse(&m, 0, 0, "body shorter than its header");
    }
    let (offset, size, flags) = (u32_at(&m.body, 0), u32_at(&m.body, 4), u32_at(&m.body, 8));
    let end = u64::from(offset) + u64::from(size);
    if size == 0 || end > CONFIG_SPACE {
        return refuse(&m, offset, flags, "empty or past the config space");
    }
    let want = CONFIG_HEADER + size as usize;
    if m.body.len() < want {
        return refuse(&m, offset, flags, "body shorter than size");
    }
    pending.store(m.body.len(), Ordering::Release);
    if m.body.len() > want {
        m.body.truncate(want);
        m.set_size(want);
    }
    Verdict::Forward(m)
}

/// `VHOST_USER_GET_INFLIGHT_FD` and `VHOST_USER_SET_INFLIGHT_FD`.
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
/// Header flag: the front-end wants a reply (REPLY_ACK).
const NEED_REPLY: u32 = 0x8;
/// Bytes of `VhostUserInflight` (mmap_size, mmap_offset, num_queues, queue_size, padding).
const INFLIGHT_BODY: usize = 24;

/// Inflight I/O tracking is served by the relay itself (the daemon does not implement
/// it): `GET_INFLIGHT_FD` creates the buffer, `SET_INFLIGHT_FD` maps the one a
/// front-end kept from an earlier connection; both install it for the queue threads.
/// `Err(m)`: not such a message. `Ok(reply)`: answered (or no reply wanted).
fn inflight_message(mut m: Message, slot: &ConnectionSlot) -> Result<Option<Message>, Message> {
    let req = m.request();
    if req != GET_INFLIGHT_FD && req != SET_INFLIGHT_FD {
        return Err(m);
    }
    let flags = u32_at(&m.header, 4);
    let reply_header = |size: usize| {
        let mut h = [0u8; HEADER];
        h[0..4].copy_from_slice(&req.to_le_bytes());
        h[4..8].copy_from_slice(&(VERSION_1 | REPLY).to_le_bytes());
        h[8..12].copy_from_slice(&(size as u32).to_le_bytes());
        h
    };
    let fields = (m.body.len() >= 20).then(|| {
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&m.body[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let u16_at = |o: usize| u16::from_le_bytes([m.body[o], m.body[o + 1]]);
        (u64_at(0), u64_at(8), u16_at(16), u16_at(18))
    });
    if req == GET_INFLIGHT_FD {
        let body = match fields.map(|(_, _, nq, qs)| (nq, Inflight::create(nq, qs), qs)) {
            Some((nq, Ok((inf, file)), qs)) => {
                let len = crate::inflight::queue_region_size(qs) * nq as usize;
                slot.set_inflight(Some(Arc::new(inf)));
                info!("inflight tracking: {nq} queues of {qs}, {len} bytes");
                let mut body = Vec::with_capacity(INFLIGHT_BODY);
                body.extend_from_slice(&(len as u64).to_le_bytes());
                body.extend_from_slice(&0u64.to_le_bytes());
                body.extend_from_slice(&nq.to_le_bytes());
                body.extend_from_slice(&qs.to_le_bytes());
                body.resize(INFLIGHT_BODY, 0);
                m.fds = vec![OwnedFd::from(file)];
                body
            }
            other => {
                warn!("refusing GET_INFLIGHT_FD: {:?}", other.map(|o| o.1.err()));
                m.fds.clear();
                vec![0u8; INFLIGHT_BODY]
            }
        };
        return Ok(Some(Message {
            header: reply_header(body.len()),
            body,
            fds: std::mem::take(&mut m.fds),
        }));
    }
    // SET_INFLIGHT_FD
    let result = match (fields, m.fds.pop()) {
        (Some((size, offset, nq, qs)), Some(fd)) => {
            Inflight::map(std::fs::File::from(fd), offset, size as usize, nq, qs)
                .map(|inf| {
                    info!("inflight tracking resumed: {nq} queues of {qs}");
                    slot.set_inflight(Some(Arc::new(inf)));
                })
                .map_err(|e| e.to_string())
        }
        _ => Err("no buffer or no file descriptor".to_string()),
    };
    if let Err(e) = &result {
        warn!("refusing SET_INFLIGHT_FD: {e}");
    }
    if flags & NEED_REPLY == 0 {
        return Ok(None);
    }
    let body = u64::from(result.is_err()).to_le_bytes().to_vec();
    Ok(Some(Message {
        header: reply_header(body.len()),
        body,
        fds: Vec::new(),
    }))
}

/// Pad the daemon's reply to a trimmed `GET_CONFIG` back to the request's body length.
fn pad_reply(m: &mut Message, pending: &AtomicUsize) {
    if m.request() != GET_CONFIG {
        return;
    }
    let want = pending.swap(0, Ordering::AcqRel);
    // A failed read (size 0) stays as the daemon sent it.
    let ok = m.body.len() >= CONFIG_HEADER && u32_at(&m.body, 4) != 0;
    if ok && want > m.body.len() {
        m.body.resize(want, 0);
        m.set_size(want);
    }
}

/// Whom the daemon's next `GET_FEATURES` reply is for, oldest first (the daemon answers in
/// order).
enum FeaturesReply {
    /// The front-end asked: the reply goes back to it.
    Front,
    /// The relay asked right after a `SET_VRING_CALL`: the daemon has installed this call
    /// fd; signal it and drop the reply.
    CallInstalled(OwnedFd),
}

type FeaturesReplies = Arc<Mutex<VecDeque<FeaturesReply>>>;

/// A copy of the call fd a `SET_VRING_CALL` installs (none for a ring without one).
fn new_call_fd(m: &Message) -> io::Result<Option<OwnedFd>> {
    if m.request() != SET_VRING_CALL || m.fds.len() != 1 {
        return Ok(None);
    }
    m.fds[0].try_clone().map(Some)
}

/// The relay's own `GET_FEATURES` request.
fn get_features() -> Message {
    let mut header = [0u8; HEADER];
    header[0..4].copy_from_slice(&GET_FEATURES.to_le_bytes());
    header[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    Message {
        header,
        body: Vec::new(),
        fds: Vec::new(),
    }
}

/// Forward a front-end message to the daemon; after a `SET_VRING_CALL`, ask the daemon
/// for its features so that its reply tells when the new call fd is in place.
fn forward(b_tx: &UnixStream, m: &Message, replies: &FeaturesReplies) -> io::Result<()> {
    let lock = || replies.lock().unwrap_or_else(|p| p.into_inner());
    let call = new_call_fd(m)?;
    if m.request() == GET_FEATURES {
        lock().push_back(FeaturesReply::Front);
    }
    write_message(b_tx, m)?;
    if let Some(fd) = call {
        lock().push_back(FeaturesReply::CallInstalled(fd));
        write_message(b_tx, &get_features())?;
    }
    Ok(())
}

/// Whether a daemon message goes on to the front-end: `false` for the reply to the
/// relay's own `GET_FEATURES`, whose call fd is signalled here.
fn for_front(m: &Message, replies: &FeaturesReplies) -> bool {
    if m.request() != GET_FEATURES {
        return true;
    }
    let next = replies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop_front();
    match next {
        Some(FeaturesReply::CallInstalled(fd)) => {
            let mut f = std::fs::File::from(fd);
            if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
                debug!("cannot signal a new call fd: {e}");
            }
            false
        }
        Some(FeaturesReply::Front) | None => true,
    }
}

/// The two threads of one relayed connection; they end when either side closes.
pub(crate) struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relay between `front` (the front-end) and `back` (the daemon's end).
    pub(crate) fn spawn(
        front: UnixStream,
        back: UnixStream,
        slot: Arc<ConnectionSlot>,
    ) -> io::Result<Relay> {
        // A new connection starts without inflight tracking until it asks for it.
        slot.set_inflight(None);
        let (f_rx, f_tx) = (front.try_clone()?, front);
        let (b_rx, b_tx) = (back.try_clone()?, back);
        let f_tx2 = f_tx.try_clone()?;
        let pending = Arc::new(AtomicUsize::new(0));
        let pending2 = pending.clone();
        let replies: FeaturesReplies = Arc::default();
        let replies2 = replies.clone();
        let to_back = thread::Builder::new()
            .name("vireo-relay-fe".into())
            .spawn(move || {
                let r = (|| -> io::Result<()> {
                    while let Some(m) = read_message(&f_rx)? {
                        let m = match inflight_message(m, &slot) {
                            Ok(Some(reply)) => {
                                write_message(&f_tx2, &reply)?;
                                continue;
                            }
                            Ok(None) => continue,
                            Err(m) => m,
                        };
                        match check(m, &pending) {
                            Verdict::Forward(m) => forward(&b_tx, &m, &replies)?,
                            Verdict::Answer(m) => write_message(&f_tx2, &m)?,
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = r {
                    warn!("vhost-user relay (front-end side): {e}");
                }
                let _ = b_tx.shutdown(std::net::Shutdown::Both);
                let _ = f_tx2.shutdown(std::net::Shutdown::Both);
            })?;
        let to_front = thread::Builder::new()
            .name("vireo-relay-be".into())
            .spawn(move || {
                let r = (|| -> io::Result<()> {
                    while let Some(mut m) = read_message(&b_rx)? {
                        if !for_front(&m, &replies2) {
                            continue;
                        }
                        pad_reply(&mut m, &pending2);
                        write_message(&f_tx, &m)?;
                    }
                    Ok(())
                })();
                if let Err(e) = r {
                    debug!("vhost-user relay (daemon side): {e}");
                }
                let _ = f_tx.shutdown(std::net::Shutdown::Both);
                let _ = b_rx.shutdown(std::net::Shutdown::Both);
            })?;
        Ok(Relay {
            threads: vec![to_back, to_front],
        })
    }

    /// Wait for both directions to end.
    pub(crate) fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get_config(offset: u32, size: u32, body_payload: usize) -> Message {
        let mut body = Vec::new();
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.resize(CONFIG_HEADER + body_payload, 0);
        let mut header = [0u8; HEADER];
        header[0..4].copy_from_slice(&GET_CONFIG.to_le_bytes());
        header[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Message {
            header,
            body,
            fds: Vec::new(),
        }
    }

    #[test]
    fn a_longer_body_is_cut_to_size() {
        let pending = AtomicUsize::new(0);
        match check(get_config(0, 24, 256), &pending) {
            Verdict::Forward(m) => {
                assert_eq!(m.body.len(), CONFIG_HEADER + 24);
                assert_eq!(u32_at(&m.header, 8) as usize, CONFIG_HEADER + 24);
            }
            Verdict::Answer(_) => panic!("refused"),
        }
        // The reply goes back as long as the request was.
        let mut reply = get_config(0, 24, 24);
        pad_reply(&mut reply, &pending);
        assert_eq!(reply.body.len(), CONFIG_HEADER + 256);
        assert_eq!(u32_at(&reply.header, 8) as usize, CONFIG_HEADER + 256);
        assert_eq!(u32_at(&reply.body, 4), 24);
    }

    #[test]
    fn unservable_reads_get_an_error_reply() {
        for m in [
            get_config(0, 0, 0),
            get_config(0xff0, 0x20, 0x20),
            get_config(0, 64, 8),
        ] {
            match check(m, &AtomicUsize::new(0)) {
                Verdict::Answer(r) => {
                    assert_eq!(u32_at(&r.header, 4), VERSION_1 | REPLY);
                    assert_eq!(r.body.len(), CONFIG_HEADER);
                    assert_eq!(u32_at(&r.body, 4), 0, "size 0 means failure");
                }
                Verdict::Forward(_) => panic!("forwarded"),
            }
        }
    }

    fn message(request: u32, flags: u32, body: &[u8], fds: Vec<OwnedFd>) -> Message {
        let mut header = [0u8; HEADER];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Message {
            header,
            body: body.to_vec(),
            fds,
        }
    }

    /// A front-end that swaps a call fd does not wait for the daemon to install it: the
    /// relay signals the new fd once the daemon has (its reply to the relay's own
    /// GET_FEATURES, which the front-end never sees), not before.
    #[test]
    fn a_new_call_fd_is_signalled_once_the_daemon_has_it() {
        use std::os::fd::IntoRawFd;
        use std::time::Duration;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

        let (fe, front) = UnixStream::pair().unwrap();
        let (daemon, back) = UnixStream::pair().unwrap();
        for s in [&fe, &daemon] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let relay = Relay::spawn(front, back, Arc::new(ConnectionSlot::default())).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: into_raw_fd hands over the copy's descriptor to its single new owner.
        let fd = unsafe { OwnedFd::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
        write_message(
            &fe,
            &message(SET_VRING_CALL, VERSION_1, &2u64.to_le_bytes(), vec![fd]),
        )
        .unwrap();

        let m = read_message(&daemon).unwrap().unwrap();
        assert_eq!((m.request(), m.fds.len()), (SET_VRING_CALL, 1));
        let m = read_message(&daemon).unwrap().unwrap();
        assert_eq!((m.request(), m.body.len()), (GET_FEATURES, 0));
        assert!(
            call.read().is_err(),
            "signalled before the daemon installed it"
        );
        let features = |v: u64| message(GET_FEATURES, VERSION_1 | REPLY, &v.to_le_bytes(), vec![]);
        write_message(&daemon, &features(1)).unwrap();

        // The front-end's own GET_FEATURES gets its own reply, not the relay's.
        write_message(&fe, &message(GET_FEATURES, VERSION_1, &[], vec![])).unwrap();
        let m = read_message(&daemon).unwrap().unwrap();
        assert_eq!(m.request(), GET_FEATURES);
        write_message(&daemon, &features(2)).unwrap();
        let m = read_message(&fe).unwrap().unwrap();
        assert_eq!(m.request(), GET_FEATURES);
        assert_eq!(m.body, 2u64.to_le_bytes());
        assert_eq!(call.read().unwrap(), 1);

        // A ring without a call fd (polling) gets nothing extra.
        let nofd = message(SET_VRING_CALL, VERSION_1, &0x102u64.to_le_bytes(), vec![]);
        write_message(&fe, &nofd).unwrap();
        write_message(&fe, &message(GET_FEATURES, VERSION_1, &[], vec![])).unwrap();
        assert_eq!(
            read_message(&daemon).unwrap().unwrap().request(),
            SET_VRING_CALL
        );
        assert_eq!(
            read_message(&daemon).unwrap().unwrap().request(),
            GET_FEATURES
        );
        write_message(&daemon, &features(3)).unwrap();
        assert_eq!(read_message(&fe).unwrap().unwrap().body, 3u64.to_le_bytes());

        drop((fe, daemon));
        relay.join();
    }

    #[test]
    fn other_messages_pass_unchanged() {
        let mut m = get_config(0, 4, 4);
        m.header[0..4].copy_from_slice(&1u32.to_le_bytes());
        match check(m, &AtomicUsize::new(0)) {
            Verdict::Forward(m) => assert_eq!(m.body.len(), 16),
            Verdict::Answer(_) => panic!("answered"),
        }
    }
}
