//! virtio-scsi framing (virtio 1.2, 5.6.6): the LUN field, command requests and responses,
//! control queue requests (task management and asynchronous notification) and events. Pure
//! functions over bytes, so every rule is unit tested on its own.

use std::fmt;

use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_EVT_RESET_HARD, VIRTIO_SCSI_EVT_RESET_REMOVED, VIRTIO_SCSI_EVT_RESET_RESCAN,
    VIRTIO_SCSI_S_ABORTED, VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_BUSY, VIRTIO_SCSI_S_FAILURE,
    VIRTIO_SCSI_S_FUNCTION_REJECTED, VIRTIO_SCSI_S_FUNCTION_SUCCEEDED, VIRTIO_SCSI_S_INCORRECT_LUN,
    VIRTIO_SCSI_S_NEXUS_FAILURE, VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_OVERRUN, VIRTIO_SCSI_S_RESET,
    VIRTIO_SCSI_S_TARGET_FAILURE, VIRTIO_SCSI_S_TRANSPORT_FAILURE, VIRTIO_SCSI_T_AN_QUERY,
    VIRTIO_SCSI_T_AN_SUBSCRIBE, VIRTIO_SCSI_T_EVENTS_MISSED, VIRTIO_SCSI_T_NO_EVENT,
    VIRTIO_SCSI_T_PARAM_CHANGE, VIRTIO_SCSI_T_TMF, VIRTIO_SCSI_T_TMF_ABORT_TASK,
    VIRTIO_SCSI_T_TMF_ABORT_TASK_SET, VIRTIO_SCSI_T_TMF_CLEAR_ACA,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET, VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, VIRTIO_SCSI_T_TRANSPORT_RESET,
};

/// Bytes of `virtio_scsi_cmd_req` before the CDB: `lun[8]`, `tag`, `task_attr`, `prio`, `crn`.
pub const CMD_REQ_HEADER_SIZE: usize = 19;
/// Bytes of `virtio_scsi_cmd_resp` before the sense buffer: `sense_len`, `resid`,
/// `status_qualifier`, `status`, `response`.
pub const CMD_RESP_HEADER_SIZE: usize = 12;
/// Bytes of `virtio_scsi_ctrl_tmf_req`: `type`, `subtype`, `lun[8]`, `tag`.
pub const TMF_REQ_SIZE: usize = 24;
/// Bytes of `virtio_scsi_ctrl_tmf_resp`: `response`.
pub const TMF_RESP_SIZE: usize = 1;
/// Bytes of `virtio_scsi_ctrl_an_req`: `type`, `lun[8]`, `event_requested`.
pub const AN_REQ_SIZE: usize = 16;
/// Bytes of `virtio_scsi_ctrl_an_resp`: `event_actual`, `response`.
pub const AN_RESP_SIZE: usize = 5;
/// Bytes of `virtio_scsi_event`: `event`, `lun[8]`, `reason`.
pub const EVENT_SIZE: usize = 16;

/// The `response` byte of a command, TMF or AN completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Response {
    /// `VIRTIO_SCSI_S_OK` (also FUNCTION COMPLETE of a TMF).
    Ok,
    /// `VIRTIO_SCSI_S_OVERRUN`: the CDB needs more data than the buffers hold.
    Overrun,
    /// `VIRTIO_SCSI_S_ABORTED`.
    Aborted,
    /// `VIRTIO_SCSI_S_BAD_TARGET`: the target named by the LUN field does not exist.
    BadTarget,
    /// `VIRTIO_SCSI_S_RESET`.
    Reset,
    /// `VIRTIO_SCSI_S_BUSY`: retrying on the same path is likely to work.
    Busy,
    /// `VIRTIO_SCSI_S_TRANSPORT_FAILURE`.
    TransportFailure,
    /// `VIRTIO_SCSI_S_TARGET_FAILURE`.
    TargetFailure,
    /// `VIRTIO_SCSI_S_NEXUS_FAILURE`.
    NexusFailure,
    /// `VIRTIO_SCSI_S_FAILURE`: any other host or driver error.
    Failure,
    /// `VIRTIO_SCSI_S_FUNCTION_SUCCEEDED` (TMF).
    FunctionSucceeded,
    /// `VIRTIO_SCSI_S_FUNCTION_REJECTED` (TMF).
    FunctionRejected,
    /// `VIRTIO_SCSI_S_INCORRECT_LUN` (TMF).
    IncorrectLun,
    /// Any other value (for fault injection).
    Other(u8),
}

impl Response {
    /// FUNCTION COMPLETE of a task management function (the same byte as OK).
    pub const FUNCTION_COMPLETE: Response = Response::Ok;

    /// The byte on the wire.
    pub const fn to_u8(self) -> u8 {
        (match self {
            Response::Ok => VIRTIO_SCSI_S_OK,
            Response::Overrun => VIRTIO_SCSI_S_OVERRUN,
            Response::Aborted => VIRTIO_SCSI_S_ABORTED,
            Response::BadTarget => VIRTIO_SCSI_S_BAD_TARGET,
            Response::Reset => VIRTIO_SCSI_S_RESET,
            Response::Busy => VIRTIO_SCSI_S_BUSY,
            Response::TransportFailure => VIRTIO_SCSI_S_TRANSPORT_FAILURE,
            Response::TargetFailure => VIRTIO_SCSI_S_TARGET_FAILURE,
            Response::NexusFailure => VIRTIO_SCSI_S_NEXUS_FAILURE,
            Response::Failure => VIRTIO_SCSI_S_FAILURE,
            Response::FunctionSucceeded => VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
            Response::FunctionRejected => VIRTIO_SCSI_S_FUNCTION_REJECTED,
            Response::IncorrectLun => VIRTIO_SCSI_S_INCORRECT_LUN,
            Response::Other(v) => v as u32,
        }) as u8
    }

    /// Decodes a response byte; never fails.
    pub const fn from_u8(v: u8) -> Self {
        match v as u32 {
            VIRTIO_SCSI_S_OK => Response::Ok,
            VIRTIO_SCSI_S_OVERRUN => Response::Overrun,
            VIRTIO_SCSI_S_ABORTED => Response::Aborted,
            VIRTIO_SCSI_S_BAD_TARGET => Response::BadTarget,
            VIRTIO_SCSI_S_RESET => Response::Reset,
            VIRTIO_SCSI_S_BUSY => Response::Busy,
            VIRTIO_SCSI_S_TRANSPORT_FAILURE => Response::TransportFailure,
            VIRTIO_SCSI_S_TARGET_FAILURE => Response::TargetFailure,
            VIRTIO_SCSI_S_NEXUS_FAILURE => Response::NexusFailure,
            VIRTIO_SCSI_S_FAILURE => Response::Failure,
            VIRTIO_SCSI_S_FUNCTION_SUCCEEDED => Response::FunctionSucceeded,
            VIRTIO_SCSI_S_FUNCTION_REJECTED => Response::FunctionRejected,
            VIRTIO_SCSI_S_INCORRECT_LUN => Response::IncorrectLun,
            _ => Response::Other(v),
        }
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Response::Ok => "OK",
            Response::Overrun => "OVERRUN",
            Response::Aborted => "ABORTED",
            Response::BadTarget => "BAD_TARGET",
            Response::Reset => "RESET",
            Response::Busy => "BUSY",
            Response::TransportFailure => "TRANSPORT_FAILURE",
            Response::TargetFailure => "TARGET_FAILURE",
            Response::NexusFailure => "NEXUS_FAILURE",
            Response::Failure => "FAILURE",
            Response::FunctionSucceeded => "FUNCTION_SUCCEEDED",
            Response::FunctionRejected => "FUNCTION_REJECTED",
            Response::IncorrectLun => "INCORRECT_LUN",
            Response::Other(v) => return write!(f, "response {v}"),
        };
        f.write_str(name)
    }
}

/// Which logical unit of a target a LUN field names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitAddress {
    /// A logical unit number (peripheral or flat space addressing, single level).
    Lun(u16),
    /// The REPORT LUNS well-known logical unit (C101h).
    ReportLunsWellKnown,
    /// A form this target does not implement (multi-level, other address methods, a non-zero
    /// bus): no logical unit answers to it.
    Unsupported,
}

/// A decoded virtio-scsi LUN field: `lun[0] = 1`, `lun[1]` the target, `lun[2..4]` the
/// single-level LUN (SAM-5 flat space `0x40 | lun >> 8, lun & 0xff`, or peripheral `0, lun`),
/// `lun[4..8]` zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VirtioLun {
    /// The target (`lun[1]`).
    pub target: u8,
    /// The logical unit within it.
    pub unit: UnitAddress,
}

/// A LUN field that names no target at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("LUN field starts with {first:#04x}, not 1")]
pub struct LunFieldError {
    /// The first byte found.
    pub first: u8,
}

/// Decodes the 8-byte LUN field of a request. Only `lun[0] != 1` is an error (no target is
/// addressed); an unusable LUN level yields [`UnitAddress::Unsupported`].
pub fn decode_lun(lun: &[u8; 8]) -> Result<VirtioLun, LunFieldError> {
    if lun[0] != 1 {
        return Err(LunFieldError { first: lun[0] });
    }
    let (b2, b3) = (lun[2], lun[3]);
    let unit = if lun[4..].iter().any(|&b| b != 0) {
        UnitAddress::Unsupported
    } else {
        match b2 >> 6 {
            0 if b2 & 0x3f == 0 => UnitAddress::Lun(u16::from(b3)),
            1 => UnitAddress::Lun(u16::from_be_bytes([b2 & 0x3f, b3])),
            3 if b2 == 0xc1 && b3 == 0x01 => UnitAddress::ReportLunsWellKnown,
            _ => UnitAddress::Unsupported,
        }
    };
    Ok(VirtioLun {
        target: lun[1],
        unit,
    })
}

/// Encodes the LUN field for `lun` (at most 16383) of `target` with flat space addressing, as
/// Linux's virtio_scsi does.
pub fn encode_lun(target: u8, lun: u16) -> [u8; 8] {
    let [hi, lo] = (lun & 0x3fff).to_be_bytes();
    [1, target, 0x40 | hi, lo, 0, 0, 0, 0]
}

/// Encodes the LUN field of an event for `lun` of `target` the way REPORT LUNS numbers it:
/// peripheral device addressing below 256, flat space addressing above, as QEMU does (Linux's
/// virtio_scsi reads `lun[2..4]` of an event as the number REPORT LUNS gave it).
pub fn encode_event_lun(target: u8, lun: u16) -> [u8; 8] {
    let [hi, lo] = (lun & 0x3fff).to_be_bytes();
    let b2 = if lun >= 256 { 0x40 | hi } else { 0 };
    [1, target, b2, lo, 0, 0, 0, 0]
}

/// A request shorter than its fixed part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {got} bytes, {need} needed")]
pub struct ShortRequest {
    /// The structure.
    pub what: &'static str,
    /// Bytes needed.
    pub need: usize,
    /// Bytes available.
    pub got: usize,
}

fn fixed<'a, const N: usize>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<&'a [u8; N], ShortRequest> {
    bytes.first_chunk::<N>().ok_or(ShortRequest {
        what,
        need: N,
        got: bytes.len(),
    })
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

/// The fixed part of `virtio_scsi_cmd_req` (the CDB follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdReqHeader {
    /// The LUN field.
    pub lun: [u8; 8],
    /// The command identifier.
    pub tag: u64,
    /// Task attribute (SIMPLE, ORDERED, HEAD OF QUEUE, ACA).
    pub task_attr: u8,
    /// Priority.
    pub prio: u8,
    /// Command reference number.
    pub crn: u8,
}

impl CmdReqHeader {
    /// Decodes the first [`CMD_REQ_HEADER_SIZE`] bytes of a request.
    pub fn parse(bytes: &[u8]) -> Result<Self, ShortRequest> {
        let b = fixed::<CMD_REQ_HEADER_SIZE>(bytes, "virtio-scsi command request")?;
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&b[..8]);
        Ok(CmdReqHeader {
            lun,
            tag: le64(b, 8),
            task_attr: b[16],
            prio: b[17],
            crn: b[18],
        })
    }

    /// Encodes the header (for tests and front-ends).
    pub fn to_bytes(&self) -> [u8; CMD_REQ_HEADER_SIZE] {
        let mut b = [0u8; CMD_REQ_HEADER_SIZE];
        b[..8].copy_from_slice(&self.lun);
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16] = self.task_attr;
        b[17] = self.prio;
        b[18] = self.crn;
        b
    }
}

/// The fixed part of `virtio_scsi_cmd_resp` (the sense buffer follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CmdRespHeader {
    /// Bytes of sense data written to the sense buffer.
    pub sense_len: u32,
    /// Residual: data buffer bytes not transferred.
    pub resid: u32,
    /// Status qualifier (SAM-5), 0 here.
    pub status_qualifier: u16,
    /// SCSI status byte.
    pub status: u8,
    /// virtio-scsi response byte.
    pub response: u8,
}

impl CmdRespHeader {
    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; CMD_RESP_HEADER_SIZE] {
        let mut b = [0u8; CMD_RESP_HEADER_SIZE];
        b[0..4].copy_from_slice(&self.sense_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.resid.to_le_bytes());
        b[8..10].copy_from_slice(&self.status_qualifier.to_le_bytes());
        b[10] = self.status;
        b[11] = self.response;
        b
    }

    /// Decodes a header (for tests and front-ends).
    pub fn parse(bytes: &[u8]) -> Result<Self, ShortRequest> {
        let b = fixed::<CMD_RESP_HEADER_SIZE>(bytes, "virtio-scsi command response")?;
        Ok(CmdRespHeader {
            sense_len: le32(b, 0),
            resid: le32(b, 4),
            status_qualifier: u16::from_le_bytes([b[8], b[9]]),
            status: b[10],
            response: b[11],
        })
    }
}

/// A task management function (`subtype` of a TMF request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TmfFunction {
    /// ABORT TASK.
    AbortTask,
    /// ABORT TASK SET.
    AbortTaskSet,
    /// CLEAR ACA.
    ClearAca,
    /// CLEAR TASK SET.
    ClearTaskSet,
    /// I_T NEXUS RESET.
    ItNexusReset,
    /// LOGICAL UNIT RESET.
    LogicalUnitReset,
    /// QUERY TASK.
    QueryTask,
    /// QUERY TASK SET.
    QueryTaskSet,
    /// Any other subtype.
    Unknown(u32),
}

impl TmfFunction {
    /// Decodes a subtype.
    pub const fn from_raw(v: u32) -> Self {
        match v {
            VIRTIO_SCSI_T_TMF_ABORT_TASK => TmfFunction::AbortTask,
            VIRTIO_SCSI_T_TMF_ABORT_TASK_SET => TmfFunction::AbortTaskSet,
            VIRTIO_SCSI_T_TMF_CLEAR_ACA => TmfFunction::ClearAca,
            VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET => TmfFunction::ClearTaskSet,
            VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET => TmfFunction::ItNexusReset,
            VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET => TmfFunction::LogicalUnitReset,
            VIRTIO_SCSI_T_TMF_QUERY_TASK => TmfFunction::QueryTask,
            VIRTIO_SCSI_T_TMF_QUERY_TASK_SET => TmfFunction::QueryTaskSet,
            other => TmfFunction::Unknown(other),
        }
    }

    /// The subtype on the wire.
    pub const fn to_raw(self) -> u32 {
        match self {
            TmfFunction::AbortTask => VIRTIO_SCSI_T_TMF_ABORT_TASK,
            TmfFunction::AbortTaskSet => VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
            TmfFunction::ClearAca => VIRTIO_SCSI_T_TMF_CLEAR_ACA,
            TmfFunction::ClearTaskSet => VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
            TmfFunction::ItNexusReset => VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
            TmfFunction::LogicalUnitReset => VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
            TmfFunction::QueryTask => VIRTIO_SCSI_T_TMF_QUERY_TASK,
            TmfFunction::QueryTaskSet => VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
            TmfFunction::Unknown(v) => v,
        }
    }
}

/// A request of the control queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    /// `VIRTIO_SCSI_T_TMF`.
    Tmf {
        /// The function.
        function: TmfFunction,
        /// The LUN field.
        lun: [u8; 8],
        /// Tag of the task the function names (ABORT TASK, QUERY TASK).
        tag: u64,
    },
    /// `VIRTIO_SCSI_T_AN_QUERY` or `VIRTIO_SCSI_T_AN_SUBSCRIBE`.
    AsyncNotification {
        /// Subscribe (true) or query.
        subscribe: bool,
        /// The LUN field.
        lun: [u8; 8],
        /// Event classes asked for.
        event_requested: u32,
    },
    /// Any other type: its layout is unknown.
    Unknown(u32),
}

impl ControlRequest {
    /// Decodes the device-readable part of a control queue request.
    pub fn parse(bytes: &[u8]) -> Result<Self, ShortRequest> {
        let ty = le32(fixed::<4>(bytes, "virtio-scsi control request")?, 0);
        match ty {
            VIRTIO_SCSI_T_TMF => {
                let b = fixed::<TMF_REQ_SIZE>(bytes, "virtio-scsi TMF request")?;
                let mut lun = [0u8; 8];
                lun.copy_from_slice(&b[8..16]);
                Ok(ControlRequest::Tmf {
                    function: TmfFunction::from_raw(le32(b, 4)),
                    lun,
                    tag: le64(b, 16),
                })
            }
            VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE => {
                let b = fixed::<AN_REQ_SIZE>(bytes, "virtio-scsi AN request")?;
                let mut lun = [0u8; 8];
                lun.copy_from_slice(&b[4..12]);
                Ok(ControlRequest::AsyncNotification {
                    subscribe: ty == VIRTIO_SCSI_T_AN_SUBSCRIBE,
                    lun,
                    event_requested: le32(b, 12),
                })
            }
            other => Ok(ControlRequest::Unknown(other)),
        }
    }

    /// Bytes of the device-writable response of this request (0 for unknown types).
    pub fn response_size(&self) -> usize {
        match self {
            ControlRequest::Tmf { .. } => TMF_RESP_SIZE,
            ControlRequest::AsyncNotification { .. } => AN_RESP_SIZE,
            ControlRequest::Unknown(_) => 0,
        }
    }

    /// Encodes the request (for tests and front-ends).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match *self {
            ControlRequest::Tmf { function, lun, tag } => {
                v.extend_from_slice(&VIRTIO_SCSI_T_TMF.to_le_bytes());
                v.extend_from_slice(&function.to_raw().to_le_bytes());
                v.extend_from_slice(&lun);
                v.extend_from_slice(&tag.to_le_bytes());
            }
            ControlRequest::AsyncNotification {
                subscribe,
                lun,
                event_requested,
            } => {
                let ty = if subscribe {
                    VIRTIO_SCSI_T_AN_SUBSCRIBE
                } else {
                    VIRTIO_SCSI_T_AN_QUERY
                };
                v.extend_from_slice(&ty.to_le_bytes());
                v.extend_from_slice(&lun);
                v.extend_from_slice(&event_requested.to_le_bytes());
            }
            ControlRequest::Unknown(ty) => v.extend_from_slice(&ty.to_le_bytes()),
        }
        v
    }
}

/// The `virtio_scsi_ctrl_an_resp` answer: no event class supported.
pub fn an_response(response: Response) -> [u8; AN_RESP_SIZE] {
    let mut b = [0u8; AN_RESP_SIZE];
    b[4] = response.to_u8();
    b
}

/// Why a transport reset event is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetReason {
    /// `VIRTIO_SCSI_EVT_RESET_HARD`.
    Hard,
    /// `VIRTIO_SCSI_EVT_RESET_RESCAN`: a logical unit appeared.
    Rescan,
    /// `VIRTIO_SCSI_EVT_RESET_REMOVED`: a logical unit went away.
    Removed,
}

impl ResetReason {
    /// The `reason` field.
    pub const fn to_raw(self) -> u32 {
        match self {
            ResetReason::Hard => VIRTIO_SCSI_EVT_RESET_HARD,
            ResetReason::Rescan => VIRTIO_SCSI_EVT_RESET_RESCAN,
            ResetReason::Removed => VIRTIO_SCSI_EVT_RESET_REMOVED,
        }
    }
}

/// A `virtio_scsi_event` for the event queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The `event` field (type, with [`Event::EVENTS_MISSED`] possibly or-ed in).
    pub event: u32,
    /// The LUN field.
    pub lun: [u8; 8],
    /// The `reason` field.
    pub reason: u32,
}

impl Event {
    /// Flag or-ed into `event` when the device had to drop events for lack of buffers.
    pub const EVENTS_MISSED: u32 = VIRTIO_SCSI_T_EVENTS_MISSED;

    /// `VIRTIO_SCSI_T_TRANSPORT_RESET` for a logical unit (LUN field as [`encode_event_lun`]).
    pub fn transport_reset(target: u8, lun: u16, reason: ResetReason) -> Self {
        Event {
            event: VIRTIO_SCSI_T_TRANSPORT_RESET,
            lun: encode_event_lun(target, lun),
            reason: reason.to_raw(),
        }
    }

    /// `VIRTIO_SCSI_T_PARAM_CHANGE` with the unit attention's ASC in bits 0-7 and ASCQ in bits
    /// 8-15 of `reason` (LUN field as [`encode_event_lun`]).
    pub fn param_change(target: u8, lun: u16, asc: u8, ascq: u8) -> Self {
        Event {
            event: VIRTIO_SCSI_T_PARAM_CHANGE,
            lun: encode_event_lun(target, lun),
            reason: u32::from(asc) | u32::from(ascq) << 8,
        }
    }

    /// `VIRTIO_SCSI_T_NO_EVENT` (sent with [`Event::EVENTS_MISSED`] to report dropped events).
    pub fn no_event() -> Self {
        Event {
            event: VIRTIO_SCSI_T_NO_EVENT,
            lun: [0; 8],
            reason: 0,
        }
    }

    /// The same event with the missed-events flag set.
    pub fn with_missed(mut self) -> Self {
        self.event |= Self::EVENTS_MISSED;
        self
    }

    /// Encodes the event.
    pub fn to_bytes(&self) -> [u8; EVENT_SIZE] {
        let mut b = [0u8; EVENT_SIZE];
        b[0..4].copy_from_slice(&self.event.to_le_bytes());
        b[4..12].copy_from_slice(&self.lun);
        b[12..16].copy_from_slice(&self.reason.to_le_bytes());
        b
    }

    /// Decodes an event (for tests and front-ends).
    pub fn parse(bytes: &[u8]) -> Result<Self, ShortRequest> {
        let b = fixed::<EVENT_SIZE>(bytes, "virtio-scsi event")?;
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&b[4..12]);
        Ok(Event {
            event: le32(b, 0),
            lun,
            reason: le32(b, 12),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;
    use virtio_bindings::virtio_scsi::{
        virtio_scsi_cmd_req, virtio_scsi_cmd_resp, virtio_scsi_ctrl_an_req,
        virtio_scsi_ctrl_an_resp, virtio_scsi_ctrl_tmf_req, virtio_scsi_ctrl_tmf_resp,
        virtio_scsi_event,
    };

    #[test]
    fn sizes_match_the_spec_structs() {
        assert_eq!(size_of::<virtio_scsi_cmd_req>(), CMD_REQ_HEADER_SIZE + 32);
        assert_eq!(size_of::<virtio_scsi_cmd_resp>(), CMD_RESP_HEADER_SIZE + 96);
        assert_eq!(size_of::<virtio_scsi_ctrl_tmf_req>(), TMF_REQ_SIZE);
        assert_eq!(size_of::<virtio_scsi_ctrl_tmf_resp>(), TMF_RESP_SIZE);
        assert_eq!(size_of::<virtio_scsi_ctrl_an_req>(), AN_REQ_SIZE);
        assert_eq!(size_of::<virtio_scsi_ctrl_an_resp>(), AN_RESP_SIZE);
        assert_eq!(size_of::<virtio_scsi_event>(), EVENT_SIZE);
    }

    #[test]
    fn lun_field_decoding() {
        let lun = |b: [u8; 8]| decode_lun(&b);
        // Linux: flat space for every LUN, LUN 0 included.
        assert_eq!(
            lun([1, 3, 0x40, 0, 0, 0, 0, 0]),
            Ok(VirtioLun {
                target: 3,
                unit: UnitAddress::Lun(0)
            })
        );
        assert_eq!(
            lun([1, 0, 0x41, 0x02, 0, 0, 0, 0]).unwrap().unit,
            UnitAddress::Lun(0x102)
        );
        assert_eq!(
            lun([1, 0, 0x7f, 0xff, 0, 0, 0, 0]).unwrap().unit,
            UnitAddress::Lun(0x3fff)
        );
        // Peripheral device addressing, bus 0.
        assert_eq!(
            lun([1, 9, 0, 7, 0, 0, 0, 0]).unwrap(),
            VirtioLun {
                target: 9,
                unit: UnitAddress::Lun(7)
            }
        );
        // Peripheral with a bus, logical unit addressing, multi-level: no unit.
        for b in [
            [1, 0, 0x01, 0, 0, 0, 0, 0],
            [1, 0, 0x80, 0, 0, 0, 0, 0],
            [1, 0, 0x40, 0, 0, 1, 0, 0],
            [1, 0, 0xc1, 0x02, 0, 0, 0, 0],
        ] {
            assert_eq!(lun(b).unwrap().unit, UnitAddress::Unsupported, "{b:?}");
        }
        assert_eq!(
            lun([1, 0, 0xc1, 0x01, 0, 0, 0, 0]).unwrap().unit,
            UnitAddress::ReportLunsWellKnown
        );
        assert_eq!(
            lun([0, 0, 0x40, 0, 0, 0, 0, 0]),
            Err(LunFieldError { first: 0 })
        );
        assert_eq!(lun([2; 8]), Err(LunFieldError { first: 2 }));
    }

    #[test]
    fn lun_field_roundtrip() {
        for t in [0u8, 1, 200, 255] {
            for l in [0u16, 1, 255, 256, 4095, 0x3fff] {
                let b = encode_lun(t, l);
                assert_eq!(b[0], 1);
                assert_eq!(b[2] & 0xc0, 0x40);
                assert_eq!(
                    decode_lun(&b),
                    Ok(VirtioLun {
                        target: t,
                        unit: UnitAddress::Lun(l)
                    })
                );
            }
        }
    }

    #[test]
    fn command_header_roundtrip_and_short() {
        let h = CmdReqHeader {
            lun: encode_lun(1, 2),
            tag: 0x0102_0304_0506_0708,
            task_attr: 1,
            prio: 2,
            crn: 3,
        };
        let b = h.to_bytes();
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(CmdReqHeader::parse(&b), Ok(h));
        assert_eq!(
            CmdReqHeader::parse(&b[..18]),
            Err(ShortRequest {
                what: "virtio-scsi command request",
                need: 19,
                got: 18
            })
        );
        let r = CmdRespHeader {
            sense_len: 18,
            resid: 512,
            status_qualifier: 0,
            status: 2,
            response: Response::Ok.to_u8(),
        };
        let rb = r.to_bytes();
        assert_eq!(rb, [18, 0, 0, 0, 0, 2, 0, 0, 0, 0, 2, 0]);
        assert_eq!(CmdRespHeader::parse(&rb), Ok(r));
        assert!(CmdRespHeader::parse(&rb[..11]).is_err());
    }

    #[test]
    fn response_codes() {
        for v in 0..=255u8 {
            assert_eq!(Response::from_u8(v).to_u8(), v);
        }
        assert_eq!(Response::BadTarget.to_u8(), 3);
        assert_eq!(Response::IncorrectLun.to_u8(), 12);
        assert_eq!(Response::FUNCTION_COMPLETE.to_u8(), 0);
        assert_eq!(Response::Other(77).to_string(), "response 77");
        assert_eq!(Response::Busy.to_string(), "BUSY");
    }

    #[test]
    fn control_requests() {
        let tmf = ControlRequest::Tmf {
            function: TmfFunction::LogicalUnitReset,
            lun: encode_lun(0, 5),
            tag: 42,
        };
        let b = tmf.to_bytes();
        assert_eq!(b.len(), TMF_REQ_SIZE);
        assert_eq!(ControlRequest::parse(&b), Ok(tmf));
        assert_eq!(tmf.response_size(), 1);
        assert!(ControlRequest::parse(&b[..20]).is_err());

        let an = ControlRequest::AsyncNotification {
            subscribe: true,
            lun: encode_lun(0, 0),
            event_requested: 0x54,
        };
        let b = an.to_bytes();
        assert_eq!(b.len(), AN_REQ_SIZE);
        assert_eq!(ControlRequest::parse(&b), Ok(an));
        assert_eq!(an.response_size(), 5);

        assert_eq!(
            ControlRequest::parse(&9u32.to_le_bytes()),
            Ok(ControlRequest::Unknown(9))
        );
        assert!(ControlRequest::parse(&[0, 0]).is_err());
        for f in 0..10 {
            assert_eq!(TmfFunction::from_raw(f).to_raw(), f);
        }
        assert_eq!(an_response(Response::Ok), [0; 5]);
    }

    #[test]
    fn events() {
        let e = Event::transport_reset(2, 0x105, ResetReason::Removed);
        let b = e.to_bytes();
        assert_eq!(&b[0..4], &1u32.to_le_bytes());
        assert_eq!(&b[4..12], &[1, 2, 0x41, 0x05, 0, 0, 0, 0]);
        assert_eq!(&b[12..16], &2u32.to_le_bytes());
        assert_eq!(Event::parse(&b), Ok(e));
        let p = Event::param_change(0, 1, 0x2a, 0x09);
        assert_eq!(
            p.lun,
            [1, 0, 0, 1, 0, 0, 0, 0],
            "peripheral addressing below 256"
        );
        assert_eq!(
            decode_lun(&p.lun).unwrap().unit,
            UnitAddress::Lun(1),
            "decodes like a command's LUN field"
        );
        assert_eq!(p.event, 3);
        assert_eq!(p.reason, 0x092a);
        let m = Event::no_event().with_missed();
        assert_eq!(m.event, 0x8000_0000);
        assert_eq!(
            Event::transport_reset(0, 0, ResetReason::Rescan)
                .with_missed()
                .event,
            0x8000_0001
        );
        assert_eq!(ResetReason::Hard.to_raw(), 0);
        assert!(Event::parse(&b[..15]).is_err());
    }
}
