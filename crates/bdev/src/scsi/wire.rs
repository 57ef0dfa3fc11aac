//! virtio-scsi request, response, TMF and event layouts (virtio 1.2 section 5.6.6),
//! and the interpretation of a completed command.

use vireo_scsi::{Sense, SenseKey, Status};

use crate::error::IoError;

pub use vireo_virtio::wire::scsi::{MAX_SENSE, REQ_HEADER, RESP_HEADER};

/// Bytes of `virtio_scsi_config` vireo reads.
pub const CONFIG_LEN: usize = 36;
/// The fields of `struct virtio_scsi_config` as (offset, width): each is read at its
/// own width (virtio 1.2 4.1.3.1).
pub const CONFIG_FIELDS: &[(u32, u8)] = &[
    (0, 4),  // num_queues
    (4, 4),  // seg_max
    (8, 4),  // max_sectors
    (12, 4), // cmd_per_lun
    (16, 4), // event_info_size
    (20, 4), // sense_size
    (24, 4), // cdb_size
    (28, 2), // max_channel
    (30, 2), // max_target
    (32, 4), // max_lun
];

/// virtio-scsi response codes.
pub mod response {
    /// Completed (see the SCSI status).
    pub const OK: u8 = 0;
    /// Data-in overran the buffers.
    pub const OVERRUN: u8 = 1;
    /// Aborted by a TMF.
    pub const ABORTED: u8 = 2;
    /// No such target.
    pub const BAD_TARGET: u8 = 3;
    /// Aborted by a reset.
    pub const RESET: u8 = 4;
    /// Retry later.
    pub const BUSY: u8 = 5;
    /// Transport failure; retry may work on another path.
    pub const TRANSPORT_FAILURE: u8 = 6;
    /// Target failure; do not retry.
    pub const TARGET_FAILURE: u8 = 7;
    /// Nexus failure; do not retry on this nexus.
    pub const NEXUS_FAILURE: u8 = 8;
    /// Other failure.
    pub const FAILURE: u8 = 9;
    /// TMF succeeded.
    pub const FUNCTION_SUCCEEDED: u8 = 10;
    /// TMF rejected.
    pub const FUNCTION_REJECTED: u8 = 11;
    /// Bad LUN.
    pub const INCORRECT_LUN: u8 = 12;
    /// Written before submission: a device that does not fill the response is caught.
    pub const UNSET: u8 = 0xff;
}

/// Parsed `virtio_scsi_config`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScsiConfig {
    /// Request queues.
    pub num_queues: u32,
    /// Largest data segments per command.
    pub seg_max: u32,
    /// Largest transfer hint in 512-byte sectors.
    pub max_sectors: u32,
    /// Commands per LUN hint.
    pub cmd_per_lun: u32,
    /// Event buffer size.
    pub event_info_size: u32,
    /// Sense buffer size the device writes.
    pub sense_size: u32,
    /// CDB size the device reads.
    pub cdb_size: u32,
    /// Highest channel (0).
    pub max_channel: u16,
    /// Highest target id.
    pub max_target: u16,
    /// Highest LUN.
    pub max_lun: u32,
}

/// Highest target id scanned when the configuration cannot be read (SPDK's initiator
/// scans 0..63 then too).
pub const DEFAULT_MAX_TARGET: u16 = 63;

impl ScsiConfig {
    /// What a driver assumes when the transport cannot read the configuration space
    /// (a vhost-user back-end without the `CONFIG` protocol feature): the spec's
    /// defaults for the CDB (32) and sense (96) sizes, `num_queues` request queues,
    /// no segment or transfer limit beyond the ring's, 16-byte events, targets
    /// 0..=[`DEFAULT_MAX_TARGET`] and LUNs as REPORT LUNS lists them.
    pub fn assumed(num_queues: u32) -> ScsiConfig {
        ScsiConfig {
            num_queues,
            seg_max: 0,
            max_sectors: 0,
            cmd_per_lun: 0,
            event_info_size: 16,
            sense_size: 96,
            cdb_size: 32,
            max_channel: 0,
            max_target: DEFAULT_MAX_TARGET,
            max_lun: 16383,
        }
    }

    /// Parse the first 36 bytes of the configuration.
    pub fn parse(b: &[u8]) -> Option<ScsiConfig> {
        let u32_at = |o: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
        };
        let u16_at = |o: usize| -> Option<u16> {
            Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
        };
        Some(ScsiConfig {
            num_queues: u32_at(0)?,
            seg_max: u32_at(4)?,
            max_sectors: u32_at(8)?,
            cmd_per_lun: u32_at(12)?,
            event_info_size: u32_at(16)?,
            sense_size: u32_at(20)?,
            cdb_size: u32_at(24)?,
            max_channel: u16_at(28)?,
            max_target: u16_at(30)?,
            max_lun: u32_at(32)?,
        })
    }
}

/// The 8-byte virtio-scsi LUN field for `target` and `lun` (flat addressing above 255).
pub fn lun_bytes(target: u8, lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = 1;
    b[1] = target;
    b[2] = 0x40 | ((lun >> 8) as u8 & 0x3f);
    b[3] = lun as u8;
    b
}

/// The response header of a completed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resp {
    /// Bytes of sense data the device says it wrote.
    pub sense_len: u32,
    /// Bytes not transferred.
    pub resid: u32,
    /// Transport status qualifier.
    pub status_qualifier: u16,
    /// SCSI status.
    pub status: u8,
    /// virtio-scsi response code.
    pub response: u8,
    /// Sense bytes (at most the buffer size).
    pub sense: Vec<u8>,
}

impl Resp {
    /// Parse a response buffer of `RESP_HEADER + sense_size` bytes.
    pub fn parse(b: &[u8]) -> Option<Resp> {
        if b.len() < RESP_HEADER {
            return None;
        }
        let sense_len = u32::from_le_bytes(b[0..4].try_into().ok()?);
        let avail = b.len() - RESP_HEADER;
        let n = (sense_len as usize).min(avail);
        Some(Resp {
            sense_len,
            resid: u32::from_le_bytes(b[4..8].try_into().ok()?),
            status_qualifier: u16::from_le_bytes(b[8..10].try_into().ok()?),
            status: b[10],
            response: b[11],
            sense: b[RESP_HEADER..RESP_HEADER + n].to_vec(),
        })
    }
}

/// What to do with a completed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success; `transferred` data bytes.
    Done {
        /// Bytes transferred (data length minus residual).
        transferred: u32,
    },
    /// Worth another try (BUSY, UNIT ATTENTION, transport reset, ...).
    Retry(String),
    /// Failed for good.
    Fail(IoError),
    /// CHECK CONDITION the caller may want to look at (scan uses it).
    Check(Sense),
}

/// Interpret a response. `data_len` is the data-in or data-out length of the command;
/// `short_ok` accepts a residual (INQUIRY and friends), otherwise a residual is an error.
pub fn evaluate(r: &Resp, data_len: u32, short_ok: bool) -> Outcome {
    use response::*;
    match r.response {
        OK => {}
        BUSY | RESET | TRANSPORT_FAILURE | ABORTED => {
            return Outcome::Retry(format!(
                "virtio-scsi response {}",
                response_name(r.response)
            ))
        }
        BAD_TARGET | INCORRECT_LUN => {
            return Outcome::Fail(IoError::Scsi(format!(
                "the LUN is not reachable (virtio-scsi {})",
                response_name(r.response)
            )))
        }
        OVERRUN | TARGET_FAILURE | NEXUS_FAILURE | FAILURE => {
            return Outcome::Fail(IoError::Scsi(format!(
                "virtio-scsi response {}",
                response_name(r.response)
            )))
        }
        UNSET => {
            return Outcome::Fail(IoError::ControllerFailed(
                "the device completed a command without writing its response".into(),
            ))
        }
        // A code the spec does not define for commands (TMF codes included): this
        // request's answer cannot be trusted, but the ring is consistent, so only the
        // I/O fails (a newer device, or one that is wrong about one request, keeps
        // serving the rest).
        other => {
            return Outcome::Fail(IoError::Scsi(format!(
                "undefined virtio-scsi response code {other} for a command"
            )))
        }
    }
    match Status::from_u8(r.status) {
        Status::Good | Status::ConditionMet => {
            if r.resid > data_len {
                return Outcome::Fail(IoError::ControllerFailed(format!(
                    "residual {} exceeds the {data_len}-byte transfer",
                    r.resid
                )));
            }
            if r.resid > 0 && !short_ok {
                return Outcome::Fail(IoError::Scsi(format!(
                    "short transfer: {} of {data_len} bytes not transferred",
                    r.resid
                )));
            }
            Outcome::Done {
                transferred: data_len - r.resid,
            }
        }
        Status::CheckCondition => match Sense::parse(&r.sense) {
            Ok(s) => Outcome::Check(s),
            Err(e) => Outcome::Fail(IoError::Scsi(format!(
                "CHECK CONDITION without usable sense data ({} bytes: {e})",
                r.sense.len()
            ))),
        },
        Status::Busy | Status::TaskSetFull | Status::TaskAborted => {
            Outcome::Retry(format!("SCSI status {:#04x}", r.status))
        }
        Status::ReservationConflict => Outcome::Fail(IoError::Scsi("RESERVATION CONFLICT".into())),
        Status::AcaActive | Status::Other(_) => {
            Outcome::Fail(IoError::Scsi(format!("SCSI status {:#04x}", r.status)))
        }
    }
}

/// Whether a CHECK CONDITION is worth retrying for I/O.
pub fn sense_is_retryable(s: &Sense) -> bool {
    s.is_unit_attention()
        || s.key == SenseKey::AbortedCommand
        || (s.key == SenseKey::NotReady && s.asc == 0x04 && s.ascq == 0x01)
}

/// The typed error of a CHECK CONDITION.
pub fn sense_error(s: &Sense) -> IoError {
    IoError::Sense {
        key: s.key.to_u8(),
        asc: s.asc,
        ascq: s.ascq,
    }
}

/// Name of a response code, for messages.
pub fn response_name(code: u8) -> &'static str {
    use response::*;
    match code {
        OK => "OK",
        OVERRUN => "OVERRUN",
        ABORTED => "ABORTED",
        BAD_TARGET => "BAD_TARGET",
        RESET => "RESET",
        BUSY => "BUSY",
        TRANSPORT_FAILURE => "TRANSPORT_FAILURE",
        TARGET_FAILURE => "TARGET_FAILURE",
        NEXUS_FAILURE => "NEXUS_FAILURE",
        FAILURE => "FAILURE",
        FUNCTION_SUCCEEDED => "FUNCTION_SUCCEEDED",
        FUNCTION_REJECTED => "FUNCTION_REJECTED",
        INCORRECT_LUN => "INCORRECT_LUN",
        _ => "unknown",
    }
}

/// Event codes of the event queue.
pub mod event {
    /// No event.
    pub const NO_EVENT: u32 = 0;
    /// A LUN appeared, disappeared or was reset.
    pub const TRANSPORT_RESET: u32 = 1;
    /// Asynchronous notification.
    pub const ASYNC_NOTIFY: u32 = 2;
    /// A LUN's parameters changed.
    pub const PARAM_CHANGE: u32 = 3;
    /// Flag: events were lost.
    pub const EVENTS_MISSED: u32 = 0x8000_0000;
    /// TRANSPORT_RESET reason: reset.
    pub const REASON_RESET: u32 = 0;
    /// TRANSPORT_RESET reason: a LUN appeared.
    pub const REASON_RESCAN: u32 = 1;
    /// TRANSPORT_RESET reason: a LUN disappeared.
    pub const REASON_REMOVED: u32 = 2;
}

/// A received event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Event code, EVENTS_MISSED flag included.
    pub event: u32,
    /// LUN field.
    pub lun: [u8; 8],
    /// Reason.
    pub reason: u32,
}

impl Event {
    /// "Events were missed" with no event: the driver rescans (after a reconnection).
    pub fn missed() -> Event {
        Event {
            event: event::EVENTS_MISSED,
            lun: [0; 8],
            reason: 0,
        }
    }

    /// Parse a 16-byte event.
    pub fn parse(b: &[u8]) -> Option<Event> {
        if b.len() < 16 {
            return None;
        }
        Some(Event {
            event: u32::from_le_bytes(b[0..4].try_into().ok()?),
            lun: b[4..12].try_into().ok()?,
            reason: u32::from_le_bytes(b[12..16].try_into().ok()?),
        })
    }

    /// (target, lun) of the event, when the LUN field is well formed.
    pub fn address(&self) -> Option<(u8, u16)> {
        if self.lun[0] != 1 {
            return None;
        }
        let lun = match self.lun[2] >> 6 {
            0 => self.lun[3] as u16,
            1 => (((self.lun[2] & 0x3f) as u16) << 8) | self.lun[3] as u16,
            _ => return None,
        };
        Some((self.lun[1], lun))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(response: u8, status: u8, resid: u32, sense: &[u8]) -> Resp {
        Resp {
            sense_len: sense.len() as u32,
            resid,
            status_qualifier: 0,
            status,
            response,
            sense: sense.to_vec(),
        }
    }

    #[test]
    fn lun_addressing_round_trips() {
        for (t, l) in [(0u8, 0u16), (3, 7), (255, 300), (1, 16383)] {
            let b = lun_bytes(t, l);
            let e = Event {
                event: 1,
                lun: b,
                reason: 1,
            };
            assert_eq!(e.address(), Some((t, l)));
        }
        assert_eq!(lun_bytes(2, 5)[..4], [1, 2, 0x40, 5]);
    }

    #[test]
    fn outcomes() {
        assert_eq!(
            evaluate(&resp(0, 0, 0, &[]), 4096, false),
            Outcome::Done { transferred: 4096 }
        );
        assert!(matches!(
            evaluate(&resp(0, 0, 512, &[]), 4096, false),
            Outcome::Fail(IoError::Scsi(_))
        ));
        assert_eq!(
            evaluate(&resp(0, 0, 512, &[]), 4096, true),
            Outcome::Done { transferred: 3584 }
        );
        assert!(matches!(
            evaluate(&resp(0, 0, 5000, &[]), 4096, true),
            Outcome::Fail(IoError::ControllerFailed(_))
        ));
        assert!(matches!(
            evaluate(&resp(response::BUSY, 0, 0, &[]), 0, false),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            evaluate(&resp(response::BAD_TARGET, 0, 0, &[]), 0, false),
            Outcome::Fail(_)
        ));
        assert!(matches!(
            evaluate(&resp(response::UNSET, 0, 0, &[]), 0, false),
            Outcome::Fail(IoError::ControllerFailed(_))
        ));
        // An undefined response code fails the I/O, not the controller (found by the
        // scsi_device fuzz target: TMF-only codes such as INCORRECT_LUN on a command).
        for code in [
            200,
            response::FUNCTION_REJECTED,
            response::INCORRECT_LUN + 2,
        ] {
            assert!(matches!(
                evaluate(&resp(code, 0, 0, &[]), 0, false),
                Outcome::Fail(IoError::Scsi(_))
            ));
        }
        assert!(matches!(
            evaluate(&resp(0, 0x08, 0, &[]), 0, false),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            evaluate(&resp(0, 0x28, 0, &[]), 0, false),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            evaluate(&resp(0, 0x18, 0, &[]), 0, false),
            Outcome::Fail(_)
        ));
        // CHECK CONDITION, fixed sense: UNIT ATTENTION 29/00.
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = 0x06;
        s[7] = 10;
        s[12] = 0x29;
        match evaluate(&resp(0, 0x02, 0, &s), 0, false) {
            Outcome::Check(sense) => {
                assert!(sense_is_retryable(&sense));
                assert_eq!(
                    sense_error(&sense),
                    IoError::Sense {
                        key: 6,
                        asc: 0x29,
                        ascq: 0
                    }
                );
            }
            o => panic!("{o:?}"),
        }
        // MEDIUM ERROR is not retried.
        s[2] = 0x03;
        s[12] = 0x11;
        match evaluate(&resp(0, 0x02, 0, &s), 0, false) {
            Outcome::Check(sense) => assert!(!sense_is_retryable(&sense)),
            o => panic!("{o:?}"),
        }
        // Garbage sense.
        assert!(matches!(
            evaluate(&resp(0, 0x02, 0, &[1, 2]), 0, false),
            Outcome::Fail(_)
        ));
    }

    #[test]
    fn resp_parse_bounds_sense_len() {
        let mut b = vec![0u8; RESP_HEADER + 96];
        b[0..4].copy_from_slice(&1000u32.to_le_bytes());
        let r = Resp::parse(&b).unwrap();
        assert_eq!(r.sense.len(), 96);
        assert!(Resp::parse(&b[..5]).is_none());
    }

    #[test]
    fn config_parse() {
        let mut b = [0u8; CONFIG_LEN];
        b[0] = 2;
        b[20] = 96;
        b[24] = 32;
        b[30] = 7;
        let c = ScsiConfig::parse(&b).unwrap();
        assert_eq!(
            (c.num_queues, c.sense_size, c.cdb_size, c.max_target),
            (2, 96, 32, 7)
        );
        assert!(ScsiConfig::parse(&b[..30]).is_none());
    }
}
