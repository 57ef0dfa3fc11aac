//! The channel's table of submitted I/Os (*parents*), one slot each, kept in place
//! until the I/O completes: no moves of the whole record on the I/O path.

use vireo_virtio::DmaBuf;

use super::deadline::Escalation;
use crate::error::IoError;
use crate::io::{IoBuf, IoOp};

/// One submitted I/O.
pub(crate) struct Parent {
    pub(crate) user_data: u64,
    pub(crate) op: IoOp,
    /// The slot holds an I/O.
    pub(crate) active: bool,
    pub(crate) bytes: u64,
    /// Device requests not yet completed.
    pub(crate) remaining: u32,
    /// The first error of its requests.
    pub(crate) error: Option<IoError>,
    pub(crate) buf: Option<IoBuf>,
    /// Vectored buffers of the request.
    pub(crate) iov: Vec<IoBuf>,
    pub(crate) bounce: Option<DmaBuf>,
    /// Submission time in clock ticks.
    pub(crate) start: u64,
    /// Clock ticks past which the I/O times out or escalates (0: no limit).
    pub(crate) deadline: u64,
    /// The caller got a timeout error; the device still holds the request.
    pub(crate) timed_out: bool,
    /// The last escalation step taken for it.
    pub(crate) escalated: Escalation,
    /// The time limit in clock ticks (a step is taken each period).
    pub(crate) period: u64,
    /// A part of it was aborted by a controller reset: its buffers are never reused.
    pub(crate) aborted: bool,
}

impl Parent {
    const IDLE: Parent = Parent {
        user_data: 0,
        op: IoOp::Read,
        active: false,
        bytes: 0,
        remaining: 0,
        error: None,
        buf: None,
        iov: Vec::new(),
        bounce: None,
        start: 0,
        deadline: 0,
        timed_out: false,
        escalated: Escalation::None,
        period: 0,
        aborted: false,
    };
}

/// Slots of submitted I/Os; a slot's index is the `parent` of its device requests.
#[derive(Default)]
pub(crate) struct Parents {
    slots: Vec<Parent>,
    free: Vec<u32>,
}

impl Parents {
    /// A free slot (a new one when none is free).
    pub(crate) fn take(&mut self) -> u32 {
        match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Parent::IDLE);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Slot `slot` is free again.
    pub(crate) fn release(&mut self, slot: u32) {
        self.free.push(slot);
    }

    /// I/Os the device holds (taken slots).
    pub(crate) fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub(crate) fn get_mut(&mut self, slot: u32) -> Option<&mut Parent> {
        self.slots.get_mut(slot as usize)
    }

    pub(crate) fn slot_mut(&mut self, slot: u32) -> &mut Parent {
        &mut self.slots[slot as usize]
    }

    /// Active I/Os with their slot.
    pub(crate) fn active_mut(&mut self) -> impl Iterator<Item = (u32, &mut Parent)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter(|(_, p)| p.active)
            .map(|(i, p)| (i as u32, p))
    }
}
