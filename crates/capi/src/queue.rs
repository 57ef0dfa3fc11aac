//! A `struct blkioq`: one request queue of the device, on a movable channel (the caller
//! may use it from any thread, one at a time), with libblkio's request calls and
//! `blkioq_do_io`.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_bdev::{Armed, Bdev, IoBuf, IoOp, IoRequest, MovableChannel};
use vireo_virtio::ForeignBuf;

use crate::error::{errno_of_io, invalid, Fail, Res};

/// The longest `blkioq_do_io` sleeps on the completion eventfd before it looks again.
const NAP: Duration = Duration::from_millis(10);

/// `BLKIO_REQ_FUA`.
pub const REQ_FUA: u32 = 1 << 0;
/// `BLKIO_REQ_NO_UNMAP`.
pub const REQ_NO_UNMAP: u32 = 1 << 1;
/// `BLKIO_REQ_NO_FALLBACK`.
pub const REQ_NO_FALLBACK: u32 = 1 << 2;

/// A finished request, waiting to be handed out.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    pub user_data: usize,
    pub ret: i32,
}

/// A request the device holds.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    user_data: usize,
    /// A FUA write: a flush follows before the request completes.
    then_flush: bool,
}

/// What `blkioq_do_io` waits with.
pub enum Wait<'a> {
    /// Until done (or the timeout); signals are retried.
    Plain,
    /// Until done, the timeout, or a signal (with this mask while waiting).
    Interruptible(Option<&'a libc::sigset_t>),
}

pub struct Queue {
    ch: MovableChannel,
    pub poll: bool,
    read_only: bool,
    block_size: u64,
    fd_enabled: bool,
    slots: Vec<Slot>,
    free: Vec<u32>,
    ready: VecDeque<Done>,
    /// Completions of one reap: the request's slot and its result (0 or -errno).
    scratch: Vec<(u32, i32)>,
    /// Requests the device holds (slots taken).
    in_flight: usize,
}

impl Queue {
    pub fn open(bdev: &Arc<Bdev>, poll: bool, read_only: bool) -> Res<Queue> {
        let ch = bdev.open_movable_channel()?;
        Ok(Queue {
            ch,
            poll,
            read_only,
            block_size: bdev.info().block_size as u64,
            fd_enabled: false,
            slots: Vec::new(),
            free: Vec::new(),
            ready: VecDeque::new(),
            scratch: Vec::new(),
            in_flight: 0,
        })
    }

    pub(crate) fn fail_now(&mut self, user_data: usize, errno: i32) {
        self.ready.push_back(Done {
            user_data,
            ret: -errno,
        });
    }

    fn take_slot(&mut self, user_data: usize, then_flush: bool) -> u32 {
        let s = Slot {
            user_data,
            then_flush,
        };
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = s;
                i
            }
            None => {
                self.slots.push(s);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Check a request's flags, byte range and (`write`) the instance's read-only
    /// setting: its range in blocks, `Ok(None)` for an empty one (done at once), or the
    /// errno it fails with.
    fn check(
        &self,
        start: u64,
        len: u64,
        flags: u32,
        allowed: u32,
        write: bool,
    ) -> Result<Option<(u64, u64)>, i32> {
        if flags & !allowed != 0 {
            return Err(libc::EINVAL);
        }
        let bs = self.block_size;
        if !start.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(libc::EINVAL);
        }
        if write && self.read_only {
            return Err(libc::EBADF);
        }
        Ok((len > 0).then_some((start / bs, len / bs)))
    }

    /// Queue a request through [`check`](Self::check): `make` builds it from its range.
    fn checked(
        &mut self,
        (start, len, flags, allowed, write): (u64, u64, u32, u32, bool),
        user_data: usize,
        make: impl FnOnce(u64, u64) -> IoRequest,
    ) {
        match self.check(start, len, flags, allowed, write) {
            Err(e) => self.fail_now(user_data, e),
            Ok(None) => self.ready.push_back(Done { user_data, ret: 0 }),
            Ok(Some((lba, blocks))) => {
                self.submit(make(lba, blocks), user_data, flags & REQ_FUA != 0)
            }
        }
    }

    /// Queue `req` (tagged with a new slot of `user_data`).
    fn submit(&mut self, mut req: IoRequest, user_data: usize, then_flush: bool) {
        let slot = self.take_slot(user_data, then_flush);
        req.user_data = slot as u64;
        match self.ch.submit(req) {
            Ok(()) => self.in_flight += 1,
            Err(rejected) => {
                self.free.push(slot);
                self.fail_now(user_data, errno_of_io(&rejected.error));
            }
        }
    }

    /// A read (`write` false) or write of `len` bytes at `buf`.
    ///
    /// # Safety
    /// `buf` is valid for `len` bytes (writable for a read) until the request completes.
    pub unsafe fn rw(
        &mut self,
        write: bool,
        start: u64,
        buf: *mut u8,
        len: usize,
        user_data: usize,
        flags: u32,
    ) {
        // An empty request needs no buffer (it completes at once).
        let Some(ptr) = NonNull::new(buf).or_else(|| (len == 0).then(NonNull::dangling)) else {
            return self.fail_now(user_data, libc::EFAULT);
        };
        let allowed = if write { REQ_FUA } else { 0 };
        self.checked(
            (start, len as u64, flags, allowed, write),
            user_data,
            |lba, blocks| {
                // SAFETY: the caller's contract (this function's): valid until completion.
                let b = IoBuf::Foreign(unsafe { ForeignBuf::new(ptr, len) });
                if write {
                    IoRequest::write(lba, blocks, b, 0)
                } else {
                    IoRequest::read(lba, blocks, b, 0)
                }
            },
        );
    }

    /// A vectored read or write.
    ///
    /// # Safety
    /// `iov` holds `iovcnt` entries, each valid for its length, until completion.
    pub unsafe fn rwv(
        &mut self,
        write: bool,
        start: u64,
        iov: *const libc::iovec,
        iovcnt: i32,
        user_data: usize,
        flags: u32,
    ) {
        if iovcnt < 0 || (iovcnt > 0 && iov.is_null()) {
            return self.fail_now(user_data, libc::EINVAL);
        }
        let entries: &[libc::iovec] = if iovcnt == 0 {
            &[]
        } else {
            // SAFETY: the caller's contract: `iovcnt` readable entries.
            unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) }
        };
        let mut len: u64 = 0;
        let mut bufs = Vec::with_capacity(entries.len());
        for e in entries {
            // Saturating: a sum past u64 is refused below like any wrong length.
            len = len.saturating_add(e.iov_len as u64);
            if e.iov_len == 0 {
                continue;
            }
            let Some(ptr) = NonNull::new(e.iov_base.cast::<u8>()) else {
                return self.fail_now(user_data, libc::EFAULT);
            };
            // SAFETY: the caller's contract: each segment valid until completion.
            bufs.push(IoBuf::Foreign(unsafe { ForeignBuf::new(ptr, e.iov_len) }));
        }
        let allowed = if write { REQ_FUA } else { 0 };
        self.checked(
            (start, len, flags, allowed, write),
            user_data,
            |lba, blocks| {
                if write {
                    IoRequest::writev(lba, blocks, bufs, 0)
                } else {
                    IoRequest::readv(lba, blocks, bufs, 0)
                }
            },
        );
    }

    /// Write zeroes or discard `len` bytes at `start`.
    pub fn no_data(&mut self, op: IoOp, start: u64, len: u64, user_data: usize, flags: u32) {
        let allowed = match op {
            // NO_UNMAP: the device is told to keep the blocks allocated. vireo never
            // falls back to writing zeroed buffers (NO_FALLBACK holds).
            IoOp::WriteZeroes => REQ_FUA | REQ_NO_UNMAP | REQ_NO_FALLBACK,
            _ => 0,
        };
        let keep = op == IoOp::WriteZeroes && flags & REQ_NO_UNMAP != 0;
        self.checked(
            (start, len, flags, allowed, true),
            user_data,
            |lba, blocks| {
                let r = IoRequest::no_data(op, lba, blocks, 0);
                if keep {
                    r.with_no_unmap()
                } else {
                    r
                }
            },
        );
    }

    pub fn flush(&mut self, user_data: usize, flags: u32) {
        if flags != 0 {
            return self.fail_now(user_data, libc::EINVAL);
        }
        self.submit(IoRequest::no_data(IoOp::Flush, 0, 0, 0), user_data, false);
    }

    /// A request this library does not do (zoned storage): it completes with -ENOTSUP.
    pub fn unsupported(&mut self, user_data: usize) {
        self.fail_now(user_data, libc::ENOTSUP);
    }

    /// Reap what the device finished into `ready` (FUA writes go on to their flush).
    fn reap(&mut self) -> usize {
        let mut scratch = std::mem::take(&mut self.scratch);
        // Taken as the channel matches them: nothing is copied but the slot and result.
        self.ch.poll_with(|c| {
            let ret = match &c.result {
                Ok(()) => 0,
                Err(e) => -errno_of_io(e),
            };
            scratch.push((c.user_data as u32, ret));
        });
        let mut n = 0;
        for (slot, ret) in scratch.drain(..) {
            let Some(s) = self.slots.get(slot as usize).copied() else {
                continue;
            };
            if ret == 0 && s.then_flush {
                // The write is done; its FUA is a flush that completes it.
                self.slots[slot as usize].then_flush = false;
                let mut req = IoRequest::no_data(IoOp::Flush, 0, 0, 0);
                req.user_data = slot as u64;
                match self.ch.submit(req) {
                    Ok(()) => continue,
                    Err(rej) => {
                        self.in_flight -= 1;
                        self.free.push(slot);
                        self.ready.push_back(Done {
                            user_data: s.user_data,
                            ret: -errno_of_io(&rej.error),
                        });
                        n += 1;
                        continue;
                    }
                }
            }
            self.in_flight -= 1;
            self.free.push(slot);
            self.ready.push_back(Done {
                user_data: s.user_data,
                ret,
            });
            n += 1;
        }
        self.scratch = scratch;
        n
    }

    /// `blkioq_do_io`: submit, then gather at least `min` completions (at most `max`)
    /// into `out`, waiting at most `timeout` (updated with the time left).
    pub fn do_io(
        &mut self,
        min: usize,
        max: usize,
        timeout: Option<&mut Duration>,
        wait: Wait<'_>,
        mut emit: impl FnMut(usize, Done),
    ) -> Res<usize> {
        if min > max {
            return Err(invalid(format!(
                "min_completions {min} is above max_completions {max}"
            )));
        }
        if matches!(wait, Wait::Interruptible(_)) && self.poll {
            return Err(Fail::new(
                libc::ENOTSUP,
                "blkioq_do_io_interruptible is not supported on poll queues",
            ));
        }
        if min > self.ready.len() + self.in_flight {
            return Err(invalid(format!(
                "min_completions {min} is above the {} requests outstanding",
                self.ready.len() + self.in_flight
            )));
        }
        let start = Instant::now();
        let limit = timeout.as_deref().copied();
        let result = self.gather(min, limit, start, &wait);
        if let Some(t) = timeout {
            *t = t.saturating_sub(start.elapsed());
        }
        result?;
        let n = self.ready.len().min(max);
        for i in 0..n {
            if let Some(d) = self.ready.pop_front() {
                emit(i, d);
            }
        }
        if self.fd_enabled && !self.poll {
            if !self.ready.is_empty() {
                // Completions beyond max_completions wait: do_io has work now.
                self.signal_caller();
            } else if self.in_flight > 0 {
                self.arm_for_caller();
            }
        }
        Ok(n)
    }

    fn gather(
        &mut self,
        min: usize,
        limit: Option<Duration>,
        start: Instant,
        wait: &Wait<'_>,
    ) -> Res<()> {
        self.reap();
        while self.ready.len() < min {
            let left = match limit {
                Some(l) => match l.checked_sub(start.elapsed()) {
                    Some(d) if !d.is_zero() => Some(d),
                    _ => return Err(Fail::new(libc::ETIME, "the timeout passed")),
                },
                None => None,
            };
            if self.poll {
                std::hint::spin_loop();
                self.reap();
                continue;
            }
            match self.ch.arm() {
                Armed::Ready => {}
                // At most NAP at a time, whatever the caller's timeout: a back-end that
                // hangs up, or a request whose deadline passes, signals nothing, and
                // the next arm is what notices.
                Armed::Fd(fd) => self.sleep_on(fd, Some(left.map_or(NAP, |l| l.min(NAP))), wait)?,
                Armed::NoFd => std::thread::sleep(Duration::from_micros(20)),
            }
            self.reap();
        }
        Ok(())
    }

    /// Sleep until `fd` is readable, `left` passes or (interruptible) a signal comes.
    fn sleep_on(&self, fd: i32, left: Option<Duration>, wait: &Wait<'_>) -> Res<()> {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = left.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        let sig = match wait {
            Wait::Interruptible(Some(s)) => *s as *const libc::sigset_t,
            _ => std::ptr::null(),
        };
        // SAFETY: one valid pollfd; `ts_ptr` and `sig` are null or point at live values.
        let r = unsafe { libc::ppoll(&mut pfd, 1, ts_ptr, sig) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) && matches!(wait, Wait::Interruptible(_)) {
                return Err(Fail::new(libc::EINTR, "interrupted by a signal"));
            }
        } else if r > 0 {
            // Consume the signal: the next arm asks for a new one.
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into a u64 from a non-blocking eventfd.
            let _ = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        }
        Ok(())
    }

    /// Ask the device to signal the completion fd when something completes; signal it
    /// now if something already did.
    fn arm_for_caller(&mut self) {
        match self.ch.arm() {
            Armed::Ready => self.signal_caller(),
            // No signal can be asked for (the connection failed, a request failed
            // before reaching the device): a caller blocked on the fd must still come
            // back for what is outstanding.
            Armed::NoFd if self.ch.in_flight() > 0 => self.signal_caller(),
            _ => {}
        }
    }

    /// Make the completion fd readable.
    fn signal_caller(&self) {
        if let Some(fd) = self.ch.completion_fd() {
            let one = 1u64;
            // SAFETY: writing 8 bytes from a u64 to an eventfd (never blocks: the count
            // is far from overflowing).
            let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
    }

    pub fn completion_fd(&self) -> i32 {
        if self.poll {
            return -1;
        }
        self.ch.completion_fd().unwrap_or(-1)
    }

    pub fn set_completion_fd_enabled(&mut self, on: bool) {
        if self.poll {
            return;
        }
        self.fd_enabled = on;
        if on && self.in_flight > 0 {
            self.arm_for_caller();
        }
    }

    /// Requests queued and not yet handed out.
    pub fn outstanding(&self) -> usize {
        self.ready.len() + self.in_flight
    }
}

/// A queue owned by its instance and reached by the caller through a raw pointer
/// (`struct blkioq *`): the instance never forms a reference to it, so a thread using
/// the queue and a thread reading the instance's properties do not alias.
pub struct QueueBox(NonNull<Queue>);

// SAFETY: the queue is Send (its channel is a MovableChannel); the box owns it alone.
unsafe impl Send for QueueBox {}

impl QueueBox {
    pub fn new(q: Queue) -> QueueBox {
        QueueBox(NonNull::from(Box::leak(Box::new(q))))
    }

    /// The `struct blkioq *` the caller uses.
    pub fn as_ptr(&self) -> *mut Queue {
        self.0.as_ptr()
    }
}

impl Drop for QueueBox {
    fn drop(&mut self) {
        // SAFETY: the pointer came from Box::leak in `new` and is freed once, here; the
        // caller's pointer is invalid from now on (blkio_remove_queue, blkio_destroy).
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // The caller's buffers must not be touched once the queue is gone: wait (briefly)
        // for what the device holds, then abandon the rest.
        let until = Instant::now() + Duration::from_secs(5);
        while self.in_flight > 0 && Instant::now() < until {
            self.reap();
            std::thread::yield_now();
        }
    }
}
