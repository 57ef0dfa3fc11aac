//! Whether a controller can still be trusted, shared by its channels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A controller's health: the transport's "peer is gone" flag and the driver's own
/// verdict after the device broke the protocol.
#[derive(Debug)]
pub struct Health {
    name: String,
    /// The current transport's flag (a reconnection installs the new one's).
    broken: Mutex<Arc<AtomicBool>>,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl Health {
    /// Health of controller `name` whose transport raises `broken` on hang-up.
    pub fn new(name: &str, broken: Arc<AtomicBool>) -> Health {
        Health {
            name: name.to_string(),
            broken: Mutex::new(broken),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    /// The device broke the protocol: never trust it again. The first reason is kept.
    pub fn fail(&self, why: &str) {
        self.failed.store(true, Ordering::Release);
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            tracing::error!(controller = %self.name, "controller failed: {why}");
            *f = Some(why.to_string());
        }
    }

    /// Whether the driver gave up on the device.
    #[inline]
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether the current connection is gone (the control path's check; request
    /// queues hold the flag itself).
    pub fn is_broken(&self) -> bool {
        self.broken_arc().load(Ordering::Relaxed)
    }

    /// The current transport's hang-up flag, shared (for request queues).
    pub fn broken_arc(&self) -> Arc<AtomicBool> {
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A reconnection brought up a new transport with this flag.
    pub fn set_broken_flag(&self, flag: Arc<AtomicBool>) {
        *self.broken.lock().unwrap_or_else(|e| e.into_inner()) = flag;
    }

    /// Why the controller is unusable, if it is.
    pub fn failure(&self) -> Option<String> {
        let f = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if f.is_some() {
            return f;
        }
        if self.is_broken() {
            return Some(
                "the back-end closed the connection or the PCI function was removed".into(),
            );
        }
        None
    }
}
