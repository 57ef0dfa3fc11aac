//! Async I/O on a channel: futures that resolve when their I/O completes.
//!
//! An [`AsyncChannel`] wraps one [`IoChannel`] (so it stays on the thread that opened
//! it: a thread-per-core design, `!Send`). Submitting returns an [`IoFuture`]; the
//! futures do not poll the device themselves: a *driver* reaps completions and wakes
//! them. Two drivers:
//! - [`AsyncChannel::drive_polling`]: a task that polls the ring, yields, and polls
//!   again: lowest latency, one busy core (any executor, e.g. a thread-per-core one);
//! - an event loop's own: call [`AsyncChannel::arm`], wait until the returned eventfd is
//!   readable (tokio's `AsyncFd`, epoll, io_uring), then [`AsyncChannel::reap`]
//!   (`examples/async_verify.rs` does this with tokio).
//!
//! No executor is a dependency of this crate.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::channel::{Armed, IoChannel};
use crate::io::{Completion, IoBuf, IoOp, IoRequest};

struct Inner {
    ch: IoChannel,
    next_id: u64,
    done: HashMap<u64, Completion>,
    wakers: HashMap<u64, Waker>,
    /// Futures dropped before their I/O finished: their completions are discarded.
    forgotten: std::collections::HashSet<u64>,
    /// The polling driver, parked while nothing is in flight.
    driver: Option<Waker>,
    scratch: Vec<Completion>,
}

/// An I/O channel with an async interface (see the module documentation).
#[derive(Clone)]
pub struct AsyncChannel {
    inner: Rc<RefCell<Inner>>,
}

impl std::fmt::Debug for AsyncChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncChannel").finish_non_exhaustive()
    }
}

impl AsyncChannel {
    /// Wrap a channel.
    pub fn new(ch: IoChannel) -> AsyncChannel {
        AsyncChannel {
            inner: Rc::new(RefCell::new(Inner {
                ch,
                next_id: 1,
                done: HashMap::new(),
                wakers: HashMap::new(),
                forgotten: std::collections::HashSet::new(),
                driver: None,
                scratch: Vec::new(),
            })),
        }
    }

    /// Submit `req` (its `user_data` is replaced); the future resolves to its
    /// completion. A request refused at submit resolves at once with the error.
    pub fn submit(&self, mut req: IoRequest) -> IoFuture {
        let mut i = self.inner.borrow_mut();
        let id = i.next_id;
        i.next_id += 1;
        req.user_data = id;
        let op = req.op;
        if let Err(r) = i.ch.submit(req) {
            i.done.insert(
                id,
                Completion {
                    user_data: id,
                    op,
                    result: Err(r.error),
                    buf: r.buf,
                    iov: r.iov,
                    latency_ns: 0,
                },
            );
        } else {
            // Make it visible to the device now; a parked driver has work again.
            i.ch.publish();
            if let Some(w) = i.driver.take() {
                drop(i);
                w.wake();
            }
        }
        IoFuture {
            ch: self.clone(),
            id,
        }
    }

    /// Read `num_blocks` blocks at `lba` into `buf`.
    pub fn read(&self, lba: u64, num_blocks: u64, buf: IoBuf) -> IoFuture {
        self.submit(IoRequest::read(lba, num_blocks, buf, 0))
    }

    /// Write `buf` to `num_blocks` blocks at `lba`.
    pub fn write(&self, lba: u64, num_blocks: u64, buf: IoBuf) -> IoFuture {
        self.submit(IoRequest::write(lba, num_blocks, buf, 0))
    }

    /// Flush the device's volatile cache.
    pub fn flush(&self) -> IoFuture {
        self.submit(IoRequest::no_data(IoOp::Flush, 0, 0, 0))
    }

    /// Unmap (discard) blocks.
    pub fn unmap(&self, lba: u64, num_blocks: u64) -> IoFuture {
        self.submit(IoRequest::no_data(IoOp::Unmap, lba, num_blocks, 0))
    }

    /// Write zeroes to blocks.
    pub fn write_zeroes(&self, lba: u64, num_blocks: u64) -> IoFuture {
        self.submit(IoRequest::no_data(IoOp::WriteZeroes, lba, num_blocks, 0))
    }

    /// Reap finished I/O and wake their futures; returns how many finished.
    pub fn reap(&self) -> usize {
        let mut i = self.inner.borrow_mut();
        let mut out = std::mem::take(&mut i.scratch);
        let n = i.ch.poll(&mut out);
        let mut wake = Vec::new();
        for c in out.drain(..) {
            let id = c.user_data;
            if i.forgotten.remove(&id) {
                continue;
            }
            i.done.insert(id, c);
            if let Some(w) = i.wakers.remove(&id) {
                wake.push(w);
            }
        }
        i.scratch = out;
        drop(i);
        // Woken outside the borrow: a waker may poll right away (on this thread).
        for w in wake {
            w.wake();
        }
        n
    }

    /// I/O submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.inner.borrow().ch.in_flight()
    }

    /// For an event loop: ask for a signal on the next completion. Wait for the fd of
    /// [`Armed::Fd`] to be readable, then [`reap`](Self::reap); [`Armed::Ready`]: reap
    /// now; [`Armed::NoFd`]: poll (the transport has no completion eventfd, or nothing
    /// is in flight).
    pub fn arm(&self) -> Armed {
        self.inner.borrow_mut().ch.arm()
    }

    /// A task that reaps completions by polling until the channel is dropped: spawn it
    /// beside the I/O tasks on a thread-per-core executor. It parks while nothing is in
    /// flight and is woken by the next submit.
    pub fn drive_polling(&self) -> DrivePolling {
        DrivePolling { ch: self.clone() }
    }
}

impl Drop for AsyncChannel {
    fn drop(&mut self) {
        // The last handle besides a parked polling driver: wake the driver so it sees it
        // is alone and ends (closing the channel), instead of holding the queue forever.
        if Rc::strong_count(&self.inner) == 2 {
            let w = self
                .inner
                .try_borrow_mut()
                .ok()
                .and_then(|mut i| i.driver.take());
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

/// The future of one I/O: resolves to its [`Completion`].
#[must_use = "an I/O future does nothing unless awaited (the I/O itself is already submitted)"]
#[derive(Debug)]
pub struct IoFuture {
    ch: AsyncChannel,
    id: u64,
}

impl Future for IoFuture {
    type Output = Completion;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion> {
        let mut i = self.ch.inner.borrow_mut();
        if let Some(c) = i.done.remove(&self.id) {
            return Poll::Ready(c);
        }
        i.wakers.insert(self.id, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for IoFuture {
    fn drop(&mut self) {
        // A dropped future's I/O still completes on the device; forget its result.
        if let Ok(mut i) = self.ch.inner.try_borrow_mut() {
            i.wakers.remove(&self.id);
            if i.done.remove(&self.id).is_none() {
                i.forgotten.insert(self.id);
            }
        }
    }
}

/// See [`AsyncChannel::drive_polling`].
#[must_use = "the driver does nothing unless spawned or awaited"]
#[derive(Debug)]
pub struct DrivePolling {
    ch: AsyncChannel,
}

impl Future for DrivePolling {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.ch.reap();
        let mut i = self.ch.inner.borrow_mut();
        if Rc::strong_count(&self.ch.inner) == 1 {
            return Poll::Ready(());
        }
        if i.ch.in_flight() == 0 {
            i.driver = Some(cx.waker().clone());
        } else {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}
