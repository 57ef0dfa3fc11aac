//! A fuzzer plays a virtio-scsi device against vireo's SCSI completion path: the
//! in-tree target (a real vhost-user back-end) answers each I/O as the input says:
//! CHECK CONDITION with any sense key and ASC/ASCQ, any SCSI status, any virtio-scsi
//! response code, a used length beyond the buffers, reordered completions, or
//! normally. The driver's retries (BUSY, TASK SET FULL, UNIT ATTENTION, transport
//! resets) and error mapping all run.
//!
//! Oracle: no panic, no hang; every I/O completes exactly once; once the faults stop,
//! the LUN works again (unless the driver declared the controller failed).
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vireo_bdev::{
    AttachParams, Bdev, DevType, IoBuf, IoChannel, IoError, IoOp, IoRequest, Registry, TrType,
};
use vireo_scsi::{Asc, SenseKey, Status};
use vireo_target::{
    spawn_scsi_target, Backing, LunConfig, ScsiFailure, ScsiResponse, ScsiTargetConfig,
    ScsiTargetHandle,
};
use vireo_virtio::{DmaConfig, DmaMemory};

struct World {
    _dir: std::path::PathBuf,
    target: ScsiTargetHandle,
    _reg: Registry,
    bdev: Arc<Bdev>,
    ch: IoChannel,
}

fn world() -> World {
    let dir = std::env::temp_dir().join(format!("vireo-fuzz-scsi-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let sock = dir.join(format!(
        "t{}.sock",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut luns = std::collections::BTreeMap::new();
    luns.insert(
        (0u8, 0u16),
        LunConfig {
            backend: Backing::Ram {
                size_bytes: 2 << 20,
            },
            ..Default::default()
        },
    );
    let target = spawn_scsi_target(
        &sock,
        ScsiTargetConfig {
            luns,
            ..Default::default()
        },
    )
    .expect("target");
    let reg = Registry::new(
        DmaMemory::new(DmaConfig {
            initial_region_size: 1 << 20,
            ..Default::default()
        })
        .unwrap(),
    );
    let bdev = reg
        .attach(&AttachParams {
            name: "S".into(),
            trtype: TrType::User,
            traddr: sock.display().to_string(),
            dev_type: DevType::Scsi,
            vq_count: 1,
            vq_size: 32,
            io_timeout: None,
            reconnect_timeout: None,
            packed_ring: Default::default(),
        })
        .expect("attach an honest target")
        .pop()
        .unwrap();
    let ch = bdev.open_channel().unwrap();
    World {
        _dir: dir,
        target,
        _reg: reg,
        bdev,
        ch,
    }
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
}

fn response(b: u8) -> ScsiResponse {
    match b % 14 {
        0 => ScsiResponse::Overrun,
        1 => ScsiResponse::Aborted,
        2 => ScsiResponse::BadTarget,
        3 => ScsiResponse::Reset,
        4 => ScsiResponse::Busy,
        5 => ScsiResponse::TransportFailure,
        6 => ScsiResponse::TargetFailure,
        7 => ScsiResponse::NexusFailure,
        8 => ScsiResponse::Failure,
        9 => ScsiResponse::FunctionSucceeded,
        10 => ScsiResponse::FunctionRejected,
        11 => ScsiResponse::IncorrectLun,
        12 => ScsiResponse::Ok,
        _ => ScsiResponse::Other(b),
    }
}

fuzz_target!(|data: &[u8]| {
    WORLD.with(|w| {
        let mut w = w.borrow_mut();
        if w.is_none() {
            *w = Some(world());
        }
        let world = w.as_mut().unwrap();
        let mut failed = false;
        for (k, c) in data.chunks(4).take(32).enumerate() {
            let b = |i: usize| c.get(i).copied().unwrap_or(0);
            let f = world.target.faults();
            let sf = world.target.scsi_faults();
            match b(0) % 8 {
                0 => {
                    sf.set_failure(ScsiFailure::CheckCondition {
                        key: SenseKey::from_u8(b(1)),
                        asc: Asc::new(b(2), b(3)),
                    });
                    f.fail_next(1 + b(3) as u64 % 3);
                }
                1 => {
                    sf.set_failure(ScsiFailure::Status(Status::from(b(1))));
                    f.fail_next(1 + b(2) as u64 % 3);
                }
                2 => {
                    sf.set_failure(ScsiFailure::Response(response(b(1))));
                    f.fail_next(1 + b(2) as u64 % 3);
                }
                3 => f.lie_used_len_next(1),
                4 => f.set_reorder_window(b(1) as u32 % 4),
                _ => {}
            }
            let blocks = 1 + b(2) as u64 % 16;
            let lba = (b(1) as u64 * 131) % 2000;
            let req = match b(3) % 4 {
                0 => IoRequest::read(
                    lba,
                    blocks,
                    IoBuf::Heap(vec![0; blocks as usize * 512]),
                    k as u64,
                ),
                1 => IoRequest::write(
                    lba,
                    blocks,
                    IoBuf::Heap(vec![0xa5; blocks as usize * 512]),
                    k as u64,
                ),
                2 => IoRequest::no_data(IoOp::Flush, 0, 0, k as u64),
                _ => IoRequest::no_data(IoOp::WriteZeroes, lba, blocks, k as u64),
            };
            let ch = &mut world.ch;
            ch.submit(req)
                .unwrap_or_else(|r| panic!("refused: {}", r.error));
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while out.is_empty() {
                ch.poll(&mut out);
                assert!(Instant::now() < deadline, "I/O hung");
                if world.target.faults().pending_failures() > 0 && out.is_empty() {
                    std::hint::spin_loop();
                }
            }
            assert_eq!(out.len(), 1, "one completion per I/O");
            assert_eq!(out[0].user_data, k as u64);
            if let Err(e @ (IoError::ControllerFailed(_) | IoError::Disconnected)) = &out[0].result
            {
                if std::env::var_os("VIREO_FUZZ_DEBUG").is_some() {
                    eprintln!("FAILED: {e}");
                }
                failed = true;
                break;
            }
            f.set_reorder_window(0);
            f.clear();
        }
        world.target.faults().clear();
        if failed {
            // A controller the device broke is not trusted again: start over.
            if let Some(old) = w.take() {
                old.target.stop();
            }
            return;
        }
        // The faults are over: the LUN works.
        let ch = &mut w.as_mut().unwrap().ch;
        let c = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 9999));
        assert!(c.result.is_ok(), "the LUN did not recover: {:?}", c.result);
        let _ = &w.as_ref().unwrap().bdev;
    });
});
