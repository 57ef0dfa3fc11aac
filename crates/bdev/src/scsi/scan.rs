//! Discovering targets and LUNs, and what each LUN can do.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use vireo_scsi::{
    capacity::READ_CAPACITY_16_LEN, read_capacity_10_cdb, BlockLimits, DeviceIdentification,
    InquiryCdb, LogicalBlockProvisioning, Peripheral, ReadCapacity10, ReadCapacity16,
    ReadCapacity16Cdb, ReportLuns, ReportLunsCdb, Sense, SenseKey, StandardInquiry,
    StartStopUnitCdb, SupportedPages, UnitSerialNumber, UnmapCdb,
};
use vireo_virtio::{DmaBuf, DmaMemory};

use super::queue::ScsiQueue;
use super::wire::{evaluate, lun_bytes, response, Outcome, Resp};
use crate::error::IoError;

const CMD_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_ATTEMPTS: u32 = 20;

/// What the scan learned about one LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunInfo {
    /// Target id.
    pub target: u8,
    /// LUN.
    pub lun: u16,
    /// Peripheral device type (0 = disk).
    pub device_type: u8,
    /// Vendor.
    pub vendor: String,
    /// Product.
    pub product: String,
    /// Unit serial number (VPD 80h).
    pub serial: Option<String>,
    /// Logical unit designator (VPD 83h: NAA, EUI-64, ... in that preference).
    pub device_id: Option<String>,
    /// WRITE SAME(16) is implemented (probed).
    pub write_same: bool,
    /// Logical block size.
    pub block_size: u32,
    /// Blocks.
    pub num_blocks: u64,
    /// Physical block size.
    pub physical_block_size: u32,
    /// Block limits (VPD B0h), if reported.
    pub limits: Option<BlockLimits>,
    /// Provisioning (VPD B2h), if reported.
    pub provisioning: Option<LogicalBlockProvisioning>,
    /// UNMAP was probed and works.
    pub unmap: bool,
    /// READ/WRITE(16) are needed (capacity or LBA beyond 10-byte CDBs) and work.
    pub rw16: bool,
    /// The medium is write-protected.
    pub read_only: bool,
    /// WCE of the caching mode page (`None`: the page was not reported).
    pub write_cache: Option<bool>,
}

/// Sends scan commands on one queue.
pub struct Scanner<'a> {
    pub q: &'a mut ScsiQueue,
    pub mem: &'a Arc<DmaMemory>,
    pub broken: &'a AtomicBool,
}

/// The result of one command during the scan.
enum Cmd {
    Ok(u32),
    Check(Sense),
    BadTarget,
}

impl Scanner<'_> {
    fn buf(&self, len: usize) -> Result<DmaBuf, IoError> {
        let mut b = self
            .mem
            .alloc(len.max(1), 64)
            .map_err(|e| IoError::NoMemory(e.to_string()))?;
        b.as_mut_slice().fill(0);
        Ok(b)
    }

    /// Run a command, retrying UNIT ATTENTION, BUSY and transport hiccups a bounded
    /// number of times.
    fn run(
        &mut self,
        t: u8,
        l: u16,
        cdb: &[u8],
        out: Option<&DmaBuf>,
        inn: Option<&DmaBuf>,
    ) -> Result<Cmd, IoError> {
        let lun = lun_bytes(t, l);
        let len = inn.or(out).map_or(0, |b| b.len() as u32);
        for _ in 0..MAX_ATTEMPTS {
            let r: Resp = self.q.exec(&lun, cdb, out, inn, CMD_TIMEOUT, self.broken)?;
            if r.response == response::BAD_TARGET || r.response == response::INCORRECT_LUN {
                return Ok(Cmd::BadTarget);
            }
            match evaluate(&r, len, true) {
                Outcome::Done { transferred } => return Ok(Cmd::Ok(transferred)),
                Outcome::Retry(_) => std::thread::sleep(Duration::from_millis(5)),
                Outcome::Check(s) if s.is_unit_attention() => {}
                Outcome::Check(s) => return Ok(Cmd::Check(s)),
                Outcome::Fail(e) => return Err(e),
            }
        }
        Err(IoError::Scsi(format!(
            "command {:#04x} to target {t} LUN {l} kept asking for a retry",
            cdb.first().copied().unwrap_or(0)
        )))
    }

    /// LUNs of target `t`: `None` when the target does not exist.
    pub fn report_luns(&mut self, t: u8) -> Result<Option<Vec<u16>>, IoError> {
        let mut alloc = 8 + 8 * 64;
        for _ in 0..3 {
            let b = self.buf(alloc)?;
            let cdb = ReportLunsCdb {
                select_report: 0,
                alloc_len: alloc as u32,
            }
            .to_cdb();
            match self.run(t, 0, cdb.as_bytes(), None, Some(&b))? {
                Cmd::BadTarget => return Ok(None),
                Cmd::Check(s) if s.is_illegal_request() => {
                    // REPORT LUNS unsupported: LUN 0 only, if it answers INQUIRY.
                    return Ok(Some(vec![0]));
                }
                Cmd::Check(s) => {
                    return Err(IoError::Sense {
                        key: s.key.to_u8(),
                        asc: s.asc,
                        ascq: s.ascq,
                    })
                }
                Cmd::Ok(n) => {
                    let data = &b.as_slice()[..n as usize];
                    let need = ReportLuns::needed_len(data)
                        .map_err(|e| IoError::Scsi(format!("REPORT LUNS: {e}")))?;
                    // Virtio-scsi addresses at most 16384 LUNs; of a longer list the
                    // first 16384 entries are read.
                    let need = need.min(ReportLuns::data_len(16384));
                    if need > alloc {
                        alloc = need;
                        continue;
                    }
                    let list = ReportLuns::parse_prefix(data)
                        .map_err(|e| IoError::Scsi(format!("REPORT LUNS: {e}")))?;
                    let mut luns: Vec<u16> = list
                        .luns
                        .iter()
                        .filter(|l| !l.is_well_known())
                        .filter_map(|l| l.number())
                        .collect();
                    luns.sort_unstable();
                    luns.dedup();
                    return Ok(Some(luns));
                }
            }
        }
        Err(IoError::Scsi("REPORT LUNS data keeps growing".into()))
    }

    fn inquiry_page(
        &mut self,
        t: u8,
        l: u16,
        page: Option<u8>,
    ) -> Result<Option<Vec<u8>>, IoError> {
        let alloc = 255usize;
        let b = self.buf(alloc)?;
        let cdb = match page {
            None => InquiryCdb::standard(alloc as u16),
            Some(p) => InquiryCdb::vpd(p, alloc as u16),
        }
        .to_cdb();
        match self.run(t, l, cdb.as_bytes(), None, Some(&b))? {
            Cmd::Ok(n) => Ok(Some(b.as_slice()[..n as usize].to_vec())),
            Cmd::Check(_) | Cmd::BadTarget => Ok(None),
        }
    }

    /// Make the unit ready: TEST UNIT READY, with START STOP UNIT when it needs it.
    fn make_ready(&mut self, t: u8, l: u16) -> Result<(), IoError> {
        let tur = [0u8; 6];
        let mut started = false;
        for _ in 0..MAX_ATTEMPTS {
            match self.run(t, l, &tur, None, None)? {
                Cmd::Ok(_) => return Ok(()),
                Cmd::BadTarget => return Err(IoError::Scsi("LUN vanished during scan".into())),
                Cmd::Check(s) if s.needs_start_unit() && !started => {
                    started = true;
                    let ssu = StartStopUnitCdb::start().to_cdb();
                    let _ = self.run(t, l, ssu.as_bytes(), None, None)?;
                }
                Cmd::Check(s) if s.key == SenseKey::NotReady => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Cmd::Check(s) => {
                    return Err(IoError::Sense {
                        key: s.key.to_u8(),
                        asc: s.asc,
                        ascq: s.ascq,
                    })
                }
            }
        }
        Err(IoError::Scsi("the unit did not become ready".into()))
    }

    /// Capacity: READ CAPACITY(10), then (16) when needed or when provisioning matters.
    fn capacity(&mut self, t: u8, l: u16, want16: bool) -> Result<(u64, u32, u32), IoError> {
        let b = self.buf(8)?;
        let rc10 = read_capacity_10_cdb();
        let mut use16 = want16;
        let mut result = None;
        match self.run(t, l, rc10.as_bytes(), None, Some(&b))? {
            Cmd::Ok(n) if n >= 8 => {
                let c = ReadCapacity10::parse(&b.as_slice()[..8])
                    .map_err(|e| IoError::Scsi(format!("READ CAPACITY(10): {e}")))?;
                if c.needs_16() {
                    use16 = true;
                } else {
                    result = Some((c.block_count(), c.block_len, c.block_len));
                }
            }
            Cmd::Ok(_) => {
                return Err(IoError::Scsi(
                    "READ CAPACITY(10) returned short data".into(),
                ))
            }
            _ => use16 = true,
        }
        if use16 {
            let b = self.buf(READ_CAPACITY_16_LEN)?;
            let cdb = ReadCapacity16Cdb {
                alloc_len: READ_CAPACITY_16_LEN as u32,
            }
            .to_cdb();
            if let Cmd::Ok(n) = self.run(t, l, cdb.as_bytes(), None, Some(&b))? {
                if n as usize >= 12 {
                    let c = ReadCapacity16::parse(&b.as_slice()[..n as usize])
                        .map_err(|e| IoError::Scsi(format!("READ CAPACITY(16): {e}")))?;
                    let phys = c.physical_block_len().unwrap_or(c.block_len);
                    return Ok((c.block_count(), c.block_len, phys));
                }
            }
        }
        result.ok_or_else(|| IoError::Scsi("neither READ CAPACITY(10) nor (16) worked".into()))
    }

    /// Whether a command is implemented: CHECK CONDITION ILLEGAL REQUEST with INVALID
    /// COMMAND OPERATION CODE (20/00) means no.
    fn probe(&mut self, t: u8, l: u16, cdb: &[u8], inn: Option<&DmaBuf>) -> Result<bool, IoError> {
        match self.run(t, l, cdb, None, inn)? {
            Cmd::Ok(_) => Ok(true),
            Cmd::Check(s) if s.is_unsupported_command() => Ok(false),
            // Other errors (e.g. invalid field) still show the opcode exists.
            Cmd::Check(_) => Ok(true),
            Cmd::BadTarget => Ok(false),
        }
    }

    /// Everything about LUN `l` of target `t`; `Ok(None)` for LUNs that are not disks.
    pub fn lun(&mut self, t: u8, l: u16) -> Result<Option<LunInfo>, IoError> {
        let Some(std) = self.inquiry_page(t, l, None)? else {
            return Ok(None);
        };
        let inq =
            StandardInquiry::parse(&std).map_err(|e| IoError::Scsi(format!("INQUIRY: {e}")))?;
        if inq.peripheral.qualifier != Peripheral::QUALIFIER_CONNECTED {
            return Ok(None);
        }
        if inq.peripheral.device_type != Peripheral::TYPE_DISK {
            tracing::info!(
                target = t,
                lun = l,
                device_type = inq.peripheral.device_type,
                vendor = %inq.vendor,
                product = %inq.product,
                "skipping LUN that is not a disk"
            );
            return Ok(Some(LunInfo {
                target: t,
                lun: l,
                device_type: inq.peripheral.device_type,
                vendor: inq.vendor,
                product: inq.product,
                serial: None,
                device_id: None,
                write_same: false,
                block_size: 0,
                num_blocks: 0,
                physical_block_size: 0,
                limits: None,
                provisioning: None,
                unmap: false,
                rw16: false,
                read_only: false,
                write_cache: None,
            }));
        }
        self.make_ready(t, l)?;
        let pages = match self.inquiry_page(t, l, Some(0x00))? {
            Some(p) => SupportedPages::parse(&p)
                .map(|s| s.pages)
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let has = |p: u8| pages.contains(&p);
        let serial = if has(0x80) {
            self.inquiry_page(t, l, Some(0x80))?
                .and_then(|p| UnitSerialNumber::parse(&p).ok())
                .map(|s| s.serial.trim().to_string())
                .filter(|s| !s.is_empty())
        } else {
            None
        };
        let device_id = if has(0x83) {
            self.inquiry_page(t, l, Some(0x83))?
                .and_then(|p| DeviceIdentification::parse(&p).ok())
                .and_then(|d| d.preferred().map(|x| x.to_text()))
                .filter(|s| !s.is_empty())
        } else {
            None
        };
        let limits = if has(0xb0) {
            self.inquiry_page(t, l, Some(0xb0))?
                .and_then(|p| BlockLimits::parse(&p).ok())
        } else {
            None
        };
        let provisioning = if has(0xb2) {
            self.inquiry_page(t, l, Some(0xb2))?
                .and_then(|p| LogicalBlockProvisioning::parse(&p).ok())
        } else {
            None
        };
        let (num_blocks, block_size, phys) = self.capacity(t, l, provisioning.is_some())?;
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(IoError::Scsi(format!(
                "block length {block_size} is not a power of two between 512 and 65536"
            )));
        }
        if num_blocks == 0 {
            return Err(IoError::Scsi("capacity is 0 blocks".into()));
        }
        if num_blocks.checked_mul(block_size as u64).is_none() {
            return Err(IoError::Scsi(format!(
                "capacity of {num_blocks} blocks of {block_size} bytes does not fit in 64 bits"
            )));
        }
        // UNMAP: claimed by VPD B2 (LBPU) and B0 limits, then probed with an empty
        // parameter list (PARAMETER LIST LENGTH 0 unmaps nothing, SBC-4 5.32).
        let claimed = provisioning.map(|p| p.lbpu).unwrap_or(false)
            && limits
                .map(|bl| bl.max_unmap_lba_count != 0 && bl.max_unmap_descriptor_count != 0)
                .unwrap_or(true);
        let unmap = claimed && {
            let cdb = UnmapCdb {
                anchor: false,
                param_len: 0,
            }
            .to_cdb();
            self.probe(t, l, cdb.as_bytes(), None)?
        };
        // READ(16) only matters when 10-byte CDBs cannot address the whole LUN.
        let rw16 = num_blocks > u32::MAX as u64 + 1 && {
            let b = self.buf(block_size as usize)?;
            let cdb = vireo_scsi::read_cdb(num_blocks - 1, 1, Default::default());
            self.probe(t, l, cdb.as_bytes(), Some(&b))?
        };
        if num_blocks > u32::MAX as u64 + 1 && !rw16 {
            return Err(IoError::Scsi(format!(
                "{num_blocks} blocks need READ/WRITE(16), which the LUN does not implement"
            )));
        }
        // WRITE SAME(16): probed one block past the end, which an implementation answers
        // with LBA OUT OF RANGE (21/00) and a device without it with INVALID COMMAND
        // OPERATION CODE (20/00); nothing is written either way.
        let write_same = {
            let z = self.buf(block_size as usize)?;
            let cdb = vireo_scsi::WriteSame16Cdb {
                lba: num_blocks,
                blocks: 1,
                unmap: false,
                anchor: false,
                ndob: false,
                protect: 0,
            }
            .to_cdb();
            match self.run(t, l, cdb.as_bytes(), Some(&z), None)? {
                // The answer of a device with WRITE SAME(16) to an LBA past its end;
                // any other (an invalid opcode or field, an unexpected error) is no
                // evidence of support.
                Cmd::Check(s) => s.is(
                    vireo_scsi::SenseKey::IllegalRequest,
                    vireo_scsi::Asc::LBA_OUT_OF_RANGE,
                ),
                // A device that accepted a write past its end is not to be trusted with it.
                Cmd::Ok(_) | Cmd::BadTarget => false,
            }
        };
        // Write protection (WP bit of the header) and the write cache (WCE of the
        // caching page) from MODE SENSE(6) of all pages.
        let (read_only, write_cache) = {
            let b = self.buf(255)?;
            let cdb = vireo_scsi::ModeSense6Cdb {
                dbd: true,
                pc: vireo_scsi::PageControl::Current,
                page: 0x3f,
                subpage: 0,
                alloc_len: 255,
            }
            .to_cdb();
            match self.run(t, l, cdb.as_bytes(), None, Some(&b))? {
                Cmd::Ok(n) if n >= 4 => {
                    let data = &b.as_slice()[..n as usize];
                    let wp = vireo_scsi::ModeHeader::parse6(data)
                        .map(|h| h.write_protect)
                        .unwrap_or(false);
                    let wce = vireo_scsi::ModeParameters::parse6(data)
                        .ok()
                        .and_then(|m| m.caching())
                        .map(|c| c.wce);
                    (wp, wce)
                }
                _ => (false, None),
            }
        };
        Ok(Some(LunInfo {
            target: t,
            lun: l,
            device_type: 0,
            vendor: inq.vendor,
            product: inq.product,
            serial,
            device_id,
            write_same,
            block_size,
            num_blocks,
            physical_block_size: phys,
            limits,
            provisioning,
            unmap,
            rw16,
            read_only,
            write_cache,
        }))
    }
}
