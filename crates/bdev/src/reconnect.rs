//! Reconnection (`reconnect_timeout`): when a vhost-user back-end goes away, the
//! controller's I/O waits while a thread of its own connects again and renegotiates
//! (the features and the geometry must match). Then, one of two ways:
//! - the back-end tracks in-flight requests (`INFLIGHT_SHMFD`, virtio-blk): the same
//!   rings are handed to the new connection with the tracking buffer, the back-end sends
//!   again what it had taken and not completed, and each channel goes on with its ring
//!   (new doorbell and completion eventfd);
//! - otherwise (or when vireo dropped the connection itself, the old back-end maybe still
//!   alive): fresh rings; each channel takes its queue's new ring and resubmits, from its
//!   own records, every request the old connection had not completed (or fails them as
//!   aborted after a forced reconnection). Rings of the old connection are never reused:
//!   a channel's ring that had requests on it is leaked; an idle one is freed.
//!
//! Past the window, the waiting I/O fails.
//!
//! The I/O path only reads the transport's broken flag, as without reconnection; the
//! link is looked at (under its lock) once a channel's queue has failed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use vireo_virtio::{Notifier, Reopen, Transport, Virtqueue};
use vmm_sys_util::eventfd::EventFd;

use crate::health::Health;
use crate::pool::QueuePool;

/// How often the reconnection thread looks at the broken flag.
const WATCH_PERIOD: Duration = Duration::from_millis(10);
/// Longest pause between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Bound of one attempt's control-message replies.
const ATTEMPT_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why one reconnection attempt failed.
#[derive(Debug)]
pub(crate) enum ReconnectError {
    /// Worth another attempt (no socket yet, the back-end hung up again).
    Transient(String),
    /// The device came back different (features, block size): give up at once.
    Permanent(String),
}

/// A queue's ring after a reconnection. (Moved a few times per reconnection, never on
/// the I/O path: the size difference of the variants does not matter.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum NewRing {
    /// A new ring; the old connection's requests are resent from the channel's records,
    /// or failed as aborted (`aborted`: vireo dropped the connection itself).
    Fresh { ring: Virtqueue, aborted: bool },
    /// The same ring, served by the new connection, which resends what the old one had
    /// in flight: the channel goes on with this doorbell and completion eventfd.
    Kept {
        index: u16,
        notifier: Notifier,
        signal: Option<Arc<EventFd>>,
    },
}

impl std::fmt::Debug for NewRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NewRing::Fresh { ring, aborted } => f
                .debug_struct("Fresh")
                .field("index", &ring.index())
                .field("aborted", aborted)
                .finish(),
            NewRing::Kept { index, .. } => f.debug_struct("Kept").field("index", index).finish(),
        }
    }
}

impl NewRing {
    fn index(&self) -> u16 {
        match self {
            NewRing::Fresh { ring, .. } => ring.index(),
            NewRing::Kept { index, .. } => *index,
        }
    }
}

/// What one reconnection attempt knows.
pub(crate) struct ReconnectCtx {
    /// Vireo dropped the connection (the old back-end may be alive): fresh rings, and
    /// the requests it held fail as aborted.
    pub forced: bool,
    /// Rings are kept (the back-end tracks in-flight requests).
    pub keep: bool,
    /// Idle rings of the pool to hand to the new connection too (when keeping rings).
    pub parked: Vec<Virtqueue>,
    /// Queues whose ring was lost with a channel during the outage (not set up again).
    pub lost: Vec<u16>,
}

/// Brings the device up again on a new transport as it was (features, queues).
pub(crate) trait Reconnect: Send {
    /// Whether rings are kept across reconnections (in-flight tracking).
    fn keeps_rings(&self) -> bool {
        false
    }
    /// One attempt; returns every queue's ring (parked ones included).
    fn run(
        &mut self,
        t: &mut dyn Transport,
        ctx: &mut ReconnectCtx,
    ) -> Result<Vec<NewRing>, ReconnectError>;
}

/// What a channel whose queue lost its connection should do now.
pub(crate) enum ReconnectStatus {
    /// The connection is not back yet: keep the requests.
    Waiting,
    /// Back (generation, the queue's ring).
    Ready(u64, Box<NewRing>),
    /// Reconnection failed: fail the requests with this reason (as aborted if the
    /// outage was forced: the old back-end may still hold them).
    Failed(String, bool),
}

/// A controller's reconnection state, shared by its channels and its reconnection
/// thread.
pub(crate) struct Link {
    name: String,
    window: Duration,
    /// Bumped by every successful reconnection (under the state lock, with the new
    /// broken flag installed in the controller's health).
    generation: AtomicU64,
    failed: AtomicBool,
    /// The controller is going away: the thread ends.
    stop: AtomicBool,
    /// The device is brought back in place (PCI reset), not reconnected.
    in_place: AtomicBool,
    st: Mutex<LinkState>,
    /// The controller's transport, for [`Link::force`].
    transport: std::sync::OnceLock<Weak<Mutex<Box<dyn Transport>>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.name)
            .field("window", &self.window)
            .field("generation", &self.generation())
            .finish()
    }
}

#[derive(Debug, Default)]
struct LinkState {
    /// Rings of the new connection not yet taken by their channel, by queue index.
    fresh: Vec<Option<NewRing>>,
    /// Queue indices whose new ring goes to the pool (no channel holds the old one).
    to_pool: Vec<u16>,
    /// Idle rings given back while their connection was gone: kept (never freed: a
    /// new connection may be handed them) until a connection says what becomes of them.
    late: Vec<Virtqueue>,
    /// Queues lost for good: closed with requests on a ring the new connection kept.
    dead: Vec<u16>,
    reconnecting: bool,
    failure: Option<String>,
    /// The outage that failed was forced (requests fail as aborted).
    failed_forced: bool,
    /// The current outage is vireo's doing (a device that stopped answering): the old
    /// back-end may still be alive, so its requests are not sent again.
    forced: bool,
    reconnects: u64,
}

impl Link {
    /// The link of controller `name`; `window` zero: no reconnection.
    pub(crate) fn new(name: &str, window: Option<Duration>) -> Arc<Link> {
        Arc::new(Link {
            name: name.to_string(),
            window: window.unwrap_or_default(),
            generation: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            in_place: AtomicBool::new(false),
            st: Mutex::new(LinkState::default()),
            transport: std::sync::OnceLock::new(),
            thread: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The controller has a reconnection window (`reconnect_timeout`), whether or not
    /// a reconnection has failed since.
    pub(crate) fn configured(&self) -> bool {
        !self.window.is_zero()
    }

    /// Reconnection is on.
    pub(crate) fn enabled(&self) -> bool {
        !self.window.is_zero() && !self.failed.load(Ordering::Acquire)
    }

    /// The current generation (a channel's rings belong to one).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Successful reconnections so far.
    pub(crate) fn reconnects(&self) -> u64 {
        self.lock().reconnects
    }

    /// What a new channel on `ring` goes by: the ring's generation and the broken flag
    /// it must watch (the current connection's, read together with the generation; a
    /// raised one for a ring of an earlier connection, which the channel then gives up
    /// for its new ring at once).
    pub(crate) fn bind(&self, ring: &Virtqueue, health: &Health) -> (u64, Arc<AtomicBool>) {
        let _st = self.lock();
        let current = self.generation();
        if ring.tag() == current {
            (current, health.broken_arc())
        } else {
            (ring.tag(), Arc::new(AtomicBool::new(true)))
        }
    }

    /// A channel on generation `gen` whose ring `index` lost its connection asks what
    /// to do.
    pub(crate) fn check(&self, gen: u64, index: u16) -> ReconnectStatus {
        if self.failed.load(Ordering::Acquire) {
            let st = self.lock();
            return ReconnectStatus::Failed(
                st.failure
                    .clone()
                    .unwrap_or_else(|| "reconnection failed".into()),
                st.failed_forced,
            );
        }
        if self.generation() == gen {
            return ReconnectStatus::Waiting;
        }
        let mut st = self.lock();
        let g = self.generation();
        match st.fresh.get_mut(index as usize).and_then(Option::take) {
            Some(r) => ReconnectStatus::Ready(g, Box::new(r)),
            None => ReconnectStatus::Waiting,
        }
    }

    /// A channel whose ring `index` lost its connection closes with requests on it (its
    /// ring is leaked): the queue's new ring goes to the pool (now, or when it exists).
    pub(crate) fn release(&self, index: u16, pool: &QueuePool) {
        let mut st = self.lock();
        match st.fresh.get_mut(index as usize).and_then(Option::take) {
            Some(NewRing::Fresh { ring, .. }) => pool.give(ring),
            Some(NewRing::Kept { .. }) => {
                // The new connection serves the leaked ring: the queue is lost.
                tracing::warn!(controller = %self.name, "queue {index} was closed with requests in flight during a reconnection; it is not used again until the controller is attached again");
                st.dead.push(index);
            }
            None => st.to_pool.push(index),
        }
    }

    /// A channel closes with its ring idle: back to the pool if the ring belongs to the
    /// current connection (`lost`: its connection's flag is up); otherwise the queue's
    /// ring of the new connection goes there (or this one, if the new connection kept
    /// it), or the ring waits for the next connection (never freed before).
    pub(crate) fn give_back(&self, mut ring: Virtqueue, lost: bool, pool: &QueuePool) {
        let index = ring.index();
        let mut st = self.lock();
        let current = self.generation();
        if !lost && !st.reconnecting && ring.tag() == current {
            pool.give(ring);
            return;
        }
        match st.fresh.get_mut(index as usize).and_then(Option::take) {
            Some(NewRing::Fresh { ring: new, .. }) => {
                // Idle: nothing of the old ring is on any device.
                drop(ring);
                pool.give(new);
            }
            Some(NewRing::Kept {
                notifier, signal, ..
            }) => {
                ring.set_notifier(notifier);
                ring.set_completion_signal(signal);
                ring.set_tag(current);
                pool.give(ring);
            }
            None => st.late.push(ring),
        }
    }

    /// Wait (at most the window) while a reconnection is under way; for control-path
    /// callers such as opening a channel.
    pub(crate) fn wait_reconnected(&self) {
        if self.window.is_zero() {
            return;
        }
        let deadline = Instant::now() + self.window;
        while self.lock().reconnecting
            && !self.failed.load(Ordering::Acquire)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Vireo gives up on a device that stopped answering on connection `generation`:
    /// drop the connection (PCI: reset the device), and the controller comes back; its
    /// outstanding requests fail with [`IoError::Aborted`](crate::IoError::Aborted),
    /// since the old back-end may still be working on them. Nothing is done when that
    /// connection is already gone or being replaced. Needs reconnection (without it, the
    /// controller would be gone for good).
    pub(crate) fn force(&self, generation: u64) -> Result<(), crate::IoError> {
        let unsupported = |why: &str| crate::IoError::Unsupported {
            op: "controller reset",
            bdev: format!("{} ({why})", self.name),
        };
        if !self.enabled() {
            return Err(unsupported("it needs reconnect_timeout"));
        }
        let Some(t) = self.transport.get().and_then(Weak::upgrade) else {
            return Err(unsupported("the transport cannot reconnect"));
        };
        {
            let mut st = self.lock();
            if st.reconnecting || st.forced || self.generation() != generation {
                return Ok(());
            }
            st.forced = true;
        }
        t.lock().unwrap_or_else(|e| e.into_inner()).abort();
        Ok(())
    }

    /// The controller is going away: the thread ends (joined; an attempt under way is
    /// bounded by its reply timeout).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let h = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    /// For tests: as after a successful reconnection, the next generation, a new
    /// broken flag, and `r` as queue `index`'s ring.
    #[cfg(test)]
    pub(crate) fn pretend_reconnected(&self, health: &Health, index: u16, r: NewRing) {
        let mut st = self.lock();
        st.fresh.resize_with(index as usize + 1, || None);
        st.fresh[index as usize] = Some(r);
        health.set_broken_flag(Arc::new(AtomicBool::new(false)));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// For tests: reconnection gives up with `why`.
    #[cfg(test)]
    pub(crate) fn pretend_given_up(&self, health: &Health, why: &str) {
        self.give_up(health, why.to_string());
    }

    fn give_up(&self, health: &Health, why: String) {
        let why = if self.in_place.load(Ordering::Acquire) {
            format!(
                "controller {}: the device could not be brought back within {:.1} s: {why}",
                self.name,
                self.window.as_secs_f64()
            )
        } else {
            format!(
                "controller {}: the back-end went away and vireo could not reconnect within reconnect_timeout ({:.1} s): {why}",
                self.name,
                self.window.as_secs_f64()
            )
        };
        tracing::error!("{why}");
        {
            let mut st = self.lock();
            st.failure = Some(why.clone());
            st.failed_forced = st.forced;
            st.reconnecting = false;
        }
        health.fail(&why);
        self.failed.store(true, Ordering::Release);
    }
}

/// What the reconnection thread needs of its controller.
pub(crate) struct ControllerHandle {
    pub link: Arc<Link>,
    pub transport: Arc<Mutex<Box<dyn Transport>>>,
    pub shared: Weak<dyn ControllerShared>,
}

/// A controller's state shared by its channels and its reconnection thread.
pub(crate) trait ControllerShared: Send + Sync {
    /// The controller's health, its pool of free request queues and its reconnection
    /// state.
    fn parts(&self) -> (&Health, &QueuePool, &Link);
    /// Whether the controller failed, and its transport's broken flag.
    fn health(&self) -> &Health {
        self.parts().0
    }
    /// Request queues no channel holds.
    fn pool(&self) -> &QueuePool {
        self.parts().1
    }
    /// Reconnection state.
    fn link(&self) -> &Link {
        self.parts().2
    }
}

/// Start controller `name`'s reconnection thread (see [`spawn`]), as attach does.
pub(crate) fn start<S: ControllerShared + 'static>(
    name: &str,
    link: &Arc<Link>,
    shared: &Arc<S>,
    transport: &Arc<Mutex<Box<dyn Transport>>>,
    bring_up: Box<dyn Reconnect>,
) -> Result<(), crate::BdevError> {
    let weak: Weak<dyn ControllerShared> = Arc::downgrade(shared) as _;
    spawn(
        ControllerHandle {
            link: link.clone(),
            transport: transport.clone(),
            shared: weak,
        },
        bring_up,
    )
    .map_err(|e| {
        crate::BdevError::Config(format!("{name}: cannot start the reconnection thread: {e}"))
    })
}

/// Negotiate `wanted` on a new connection: the device must accept exactly the
/// `features` it had (a different device is a permanent failure).
pub(crate) fn renegotiate(
    t: &mut dyn Transport,
    wanted: u64,
    features: u64,
) -> Result<u64, ReconnectError> {
    let got =
        vireo_virtio::negotiate(t, wanted).map_err(|e| ReconnectError::Transient(e.to_string()))?;
    if got != features {
        return Err(ReconnectError::Permanent(format!(
            "the device came back with features {got:#x}, not {features:#x} as before"
        )));
    }
    Ok(got)
}

/// The error of requests whose reconnection failed: aborted when the outage was a
/// reset vireo forced (the old back-end may still hold them; their buffers are never
/// reused), else the failure.
pub(crate) fn failed_error(why: String, forced: bool) -> crate::IoError {
    if forced {
        crate::IoError::Aborted(why)
    } else {
        crate::IoError::ReconnectFailed(why)
    }
}

/// Start the reconnection thread of a controller (only when reconnection is on and the
/// transport can reconnect).
pub(crate) fn spawn(
    host: ControllerHandle,
    mut bring_up: Box<dyn Reconnect>,
) -> std::io::Result<()> {
    let ControllerHandle {
        link,
        transport,
        shared: controller,
    } = host;
    if link.window.is_zero() {
        return Ok(());
    }
    let _ = link.transport.set(Arc::downgrade(&transport));
    // A new connection (vhost-user), or the same transport brought up again in place
    // (PCI: a device reset).
    let reopen = {
        let t = transport.lock().unwrap_or_else(|e| e.into_inner());
        match t.reopener() {
            Some(r) => Some(r),
            None if t.can_reinit() => None,
            None => return Ok(()),
        }
    };
    link.in_place.store(reopen.is_none(), Ordering::Release);
    let l = link.clone();
    let h = std::thread::Builder::new()
        .name(format!("reconnect-{}", link.name))
        .spawn(move || loop {
            if l.stop.load(Ordering::Acquire) {
                return;
            }
            let Some(shared) = controller.upgrade() else {
                return;
            };
            if shared.health().is_failed() {
                return;
            }
            if !shared.health().is_broken() {
                drop(shared);
                std::thread::sleep(WATCH_PERIOD);
                continue;
            }
            if !outage(&l, &transport, &*shared, reopen.as_ref(), &mut bring_up) {
                return;
            }
        })?;
    *link.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
    Ok(())
}

/// One outage: reconnect within the window. False when the controller is given up.
fn outage(
    link: &Link,
    transport: &Mutex<Box<dyn Transport>>,
    shared: &dyn ControllerShared,
    reopen: Option<&Reopen>,
    bring_up: &mut Box<dyn Reconnect>,
) -> bool {
    let started = Instant::now();
    let deadline = started + link.window;
    let mut ctx = {
        let mut st = link.lock();
        st.reconnecting = true;
        let forced = st.forced;
        let keep = !forced && bring_up.keeps_rings();
        // Idle rings of the pool (and given back since the connection went): kept for
        // the new connection, or replaced: freed when the back-end went away (nothing of
        // theirs is on any device), leaked when vireo cut it off (see below).
        let mut parked = Vec::new();
        let mut idle: Vec<Virtqueue> = std::mem::take(&mut st.late);
        while let Some(q) = shared.pool().take() {
            idle.push(q);
        }
        for q in idle {
            st.to_pool.push(q.index());
            if keep {
                parked.push(q);
            } else if forced {
                // vireo cut off a back-end that stopped answering: its queue threads
                // may still poll these rings, so their memory is never reused.
                q.leak();
            }
        }
        ReconnectCtx {
            forced,
            keep,
            parked,
            lost: Vec::new(),
        }
    };
    if link.in_place.load(Ordering::Acquire) {
        tracing::warn!(controller = %link.name, "bringing the device back after a reset");
    } else {
        tracing::warn!(controller = %link.name, "the back-end went away: reconnecting (reconnect_timeout {:.1} s)", link.window.as_secs_f64());
    }
    let mut backoff = Duration::from_millis(20);
    let mut attempts = 0u32;
    let mut last = String::from("no attempt finished");
    loop {
        if link.stop.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            link.give_up(
                shared.health(),
                format!("{attempts} attempts, the last: {last}"),
            );
            return false;
        }
        attempts += 1;
        let bound = (deadline - now).min(ATTEMPT_REPLY_TIMEOUT);
        ctx.lost = {
            let st = link.lock();
            st.to_pool
                .iter()
                .copied()
                .filter(|i| !ctx.parked.iter().any(|q| q.index() == *i))
                .chain(st.dead.iter().copied())
                .collect()
        };
        let attempt = match reopen {
            Some(reopen) => reopen(bound)
                .map_err(|e| ReconnectError::Transient(e.to_string()))
                .and_then(|mut t| {
                    bring_up
                        .run(t.as_mut(), &mut ctx)
                        .map(|rings| (Some(t), rings))
                }),
            None => {
                // In place: only a reset vireo forced brings the device back; one that
                // failed or went away by itself stays failed.
                let mut t = transport.lock().unwrap_or_else(|e| e.into_inner());
                if !ctx.forced {
                    Err(ReconnectError::Permanent(format!(
                        "{} failed or went away",
                        t.describe()
                    )))
                } else {
                    t.reinit()
                        .map_err(|e| ReconnectError::Permanent(e.to_string()))
                        .and_then(|()| bring_up.run(t.as_mut(), &mut ctx))
                        .map(|rings| (None, rings))
                }
            }
        };
        match attempt {
            Ok((t, rings)) => {
                if link.stop.load(Ordering::Acquire) {
                    // Detached meanwhile: the new connection is not installed.
                    drop(t);
                    return false;
                }
                let mut current = transport.lock().unwrap_or_else(|e| e.into_inner());
                let old = t.map(|t| std::mem::replace(&mut *current, t));
                let flag = current.broken_flag();
                drop(current);
                // The old transport goes (it stops nothing: its peer is gone).
                drop(old);
                let mut st = link.lock();
                let gen = link.generation() + 1;
                shared.health().set_broken_flag(flag);
                let n = rings
                    .iter()
                    .map(|r| r.index() as usize + 1)
                    .max()
                    .unwrap_or(0);
                if st.fresh.len() < n {
                    st.fresh.resize_with(n, || None);
                }
                for mut r in rings {
                    let i = r.index();
                    if let NewRing::Fresh { ring, .. } = &mut r {
                        ring.set_tag(gen);
                    }
                    if let Some(pos) = st.late.iter().position(|q| q.index() == i) {
                        // Given back idle during the attempt.
                        let mut late = st.late.swap_remove(pos);
                        match r {
                            NewRing::Fresh { ring, .. } => {
                                drop(late);
                                shared.pool().give(ring);
                            }
                            NewRing::Kept {
                                notifier, signal, ..
                            } => {
                                late.set_notifier(notifier);
                                late.set_completion_signal(signal);
                                late.set_tag(gen);
                                shared.pool().give(late);
                            }
                        }
                    } else if let (Some(pos), NewRing::Fresh { .. }) =
                        (st.dead.iter().position(|&x| x == i), &r)
                    {
                        // A queue lost earlier gets a new ring: usable again.
                        st.dead.swap_remove(pos);
                        if let NewRing::Fresh { ring, .. } = r {
                            shared.pool().give(ring);
                        }
                    } else if let Some(pos) = st.to_pool.iter().position(|&x| x == i) {
                        st.to_pool.swap_remove(pos);
                        match r {
                            NewRing::Fresh { ring, .. } => shared.pool().give(ring),
                            NewRing::Kept { .. } => {
                                tracing::warn!(controller = %link.name, "queue {i} was closed with requests in flight during a reconnection; it is not used again until the controller is attached again");
                                st.dead.push(i);
                            }
                        }
                    } else {
                        let slot = &mut st.fresh[i as usize];
                        *slot = match (slot.take(), r) {
                            // A fresh ring of an earlier reconnection its channel never
                            // took is what the new connection serves now.
                            (
                                Some(NewRing::Fresh { mut ring, aborted }),
                                NewRing::Kept {
                                    notifier, signal, ..
                                },
                            ) => {
                                ring.set_notifier(notifier);
                                ring.set_completion_signal(signal);
                                ring.set_tag(gen);
                                Some(NewRing::Fresh { ring, aborted })
                            }
                            // A newer fresh ring replaces an untaken one (idle, freed);
                            // requests of either forced outage still fail as aborted.
                            (
                                Some(NewRing::Fresh { aborted: a1, .. }),
                                NewRing::Fresh { ring, aborted: a2 },
                            ) => Some(NewRing::Fresh {
                                ring,
                                aborted: a1 || a2,
                            }),
                            (_, r) => Some(r),
                        };
                    }
                }
                // Queues that got no ring (lost in kept-ring mode) stay unused.
                let left: Vec<u16> = std::mem::take(&mut st.to_pool);
                for i in left {
                    if !st.dead.contains(&i) {
                        tracing::warn!(controller = %link.name, "queue {i} has no ring after the reconnection; it is not used again until the controller is attached again");
                        st.dead.push(i);
                    }
                }
                // Parked rings the attempt did not hand on (fresh rings instead): idle.
                ctx.parked.clear();
                st.reconnecting = false;
                st.forced = false;
                st.reconnects += 1;
                link.generation.store(gen, Ordering::Release);
                drop(st);
                tracing::warn!(
                    controller = %link.name,
                    "reconnected after {:.3} s ({attempts} attempts)",
                    started.elapsed().as_secs_f64()
                );
                return true;
            }
            Err(ReconnectError::Permanent(why)) => {
                link.give_up(shared.health(), why);
                return false;
            }
            Err(ReconnectError::Transient(why)) => {
                tracing::debug!(controller = %link.name, "reconnect attempt {attempts}: {why}");
                last = why;
            }
        }
        let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
        std::thread::sleep(pause);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use vireo_virtio::{DmaConfig, DmaMemory, QueueOptions};

    fn ring(mem: &Arc<DmaMemory>, index: u16) -> Virtqueue {
        Virtqueue::new(
            mem,
            index,
            8,
            QueueOptions::default(),
            Notifier::Counter(Arc::new(AtomicU64::new(0))),
        )
        .unwrap()
    }

    fn setup() -> (Arc<DmaMemory>, Arc<Link>, QueuePool, Health) {
        let mem = DmaMemory::new(DmaConfig {
            initial_region_size: 2 << 20,
            ..DmaConfig::default()
        })
        .unwrap();
        let link = Link::new("T", Some(Duration::from_secs(5)));
        let health = Health::new("T", Arc::new(AtomicBool::new(false)));
        (mem, link, QueuePool::new(Vec::new()), health)
    }

    fn reconnected(link: &Link, health: &Health, index: u16, r: NewRing) {
        link.pretend_reconnected(health, index, r);
    }

    #[test]
    fn a_ring_of_an_earlier_connection_binds_to_a_raised_flag() {
        let (mem, link, _pool, health) = setup();
        let q = ring(&mem, 0);
        let (g, flag) = link.bind(&q, &health);
        assert_eq!(g, 0);
        assert!(!flag.load(Ordering::Relaxed));
        link.generation.store(1, Ordering::Release);
        let (g, flag) = link.bind(&q, &health);
        assert_eq!(g, 0, "the ring's own generation");
        assert!(
            flag.load(Ordering::Relaxed),
            "lost at once: swapped for its new ring"
        );
    }

    #[test]
    fn an_idle_kept_ring_goes_to_the_pool_with_the_new_doorbell() {
        let (mem, link, pool, health) = setup();
        let q = ring(&mem, 0);
        let counter = Arc::new(AtomicU64::new(0));
        reconnected(
            &link,
            &health,
            0,
            NewRing::Kept {
                index: 0,
                notifier: Notifier::Counter(counter.clone()),
                signal: None,
            },
        );
        link.give_back(q, true, &pool);
        let q = pool
            .take()
            .expect("the kept ring is back in the pool, not freed");
        assert_eq!(q.tag(), 1);
        q.notifier().notify(0).unwrap();
        assert_eq!(counter.load(Ordering::Relaxed), 1, "with the new doorbell");
    }

    #[test]
    fn an_idle_ring_given_back_during_an_outage_waits_for_the_next_connection() {
        let (mem, link, pool, _health) = setup();
        link.lock().reconnecting = true;
        link.give_back(ring(&mem, 3), true, &pool);
        assert!(pool.take().is_none());
        assert_eq!(link.lock().late.len(), 1, "kept, never freed");
    }

    #[test]
    fn a_queue_closed_with_requests_on_a_kept_ring_is_marked_lost() {
        let (_mem, link, pool, health) = setup();
        reconnected(
            &link,
            &health,
            2,
            NewRing::Kept {
                index: 2,
                notifier: Notifier::Counter(Arc::new(AtomicU64::new(0))),
                signal: None,
            },
        );
        link.release(2, &pool);
        assert_eq!(link.lock().dead, vec![2]);
        assert!(pool.take().is_none());
    }

    #[test]
    fn a_closed_queue_gets_its_fresh_ring_in_the_pool() {
        let (mem, link, pool, health) = setup();
        reconnected(
            &link,
            &health,
            1,
            NewRing::Fresh {
                ring: ring(&mem, 1),
                aborted: false,
            },
        );
        link.release(1, &pool);
        assert_eq!(pool.take().map(|q| q.index()), Some(1));
    }

    #[test]
    fn a_reset_is_taken_once_and_only_for_the_current_connection() {
        let (mem, link, _pool, _health) = setup();
        let dev = vireo_virtio::testing::FakeDevice::new(0, Vec::new(), 1, 8);
        let t: Arc<Mutex<Box<dyn Transport>>> = Arc::new(Mutex::new(dev.connect(&mem)));
        let _ = link.transport.set(Arc::downgrade(&t));
        link.generation.store(4, Ordering::Release);
        // Decided on connection 3, which is gone: nothing.
        link.force(3).unwrap();
        assert_eq!(dev.aborts(), 0);
        assert!(!link.lock().forced);
        // On the current one: the connection is dropped, once however many ask.
        link.force(4).unwrap();
        link.force(4).unwrap();
        assert_eq!(dev.aborts(), 1);
        assert!(link.lock().forced);
    }
}
