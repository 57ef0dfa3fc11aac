//! One NBD I/O thread: an event loop (epoll, through `mio`) over its client sockets and
//! the completion eventfds of the channels it owns. Requests are parsed from the
//! sockets, submitted and their replies written in this loop: no thread handoff per
//! request. Each pass reads what every ready client sent, submits it all, reaps every
//! channel and writes every client's replies (one `writev` where one does).
//!
//! A thread opens a channel per bdev its clients use (on a queue of its own where the
//! controller has one free; see `Placement` in the parent module) and closes it with
//! the last of those clients, so a controller can be detached once its clients left.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use vireo_bdev::{Armed, Bdev, Completion, IoBuf, IoChannel, IoError, IoOp, IoRequest};

use super::proto::*;
use super::tls::Stream;
use super::{lock, NbdServer, Wait};

const WAKER: Token = Token(usize::MAX);

/// Requests one client may have outstanding (submitted, or replies not yet sent); its
/// socket is not read beyond that until replies go out.
const MAX_CLIENT_REQUESTS: usize = 64;
/// Payload bytes one client may have outstanding (one request may exceed it alone).
const MAX_CLIENT_BYTES: usize = 64 << 20;
/// Reply bytes a client with replies waiting must take per `--nbd-timeout` (1 MiB per
/// 30 s by default: any link a person would use), or it is closed: a client that reads
/// a byte now and then cannot hold the server's payload memory, which every other
/// client's READs and WRITEs wait for.
const MIN_REPLY_PROGRESS: usize = 1 << 20;
/// Bytes read from a socket at a time (headers and small payloads).
const READ_BUF: usize = 64 << 10;
/// Buffers a thread keeps for reuse: each at most this size...
const CACHE_MAX_BUF: usize = 1 << 20;
/// ...and this much in all.
const CACHE_MAX_TOTAL: usize = 16 << 20;
/// Longest sleep while I/O is in flight (timed-out requests are reaped by polling).
const MAX_SLEEP_BUSY: Duration = Duration::from_millis(100);
/// Longest sleep otherwise (deadlines, stop).
const MAX_SLEEP_IDLE: Duration = Duration::from_secs(1);

/// A connection whose handshake is done, handed to an I/O thread.
pub(super) struct NewConn {
    pub stream: Stream,
    pub neg: Negotiated,
    /// Threads that handed it on for want of a queue.
    pub hops: usize,
}

/// What other threads use of an I/O thread: its inbox and the waker of its loop.
pub(super) struct Handle {
    inbox: Mutex<Vec<NewConn>>,
    waker: Waker,
}

impl Handle {
    /// Hand a connection to the thread.
    pub fn give(&self, c: NewConn) {
        lock(&self.inbox).push(c);
        self.wake();
    }

    /// Make the loop run a pass (export changes, memory freed, stop).
    pub fn wake(&self) {
        let _ = self.waker.wake();
    }
}

/// Start I/O thread `idx` of `server`.
pub(super) fn spawn(
    server: Arc<NbdServer>,
    idx: usize,
) -> std::io::Result<(Arc<Handle>, std::thread::JoinHandle<()>)> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let handle = Arc::new(Handle {
        inbox: Mutex::new(Vec::new()),
        waker,
    });
    let h = handle.clone();
    let join = std::thread::Builder::new()
        .name(format!("vireo-nbd-io{idx}"))
        .spawn(move || Loop::new(server, idx, poll, h).run())?;
    Ok((handle, join))
}

/// Slots reused through a free list; an index stays valid until removed.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
    fn insert(&mut self, t: T) -> usize {
        if let Some(i) = self.free.pop() {
            self.items[i] = Some(t);
            i
        } else {
            self.items.push(Some(t));
            self.items.len() - 1
        }
    }
    fn remove(&mut self, i: usize) -> Option<T> {
        let t = self.items.get_mut(i)?.take();
        if t.is_some() {
            self.free.push(i);
        }
        t
    }
    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i)?.as_mut()
    }
    fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }
    fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.items
            .iter()
            .enumerate()
            .filter(|(_, t)| t.is_some())
            .map(|(i, _)| i)
    }
}

/// A bdev's channel on this thread.
struct Chan {
    bdev: Arc<Bdev>,
    ch: IoChannel,
    /// The completion eventfd registered with the poll, if any.
    fd: Option<RawFd>,
    /// Clients of this thread using it.
    clients: usize,
    bs: u64,
    capacity: u64,
    read_only: bool,
    unmap: bool,
    write_zeroes: bool,
    /// The device is gone: its clients are closed, then the channel.
    dead: bool,
}

/// One reply on its way out: a header and, for a READ, the data.
struct Out {
    head: [u8; 32],
    hlen: u8,
    data: Option<IoBuf>,
    /// Bytes of head + data already written.
    sent: usize,
    /// Payload bytes counted against the budgets (given back once written).
    cost: usize,
}

impl Out {
    fn len(&self) -> usize {
        self.hlen as usize + self.data.as_ref().map_or(0, |d| d.len())
    }
}

/// A WRITE whose payload is being read.
struct Payload {
    req: Request,
    buf: IoBuf,
    got: usize,
    cost: usize,
}

struct Client {
    stream: Stream,
    chan: usize,
    export: String,
    structured: bool,
    base_allocation: bool,
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
    payload: Option<Payload>,
    /// A parsed request waiting for credit.
    held: Option<Request>,
    readable: bool,
    writable: bool,
    /// Requests submitted to the channel, replies not yet queued.
    in_flight: usize,
    /// Requests admitted whose replies are not yet written.
    owed: usize,
    /// Payload bytes admitted and not yet given back.
    bytes: usize,
    wq: VecDeque<Out>,
    /// No more requests are read (end of stream, DISC, a protocol error).
    eof: bool,
    /// Replies are dropped; the connection closes once nothing is in flight.
    dead: bool,
    /// Since when a request has been half-read.
    partial_since: Option<Instant>,
    /// Since when replies have waited for the socket without MIN_REPLY_PROGRESS bytes
    /// taken.
    stall_since: Option<Instant>,
    /// Reply bytes taken since `stall_since`.
    stall_taken: usize,
    last_active: Instant,
}

struct Pending {
    client: usize,
    handle: u64,
    cost: usize,
    cmd: u16,
    offset: u64,
    /// Write with FUA: a flush follows before the reply.
    fua: bool,
}

/// DMA buffers kept for reuse (no allocator lock per request), by size.
#[derive(Default)]
struct BufCache {
    bufs: Vec<(usize, Vec<vireo_virtio::DmaBuf>)>,
    total: usize,
}

impl BufCache {
    fn take(&mut self, bdev: &Bdev, len: usize) -> IoBuf {
        if let Some((_, v)) = self.bufs.iter_mut().find(|(l, _)| *l == len) {
            while let Some(b) = v.pop() {
                self.total -= len;
                if Arc::ptr_eq(b.memory(), bdev.memory()) {
                    return IoBuf::Dma(b);
                }
            }
        }
        match bdev.alloc_buf(len) {
            Ok(b) => IoBuf::Dma(b),
            Err(_) => IoBuf::Heap(vec![0; len]),
        }
    }

    fn put(&mut self, buf: Option<IoBuf>) {
        let Some(IoBuf::Dma(b)) = buf else {
            return;
        };
        let len = b.len();
        if len > CACHE_MAX_BUF || self.total + len > CACHE_MAX_TOTAL {
            return;
        }
        self.total += len;
        match self.bufs.iter_mut().find(|(l, _)| *l == len) {
            Some((_, v)) => v.push(b),
            None => self.bufs.push((len, vec![b])),
        }
    }

    fn clear(&mut self) {
        self.bufs.clear();
        self.total = 0;
    }
}

fn errno(e: &IoError) -> u32 {
    match e {
        IoError::ReadOnly(_) => EPERM,
        IoError::NoMemory(_) => ENOMEM,
        IoError::OutOfRange { .. } => ENOSPC,
        IoError::InvalidRequest(_) | IoError::InvalidBuffer(_) => EINVAL,
        // ENOTSUP is only for FAST_ZERO, which is not advertised: a command the bdev
        // lacks is an invalid request, one the device refused an I/O error.
        IoError::Unsupported { .. } => EINVAL,
        _ => EIO,
    }
}

fn client_token(i: usize) -> Token {
    Token(i * 2)
}

fn chan_token(i: usize) -> Token {
    Token(i * 2 + 1)
}

struct Loop {
    server: Arc<NbdServer>,
    idx: usize,
    poll: Poll,
    handle: Arc<Handle>,
    clients: Slab<Client>,
    chans: Slab<Chan>,
    pending: Slab<Pending>,
    done: Vec<Completion>,
    bufs: BufCache,
    generation: u64,
    next_tick: Instant,
    /// Requests taken (read and dispatched): progress of a pass.
    taken: u64,
    /// Completion eventfds registered with the poll, and how many channels use each
    /// (channels of LUNs of one scsi controller share their queue's).
    fd_users: std::collections::HashMap<std::os::fd::RawFd, usize>,
}

impl Loop {
    fn new(server: Arc<NbdServer>, idx: usize, poll: Poll, handle: Arc<Handle>) -> Loop {
        let generation = server.generation.load(Ordering::Acquire);
        Loop {
            server,
            idx,
            poll,
            handle,
            clients: Slab::new(),
            chans: Slab::new(),
            pending: Slab::new(),
            done: Vec::new(),
            bufs: BufCache::default(),
            generation,
            next_tick: Instant::now(),
            fd_users: std::collections::HashMap::new(),
            taken: 0,
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut last_progress = Instant::now();
        let mut stop_deadline: Option<Instant> = None;
        loop {
            let taken = self.taken;
            let mut progress = self.take_inbox();
            for ci in 0..self.clients.items.len() {
                progress |= self.service_reads(ci);
            }
            // Submissions reach the devices now, before the replies are written.
            for c in self.chans.items.iter_mut().flatten() {
                c.ch.publish();
            }
            progress |= self.reap_completions();
            for ci in 0..self.clients.items.len() {
                progress |= self.flush(ci);
            }
            progress |= self.taken != taken;
            let now = Instant::now();
            if progress {
                last_progress = now;
            }
            if self.server.stopping.load(Ordering::Acquire) {
                let d = *stop_deadline.get_or_insert(now + Duration::from_secs(5));
                for ci in self.clients.indices().collect::<Vec<_>>() {
                    self.kill(ci);
                }
                if now > d {
                    // A device that no longer answers: give up on its requests.
                    for k in self.chans.indices().collect::<Vec<_>>() {
                        if let Some(c) = self.chans.remove(k) {
                            c.ch.abandon();
                        }
                    }
                    break;
                }
            }
            if now >= self.next_tick || self.generation_changed() {
                self.tick(now);
            } else {
                self.close_finished();
            }
            if stop_deadline.is_some() && self.clients.len() == 0 {
                break;
            }
            let timeout = if progress {
                Some(Duration::ZERO)
            } else {
                self.sleep_time(now, last_progress)
            };
            if self.poll.poll(&mut events, timeout).is_err() {
                // EINTR: go round.
                continue;
            }
            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER || t.0 % 2 == 1 {
                    continue;
                }
                if let Some(c) = self.clients.get_mut(t.0 / 2) {
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        c.readable = true;
                    }
                    if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
                        c.writable = true;
                    }
                }
            }
        }
        self.bufs.clear();
    }

    fn generation_changed(&self) -> bool {
        self.server.generation.load(Ordering::Acquire) != self.generation
    }

    /// How long to sleep in `poll` after a pass that did nothing.
    fn sleep_time(&mut self, now: Instant, last_progress: Instant) -> Option<Duration> {
        let busy = self.clients.len() > 0;
        let spin = match self.server.opts.wait {
            Wait::Poll => busy,
            Wait::Sleep => false,
            Wait::Hybrid(d) => busy && now.duration_since(last_progress) < d,
        };
        if spin {
            // Spinning, give the CPU to whoever else can run (the device's back-end
            // and the clients, on the same few CPUs, are what this thread waits for).
            std::thread::yield_now();
            return Some(Duration::ZERO);
        }
        let mut in_flight = false;
        let mut nap = false;
        for k in 0..self.chans.items.len() {
            let Some(c) = self.chans.get_mut(k) else {
                continue;
            };
            if c.ch.in_flight() == 0 {
                continue;
            }
            in_flight = true;
            match c.ch.arm() {
                Armed::Ready => return Some(Duration::ZERO),
                Armed::Fd(fd) => {
                    if c.fd != Some(fd) {
                        let old = c.fd.take();
                        if let Some(old) = old {
                            self.unwatch_fd(old);
                        }
                        if self.watch_fd(fd, k) {
                            if let Some(c) = self.chans.get_mut(k) {
                                c.fd = Some(fd);
                            }
                        } else {
                            nap = true;
                        }
                    }
                }
                Armed::NoFd => nap = true,
            }
        }
        if nap {
            return Some(Duration::from_micros(50));
        }
        let mut t = if in_flight {
            MAX_SLEEP_BUSY
        } else {
            MAX_SLEEP_IDLE
        };
        t = t.min(self.next_tick.saturating_duration_since(now));
        Some(t)
    }

    /// New connections: each gets this thread's channel on its bdev (opened now if
    /// need be); one whose bdev has no free queue goes to a thread that has a channel.
    fn take_inbox(&mut self) -> bool {
        let new: Vec<NewConn> = std::mem::take(&mut *lock(&self.handle.inbox));
        let got = !new.is_empty();
        for c in new {
            self.adopt(c);
        }
        got
    }

    fn adopt(&mut self, c: NewConn) {
        let bdev = c.neg.bdev.clone();
        // The export may have stopped between the handshake's GO and now, and this
        // thread may already have checked its clients for that stop: check this one.
        if !self
            .server
            .resolve(&c.neg.export)
            .is_some_and(|b| Arc::ptr_eq(&b, &bdev))
        {
            tracing::info!(export = %c.neg.export, "nbd: the export stopped during the client's handshake; closing it");
            self.server.client_gone(self.idx, &bdev);
            return;
        }
        let existing = self.chans.indices().find(|&k| {
            self.chans.items[k]
                .as_ref()
                .is_some_and(|x| Arc::ptr_eq(&x.bdev, &bdev))
        });
        let chan = match existing {
            Some(k) => k,
            None => match bdev.open_channel() {
                Ok(ch) => {
                    let info = bdev.info();
                    self.server.placement_opened(self.idx, &bdev);
                    self.chans.insert(Chan {
                        bdev: bdev.clone(),
                        ch,
                        fd: None,
                        clients: 0,
                        bs: info.block_size as u64,
                        capacity: info.capacity_bytes(),
                        read_only: info.read_only,
                        unmap: info.ops.unmap,
                        write_zeroes: info.ops.write_zeroes,
                        dead: false,
                    })
                }
                Err(e) => {
                    // No queue for this thread: a thread with a channel on the bdev
                    // takes the client (the queue is shared then).
                    if let Err(c) = self.server.redirect(self.idx, c) {
                        tracing::warn!(bdev = %bdev.name(), "nbd: cannot open an I/O channel: {e}; closing the connection");
                        self.server.client_gone(self.idx, &c.neg.bdev);
                    }
                    return;
                }
            },
        };
        let now = Instant::now();
        let mut client = Client {
            stream: c.stream,
            chan,
            export: c.neg.export,
            structured: c.neg.structured,
            base_allocation: c.neg.base_allocation,
            rbuf: vec![0u8; READ_BUF].into_boxed_slice(),
            rpos: 0,
            rend: 0,
            payload: None,
            held: None,
            readable: true,
            writable: true,
            in_flight: 0,
            owed: 0,
            bytes: 0,
            wq: VecDeque::new(),
            eof: false,
            dead: false,
            partial_since: None,
            stall_since: None,
            stall_taken: 0,
            last_active: now,
        };
        let fd = client.stream.sock().as_raw_fd();
        let ci = self.clients.insert_with(|ci| {
            if let Err(e) = self.poll.registry().register(
                &mut SourceFd(&fd),
                client_token(ci),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("nbd: cannot watch a client socket: {e}");
                client.eof = true;
                client.dead = true;
            }
            client
        });
        let _ = ci;
        if let Some(ch) = self.chans.get_mut(chan) {
            ch.clients += 1;
        }
    }

    /// Read and start what client `ci` sent; returns whether anything happened.
    fn service_reads(&mut self, ci: usize) -> bool {
        let mut progress = false;
        for _ in 0..8 {
            if !self.process_buffered(ci) {
                break;
            }
            let Some(c) = self.clients.get_mut(ci) else {
                return progress;
            };
            if !c.readable {
                break;
            }
            let r = match &mut c.payload {
                // Payload straight into its buffer once the read buffer is drained.
                Some(p) if c.rpos == c.rend => {
                    let want = p.buf.len() - p.got;
                    c.stream
                        .read(&mut p.buf.as_mut_slice()[p.got..p.got + want])
                        .map(|n| {
                            p.got += n;
                            (n, n < want)
                        })
                }
                _ => {
                    if c.rpos == c.rend {
                        c.rpos = 0;
                        c.rend = 0;
                    } else if c.rbuf.len() - c.rend < Request::LEN {
                        c.rbuf.copy_within(c.rpos..c.rend, 0);
                        c.rend -= c.rpos;
                        c.rpos = 0;
                    }
                    let end = c.rend;
                    let want = c.rbuf.len() - end;
                    c.stream.read(&mut c.rbuf[end..]).map(|n| {
                        c.rend += n;
                        (n, n < want)
                    })
                }
            };
            match r {
                Ok((0, _)) => {
                    c.eof = true;
                    break;
                }
                Ok((_, short)) => {
                    // A short read took all there was: the next data is a new event
                    // (edge-triggered), so no read just to see EAGAIN. (TLS may hold
                    // more plaintext: read on.)
                    if short && matches!(c.stream, Stream::Plain(_)) {
                        c.readable = false;
                    }
                    c.last_active = Instant::now();
                    progress = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    c.eof = true;
                    c.dead = true;
                    break;
                }
            }
        }
        self.process_buffered(ci);
        progress
    }

    /// Take requests from `ci`'s read buffer while it has credit; returns whether its
    /// socket may be read further.
    fn process_buffered(&mut self, ci: usize) -> bool {
        loop {
            let Some(c) = self.clients.get_mut(ci) else {
                return false;
            };
            if c.eof || c.dead {
                return false;
            }
            if let Some(p) = &mut c.payload {
                let avail = c.rend - c.rpos;
                let n = avail.min(p.buf.len() - p.got);
                p.buf.as_mut_slice()[p.got..p.got + n].copy_from_slice(&c.rbuf[c.rpos..c.rpos + n]);
                p.got += n;
                c.rpos += n;
                if p.got < p.buf.len() {
                    c.partial_since.get_or_insert_with(Instant::now);
                    return true;
                }
                let p = c.payload.take().expect("payload");
                self.dispatch(ci, p.req, Some(p.buf), p.cost);
                continue;
            }
            let req = match c.held.take() {
                Some(r) => r,
                None => {
                    if c.rend - c.rpos < Request::LEN {
                        c.partial_since = if c.rend > c.rpos {
                            Some(c.partial_since.unwrap_or_else(Instant::now))
                        } else {
                            None
                        };
                        return true;
                    }
                    let Some(r) = Request::parse(&c.rbuf[c.rpos..c.rpos + Request::LEN]) else {
                        tracing::info!("nbd client: bad request magic; closing");
                        c.eof = true;
                        return false;
                    };
                    c.rpos += Request::LEN;
                    r
                }
            };
            if req.cmd == CMD_DISC {
                c.eof = true;
                return false;
            }
            if req.cmd == CMD_WRITE && req.length > MAX_PAYLOAD {
                tracing::info!(
                    "nbd client: WRITE of {} bytes exceeds the advertised maximum {MAX_PAYLOAD}; closing",
                    req.length
                );
                c.eof = true;
                return false;
            }
            let cost = match req.cmd {
                CMD_READ | CMD_WRITE => (req.length as usize).min(MAX_PAYLOAD as usize),
                _ => 0,
            };
            // Credit: this client's and every client's together.
            let mine = c.owed < MAX_CLIENT_REQUESTS
                && (c.bytes == 0 || c.bytes + cost <= MAX_CLIENT_BYTES);
            if !mine || !self.server.admit(cost) {
                c.held = Some(req);
                c.partial_since = None;
                return false;
            }
            c.owed += 1;
            c.bytes += cost;
            if req.cmd == CMD_WRITE && req.length > 0 {
                let bdev = self.chans.get_mut(c.chan).map(|x| x.bdev.clone());
                let Some(bdev) = bdev else {
                    c.dead = true;
                    return false;
                };
                let buf = self.bufs.take(&bdev, req.length as usize);
                if let Some(c) = self.clients.get_mut(ci) {
                    c.payload = Some(Payload {
                        req,
                        buf,
                        got: 0,
                        cost,
                    });
                }
                continue;
            }
            self.dispatch(ci, req, None, cost);
        }
    }

    /// Check and submit one admitted request (a WRITE with its payload).
    fn dispatch(&mut self, ci: usize, req: Request, data: Option<IoBuf>, cost: usize) {
        self.taken += 1;
        let Loop {
            clients,
            chans,
            pending,
            bufs,
            ..
        } = self;
        let Some(c) = clients.get_mut(ci) else {
            return;
        };
        let Some(chan) = chans.get_mut(c.chan) else {
            c.dead = true;
            return;
        };
        let reply_now = |c: &mut Client, bufs: &mut BufCache, data: Option<IoBuf>, error: u32| {
            bufs.put(data);
            push_reply(
                c,
                req.handle,
                error,
                None,
                req.offset,
                cost,
                ReplyKind::Plain,
            );
        };
        // Flags the server knows, where they mean something.
        let mut known = CMD_FLAG_FUA;
        match req.cmd {
            CMD_WRITE_ZEROES => known |= CMD_FLAG_NO_HOLE,
            CMD_READ if c.structured => known |= CMD_FLAG_DF,
            CMD_BLOCK_STATUS => known |= CMD_FLAG_REQ_ONE,
            _ => {}
        }
        if req.flags & !known != 0 {
            return reply_now(c, bufs, data, EINVAL);
        }
        let writes = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && chan.read_only {
            return reply_now(c, bufs, data, EPERM);
        }
        let len = req.length as u64;
        if matches!(
            req.cmd,
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE | CMD_BLOCK_STATUS
        ) {
            let sized = matches!(req.cmd, CMD_READ | CMD_WRITE);
            if !req.offset.is_multiple_of(chan.bs)
                || !len.is_multiple_of(chan.bs)
                || (sized && len > MAX_PAYLOAD as u64)
            {
                return reply_now(c, bufs, data, EINVAL);
            }
            if req
                .offset
                .checked_add(len)
                .is_none_or(|end| end > chan.capacity)
            {
                // ENOSPC is the spec's answer to a write past the end; anything else
                // there is an invalid request.
                let e = if matches!(req.cmd, CMD_WRITE | CMD_WRITE_ZEROES) {
                    ENOSPC
                } else {
                    EINVAL
                };
                return reply_now(c, bufs, data, e);
            }
        }
        let (lba, n) = (req.offset / chan.bs, len / chan.bs);
        let id = pending.items.len();
        let io = match req.cmd {
            CMD_READ if n == 0 => return reply_now(c, bufs, data, 0),
            CMD_READ => {
                let b = bufs.take(&chan.bdev, len as usize);
                IoRequest::read(lba, n, b, 0)
            }
            CMD_WRITE => match data {
                Some(d) if n > 0 => IoRequest::write(lba, n, d, 0),
                d => return reply_now(c, bufs, d, 0),
            },
            CMD_FLUSH => IoRequest::no_data(IoOp::Flush, 0, 0, 0),
            CMD_TRIM => {
                if !chan.unmap || n == 0 {
                    // TRIM is advisory.
                    return reply_now(c, bufs, data, 0);
                }
                IoRequest::no_data(IoOp::Unmap, lba, n, 0)
            }
            CMD_WRITE_ZEROES => {
                if n == 0 {
                    return reply_now(c, bufs, data, 0);
                }
                if !chan.write_zeroes {
                    // Not advertised for this export: a client must not send it.
                    return reply_now(c, bufs, data, EINVAL);
                }
                IoRequest::no_data(IoOp::WriteZeroes, lba, n, 0)
            }
            CMD_CACHE => return reply_now(c, bufs, data, 0),
            CMD_BLOCK_STATUS => {
                if !c.base_allocation || n == 0 {
                    return reply_now(c, bufs, data, EINVAL);
                }
                // Every block is data: one extent, to the end of the request.
                let extent = len.min(u32::MAX as u64 & !(chan.bs - 1)) as u32;
                push_reply(
                    c,
                    req.handle,
                    0,
                    None,
                    req.offset,
                    cost,
                    ReplyKind::BlockStatus(extent),
                );
                return;
            }
            _ => return reply_now(c, bufs, data, EINVAL),
        };
        let _ = id;
        let fua = req.flags & CMD_FLAG_FUA != 0 && matches!(req.cmd, CMD_WRITE | CMD_WRITE_ZEROES);
        let id = pending.insert(Pending {
            client: ci,
            handle: req.handle,
            cost,
            cmd: req.cmd,
            offset: req.offset,
            fua,
        });
        let mut io = io;
        io.user_data = id as u64;
        match chan.ch.submit(io) {
            Ok(()) => c.in_flight += 1,
            Err(r) => {
                pending.remove(id);
                bufs.put(r.buf);
                push_reply(
                    c,
                    req.handle,
                    errno(&r.error),
                    None,
                    req.offset,
                    cost,
                    ReplyKind::Plain,
                );
            }
        }
    }

    /// Wake this loop when completion eventfd `fd` (of channel `k`) is signalled; one
    /// registration serves every channel sharing the fd (a second one fails: the loop
    /// then napped 50 µs at a time instead of sleeping). False when it cannot.
    fn watch_fd(&mut self, fd: std::os::fd::RawFd, k: usize) -> bool {
        if let Some(n) = self.fd_users.get_mut(&fd) {
            *n += 1;
            return true;
        }
        if self
            .poll
            .registry()
            .register(&mut SourceFd(&fd), chan_token(k), Interest::READABLE)
            .is_err()
        {
            return false;
        }
        self.fd_users.insert(fd, 1);
        true
    }

    /// A channel no longer uses `fd`: the last one takes it off the poll.
    fn unwatch_fd(&mut self, fd: std::os::fd::RawFd) {
        if let Some(n) = self.fd_users.get_mut(&fd) {
            *n -= 1;
            if *n == 0 {
                self.fd_users.remove(&fd);
                let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            }
        }
    }

    /// Reap every channel; queue the replies.
    fn reap_completions(&mut self) -> bool {
        let mut any = false;
        for k in 0..self.chans.items.len() {
            let Some(chan) = self.chans.get_mut(k) else {
                continue;
            };
            if chan.ch.in_flight() == 0 {
                continue;
            }
            if chan.ch.poll(&mut self.done) == 0 {
                continue;
            }
            any = true;
            let mut done = std::mem::take(&mut self.done);
            for comp in done.drain(..) {
                let Some(p) = self.pending.remove(comp.user_data as usize) else {
                    continue;
                };
                let chan = self.chans.get_mut(k).expect("channel");
                if p.fua && comp.result.is_ok() {
                    self.bufs.put(comp.buf);
                    let id = self.pending.insert(Pending { fua: false, ..p });
                    match chan
                        .ch
                        .submit(IoRequest::no_data(IoOp::Flush, 0, 0, id as u64))
                    {
                        Ok(()) => continue,
                        Err(r) => {
                            let p = self.pending.remove(id).expect("pending");
                            self.complete(p, errno(&r.error), None);
                            continue;
                        }
                    }
                }
                if let Err(e) = &comp.result {
                    if matches!(
                        e.kind(),
                        vireo_bdev::ErrorKind::Disconnected
                            | vireo_bdev::ErrorKind::ControllerFailed
                    ) {
                        chan.dead = true;
                    }
                }
                let error = comp.result.as_ref().err().map_or(0, errno);
                let data = if p.cmd == CMD_READ && error == 0 {
                    comp.buf
                } else {
                    self.bufs.put(comp.buf);
                    None
                };
                self.complete(p, error, data);
            }
            self.done = done;
        }
        any
    }

    fn complete(&mut self, p: Pending, error: u32, data: Option<IoBuf>) {
        let Some(c) = self.clients.get_mut(p.client) else {
            self.server.release(p.cost);
            return;
        };
        c.in_flight -= 1;
        let kind = if data.is_some() {
            ReplyKind::Read
        } else {
            ReplyKind::Plain
        };
        push_reply(c, p.handle, error, data, p.offset, p.cost, kind);
    }

    /// Write `ci`'s queued replies; returns whether anything was written.
    fn flush(&mut self, ci: usize) -> bool {
        let Some(c) = self.clients.get_mut(ci) else {
            return false;
        };
        if c.dead {
            let mut freed = 0;
            for o in c.wq.drain(..) {
                freed += o.cost;
                c.owed -= 1;
                self.bufs.put(o.data);
            }
            c.bytes -= freed;
            self.server.release(freed);
            return false;
        }
        if c.wq.is_empty() {
            // TLS records of replies already taken may still wait for the socket.
            if c.writable {
                match c.stream.pending_output() {
                    Ok(true) => {
                        c.stall_since.get_or_insert_with(Instant::now);
                    }
                    Ok(false) => c.stall_since = None,
                    Err(_) => c.dead = true,
                }
            }
            return false;
        }
        if !c.writable {
            return false;
        }
        let mut progress = false;
        let mut taken = 0;
        let mut freed = 0;
        while !c.wq.is_empty() {
            let r = {
                let mut iov = [IoSlice::new(&[]); 64];
                let mut n = 0;
                for o in c.wq.iter().take(32) {
                    let h = o.hlen as usize;
                    if o.sent < h {
                        iov[n] = IoSlice::new(&o.head[o.sent..h]);
                        n += 1;
                    }
                    if let Some(d) = &o.data {
                        let from = o.sent.saturating_sub(h);
                        iov[n] = IoSlice::new(&d.as_slice()[from..]);
                        n += 1;
                    }
                }
                let want: usize = iov[..n].iter().map(|x| x.len()).sum();
                c.stream.write_vectored(&iov[..n]).map(|w| (w, want))
            };
            match r {
                Ok((0, _)) => {
                    c.dead = true;
                    break;
                }
                Ok((mut n, want)) => {
                    progress = true;
                    taken += n;
                    // A short write filled the socket: wait for its next event.
                    let full = n < want && matches!(c.stream, Stream::Plain(_));
                    while n > 0 {
                        let o = c.wq.front_mut().expect("reply");
                        let left = o.len() - o.sent;
                        if n < left {
                            o.sent += n;
                            break;
                        }
                        n -= left;
                        let o = c.wq.pop_front().expect("reply");
                        freed += o.cost;
                        c.owed -= 1;
                        self.bufs.put(o.data);
                    }
                    if full {
                        c.writable = false;
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    c.writable = false;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    c.dead = true;
                    break;
                }
            }
        }
        c.bytes -= freed;
        if c.wq.is_empty() {
            c.stall_since = None;
        } else if c.stall_since.is_none() {
            (c.stall_since, c.stall_taken) = (Some(Instant::now()), taken);
        } else {
            c.stall_taken += taken;
            if c.stall_taken >= MIN_REPLY_PROGRESS {
                (c.stall_since, c.stall_taken) = (Some(Instant::now()), 0);
            }
        }
        if progress {
            c.last_active = Instant::now();
        }
        self.server.release(freed);
        progress
    }

    /// Stop reading `ci` and drop its replies; it closes once nothing is in flight.
    fn kill(&mut self, ci: usize) {
        if let Some(c) = self.clients.get_mut(ci) {
            c.eof = true;
            c.dead = true;
        }
        self.flush(ci);
    }

    /// Deadlines, export changes, devices gone, and closing what is finished.
    fn tick(&mut self, now: Instant) {
        self.next_tick = now + Duration::from_millis(250);
        let timeout = self.server.opts.timeout;
        // A full server (it turned a client away) does not keep clients that have been
        // idle longer than the timeout: idle clients cannot lock new ones out.
        let full = self.server.full.load(Ordering::Acquire);
        let idle = match (self.server.opts.idle_timeout, full) {
            (Some(i), true) => Some(i.min(timeout)),
            (Some(i), false) => Some(i),
            (None, true) => Some(timeout),
            (None, false) => None,
        };
        let regen = self.generation_changed();
        if regen {
            self.generation = self.server.generation.load(Ordering::Acquire);
        }
        for ci in 0..self.clients.items.len() {
            let Some(c) = self.clients.items[ci].as_mut() else {
                continue;
            };
            let chan = c.chan;
            let mut kill = false;
            if let Some(t) = c.partial_since {
                if now.duration_since(t) > timeout {
                    tracing::info!("nbd client: a request half-sent for {timeout:?}; closing");
                    kill = true;
                }
            }
            if let Some(t) = c.stall_since {
                if now.duration_since(t) > timeout {
                    tracing::info!(
                        "nbd client: replies waiting, and less than {MIN_REPLY_PROGRESS} bytes of them taken in {timeout:?}; closing"
                    );
                    kill = true;
                }
            }
            if let Some(idle) = idle {
                if c.owed == 0 && c.payload.is_none() && now.duration_since(c.last_active) > idle {
                    tracing::info!(
                        "nbd client: idle for {idle:?}{}; closing",
                        if full {
                            " while the server is full"
                        } else {
                            ""
                        }
                    );
                    kill = true;
                }
            }
            if let Some(ch) = self.chans.get_mut(chan) {
                if ch.dead || ch.bdev.is_removed() {
                    kill = true;
                } else if regen
                    && !self
                        .server
                        .resolve(&c.export)
                        .is_some_and(|b| Arc::ptr_eq(&b, &ch.bdev))
                {
                    tracing::info!(export = %c.export, "nbd: the export was stopped; closing its client");
                    kill = true;
                }
            }
            if kill {
                self.kill(ci);
            }
        }
        self.close_finished();
    }

    /// Close the clients that are done: nothing in flight, and dead or at the end of
    /// their stream with every reply written.
    fn close_finished(&mut self) {
        for ci in 0..self.clients.items.len() {
            let Some(c) = self.clients.items[ci].as_ref() else {
                continue;
            };
            // (A WRITE payload cut short by the end of the stream is dropped.)
            if (c.eof || c.dead) && c.in_flight == 0 && (c.dead || c.wq.is_empty()) {
                self.remove_client(ci);
            }
        }
    }

    fn remove_client(&mut self, ci: usize) {
        let Some(mut c) = self.clients.remove(ci) else {
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&c.stream.sock().as_raw_fd()));
        let mut freed = c.bytes;
        for o in c.wq.drain(..) {
            self.bufs.put(o.data);
        }
        if let Some(p) = c.payload.take() {
            self.bufs.put(Some(p.buf));
        }
        c.bytes = 0;
        self.server.release(std::mem::take(&mut freed));
        c.stream.close();
        drop(c.stream);
        let Some(chan) = self.chans.get_mut(c.chan) else {
            return;
        };
        chan.clients -= 1;
        let bdev = chan.bdev.clone();
        if self.server.client_gone(self.idx, &bdev) {
            // The last client of this bdev on this thread: close the channel (the
            // controller can be detached).
            if let Some(chan) = self.chans.remove(c.chan) {
                if let Some(fd) = chan.fd {
                    self.unwatch_fd(fd);
                }
                drop(chan);
            }
        }
        if self.clients.len() == 0 {
            self.bufs.clear();
            self.server.maybe_trim(&bdev);
        }
    }
}

impl<T> Slab<T> {
    /// Insert the value `f` makes, knowing its index.
    fn insert_with(&mut self, f: impl FnOnce(usize) -> T) -> usize {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.items.push(None);
                self.items.len() - 1
            }
        };
        self.items[i] = Some(f(i));
        i
    }
}

#[derive(Clone, Copy)]
enum ReplyKind {
    /// No data (or an error).
    Plain,
    /// READ data follows.
    Read,
    /// A block status reply: one extent of this length, all data.
    BlockStatus(u32),
}

/// Queue one reply for `c` (simple, or one structured chunk with the DONE flag).
fn push_reply(
    c: &mut Client,
    handle: u64,
    error: u32,
    data: Option<IoBuf>,
    offset: u64,
    cost: usize,
    kind: ReplyKind,
) {
    let mut head = [0u8; 32];
    let hlen;
    let mut data = data;
    if !c.structured {
        head[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        head[4..8].copy_from_slice(&error.to_be_bytes());
        head[8..16].copy_from_slice(&handle.to_be_bytes());
        hlen = 16;
        if error != 0 || !matches!(kind, ReplyKind::Read) {
            data = None;
        }
    } else {
        // Type, length, and the chunk's fixed fields after the header.
        let (ty, len, extra) = if error != 0 {
            data = None;
            head[20..24].copy_from_slice(&error.to_be_bytes());
            // No message (its length is 0).
            (REPLY_TYPE_ERROR, 6u32, 6usize)
        } else {
            match kind {
                ReplyKind::Plain => (REPLY_TYPE_NONE, 0, 0),
                ReplyKind::Read => {
                    let n = data.as_ref().map_or(0, |d| d.len()) as u32;
                    head[20..28].copy_from_slice(&offset.to_be_bytes());
                    (REPLY_TYPE_OFFSET_DATA, 8 + n, 8)
                }
                ReplyKind::BlockStatus(extent) => {
                    head[20..24].copy_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                    head[24..28].copy_from_slice(&extent.to_be_bytes());
                    // Flags 0: allocated, not zero.
                    (REPLY_TYPE_BLOCK_STATUS, 12, 12)
                }
            }
        };
        head[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        head[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        head[6..8].copy_from_slice(&ty.to_be_bytes());
        head[8..16].copy_from_slice(&handle.to_be_bytes());
        head[16..20].copy_from_slice(&len.to_be_bytes());
        hlen = 20 + extra;
    }
    c.wq.push_back(Out {
        head,
        hlen: hlen as u8,
        data,
        sent: 0,
        cost,
    });
}
