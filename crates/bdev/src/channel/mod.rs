//! The per-thread I/O path to a bdev: [`IoChannel`]. An I/O is validated
//! (`validate.rs`), its data placed where the device can reach it (in place, or through
//! a bounce buffer: `bounce.rs`), recorded in a slot (`slots.rs`), split into device
//! requests within the device's limits (`split.rs`) and handed to the driver; a full
//! ring makes requests wait here. Completions are matched to their slot and handed out
//! by [`IoChannel::poll`]; time limits and escalation live in `deadline.rs`.

mod bounce;
mod deadline;
mod slots;
mod split;
/// A device request of parent `p` failed with `e` (off the I/O path): the first error
/// is the parent's. Aborted by a reset vireo forced, or failed with the connection or
/// the controller: the device may still be alive and using the buffers (its rings are
/// leaked for the same reason), so they are retired when the parent completes.
#[cold]
#[inline(never)]
fn child_failed(p: &mut slots::Parent, e: IoError) {
    if matches!(
        e,
        IoError::Aborted(_) | IoError::Disconnected | IoError::ControllerFailed(_)
    ) {
        p.aborted = true;
    }
    if p.error.is_none() {
        p.error = Some(e);
    }
}

/// Mark every DMA buffer of `p` (its buffer, its in-place vectored segments, its bounce
/// buffer) never to be reused (off the I/O path).
#[cold]
#[inline(never)]
fn retire_buffers(p: &slots::Parent) {
    if let Some(IoBuf::Dma(b)) = &p.buf {
        b.retire();
    }
    for s in &p.iov {
        if let IoBuf::Dma(b) = s {
            b.retire();
        }
    }
    if let Some(b) = &p.bounce {
        b.retire();
    }
}

#[cfg(test)]
mod tests;
mod validate;

use std::cell::Cell;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_virtio::{clock, Translator};

use crate::bdev::Bdev;
use crate::driver::{ChannelDriver, Child, ChildDone};
use crate::error::{BdevError, IoError};
use crate::io::{Completion, IoBuf, IoOp, IoRequest, Rejected};
use crate::stats::{ChannelStats, IoStats};
use bounce::BouncePool;
use deadline::Escalation;
use slots::Parents;

/// A thread's I/O path to a bdev: submit and poll, no locks. It belongs to the thread
/// that opened it (neither `Send` nor `Sync`): channels of one thread on LUNs of the
/// same controller may share a queue.
pub struct IoChannel {
    bdev: Arc<Bdev>,
    drv: Box<dyn ChannelDriver>,
    parents: Parents,
    /// Device requests waiting for ring space, in order.
    waiting: VecDeque<Child>,
    translator: Translator,
    bounce: BouncePool,
    counters: Counters,
    done_scratch: Vec<ChildDone>,
    /// Closed without waiting for in-flight I/O (see [`IoChannel::abandon`]).
    abandoned: bool,
    /// Clock ticks of the last polling pass that found completions.
    last_completion: u64,
    /// Requests were queued since the last publish.
    unpublished: bool,
    /// Completions handed out by the next `poll`: those `run` reaped for other
    /// requests, and flushes a write-through device needs no request for.
    ready: Vec<Completion>,
    /// Interrupts are enabled on the queue (a waiter sleeps on its eventfd).
    armed: bool,
    /// Active I/Os with a deadline (timed-out ones included until the device returns
    /// them).
    timed: usize,
    /// Timed-out I/Os the device still holds.
    timed_out_held: usize,
    /// Clock ticks of the next deadline check.
    next_timeout_check: u64,
    _not_sync: PhantomData<Cell<()>>,
}

/// An [`IoChannel`] on a request queue no other channel shares
/// ([`Bdev::open_movable_channel`]): it may be handed to another thread between calls,
/// as a C caller's queue is (libblkio's queues belong to no thread). Like every channel
/// it is used by one thread at a time (`!Sync`).
pub struct MovableChannel(IoChannel);

// SAFETY: an IoChannel is !Send only through its driver box, typed `dyn ChannelDriver`
// (without `Send`) because a shared-queue driver (scsi's per-thread queue, an `Rc`) is
// not Send. A movable channel's driver came from `BdevDriver::open_exclusive_channel`
// as a `Box<dyn ChannelDriver + Send>`: the compiler checked it there, and it shares no
// state with another channel. Every other field is Send (checked in `fields_are_send`).
unsafe impl Send for MovableChannel {}

/// The compile-time check behind `MovableChannel`'s Send: every field of an IoChannel
/// but its driver is Send.
#[allow(dead_code)]
fn fields_are_send() {
    fn send<T: Send>() {}
    send::<Arc<Bdev>>();
    send::<Parents>();
    send::<VecDeque<Child>>();
    send::<Translator>();
    send::<BouncePool>();
    send::<Counters>();
    send::<Vec<ChildDone>>();
    send::<Vec<Completion>>();
    send::<PhantomData<Cell<()>>>();
}

impl std::ops::Deref for MovableChannel {
    type Target = IoChannel;
    fn deref(&self) -> &IoChannel {
        &self.0
    }
}

impl std::ops::DerefMut for MovableChannel {
    fn deref_mut(&mut self) -> &mut IoChannel {
        &mut self.0
    }
}

impl MovableChannel {
    /// The channel, for code that takes an [`IoChannel`] (it stays on this thread then).
    pub fn into_inner(self) -> IoChannel {
        self.0
    }
}

/// Where an I/O's data is for the device: a device address (or the offset in the
/// segments), the bounce buffer it went through, the caller's segments used in place.
type Placed = (
    u64,
    Option<vireo_virtio::DmaBuf>,
    Option<Arc<[vireo_virtio::Segment]>>,
);

/// The channel's statistics: counted locally, published for other threads now and then.
struct Counters {
    local: IoStats,
    published: Arc<ChannelStats>,
    completions: u64,
    /// Counters changed since they were last published.
    dirty: bool,
}

/// How [`IoChannel::wait`] waits for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Spin on the ring (lowest latency, one CPU busy).
    Poll,
    /// Sleep on the queue's completion eventfd (interrupts enabled only while
    /// sleeping, with the event index); a transport without one (polled PCI) naps.
    Sleep,
    /// Spin this long after the last completion, then sleep.
    Hybrid(std::time::Duration),
}

/// What [`IoChannel::arm`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Armed {
    /// Completions are pending: poll now instead of sleeping.
    Ready,
    /// Sleep until this fd is readable (or a timeout), then poll.
    Fd(std::os::fd::RawFd),
    /// The transport only polls (or nothing is in flight): poll, or nap and poll.
    NoFd,
}

/// Longest single sleep of [`IoChannel::wait`]: bounds the delay of work that is not
/// signalled by the device (retries after BUSY, requests waiting for ring space).
const MAX_NAP: Duration = Duration::from_millis(10);

impl std::fmt::Debug for IoChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoChannel")
            .field("bdev", &self.bdev.info.name)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl IoChannel {
    /// A channel on `bdev` for the calling thread.
    pub(crate) fn open(bdev: &Arc<Bdev>) -> Result<IoChannel, BdevError> {
        let drv = bdev.driver.open_channel()?;
        Ok(IoChannel::with_driver(bdev, drv))
    }

    /// A channel on a request queue of its own, which may move between threads.
    pub(crate) fn open_movable(bdev: &Arc<Bdev>) -> Result<MovableChannel, BdevError> {
        let drv: Box<dyn ChannelDriver + Send> = bdev.driver.open_exclusive_channel()?;
        Ok(MovableChannel(IoChannel::with_driver(bdev, drv)))
    }

    fn with_driver(bdev: &Arc<Bdev>, drv: Box<dyn ChannelDriver>) -> IoChannel {
        clock::init();
        IoChannel {
            bdev: bdev.clone(),
            drv,
            parents: Parents::default(),
            waiting: VecDeque::new(),
            translator: bdev.memory().translator(),
            bounce: BouncePool::default(),
            counters: Counters {
                local: IoStats::default(),
                published: bdev.stats.register(),
                completions: 0,
                dirty: false,
            },
            done_scratch: Vec::new(),
            abandoned: false,
            last_completion: clock::ticks(),
            unpublished: false,
            ready: Vec::new(),
            armed: false,
            timed: 0,
            timed_out_held: 0,
            next_timeout_check: 0,
            _not_sync: PhantomData,
        }
    }

    /// The bdev this channel serves.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// I/Os submitted and not yet returned by `poll` (including completions already
    /// reaped and waiting to be handed out).
    pub fn in_flight(&self) -> usize {
        self.parents.outstanding() - self.timed_out_held + self.ready.len()
    }

    /// Requests the device holds, including timed-out ones whose completion the caller
    /// already got.
    fn device_outstanding(&self) -> usize {
        self.parents.outstanding()
    }

    /// Ask for a signal on the next completion, for a caller's own event loop: sleep on
    /// the returned fd (poll/epoll for readability), then call [`poll`](Self::poll),
    /// which returns the queue to polling. Publishes queued submissions first.
    pub fn arm(&mut self) -> Armed {
        if !self.ready.is_empty() {
            return Armed::Ready;
        }
        if self.unpublished {
            self.publish();
        }
        if self.in_flight() == 0 {
            return Armed::NoFd;
        }
        match self.drv.arm() {
            Some((_, true)) => {
                self.armed = true;
                Armed::Ready
            }
            Some((fd, false)) => {
                self.armed = true;
                Armed::Fd(fd)
            }
            None => Armed::NoFd,
        }
    }

    /// The eventfd the device signals completions on while the channel is armed
    /// ([`arm`](Self::arm)); `None` when the transport only polls. It stays the same while
    /// the queue lives (a reconnection may replace it).
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.drv.completion_fd()
    }

    /// Reap completions into `out` until at least `min` were added or `timeout`
    /// passed, waiting as `mode` says; returns how many were added. Returns early when
    /// nothing is in flight.
    pub fn wait(
        &mut self,
        out: &mut Vec<Completion>,
        min: usize,
        timeout: Duration,
        mode: WaitMode,
    ) -> usize {
        let start = Instant::now();
        let mut got = 0;
        let mut last_progress = start;
        loop {
            let n = self.poll(out);
            got += n;
            let now = Instant::now();
            if n > 0 {
                last_progress = now;
            }
            if got >= min || self.in_flight() == 0 {
                return got;
            }
            let elapsed = now - start;
            if elapsed >= timeout {
                return got;
            }
            let spin = match mode {
                WaitMode::Poll => true,
                WaitMode::Sleep => false,
                WaitMode::Hybrid(d) => now - last_progress < d,
            };
            if spin {
                std::hint::spin_loop();
                continue;
            }
            let nap = (timeout - elapsed).min(MAX_NAP);
            match self.arm() {
                Armed::Ready => {}
                Armed::Fd(fd) => {
                    vireo_virtio::wait_readable(&[fd], nap);
                }
                Armed::NoFd => std::thread::sleep(nap.min(Duration::from_micros(50))),
            }
        }
    }

    /// When the last polling pass that found completions ran, in [`clock`] ticks
    /// (`vireo_virtio::clock`): a free timestamp for callers that track progress.
    pub fn last_completion_ticks(&self) -> u64 {
        self.last_completion
    }

    /// Close the channel without waiting for its in-flight I/O (the caller gave up on a
    /// device that stopped answering). Their buffers are leaked, never reused: the
    /// device may still write them.
    pub fn abandon(mut self) {
        self.abandoned = true;
    }

    /// Counters of this channel.
    pub fn stats(&self) -> IoStats {
        self.counters.local
    }

    /// Submit an I/O. It reaches the device on the next [`poll`](Self::poll) (or
    /// [`publish`](Self::publish)); a full ring makes it wait in the channel, never fail.
    /// A request that is invalid for this bdev is refused at once.
    // The error hands the caller's buffers back by value: no allocation on a refusal,
    // and the Ok path, the hot one, carries nothing.
    #[allow(clippy::result_large_err)]
    pub fn submit(&mut self, mut req: IoRequest) -> Result<(), Rejected> {
        if let Err(error) = validate::validate(&self.bdev, &req) {
            return Err(Rejected::of(error, &mut req));
        }
        tracing::trace!(
            target: "vireo_io",
            bdev = %self.bdev.info.name,
            op = req.op.name(),
            lba = req.offset_blocks,
            blocks = req.num_blocks,
            user_data = req.user_data,
            "submit"
        );
        if req.op == IoOp::Flush && !self.bdev.volatile_write_cache.load(Ordering::Relaxed) {
            // Write-through device: every completed write is already durable.
            self.counters.local.record(IoOp::Flush, 0, 0, true);
            self.ready.push(Completion {
                user_data: req.user_data,
                op: IoOp::Flush,
                result: Ok(()),
                buf: req.buf.take(),
                iov: Vec::new(),
                latency_ns: 0,
            });
            return Ok(());
        }
        let (addr, bounce, sg) = match self.place_data(&req) {
            Ok(placed) => placed,
            Err(error) => return Err(Rejected::of(error, &mut req)),
        };
        let block_size = self.bdev.info.block_size;
        let slot = self.parents.take();
        let start = clock::ticks();
        let limit = req.timeout.or_else(|| self.bdev.default_timeout());
        {
            let p = self.parents.slot_mut(slot);
            p.user_data = req.user_data;
            p.op = req.op;
            p.active = true;
            p.bytes = req.num_blocks * block_size as u64;
            p.remaining = 0;
            p.error = None;
            p.buf = req.buf.take();
            p.iov = std::mem::take(&mut req.iov);
            p.bounce = bounce;
            p.start = start;
            p.timed_out = false;
            p.escalated = Escalation::None;
            p.aborted = false;
            p.deadline = match limit {
                Some(d) => {
                    p.period = clock::ns_to_ticks(d.as_nanos().min(u64::MAX as u128) as u64);
                    start.saturating_add(p.period).max(1)
                }
                None => 0,
            };
        }
        if limit.is_some() {
            self.timed += 1;
        }
        let mut children = 0u32;
        let limits = self.bdev.info.limits;
        for child in split::split(
            slot,
            req.op,
            req.offset_blocks,
            req.num_blocks,
            (addr, sg),
            block_size,
            &limits,
        )
        .no_unmap(req.no_unmap && req.op == IoOp::WriteZeroes)
        {
            self.enqueue(child);
            children += 1;
        }
        self.parents.slot_mut(slot).remaining = children;
        Ok(())
    }

    /// Where the device finds the data of `req`: the caller's DMA buffer in place, or a
    /// bounce buffer (heap buffers, vectored requests; filled now for a write).
    #[inline(always)]
    fn place_data(&mut self, req: &IoRequest) -> Result<Placed, IoError> {
        if !req.op.has_data() {
            return Ok((0, None, None));
        }
        if !req.iov.is_empty() {
            if let Some(sg) = self.in_place(&req.iov) {
                return Ok((0, None, Some(sg)));
            }
        }
        let mem = self.bdev.memory();
        if !req.iov.is_empty() {
            let total: usize = req.iov.iter().map(IoBuf::len).sum();
            let mut b = self.bounce.take(mem, total)?;
            if req.op == IoOp::Write {
                bounce::gather(&mut b, &req.iov);
            }
            return Ok((b.iova(), Some(b), None));
        }
        let Some(buf) = req.buf.as_ref() else {
            return Err(IoError::InvalidBuffer(format!(
                "{} without a buffer",
                req.op.name()
            )));
        };
        let shared = match buf {
            IoBuf::Dma(b) => Some((b.addr(), b.len())),
            IoBuf::Foreign(b) => Some((b.addr(), b.len())),
            IoBuf::Heap(_) => None,
        };
        if let Some((addr, len)) = shared {
            if let Some(a) = self.translator.translate(addr, len as u64) {
                return Ok((a, None, None));
            }
        }
        let mut b = self.bounce.take(mem, buf.len())?;
        if req.op == IoOp::Write {
            b.as_mut_slice()[..buf.len()].copy_from_slice(buf.as_slice());
        }
        Ok((b.iova(), Some(b), None))
    }

    /// A vectored I/O's segments in device addresses, when every one lies in memory
    /// the device can reach and each device request can carry them (no more pieces
    /// than the device's segment limit); else `None`, and the data is bounced.
    fn in_place(&mut self, iov: &[IoBuf]) -> Option<Arc<[vireo_virtio::Segment]>> {
        let limits = &self.bdev.info.limits;
        let max_bytes = match limits.max_segment_bytes {
            0 => u32::MAX as u64,
            n => n as u64,
        };
        let mut pieces = 0u64;
        let mut segs = Vec::with_capacity(iov.len());
        for b in iov {
            let (addr, len) = match b {
                IoBuf::Dma(d) => (d.addr(), d.len()),
                IoBuf::Foreign(f) => (f.addr(), f.len()),
                IoBuf::Heap(_) => return None,
            };
            if len == 0 {
                continue;
            }
            let len = u32::try_from(len).ok()?;
            pieces += (len as u64).div_ceil(max_bytes);
            if pieces > limits.max_segments.max(1) as u64 {
                return None;
            }
            let iova = self.translator.translate(addr, len as u64)?;
            segs.push(vireo_virtio::Segment { addr: iova, len });
        }
        Some(Arc::from(segs))
    }

    #[inline(always)]
    fn enqueue(&mut self, child: Child) {
        self.counters.local.device_requests += 1;
        self.unpublished = true;
        if !self.waiting.is_empty() {
            self.waiting.push_back(child);
            return;
        }
        if !self.drv.queue(&child) {
            self.counters.local.queue_full_waits += 1;
            self.waiting.push_back(child);
        }
    }

    /// Make submitted I/Os visible to the device now (they are anyway on the next
    /// [`poll`](Self::poll)).
    pub fn publish(&mut self) {
        if self.unpublished {
            self.unpublished = false;
            self.drv.publish();
        }
    }

    /// Reap finished I/Os into `out`; returns how many were added. Also moves waiting
    /// requests onto the ring as space frees up, and publishes submissions.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> usize {
        self.poll_with(|c| out.push(c))
    }

    /// Reap finished I/Os, handing each to `f` as it is matched to its request (the
    /// channel cannot be used from `f`: collect what to submit next and submit it after);
    /// returns how many. Otherwise like [`poll`](Self::poll).
    ///
    /// For a caller's own completion loop: a completion built and handed on in one
    /// place stays in registers, where `poll` builds it, then copies it into the vector
    /// with wide loads of what narrow stores just wrote (a stall per I/O).
    #[inline]
    pub fn poll_with<F: FnMut(Completion)>(&mut self, mut f: F) -> usize {
        if self.armed {
            self.armed = false;
            self.drv.disarm();
        }
        let ready = self.ready.len();
        if ready > 0 {
            for c in self.ready.drain(..) {
                f(c);
            }
            // Completions that needed no device (flush on a write-through device) are
            // progress too.
            self.last_completion = clock::ticks();
        }
        let mut n = ready + self.poll_device(&mut f);
        if self.timed > 0 {
            let mut late = Vec::new();
            n += self.maybe_check_timeouts(&mut late);
            late.into_iter().for_each(&mut f);
        }
        n
    }

    #[inline]
    fn poll_device<F: FnMut(Completion)>(&mut self, f: &mut F) -> usize {
        self.publish();
        let mut done = std::mem::take(&mut self.done_scratch);
        if self.drv.poll(&mut done) == 0 && self.waiting.is_empty() {
            // Nothing finished and nothing waits for ring space: idle time, when
            // statistics are published for readers on other threads.
            self.done_scratch = done;
            if self.counters.dirty {
                self.counters.dirty = false;
                self.counters.published.publish(&self.counters.local);
            }
            return 0;
        }
        // One clock reading for every completion of this pass.
        let now = if done.is_empty() { 0 } else { clock::ticks() };
        if now != 0 {
            self.last_completion = now;
        }
        let mut n = 0;
        for d in done.drain(..) {
            if self.child_done(d, now, f) {
                n += 1;
            }
        }
        self.done_scratch = done;
        // Waiting requests go out as ring space frees up, including space freed by other
        // channels that share the queue.
        if !self.waiting.is_empty() {
            while let Some(c) = self.waiting.front() {
                if !self.drv.queue(c) {
                    break;
                }
                self.waiting.pop_front();
            }
            self.drv.publish();
        }
        if n > 0 {
            // Published every 64 completions, and by the next idle poll (not on the way
            // from a completion to the next submission).
            let c = &mut self.counters;
            c.completions += n as u64;
            c.dirty = true;
            if c.completions.is_multiple_of(64) {
                c.dirty = false;
                c.published.publish(&c.local);
            }
        }
        n
    }

    /// One device request of a parent finished; returns whether the parent completed
    /// (and went to `f`).
    #[inline(always)]
    fn child_done<F: FnMut(Completion)>(&mut self, d: ChildDone, now: u64, f: &mut F) -> bool {
        let Some(p) = self.parents.get_mut(d.parent).filter(|p| p.active) else {
            return false;
        };
        if let Err(e) = d.result {
            child_failed(p, *e);
        }
        p.remaining -= 1;
        if p.remaining > 0 {
            return false;
        }
        p.active = false;
        if p.deadline != 0 {
            self.timed -= 1;
        }
        // Aborted (see `child_failed`): the old back-end may still write the buffers,
        // which are never freed or handed back.
        let aborted = p.aborted;
        if aborted {
            retire_buffers(p);
        }
        if p.timed_out {
            // The caller already got a timeout error: the device gave the request back
            // at last (or it was aborted), so its buffers are free now (or retired).
            p.buf = None;
            p.error = None;
            let bounce = p.bounce.take();
            self.timed_out_held -= 1;
            if let Some(b) = bounce {
                if !aborted {
                    self.bounce.give(b);
                }
            }
            self.parents.release(d.parent);
            return false;
        }
        if aborted {
            p.buf = None;
            p.bounce = None;
            p.iov.clear();
        }
        let mut buf = p.buf.take();
        let mut iov = std::mem::take(&mut p.iov);
        let error = p.error.take();
        let (op, bytes, user_data) = (p.op, p.bytes, p.user_data);
        let lat = clock::ticks_to_ns(now.saturating_sub(p.start));
        if let Some(b) = p.bounce.take() {
            if op == IoOp::Read && error.is_none() {
                bounce::scatter(&b, buf.as_mut(), &mut iov);
            }
            self.bounce.give(b);
        }
        self.parents.release(d.parent);
        self.counters.local.record(op, bytes, lat, error.is_none());
        // I/O trace point (`-L io`); one relaxed load when off.
        tracing::trace!(
            target: "vireo_io",
            bdev = %self.bdev.info.name,
            op = op.name(),
            user_data,
            latency_ns = lat,
            error = ?error,
            "complete"
        );
        f(Completion {
            user_data,
            op,
            result: match error {
                None => Ok(()),
                Some(e) => Err(e),
            },
            buf,
            iov,
            latency_ns: lat,
        });
        true
    }

    /// Submit one I/O and poll until it completes (for control paths and tests).
    /// Completions of other requests that arrive meanwhile are kept for the next
    /// [`poll`](Self::poll).
    pub fn run(&mut self, req: IoRequest) -> Completion {
        let ud = req.user_data;
        let op = req.op;
        let ready_before = self.ready.len();
        if let Err(r) = self.submit(req) {
            return Completion {
                user_data: r.user_data,
                op,
                result: Err(r.error),
                buf: r.buf,
                iov: r.iov,
                latency_ns: 0,
            };
        }
        if self.ready.len() > ready_before {
            // Completed at once by submit (a flush on a write-through device): it is
            // the entry just pushed, whatever other ready completions carry.
            if let Some(c) = self.ready.pop() {
                return c;
            }
        }
        let mut out = Vec::new();
        loop {
            self.poll_device(&mut |c| out.push(c));
            self.maybe_check_timeouts(&mut out);
            if let Some(pos) = out.iter().position(|c| c.user_data == ud) {
                let c = out.remove(pos);
                self.ready.append(&mut out);
                return c;
            }
            std::hint::spin_loop();
        }
    }
}

impl Drop for IoChannel {
    fn drop(&mut self) {
        // Let in-flight I/O finish so buffers are not in use by the device when freed;
        // the driver fails everything at once if the device is gone.
        let wait = if self.abandoned {
            Duration::ZERO
        } else {
            Duration::from_secs(5)
        };
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while self.device_outstanding() + self.ready.len() > 0 && Instant::now() < deadline {
            self.poll(&mut out);
            out.clear();
            std::thread::yield_now();
        }
        if self.device_outstanding() > 0 {
            // The device still owns these buffers: never hand them back to the allocator.
            tracing::error!(
                bdev = %self.bdev.info.name,
                in_flight = self.device_outstanding(),
                "channel closed with I/O still on the device; leaking its buffers"
            );
            for (_, p) in self.parents.active_mut() {
                std::mem::forget(p.buf.take());
                std::mem::forget(p.bounce.take());
                std::mem::forget(std::mem::take(&mut p.iov));
            }
        }
        self.counters.published.publish(&self.counters.local);
        self.bdev
            .stats
            .retire(&self.counters.published, &self.counters.local);
    }
}
