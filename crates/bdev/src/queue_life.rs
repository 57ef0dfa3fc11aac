//! The life of one request queue under a channel, shared by the virtio-blk and
//! virtio-scsi drivers: working, then (when its connection fails) either failed with
//! every request on it, or suspended while the controller reconnects
//! (`reconnect_timeout`). Back on a new connection, the queue either goes on with the
//! same ring (the back-end tracked in-flight requests and serves them again) or takes a
//! fresh ring and resends, before anything new, every request the old ring held (or
//! fails them as aborted after a reconnection vireo forced).
//!
//! The driver's queue ([`LifeQueue`]) keeps its ring and its per-slot records; this type
//! keeps the state and the requests waiting for the new connection, and decides.

use std::collections::VecDeque;
use std::sync::Arc;

use vireo_virtio::{Notifier, QueueFailure, Virtqueue};
use vmm_sys_util::eventfd::EventFd;

use crate::error::IoError;
use crate::reconnect::{self, ControllerShared, NewRing, ReconnectStatus};

/// What the shared queue life needs of a driver's request queue.
pub(crate) trait LifeQueue {
    /// A request as kept to send again on a new connection.
    type Request;

    /// The controller's state (health, queue pool, reconnection).
    fn controller(&self) -> &dyn ControllerShared;
    /// Stop using the ring: it failed with `f`.
    fn fail_ring(&mut self, f: QueueFailure);
    /// Take every request the ring holds off it, with its record.
    fn take_in_flight(&mut self) -> Vec<Self::Request>;
    /// Hand `r`'s result to its channel.
    fn complete(&mut self, r: Self::Request, result: Result<(), IoError>);
    /// Put `r` on the ring; give it back when the ring is full (a request that cannot
    /// be sent at all is completed with its error instead).
    fn send(&mut self, r: Self::Request) -> Result<(), Self::Request>;
    /// Make what was sent visible to the device.
    fn publish_ring(&mut self) -> Result<(), QueueFailure>;
    /// Go on with the same ring, served by the new connection (its doorbell and
    /// completion eventfd). A driver that cannot says why.
    fn reattach(&mut self, notifier: Notifier, signal: Option<Arc<EventFd>>)
        -> Result<(), IoError>;
    /// Take `ring` of the new connection instead of the lost one (whose memory is
    /// leaked: the old back-end may still write it).
    fn replace_ring(&mut self, ring: Virtqueue) -> Result<(), IoError>;
    /// The ring, for the pool (none when it failed).
    fn take_ring(&mut self) -> Option<Virtqueue>;
    /// Whether the ring's connection is gone.
    fn ring_lost(&self) -> bool;
    /// The queue closes without its ring: forget any buffer the device may still read.
    fn forget_device_buffers(&mut self) {}
}

/// How the queue takes a new request now.
pub(crate) enum Admission<'a> {
    /// On the ring.
    Send,
    /// Not yet: the connection is being replaced (or kept requests go first).
    Wait,
    /// Never: the queue failed with this error.
    Refuse(&'a IoError),
}

/// A request queue's state across failures and reconnections; see the module doc.
pub(crate) struct QueueLife<R> {
    /// The queue failed for good: every request fails with this.
    failed: Option<IoError>,
    /// The connection is gone and reconnection is under way.
    suspended: bool,
    /// The queue's index on the device.
    index: u16,
    /// The connection (link generation) the queue's ring belongs to.
    generation: u64,
    /// Requests of a lost connection, sent again (before new ones) once it is back.
    resend: VecDeque<R>,
}

impl<R> QueueLife<R> {
    /// A working queue `index` on connection `generation`.
    pub(crate) fn new(index: u16, generation: u64) -> QueueLife<R> {
        QueueLife {
            failed: None,
            suspended: false,
            index,
            generation,
            resend: VecDeque::new(),
        }
    }

    /// Neither failed nor waiting for a connection: the ring can be used.
    #[inline]
    pub(crate) fn is_up(&self) -> bool {
        self.failed.is_none() && !self.suspended
    }

    /// The queue failed for good.
    pub(crate) fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// How a new request is taken now.
    #[inline]
    pub(crate) fn admission(&self) -> Admission<'_> {
        if let Some(e) = &self.failed {
            return Admission::Refuse(e);
        }
        if self.suspended || !self.resend.is_empty() {
            return Admission::Wait;
        }
        Admission::Send
    }

    /// Before reaping: take the new connection once it is there, or send kept requests
    /// as the ring has room. Returns whether the ring can be reaped.
    #[inline]
    pub(crate) fn before_poll<Q: LifeQueue<Request = R>>(&mut self, q: &mut Q) -> bool {
        if self.suspended {
            self.resume(q);
        } else if !self.resend.is_empty() {
            self.resend_waiting(q);
        }
        self.is_up()
    }

    /// Publish what was sent; a failure fails the queue.
    #[inline]
    pub(crate) fn publish<Q: LifeQueue<Request = R>>(&mut self, q: &mut Q) {
        if !self.is_up() {
            return;
        }
        if let Err(f) = q.publish_ring() {
            self.on_failure(q, f);
        }
    }

    /// The ring failed with `f`. With reconnection configured and the back-end gone,
    /// wait for the next connection with the requests kept on the ring; otherwise fail every
    /// request, and the controller too when the device broke the protocol.
    pub(crate) fn on_failure<Q: LifeQueue<Request = R>>(&mut self, q: &mut Q, f: QueueFailure) {
        if !self.is_up() {
            return;
        }
        if f == QueueFailure::Disconnected && q.controller().link().configured() {
            // What becomes of the requests on the ring depends on how the connection
            // comes back (see `resume`); if reconnection already gave up, `resume` fails
            // them with its reason at once.
            q.fail_ring(f);
            self.suspended = true;
            return;
        }
        if let QueueFailure::Device(why) = &f {
            q.controller().health().fail(why);
        }
        let e = queue_error(&f);
        q.fail_ring(f);
        self.fail_all(q, e);
    }

    /// Fail every request of the ring and every kept one with `e`, for good.
    fn fail_all<Q: LifeQueue<Request = R>>(&mut self, q: &mut Q, e: IoError) {
        for r in q.take_in_flight() {
            q.complete(r, Err(e.clone()));
        }
        while let Some(r) = self.resend.pop_front() {
            q.complete(r, Err(e.clone()));
        }
        self.suspended = false;
        self.failed = Some(e);
    }

    /// While suspended: go on once the connection is back.
    fn resume<Q: LifeQueue<Request = R>>(&mut self, q: &mut Q) {
        let view = q.controller().link().check(self.generation, self.index);
        match view {
            ReconnectStatus::Waiting => {}
            ReconnectStatus::Failed(why, forced) => {
                self.fail_all(q, reconnect::failed_error(why, forced))
            }
            ReconnectStatus::Ready(generation, ring) => match *ring {
                NewRing::Kept {
                    notifier, signal, ..
                } => match q.reattach(notifier, signal) {
                    // The new connection serves this ring and resends what it had.
                    Ok(()) => {
                        self.generation = generation;
                        self.suspended = false;
                    }
                    Err(e) => self.fail_all(q, e),
                },
                NewRing::Fresh { ring, aborted } => {
                    self.take_back(q, aborted);
                    match q.replace_ring(ring) {
                        Ok(()) => {
                            self.generation = generation;
                            self.suspended = false;
                            self.resend_waiting(q);
                        }
                        Err(e) => self.fail_all(q, e),
                    }
                }
            },
        }
    }

    /// Take the requests off the lost ring: to send again, or to fail as aborted
    /// (vireo dropped the connection itself: the old back-end may still work on them).
    fn take_back<Q: LifeQueue<Request = R>>(&mut self, q: &mut Q, aborted: bool) {
        for r in q.take_in_flight() {
            if aborted {
                q.complete(
                    r,
                    Err(IoError::Aborted(
                        "the device stopped answering and vireo reconnected".into(),
                    )),
                );
            } else {
                self.resend.push_back(r);
            }
        }
    }

    /// Send kept requests, in order, while the ring has room.
    fn resend_waiting<Q: LifeQueue<Request = R>>(&mut self, q: &mut Q) {
        while let Some(r) = self.resend.pop_front() {
            if let Err(r) = q.send(r) {
                self.resend.push_front(r);
                break;
            }
        }
        self.publish(q);
    }

    /// Ask for a controller reset of the connection this queue's ring belongs to.
    pub(crate) fn reset_controller<Q: LifeQueue<Request = R>>(&self, q: &Q) -> Result<(), IoError> {
        q.controller().link().force(self.generation)
    }

    /// The queue closes: a working idle ring goes back to the controller's pool; a ring
    /// of a lost connection waits for the next one; a ring with requests the device may
    /// still hold is leaked.
    pub(crate) fn close<Q: LifeQueue<Request = R>>(&mut self, q: &mut Q) {
        if !q.controller().link().enabled() {
            match q.take_ring() {
                Some(ring) => q.controller().pool().give(ring),
                None => q.forget_device_buffers(),
            }
            return;
        }
        let ring = if self.suspended { None } else { q.take_ring() };
        let ctl = q.controller();
        match ring {
            Some(mut ring) => {
                ring.set_tag(self.generation);
                ctl.link().give_back(ring, q.ring_lost(), ctl.pool())
            }
            None => {
                q.forget_device_buffers();
                // The ring was lost with a connection: the queue's new one goes to the
                // pool.
                let ctl = q.controller();
                ctl.link().release(self.index, ctl.pool());
            }
        }
    }
}

/// The error of requests on a queue that failed with `f`.
pub(crate) fn queue_error(f: &QueueFailure) -> IoError {
    match f {
        QueueFailure::Disconnected => IoError::Disconnected,
        QueueFailure::Device(why) => IoError::ControllerFailed(why.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::time::Duration;

    use vireo_virtio::{DmaMemory, QueueOptions};

    use super::*;
    use crate::health::Health;
    use crate::pool::QueuePool;
    use crate::reconnect::Link;

    struct Controller {
        health: Health,
        pool: QueuePool,
        link: Arc<Link>,
    }

    impl ControllerShared for Controller {
        fn parts(&self) -> (&Health, &QueuePool, &Link) {
            (&self.health, &self.pool, &self.link)
        }
    }

    /// A queue without a ring: requests are numbers, the test says what the ring holds.
    struct Mock {
        ctl: Controller,
        on_ring: Vec<u32>,
        /// Requests the ring takes before it is full.
        room: usize,
        sent: Vec<u32>,
        completed: Vec<(u32, Result<(), IoError>)>,
        ring_failed: Option<QueueFailure>,
        publish_fails: Option<QueueFailure>,
        reattached: bool,
        replaced: usize,
        forgot_buffers: bool,
    }

    impl LifeQueue for Mock {
        type Request = u32;
        fn controller(&self) -> &dyn ControllerShared {
            &self.ctl
        }
        fn fail_ring(&mut self, f: QueueFailure) {
            self.ring_failed = Some(f);
        }
        fn take_in_flight(&mut self) -> Vec<u32> {
            std::mem::take(&mut self.on_ring)
        }
        fn complete(&mut self, r: u32, result: Result<(), IoError>) {
            self.completed.push((r, result));
        }
        fn send(&mut self, r: u32) -> Result<(), u32> {
            if self.room == 0 {
                return Err(r);
            }
            self.room -= 1;
            self.sent.push(r);
            self.on_ring.push(r);
            Ok(())
        }
        fn publish_ring(&mut self) -> Result<(), QueueFailure> {
            match self.publish_fails.take() {
                Some(f) => Err(f),
                None => Ok(()),
            }
        }
        fn reattach(&mut self, _: Notifier, _: Option<Arc<EventFd>>) -> Result<(), IoError> {
            self.reattached = true;
            Ok(())
        }
        fn replace_ring(&mut self, _: Virtqueue) -> Result<(), IoError> {
            self.replaced += 1;
            Ok(())
        }
        fn take_ring(&mut self) -> Option<Virtqueue> {
            None
        }
        fn ring_lost(&self) -> bool {
            true
        }
        fn forget_device_buffers(&mut self) {
            self.forgot_buffers = true;
        }
    }

    fn mock(reconnect: bool) -> (Mock, QueueLife<u32>) {
        let window = reconnect.then_some(Duration::from_secs(5));
        let m = Mock {
            ctl: Controller {
                health: Health::new("T", Arc::new(AtomicBool::new(false))),
                pool: QueuePool::new(Vec::new()),
                link: Link::new("T", window),
            },
            on_ring: vec![1, 2, 3],
            room: 16,
            sent: Vec::new(),
            completed: Vec::new(),
            ring_failed: None,
            publish_fails: None,
            reattached: false,
            replaced: 0,
            forgot_buffers: false,
        };
        (m, QueueLife::new(0, 0))
    }

    fn fresh_ring(aborted: bool) -> NewRing {
        let mem = DmaMemory::new(vireo_virtio::DmaConfig {
            initial_region_size: 1 << 20,
            ..vireo_virtio::DmaConfig::default()
        })
        .unwrap();
        let notifier = Notifier::Counter(Arc::new(AtomicU64::new(0)));
        let ring = Virtqueue::new(&mem, 0, 8, QueueOptions::default(), notifier).unwrap();
        NewRing::Fresh { ring, aborted }
    }

    fn errors(m: &Mock) -> Vec<(u32, String)> {
        m.completed
            .iter()
            .map(|(r, res)| {
                (
                    *r,
                    res.as_ref()
                        .err()
                        .map(|e| format!("{e:?}"))
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn a_device_that_broke_the_protocol_fails_every_request_and_the_controller() {
        let (mut m, mut life) = mock(true);
        life.on_failure(&mut m, QueueFailure::Device("bad used id".into()));
        assert_eq!(m.completed.len(), 3);
        assert!(m
            .completed
            .iter()
            .all(|(_, r)| matches!(r, Err(IoError::ControllerFailed(_)))));
        assert!(m.ctl.health.is_failed(), "even with reconnection on");
        assert!(matches!(
            life.admission(),
            Admission::Refuse(IoError::ControllerFailed(_))
        ));
        assert!(life.is_failed() && !life.is_up());
        assert!(matches!(m.ring_failed, Some(QueueFailure::Device(_))));
    }

    #[test]
    fn without_reconnection_a_lost_back_end_fails_the_requests_as_disconnected() {
        let (mut m, mut life) = mock(false);
        life.on_failure(&mut m, QueueFailure::Disconnected);
        assert_eq!(
            m.completed.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(m
            .completed
            .iter()
            .all(|(_, r)| matches!(r, Err(IoError::Disconnected))));
        assert!(
            !m.ctl.health.is_failed(),
            "a hang-up is not a protocol breach"
        );
    }

    #[test]
    fn with_reconnection_a_lost_back_end_suspends_the_queue_with_its_requests() {
        let (mut m, mut life) = mock(true);
        life.on_failure(&mut m, QueueFailure::Disconnected);
        assert!(m.completed.is_empty());
        assert_eq!(m.on_ring, vec![1, 2, 3], "still on the lost ring");
        assert!(matches!(life.admission(), Admission::Wait));
        assert!(!life.before_poll(&mut m), "nothing to reap while waiting");
        // A second failure report changes nothing.
        life.on_failure(&mut m, QueueFailure::Device("late".into()));
        assert!(!m.ctl.health.is_failed());
    }

    #[test]
    fn on_a_fresh_ring_the_lost_requests_are_resent_in_order_before_new_ones() {
        let (mut m, mut life) = mock(true);
        life.on_failure(&mut m, QueueFailure::Disconnected);
        m.ctl
            .link
            .pretend_reconnected(&m.ctl.health, 0, fresh_ring(false));
        assert!(life.before_poll(&mut m));
        assert_eq!(m.replaced, 1);
        assert_eq!(m.sent, vec![1, 2, 3]);
        assert!(m.completed.is_empty());
        assert!(matches!(life.admission(), Admission::Send));
        assert_eq!(life.generation, 1);
    }

    #[test]
    fn after_a_forced_reconnection_the_lost_requests_fail_as_aborted() {
        let (mut m, mut life) = mock(true);
        life.on_failure(&mut m, QueueFailure::Disconnected);
        m.ctl
            .link
            .pretend_reconnected(&m.ctl.health, 0, fresh_ring(true));
        assert!(life.before_poll(&mut m));
        assert!(m.sent.is_empty());
        assert_eq!(m.completed.len(), 3);
        assert!(m
            .completed
            .iter()
            .all(|(_, r)| matches!(r, Err(IoError::Aborted(_)))));
    }

    #[test]
    fn a_kept_ring_is_reattached_and_nothing_is_resent() {
        let (mut m, mut life) = mock(true);
        life.on_failure(&mut m, QueueFailure::Disconnected);
        let kept = NewRing::Kept {
            index: 0,
            notifier: Notifier::Counter(Arc::new(AtomicU64::new(0))),
            signal: None,
        };
        m.ctl.link.pretend_reconnected(&m.ctl.health, 0, kept);
        assert!(life.before_poll(&mut m));
        assert!(m.reattached);
        assert!(m.sent.is_empty() && m.completed.is_empty());
        assert_eq!(
            m.on_ring,
            vec![1, 2, 3],
            "the new connection serves them again"
        );
    }

    #[test]
    fn resending_waits_for_ring_room_and_new_requests_wait_behind() {
        let (mut m, mut life) = mock(true);
        life.on_failure(&mut m, QueueFailure::Disconnected);
        m.room = 1;
        m.ctl
            .link
            .pretend_reconnected(&m.ctl.health, 0, fresh_ring(false));
        life.before_poll(&mut m);
        assert_eq!(m.sent, vec![1]);
        assert!(matches!(life.admission(), Admission::Wait));
        m.room = 5;
        life.before_poll(&mut m);
        assert_eq!(m.sent, vec![1, 2, 3]);
        assert!(matches!(life.admission(), Admission::Send));
    }

    #[test]
    fn a_reconnection_that_gives_up_fails_the_kept_requests_with_its_reason() {
        let (mut m, mut life) = mock(true);
        life.on_failure(&mut m, QueueFailure::Disconnected);
        m.ctl.link.pretend_given_up(&m.ctl.health, "no socket");
        life.before_poll(&mut m);
        let errs = errors(&m);
        assert_eq!(errs.len(), 3);
        assert!(
            errs.iter().all(|(_, e)| e.contains("no socket")),
            "{errs:?}"
        );
        assert!(life.is_failed());
    }

    #[test]
    fn a_failed_publish_fails_the_queue() {
        let (mut m, mut life) = mock(false);
        m.publish_fails = Some(QueueFailure::Disconnected);
        life.publish(&mut m);
        assert_eq!(m.completed.len(), 3);
        assert!(life.is_failed());
    }

    #[test]
    fn a_queue_closed_without_its_ring_forgets_what_the_device_may_read() {
        let (mut m, mut life) = mock(false);
        life.close(&mut m);
        assert!(m.forgot_buffers);
    }
}
