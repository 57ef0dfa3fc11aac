//! A controller's request queues, lent to I/O channels one at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use vireo_virtio::Virtqueue;

use crate::error::BdevError;

/// The request queues not held by a channel, and how many channels are open.
#[derive(Debug)]
pub struct QueuePool {
    free: Mutex<Vec<Virtqueue>>,
    total: usize,
    open: AtomicU64,
    /// Queues lent to the control path right now.
    borrowed: AtomicU64,
    /// The controller is being stopped: no channel may open any more.
    closing: AtomicBool,
}

impl QueuePool {
    /// A pool of `queues`; the first one is lent first.
    pub fn new(mut queues: Vec<Virtqueue>) -> QueuePool {
        queues.reverse();
        QueuePool {
            total: queues.len(),
            free: Mutex::new(queues),
            open: AtomicU64::new(0),
            borrowed: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Virtqueue>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free queue, if any.
    pub fn take(&self) -> Option<Virtqueue> {
        self.lock().pop()
    }

    /// A free queue, or the error that tells the user to raise `vq_count`. A queue the
    /// control path has borrowed (a rescan after a hot-plug event) is waited for, a
    /// few seconds at most: that borrow is short and not the user's doing.
    pub fn take_for(&self, bdev: &str) -> Result<Virtqueue, BdevError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Some(q) = self.take() {
                return Ok(q);
            }
            if self.borrowed.load(Ordering::Acquire) == 0 || std::time::Instant::now() > deadline {
                return Err(BdevError::NoFreeQueue {
                    bdev: bdev.to_string(),
                    queues: self.total,
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// A free queue for a short control-path job, given back with
    /// [`give_borrowed`](Self::give_borrowed) (or kept from reuse if the device may still
    /// use it, with [`lost_borrowed`](Self::lost_borrowed)).
    pub fn borrow(&self) -> Option<Virtqueue> {
        let mut free = self.lock();
        let q = free.pop()?;
        self.borrowed.fetch_add(1, Ordering::AcqRel);
        Some(q)
    }

    /// Return a borrowed queue.
    pub fn give_borrowed(&self, q: Virtqueue) {
        self.lock().push(q);
        self.borrowed.fetch_sub(1, Ordering::AcqRel);
    }

    /// A borrowed queue will not come back (the device may still use it).
    pub fn lost_borrowed(&self) {
        self.borrowed.fetch_sub(1, Ordering::AcqRel);
    }

    /// Give a queue back (only when the device no longer uses it).
    pub fn give(&self, q: Virtqueue) {
        self.lock().push(q);
    }

    /// A channel opens: false (and nothing counted) once the controller is stopping.
    /// With [`check_idle`](Self::check_idle) a Dekker pair: the count goes up before the
    /// flag is read, the flag up before the count is read, so a channel opening while
    /// the controller stops is either counted by the stop (which is then refused) or
    /// refused itself; never both missed.
    #[must_use]
    pub fn opened(&self) -> bool {
        self.open.fetch_add(1, Ordering::SeqCst);
        if self.closing.load(Ordering::SeqCst) {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// A channel was closed.
    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }

    /// Channels currently open.
    pub fn open_channels(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }

    /// Controller `name` stops: from now on no channel opens. Refused (and nothing
    /// changed) while channels are open.
    pub fn check_idle(&self, name: &str) -> Result<(), BdevError> {
        self.closing.store(true, Ordering::SeqCst);
        match self.open.load(Ordering::SeqCst) {
            0 => Ok(()),
            open => {
                self.closing.store(false, Ordering::SeqCst);
                Err(BdevError::ControllerBusy {
                    name: name.to_string(),
                    open,
                })
            }
        }
    }
}

/// Request queues a controller attached with `vq_count` 0 ("every queue the device
/// offers") takes at most.
pub const MAX_ALL_QUEUES: u16 = 256;

/// Check the queue parameters of controller `name` before talking to its device.
/// A queue size is a power of two of at least 4.
pub fn check_queue_size(name: &str, vq_size: u16) -> Result<(), BdevError> {
    if !vq_size.is_power_of_two() || vq_size < 4 {
        return Err(BdevError::Config(format!(
            "controller {name}: vq_size {vq_size} must be a power of two of at least 4"
        )));
    }
    Ok(())
}

pub fn check_queue_params(name: &str, vq_count: u16, vq_size: u16) -> Result<(), BdevError> {
    check_queue_size(name, vq_size)?;
    if vq_count == 0 {
        return Err(BdevError::Config(format!(
            "controller {name}: vq_count must be at least 1"
        )));
    }
    Ok(())
}
