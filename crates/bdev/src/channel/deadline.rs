//! Time limits of I/O and the escalation ladder for a device that keeps a request past
//! its limit. One period (the I/O's limit) apart, while the device still holds it:
//! 1. the caller gets [`IoError::Timeout`] (the device keeps the buffer it uses in
//!    place);
//! 2. ABORT TASK for its commands (SCSI);
//! 3. LOGICAL UNIT RESET (SCSI);
//! 4. a controller reset (vhost-user with `reconnect_timeout`: a forced reconnection;
//!    PCI: a device reset in place).
//!
//! A step the driver cannot take falls through to the next. Each step waits at most one
//! period (and [`STEP_BOUND`]) for its answer.

use std::time::{Duration, Instant};

use vireo_virtio::clock;

use super::IoChannel;
use crate::error::IoError;
use crate::io::Completion;

/// Longest wait of one escalation step for its answers.
const STEP_BOUND: Duration = Duration::from_secs(5);
/// How often deadlines are looked at while I/O with a limit is out.
const CHECK_PERIOD_NS: u64 = 1_000_000;

/// The escalation steps for a request the device keeps past its time limit, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Escalation {
    /// No step taken yet (the caller got its timeout, or the limit has not passed).
    None,
    /// ABORT TASK for the request's commands.
    AbortTask,
    /// LOGICAL UNIT RESET.
    LunReset,
    /// Reset the controller (reconnect, or reset a PCI function in place).
    ControllerReset,
}

impl Escalation {
    /// The step after this one (the last step stays).
    pub(crate) fn next(self) -> Escalation {
        match self {
            Escalation::None => Escalation::AbortTask,
            Escalation::AbortTask => Escalation::LunReset,
            Escalation::LunReset | Escalation::ControllerReset => Escalation::ControllerReset,
        }
    }
}

/// How a step went.
enum StepOutcome {
    /// Taken (or tried and failed for a reason other than support): stop here.
    Taken,
    /// The driver cannot take it: try the next step.
    Unsupported,
}

impl IoChannel {
    /// Deadlines are checked about every millisecond, only while I/O with a time limit
    /// is out.
    #[inline]
    pub(super) fn maybe_check_timeouts(&mut self, out: &mut Vec<Completion>) -> usize {
        if self.timed == 0 {
            return 0;
        }
        let now = clock::ticks();
        if now < self.next_timeout_check {
            return 0;
        }
        self.next_timeout_check = now + clock::ns_to_ticks(CHECK_PERIOD_NS);
        self.check_timeouts(now, out)
    }

    /// Complete I/O past its deadline with a timeout error (its buffer stays with the
    /// device), then escalate one step per further period while the device still holds
    /// it. Out of line: it runs about once a millisecond, and inlined it would grow the
    /// completion loop it is called from.
    #[cold]
    #[inline(never)]
    fn check_timeouts(&mut self, now: u64, out: &mut Vec<Completion>) -> usize {
        let mut n = 0;
        let mut aborts: Vec<u32> = Vec::new();
        let mut step = Escalation::None;
        let mut bound = STEP_BOUND;
        for (slot, p) in self.parents.active_mut().filter(|(_, p)| p.deadline != 0) {
            if now < p.deadline {
                continue;
            }
            // Next step one period from now.
            p.deadline = now.saturating_add(p.period);
            bound = bound.min(Duration::from_nanos(
                clock::ticks_to_ns(p.period).max(1_000_000),
            ));
            if !p.timed_out {
                p.timed_out = true;
                self.timed_out_held += 1;
                let waited = clock::ticks_to_ns(now.saturating_sub(p.start));
                let limit = clock::ticks_to_ns(p.period);
                self.counters.local.record(p.op, 0, waited, false);
                tracing::warn!(
                    bdev = %self.bdev.info.name,
                    op = p.op.name(),
                    user_data = p.user_data,
                    "I/O timed out after {:.3} s (limit {:.3} s); a buffer the device uses in place stays with it",
                    waited as f64 / 1e9,
                    limit as f64 / 1e9
                );
                // A caller's buffer the device uses in place stays with the device (one
                // extent, or a vectored request's segments); one that went through a
                // bounce buffer is given back.
                let (buf, iov) = if p.bounce.is_some() {
                    (p.buf.take(), std::mem::take(&mut p.iov))
                } else {
                    (None, Vec::new())
                };
                out.push(Completion {
                    user_data: p.user_data,
                    op: p.op,
                    result: Err(IoError::Timeout(format!(
                        "{} ({} bytes) got no answer within {:.3} s",
                        p.op.name(),
                        p.bytes,
                        limit as f64 / 1e9
                    ))),
                    buf,
                    iov,
                    latency_ns: waited,
                });
                n += 1;
            } else if p.escalated < Escalation::ControllerReset {
                p.escalated = p.escalated.next();
                if p.escalated == Escalation::AbortTask {
                    aborts.push(slot);
                }
                step = step.max(p.escalated);
            }
        }
        if step != Escalation::None {
            self.escalate(&aborts, step, bound);
        }
        n
    }

    /// Take escalation step `step` (for [`Escalation::AbortTask`], of I/Os `aborts`),
    /// or the first step after it that the driver can take.
    #[cold]
    fn escalate(&mut self, aborts: &[u32], step: Escalation, bound: Duration) {
        let mut step = step;
        loop {
            let outcome = match step {
                Escalation::None => return,
                Escalation::AbortTask => self.abort_tasks(aborts, bound),
                Escalation::LunReset => self.reset_lun(bound),
                Escalation::ControllerReset => {
                    self.reset_controller();
                    return;
                }
            };
            match outcome {
                StepOutcome::Taken => return,
                StepOutcome::Unsupported => step = step.next(),
            }
        }
    }

    /// ABORT TASK for the commands of each I/O of `aborts`; the whole step waits at most
    /// `bound`, however many it aborts.
    fn abort_tasks(&mut self, aborts: &[u32], bound: Duration) -> StepOutcome {
        let until = Instant::now() + bound;
        let mut unsupported = false;
        for &parent in aborts {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.drv.abort(parent, left) {
                Ok(()) => {
                    tracing::warn!(bdev = %self.bdev.info.name, "timed-out I/O still outstanding: ABORT TASK sent")
                }
                Err(IoError::Unsupported { .. }) => unsupported = true,
                Err(e) => {
                    tracing::warn!(bdev = %self.bdev.info.name, "timed-out I/O still outstanding; ABORT TASK: {e}")
                }
            }
        }
        if unsupported {
            StepOutcome::Unsupported
        } else {
            StepOutcome::Taken
        }
    }

    fn reset_lun(&mut self, bound: Duration) -> StepOutcome {
        let name = &self.bdev.info.name;
        match self.bdev.reset(bound) {
            Ok(()) => {
                tracing::warn!(bdev = %name, "timed-out I/O still outstanding: the LUN was reset");
                StepOutcome::Taken
            }
            Err(IoError::Unsupported { .. }) => StepOutcome::Unsupported,
            Err(e) => {
                tracing::warn!(bdev = %name, "timed-out I/O still outstanding; LUN reset: {e}");
                StepOutcome::Taken
            }
        }
    }

    fn reset_controller(&mut self) {
        let name = &self.bdev.info.name;
        match self.drv.reset_controller() {
            Ok(()) => tracing::warn!(
                bdev = %name,
                "timed-out I/O still outstanding: resetting the controller (reconnecting); its outstanding requests fail as aborted"
            ),
            Err(e) => tracing::warn!(
                bdev = %name,
                "timed-out I/O still outstanding; no controller reset: {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Escalation;

    #[test]
    fn escalation_steps_go_in_order_and_stop_at_the_controller_reset() {
        let mut s = Escalation::None;
        let mut seen = Vec::new();
        for _ in 0..5 {
            s = s.next();
            seen.push(s);
        }
        assert_eq!(
            seen,
            vec![
                Escalation::AbortTask,
                Escalation::LunReset,
                Escalation::ControllerReset,
                Escalation::ControllerReset,
                Escalation::ControllerReset
            ]
        );
        assert!(Escalation::AbortTask < Escalation::LunReset);
    }
}
