//! SCSI status byte (SAM-5).

use std::fmt;

/// The SCSI status of a completed command.
///
/// Every byte value decodes: codes this crate does not name (including the
/// obsolete INTERMEDIATE ones) become [`Status::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// 00h: the command completed.
    Good,
    /// 02h: sense data describes an error or an event.
    CheckCondition,
    /// 04h: the requested operation is satisfied (PRE-FETCH).
    ConditionMet,
    /// 08h: the logical unit is busy; retry later.
    Busy,
    /// 18h: a reservation held by another initiator blocks the command.
    ReservationConflict,
    /// 28h: the task set is full; retry when a command completes.
    TaskSetFull,
    /// 30h: an ACA condition is active.
    AcaActive,
    /// 40h: the command was aborted by another I_T nexus.
    TaskAborted,
    /// Any other value.
    Other(u8),
}

impl Status {
    /// Decodes a status byte; never fails.
    pub const fn from_u8(v: u8) -> Self {
        match v {
            0x00 => Status::Good,
            0x02 => Status::CheckCondition,
            0x04 => Status::ConditionMet,
            0x08 => Status::Busy,
            0x18 => Status::ReservationConflict,
            0x28 => Status::TaskSetFull,
            0x30 => Status::AcaActive,
            0x40 => Status::TaskAborted,
            other => Status::Other(other),
        }
    }

    /// The status byte on the wire.
    pub const fn to_u8(self) -> u8 {
        match self {
            Status::Good => 0x00,
            Status::CheckCondition => 0x02,
            Status::ConditionMet => 0x04,
            Status::Busy => 0x08,
            Status::ReservationConflict => 0x18,
            Status::TaskSetFull => 0x28,
            Status::AcaActive => 0x30,
            Status::TaskAborted => 0x40,
            Status::Other(v) => v,
        }
    }

    /// GOOD or CONDITION MET: the command succeeded.
    pub const fn is_success(self) -> bool {
        matches!(self, Status::Good | Status::ConditionMet)
    }

    /// BUSY or TASK SET FULL: the target had no room; the same command may
    /// simply be sent again.
    pub const fn is_retryable(self) -> bool {
        matches!(self, Status::Busy | Status::TaskSetFull)
    }
}

impl From<u8> for Status {
    fn from(v: u8) -> Self {
        Status::from_u8(v)
    }
}

impl From<Status> for u8 {
    fn from(s: Status) -> u8 {
        s.to_u8()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Good => f.write_str("GOOD"),
            Status::CheckCondition => f.write_str("CHECK CONDITION"),
            Status::ConditionMet => f.write_str("CONDITION MET"),
            Status::Busy => f.write_str("BUSY"),
            Status::ReservationConflict => f.write_str("RESERVATION CONFLICT"),
            Status::TaskSetFull => f.write_str("TASK SET FULL"),
            Status::AcaActive => f.write_str("ACA ACTIVE"),
            Status::TaskAborted => f.write_str("TASK ABORTED"),
            Status::Other(v) => write!(f, "status {v:#04x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_round_trips() {
        for v in 0..=u8::MAX {
            let s = Status::from(v);
            assert_eq!(u8::from(s), v);
        }
    }

    #[test]
    fn known_codes() {
        assert_eq!(Status::from_u8(0x00), Status::Good);
        assert_eq!(Status::from_u8(0x02), Status::CheckCondition);
        assert_eq!(Status::from_u8(0x04), Status::ConditionMet);
        assert_eq!(Status::from_u8(0x08), Status::Busy);
        assert_eq!(Status::from_u8(0x18), Status::ReservationConflict);
        assert_eq!(Status::from_u8(0x28), Status::TaskSetFull);
        assert_eq!(Status::from_u8(0x30), Status::AcaActive);
        assert_eq!(Status::from_u8(0x40), Status::TaskAborted);
        assert_eq!(Status::from_u8(0x10), Status::Other(0x10));
    }

    #[test]
    fn helpers() {
        assert!(Status::Good.is_success());
        assert!(Status::ConditionMet.is_success());
        assert!(!Status::CheckCondition.is_success());
        assert!(Status::Busy.is_retryable());
        assert!(Status::TaskSetFull.is_retryable());
        assert!(!Status::ReservationConflict.is_retryable());
        assert_eq!(Status::Busy.to_string(), "BUSY");
        assert_eq!(Status::Other(0x22).to_string(), "status 0x22");
    }
}
