//! How a queue tells the device that new requests are available.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// A device doorbell that is not an eventfd (a virtio-pci notification register).
pub trait Kick: Send + Sync + std::fmt::Debug {
    /// Tell the device that queue `index` has new requests.
    fn kick(&self, index: u16) -> Result<()>;
}

/// The doorbell of a queue.
#[derive(Debug, Clone)]
pub enum Notifier {
    /// virtio-pci: write the queue index to its notification register.
    Kick(Arc<dyn Kick>),
    /// vhost-user: write to the queue's kick eventfd.
    EventFd(Arc<EventFd>),
    /// For tests: count notifications.
    Counter(Arc<AtomicU64>),
}

impl Notifier {
    /// Ring the doorbell of queue `index`.
    #[inline]
    pub fn notify(&self, index: u16) -> Result<()> {
        match self {
            Notifier::Kick(k) => k.kick(index),
            Notifier::EventFd(fd) => fd
                .write(1)
                .map_err(|e| Error::io("cannot kick the device (eventfd write)", e)),
            Notifier::Counter(c) => {
                c.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }
}

/// Whether `fd` is readable now (a poll that does not wait).
pub fn is_readable(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; poll only writes `revents`.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// Sleep until one of `fds` is readable or `timeout` passes; returns whether one is.
/// (For completion eventfds: the caller consumes the signal.)
pub fn wait_readable(fds: &[std::os::fd::RawFd], timeout: std::time::Duration) -> bool {
    if fds.is_empty() {
        std::thread::sleep(timeout);
        return false;
    }
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as i32;
    // SAFETY: `p` is a valid array of `p.len()` pollfd structs for the duration of the
    // call; poll only writes their `revents`.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms.max(1)) };
    n > 0
}
