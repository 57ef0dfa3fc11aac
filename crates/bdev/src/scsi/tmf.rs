//! Task management functions on the control queue.

use super::*;

/// Send a LOGICAL UNIT RESET on the control queue and wait for its answer.
pub(super) fn lun_reset(shared: &Shared, lun: &[u8; 8], timeout: Duration) -> Result<(), IoError> {
    const TMF: u32 = 0;
    const LOGICAL_UNIT_RESET: u32 = 5;
    let mut guard = lock(&shared.control);
    let Some(ctl) = guard.as_mut() else {
        return Err(IoError::ControllerFailed(
            "the control queue is unusable after an unanswered task management request".into(),
        ));
    };
    // Request: type, subtype, lun[8], tag (24 bytes); response: 1 byte at offset 32.
    let mut req = [0u8; 24];
    req[0..4].copy_from_slice(&TMF.to_le_bytes());
    req[4..8].copy_from_slice(&LOGICAL_UNIT_RESET.to_le_bytes());
    req[8..16].copy_from_slice(lun);
    let b = ctl.buf.as_mut_slice();
    b[..24].copy_from_slice(&req);
    b[32] = wire::response::UNSET;
    let base = ctl.buf.iova();
    let segs = [
        Segment {
            addr: base,
            len: 24,
        },
        Segment {
            addr: base + 32,
            len: 1,
        },
    ];
    ctl.q
        .add(&segs, 1, 0)
        .map_err(|_| IoError::ControllerFailed("control queue full".into()))?;
    ctl.q
        .publish()
        .map_err(|e| IoError::ControllerFailed(e.to_string()))?;
    let start = Instant::now();
    loop {
        let mut got = false;
        ctl.q
            .poll(|_| got = true)
            .map_err(|e| IoError::ControllerFailed(e.to_string()))?;
        if got {
            let r = ctl.buf.as_slice()[32];
            return match r {
                wire::response::OK | wire::response::FUNCTION_SUCCEEDED => Ok(()),
                other => Err(IoError::Scsi(format!(
                    "LOGICAL UNIT RESET answered {}",
                    wire::response_name(other)
                ))),
            };
        }
        if shared.health.is_broken() {
            return Err(IoError::Disconnected);
        }
        if start.elapsed() > timeout {
            // The device still owns the request: never reuse or free this queue.
            if let Some(c) = guard.take() {
                std::mem::forget(c);
            }
            return Err(IoError::Timeout(format!(
                "LOGICAL UNIT RESET (no answer within {} ms; some targets never answer task management)",
                timeout.as_millis()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
