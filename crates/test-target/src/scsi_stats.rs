//! Counters of the scsi target: every command by operation code, outcomes by virtio response,
//! SCSI status and sense code, the limits a front-end broke, and the shape of every UNMAP, so a
//! test can check how an initiator split its requests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vireo_scsi::{Asc, SenseKey, Status};

use crate::faults::StatCounters;
use crate::scsi_request::Response;

fn table(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn nonzero(t: &[AtomicU64]) -> BTreeMap<u8, u64> {
    t.iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let n = c.load(Ordering::Relaxed);
            (n != 0).then_some((i as u8, n))
        })
        .collect()
}

/// Counters shared by every queue and connection of a scsi target.
#[derive(Debug)]
pub(crate) struct ScsiCounters {
    pub commands: AtomicU64,
    opcodes: Vec<AtomicU64>,
    responses: Vec<AtomicU64>,
    statuses: Vec<AtomicU64>,
    sense: Mutex<BTreeMap<(u8, u8, u8), u64>>,
    unmap_descriptor_histogram: Mutex<BTreeMap<usize, u64>>,
    pub malformed: AtomicU64,
    pub no_unit: AtomicU64,
    pub seg_max_rejected: AtomicU64,
    pub max_sectors_exceeded: AtomicU64,
    pub max_data_segments: AtomicU64,
    pub max_data_bytes: AtomicU64,
    pub transfer_limit_rejected: AtomicU64,
    pub unmap_limit_rejected: AtomicU64,
    pub write_same_limit_rejected: AtomicU64,
    pub out_of_range: AtomicU64,
    pub read_only_rejected: AtomicU64,
    pub unit_attentions: AtomicU64,
    pub not_ready: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub blocks_unmapped: AtomicU64,
    pub blocks_written_same: AtomicU64,
    pub max_transfer_blocks: AtomicU64,
    pub max_unmap_descriptors: AtomicU64,
    pub max_unmap_descriptor_blocks: AtomicU64,
    pub max_unmap_command_blocks: AtomicU64,
    pub injected_errors: AtomicU64,
    pub tmf_abort_task: AtomicU64,
    pub tmf_abort_task_set: AtomicU64,
    pub tmf_lun_reset: AtomicU64,
    pub tmf_it_nexus_reset: AtomicU64,
    pub tmf_other: AtomicU64,
    pub tmf_unanswered: AtomicU64,
    pub an_requests: AtomicU64,
    pub events_sent: AtomicU64,
    pub events_dropped: AtomicU64,
}

impl Default for ScsiCounters {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        ScsiCounters {
            commands: z(),
            opcodes: table(256),
            responses: table(256),
            statuses: table(256),
            sense: Mutex::default(),
            unmap_descriptor_histogram: Mutex::default(),
            malformed: z(),
            no_unit: z(),
            seg_max_rejected: z(),
            max_sectors_exceeded: z(),
            max_data_segments: z(),
            max_data_bytes: z(),
            transfer_limit_rejected: z(),
            unmap_limit_rejected: z(),
            write_same_limit_rejected: z(),
            out_of_range: z(),
            read_only_rejected: z(),
            unit_attentions: z(),
            not_ready: z(),
            bytes_read: z(),
            bytes_written: z(),
            blocks_unmapped: z(),
            blocks_written_same: z(),
            max_transfer_blocks: z(),
            max_unmap_descriptors: z(),
            max_unmap_descriptor_blocks: z(),
            max_unmap_command_blocks: z(),
            injected_errors: z(),
            tmf_abort_task: z(),
            tmf_abort_task_set: z(),
            tmf_lun_reset: z(),
            tmf_it_nexus_reset: z(),
            tmf_other: z(),
            tmf_unanswered: z(),
            an_requests: z(),
            events_sent: z(),
            events_dropped: z(),
        }
    }
}

impl ScsiCounters {
    pub(crate) fn opcode(&self, op: u8) {
        self.opcodes[usize::from(op)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn response(&self, r: u8) {
        self.responses[usize::from(r)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn status(&self, s: u8) {
        self.statuses[usize::from(s)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn sense(&self, key: SenseKey, asc: u8, ascq: u8) {
        let mut m = self.sense.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((key.to_u8(), asc, ascq)).or_default() += 1;
    }

    pub(crate) fn unmap_descriptors(&self, n: usize) {
        let mut m = self
            .unmap_descriptor_histogram
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(n).or_default() += 1;
    }

    pub(crate) fn snapshot(&self, transport: &StatCounters) -> ScsiStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ScsiStats {
            connections: get(&transport.connections),
            kicks: get(&transport.kicks),
            interrupts: get(&transport.interrupts),
            injected_disconnects: get(&transport.injected_disconnects),
            lied_used_lens: get(&transport.lied_used_lens),
            bad_used_ids: get(&transport.bad_used_ids),
            reordered_completions: get(&transport.reordered_completions),
            commands: get(&self.commands),
            opcodes: nonzero(&self.opcodes),
            responses: nonzero(&self.responses),
            statuses: nonzero(&self.statuses),
            sense: self.sense.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            unmap_descriptor_histogram: self
                .unmap_descriptor_histogram
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            malformed: get(&self.malformed),
            no_unit: get(&self.no_unit),
            seg_max_rejected: get(&self.seg_max_rejected),
            max_sectors_exceeded: get(&self.max_sectors_exceeded),
            max_data_segments: get(&self.max_data_segments),
            max_data_bytes: get(&self.max_data_bytes),
            transfer_limit_rejected: get(&self.transfer_limit_rejected),
            unmap_limit_rejected: get(&self.unmap_limit_rejected),
            write_same_limit_rejected: get(&self.write_same_limit_rejected),
            out_of_range: get(&self.out_of_range),
            read_only_rejected: get(&self.read_only_rejected),
            unit_attentions: get(&self.unit_attentions),
            not_ready: get(&self.not_ready),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            blocks_unmapped: get(&self.blocks_unmapped),
            blocks_written_same: get(&self.blocks_written_same),
            max_transfer_blocks: get(&self.max_transfer_blocks),
            max_unmap_descriptors: get(&self.max_unmap_descriptors),
            max_unmap_descriptor_blocks: get(&self.max_unmap_descriptor_blocks),
            max_unmap_command_blocks: get(&self.max_unmap_command_blocks),
            injected_errors: get(&self.injected_errors),
            tmf_abort_task: get(&self.tmf_abort_task),
            tmf_abort_task_set: get(&self.tmf_abort_task_set),
            tmf_lun_reset: get(&self.tmf_lun_reset),
            tmf_it_nexus_reset: get(&self.tmf_it_nexus_reset),
            tmf_other: get(&self.tmf_other),
            tmf_unanswered: get(&self.tmf_unanswered),
            an_requests: get(&self.an_requests),
            events_sent: get(&self.events_sent),
            events_dropped: get(&self.events_dropped),
        }
    }
}

/// A snapshot of a scsi target's counters, summed over all queues and connections since the
/// target started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScsiStats {
    /// Front-end connections accepted.
    pub connections: u64,
    /// Kicks the queues' worker threads woke up for.
    pub kicks: u64,
    /// Used-buffer notifications sent to the driver.
    pub interrupts: u64,
    /// Connections dropped by [`Faults::disconnect_after`](crate::Faults::disconnect_after).
    pub injected_disconnects: u64,
    /// Completions with a used length beyond the buffers.
    pub lied_used_lens: u64,
    /// Completions with an out-of-range used id.
    pub bad_used_ids: u64,
    /// Completions put in the used ring out of order.
    pub reordered_completions: u64,
    /// Commands received on the request queues (malformed chains included).
    pub commands: u64,
    /// Commands by operation code (CDB byte 0), whatever their outcome; only codes seen.
    pub opcodes: BTreeMap<u8, u64>,
    /// Completions by virtio-scsi response byte.
    pub responses: BTreeMap<u8, u64>,
    /// Completions with response OK, by SCSI status byte.
    pub statuses: BTreeMap<u8, u64>,
    /// CHECK CONDITIONs by (sense key, ASC, ASCQ).
    pub sense: BTreeMap<(u8, u8, u8), u64>,
    /// UNMAP commands by number of block descriptors in their parameter list (limits broken or
    /// not).
    pub unmap_descriptor_histogram: BTreeMap<usize, u64>,
    /// Chains that are not virtio-scsi requests (short header or response, data in both
    /// directions, memory outside the guest's regions).
    pub malformed: u64,
    /// Commands to a logical unit that does not exist (on an existing target).
    pub no_unit: u64,
    /// Commands refused (`VIRTIO_SCSI_S_FAILURE`) for more data segments than `seg_max`.
    pub seg_max_rejected: u64,
    /// Commands moving more than `max_sectors` (a hint: they were served).
    pub max_sectors_exceeded: u64,
    /// Largest number of data segments in one command.
    pub max_data_segments: u64,
    /// Largest data buffer (data-in or data-out) of one command, in bytes.
    pub max_data_bytes: u64,
    /// READ/WRITE refused for a transfer length beyond the VPD B0h maximum.
    pub transfer_limit_rejected: u64,
    /// UNMAP refused for more descriptors or blocks than VPD B0h allows.
    pub unmap_limit_rejected: u64,
    /// WRITE SAME refused for more blocks than VPD B0h's maximum write same length.
    pub write_same_limit_rejected: u64,
    /// Commands naming blocks beyond the capacity.
    pub out_of_range: u64,
    /// Writes, UNMAPs and WRITE SAMEs refused by write protection.
    pub read_only_rejected: u64,
    /// UNIT ATTENTION conditions reported (by CHECK CONDITION or REQUEST SENSE).
    pub unit_attentions: u64,
    /// NOT READY answers.
    pub not_ready: u64,
    /// Bytes read by successful READs.
    pub bytes_read: u64,
    /// Bytes written by successful WRITEs.
    pub bytes_written: u64,
    /// Blocks unmapped by successful UNMAPs (and WRITE SAME with UNMAP).
    pub blocks_unmapped: u64,
    /// Blocks written by successful WRITE SAMEs.
    pub blocks_written_same: u64,
    /// Largest READ/WRITE transfer length seen, in blocks.
    pub max_transfer_blocks: u64,
    /// Most block descriptors in one UNMAP.
    pub max_unmap_descriptors: u64,
    /// Most blocks in one UNMAP block descriptor.
    pub max_unmap_descriptor_blocks: u64,
    /// Most blocks in one UNMAP, summed over its descriptors.
    pub max_unmap_command_blocks: u64,
    /// Commands failed by [`Faults::fail_next`](crate::Faults::fail_next).
    pub injected_errors: u64,
    /// ABORT TASK functions received.
    pub tmf_abort_task: u64,
    /// ABORT TASK SET and CLEAR TASK SET functions received.
    pub tmf_abort_task_set: u64,
    /// LOGICAL UNIT RESET functions received.
    pub tmf_lun_reset: u64,
    /// I_T NEXUS RESET functions received.
    pub tmf_it_nexus_reset: u64,
    /// Other task management functions received.
    pub tmf_other: u64,
    /// Task management functions left unanswered on purpose.
    pub tmf_unanswered: u64,
    /// Asynchronous notification queries and subscriptions.
    pub an_requests: u64,
    /// Events put in the event queue.
    pub events_sent: u64,
    /// Events dropped for lack of an event buffer (reported later with EVENTS_MISSED).
    pub events_dropped: u64,
}

impl ScsiStats {
    /// Commands received with operation code `op`.
    pub fn opcode_count(&self, op: u8) -> u64 {
        self.opcodes.get(&op).copied().unwrap_or(0)
    }

    /// Completions with virtio-scsi response `r`.
    pub fn response_count(&self, r: Response) -> u64 {
        self.responses.get(&r.to_u8()).copied().unwrap_or(0)
    }

    /// Completions (response OK) with SCSI status `s`.
    pub fn status_count(&self, s: Status) -> u64 {
        self.statuses.get(&s.to_u8()).copied().unwrap_or(0)
    }

    /// CHECK CONDITIONs with this sense key and ASC/ASCQ.
    pub fn sense_count(&self, key: SenseKey, asc: Asc) -> u64 {
        self.sense
            .get(&(key.to_u8(), asc.asc, asc.ascq))
            .copied()
            .unwrap_or(0)
    }

    /// Number of UNMAP commands received.
    pub fn unmap_commands(&self) -> u64 {
        self.unmap_descriptor_histogram.values().sum()
    }
}

/// Counters of one logical unit (while it exists).
#[derive(Debug, Default)]
pub(crate) struct LunCounters {
    pub commands: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub unmaps: AtomicU64,
    pub blocks_unmapped: AtomicU64,
    pub write_sames: AtomicU64,
    pub syncs: AtomicU64,
    pub check_conditions: AtomicU64,
    pub unit_attentions: AtomicU64,
}

impl LunCounters {
    pub(crate) fn snapshot(&self) -> LunStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LunStats {
            commands: get(&self.commands),
            reads: get(&self.reads),
            writes: get(&self.writes),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            unmaps: get(&self.unmaps),
            blocks_unmapped: get(&self.blocks_unmapped),
            write_sames: get(&self.write_sames),
            syncs: get(&self.syncs),
            check_conditions: get(&self.check_conditions),
            unit_attentions: get(&self.unit_attentions),
        }
    }
}

/// A snapshot of one logical unit's counters since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LunStats {
    /// Commands addressed to the unit.
    pub commands: u64,
    /// READ(10)/READ(16) received.
    pub reads: u64,
    /// WRITE(10)/WRITE(16) received.
    pub writes: u64,
    /// Bytes read successfully.
    pub bytes_read: u64,
    /// Bytes written successfully.
    pub bytes_written: u64,
    /// UNMAP received.
    pub unmaps: u64,
    /// Blocks unmapped successfully.
    pub blocks_unmapped: u64,
    /// WRITE SAME(16) received.
    pub write_sames: u64,
    /// SYNCHRONIZE CACHE(10)/(16) received.
    pub syncs: u64,
    /// Commands ended with CHECK CONDITION.
    pub check_conditions: u64,
    /// UNIT ATTENTION conditions reported.
    pub unit_attentions: u64,
}
