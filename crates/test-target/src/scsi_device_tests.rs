//! Unit tests of the scsi device model: commands placed in a small guest memory and executed
//! the way a request queue does, without a socket.

use super::*;
use crate::scsi_config::{Backing, BlockLimitsConfig};
use crate::scsi_request::{encode_lun, Event, EVENT_SIZE};
use vireo_scsi::block::RwFlags;
use vireo_scsi::cdb::opcode;
use vireo_scsi::mode::PageControl;
use vireo_scsi::unmap::{UnmapLimits, UnmapListWriter};
use vireo_scsi::vpd::page;
use vireo_scsi::{
    read_capacity_10_cdb, BlockLimits, DeviceIdentification, InquiryCdb, LogicalBlockProvisioning,
    ModeParameters, ModeSense10Cdb, ModeSense6Cdb, ReadCapacity10, ReadCapacity16,
    ReadCapacity16Cdb, ReadWrite10Cdb, ReadWrite16Cdb, ReportLuns, ReportLunsCdb, RequestSenseCdb,
    SenseFormat, SenseKey, StandardInquiry, StartStopUnitCdb, SupportedPages, SyncCache10Cdb,
    UnitSerialNumber, UnmapCdb, WriteSame16Cdb,
};
use vm_memory::GuestAddress;

const MEM_SIZE: usize = 32 << 20;
const REQ: u64 = 0x1000;
const RESP: u64 = 0x2000;
const OUT: u64 = 0x10_0000;
const IN: u64 = 0x100_0000;

/// The result of one command as the driver sees it.
#[derive(Debug)]
struct Answer {
    used_len: u32,
    response: Response,
    status: u8,
    resid: u32,
    sense: Vec<u8>,
    data: Vec<u8>,
}

impl Answer {
    fn good(&self) -> bool {
        self.response == Response::Ok && self.status == 0
    }

    fn sense(&self) -> Sense {
        assert_eq!(self.response, Response::Ok, "{self:?}");
        assert_eq!(self.status, 2, "CHECK CONDITION expected: {self:?}");
        Sense::parse(&self.sense).expect("valid sense data")
    }

    fn is_check(&self, key: SenseKey, asc: Asc) -> bool {
        self.status == 2 && self.sense().is(key, asc)
    }
}

struct Rig {
    dev: ScsiDevice,
    mem: GuestMemoryMmap<()>,
    faults: Arc<Faults>,
    scsi_faults: Arc<ScsiFaults>,
}

fn ram(size_bytes: u64) -> LunConfig {
    LunConfig {
        backend: Backing::Ram { size_bytes },
        ..Default::default()
    }
}

impl Rig {
    fn new(cfg: ScsiTargetConfig) -> Self {
        let faults = Arc::new(Faults::default());
        let scsi_faults = Arc::new(ScsiFaults::default());
        let dev = ScsiDevice::new(
            cfg,
            Arc::new(StatCounters::default()),
            Arc::clone(&faults),
            Arc::clone(&scsi_faults),
        )
        .unwrap();
        dev.reset_for_connection();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Rig {
            dev,
            mem,
            faults,
            scsi_faults,
        }
    }

    fn one(lun: LunConfig) -> Self {
        Rig::new(ScsiTargetConfig {
            luns: BTreeMap::from([((0, 0), lun)]),
            ..Default::default()
        })
    }

    fn stats(&self) -> ScsiStats {
        self.dev.stats()
    }

    fn fill(&self, len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed)
            .collect()
    }

    /// Runs `cdb` on `(target, lun)` with `data_out` and a data-in buffer of `in_len` bytes, the
    /// way Linux frames it: request, data-out, response, data-in.
    fn run_lun(&self, lun: [u8; 8], cdb: &[u8], data_out: &[u8], in_len: u32) -> Answer {
        let mut req = vec![0u8; 51];
        req[..19].copy_from_slice(
            &CmdReqHeader {
                lun,
                tag: 7,
                task_attr: 0,
                prio: 0,
                crn: 0,
            }
            .to_bytes(),
        );
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        self.mem
            .write_slice(&[0xee; 108], GuestAddress(RESP))
            .unwrap();
        let mut descs = vec![(REQ, 51u32, false)];
        if !data_out.is_empty() {
            self.mem.write_slice(data_out, GuestAddress(OUT)).unwrap();
            descs.push((OUT, data_out.len() as u32, false));
        }
        descs.push((RESP, 108, true));
        if in_len > 0 {
            descs.push((IN, in_len, true));
        }
        self.answer(self.dev.execute_request(&self.mem, descs), in_len)
    }

    fn answer(&self, used_len: u32, in_len: u32) -> Answer {
        let mut resp = [0u8; 108];
        self.mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        let h = CmdRespHeader::parse(&resp).unwrap();
        let mut data = vec![0u8; in_len as usize];
        self.mem.read_slice(&mut data, GuestAddress(IN)).unwrap();
        let written = (in_len - h.resid.min(in_len)) as usize;
        data.truncate(written);
        Answer {
            used_len,
            response: Response::from_u8(h.response),
            status: h.status,
            resid: h.resid,
            sense: resp[12..12 + h.sense_len as usize].to_vec(),
            data,
        }
    }

    fn run(&self, t: u8, l: u16, cdb: &[u8], data_out: &[u8], in_len: u32) -> Answer {
        self.run_lun(encode_lun(t, l), cdb, data_out, in_len)
    }

    fn cmd(&self, cdb: &[u8], in_len: u32) -> Answer {
        self.run(0, 0, cdb, &[], in_len)
    }

    fn write(&self, lba: u64, data: &[u8]) -> Answer {
        let blocks = data.len() as u64 / 512;
        let cdb = if lba > u64::from(u32::MAX) {
            ReadWrite16Cdb::new(lba, blocks, RwFlags::default())
                .unwrap()
                .write_cdb()
        } else {
            ReadWrite10Cdb::new(lba, blocks, RwFlags::default())
                .unwrap()
                .write_cdb()
        };
        self.run(0, 0, cdb.as_bytes(), data, 0)
    }

    fn read(&self, lba: u64, len: u32) -> Answer {
        let cdb = ReadWrite10Cdb::new(lba, u64::from(len) / 512, RwFlags::default())
            .unwrap()
            .read_cdb();
        self.cmd(cdb.as_bytes(), len)
    }

    fn unmap(&self, ranges: &[(u64, u32)]) -> Answer {
        let list = vireo_scsi::UnmapParameterList {
            descriptors: ranges
                .iter()
                .map(|&(lba, blocks)| vireo_scsi::UnmapDescriptor { lba, blocks })
                .collect(),
        }
        .encode()
        .unwrap();
        let cdb = UnmapCdb {
            anchor: false,
            param_len: list.len() as u16,
        }
        .to_cdb();
        self.run(0, 0, cdb.as_bytes(), &list, 0)
    }
}

fn tur() -> [u8; 6] {
    [0; 6]
}

fn inquiry(page: Option<u8>) -> Vec<u8> {
    InquiryCdb {
        page,
        alloc_len: 255,
    }
    .to_cdb()
    .as_bytes()
    .to_vec()
}

fn report_luns() -> Vec<u8> {
    ReportLunsCdb {
        select_report: 0,
        alloc_len: 4096,
    }
    .to_cdb()
    .as_bytes()
    .to_vec()
}

#[test]
fn standard_inquiry_and_residual() {
    let rig = Rig::one(LunConfig {
        vendor: "ACME".into(),
        product: "DISK".into(),
        revision: "1.0".into(),
        ..ram(1 << 20)
    });
    let a = rig.cmd(&inquiry(None), 255);
    assert!(a.good(), "{a:?}");
    let inq = StandardInquiry::parse(&a.data).unwrap();
    assert!(inq.peripheral.is_disk());
    assert_eq!(
        (inq.vendor.as_str(), inq.product.as_str()),
        ("ACME", "DISK")
    );
    assert_eq!(inq.revision, "1.0");
    assert_eq!(a.data.len(), 36);
    assert_eq!(a.resid, 255 - 36);
    assert_eq!(a.used_len, 108 + 36);
    // A short allocation length cuts the data.
    let cdb = InquiryCdb::standard(5).to_cdb();
    let a = rig.cmd(cdb.as_bytes(), 5);
    assert_eq!((a.data.len(), a.resid), (5, 0));
    // A buffer smaller than the allocation length is an overrun (virtio 1.2, 5.6.6.1).
    let a = rig.cmd(&inquiry(None), 100);
    assert_eq!(a.response, Response::Overrun);
    assert_eq!(a.resid, 100);
    let s = rig.stats();
    assert_eq!(s.opcode_count(opcode::INQUIRY), 3);
    assert_eq!(s.response_count(Response::Overrun), 1);
}

#[test]
fn vpd_pages() {
    let rig = Rig::one(LunConfig {
        serial: Some("SER-42".into()),
        limits: BlockLimitsConfig {
            max_transfer_length: 256,
            optimal_transfer_length: 64,
            optimal_transfer_granularity: 8,
            max_unmap_lba_count: 1 << 20,
            max_unmap_descriptor_count: 16,
            optimal_unmap_granularity: 8,
            max_write_same_length: 4096,
        },
        ..ram(1 << 20)
    });
    let pages = SupportedPages::parse(&rig.cmd(&inquiry(Some(0)), 255).data).unwrap();
    assert_eq!(pages.pages, vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    let serial = UnitSerialNumber::parse(&rig.cmd(&inquiry(Some(0x80)), 255).data).unwrap();
    assert_eq!(serial.serial, "SER-42");
    let id = DeviceIdentification::parse(&rig.cmd(&inquiry(Some(0x83)), 255).data).unwrap();
    let naa = id.preferred().unwrap();
    assert_eq!(naa.designator_type, vireo_scsi::DesignatorType::Naa);
    assert_eq!(naa.designator[0] >> 4, 3);
    assert!(id.find(vireo_scsi::DesignatorType::T10VendorId).is_some());
    let bl = BlockLimits::parse(&rig.cmd(&inquiry(Some(0xb0)), 255).data).unwrap();
    assert_eq!(bl.max_transfer_length, 256);
    assert_eq!(bl.optimal_transfer_length, 64);
    assert_eq!(bl.optimal_transfer_granularity, 8);
    assert_eq!(bl.max_unmap_lba_count, 1 << 20);
    assert_eq!(bl.max_unmap_descriptor_count, 16);
    assert_eq!(bl.optimal_unmap_granularity, 8);
    assert_eq!(bl.max_write_same_length, 4096);
    assert!(bl.wsnz);
    let bdc =
        vireo_scsi::BlockDeviceCharacteristics::parse(&rig.cmd(&inquiry(Some(0xb1)), 255).data)
            .unwrap();
    assert!(bdc.is_non_rotating());
    let lbp = LogicalBlockProvisioning::parse(&rig.cmd(&inquiry(Some(0xb2)), 255).data).unwrap();
    assert!(lbp.lbpu && lbp.lbpws && lbp.unmapped_reads_zero());
    // An unknown page is an invalid field (byte 2 of the CDB).
    let a = rig.cmd(&inquiry(Some(0xc7)), 255);
    let s = a.sense();
    assert!(s.is(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
    assert_eq!(s.field_pointer().unwrap().byte, 2);
    // CMDDT (obsolete) is refused by the codec.
    let a = rig.cmd(&[0x12, 0x02, 0, 0, 255, 0], 255);
    assert!(a.is_check(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));

    // Without UNMAP: zero limits, LBPU clear, and UNMAP is an invalid operation code.
    let rig = Rig::one(LunConfig {
        support_unmap: false,
        support_write_same: false,
        ..ram(1 << 20)
    });
    let bl = BlockLimits::parse(&rig.cmd(&inquiry(Some(0xb0)), 255).data).unwrap();
    assert_eq!(
        (bl.max_unmap_lba_count, bl.max_unmap_descriptor_count),
        (0, 0)
    );
    let lbp = LogicalBlockProvisioning::parse(&rig.cmd(&inquiry(Some(0xb2)), 255).data).unwrap();
    assert!(!lbp.lbpu && !lbp.lbpws);
    assert!(rig.unmap(&[(0, 1)]).is_check(
        SenseKey::IllegalRequest,
        Asc::INVALID_COMMAND_OPERATION_CODE
    ));
    let ws = WriteSame16Cdb {
        lba: 0,
        blocks: 1,
        ndob: true,
        ..Default::default()
    }
    .to_cdb();
    assert!(rig.cmd(ws.as_bytes(), 0).is_check(
        SenseKey::IllegalRequest,
        Asc::INVALID_COMMAND_OPERATION_CODE
    ));
}

#[test]
fn read_capacity_of_small_and_huge_units() {
    let rig = Rig::one(LunConfig {
        block_size: 4096,
        ..ram(1 << 20)
    });
    let a = rig.cmd(read_capacity_10_cdb().as_bytes(), 8);
    let rc = ReadCapacity10::parse(&a.data).unwrap();
    assert_eq!((rc.last_lba, rc.block_len), (255, 4096));
    let a = rig.cmd(ReadCapacity16Cdb::default().to_cdb().as_bytes(), 32);
    let rc = ReadCapacity16::parse(&a.data).unwrap();
    assert_eq!((rc.block_count(), rc.block_len), (256, 4096));
    assert!(rc.lbpme && rc.lbprz);

    // More than 2^32 blocks on a sparse file: READ CAPACITY(10) says "use 16".
    let dir = tempfile::tempdir().unwrap();
    let blocks = (1u64 << 32) + 16;
    let rig = Rig::one(LunConfig {
        backend: Backing::File {
            path: dir.path().join("huge.img"),
            size_bytes: Some(blocks * 512),
        },
        support_unmap: false,
        ..Default::default()
    });
    let rc = ReadCapacity10::parse(&rig.cmd(read_capacity_10_cdb().as_bytes(), 8).data).unwrap();
    assert!(rc.needs_16());
    let rc = ReadCapacity16::parse(
        &rig.cmd(ReadCapacity16Cdb::default().to_cdb().as_bytes(), 32)
            .data,
    )
    .unwrap();
    assert_eq!(rc.block_count(), blocks);
    assert!(!rc.lbpme);
    // READ(16)/WRITE(16) past 2^32.
    let data = rig.fill(1024, 3);
    assert!(rig.write(blocks - 2, &data).good());
    let cdb = ReadWrite16Cdb::new(blocks - 2, 2, RwFlags::default())
        .unwrap()
        .read_cdb();
    let a = rig.cmd(cdb.as_bytes(), 1024);
    assert!(a.good());
    assert_eq!(a.data, data);
    // One block further is out of range.
    let cdb = ReadWrite16Cdb::new(blocks - 1, 2, RwFlags::default())
        .unwrap()
        .read_cdb();
    assert!(rig
        .cmd(cdb.as_bytes(), 1024)
        .is_check(SenseKey::IllegalRequest, Asc::LBA_OUT_OF_RANGE));
}

#[test]
fn read_write_roundtrip_and_limits() {
    let rig = Rig::one(LunConfig {
        limits: BlockLimitsConfig {
            max_transfer_length: 8,
            ..Default::default()
        },
        ..ram(1 << 20)
    });
    let data = rig.fill(4096, 1);
    let a = rig.write(10, &data);
    assert!(a.good(), "{a:?}");
    assert_eq!((a.resid, a.used_len), (0, 108));
    let a = rig.read(10, 4096);
    assert!(a.good());
    assert_eq!(a.data, data);
    assert_eq!(a.used_len, 108 + 4096);
    // READ(16) of the same blocks, with a data-in buffer larger than needed: residual.
    let cdb = ReadWrite16Cdb::new(10, 8, RwFlags::fua(true))
        .unwrap()
        .read_cdb();
    let a = rig.cmd(cdb.as_bytes(), 8192);
    assert!(a.good());
    assert_eq!(a.resid, 4096);
    assert_eq!(a.data, data);

    // 9 blocks break the maximum transfer length of 8: INVALID FIELD IN CDB at the length.
    let a = rig.read(0, 9 * 512);
    let s = a.sense();
    assert!(s.is(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
    assert_eq!(s.field_pointer().unwrap().byte, 7);
    assert_eq!(a.resid, 9 * 512);
    let a = rig.write(0, &rig.fill(9 * 512, 2));
    assert!(a.is_check(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
    // Out of range.
    assert!(rig
        .read(2047, 1024)
        .is_check(SenseKey::IllegalRequest, Asc::LBA_OUT_OF_RANGE));
    // A buffer smaller than the transfer, or on the wrong side: overrun.
    let cdb = ReadWrite10Cdb::new(0, 4, RwFlags::default())
        .unwrap()
        .read_cdb();
    assert_eq!(rig.cmd(cdb.as_bytes(), 1024).response, Response::Overrun);
    let cdb = ReadWrite10Cdb::new(0, 1, RwFlags::default())
        .unwrap()
        .write_cdb();
    assert_eq!(rig.cmd(cdb.as_bytes(), 512).response, Response::Overrun);
    // Protection information is not supported.
    let mut cdb = ReadWrite10Cdb::new(0, 1, RwFlags::default())
        .unwrap()
        .read_cdb()
        .as_bytes()
        .to_vec();
    cdb[1] |= 0x20;
    assert!(rig
        .cmd(&cdb, 512)
        .is_check(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));

    let s = rig.stats();
    assert_eq!(s.transfer_limit_rejected, 2);
    assert_eq!(s.max_transfer_blocks, 9);
    assert_eq!(s.out_of_range, 1);
    assert_eq!((s.bytes_written, s.bytes_read), (4096, 8192));
    assert_eq!(s.opcode_count(opcode::READ_10), 5);
    assert_eq!(s.opcode_count(opcode::WRITE_10), 3);
    assert_eq!(s.opcode_count(opcode::READ_16), 1);
    assert_eq!(
        s.sense_count(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB),
        3
    );
    let l = rig.dev.lun_stats(0, 0).unwrap();
    assert_eq!((l.reads, l.writes), (5, 2));
}

#[test]
fn invalid_opcodes_and_sbc2_units() {
    let rig = Rig::one(LunConfig {
        support_16: false,
        ..ram(1 << 20)
    });
    // READ(6) is not emulated; nor is anything unknown.
    for cdb in [
        &[0x08u8, 0, 0, 0, 1, 0][..],
        &[0xff; 16][..],
        &[0x9e, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0][..],
    ] {
        let a = rig.cmd(cdb, 512);
        assert_eq!(a.status, 2, "{cdb:?}");
        assert!(a.sense().is_illegal_request());
    }
    let cdb = ReadWrite16Cdb::new(0, 1, RwFlags::default())
        .unwrap()
        .read_cdb();
    assert!(rig.cmd(cdb.as_bytes(), 512).is_check(
        SenseKey::IllegalRequest,
        Asc::INVALID_COMMAND_OPERATION_CODE
    ));
    let cdb = vireo_scsi::SyncCache16Cdb::default().to_cdb();
    assert!(rig.cmd(cdb.as_bytes(), 0).is_check(
        SenseKey::IllegalRequest,
        Asc::INVALID_COMMAND_OPERATION_CODE
    ));
    // READ CAPACITY(16) still works.
    assert!(rig
        .cmd(ReadCapacity16Cdb::default().to_cdb().as_bytes(), 32)
        .good());
    // NACA set in the CONTROL byte.
    let a = rig.cmd(&[0, 0, 0, 0, 0, 0x04], 0);
    assert_eq!(a.sense().field_pointer().unwrap().byte, 5);
    assert_eq!(rig.stats().opcode_count(0xff), 1);
    assert_eq!(rig.stats().opcode_count(0x08), 1);
}

#[test]
fn synchronize_cache_and_start_stop() {
    let rig = Rig::one(ram(1 << 20));
    let sync = |lba, blocks| {
        SyncCache10Cdb {
            immed: false,
            lba,
            blocks,
        }
        .to_cdb()
    };
    assert!(rig.cmd(sync(0, 0).as_bytes(), 0).good());
    assert!(rig.cmd(sync(2040, 8).as_bytes(), 0).good());
    assert!(rig
        .cmd(sync(2040, 9).as_bytes(), 0)
        .is_check(SenseKey::IllegalRequest, Asc::LBA_OUT_OF_RANGE));
    assert!(rig
        .cmd(vireo_scsi::SyncCache16Cdb::default().to_cdb().as_bytes(), 0)
        .good());
    // STOP UNIT makes the unit not ready until START UNIT.
    let stop = StartStopUnitCdb {
        start: false,
        ..StartStopUnitCdb::start()
    }
    .to_cdb();
    assert!(rig.cmd(stop.as_bytes(), 0).good());
    assert!(rig.cmd(&tur(), 0).is_check(
        SenseKey::NotReady,
        Asc::NOT_READY_INITIALIZING_COMMAND_REQUIRED
    ));
    assert!(rig.read(0, 512).sense().needs_start_unit());
    assert!(rig
        .cmd(StartStopUnitCdb::start().to_cdb().as_bytes(), 0)
        .good());
    assert!(rig.cmd(&tur(), 0).good());
    assert_eq!(rig.dev.lun_stats(0, 0).unwrap().syncs, 4);
}

#[test]
fn unmap_enforces_the_block_limits() {
    let rig = Rig::one(LunConfig {
        limits: BlockLimitsConfig {
            max_unmap_lba_count: 64,
            max_unmap_descriptor_count: 2,
            ..Default::default()
        },
        ..ram(1 << 20)
    });
    let data = rig.fill(16 * 512, 9);
    assert!(rig.write(0, &data).good());
    let a = rig.unmap(&[(2, 4), (10, 2)]);
    assert!(a.good(), "{a:?}");
    let back = rig.read(0, 16 * 512).data;
    assert_eq!(&back[..1024], &data[..1024]);
    assert!(back[1024..3072].iter().all(|&b| b == 0));
    assert_eq!(&back[3072..5120], &data[3072..5120]);
    assert!(back[5120..6144].iter().all(|&b| b == 0));
    // Three descriptors, or 65 blocks: INVALID FIELD IN PARAMETER LIST.
    assert!(rig.unmap(&[(0, 1), (2, 1), (4, 1)]).is_check(
        SenseKey::IllegalRequest,
        Asc::INVALID_FIELD_IN_PARAMETER_LIST
    ));
    assert!(rig.unmap(&[(0, 60), (100, 5)]).is_check(
        SenseKey::IllegalRequest,
        Asc::INVALID_FIELD_IN_PARAMETER_LIST
    ));
    // Beyond the capacity.
    assert!(rig
        .unmap(&[(2047, 2)])
        .is_check(SenseKey::IllegalRequest, Asc::LBA_OUT_OF_RANGE));
    // An empty list is fine, a list of 1..7 bytes is a length error.
    assert!(rig.unmap(&[]).good());
    let cdb = UnmapCdb {
        anchor: false,
        param_len: 4,
    }
    .to_cdb();
    assert!(rig
        .run(0, 0, cdb.as_bytes(), &[0, 2, 0, 0], 0)
        .is_check(SenseKey::IllegalRequest, Asc::PARAMETER_LIST_LENGTH_ERROR));
    // ANCHOR is not supported.
    let cdb = UnmapCdb {
        anchor: true,
        param_len: 24,
    }
    .to_cdb();
    assert!(rig
        .run(0, 0, cdb.as_bytes(), &[0; 24], 0)
        .is_check(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
    // No parameter list length at all.
    let cdb = UnmapCdb::default().to_cdb();
    assert!(rig.cmd(cdb.as_bytes(), 0).good());

    let s = rig.stats();
    assert_eq!(s.unmap_limit_rejected, 2);
    assert_eq!(s.max_unmap_descriptors, 3);
    assert_eq!(s.max_unmap_descriptor_blocks, 60);
    assert_eq!(s.max_unmap_command_blocks, 65);
    assert_eq!(s.blocks_unmapped, 6);
    assert_eq!(s.opcode_count(opcode::UNMAP), 8);
    // Only parsed lists are in the histogram: 2, 3, 2, 1 and 0 descriptors.
    assert_eq!(
        s.unmap_descriptor_histogram,
        BTreeMap::from([(0, 1), (1, 1), (2, 2), (3, 1)])
    );
}

/// An unmap of 10 TiB on 512-byte blocks, split the way an initiator must split it (the
/// codec's `UnmapListWriter::fill` within the unit's VPD B0h limits), is accepted whole, and the
/// counters show how it was split.
#[test]
fn ten_tib_unmap_split_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10u64 << 40;
    let rig = Rig::one(LunConfig {
        backend: Backing::File {
            path: dir.path().join("10t.img"),
            size_bytes: Some(size),
        },
        limits: BlockLimitsConfig {
            max_unmap_descriptor_count: 2,
            ..Default::default()
        },
        ..Default::default()
    });
    let bl = BlockLimits::parse(&rig.cmd(&inquiry(Some(page::BLOCK_LIMITS)), 255).data).unwrap();
    let limits = UnmapLimits::from_block_limits(&bl).unwrap();
    let total = size / 512;
    let (mut lba, mut commands) = (0u64, 0u64);
    while lba < total {
        let mut buf = vec![0u8; 65535];
        let mut w = UnmapListWriter::new(&mut buf).unwrap();
        lba += w.fill(lba, total - lba, &limits).unwrap();
        let len = w.finish();
        let cdb = UnmapCdb {
            anchor: false,
            param_len: len,
        }
        .to_cdb();
        let a = rig.run(0, 0, cdb.as_bytes(), &buf[..usize::from(len)], 0);
        assert!(a.good(), "{a:?}");
        commands += 1;
    }
    let s = rig.stats();
    // 2^35 * 10 / 2^4... = 21474836480 blocks: 6 descriptors of at most 2^32-1, 2 per command.
    assert_eq!(total, 21_474_836_480);
    assert_eq!(commands, 3);
    assert_eq!(s.opcode_count(opcode::UNMAP), 3);
    assert_eq!(s.unmap_descriptor_histogram, BTreeMap::from([(2, 3)]));
    assert_eq!(s.max_unmap_descriptor_blocks, u64::from(u32::MAX));
    assert_eq!(s.blocks_unmapped, total);
    assert_eq!(s.unmap_limit_rejected, 0);
}

#[test]
fn write_same() {
    let rig = Rig::one(LunConfig {
        limits: BlockLimitsConfig {
            max_write_same_length: 64,
            ..Default::default()
        },
        ..ram(1 << 20)
    });
    let data = rig.fill(32 * 512, 4);
    assert!(rig.write(0, &data).good());
    // A pattern block over 8 blocks.
    let block = rig.fill(512, 0x5a);
    let ws = |lba, blocks, unmap, ndob| {
        WriteSame16Cdb {
            lba,
            blocks,
            unmap,
            ndob,
            ..Default::default()
        }
        .to_cdb()
    };
    let a = rig.run(0, 0, ws(4, 8, false, false).as_bytes(), &block, 0);
    assert!(a.good(), "{a:?}");
    let back = rig.read(0, 32 * 512).data;
    for b in 4..12 {
        assert_eq!(&back[b * 512..(b + 1) * 512], &block[..]);
    }
    assert_eq!(&back[12 * 512..], &data[12 * 512..]);
    // Zeros without a data-out buffer, with unmap.
    assert!(rig.cmd(ws(16, 8, true, true).as_bytes(), 0).good());
    let back = rig.read(16, 8 * 512).data;
    assert!(back.iter().all(|&b| b == 0));
    // Zero blocks (WSNZ), beyond the maximum write same length, anchor.
    assert!(rig
        .cmd(ws(0, 0, false, true).as_bytes(), 0)
        .is_check(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
    assert!(rig
        .cmd(ws(0, 65, false, true).as_bytes(), 0)
        .is_check(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
    let anchor = WriteSame16Cdb {
        anchor: true,
        blocks: 1,
        ndob: true,
        ..Default::default()
    }
    .to_cdb();
    assert!(rig
        .cmd(anchor.as_bytes(), 0)
        .is_check(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
    // Without NDOB the block of data-out is required.
    assert_eq!(
        rig.cmd(ws(0, 1, false, false).as_bytes(), 0).response,
        Response::Overrun
    );
    let s = rig.stats();
    assert_eq!(s.write_same_limit_rejected, 1);
    assert_eq!(s.blocks_written_same, 16);
    assert_eq!(s.blocks_unmapped, 8);
}

#[test]
fn read_only_units_refuse_writes() {
    let rig = Rig::one(LunConfig {
        read_only: true,
        ..ram(1 << 20)
    });
    let a = rig.write(0, &[1; 512]);
    assert!(a.is_check(SenseKey::DataProtect, Asc::WRITE_PROTECTED));
    assert!(rig
        .unmap(&[(0, 1)])
        .is_check(SenseKey::DataProtect, Asc::WRITE_PROTECTED));
    assert!(rig.read(0, 512).good());
    let ms = ModeSense6Cdb {
        page: 0x3f,
        alloc_len: 255,
        ..Default::default()
    }
    .to_cdb();
    let mp = ModeParameters::parse6(&rig.cmd(ms.as_bytes(), 255).data).unwrap();
    assert!(mp.write_protect);
    assert_eq!(rig.stats().read_only_rejected, 2);
}

#[test]
fn mode_sense() {
    let rig = Rig::one(ram(1 << 20));
    let ms6 = |page, pc, dbd| {
        ModeSense6Cdb {
            dbd,
            pc,
            page,
            subpage: 0,
            alloc_len: 255,
        }
        .to_cdb()
    };
    let a = rig.cmd(ms6(0x08, PageControl::Current, false).as_bytes(), 255);
    let mp = ModeParameters::parse6(&a.data).unwrap();
    assert!(!mp.write_protect && mp.dpofua);
    assert_eq!(mp.block_descriptors.len(), 1);
    assert_eq!(mp.block_descriptors[0].blocks, 2048);
    assert_eq!(mp.block_descriptors[0].block_len, 512);
    assert!(mp.caching().unwrap().wce);
    let a = rig.cmd(ms6(0x3f, PageControl::Current, true).as_bytes(), 255);
    let mp = ModeParameters::parse6(&a.data).unwrap();
    assert!(mp.block_descriptors.is_empty());
    assert_eq!(mp.pages.len(), 2);
    let control = mp.page(0x0a, None).unwrap();
    assert_eq!(control.data[0] & 0x04, 0, "fixed sense: D_SENSE clear");
    // Changeable values: nothing changes.
    let a = rig.cmd(ms6(0x08, PageControl::Changeable, true).as_bytes(), 255);
    assert!(
        !ModeParameters::parse6(&a.data)
            .unwrap()
            .caching()
            .unwrap()
            .wce
    );
    // Saved values are not supported, nor unknown pages or subpages.
    assert!(rig
        .cmd(ms6(0x08, PageControl::Saved, false).as_bytes(), 255)
        .is_check(
            SenseKey::IllegalRequest,
            Asc::SAVING_PARAMETERS_NOT_SUPPORTED
        ));
    assert!(rig
        .cmd(ms6(0x19, PageControl::Current, false).as_bytes(), 255)
        .is_check(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
    // MODE SENSE(10) with long LBA descriptors.
    let ms10 = ModeSense10Cdb {
        llbaa: true,
        dbd: false,
        pc: PageControl::Current,
        page: 0x08,
        subpage: 0,
        alloc_len: 512,
    }
    .to_cdb();
    let mp = ModeParameters::parse10(&rig.cmd(ms10.as_bytes(), 512).data).unwrap();
    assert!(mp.long_lba);
    assert_eq!(mp.block_descriptors[0].blocks, 2048);
    // Short allocation length: just the header.
    let short = ModeSense6Cdb {
        page: 0x3f,
        alloc_len: 4,
        ..Default::default()
    }
    .to_cdb();
    assert_eq!(rig.cmd(short.as_bytes(), 4).data.len(), 4);
}

#[test]
fn descriptor_sense_format() {
    let rig = Rig::new(ScsiTargetConfig {
        sense_format: SenseFormat::Descriptor,
        luns: BTreeMap::from([((0, 0), ram(1 << 20))]),
        ..Default::default()
    });
    let a = rig.read(4096, 512);
    assert_eq!(a.sense[0], 0x72);
    assert!(a
        .sense()
        .is(SenseKey::IllegalRequest, Asc::LBA_OUT_OF_RANGE));
    let ms = ModeSense6Cdb {
        page: 0x0a,
        dbd: true,
        alloc_len: 255,
        ..Default::default()
    }
    .to_cdb();
    let mp = ModeParameters::parse6(&rig.cmd(ms.as_bytes(), 255).data).unwrap();
    assert_eq!(mp.page(0x0a, None).unwrap().data[0] & 0x04, 0x04);
    // REQUEST SENSE follows its DESC bit.
    let rs = RequestSenseCdb {
        desc: false,
        alloc_len: 252,
    }
    .to_cdb();
    assert_eq!(rig.cmd(rs.as_bytes(), 252).data[0], 0x70);
}

#[test]
fn power_on_unit_attention_and_request_sense() {
    let rig = Rig::new(ScsiTargetConfig {
        power_on_unit_attention: true,
        luns: BTreeMap::from([((0, 0), ram(1 << 20)), ((0, 1), ram(1 << 20))]),
        ..Default::default()
    });
    // INQUIRY and REPORT LUNS neither report nor clear it.
    assert!(rig.cmd(&inquiry(None), 255).good());
    assert!(rig.cmd(&report_luns(), 4096).good());
    let a = rig.cmd(&tur(), 0);
    assert!(a.is_check(SenseKey::UnitAttention, Asc::POWER_ON_RESET));
    assert!(rig.cmd(&tur(), 0).good());
    // LUN 1: REQUEST SENSE returns the unit attention as data and clears it.
    let rs = RequestSenseCdb {
        desc: false,
        alloc_len: 252,
    }
    .to_cdb();
    let a = rig.run(0, 1, rs.as_bytes(), &[], 252);
    assert!(a.good());
    let s = Sense::parse(&a.data).unwrap();
    assert!(s.is(SenseKey::UnitAttention, Asc::POWER_ON_RESET));
    let a = rig.run(0, 1, rs.as_bytes(), &[], 252);
    assert!(Sense::parse(&a.data)
        .unwrap()
        .is(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE));
    assert!(rig.run(0, 1, &tur(), &[], 0).good());
    // A new connection arms it again.
    rig.dev.reset_for_connection();
    assert!(rig
        .read(0, 512)
        .is_check(SenseKey::UnitAttention, Asc::POWER_ON_RESET));
    assert_eq!(rig.stats().unit_attentions, 3);
    // Raised on demand; a power on supersedes what is queued.
    rig.dev
        .raise_unit_attention(0, 0, Asc::CAPACITY_DATA_CHANGED)
        .unwrap();
    rig.dev
        .raise_unit_attention(0, 0, Asc::MODE_PARAMETERS_CHANGED)
        .unwrap();
    assert!(rig
        .cmd(&tur(), 0)
        .is_check(SenseKey::UnitAttention, Asc::CAPACITY_DATA_CHANGED));
    assert!(rig
        .cmd(&tur(), 0)
        .is_check(SenseKey::UnitAttention, Asc::MODE_PARAMETERS_CHANGED));
    assert!(rig.cmd(&tur(), 0).good());
    assert!(matches!(
        rig.dev.raise_unit_attention(0, 9, Asc::POWER_ON_RESET),
        Err(LunError::NotFound { target: 0, lun: 9 })
    ));
}

#[test]
fn not_ready_for_the_first_turs() {
    let rig = Rig::one(LunConfig {
        not_ready_tur_count: 2,
        ..ram(1 << 20)
    });
    for _ in 0..2 {
        // Media access is not ready either meanwhile; INQUIRY works.
        assert!(rig
            .read(0, 512)
            .is_check(SenseKey::NotReady, Asc::NOT_READY_BECOMING_READY));
        assert!(rig.cmd(&inquiry(None), 255).good());
        assert!(rig
            .cmd(&tur(), 0)
            .is_check(SenseKey::NotReady, Asc::NOT_READY_BECOMING_READY));
    }
    assert!(rig.cmd(&tur(), 0).good());
    assert!(rig.read(0, 512).good());
    assert_eq!(rig.stats().not_ready, 4);
    rig.dev.set_not_ready(0, 0, 1).unwrap();
    assert!(rig.cmd(&tur(), 0).sense().is_not_ready());
    assert!(rig.cmd(&tur(), 0).good());

    let rig = Rig::one(LunConfig {
        start_required: true,
        ..ram(1 << 20)
    });
    assert!(rig.cmd(&tur(), 0).sense().needs_start_unit());
    assert!(rig
        .cmd(StartStopUnitCdb::start().to_cdb().as_bytes(), 0)
        .good());
    assert!(rig.cmd(&tur(), 0).good());
}

#[test]
fn targets_and_missing_units() {
    let rig = Rig::new(ScsiTargetConfig::grid(4, 4, |_, _| ram(1 << 20)));
    let rl = ReportLuns::parse(&rig.run(2, 0, &report_luns(), &[], 4096).data).unwrap();
    assert_eq!(
        rl.luns
            .iter()
            .map(|l| l.number().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    // A LUN the target does not have: INQUIRY says so, other commands fail with 25/00.
    let a = rig.run(1, 9, &inquiry(None), &[], 255);
    assert!(a.good());
    assert_eq!(a.data[0], 0x7f);
    let a = rig.run(1, 9, &inquiry(Some(0)), &[], 255);
    assert_eq!(SupportedPages::parse(&a.data).unwrap().pages, vec![0]);
    assert!(rig
        .run(1, 9, &tur(), &[], 0)
        .is_check(SenseKey::IllegalRequest, Asc::LOGICAL_UNIT_NOT_SUPPORTED));
    assert!(rig
        .run(1, 9, &inquiry(Some(0x80)), &[], 255)
        .is_check(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB));
    let rs = RequestSenseCdb {
        desc: false,
        alloc_len: 18,
    }
    .to_cdb();
    let a = rig.run(1, 9, rs.as_bytes(), &[], 18);
    assert!(a.good());
    assert!(Sense::parse(&a.data)
        .unwrap()
        .is(SenseKey::IllegalRequest, Asc::LOGICAL_UNIT_NOT_SUPPORTED));
    // REPORT LUNS through a missing LUN and through the well-known LUN.
    let rl = ReportLuns::parse(&rig.run(3, 200, &report_luns(), &[], 4096).data).unwrap();
    assert_eq!(rl.luns.len(), 4);
    let wlun = [1, 3, 0xc1, 0x01, 0, 0, 0, 0];
    let rl = ReportLuns::parse(&rig.run_lun(wlun, &report_luns(), &[], 4096).data).unwrap();
    assert_eq!(rl.luns.len(), 4);
    assert_eq!(rig.run_lun(wlun, &inquiry(None), &[], 255).data[0], 0x1e);
    // A target that does not exist, and a LUN field that names no target.
    let a = rig.run(4, 0, &inquiry(None), &[], 255);
    assert_eq!(a.response, Response::BadTarget);
    assert_eq!((a.resid, a.used_len), (255, 108));
    assert_eq!(
        rig.run_lun([0, 0, 0x40, 0, 0, 0, 0, 0], &tur(), &[], 0)
            .response,
        Response::BadTarget
    );
    // Peripheral device addressing reaches the same unit as flat space addressing.
    assert!(rig.run_lun([1, 2, 0, 3, 0, 0, 0, 0], &tur(), &[], 0).good());
    let s = rig.stats();
    assert_eq!(s.response_count(Response::BadTarget), 2);
    assert_eq!(s.no_unit, 6);
}

#[test]
fn framing_errors_never_panic() {
    let rig = Rig::one(ram(1 << 20));
    let c = |descs: Vec<(u64, u32, bool)>| rig.dev.execute_request(&rig.mem, descs);
    rig.mem.write_slice(&[0u8; 51], GuestAddress(REQ)).unwrap();
    // No response room at all.
    assert_eq!(c(vec![(REQ, 51, false)]), 0);
    assert_eq!(c(vec![(REQ, 51, false), (RESP, 11, true)]), 0);
    assert_eq!(c(vec![]), 0);
    // Readable after writable.
    assert_eq!(c(vec![(RESP, 108, true), (REQ, 51, false)]), 0);
    // Short request, short response (but room for the header): FAILURE.
    assert_eq!(c(vec![(REQ, 50, false), (RESP, 108, true)]), 108);
    assert_eq!(rig.answer(108, 0).response, Response::Failure);
    assert_eq!(c(vec![(REQ, 51, false), (RESP, 100, true)]), 100);
    // Data in both directions (INOUT not offered).
    assert_eq!(
        c(vec![
            (REQ, 51, false),
            (OUT, 512, false),
            (RESP, 108, true),
            (IN, 512, true)
        ]),
        108
    );
    assert_eq!(rig.answer(108, 0).response, Response::Failure);
    // Request or data outside guest memory.
    assert_eq!(c(vec![(1 << 40, 51, false), (RESP, 108, true)]), 108);
    assert_eq!(rig.answer(108, 0).response, Response::Failure);
    let read = ReadWrite10Cdb::new(0, 1, RwFlags::default())
        .unwrap()
        .read_cdb();
    let mut req = vec![0u8; 51];
    req[..8].copy_from_slice(&encode_lun(0, 0));
    req[19..29].copy_from_slice(read.as_bytes());
    rig.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    assert_eq!(
        c(vec![
            (REQ, 51, false),
            (RESP, 108, true),
            (1 << 40, 512, true)
        ]),
        108
    );
    assert_eq!(rig.answer(108, 0).response, Response::Failure);
    // Response outside guest memory: nothing to report.
    assert_eq!(c(vec![(REQ, 51, false), (1 << 40, 108, true)]), 0);
    // Response and data-in in one descriptor, header and CDB split over two.
    let data = rig.fill(512, 8);
    assert!(rig.write(3, &data).good());
    let read = ReadWrite10Cdb::new(3, 1, RwFlags::default())
        .unwrap()
        .read_cdb();
    req[19..29].copy_from_slice(read.as_bytes());
    rig.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    assert_eq!(
        c(vec![
            (REQ, 10, false),
            (REQ + 10, 41, false),
            (RESP, 108 + 512, true)
        ]),
        620
    );
    let mut back = vec![0u8; 512];
    rig.mem
        .read_slice(&mut back, GuestAddress(RESP + 108))
        .unwrap();
    assert_eq!(back, data);
    assert!(rig.stats().malformed >= 8);
}

#[test]
fn seg_max_and_max_sectors() {
    let rig = Rig::new(ScsiTargetConfig {
        seg_max: 2,
        max_sectors: 4,
        luns: BTreeMap::from([((0, 0), ram(1 << 20))]),
        ..Default::default()
    });
    let read = ReadWrite10Cdb::new(0, 6, RwFlags::default())
        .unwrap()
        .read_cdb();
    let mut req = vec![0u8; 51];
    req[..8].copy_from_slice(&encode_lun(0, 0));
    req[19..29].copy_from_slice(read.as_bytes());
    rig.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    let segs = |n: u64| {
        let mut d = vec![(REQ, 51u32, false), (RESP, 108, true)];
        d.extend((0..n).map(|i| (IN + i * 0x1000, 3072 / n as u32, true)));
        d
    };
    rig.dev.execute_request(&rig.mem, segs(3));
    assert_eq!(rig.answer(108, 0).response, Response::Failure);
    rig.dev.execute_request(&rig.mem, segs(2));
    assert!(rig.answer(108, 0).good());
    let s = rig.stats();
    assert_eq!(s.seg_max_rejected, 1);
    assert_eq!(s.max_data_segments, 3);
    // The refused command never got that far.
    assert_eq!(s.max_sectors_exceeded, 1);
}

#[test]
fn smaller_sense_size_moves_the_data_in() {
    let rig = Rig::one(ram(1 << 20));
    rig.dev.set_config(20, &20u32.to_le_bytes()).unwrap();
    assert_eq!(&rig.dev.config_space()[20..24], &20u32.to_le_bytes());
    let mut req = vec![0u8; 51];
    req[..8].copy_from_slice(&encode_lun(0, 0));
    req[19..25].copy_from_slice(&[0x12, 0, 0, 0, 36, 0]);
    rig.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    let used = rig
        .dev
        .execute_request(&rig.mem, [(REQ, 51, false), (RESP, 32 + 36, true)]);
    assert_eq!(used, 68);
    let mut inq = [0u8; 36];
    rig.mem
        .read_slice(&mut inq, GuestAddress(RESP + 32))
        .unwrap();
    assert_eq!(&inq[8..13], b"VIREO");
    // A bad LBA: 18 bytes of fixed sense cut to 20? No: 18 fit in 20.
    let read = ReadWrite10Cdb::new(1 << 20, 1, RwFlags::default())
        .unwrap()
        .read_cdb();
    req[19..29].copy_from_slice(read.as_bytes());
    rig.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    rig.dev
        .execute_request(&rig.mem, [(REQ, 51, false), (RESP, 32 + 512, true)]);
    let mut h = [0u8; 12];
    rig.mem.read_slice(&mut h, GuestAddress(RESP)).unwrap();
    let h = CmdRespHeader::parse(&h).unwrap();
    assert_eq!((h.status, h.sense_len, h.resid), (2, 18, 512));
    // CDB size 16: the request is 35 bytes.
    rig.dev.set_config(24, &16u32.to_le_bytes()).unwrap();
    let used = rig
        .dev
        .execute_request(&rig.mem, [(REQ, 35, false), (RESP, 32, true)]);
    assert_eq!(used, 32);
    rig.dev.reset_for_connection();
    assert_eq!(&rig.dev.config_space()[20..28], &[96, 0, 0, 0, 32, 0, 0, 0]);
}

#[test]
fn injected_failures() {
    let rig = Rig::one(ram(1 << 20));
    rig.faults.fail_next(1);
    let a = rig.read(0, 512);
    assert!(a.is_check(SenseKey::MediumError, Asc::UNRECOVERED_READ_ERROR));
    assert_eq!(a.resid, 512);
    rig.scsi_faults.set_failure(ScsiFailure::BUSY);
    rig.faults.fail_next(1);
    let a = rig.read(0, 512);
    assert_eq!((a.response, a.status), (Response::Ok, 0x08));
    rig.scsi_faults
        .set_failure(ScsiFailure::Response(Response::TransportFailure));
    rig.faults.fail_next(1);
    assert_eq!(rig.read(0, 512).response, Response::TransportFailure);
    // Media access only: INQUIRY and TUR go through, the READ fails.
    rig.scsi_faults.set_fail_media_access_only(true);
    rig.scsi_faults.set_failure(ScsiFailure::MEDIUM_ERROR);
    rig.faults.fail_next(1);
    assert!(rig.cmd(&inquiry(None), 255).good());
    assert!(rig.cmd(&tur(), 0).good());
    assert!(rig.read(0, 512).sense().is_medium_error());
    assert!(rig.read(0, 512).good());
    let s = rig.stats();
    assert_eq!(s.injected_errors, 4);
    assert_eq!(s.status_count(Status::Busy), 1);
    assert_eq!(s.response_count(Response::TransportFailure), 1);
}

/// Runs a control queue request; `None` when it is left unanswered.
fn control(rig: &Rig, req: ControlRequest) -> Option<Vec<u8>> {
    let bytes = req.to_bytes();
    rig.mem.write_slice(&bytes, GuestAddress(REQ)).unwrap();
    let n = req.response_size().max(1) as u32;
    rig.mem.write_slice(&[0xee; 8], GuestAddress(RESP)).unwrap();
    let used = rig.dev.execute_control(
        &rig.mem,
        [(REQ, bytes.len() as u32, false), (RESP, n, true)],
    )?;
    let mut out = vec![0u8; used as usize];
    rig.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
    Some(out)
}

#[test]
fn task_management() {
    let rig = Rig::new(ScsiTargetConfig::grid(2, 2, |_, _| ram(1 << 20)));
    let tmf = |function, t, l| ControlRequest::Tmf {
        function,
        lun: encode_lun(t, l),
        tag: 1,
    };
    let ok = vec![Response::FUNCTION_COMPLETE.to_u8()];
    assert_eq!(
        control(&rig, tmf(TmfFunction::LogicalUnitReset, 0, 1)),
        Some(ok.clone())
    );
    // The reset leaves a unit attention on that unit only.
    assert!(rig
        .run(0, 1, &tur(), &[], 0)
        .is_check(SenseKey::UnitAttention, UA_LUN_RESET));
    assert!(rig.run(0, 0, &tur(), &[], 0).good());
    assert_eq!(
        control(&rig, tmf(TmfFunction::AbortTask, 0, 0)),
        Some(ok.clone())
    );
    assert_eq!(
        control(&rig, tmf(TmfFunction::QueryTask, 0, 0)),
        Some(ok.clone())
    );
    assert_eq!(
        control(&rig, tmf(TmfFunction::ItNexusReset, 1, 0)),
        Some(ok)
    );
    assert!(rig
        .run(1, 1, &tur(), &[], 0)
        .is_check(SenseKey::UnitAttention, UA_NEXUS_LOSS));
    assert_eq!(
        control(&rig, tmf(TmfFunction::LogicalUnitReset, 0, 5)),
        Some(vec![Response::IncorrectLun.to_u8()])
    );
    assert_eq!(
        control(&rig, tmf(TmfFunction::LogicalUnitReset, 7, 0)),
        Some(vec![Response::BadTarget.to_u8()])
    );
    assert_eq!(
        control(&rig, tmf(TmfFunction::ClearAca, 0, 0)),
        Some(vec![Response::FunctionRejected.to_u8()])
    );
    assert_eq!(
        control(&rig, tmf(TmfFunction::Unknown(99), 0, 0)),
        Some(vec![Response::FunctionRejected.to_u8()])
    );
    // Never answered when asked so; AN requests still are.
    rig.scsi_faults.set_tmf_never_answer(true);
    assert_eq!(
        control(&rig, tmf(TmfFunction::LogicalUnitReset, 0, 0)),
        None
    );
    let an = ControlRequest::AsyncNotification {
        subscribe: false,
        lun: encode_lun(0, 0),
        event_requested: 0xffff,
    };
    assert_eq!(control(&rig, an), Some(vec![0; 5]));
    // Malformed control requests are completed with nothing written.
    assert_eq!(control(&rig, ControlRequest::Unknown(42)), Some(vec![]));
    rig.mem
        .write_slice(&0u32.to_le_bytes(), GuestAddress(REQ))
        .unwrap();
    assert_eq!(
        rig.dev
            .execute_control(&rig.mem, [(REQ, 8, false), (RESP, 1, true)]),
        Some(0)
    );
    let s = rig.stats();
    assert_eq!((s.tmf_lun_reset, s.tmf_unanswered), (4, 1));
    assert_eq!(
        (s.tmf_abort_task, s.tmf_it_nexus_reset, s.tmf_other),
        (1, 1, 3)
    );
    assert_eq!(s.an_requests, 1);
}

#[test]
fn hotplug_and_resize_queue_events() {
    let rig = Rig::new(ScsiTargetConfig {
        max_target: Some(3),
        luns: BTreeMap::from([((0, 0), ram(1 << 20)), ((0, 1), ram(1 << 20))]),
        ..Default::default()
    });
    // Not connected: nothing queued.
    rig.dev.add_lun(1, 0, ram(1 << 20)).unwrap();
    assert!(rig.dev.events().pending.is_empty());
    rig.dev.set_connected(true);
    rig.dev
        .set_acked_features(1 << VIRTIO_SCSI_F_HOTPLUG | 1 << VIRTIO_SCSI_F_CHANGE);
    rig.dev.add_lun(0, 5, ram(1 << 20)).unwrap();
    assert!(matches!(
        rig.dev.add_lun(0, 5, ram(1 << 20)),
        Err(LunError::Exists { target: 0, lun: 5 })
    ));
    assert!(matches!(
        rig.dev.add_lun(4, 0, ram(1 << 20)),
        Err(LunError::OutOfRange { .. })
    ));
    assert!(matches!(
        rig.dev.add_lun(
            0,
            6,
            LunConfig {
                block_size: 1000,
                ..Default::default()
            }
        ),
        Err(LunError::Create(_))
    ));
    // REPORT LUNS shows it; the other units report REPORTED LUNS DATA HAS CHANGED.
    let rl = ReportLuns::parse(&rig.run(0, 0, &report_luns(), &[], 4096).data).unwrap();
    assert_eq!(rl.luns.len(), 3);
    assert!(rig
        .run(0, 1, &tur(), &[], 0)
        .is_check(SenseKey::UnitAttention, Asc::REPORTED_LUNS_DATA_CHANGED));
    // REPORT LUNS cleared it on LUN 0.
    assert!(rig.run(0, 0, &tur(), &[], 0).good());
    assert!(rig.run(0, 5, &tur(), &[], 0).good());
    rig.dev.remove_lun(0, 5).unwrap();
    assert!(matches!(
        rig.dev.remove_lun(0, 5),
        Err(LunError::NotFound { .. })
    ));
    assert!(rig
        .run(0, 5, &tur(), &[], 0)
        .is_check(SenseKey::IllegalRequest, Asc::LOGICAL_UNIT_NOT_SUPPORTED));
    // Removing the last unit of target 1 removes the target.
    rig.dev.remove_lun(1, 0).unwrap();
    assert_eq!(rig.run(1, 0, &tur(), &[], 0).response, Response::BadTarget);
    // Resize: capacity, unit attention (queued behind the one of the removal), parameter
    // change event.
    rig.dev.resize_lun(0, 0, 2 << 20).unwrap();
    assert!(rig
        .cmd(&tur(), 0)
        .is_check(SenseKey::UnitAttention, Asc::REPORTED_LUNS_DATA_CHANGED));
    assert!(rig
        .cmd(&tur(), 0)
        .is_check(SenseKey::UnitAttention, Asc::CAPACITY_DATA_CHANGED));
    let rc = ReadCapacity10::parse(&rig.cmd(read_capacity_10_cdb().as_bytes(), 8).data).unwrap();
    assert_eq!(rc.block_count(), 4096);
    assert!(matches!(
        rig.dev.resize_lun(0, 0, 1000),
        Err(LunError::Resize(_))
    ));
    let events: Vec<Event> = rig.dev.events().pending.iter().copied().collect();
    assert_eq!(
        events,
        vec![
            Event::transport_reset(0, 5, ResetReason::Rescan),
            Event::transport_reset(0, 5, ResetReason::Removed),
            Event::transport_reset(1, 0, ResetReason::Removed),
            Event::param_change(0, 0, 0x2a, 0x09),
        ]
    );
    assert_eq!(events[3].to_bytes().len(), EVENT_SIZE);
    // Without HOTPLUG negotiated no transport reset events are queued.
    rig.dev.events().pending.clear();
    rig.dev.set_acked_features(0);
    rig.dev.add_lun(2, 2, ram(1 << 20)).unwrap();
    rig.dev.resize_lun(2, 2, 4 << 20).unwrap();
    assert!(rig.dev.events().pending.is_empty());
    assert_eq!(rig.dev.luns(), vec![(0, 0), (0, 1), (2, 2)]);
}

#[test]
fn resize_keeps_ram_data() {
    let rig = Rig::one(ram(1 << 20));
    let data = rig.fill(4096, 6);
    assert!(rig.write(100, &data).good());
    rig.dev.resize_lun(0, 0, 4 << 20).unwrap();
    let _ = rig.cmd(&tur(), 0); // the capacity unit attention
    assert_eq!(rig.read(100, 4096).data, data);
    assert!(rig.read(8000, 512).good());
    rig.dev.resize_lun(0, 0, 64 << 10).unwrap();
    let _ = rig.cmd(&tur(), 0);
    assert_eq!(rig.read(100, 512).data, data[..512]);
    assert!(rig
        .read(128, 512)
        .is_check(SenseKey::IllegalRequest, Asc::LBA_OUT_OF_RANGE));
    assert_eq!(rig.dev.capacity_blocks(0, 0), Some(128));
}
