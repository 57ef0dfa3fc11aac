//! How a queue tells the device that new requests are available.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// The doorbell of a queue.
#[derive(Debug, Clone)]
pub enum Notifier {
    /// vhost-user: write to the queue's kick eventfd.
    EventFd(Arc<EventFd>),
    /// For tests: count notifications.
    Counter(Arc<AtomicU64>),
}

impl Notifier {
    /// Ring the doorbell of queue `index`.
    #[inline]
    pub fn notify(&self, _index: u16) -> Result<()> {
        match self {
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
