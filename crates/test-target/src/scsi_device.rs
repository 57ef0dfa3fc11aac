//! The virtio-scsi device model: the targets and logical units, the framing of command and
//! control queue requests (virtio 1.2, 5.6.6), injected failures, and the events waiting for the
//! event queue. Shared by all queues and all connections of a target; the vhost-user glue is in
//! `scsi_backend`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{debug, warn};
use vireo_scsi::{Asc, Sense, Status};
use virtio_bindings::virtio_scsi::{VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::{slice_segments, ChainLayout, Segment};
use crate::faults::{bump, raise, Faults, StatCounters};
use crate::scsi_config::{
    sizes_of, write_config, ConfigWriteError, LunConfig, ScsiTargetConfig, SCSI_CONFIG_SIZE,
};
use crate::scsi_faults::{ScsiFailure, ScsiFaults};
use crate::scsi_lun::{
    count_sense, execute_without_unit, is_media_access, write_stream, Completion, DataBuffers,
    ExecContext, LogicalUnit, UA_LUN_RESET, UA_NEXUS_LOSS,
};
use crate::scsi_request::{
    an_response, decode_lun, CmdReqHeader, CmdRespHeader, ControlRequest, Event, ResetReason,
    Response, TmfFunction, UnitAddress, CMD_REQ_HEADER_SIZE, CMD_RESP_HEADER_SIZE,
};
use crate::scsi_stats::{LunStats, ScsiCounters, ScsiStats};
use crate::{LunError, TargetError};

/// Most events waiting for event buffers; beyond, they are dropped and reported missed.
const MAX_PENDING_EVENTS: usize = 256;

/// Largest CDB field read from a request (`MAX_CDB_SIZE`).
const CDB_BUF: usize = crate::scsi_config::MAX_CDB_SIZE as usize;

/// Events waiting for the event queue.
#[derive(Debug, Default)]
pub(crate) struct EventState {
    pub pending: VecDeque<Event>,
    /// Events were dropped since the last one delivered: the next carries EVENTS_MISSED.
    pub missed: bool,
}

/// What the response of one command says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    response: Response,
    status: Status,
    sense: Option<Sense>,
    data_in: u64,
    data_out: u64,
}

impl Reply {
    fn response(r: Response) -> Self {
        Reply {
            response: r,
            status: Status::Good,
            sense: None,
            data_in: 0,
            data_out: 0,
        }
    }
}

impl From<Completion> for Reply {
    fn from(c: Completion) -> Self {
        match c {
            Completion::Done {
                status,
                sense,
                data_in,
                data_out,
            } => Reply {
                response: Response::Ok,
                status,
                sense,
                data_in,
                data_out,
            },
            Completion::Response(r) => Reply::response(r),
        }
    }
}

/// The scsi target's device: every logical unit, the counters, the fault switches and the
/// per-connection state.
pub(crate) struct ScsiDevice {
    cfg: ScsiTargetConfig,
    units: RwLock<BTreeMap<(u8, u16), Arc<LogicalUnit>>>,
    counters: ScsiCounters,
    transport: Arc<StatCounters>,
    faults: Arc<Faults>,
    scsi_faults: Arc<ScsiFaults>,
    sense_size: AtomicU32,
    cdb_size: AtomicU32,
    acked_features: AtomicU64,
    connected: AtomicBool,
    events: Mutex<EventState>,
    event_fd: EventFd,
}

impl std::fmt::Debug for ScsiDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiDevice")
            .field("luns", &self.luns())
            .finish_non_exhaustive()
    }
}

impl ScsiDevice {
    /// Validates `cfg` and opens every logical unit's backing store.
    pub(crate) fn new(
        cfg: ScsiTargetConfig,
        transport: Arc<StatCounters>,
        faults: Arc<Faults>,
        scsi_faults: Arc<ScsiFaults>,
    ) -> Result<Self, TargetError> {
        cfg.validate()?;
        let mut units = BTreeMap::new();
        for (&(t, l), lun) in &cfg.luns {
            units.insert((t, l), Arc::new(LogicalUnit::new(t, l, lun.clone())?));
        }
        let event_fd =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(TargetError::Poll)?;
        let (sense_size, cdb_size) = sizes_of(&cfg.config_space());
        scsi_faults.set_tmf_never_answer(cfg.tmf_never_answer);
        Ok(ScsiDevice {
            cfg,
            units: RwLock::new(units),
            counters: ScsiCounters::default(),
            transport,
            faults,
            scsi_faults,
            sense_size: AtomicU32::new(sense_size),
            cdb_size: AtomicU32::new(cdb_size),
            acked_features: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            events: Mutex::new(EventState::default()),
            event_fd,
        })
    }

    pub(crate) fn config(&self) -> &ScsiTargetConfig {
        &self.cfg
    }

    pub(crate) fn transport(&self) -> &Arc<StatCounters> {
        &self.transport
    }

    pub(crate) fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    pub(crate) fn stats(&self) -> ScsiStats {
        self.counters.snapshot(&self.transport)
    }

    pub(crate) fn counters(&self) -> &ScsiCounters {
        &self.counters
    }

    /// The eventfd the event queue's worker waits on for posted events.
    pub(crate) fn event_fd(&self) -> &EventFd {
        &self.event_fd
    }

    pub(crate) fn events(&self) -> std::sync::MutexGuard<'_, EventState> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn units(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<(u8, u16), Arc<LogicalUnit>>> {
        self.units.read().unwrap_or_else(|p| p.into_inner())
    }

    fn unit(&self, target: u8, lun: u16) -> Option<Arc<LogicalUnit>> {
        self.units().get(&(target, lun)).cloned()
    }

    /// The current logical units, by `(target, LUN)`.
    pub(crate) fn luns(&self) -> Vec<(u8, u16)> {
        self.units().keys().copied().collect()
    }

    /// The LUNs of `target`, ascending.
    fn luns_of(&self, target: u8) -> Vec<u16> {
        self.units()
            .range((target, 0)..=(target, u16::MAX))
            .map(|(&(_, l), _)| l)
            .collect()
    }

    fn target_exists(&self, target: u8) -> bool {
        self.units()
            .range((target, 0)..=(target, u16::MAX))
            .next()
            .is_some()
    }

    pub(crate) fn lun_stats(&self, target: u8, lun: u16) -> Option<LunStats> {
        self.unit(target, lun).map(|u| u.stats.snapshot())
    }

    pub(crate) fn capacity_blocks(&self, target: u8, lun: u16) -> Option<u64> {
        self.unit(target, lun).map(|u| u.capacity_blocks())
    }

    pub(crate) fn block_size(&self, target: u8, lun: u16) -> Option<u32> {
        self.unit(target, lun).map(|u| u.block_size())
    }

    /// The config space as the current front-end sees it (its sense and CDB sizes).
    pub(crate) fn config_space(&self) -> [u8; SCSI_CONFIG_SIZE] {
        let mut c = self.cfg.config_space();
        c[20..24].copy_from_slice(&self.sense_size.load(Ordering::Acquire).to_le_bytes());
        c[24..28].copy_from_slice(&self.cdb_size.load(Ordering::Acquire).to_le_bytes());
        c
    }

    /// Applies a front-end's `SET_CONFIG`.
    pub(crate) fn set_config(&self, offset: u32, buf: &[u8]) -> Result<(), ConfigWriteError> {
        let mut space = self.config_space();
        write_config(&mut space, offset, buf)?;
        let (sense, cdb) = sizes_of(&space);
        self.sense_size.store(sense, Ordering::Release);
        self.cdb_size.store(cdb, Ordering::Release);
        Ok(())
    }

    pub(crate) fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features.load(Ordering::Acquire) & (1u64 << bit) != 0
    }

    /// Resets everything that lives as long as one front-end connection: sizes, features,
    /// pending events, and every unit's unit attention and readiness.
    pub(crate) fn reset_for_connection(&self) {
        let (sense, cdb) = sizes_of(&self.cfg.config_space());
        self.sense_size.store(sense, Ordering::Release);
        self.cdb_size.store(cdb, Ordering::Release);
        self.acked_features.store(0, Ordering::Release);
        *self.events() = EventState::default();
        for unit in self.units().values() {
            unit.reset_for_connection(self.cfg.power_on_unit_attention);
        }
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    /// Queues an event for the event queue and wakes its worker. Without a front-end nothing
    /// is queued (the next one scans anyway).
    fn post_event(&self, event: Event) {
        if !self.connected.load(Ordering::Acquire) {
            return;
        }
        {
            let mut ev = self.events();
            if ev.pending.len() >= MAX_PENDING_EVENTS {
                bump(&self.counters.events_dropped);
                ev.missed = true;
            } else {
                ev.pending.push_back(event);
            }
        }
        if let Err(e) = self.event_fd.write(1) {
            warn!("cannot wake the event queue worker: {e}");
        }
    }

    // ----------------------------------------------------------------------------------------
    // Logical units at run time.

    fn check_address(&self, target: u8, lun: u16) -> Result<(), LunError> {
        let max_target = self.cfg.effective_max_target();
        if u16::from(target) > max_target || u32::from(lun) > self.cfg.max_lun {
            return Err(LunError::OutOfRange {
                target,
                lun,
                max_target,
                max_lun: self.cfg.max_lun,
            });
        }
        Ok(())
    }

    /// REPORTED LUNS DATA HAS CHANGED on the units of `target` other than `lun`.
    fn luns_changed(&self, target: u8, lun: u16) {
        if !self.cfg.luns_changed_unit_attention {
            return;
        }
        for (_, unit) in self
            .units()
            .range((target, 0)..=(target, u16::MAX))
            .filter(|(&(_, l), _)| l != lun)
        {
            unit.raise_unit_attention(Asc::REPORTED_LUNS_DATA_CHANGED);
        }
    }

    pub(crate) fn add_lun(&self, target: u8, lun: u16, cfg: LunConfig) -> Result<(), LunError> {
        self.check_address(target, lun)?;
        if self.unit(target, lun).is_some() {
            return Err(LunError::Exists { target, lun });
        }
        let unit = LogicalUnit::new(target, lun, cfg).map_err(LunError::Create)?;
        unit.reset_for_connection(self.cfg.power_on_unit_attention);
        {
            let mut units = self.units.write().unwrap_or_else(|p| p.into_inner());
            if units.contains_key(&(target, lun)) {
                return Err(LunError::Exists { target, lun });
            }
            units.insert((target, lun), Arc::new(unit));
        }
        self.luns_changed(target, lun);
        if self.acked(VIRTIO_SCSI_F_HOTPLUG) {
            self.post_event(Event::transport_reset(target, lun, ResetReason::Rescan));
        }
        Ok(())
    }

    pub(crate) fn remove_lun(&self, target: u8, lun: u16) -> Result<(), LunError> {
        let removed = self
            .units
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(target, lun));
        if removed.is_none() {
            return Err(LunError::NotFound { target, lun });
        }
        self.luns_changed(target, lun);
        if self.acked(VIRTIO_SCSI_F_HOTPLUG) {
            self.post_event(Event::transport_reset(target, lun, ResetReason::Removed));
        }
        Ok(())
    }

    pub(crate) fn resize_lun(&self, target: u8, lun: u16, size_bytes: u64) -> Result<(), LunError> {
        let unit = self
            .unit(target, lun)
            .ok_or(LunError::NotFound { target, lun })?;
        unit.resize(size_bytes).map_err(LunError::Resize)?;
        let asc = Asc::CAPACITY_DATA_CHANGED;
        unit.raise_unit_attention(asc);
        if self.acked(VIRTIO_SCSI_F_CHANGE) {
            self.post_event(Event::param_change(target, lun, asc.asc, asc.ascq));
        }
        Ok(())
    }

    pub(crate) fn raise_unit_attention(
        &self,
        target: u8,
        lun: u16,
        asc: Asc,
    ) -> Result<(), LunError> {
        self.unit(target, lun)
            .ok_or(LunError::NotFound { target, lun })?
            .raise_unit_attention(asc);
        Ok(())
    }

    pub(crate) fn set_not_ready(&self, target: u8, lun: u16, turs: u32) -> Result<(), LunError> {
        self.unit(target, lun)
            .ok_or(LunError::NotFound { target, lun })?
            .set_not_ready(turs);
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // Request queues.

    /// Serves one command chain; returns the used length (0 when the chain has no room for a
    /// response at all).
    pub(crate) fn execute_request<I>(&self, mem: &GuestMemoryMmap<()>, descriptors: I) -> u32
    where
        I: IntoIterator<Item = (u64, u32, bool)>,
    {
        let c = &self.counters;
        bump(&c.commands);
        let layout = match ChainLayout::from_descriptors(descriptors) {
            Ok(layout) => layout,
            Err(e) => {
                debug!("dropping malformed descriptor chain: {e}");
                bump(&c.malformed);
                return 0;
            }
        };
        let sense_size = u64::from(self.sense_size.load(Ordering::Acquire));
        let cdb_size = self.cdb_size.load(Ordering::Acquire) as usize;
        let req_len = (CMD_REQ_HEADER_SIZE + cdb_size) as u64;
        let resp_len = CMD_RESP_HEADER_SIZE as u64 + sense_size;
        let (readable, writable) = (layout.readable_len(), layout.writable_len());
        if writable < CMD_RESP_HEADER_SIZE as u64 {
            debug!("dropping a command without room for its response");
            bump(&c.malformed);
            return 0;
        }
        let data_out = slice_segments(&layout.readable, req_len, readable.saturating_sub(req_len));
        let data_in = slice_segments(
            &layout.writable,
            resp_len,
            writable.saturating_sub(resp_len),
        );
        let bufs = DataBuffers {
            mem,
            data_out: &data_out,
            data_in: &data_in,
        };
        let reply = if readable < req_len || writable < resp_len {
            debug!("command request of {readable} bytes or response of {writable} bytes too short");
            bump(&c.malformed);
            Reply::response(Response::Failure)
        } else if !data_out.is_empty() && !data_in.is_empty() {
            // VIRTIO_SCSI_F_INOUT is not offered (virtio 1.2, 5.6.6.1).
            debug!("command with both data-out and data-in");
            bump(&c.malformed);
            Reply::response(Response::Failure)
        } else {
            let mut req = [0u8; CMD_REQ_HEADER_SIZE + CDB_BUF];
            let req = &mut req[..req_len as usize];
            if !read_stream(mem, &slice_segments(&layout.readable, 0, req_len), req) {
                bump(&c.malformed);
                Reply::response(Response::Failure)
            } else {
                self.dispatch(req, &bufs)
            }
        };
        self.respond(mem, &layout.writable, resp_len, &bufs, reply)
    }

    /// Routes a well-formed command to its logical unit.
    fn dispatch(&self, req: &[u8], bufs: &DataBuffers<'_>) -> Reply {
        let c = &self.counters;
        let (header, cdb) = req.split_at(CMD_REQ_HEADER_SIZE);
        let Ok(header) = CmdReqHeader::parse(header) else {
            return Reply::response(Response::Failure);
        };
        let op = cdb.first().copied().unwrap_or(0);
        c.opcode(op);

        let segments = bufs.data_out.len().max(bufs.data_in.len()) as u64;
        let bytes = bufs.out_len().max(bufs.in_len());
        raise(&c.max_data_segments, segments);
        raise(&c.max_data_bytes, bytes);
        if segments > u64::from(self.cfg.seg_max) {
            debug!(
                "{segments} data segments, more than seg_max {}",
                self.cfg.seg_max
            );
            bump(&c.seg_max_rejected);
            return Reply::response(Response::Failure);
        }
        if bytes > u64::from(self.cfg.max_sectors) * 512 {
            bump(&c.max_sectors_exceeded);
        }

        let Ok(addr) = decode_lun(&header.lun) else {
            return Reply::response(Response::BadTarget);
        };
        let target = addr.target;
        let unit = match addr.unit {
            UnitAddress::Lun(n) => self.unit(target, n),
            _ => None,
        };
        if unit.is_none() && !self.target_exists(target) {
            return Reply::response(Response::BadTarget);
        }

        let pick =
            !self.scsi_faults.fail_media_access_only() || (unit.is_some() && is_media_access(op));
        if pick && self.faults.take_failure() {
            bump(&c.injected_errors);
            return self.injected_failure();
        }

        let target_luns = || self.luns_of(target);
        let ctx = ExecContext {
            counters: c,
            sense_format: self.cfg.sense_format,
            target_luns: &target_luns,
        };
        let completion = match (&unit, addr.unit) {
            (Some(unit), _) => unit.execute(cdb, bufs, &ctx),
            (None, UnitAddress::ReportLunsWellKnown) => execute_without_unit(cdb, bufs, &ctx, true),
            (None, _) => {
                bump(&c.no_unit);
                execute_without_unit(cdb, bufs, &ctx, false)
            }
        };
        Reply::from(completion)
    }

    fn injected_failure(&self) -> Reply {
        match self.scsi_faults.failure() {
            ScsiFailure::CheckCondition { key, asc } => {
                let s = Sense::new(key, asc);
                count_sense(&self.counters, &s);
                Reply {
                    response: Response::Ok,
                    status: Status::CheckCondition,
                    sense: Some(s),
                    data_in: 0,
                    data_out: 0,
                }
            }
            ScsiFailure::Status(status) => Reply {
                response: Response::Ok,
                status,
                sense: None,
                data_in: 0,
                data_out: 0,
            },
            ScsiFailure::Response(r) => Reply::response(r),
        }
    }

    /// Writes the response (header, sense padded to `sense_size`) and returns the used length:
    /// the response bytes plus the data-in bytes written.
    fn respond(
        &self,
        mem: &GuestMemoryMmap<()>,
        writable: &[Segment],
        resp_len: u64,
        bufs: &DataBuffers<'_>,
        reply: Reply,
    ) -> u32 {
        let c = &self.counters;
        c.response(reply.response.to_u8());
        if reply.response == Response::Ok {
            c.status(reply.status.to_u8());
        }
        let sense_room = resp_len as usize - CMD_RESP_HEADER_SIZE;
        let sense_bytes = reply
            .sense
            .as_ref()
            .map(|s| s.encode(self.cfg.sense_format))
            .unwrap_or_default();
        let sense_len = sense_bytes.len().min(sense_room);
        let (in_len, out_len) = (bufs.in_len(), bufs.out_len());
        let resid = if in_len > 0 {
            in_len - reply.data_in.min(in_len)
        } else {
            out_len - reply.data_out.min(out_len)
        };
        let header = CmdRespHeader {
            sense_len: sense_len as u32,
            resid: u32::try_from(resid).unwrap_or(u32::MAX),
            status_qualifier: 0,
            status: reply.status.to_u8(),
            response: reply.response.to_u8(),
        };
        let mut resp = vec![0u8; resp_len as usize];
        resp[..CMD_RESP_HEADER_SIZE].copy_from_slice(&header.to_bytes());
        resp[CMD_RESP_HEADER_SIZE..CMD_RESP_HEADER_SIZE + sense_len]
            .copy_from_slice(&sense_bytes[..sense_len]);
        let room = resp_len.min(crate::chain::total_len(writable));
        let segs = slice_segments(writable, 0, room);
        if write_stream(mem, &segs, &resp[..room as usize]).is_err() {
            debug!("response of a command is not in guest memory");
            bump(&c.malformed);
            return 0;
        }
        u32::try_from(room + reply.data_in).unwrap_or(u32::MAX)
    }

    // ----------------------------------------------------------------------------------------
    // Control queue.

    /// Serves one control queue chain; `None` leaves it unanswered (a TMF while TMFs are never
    /// answered).
    pub(crate) fn execute_control<I>(
        &self,
        mem: &GuestMemoryMmap<()>,
        descriptors: I,
    ) -> Option<u32>
    where
        I: IntoIterator<Item = (u64, u32, bool)>,
    {
        let c = &self.counters;
        let Ok(layout) = ChainLayout::from_descriptors(descriptors) else {
            bump(&c.malformed);
            return Some(0);
        };
        let mut req = [0u8; crate::scsi_request::TMF_REQ_SIZE];
        let n = layout.readable_len().min(req.len() as u64);
        if !read_stream(
            mem,
            &slice_segments(&layout.readable, 0, n),
            &mut req[..n as usize],
        ) {
            bump(&c.malformed);
            return Some(0);
        }
        let request = match ControlRequest::parse(&req[..n as usize]) {
            Ok(ControlRequest::Unknown(ty)) => {
                debug!("unknown control request type {ty}");
                bump(&c.malformed);
                return Some(0);
            }
            Ok(r) => r,
            Err(e) => {
                debug!("{e}");
                bump(&c.malformed);
                return Some(0);
            }
        };
        let need = request.response_size() as u64;
        if layout.writable_len() < need {
            debug!("control request without room for its response");
            bump(&c.malformed);
            return Some(0);
        }
        let resp: Vec<u8> = match request {
            ControlRequest::Tmf { function, lun, .. } => {
                bump(match function {
                    TmfFunction::AbortTask => &c.tmf_abort_task,
                    TmfFunction::AbortTaskSet | TmfFunction::ClearTaskSet => &c.tmf_abort_task_set,
                    TmfFunction::LogicalUnitReset => &c.tmf_lun_reset,
                    TmfFunction::ItNexusReset => &c.tmf_it_nexus_reset,
                    _ => &c.tmf_other,
                });
                if self.scsi_faults.tmf_never_answer() {
                    bump(&c.tmf_unanswered);
                    return None;
                }
                vec![self.task_management(function, &lun).to_u8()]
            }
            ControlRequest::AsyncNotification { .. } => {
                bump(&c.an_requests);
                // No asynchronous notification class is supported: event_actual 0.
                an_response(Response::Ok).to_vec()
            }
            ControlRequest::Unknown(_) => return Some(0),
        };
        let segs = slice_segments(&layout.writable, 0, need);
        if write_stream(mem, &segs, &resp).is_err() {
            bump(&c.malformed);
            return Some(0);
        }
        Some(need as u32)
    }

    /// Performs a task management function; returns its response. Commands complete as they
    /// are served, so no task is ever found to abort: FUNCTION COMPLETE (SAM-5).
    pub(crate) fn task_management(&self, function: TmfFunction, lun: &[u8; 8]) -> Response {
        let Ok(addr) = decode_lun(lun) else {
            return Response::BadTarget;
        };
        let target = addr.target;
        if !self.target_exists(target) {
            return Response::BadTarget;
        }
        if function == TmfFunction::ItNexusReset {
            if self.cfg.reset_unit_attention {
                for (_, unit) in self.units().range((target, 0)..=(target, u16::MAX)) {
                    unit.raise_unit_attention(UA_NEXUS_LOSS);
                }
            }
            return Response::FUNCTION_COMPLETE;
        }
        if let TmfFunction::Unknown(_) = function {
            return Response::FunctionRejected;
        }
        let unit = match addr.unit {
            UnitAddress::Lun(n) => self.unit(target, n),
            _ => None,
        };
        let Some(unit) = unit else {
            return Response::IncorrectLun;
        };
        match function {
            TmfFunction::LogicalUnitReset => {
                if self.cfg.reset_unit_attention {
                    unit.raise_unit_attention(UA_LUN_RESET);
                }
                debug!("logical unit reset of {}", unit.name());
                Response::FUNCTION_COMPLETE
            }
            // ACA is not supported (NORMACA is clear).
            TmfFunction::ClearAca => Response::FunctionRejected,
            _ => Response::FUNCTION_COMPLETE,
        }
    }
}

/// Reads `buf.len()` bytes of the stream `segs` (which holds exactly that many); false when
/// guest memory does not have them.
fn read_stream(mem: &GuestMemoryMmap<()>, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    for seg in segs {
        let Ok(n) = usize::try_from(seg.len) else {
            return false;
        };
        let Some(dst) = buf.get_mut(done..done + n) else {
            return false;
        };
        if mem.read_slice(dst, GuestAddress(seg.addr)).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

#[cfg(test)]
#[path = "scsi_device_tests.rs"]
mod tests;
