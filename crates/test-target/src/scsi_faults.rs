//! Fault switches specific to the scsi target. The transport faults (fail next N, delays,
//! reordering, lying lengths, bad ids, disconnects) are the shared [`Faults`](crate::Faults);
//! these say *how* a failed command fails and how the control queue behaves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vireo_scsi::{Asc, SenseKey, Status};

use crate::scsi_request::Response;

/// How a command picked by [`Faults::fail_next`](crate::Faults::fail_next) fails. It is not
/// executed (no data moves; the residual is the whole data buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScsiFailure {
    /// Response OK, status CHECK CONDITION with this sense key and ASC/ASCQ.
    CheckCondition {
        /// Sense key.
        key: SenseKey,
        /// Additional sense code and qualifier.
        asc: Asc,
    },
    /// Response OK, this SCSI status and no sense data (BUSY, TASK SET FULL, RESERVATION
    /// CONFLICT, ...).
    Status(Status),
    /// This virtio-scsi response code (BAD_TARGET, RESET, BUSY, TRANSPORT_FAILURE,
    /// TARGET_FAILURE, NEXUS_FAILURE, FAILURE, ...); status GOOD and no sense, as QEMU leaves
    /// them.
    Response(Response),
}

impl ScsiFailure {
    /// CHECK CONDITION, MEDIUM ERROR / UNRECOVERED READ ERROR (03/11/00): the default.
    pub const MEDIUM_ERROR: ScsiFailure = ScsiFailure::CheckCondition {
        key: SenseKey::MediumError,
        asc: Asc::UNRECOVERED_READ_ERROR,
    };
    /// Status BUSY.
    pub const BUSY: ScsiFailure = ScsiFailure::Status(Status::Busy);
    /// Status TASK SET FULL.
    pub const TASK_SET_FULL: ScsiFailure = ScsiFailure::Status(Status::TaskSetFull);
    /// CHECK CONDITION, UNIT ATTENTION / POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const UNIT_ATTENTION_RESET: ScsiFailure = ScsiFailure::CheckCondition {
        key: SenseKey::UnitAttention,
        asc: Asc::POWER_ON_RESET,
    };
}

impl Default for ScsiFailure {
    fn default() -> Self {
        ScsiFailure::MEDIUM_ERROR
    }
}

/// The scsi-specific fault switches; settable while front-ends run I/O.
#[derive(Debug, Default)]
pub struct ScsiFaults {
    failure: Mutex<ScsiFailure>,
    media_only: AtomicBool,
    tmf_never_answer: AtomicBool,
}

impl ScsiFaults {
    /// How the commands picked by [`Faults::fail_next`](crate::Faults::fail_next) fail from now
    /// on.
    pub fn set_failure(&self, failure: ScsiFailure) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = failure;
    }

    /// The current failure kind.
    pub fn failure(&self) -> ScsiFailure {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// With `true`, [`Faults::fail_next`](crate::Faults::fail_next) only picks media access
    /// commands (READ, WRITE, SYNCHRONIZE CACHE, UNMAP, WRITE SAME) to existing logical units;
    /// scans (INQUIRY, TEST UNIT READY, ...) go through untouched.
    pub fn set_fail_media_access_only(&self, on: bool) {
        self.media_only.store(on, Ordering::Release);
    }

    /// Whether only media access commands are failed.
    pub fn fail_media_access_only(&self) -> bool {
        self.media_only.load(Ordering::Acquire)
    }

    /// With `true`, task management functions on the control queue are never completed (they
    /// stay in flight until the connection ends), as with some real targets. Asynchronous
    /// notification requests are still answered.
    pub fn set_tmf_never_answer(&self, on: bool) {
        self.tmf_never_answer.store(on, Ordering::Release);
    }

    /// Whether task management functions go unanswered.
    pub fn tmf_never_answer(&self) -> bool {
        self.tmf_never_answer.load(Ordering::Acquire)
    }

    /// Back to the defaults: MEDIUM ERROR on any command, TMFs answered.
    pub fn clear(&self) {
        self.set_failure(ScsiFailure::default());
        self.set_fail_media_access_only(false);
        self.set_tmf_never_answer(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_and_clear() {
        let f = ScsiFaults::default();
        assert_eq!(f.failure(), ScsiFailure::MEDIUM_ERROR);
        f.set_failure(ScsiFailure::Response(Response::TransportFailure));
        f.set_fail_media_access_only(true);
        f.set_tmf_never_answer(true);
        assert_eq!(
            f.failure(),
            ScsiFailure::Response(Response::TransportFailure)
        );
        assert!(f.fail_media_access_only());
        assert!(f.tmf_never_answer());
        f.clear();
        assert_eq!(f.failure(), ScsiFailure::MEDIUM_ERROR);
        assert!(!f.fail_media_access_only());
        assert!(!f.tmf_never_answer());
    }
}
