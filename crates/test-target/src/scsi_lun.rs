//! The logical unit emulation (SPC-5, SBC-4): one disk with its unit attention and readiness
//! state, executing one command at a time against its backing store. CDBs are parsed and data-in
//! structures encoded by the `vireo-scsi` codec; this module decides what a real disk would
//! answer, enforces the limits the unit advertises, and moves the data.
//!
//! Nothing a front-end sends can make it panic: a bad CDB ends with CHECK CONDITION, a buffer
//! that does not fit the CDB with `VIRTIO_SCSI_S_OVERRUN`, and guest memory that cannot be
//! accessed with `VIRTIO_SCSI_S_FAILURE`.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use tracing::{debug, warn};
use vireo_scsi::block::ReadWrite16Cdb;
use vireo_scsi::cdb::opcode;
use vireo_scsi::mode::{self, ModeSense10Cdb};
use vireo_scsi::vpd::page;
use vireo_scsi::{
    cdb_len, Asc, BlockDescriptor, BlockDeviceCharacteristics, BlockLimits, CachingPage, CdbError,
    CodeSet, Command, DataDirection, Designator, DesignatorType, DeviceIdentification, InquiryCdb,
    LogicalBlockProvisioning, Lun, ModePage, ModeParameters, PageControl, Peripheral,
    ProvisioningType, ReadCapacity10, ReadCapacity16, ReportLuns, Sense, SenseFormat, SenseKey,
    StandardInquiry, Status, SupportedPages, UnitSerialNumber, UnmapParameterList,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::chain::{slice_segments, total_len, Segment};
use crate::faults::{add, bump, raise};
use crate::scsi_config::LunConfig;
use crate::scsi_request::Response;
use crate::scsi_stats::{LunCounters, ScsiCounters};
use crate::storage::Storage;
use crate::TargetError;

/// Most unit attention conditions queued per logical unit (older ones are kept, newer dropped).
const MAX_QUEUED_UNIT_ATTENTIONS: usize = 8;

/// 29/03 BUS DEVICE RESET FUNCTION OCCURRED (after a LOGICAL UNIT RESET).
pub(crate) const UA_LUN_RESET: Asc = Asc::new(0x29, 0x03);
/// 29/07 I_T NEXUS LOSS OCCURRED (after an I_T NEXUS RESET).
pub(crate) const UA_NEXUS_LOSS: Asc = Asc::new(0x29, 0x07);

/// Peripheral device type of a well-known logical unit.
const TYPE_WELL_KNOWN_LU: u8 = 0x1e;

/// Largest chunk WRITE SAME writes at once when the pattern is not zeros.
const WRITE_SAME_CHUNK: usize = 256 << 10;

/// The data buffers of one command: the data-out and data-in streams in guest memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DataBuffers<'a> {
    pub mem: &'a GuestMemoryMmap<()>,
    pub data_out: &'a [Segment],
    pub data_in: &'a [Segment],
}

impl DataBuffers<'_> {
    pub(crate) fn out_len(&self) -> u64 {
        total_len(self.data_out)
    }

    pub(crate) fn in_len(&self) -> u64 {
        total_len(self.data_in)
    }
}

/// What became of a command that reached the SCSI layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Completion {
    /// The command ran (successfully or not): response OK with this status.
    Done {
        /// SCSI status.
        status: Status,
        /// Sense data of a CHECK CONDITION.
        sense: Option<Sense>,
        /// Bytes written to the data-in buffer.
        data_in: u64,
        /// Bytes consumed from the data-out buffer.
        data_out: u64,
    },
    /// The command was not executed: this virtio-scsi response.
    Response(Response),
}

impl Completion {
    pub(crate) fn good(data_in: u64, data_out: u64) -> Self {
        Completion::Done {
            status: Status::Good,
            sense: None,
            data_in,
            data_out,
        }
    }

    pub(crate) fn check(sense: Sense) -> Self {
        Completion::Done {
            status: Status::CheckCondition,
            sense: Some(sense),
            data_in: 0,
            data_out: 0,
        }
    }

    /// CHECK CONDITION with sense data.
    fn is_check_condition(&self) -> bool {
        matches!(
            self,
            Completion::Done {
                status: Status::CheckCondition,
                sense: Some(_),
                ..
            }
        )
    }
}

/// Why a command stops short.
#[derive(Debug)]
enum Fail {
    Check(Sense),
    Response(Response),
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Self {
        Fail::Check(s)
    }
}

type Exec<T> = Result<T, Fail>;

fn sense(key: SenseKey, asc: Asc) -> Fail {
    Fail::Check(Sense::new(key, asc))
}

fn invalid_field(byte: u16, bit: Option<u8>) -> Fail {
    Fail::Check(Sense::invalid_field_in_cdb(byte, bit))
}

fn invalid_opcode() -> Fail {
    sense(
        SenseKey::IllegalRequest,
        Asc::INVALID_COMMAND_OPERATION_CODE,
    )
}

fn internal_error() -> Fail {
    sense(SenseKey::HardwareError, Asc::INTERNAL_TARGET_FAILURE)
}

/// Everything a command needs from outside its unit.
pub(crate) struct ExecContext<'a> {
    pub counters: &'a ScsiCounters,
    /// Format of the sense data of CHECK CONDITION (reported by the control mode page).
    pub sense_format: SenseFormat,
    /// The LUNs of the unit's target, ascending (for REPORT LUNS).
    pub target_luns: &'a dyn Fn() -> Vec<u16>,
}

/// Direction and byte count of the data a command moves, as its CDB says (transfer length,
/// allocation length or parameter list length).
pub(crate) fn expected_transfer(cmd: &Command, block_size: u32) -> (DataDirection, u64) {
    let bs = u64::from(block_size);
    match *cmd {
        Command::Read10(c) => (DataDirection::FromDevice, u64::from(c.blocks) * bs),
        Command::Read16(c) => (DataDirection::FromDevice, u64::from(c.blocks) * bs),
        Command::Write10(c) => (DataDirection::ToDevice, u64::from(c.blocks) * bs),
        Command::Write16(c) => (DataDirection::ToDevice, u64::from(c.blocks) * bs),
        Command::Inquiry(c) => (DataDirection::FromDevice, u64::from(c.alloc_len)),
        Command::RequestSense(c) => (DataDirection::FromDevice, u64::from(c.alloc_len)),
        Command::ModeSense6(c) => (DataDirection::FromDevice, u64::from(c.alloc_len)),
        Command::ModeSense10(c) => (DataDirection::FromDevice, u64::from(c.alloc_len)),
        Command::ReadCapacity10 => (DataDirection::FromDevice, 8),
        Command::ReadCapacity16(c) => (DataDirection::FromDevice, u64::from(c.alloc_len)),
        Command::ReportLuns(c) => (DataDirection::FromDevice, u64::from(c.alloc_len)),
        Command::Unmap(c) => (DataDirection::ToDevice, u64::from(c.param_len)),
        Command::WriteSame16(c) if !c.ndob => (DataDirection::ToDevice, bs),
        Command::WriteSame16(_)
        | Command::TestUnitReady
        | Command::StartStopUnit(_)
        | Command::SynchronizeCache10(_)
        | Command::SynchronizeCache16(_) => (DataDirection::None, 0),
    }
}

/// The virtio-scsi check before a command runs: the buffer in the command's direction must hold
/// what the CDB asks for (virtio 1.2, 5.6.6.1: else `VIRTIO_SCSI_S_OVERRUN`).
pub(crate) fn buffers_fit(cmd: &Command, block_size: u32, out_len: u64, in_len: u64) -> bool {
    match expected_transfer(cmd, block_size) {
        (DataDirection::None, _) => true,
        (DataDirection::FromDevice, n) => n <= in_len,
        (DataDirection::ToDevice, n) => n <= out_len,
    }
}

/// Commands that access the medium: NOT READY applies to them, and media-only injected failures
/// pick them.
pub(crate) fn is_media_access(op: u8) -> bool {
    matches!(
        op,
        opcode::READ_10
            | opcode::READ_16
            | opcode::WRITE_10
            | opcode::WRITE_16
            | opcode::SYNCHRONIZE_CACHE_10
            | opcode::SYNCHRONIZE_CACHE_16
            | opcode::UNMAP
            | opcode::WRITE_SAME_16
    )
}

/// Commands that neither report nor clear a unit attention (SPC-5 5.14): INQUIRY, REPORT LUNS
/// and REQUEST SENSE (which returns it as data instead).
pub(crate) fn reports_unit_attention(op: u8) -> bool {
    !matches!(
        op,
        opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE
    )
}

/// The NACA bit of the CONTROL byte (ACA is not supported).
fn naca_set(cdb: &[u8], op: u8) -> Option<u16> {
    let len = cdb_len(op)?;
    let control = *cdb.get(len - 1)?;
    (control & 0x04 != 0).then_some((len - 1) as u16)
}

/// Writes `data` (cut to `alloc_len` and the buffer) to the data-in buffer; returns the bytes
/// written.
fn put_data_in(bufs: &DataBuffers<'_>, data: &[u8], alloc_len: u64) -> Exec<u64> {
    let n = (data.len() as u64).min(alloc_len).min(bufs.in_len());
    let segs = slice_segments(bufs.data_in, 0, n);
    write_stream(bufs.mem, &segs, &data[..n as usize])?;
    Ok(n)
}

/// Reads `buf.len()` bytes of the stream `segs`.
fn read_stream(mem: &GuestMemoryMmap<()>, segs: &[Segment], buf: &mut [u8]) -> Exec<()> {
    let mut done = 0usize;
    for seg in segs {
        let n = usize::try_from(seg.len).map_err(|_| Fail::Response(Response::Failure))?;
        let dst = buf
            .get_mut(done..done + n)
            .ok_or(Fail::Response(Response::Failure))?;
        mem.read_slice(dst, GuestAddress(seg.addr))
            .map_err(|_| Fail::Response(Response::Failure))?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(Fail::Response(Response::Failure))
    }
}

/// Writes `data` over the stream `segs` (which holds exactly that many bytes).
pub(crate) fn write_stream(
    mem: &GuestMemoryMmap<()>,
    segs: &[Segment],
    data: &[u8],
) -> Result<(), Response> {
    let mut done = 0usize;
    for seg in segs {
        let n = usize::try_from(seg.len).map_err(|_| Response::Failure)?;
        let src = data.get(done..done + n).ok_or(Response::Failure)?;
        mem.write_slice(src, GuestAddress(seg.addr))
            .map_err(|_| Response::Failure)?;
        done += n;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(Response::Failure)
    }
}

impl From<Response> for Fail {
    fn from(r: Response) -> Self {
        Fail::Response(r)
    }
}

/// Moves `segs` (guest memory) to (`to_guest`) or from the store at byte `offset`. A guest
/// address outside the memory table is the driver's fault (FAILURE); a store error is a MEDIUM
/// ERROR.
fn transfer(
    mem: &GuestMemoryMmap<()>,
    storage: &Storage,
    offset: u64,
    segs: &[Segment],
    to_guest: bool,
) -> Exec<()> {
    let mut offset = offset;
    for seg in segs {
        let len = usize::try_from(seg.len).map_err(|_| Fail::Response(Response::Failure))?;
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(seg.addr), len) {
            let slice = slice.map_err(|_| Fail::Response(Response::Failure))?;
            let result = if to_guest {
                storage.read_into(offset, &slice)
            } else {
                storage.write_from(offset, &slice)
            };
            result.map_err(|e| storage_error(e, to_guest))?;
            offset += slice.len() as u64;
        }
    }
    Ok(())
}

fn storage_error(e: io::Error, reading: bool) -> Fail {
    warn!("backing store error: {e}");
    sense(
        SenseKey::MediumError,
        if reading {
            Asc::UNRECOVERED_READ_ERROR
        } else {
            Asc::WRITE_ERROR
        },
    )
}

/// FNV-1a, to derive stable identifiers from serial numbers.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Unit attention and readiness of a unit, per connection.
#[derive(Debug, Default)]
struct UnitState {
    unit_attentions: VecDeque<Asc>,
    not_ready_turs: u32,
    stopped: bool,
}

impl UnitState {
    fn needs_attention(&self) -> bool {
        !self.unit_attentions.is_empty() || self.not_ready_turs > 0 || self.stopped
    }

    /// The NOT READY sense of the unit, if it is not ready.
    fn not_ready(&self) -> Option<Sense> {
        if self.stopped {
            Some(Sense::new(
                SenseKey::NotReady,
                Asc::NOT_READY_INITIALIZING_COMMAND_REQUIRED,
            ))
        } else if self.not_ready_turs > 0 {
            Some(Sense::new(
                SenseKey::NotReady,
                Asc::NOT_READY_BECOMING_READY,
            ))
        } else {
            None
        }
    }

    fn raise(&mut self, asc: Asc) {
        if asc.asc == Asc::POWER_ON_RESET.asc {
            // A power on or reset supersedes whatever was pending (SPC-5 5.14).
            self.unit_attentions.clear();
        }
        if !self.unit_attentions.contains(&asc)
            && self.unit_attentions.len() < MAX_QUEUED_UNIT_ATTENTIONS
        {
            self.unit_attentions.push_back(asc);
        }
    }
}

/// One logical unit: a disk of the scsi target.
#[derive(Debug)]
pub(crate) struct LogicalUnit {
    target: u8,
    lun: u16,
    cfg: LunConfig,
    serial: String,
    storage: RwLock<Storage>,
    blocks: AtomicU64,
    state: Mutex<UnitState>,
    /// Fast path: false while the unit is ready without pending unit attention.
    attention: AtomicBool,
    pub(crate) stats: LunCounters,
}

impl LogicalUnit {
    /// Validates `cfg` and opens its backing store.
    pub(crate) fn new(target: u8, lun: u16, cfg: LunConfig) -> Result<Self, TargetError> {
        cfg.validate()?;
        let storage = Storage::open(&cfg.backend, cfg.block_size, cfg.read_only)?;
        let blocks = storage.size() / u64::from(cfg.block_size);
        cfg.check_capacity(blocks)?;
        let serial = cfg
            .serial
            .clone()
            .unwrap_or_else(|| format!("VIREO-T{target}-L{lun}"));
        Ok(LogicalUnit {
            target,
            lun,
            serial,
            storage: RwLock::new(storage),
            blocks: AtomicU64::new(blocks),
            state: Mutex::new(UnitState::default()),
            attention: AtomicBool::new(false),
            stats: LunCounters::default(),
            cfg,
        })
    }

    pub(crate) fn block_size(&self) -> u32 {
        self.cfg.block_size
    }

    /// Capacity in logical blocks.
    pub(crate) fn capacity_blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, UnitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_attention(&self, state: &UnitState) {
        self.attention
            .store(state.needs_attention(), Ordering::Release);
    }

    /// Resets the per-connection state for a new front-end: readiness as configured, and a
    /// POWER ON unit attention when `power_on_ua`.
    pub(crate) fn reset_for_connection(&self, power_on_ua: bool) {
        let mut s = self.state();
        *s = UnitState {
            unit_attentions: VecDeque::new(),
            not_ready_turs: self.cfg.not_ready_tur_count,
            stopped: self.cfg.start_required,
        };
        if power_on_ua {
            s.raise(Asc::POWER_ON_RESET);
        }
        self.update_attention(&s);
    }

    /// Establishes a unit attention condition.
    pub(crate) fn raise_unit_attention(&self, asc: Asc) {
        let mut s = self.state();
        s.raise(asc);
        self.update_attention(&s);
    }

    /// Makes the next `n` TEST UNIT READYs answer NOT READY / BECOMING READY.
    pub(crate) fn set_not_ready(&self, n: u32) {
        let mut s = self.state();
        s.not_ready_turs = n;
        self.update_attention(&s);
    }

    /// Changes the capacity to `size_bytes` (a multiple of the block size): a file is grown or
    /// shrunk, a RAM disk is copied into a new mapping. Commands wait meanwhile.
    pub(crate) fn resize(&self, size_bytes: u64) -> Result<(), TargetError> {
        let bs = u64::from(self.cfg.block_size);
        if size_bytes == 0 || !size_bytes.is_multiple_of(bs) {
            return Err(TargetError::InvalidConfig {
                field: "size_bytes",
                reason: format!("{size_bytes} is not a non-zero multiple of the block size {bs}"),
            });
        }
        self.cfg.check_capacity(size_bytes / bs)?;
        let mut storage = self.storage.write().unwrap_or_else(|p| p.into_inner());
        storage.resize(size_bytes)?;
        self.blocks.store(size_bytes / bs, Ordering::Release);
        Ok(())
    }

    /// Executes one command. `cdb` holds the whole CDB field of the request.
    pub(crate) fn execute(
        &self,
        cdb: &[u8],
        bufs: &DataBuffers<'_>,
        ctx: &ExecContext<'_>,
    ) -> Completion {
        bump(&self.stats.commands);
        let op = cdb.first().copied().unwrap_or(0);
        let parsed = Command::parse(cdb);
        let completion = finish(self.run(op, cdb, parsed, bufs, ctx), ctx);
        if completion.is_check_condition() {
            bump(&self.stats.check_conditions);
        }
        completion
    }

    fn run(
        &self,
        op: u8,
        cdb: &[u8],
        parsed: Result<Command, CdbError>,
        bufs: &DataBuffers<'_>,
        ctx: &ExecContext<'_>,
    ) -> Exec<Completion> {
        let c = ctx.counters;
        let bs = self.cfg.block_size;
        if let Ok(cmd) = &parsed {
            if !buffers_fit(cmd, bs, bufs.out_len(), bufs.in_len()) {
                debug!("{}: data buffer too small for the CDB", cmd.name());
                return Err(Fail::Response(Response::Overrun));
            }
        }
        if self.attention.load(Ordering::Acquire) {
            self.check_unit_attention(op, ctx)?;
        }
        let cmd = parsed.map_err(|e| Fail::Check(e.sense()))?;
        if let Some(byte) = naca_set(cdb, op) {
            return Err(invalid_field(byte, Some(2)));
        }
        match cmd {
            Command::Read16(_) | Command::Write16(_) | Command::SynchronizeCache16(_)
                if !self.cfg.support_16 =>
            {
                return Err(invalid_opcode())
            }
            Command::Unmap(_) if !self.cfg.support_unmap => return Err(invalid_opcode()),
            Command::WriteSame16(_) if !self.cfg.support_write_same => return Err(invalid_opcode()),
            _ => {}
        }
        if is_media_access(op)
            || matches!(cmd, Command::ReadCapacity10 | Command::ReadCapacity16(_))
        {
            self.check_ready(c)?;
        }
        match cmd {
            Command::TestUnitReady => self.test_unit_ready(c),
            Command::RequestSense(r) => {
                let format = if r.desc {
                    SenseFormat::Descriptor
                } else {
                    SenseFormat::Fixed
                };
                let s = self.request_sense(c);
                let n = put_data_in(bufs, &s.encode(format), u64::from(r.alloc_len))?;
                Ok(Completion::good(n, 0))
            }
            Command::Inquiry(i) => {
                let data = self.inquiry(&i)?;
                Ok(Completion::good(
                    put_data_in(bufs, &data, u64::from(i.alloc_len))?,
                    0,
                ))
            }
            Command::ModeSense6(m) => {
                let data = self.mode_sense(m.pc, m.page, m.subpage, m.dbd, false, false, ctx)?;
                Ok(Completion::good(
                    put_data_in(bufs, &data, u64::from(m.alloc_len))?,
                    0,
                ))
            }
            Command::ModeSense10(ModeSense10Cdb {
                llbaa,
                dbd,
                pc,
                page,
                subpage,
                alloc_len,
            }) => {
                let data = self.mode_sense(pc, page, subpage, dbd, true, llbaa, ctx)?;
                Ok(Completion::good(
                    put_data_in(bufs, &data, u64::from(alloc_len))?,
                    0,
                ))
            }
            Command::StartStopUnit(s) => {
                if s.power_condition == 0 && !s.loej {
                    let mut st = self.state();
                    st.stopped = !s.start;
                    if s.start {
                        st.not_ready_turs = 0;
                    }
                    self.update_attention(&st);
                }
                Ok(Completion::good(0, 0))
            }
            Command::ReadCapacity10 => {
                let data = ReadCapacity10::for_capacity(self.capacity_blocks(), bs).encode();
                Ok(Completion::good(put_data_in(bufs, &data, 8)?, 0))
            }
            Command::ReadCapacity16(r) => {
                let rc = ReadCapacity16 {
                    lbpme: self.cfg.support_unmap,
                    lbprz: self.cfg.support_unmap,
                    ..ReadCapacity16::new(self.capacity_blocks(), bs)
                };
                Ok(Completion::good(
                    put_data_in(bufs, &rc.encode(), u64::from(r.alloc_len))?,
                    0,
                ))
            }
            Command::ReportLuns(r) => {
                let data = report_luns(r.select_report, &(ctx.target_luns)())?;
                Ok(Completion::good(
                    put_data_in(bufs, &data, u64::from(r.alloc_len))?,
                    0,
                ))
            }
            Command::Read10(rw) => self.read(ReadWrite16Cdb::from(rw), 7, bufs, c),
            Command::Read16(rw) => self.read(rw, 10, bufs, c),
            Command::Write10(rw) => self.write(ReadWrite16Cdb::from(rw), 7, bufs, c),
            Command::Write16(rw) => self.write(rw, 10, bufs, c),
            Command::SynchronizeCache10(s) => {
                self.synchronize_cache(u64::from(s.lba), u64::from(s.blocks), c)
            }
            Command::SynchronizeCache16(s) => self.synchronize_cache(s.lba, u64::from(s.blocks), c),
            Command::Unmap(u) => self.unmap(u.anchor, u.param_len, bufs, c),
            Command::WriteSame16(w) => self.write_same(&w, bufs, c),
        }
    }

    /// Reports (and clears) the first pending unit attention, unless the command is exempt;
    /// REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED without reporting it.
    fn check_unit_attention(&self, op: u8, ctx: &ExecContext<'_>) -> Exec<()> {
        let mut s = self.state();
        if op == opcode::REPORT_LUNS {
            s.unit_attentions
                .retain(|a| *a != Asc::REPORTED_LUNS_DATA_CHANGED);
            self.update_attention(&s);
            return Ok(());
        }
        if !reports_unit_attention(op) {
            return Ok(());
        }
        let Some(asc) = s.unit_attentions.pop_front() else {
            return Ok(());
        };
        self.update_attention(&s);
        bump(&ctx.counters.unit_attentions);
        bump(&self.stats.unit_attentions);
        Err(sense(SenseKey::UnitAttention, asc))
    }

    fn check_ready(&self, c: &ScsiCounters) -> Exec<()> {
        if !self.attention.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.state().not_ready() {
            Some(s) => {
                bump(&c.not_ready);
                Err(Fail::Check(s))
            }
            None => Ok(()),
        }
    }

    fn test_unit_ready(&self, c: &ScsiCounters) -> Exec<Completion> {
        if !self.attention.load(Ordering::Acquire) {
            return Ok(Completion::good(0, 0));
        }
        let mut st = self.state();
        let not_ready = st.not_ready();
        if !st.stopped && st.not_ready_turs > 0 {
            st.not_ready_turs -= 1;
            self.update_attention(&st);
        }
        match not_ready {
            Some(s) => {
                bump(&c.not_ready);
                Err(Fail::Check(s))
            }
            None => Ok(Completion::good(0, 0)),
        }
    }

    /// The sense data REQUEST SENSE returns: a pending unit attention (cleared), the NOT READY
    /// condition, or NO SENSE.
    fn request_sense(&self, c: &ScsiCounters) -> Sense {
        if !self.attention.load(Ordering::Acquire) {
            return Sense::new(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE);
        }
        let mut st = self.state();
        if let Some(asc) = st.unit_attentions.pop_front() {
            self.update_attention(&st);
            bump(&c.unit_attentions);
            bump(&self.stats.unit_attentions);
            return Sense::new(SenseKey::UnitAttention, asc);
        }
        st.not_ready()
            .unwrap_or(Sense::new(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE))
    }

    fn inquiry(&self, i: &InquiryCdb) -> Exec<Vec<u8>> {
        let p = Peripheral::DISK;
        let cfg = &self.cfg;
        let data = match i.page {
            None => StandardInquiry::disk(&cfg.vendor, &cfg.product, &cfg.revision).encode(),
            Some(page::SUPPORTED_PAGES) => SupportedPages {
                pages: vec![
                    page::SUPPORTED_PAGES,
                    page::UNIT_SERIAL_NUMBER,
                    page::DEVICE_IDENTIFICATION,
                    page::BLOCK_LIMITS,
                    page::BLOCK_DEVICE_CHARACTERISTICS,
                    page::LOGICAL_BLOCK_PROVISIONING,
                ],
            }
            .encode(p),
            Some(page::UNIT_SERIAL_NUMBER) => UnitSerialNumber {
                serial: self.serial.clone(),
            }
            .encode(p),
            Some(page::DEVICE_IDENTIFICATION) => {
                // NAA 3h (locally assigned), unique per serial, and a T10 vendor ID designator.
                let naa = (0x3u64 << 60) | (fnv1a(&self.serial) >> 4);
                let t10 = Designator::t10_vendor_id(&cfg.vendor, &self.serial)
                    .map_err(|_| internal_error())?;
                DeviceIdentification {
                    designators: vec![
                        Designator::logical_unit(
                            DesignatorType::Naa,
                            CodeSet::Binary,
                            naa.to_be_bytes().to_vec(),
                        ),
                        t10,
                    ],
                }
                .encode(p)
            }
            Some(page::BLOCK_LIMITS) => Ok(self.block_limits().encode(p)),
            Some(page::BLOCK_DEVICE_CHARACTERISTICS) => Ok(BlockDeviceCharacteristics {
                medium_rotation_rate: BlockDeviceCharacteristics::NON_ROTATING,
                ..Default::default()
            }
            .encode(p)),
            Some(page::LOGICAL_BLOCK_PROVISIONING) => {
                let unmap = cfg.support_unmap;
                Ok(LogicalBlockProvisioning {
                    lbpu: unmap,
                    lbpws: unmap && cfg.support_write_same,
                    lbprz: u8::from(unmap),
                    provisioning_type: if unmap {
                        ProvisioningType::Thin
                    } else {
                        ProvisioningType::Full
                    },
                    ..Default::default()
                }
                .encode(p))
            }
            Some(_) => return Err(invalid_field(2, None)),
        };
        data.map_err(|_| internal_error())
    }

    /// The block limits VPD page of the unit.
    pub(crate) fn block_limits(&self) -> BlockLimits {
        let l = &self.cfg.limits;
        let unmap = self.cfg.support_unmap;
        BlockLimits {
            wsnz: true,
            max_compare_and_write: 0,
            optimal_transfer_granularity: l.optimal_transfer_granularity,
            max_transfer_length: l.max_transfer_length,
            optimal_transfer_length: l.optimal_transfer_length,
            max_prefetch_length: 0,
            max_unmap_lba_count: if unmap { l.max_unmap_lba_count } else { 0 },
            max_unmap_descriptor_count: if unmap {
                l.max_unmap_descriptor_count
            } else {
                0
            },
            optimal_unmap_granularity: if unmap {
                l.optimal_unmap_granularity
            } else {
                0
            },
            unmap_granularity_alignment: None,
            max_write_same_length: if self.cfg.support_write_same {
                l.max_write_same_length
            } else {
                0
            },
        }
    }

    /// MODE SENSE(6) (`ten` false) or (10) data.
    #[allow(clippy::too_many_arguments)]
    fn mode_sense(
        &self,
        pc: PageControl,
        page_code: u8,
        subpage: u8,
        dbd: bool,
        ten: bool,
        llbaa: bool,
        ctx: &ExecContext<'_>,
    ) -> Exec<Vec<u8>> {
        if pc == PageControl::Saved {
            return Err(sense(
                SenseKey::IllegalRequest,
                Asc::SAVING_PARAMETERS_NOT_SUPPORTED,
            ));
        }
        let all = page_code == mode::page::ALL;
        if subpage != 0 && !(all && subpage == 0xff) {
            return Err(invalid_field(3, None));
        }
        let changeable = pc == PageControl::Changeable;
        let caching = || {
            if changeable {
                CachingPage::default().to_page()
            } else {
                CachingPage {
                    wce: self.cfg.write_cache,
                    rcd: false,
                }
                .to_page()
            }
        };
        let control = || {
            // Control mode page: D_SENSE reports the sense data format.
            let mut data = vec![0u8; 10];
            if !changeable && ctx.sense_format == SenseFormat::Descriptor {
                data[0] = 0x04;
            }
            ModePage {
                page: mode::page::CONTROL,
                subpage: None,
                ps: false,
                data,
            }
        };
        let pages = match page_code {
            mode::page::CACHING => vec![caching()],
            mode::page::CONTROL => vec![control()],
            mode::page::ALL => vec![caching(), control()],
            _ => return Err(invalid_field(2, Some(5))),
        };
        let blocks = self.capacity_blocks();
        let params = ModeParameters {
            medium_type: 0,
            write_protect: self.cfg.read_only,
            dpofua: true,
            long_lba: ten && llbaa,
            block_descriptors: if dbd {
                Vec::new()
            } else {
                vec![BlockDescriptor {
                    blocks: if changeable { 0 } else { blocks },
                    block_len: if changeable { 0 } else { self.cfg.block_size },
                }]
            },
            pages,
        };
        let data = if ten {
            params.encode10()
        } else {
            params.encode6()
        };
        data.map_err(|_| internal_error())
    }

    /// Checks `blocks` from `lba` against the capacity.
    fn check_range(&self, lba: u64, blocks: u64, c: &ScsiCounters) -> Exec<()> {
        let capacity = self.capacity_blocks();
        if lba.checked_add(blocks).is_none_or(|end| end > capacity) {
            bump(&c.out_of_range);
            return Err(sense(SenseKey::IllegalRequest, Asc::LBA_OUT_OF_RANGE));
        }
        Ok(())
    }

    fn check_writable(&self, c: &ScsiCounters) -> Exec<()> {
        if self.cfg.read_only {
            bump(&c.read_only_rejected);
            return Err(sense(SenseKey::DataProtect, Asc::WRITE_PROTECTED));
        }
        Ok(())
    }

    /// Field checks shared by READ and WRITE: protection, the maximum transfer length.
    fn check_rw(&self, rw: &ReadWrite16Cdb, length_byte: u16, c: &ScsiCounters) -> Exec<()> {
        if rw.flags.protect != 0 {
            return Err(invalid_field(1, Some(7)));
        }
        raise(&c.max_transfer_blocks, u64::from(rw.blocks));
        let max = self.cfg.limits.max_transfer_length;
        if max != 0 && rw.blocks > max {
            bump(&c.transfer_limit_rejected);
            return Err(invalid_field(length_byte, None));
        }
        self.check_range(rw.lba, u64::from(rw.blocks), c)
    }

    fn read(
        &self,
        rw: ReadWrite16Cdb,
        length_byte: u16,
        bufs: &DataBuffers<'_>,
        c: &ScsiCounters,
    ) -> Exec<Completion> {
        bump(&self.stats.reads);
        self.check_rw(&rw, length_byte, c)?;
        let bs = u64::from(self.cfg.block_size);
        let len = u64::from(rw.blocks) * bs;
        let segs = slice_segments(bufs.data_in, 0, len);
        let storage = self.storage.read().unwrap_or_else(|p| p.into_inner());
        transfer(bufs.mem, &storage, rw.lba * bs, &segs, true)?;
        add(&c.bytes_read, len);
        add(&self.stats.bytes_read, len);
        Ok(Completion::good(len, 0))
    }

    fn write(
        &self,
        rw: ReadWrite16Cdb,
        length_byte: u16,
        bufs: &DataBuffers<'_>,
        c: &ScsiCounters,
    ) -> Exec<Completion> {
        bump(&self.stats.writes);
        self.check_rw(&rw, length_byte, c)?;
        self.check_writable(c)?;
        let bs = u64::from(self.cfg.block_size);
        let len = u64::from(rw.blocks) * bs;
        let segs = slice_segments(bufs.data_out, 0, len);
        let storage = self.storage.read().unwrap_or_else(|p| p.into_inner());
        transfer(bufs.mem, &storage, rw.lba * bs, &segs, false)?;
        if rw.flags.fua {
            storage.flush().map_err(|e| storage_error(e, false))?;
        }
        add(&c.bytes_written, len);
        add(&self.stats.bytes_written, len);
        Ok(Completion::good(0, len))
    }

    fn synchronize_cache(&self, lba: u64, blocks: u64, c: &ScsiCounters) -> Exec<Completion> {
        bump(&self.stats.syncs);
        // 0 blocks: through the last LBA.
        let capacity = self.capacity_blocks();
        if lba > capacity {
            bump(&c.out_of_range);
            return Err(sense(SenseKey::IllegalRequest, Asc::LBA_OUT_OF_RANGE));
        }
        if blocks != 0 {
            self.check_range(lba, blocks, c)?;
        }
        let storage = self.storage.read().unwrap_or_else(|p| p.into_inner());
        storage.flush().map_err(|e| storage_error(e, false))?;
        Ok(Completion::good(0, 0))
    }

    fn unmap(
        &self,
        anchor: bool,
        param_len: u16,
        bufs: &DataBuffers<'_>,
        c: &ScsiCounters,
    ) -> Exec<Completion> {
        bump(&self.stats.unmaps);
        if anchor {
            return Err(invalid_field(1, Some(0)));
        }
        if param_len == 0 {
            return Ok(Completion::good(0, 0));
        }
        let mut list = vec![0u8; usize::from(param_len)];
        let segs = slice_segments(bufs.data_out, 0, u64::from(param_len));
        read_stream(bufs.mem, &segs, &mut list)?;
        let parsed = UnmapParameterList::parse(&list).map_err(|e| {
            debug!("bad UNMAP parameter list: {e}");
            match e {
                vireo_scsi::ParseError::TooShort { .. }
                | vireo_scsi::ParseError::Truncated { .. } => {
                    sense(SenseKey::IllegalRequest, Asc::PARAMETER_LIST_LENGTH_ERROR)
                }
                _ => Fail::Check(Sense::invalid_field_in_parameter_list(2, None)),
            }
        })?;
        let descriptors = &parsed.descriptors;
        let total = parsed.total_blocks();
        c.unmap_descriptors(descriptors.len());
        raise(&c.max_unmap_descriptors, descriptors.len() as u64);
        raise(
            &c.max_unmap_descriptor_blocks,
            descriptors
                .iter()
                .map(|d| u64::from(d.blocks))
                .max()
                .unwrap_or(0),
        );
        raise(&c.max_unmap_command_blocks, total);
        let l = &self.cfg.limits;
        if descriptors.len() as u64 > u64::from(l.max_unmap_descriptor_count) {
            bump(&c.unmap_limit_rejected);
            return Err(Fail::Check(Sense::invalid_field_in_parameter_list(2, None)));
        }
        if l.max_unmap_lba_count != u32::MAX && total > u64::from(l.max_unmap_lba_count) {
            bump(&c.unmap_limit_rejected);
            return Err(Fail::Check(Sense::invalid_field_in_parameter_list(8, None)));
        }
        for d in descriptors {
            self.check_range(d.lba, u64::from(d.blocks), c)?;
        }
        self.check_writable(c)?;
        let bs = u64::from(self.cfg.block_size);
        let storage = self.storage.read().unwrap_or_else(|p| p.into_inner());
        for d in descriptors.iter().filter(|d| d.blocks != 0) {
            storage
                .write_zeroes(d.lba * bs, u64::from(d.blocks) * bs, true)
                .map_err(|e| storage_error(e, false))?;
        }
        add(&c.blocks_unmapped, total);
        add(&self.stats.blocks_unmapped, total);
        Ok(Completion::good(0, u64::from(param_len)))
    }

    fn write_same(
        &self,
        w: &vireo_scsi::WriteSame16Cdb,
        bufs: &DataBuffers<'_>,
        c: &ScsiCounters,
    ) -> Exec<Completion> {
        bump(&self.stats.write_sames);
        if w.protect != 0 {
            return Err(invalid_field(1, Some(7)));
        }
        if w.anchor {
            return Err(invalid_field(1, Some(4)));
        }
        if w.unmap && !self.cfg.support_unmap {
            return Err(invalid_field(1, Some(3)));
        }
        if w.blocks == 0 {
            // WSNZ is set in the block limits page.
            return Err(invalid_field(10, None));
        }
        let max = self.cfg.limits.max_write_same_length;
        if max != 0 && u64::from(w.blocks) > max {
            bump(&c.write_same_limit_rejected);
            return Err(invalid_field(10, None));
        }
        self.check_range(w.lba, u64::from(w.blocks), c)?;
        self.check_writable(c)?;
        let bs = u64::from(self.cfg.block_size);
        let block_len = bs as usize;
        let mut block = vec![0u8; block_len];
        let data_out = if w.ndob {
            0
        } else {
            let segs = slice_segments(bufs.data_out, 0, bs);
            read_stream(bufs.mem, &segs, &mut block)?;
            bs
        };
        let (offset, len) = (w.lba * bs, u64::from(w.blocks) * bs);
        let storage = self.storage.read().unwrap_or_else(|p| p.into_inner());
        if block.iter().all(|&b| b == 0) {
            storage
                .write_zeroes(offset, len, w.unmap)
                .map_err(|e| storage_error(e, false))?;
            if w.unmap {
                add(&c.blocks_unmapped, u64::from(w.blocks));
                add(&self.stats.blocks_unmapped, u64::from(w.blocks));
            }
        } else {
            let per_chunk = (WRITE_SAME_CHUNK / block_len).max(1);
            let mut chunk = block.repeat(per_chunk);
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(chunk.len() as u64) as usize;
                storage
                    .write_from(offset + done, &VolatileSlice::from(&mut chunk[..n]))
                    .map_err(|e| storage_error(e, false))?;
                done += n as u64;
            }
        }
        add(&c.blocks_written_same, u64::from(w.blocks));
        Ok(Completion::good(0, data_out))
    }

    /// The unit's address, for logs.
    pub(crate) fn name(&self) -> String {
        format!("t{}l{}", self.target, self.lun)
    }
}

/// Counts a CHECK CONDITION's sense code.
pub(crate) fn count_sense(c: &ScsiCounters, s: &Sense) {
    c.sense(s.key, s.asc, s.ascq);
}

/// REPORT LUNS parameter data for `luns` (ascending) of one target.
fn report_luns(select_report: u8, luns: &[u16]) -> Exec<Vec<u8>> {
    use vireo_scsi::luns::select_report as sr;
    let numbers = || -> Exec<Vec<Lun>> {
        luns.iter()
            .map(|&n| Lun::from_number(n).map_err(|_| internal_error()))
            .collect()
    };
    let list = match select_report {
        sr::LOGICAL_UNITS => numbers()?,
        sr::WELL_KNOWN => vec![Lun::REPORT_LUNS_WLUN],
        sr::ALL => {
            let mut v = numbers()?;
            v.push(Lun::REPORT_LUNS_WLUN);
            v
        }
        _ => return Err(invalid_field(2, None)),
    };
    ReportLuns { luns: list }
        .encode()
        .map_err(|_| internal_error())
}

/// Serves a command addressed to a logical unit that does not exist on an existing target (or
/// to the REPORT LUNS well-known logical unit, `well_known`), as SPC-5 and real targets do:
/// INQUIRY answers with peripheral qualifier 011b (or the well-known type), REPORT LUNS lists
/// the target's units, REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED as data, and anything
/// else ends with CHECK CONDITION / LOGICAL UNIT NOT SUPPORTED.
pub(crate) fn execute_without_unit(
    cdb: &[u8],
    bufs: &DataBuffers<'_>,
    ctx: &ExecContext<'_>,
    well_known: bool,
) -> Completion {
    finish(run_without_unit(cdb, bufs, ctx, well_known), ctx)
}

/// Turn the outcome of a command into its completion, counting malformed requests and
/// the sense data of CHECK CONDITIONs.
fn finish(out: Exec<Completion>, ctx: &ExecContext<'_>) -> Completion {
    let completion = match out {
        Ok(c) => c,
        Err(Fail::Check(s)) => Completion::check(s),
        Err(Fail::Response(r)) => {
            if r == Response::Failure {
                bump(&ctx.counters.malformed);
            }
            Completion::Response(r)
        }
    };
    if let Completion::Done {
        status: Status::CheckCondition,
        sense: Some(s),
        ..
    } = &completion
    {
        count_sense(ctx.counters, s);
    }
    completion
}

fn run_without_unit(
    cdb: &[u8],
    bufs: &DataBuffers<'_>,
    ctx: &ExecContext<'_>,
    well_known: bool,
) -> Exec<Completion> {
    let no_unit = || sense(SenseKey::IllegalRequest, Asc::LOGICAL_UNIT_NOT_SUPPORTED);
    let cmd = match Command::parse(cdb) {
        Ok(cmd) => cmd,
        Err(e) if well_known => return Err(Fail::Check(e.sense())),
        Err(_) => return Err(no_unit()),
    };
    // Block size does not matter: none of the commands served here moves blocks.
    if !buffers_fit(&cmd, 512, bufs.out_len(), bufs.in_len()) {
        return Err(Fail::Response(Response::Overrun));
    }
    let peripheral = if well_known {
        Peripheral {
            qualifier: Peripheral::QUALIFIER_CONNECTED,
            device_type: TYPE_WELL_KNOWN_LU,
        }
    } else {
        Peripheral::NO_LUN
    };
    match cmd {
        Command::Inquiry(i) => {
            let data = match i.page {
                None => {
                    let mut s = StandardInquiry::disk("VIREO", "NO LUN", "0001");
                    if well_known {
                        s.product = "REPORT LUNS".into();
                    }
                    s.peripheral = peripheral;
                    s.encode().map_err(|_| internal_error())?
                }
                Some(page::SUPPORTED_PAGES) => SupportedPages {
                    pages: vec![page::SUPPORTED_PAGES],
                }
                .encode(peripheral)
                .map_err(|_| internal_error())?,
                Some(_) => return Err(invalid_field(2, None)),
            };
            Ok(Completion::good(
                put_data_in(bufs, &data, u64::from(i.alloc_len))?,
                0,
            ))
        }
        Command::ReportLuns(r) => {
            let data = report_luns(r.select_report, &(ctx.target_luns)())?;
            Ok(Completion::good(
                put_data_in(bufs, &data, u64::from(r.alloc_len))?,
                0,
            ))
        }
        Command::RequestSense(r) => {
            let format = if r.desc {
                SenseFormat::Descriptor
            } else {
                SenseFormat::Fixed
            };
            let s = if well_known {
                Sense::new(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE)
            } else {
                Sense::new(SenseKey::IllegalRequest, Asc::LOGICAL_UNIT_NOT_SUPPORTED)
            };
            Ok(Completion::good(
                put_data_in(bufs, &s.encode(format), u64::from(r.alloc_len))?,
                0,
            ))
        }
        Command::TestUnitReady if well_known => Ok(Completion::good(0, 0)),
        _ if well_known => Err(invalid_opcode()),
        _ => Err(no_unit()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_scsi::block::RwFlags;
    use vireo_scsi::{ReadWrite10Cdb, ReadWrite16Cdb, ReportLunsCdb, UnmapCdb, WriteSame16Cdb};

    fn parse(cdb: vireo_scsi::Cdb) -> Command {
        Command::parse(cdb.as_bytes()).unwrap()
    }

    #[test]
    fn transfer_sizes_come_from_the_cdb() {
        let rw10 = ReadWrite10Cdb::new(0, 8, RwFlags::default()).unwrap();
        assert_eq!(
            expected_transfer(&parse(rw10.read_cdb()), 4096),
            (DataDirection::FromDevice, 32768)
        );
        assert_eq!(
            expected_transfer(&parse(rw10.write_cdb()), 512),
            (DataDirection::ToDevice, 4096)
        );
        let rw16 = ReadWrite16Cdb::new(1 << 40, u64::from(u32::MAX), RwFlags::default()).unwrap();
        assert_eq!(
            expected_transfer(&parse(rw16.read_cdb()), 4096),
            (DataDirection::FromDevice, u64::from(u32::MAX) * 4096)
        );
        let unmap = UnmapCdb {
            anchor: false,
            param_len: 24,
        };
        assert_eq!(
            expected_transfer(&parse(unmap.to_cdb()), 512),
            (DataDirection::ToDevice, 24)
        );
        let ws = WriteSame16Cdb {
            blocks: 9,
            ..Default::default()
        };
        assert_eq!(
            expected_transfer(&parse(ws.to_cdb()), 4096),
            (DataDirection::ToDevice, 4096)
        );
        let ws = WriteSame16Cdb { ndob: true, ..ws };
        assert_eq!(
            expected_transfer(&parse(ws.to_cdb()), 4096),
            (DataDirection::None, 0)
        );
        let rl = ReportLunsCdb {
            select_report: 0,
            alloc_len: 100,
        };
        assert_eq!(
            expected_transfer(&parse(rl.to_cdb()), 512),
            (DataDirection::FromDevice, 100)
        );
        assert_eq!(
            expected_transfer(&Command::ReadCapacity10, 512),
            (DataDirection::FromDevice, 8)
        );
        assert_eq!(
            expected_transfer(&Command::TestUnitReady, 512),
            (DataDirection::None, 0)
        );
    }

    #[test]
    fn buffers_must_hold_what_the_cdb_asks() {
        let read = parse(
            ReadWrite10Cdb::new(0, 2, RwFlags::default())
                .unwrap()
                .read_cdb(),
        );
        assert!(buffers_fit(&read, 512, 0, 1024));
        assert!(buffers_fit(&read, 512, 0, 4096));
        assert!(!buffers_fit(&read, 512, 0, 1023));
        assert!(!buffers_fit(&read, 512, 1024, 0));
        assert!(buffers_fit(&Command::TestUnitReady, 512, 0, 0));
        assert!(buffers_fit(&Command::TestUnitReady, 512, 0, 512));
    }

    #[test]
    fn command_classes() {
        for op in [0x28, 0x2a, 0x88, 0x8a, 0x35, 0x91, 0x42, 0x93] {
            assert!(is_media_access(op), "{op:#x}");
        }
        for op in [0x00, 0x03, 0x12, 0x25, 0x9e, 0xa0, 0x1a, 0x5a, 0x1b] {
            assert!(!is_media_access(op), "{op:#x}");
        }
        assert!(!reports_unit_attention(opcode::INQUIRY));
        assert!(!reports_unit_attention(opcode::REPORT_LUNS));
        assert!(!reports_unit_attention(opcode::REQUEST_SENSE));
        assert!(reports_unit_attention(opcode::TEST_UNIT_READY));
        assert!(reports_unit_attention(0xff));
    }

    #[test]
    fn naca_bit_of_the_control_byte() {
        assert_eq!(naca_set(&[0, 0, 0, 0, 0, 0x04], 0), Some(5));
        assert_eq!(naca_set(&[0, 0, 0, 0, 0, 0x03], 0), None);
        let mut rw16 = [0u8; 32];
        rw16[0] = 0x88;
        rw16[15] = 0x04;
        assert_eq!(naca_set(&rw16, 0x88), Some(15));
        // Past the CDB the byte is not the control byte; short input is no NACA.
        rw16[15] = 0;
        rw16[16] = 0x04;
        assert_eq!(naca_set(&rw16, 0x88), None);
        assert_eq!(naca_set(&[0x88], 0x88), None);
        assert_eq!(naca_set(&[0xff; 16], 0xff), None);
    }

    #[test]
    fn unit_attention_queue() {
        let mut s = UnitState::default();
        assert!(!s.needs_attention());
        s.raise(Asc::CAPACITY_DATA_CHANGED);
        s.raise(Asc::CAPACITY_DATA_CHANGED);
        s.raise(Asc::REPORTED_LUNS_DATA_CHANGED);
        assert_eq!(s.unit_attentions.len(), 2);
        // A reset supersedes what is pending.
        s.raise(Asc::POWER_ON_RESET);
        assert_eq!(s.unit_attentions, [Asc::POWER_ON_RESET]);
        for i in 0..20 {
            s.raise(Asc::new(0x3f, i));
        }
        assert_eq!(s.unit_attentions.len(), MAX_QUEUED_UNIT_ATTENTIONS);
        assert_eq!(s.unit_attentions[0], Asc::POWER_ON_RESET);
        let mut s = UnitState {
            stopped: true,
            not_ready_turs: 3,
            ..Default::default()
        };
        assert!(s.needs_attention());
        assert!(s.not_ready().unwrap().needs_start_unit());
        s.stopped = false;
        assert!(s
            .not_ready()
            .unwrap()
            .is(SenseKey::NotReady, Asc::NOT_READY_BECOMING_READY));
        s.not_ready_turs = 0;
        assert!(s.not_ready().is_none());
    }

    #[test]
    fn report_luns_select_report() {
        let all = ReportLuns::parse(&report_luns(0, &[0, 1, 300]).unwrap()).unwrap();
        assert_eq!(
            all.luns
                .iter()
                .map(|l| l.number().unwrap())
                .collect::<Vec<_>>(),
            vec![0, 1, 300]
        );
        assert_eq!(all.luns[2].0[..2], [0x41, 0x2c]);
        let wk = ReportLuns::parse(&report_luns(1, &[0]).unwrap()).unwrap();
        assert_eq!(wk.luns, vec![Lun::REPORT_LUNS_WLUN]);
        let both = ReportLuns::parse(&report_luns(2, &[0]).unwrap()).unwrap();
        assert_eq!(both.luns.len(), 2);
        assert!(matches!(report_luns(0x42, &[0]), Err(Fail::Check(_))));
    }
}
