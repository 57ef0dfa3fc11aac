//! End-to-end tests of the vhost-user-scsi target over its socket: the handshake and config
//! space through rust-vmm's vhost-user front-end, and commands, task management functions and
//! events through rings placed by hand in shared memory (queue 0 control, 1 event, 2.. request).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{handshake, le32, read_config, within, Chain, Harness, DATA_BASE, SLOT_BASE};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vireo_scsi::block::RwFlags;
use vireo_scsi::cdb::opcode;
use vireo_scsi::{
    Asc, InquiryCdb, ReadCapacity16, ReadCapacity16Cdb, ReadWrite10Cdb, ReportLuns, ReportLunsCdb,
    Sense, SenseKey, StandardInquiry, Status,
};
use vireo_target::scsi_request::{
    encode_lun, CmdReqHeader, CmdRespHeader, ControlRequest, Event, ResetReason, TmfFunction,
};
use vireo_target::{
    spawn_scsi_target, Backing, LunConfig, ScsiFailure, ScsiResponse, ScsiTargetConfig,
    ScsiTargetHandle, TargetError,
};
use vm_memory::{Bytes, GuestAddress};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const VIRTIO_SCSI_F_INOUT: u64 = 1 << 0;
const VIRTIO_SCSI_F_HOTPLUG: u64 = 1 << 1;
const VIRTIO_SCSI_F_CHANGE: u64 = 1 << 2;
const VIRTIO_SCSI_F_T10_PI: u64 = 1 << 3;

const CONTROLQ: usize = 0;
const EVENTQ: usize = 1;
const REQUESTQ: usize = 2;

/// Bytes of one scratch slot: request at +0 (51 bytes), response at +64 (108 bytes).
const SLOT_SIZE: u64 = 256;
const REQ_LEN: u32 = 51;
const RESP_LEN: u32 = 108;

fn socket(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("scsi.sock")
}

fn ram(size_bytes: u64) -> LunConfig {
    LunConfig {
        backend: Backing::Ram { size_bytes },
        ..Default::default()
    }
}

fn single(lun: LunConfig) -> ScsiTargetConfig {
    ScsiTargetConfig {
        luns: BTreeMap::from([((0, 0), lun)]),
        ..Default::default()
    }
}

/// The response of a command slot.
#[derive(Debug)]
struct Resp {
    header: CmdRespHeader,
    sense: Vec<u8>,
}

impl Resp {
    fn good(&self) -> bool {
        self.header.response == 0 && self.header.status == 0
    }

    fn sense(&self) -> Sense {
        assert_eq!(
            self.header.status,
            Status::CheckCondition.to_u8(),
            "{self:?}"
        );
        Sense::parse(&self.sense).unwrap()
    }
}

/// virtio-scsi commands and control requests in the harness's scratch slots.
trait ScsiRequests {
    fn slot(n: u64) -> u64 {
        SLOT_BASE + n * SLOT_SIZE
    }
    fn command(
        &self,
        n: u64,
        target: u8,
        lun: u16,
        cdb: &[u8],
        data: Option<(u64, u32, bool)>,
    ) -> Chain;
    fn resp(&self, n: u64) -> Resp;
    fn control(&self, n: u64, req: ControlRequest) -> Chain;
    fn control_resp(&self, n: u64) -> Vec<u8>;
}

impl ScsiRequests for Harness {
    /// A command in slot `n`: request, data-out (if `data` is device-readable), response,
    /// data-in (if device-writable).
    fn command(
        &self,
        n: u64,
        target: u8,
        lun: u16,
        cdb: &[u8],
        data: Option<(u64, u32, bool)>,
    ) -> Chain {
        let at = Self::slot(n);
        let mut req = vec![0u8; REQ_LEN as usize];
        req[..19].copy_from_slice(
            &CmdReqHeader {
                lun: encode_lun(target, lun),
                tag: n,
                task_attr: 0,
                prio: 0,
                crn: 0,
            }
            .to_bytes(),
        );
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        self.mem.write_slice(&req, GuestAddress(at)).unwrap();
        self.mem
            .write_slice(&[0xee; RESP_LEN as usize], GuestAddress(at + 64))
            .unwrap();
        let mut chain = vec![(at, REQ_LEN, false)];
        if let Some(d @ (_, _, false)) = data {
            chain.push(d);
        }
        chain.push((at + 64, RESP_LEN, true));
        if let Some(d @ (_, _, true)) = data {
            chain.push(d);
        }
        chain
    }

    fn resp(&self, n: u64) -> Resp {
        let mut b = [0u8; RESP_LEN as usize];
        self.mem
            .read_slice(&mut b, GuestAddress(Self::slot(n) + 64))
            .unwrap();
        let header = CmdRespHeader::parse(&b).unwrap();
        Resp {
            header,
            sense: b[12..12 + header.sense_len.min(96) as usize].to_vec(),
        }
    }

    fn control(&self, n: u64, req: ControlRequest) -> Chain {
        let at = Self::slot(n);
        let bytes = req.to_bytes();
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        self.mem
            .write_slice(&[0xee; 8], GuestAddress(at + 64))
            .unwrap();
        vec![
            (at, bytes.len() as u32, false),
            (at + 64, req.response_size() as u32, true),
        ]
    }

    fn control_resp(&self, n: u64) -> Vec<u8> {
        self.read(Self::slot(n) + 64, 5)
    }
}

/// Connects a harness with the control, event and `requests` request queues.
fn connect(path: &Path, requests: usize) -> Harness {
    Harness::connect(path, 2 + requests)
}

/// Runs one command on request queue 2 and returns its used length and response.
fn run(
    h: &mut Harness,
    n: u64,
    target: u8,
    lun: u16,
    cdb: &[u8],
    data: Option<(u64, u32, bool)>,
) -> (u32, Resp) {
    let chain = h.command(n, target, lun, cdb, data);
    h.submit(REQUESTQ, &[chain]);
    let used = h.wait_used(REQUESTQ, 1);
    (used[0].1, h.resp(n))
}

fn inquiry_cdb(page: Option<u8>, alloc_len: u16) -> Vec<u8> {
    InquiryCdb { page, alloc_len }.to_cdb().as_bytes().to_vec()
}

#[test]
fn handshake_features_and_config_space() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = spawn_scsi_target(
        &path,
        ScsiTargetConfig {
            num_request_queues: 2,
            seg_max: 17,
            max_sectors: 2048,
            cmd_per_lun: 16,
            max_lun: 255,
            ..ScsiTargetConfig::grid(2, 3, |_, _| ram(1 << 20))
        },
    )
    .unwrap();
    assert_eq!(target.socket_path(), path);
    assert_eq!(target.luns().len(), 6);

    let mut fe = Frontend::connect(&path, 4).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        PROTOCOL_FEATURES,
        VIRTIO_SCSI_F_HOTPLUG,
        VIRTIO_SCSI_F_CHANGE,
    ] {
        assert_ne!(features & bit, 0, "feature {bit:#x} offered");
    }
    assert_eq!(features & (VIRTIO_SCSI_F_INOUT | VIRTIO_SCSI_F_T10_PI), 0);
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    for f in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    ] {
        assert!(proto.contains(f), "{f:?} offered");
    }
    fe.set_protocol_features(proto).unwrap();
    // Control, event and two request queues.
    assert_eq!(fe.get_queue_num().unwrap(), 4);
    assert!(fe.get_max_mem_slots().unwrap() > 8);

    let c = read_config(&mut fe, 0, 36);
    assert_eq!(le32(&c, 0), 2, "num_queues counts request queues");
    assert_eq!(le32(&c, 4), 17);
    assert_eq!(le32(&c, 8), 2048);
    assert_eq!(le32(&c, 12), 16);
    assert_eq!(le32(&c, 16), 16);
    assert_eq!(le32(&c, 20), 96);
    assert_eq!(le32(&c, 24), 32);
    assert_eq!(u16::from_le_bytes([c[28], c[29]]), 0);
    assert_eq!(u16::from_le_bytes([c[30], c[31]]), 1);
    assert_eq!(le32(&c, 32), 255);
    // The driver may write sense_size and cdb_size; other writes are ignored.
    fe.set_config(20, VhostUserConfigFlags::WRITABLE, &64u32.to_le_bytes())
        .unwrap();
    assert_eq!(read_config(&mut fe, 20, 4), 64u32.to_le_bytes());
    fe.set_config(0, VhostUserConfigFlags::WRITABLE, &1u32.to_le_bytes())
        .unwrap();
    fe.set_config(24, VhostUserConfigFlags::WRITABLE, &0u32.to_le_bytes())
        .unwrap();
    assert_eq!(read_config(&mut fe, 0, 4), 2u32.to_le_bytes());
    assert_eq!(read_config(&mut fe, 24, 4), 32u32.to_le_bytes());
    drop(fe);

    // A new front-end sees the defaults again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while target.stats().connections < 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fe = handshake(&path, 4);
    assert_eq!(read_config(&mut fe, 20, 4), 96u32.to_le_bytes());
    drop(fe);
    within(Duration::from_secs(5), "stop", move || target.stop());
    assert!(!path.exists(), "socket removed on stop");
}

#[test]
fn start_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let e = spawn_scsi_target(
        &socket(&dir),
        single(LunConfig {
            block_size: 1000,
            ..Default::default()
        }),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            TargetError::InvalidConfig {
                field: "lun.block_size",
                ..
            }
        ),
        "{e}"
    );
    let e = spawn_scsi_target(
        &socket(&dir),
        single(LunConfig {
            backend: Backing::File {
                path: dir.path().join("missing.img"),
                size_bytes: None,
            },
            ..Default::default()
        }),
    )
    .unwrap_err();
    assert!(matches!(e, TargetError::OpenBacking { .. }), "{e}");
    let taken = dir.path().join("precious.txt");
    std::fs::write(&taken, b"keep me").unwrap();
    let e = spawn_scsi_target(&taken, ScsiTargetConfig::default()).unwrap_err();
    assert!(matches!(e, TargetError::SocketPathTaken { .. }), "{e}");
}

#[test]
fn commands_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let image = dir.path().join("t1l2.img");
    let target = spawn_scsi_target(
        &path,
        ScsiTargetConfig::grid(2, 3, |t, l| {
            if (t, l) == (1, 2) {
                LunConfig {
                    backend: Backing::File {
                        path: image.clone(),
                        size_bytes: Some(4 << 20),
                    },
                    ..Default::default()
                }
            } else {
                ram(1 << 20)
            }
        }),
    )
    .unwrap();
    let mut h = connect(&path, 1);

    // INQUIRY on target 1 LUN 2.
    let (used, r) = run(
        &mut h,
        0,
        1,
        2,
        &inquiry_cdb(None, 96),
        Some((DATA_BASE, 96, true)),
    );
    assert!(r.good(), "{r:?}");
    assert_eq!(r.header.resid, 96 - 36);
    assert_eq!(used, RESP_LEN + 36);
    let inq = StandardInquiry::parse(&h.read(DATA_BASE, 36)).unwrap();
    assert!(inq.peripheral.is_disk());

    // READ CAPACITY(16).
    let (_, r) = run(
        &mut h,
        1,
        1,
        2,
        ReadCapacity16Cdb::default().to_cdb().as_bytes(),
        Some((DATA_BASE, 32, true)),
    );
    assert!(r.good());
    let rc = ReadCapacity16::parse(&h.read(DATA_BASE, 32)).unwrap();
    assert_eq!((rc.block_count(), rc.block_len), (8192, 512));

    // WRITE(10) of 8 blocks in two segments, then READ(10) them back in one batch with a
    // REPORT LUNS and a command to a missing target.
    let a = h.fill(DATA_BASE + 0x1_0000, 2048, 1);
    let b = h.fill(DATA_BASE + 0x2_0000, 2048, 2);
    let write = ReadWrite10Cdb::new(100, 8, RwFlags::default())
        .unwrap()
        .write_cdb();
    let mut chain = h.command(2, 1, 2, write.as_bytes(), None);
    chain.insert(1, (DATA_BASE + 0x1_0000, 2048, false));
    chain.insert(2, (DATA_BASE + 0x2_0000, 2048, false));
    h.submit(REQUESTQ, &[chain]);
    assert_eq!(h.wait_used(REQUESTQ, 1)[0].1, RESP_LEN);
    assert!(h.resp(2).good());
    let file = std::fs::read(&image).unwrap();
    assert_eq!(&file[100 * 512..100 * 512 + 2048], &a[..]);
    assert_eq!(&file[100 * 512 + 2048..108 * 512], &b[..]);

    let read = ReadWrite10Cdb::new(100, 8, RwFlags::default())
        .unwrap()
        .read_cdb();
    let rl = ReportLunsCdb {
        select_report: 0,
        alloc_len: 256,
    }
    .to_cdb();
    let chains = vec![
        h.command(
            3,
            1,
            2,
            read.as_bytes(),
            Some((DATA_BASE + 0x4_0000, 4096, true)),
        ),
        h.command(
            4,
            0,
            0,
            rl.as_bytes(),
            Some((DATA_BASE + 0x5_0000, 256, true)),
        ),
        h.command(5, 7, 0, &[0; 6], None),
    ];
    h.submit(REQUESTQ, &chains);
    let used = h.wait_used(REQUESTQ, 3);
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![RESP_LEN + 4096, RESP_LEN + 32, RESP_LEN]
    );
    assert!(h.resp(3).good());
    let back = h.read(DATA_BASE + 0x4_0000, 4096);
    assert_eq!(&back[..2048], &a[..]);
    assert_eq!(&back[2048..], &b[..]);
    let luns = ReportLuns::parse(&h.read(DATA_BASE + 0x5_0000, 256)).unwrap();
    assert_eq!(luns.luns.len(), 3);
    assert_eq!(h.resp(5).header.response, ScsiResponse::BadTarget.to_u8());

    // LBA out of range: CHECK CONDITION with sense in the response.
    let bad = ReadWrite10Cdb::new(1 << 20, 1, RwFlags::default())
        .unwrap()
        .read_cdb();
    let (_, r) = run(
        &mut h,
        6,
        0,
        1,
        bad.as_bytes(),
        Some((DATA_BASE, 512, true)),
    );
    assert!(r
        .sense()
        .is(SenseKey::IllegalRequest, Asc::LBA_OUT_OF_RANGE));
    assert_eq!(r.header.resid, 512);

    let s = target.stats();
    assert_eq!(s.connections, 1);
    assert_eq!(s.commands, 7);
    assert_eq!(s.opcode_count(opcode::INQUIRY), 1);
    assert_eq!(s.opcode_count(opcode::READ_10), 2);
    assert_eq!(s.opcode_count(opcode::WRITE_10), 1);
    assert_eq!(s.opcode_count(opcode::REPORT_LUNS), 1);
    assert_eq!(s.opcode_count(opcode::SERVICE_ACTION_IN_16), 1);
    assert_eq!((s.bytes_written, s.bytes_read), (4096, 4096));
    assert_eq!(s.max_data_segments, 2);
    assert_eq!(s.response_count(ScsiResponse::BadTarget), 1);
    assert_eq!(s.out_of_range, 1);
    let l = target.lun_stats(1, 2).unwrap();
    assert_eq!((l.commands, l.reads, l.writes), (4, 1, 1));
    assert!(target.lun_stats(5, 5).is_none());
    within(Duration::from_secs(5), "stop", move || target.stop());
}

#[test]
fn task_management_on_the_control_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = spawn_scsi_target(&path, single(ram(1 << 20))).unwrap();
    let mut h = connect(&path, 1);
    let reset = |lun| ControlRequest::Tmf {
        function: TmfFunction::LogicalUnitReset,
        lun: encode_lun(0, lun),
        tag: 0,
    };
    let c = h.control(0, reset(0));
    h.submit(CONTROLQ, &[c]);
    assert_eq!(h.wait_used(CONTROLQ, 1)[0].1, 1);
    assert_eq!(h.control_resp(0)[0], 0, "FUNCTION COMPLETE");
    let c = h.control(1, reset(3));
    let an = h.control(
        2,
        ControlRequest::AsyncNotification {
            subscribe: true,
            lun: encode_lun(0, 0),
            event_requested: 0x10,
        },
    );
    h.submit(CONTROLQ, &[c, an]);
    assert_eq!(
        h.wait_used(CONTROLQ, 2)
            .iter()
            .map(|u| u.1)
            .collect::<Vec<_>>(),
        vec![1, 5]
    );
    assert_eq!(h.control_resp(1)[0], ScsiResponse::IncorrectLun.to_u8());
    assert_eq!(h.control_resp(2), vec![0; 5]);
    // The LUN reset left a unit attention.
    let (_, r) = run(&mut h, 3, 0, 0, &[0; 6], None);
    assert!(r.sense().is(SenseKey::UnitAttention, Asc::new(0x29, 0x03)));

    // A target that never answers task management functions.
    target.scsi_faults().set_tmf_never_answer(true);
    let c = h.control(4, reset(0));
    h.submit(CONTROLQ, &[c]);
    assert!(h
        .try_wait_used(CONTROLQ, 1, Duration::from_millis(300))
        .is_none());
    // The request queue is unaffected.
    let (_, r) = run(&mut h, 5, 0, 0, &[0; 6], None);
    assert!(r.good());
    let s = target.stats();
    assert_eq!(
        (s.tmf_lun_reset, s.tmf_unanswered, s.an_requests),
        (3, 1, 1)
    );
    // Stopping does not wait for the unanswered function.
    within(Duration::from_secs(5), "stop", move || target.stop());
}

/// Places `n` event buffers of 16 bytes on the event queue.
fn event_buffers(h: &mut Harness, first: u64, n: u64) {
    let chains: Vec<Chain> = (first..first + n)
        .map(|i| vec![(DATA_BASE + 0x80_0000 + i * 64, 16, true)])
        .collect();
    h.submit(EVENTQ, &chains);
}

fn event(h: &Harness, i: u64) -> Event {
    Event::parse(&h.read(DATA_BASE + 0x80_0000 + i * 64, 16)).unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn hotplug_events_on_the_event_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = spawn_scsi_target(
        &path,
        ScsiTargetConfig {
            max_target: Some(3),
            ..single(ram(1 << 20))
        },
    )
    .unwrap();
    let mut h = connect(&path, 1);
    wait_for("connection", || target.stats().connections == 1);
    event_buffers(&mut h, 0, 2);
    // The buffers are kept until there is something to report.
    assert!(h
        .try_wait_used(EVENTQ, 1, Duration::from_millis(100))
        .is_none());

    target.add_lun(2, 5, ram(1 << 20)).unwrap();
    let used = h.wait_used(EVENTQ, 1);
    assert_eq!(used[0], (used[0].0, 16));
    assert_eq!(
        event(&h, 0),
        Event::transport_reset(2, 5, ResetReason::Rescan)
    );
    // The new unit answers at once.
    let (_, r) = run(&mut h, 0, 2, 5, &[0; 6], None);
    assert!(r.good(), "{r:?}");

    target.resize_lun(2, 5, 2 << 20).unwrap();
    h.wait_used(EVENTQ, 1);
    assert_eq!(event(&h, 1), Event::param_change(2, 5, 0x2a, 0x09));
    assert_eq!(target.capacity_blocks(2, 5), Some(4096));

    // No buffer left: the removal is dropped, and reported missed once a buffer comes.
    target.remove_lun(2, 5).unwrap();
    wait_for("dropped event", || target.stats().events_dropped == 1);
    assert!(h
        .try_wait_used(EVENTQ, 1, Duration::from_millis(50))
        .is_none());
    event_buffers(&mut h, 2, 1);
    h.wait_used(EVENTQ, 1);
    assert_eq!(event(&h, 2), Event::no_event().with_missed());
    // Target 2 is gone with its only unit.
    let (_, r) = run(&mut h, 1, 2, 5, &[0; 6], None);
    assert_eq!(r.header.response, ScsiResponse::BadTarget.to_u8());

    // A later event goes into a later buffer as usual.
    event_buffers(&mut h, 3, 1);
    target.add_lun(0, 1, ram(1 << 20)).unwrap();
    h.wait_used(EVENTQ, 1);
    assert_eq!(
        event(&h, 3),
        Event::transport_reset(0, 1, ResetReason::Rescan)
    );
    // LUN 0 learns of the change by unit attention.
    let (_, r) = run(&mut h, 2, 0, 0, &[0; 6], None);
    assert!(r
        .sense()
        .is(SenseKey::UnitAttention, Asc::REPORTED_LUNS_DATA_CHANGED));
    let s = target.stats();
    assert_eq!((s.events_sent, s.events_dropped), (4, 1));
    assert!(matches!(
        target.add_lun(9, 0, ram(1 << 20)),
        Err(vireo_target::LunError::OutOfRange { .. })
    ));
    within(Duration::from_secs(5), "stop", move || target.stop());
}

#[test]
fn faults_and_unit_attention_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = spawn_scsi_target(
        &path,
        ScsiTargetConfig {
            power_on_unit_attention: true,
            ..single(LunConfig {
                not_ready_tur_count: 1,
                ..ram(1 << 20)
            })
        },
    )
    .unwrap();
    let tur = [0u8; 6];
    let scan = |h: &mut Harness, first: u64| {
        // INQUIRY passes the unit attention by; TEST UNIT READY gets it, then NOT READY once.
        let (_, r) = run(
            h,
            first,
            0,
            0,
            &inquiry_cdb(None, 36),
            Some((DATA_BASE, 36, true)),
        );
        assert!(r.good());
        let (_, r) = run(h, first + 1, 0, 0, &tur, None);
        assert!(r.sense().is(SenseKey::UnitAttention, Asc::POWER_ON_RESET));
        let (_, r) = run(h, first + 2, 0, 0, &tur, None);
        assert!(r
            .sense()
            .is(SenseKey::NotReady, Asc::NOT_READY_BECOMING_READY));
        let (_, r) = run(h, first + 3, 0, 0, &tur, None);
        assert!(r.good());
    };
    let mut h = connect(&path, 1);
    scan(&mut h, 0);

    let read = |h: &Harness, n: u64| {
        let cdb = ReadWrite10Cdb::new(n, 1, RwFlags::default())
            .unwrap()
            .read_cdb();
        h.command(
            n,
            0,
            0,
            cdb.as_bytes(),
            Some((DATA_BASE + n * 0x1000, 512, true)),
        )
    };
    // Injected failures: BUSY status, then a virtio response, then success.
    target.scsi_faults().set_failure(ScsiFailure::BUSY);
    target.faults().fail_next(1);
    h.submit(REQUESTQ, &[read(&h, 10)]);
    h.wait_used(REQUESTQ, 1);
    assert_eq!(h.resp(10).header.status, Status::Busy.to_u8());
    target
        .scsi_faults()
        .set_failure(ScsiFailure::Response(ScsiResponse::Reset));
    target.faults().fail_next(1);
    h.submit(REQUESTQ, &[read(&h, 11), read(&h, 12)]);
    h.wait_used(REQUESTQ, 2);
    assert_eq!(h.resp(11).header.response, ScsiResponse::Reset.to_u8());
    assert!(h.resp(12).good());

    // Reordered completions.
    target.faults().set_reorder_window(3);
    h.submit(REQUESTQ, &[read(&h, 13), read(&h, 14), read(&h, 15)]);
    let used = h.wait_used(REQUESTQ, 3);
    assert!(used[0].0 > used[2].0, "{used:?}");
    target.faults().set_reorder_window(0);

    // Disconnect with a command in flight; the next front-end starts afresh.
    target.faults().disconnect_after(0);
    h.submit(REQUESTQ, &[read(&h, 16)]);
    assert!(h
        .try_wait_used(REQUESTQ, 1, Duration::from_millis(300))
        .is_none());
    assert!(h.fe.get_features().is_err(), "connection dropped");
    let mut h = connect(&path, 1);
    scan(&mut h, 20);
    let s = target.stats();
    assert_eq!(s.connections, 2);
    assert_eq!((s.injected_errors, s.injected_disconnects), (2, 1));
    assert_eq!(s.unit_attentions, 2);
    assert_eq!(s.reordered_completions, 3);
    // drop_connection drops this one too.
    assert!(target.drop_connection());
    wait_for("dropped connection", || h.fe.get_features().is_err());
    within(Duration::from_secs(5), "drop", move || drop(target));
}

#[test]
fn request_queues_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target: ScsiTargetHandle = spawn_scsi_target(
        &path,
        ScsiTargetConfig {
            num_request_queues: 2,
            ..ScsiTargetConfig::grid(1, 2, |_, _| ram(1 << 20))
        },
    )
    .unwrap();
    let mut h = connect(&path, 2);
    let d0 = h.fill(DATA_BASE, 4096, 7);
    let d1 = h.fill(DATA_BASE + 0x1000, 4096, 8);
    let w = |lba| {
        ReadWrite10Cdb::new(lba, 8, RwFlags::default())
            .unwrap()
            .write_cdb()
    };
    let r = |lba| {
        ReadWrite10Cdb::new(lba, 8, RwFlags::default())
            .unwrap()
            .read_cdb()
    };
    let w0 = h.command(0, 0, 0, w(0).as_bytes(), Some((DATA_BASE, 4096, false)));
    let w1 = h.command(
        1,
        0,
        1,
        w(8).as_bytes(),
        Some((DATA_BASE + 0x1000, 4096, false)),
    );
    h.submit(REQUESTQ, &[w0]);
    h.submit(REQUESTQ + 1, &[w1]);
    h.wait_used(REQUESTQ, 1);
    h.wait_used(REQUESTQ + 1, 1);
    // Each LUN read back through the other queue.
    let r0 = h.command(
        2,
        0,
        1,
        r(8).as_bytes(),
        Some((DATA_BASE + 0x10000, 4096, true)),
    );
    let r1 = h.command(
        3,
        0,
        0,
        r(0).as_bytes(),
        Some((DATA_BASE + 0x20000, 4096, true)),
    );
    h.submit(REQUESTQ, &[r0]);
    h.submit(REQUESTQ + 1, &[r1]);
    h.wait_used(REQUESTQ, 1);
    h.wait_used(REQUESTQ + 1, 1);
    assert_eq!(h.read(DATA_BASE + 0x10000, 4096), d1);
    assert_eq!(h.read(DATA_BASE + 0x20000, 4096), d0);
    assert_eq!(target.stats().status_count(Status::Good), 4);
    within(Duration::from_secs(5), "stop", move || target.stop());
}
