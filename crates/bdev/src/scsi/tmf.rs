//! Task management functions on the control queue.

use std::mem::offset_of;

use vireo_virtio::wire::scsi::{TmfReq, TmfSlot, TMF_ABORT_TASK, TMF_LOGICAL_UNIT_RESET, T_TMF};

use super::*;
use crate::queue_life::queue_error;

const REQ_OFF: u64 = offset_of!(TmfSlot, req) as u64;
const RESP_OFF: usize = offset_of!(TmfSlot, response);

/// Send a LOGICAL UNIT RESET on the control queue and wait for its answer.
pub(super) fn lun_reset(
    shared: &ScsiShared,
    lun: &[u8; 8],
    timeout: Duration,
) -> Result<(), IoError> {
    task_management(shared, TMF_LOGICAL_UNIT_RESET, lun, 0, timeout)
}

/// Send an ABORT TASK for the command tagged `tag` and wait for its answer.
pub(super) fn abort_task(
    shared: &ScsiShared,
    lun: &[u8; 8],
    tag: u64,
    timeout: Duration,
) -> Result<(), IoError> {
    task_management(shared, TMF_ABORT_TASK, lun, tag, timeout)
}

fn tmf_name(subtype: u32) -> &'static str {
    if subtype == TMF_ABORT_TASK {
        "ABORT TASK"
    } else {
        "LOGICAL UNIT RESET"
    }
}

/// Send one task management function on the control queue and wait (at most
/// `timeout`) for its answer.
fn task_management(
    shared: &ScsiShared,
    subtype: u32,
    lun: &[u8; 8],
    tag: u64,
    timeout: Duration,
) -> Result<(), IoError> {
    let name = tmf_name(subtype);
    let mut guard = lock(&shared.control);
    let Some(ctl) = guard.as_mut() else {
        return Err(IoError::ControllerFailed(
            "the control queue is unusable after an unanswered task management request".into(),
        ));
    };
    let slot = ctl.take_slot().ok_or_else(|| match ctl.failure() {
        Some(f) => queue_error(f),
        None => IoError::ControllerFailed("control queue full".into()),
    })?;
    *ctl.slot_mut(slot) = TmfSlot {
        req: TmfReq {
            type_: T_TMF.into(),
            subtype: subtype.into(),
            lun: *lun,
            tag: tag.into(),
        },
        response: wire::response::UNSET,
    };
    let base = ctl.slot_addr(slot);
    let segs = [
        Segment {
            addr: base + REQ_OFF,
            len: std::mem::size_of::<TmfReq>() as u32,
        },
        Segment {
            addr: base + RESP_OFF as u64,
            len: 1,
        },
    ];
    if ctl.submit(slot, &segs, 1).is_err() {
        ctl.release_slot(slot);
        return Err(IoError::ControllerFailed("control queue full".into()));
    }
    ctl.publish().map_err(|f| queue_error(&f))?;
    let start = Instant::now();
    loop {
        let mut response = None;
        ctl.poll(|q, s, _| {
            response = Some(q.read_at::<u8>(s, RESP_OFF));
            q.release_slot(s);
        })
        .map_err(|f| queue_error(&f))?;
        if let Some(r) = response {
            return match r {
                wire::response::OK | wire::response::FUNCTION_SUCCEEDED => Ok(()),
                other => Err(IoError::Scsi(format!(
                    "{name} answered {}",
                    wire::response_name(other)
                ))),
            };
        }
        if shared.health.is_broken() {
            return Err(IoError::Disconnected);
        }
        if start.elapsed() > timeout {
            // The device still owns the request: the queue is failed (its memory is
            // never reused) and dropped.
            ctl.fail(QueueFailure::Device(
                "a task management request got no answer".into(),
            ));
            guard.take();
            return Err(IoError::Timeout(format!(
                "{name} (no answer within {} ms; some targets never answer task management)",
                timeout.as_millis()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
