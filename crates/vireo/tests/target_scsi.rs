//! vireo's virtio-scsi driver against the in-tree vhost-user-scsi target: layouts,
//! limits and events that real targets do not offer on demand.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use vireo_bdev::{IoBuf, IoError, IoOp, IoRequest, Registry};
use vireo_target::{
    spawn_scsi_target, Backing, BlockLimitsConfig, LunConfig, ScsiFailure, ScsiTargetConfig,
    ScsiTargetHandle,
};

fn target(cfg: ScsiTargetConfig) -> (ScsiTargetHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let t = spawn_scsi_target(&dir.path().join("scsi.sock"), cfg).unwrap();
    (t, dir)
}

fn ram_lun(mib: u64) -> LunConfig {
    LunConfig {
        backend: Backing::Ram {
            size_bytes: mib << 20,
        },
        ..Default::default()
    }
}

fn attach(
    reg: &Registry,
    t: &ScsiTargetHandle,
    vq_count: u16,
) -> Vec<std::sync::Arc<vireo_bdev::Bdev>> {
    reg.attach(&scsi_params("S", t.socket_path(), vq_count, 128))
        .expect("attach")
}

/// LUNs 0:0 and 0:1, 8 MiB of RAM each.
fn two_luns() -> BTreeMap<(u8, u16), LunConfig> {
    let mut luns = BTreeMap::new();
    luns.insert((0, 0), ram_lun(8));
    luns.insert((0, 1), ram_lun(8));
    luns
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ salt).collect()
}

fn opcode_count(t: &ScsiTargetHandle, op: u8) -> u64 {
    t.stats().opcodes.get(&op).copied().unwrap_or(0)
}

#[test]
fn four_targets_by_four_luns_are_all_found_with_spdk_names() {
    let mut luns = BTreeMap::new();
    for t in 0..4u8 {
        for l in 0..4u16 {
            luns.insert((t, l), ram_lun(8));
        }
    }
    let (t, _d) = target(ScsiTargetConfig {
        luns,
        max_target: Some(7),
        ..Default::default()
    });
    let reg = registry();
    let bdevs = attach(&reg, &t, 1);
    let mut names: Vec<String> = bdevs.iter().map(|b| b.name().to_string()).collect();
    names.sort();
    let mut want = Vec::new();
    for tg in 0..4 {
        want.push(format!("St{tg}"));
        for l in 1..4 {
            want.push(format!("St{tg}l{l}"));
        }
    }
    want.sort();
    assert_eq!(names, want);
    // Each LUN is its own disk.
    for (k, b) in bdevs.iter().enumerate() {
        let a = b.info().scsi.unwrap();
        let mut ch = b.open_channel().unwrap();
        ch.run(IoRequest::write(
            3,
            1,
            IoBuf::Heap(pattern(512, k as u8)),
            1,
        ))
        .result
        .unwrap();
        drop(ch);
        let _ = a;
    }
    for (k, b) in bdevs.iter().enumerate() {
        let mut ch = b.open_channel().unwrap();
        let c = ch.run(IoRequest::read(3, 1, IoBuf::Heap(vec![0; 512]), 1));
        assert_eq!(
            c.buf.unwrap().as_slice(),
            &pattern(512, k as u8)[..],
            "{}",
            b.name()
        );
    }
}

#[test]
fn lun_beyond_two_to_the_32_blocks_uses_16_byte_cdbs() {
    let dir = tempfile::tempdir().unwrap();
    let blocks: u64 = (1 << 32) + 4096;
    let (t, _d) = target(ScsiTargetConfig {
        luns: BTreeMap::from([(
            (0, 0),
            LunConfig {
                backend: Backing::File {
                    path: dir.path().join("big.img"),
                    size_bytes: Some(blocks * 512),
                },
                ..Default::default()
            },
        )]),
        ..Default::default()
    });
    let reg = registry();
    let b = attach(&reg, &t, 1).pop().unwrap();
    assert_eq!(b.info().num_blocks, blocks);
    let mut ch = b.open_channel().unwrap();
    let (r10, r16, w10, w16) = (0x28, 0x88, 0x2a, 0x8a);
    let before = (
        opcode_count(&t, r10),
        opcode_count(&t, r16),
        opcode_count(&t, w10),
        opcode_count(&t, w16),
    );
    // Low LBAs: 10-byte CDBs.
    ch.run(IoRequest::write(100, 8, IoBuf::Heap(pattern(4096, 1)), 1))
        .result
        .unwrap();
    ch.run(IoRequest::read(100, 8, IoBuf::Heap(vec![0; 4096]), 2))
        .result
        .unwrap();
    assert_eq!(opcode_count(&t, w10), before.2 + 1);
    assert_eq!(opcode_count(&t, r10), before.0 + 1);
    // The last blocks, beyond LBA 2^32: 16-byte CDBs, data intact.
    let lba = blocks - 8;
    ch.run(IoRequest::write(lba, 8, IoBuf::Heap(pattern(4096, 2)), 3))
        .result
        .unwrap();
    let c = ch.run(IoRequest::read(lba, 8, IoBuf::Heap(vec![0; 4096]), 4));
    assert_eq!(c.buf.unwrap().as_slice(), &pattern(4096, 2)[..]);
    assert_eq!(opcode_count(&t, w16), before.3 + 1);
    assert_eq!(opcode_count(&t, r16), before.1 + 1);
    // A flush of such a LUN is SYNCHRONIZE CACHE(16).
    ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, 5))
        .result
        .unwrap();
    assert!(opcode_count(&t, 0x91) >= 1);
}

#[test]
fn small_transfer_and_unmap_limits_are_obeyed() {
    let lun = LunConfig {
        limits: BlockLimitsConfig {
            max_transfer_length: 16,
            max_unmap_lba_count: 1000,
            max_unmap_descriptor_count: 3,
            max_write_same_length: 64,
            ..Default::default()
        },
        ..ram_lun(64)
    };
    let (t, _d) = target(ScsiTargetConfig {
        luns: BTreeMap::from([((0, 0), lun)]),
        ..Default::default()
    });
    let reg = registry();
    let b = attach(&reg, &t, 1).pop().unwrap();
    let l = b.info().limits;
    assert_eq!(l.max_rw_blocks, 16);
    assert_eq!(l.max_unmap_blocks, 1000);
    assert_eq!(l.max_write_zeroes_blocks, 64);
    let mut ch = b.open_channel().unwrap();
    let len = 1 << 20;
    let data = pattern(len, 5);
    ch.run(IoRequest::write(
        11,
        (len / 512) as u64,
        IoBuf::Heap(data.clone()),
        1,
    ))
    .result
    .unwrap();
    let c = ch.run(IoRequest::read(
        11,
        (len / 512) as u64,
        IoBuf::Heap(vec![0; len]),
        2,
    ));
    c.result.unwrap();
    assert!(c.buf.unwrap().as_slice() == &data[..]);
    // 5000 blocks of unmap: at least 5 UNMAP commands of <= 1000 blocks.
    let unmaps_before = opcode_count(&t, 0x42);
    ch.run(IoRequest::no_data(IoOp::Unmap, 20_000, 5000, 3))
        .result
        .unwrap();
    assert_eq!(opcode_count(&t, 0x42) - unmaps_before, 5);
    ch.run(IoRequest::no_data(IoOp::WriteZeroes, 11, 300, 4))
        .result
        .unwrap();
    let c = ch.run(IoRequest::read(11, 300, IoBuf::Heap(vec![1; 300 * 512]), 5));
    assert!(c.buf.unwrap().as_slice().iter().all(|&x| x == 0));
    let s = t.stats();
    assert_eq!(s.transfer_limit_rejected, 0, "{s:?}");
    assert_eq!(s.unmap_limit_rejected, 0, "{s:?}");
    assert_eq!(s.write_same_limit_rejected, 0, "{s:?}");
    assert!(
        s.unmap_descriptor_histogram.keys().all(|&d| d <= 3),
        "{s:?}"
    );
    assert!(s.max_data_bytes <= 16 * 512, "{s:?}");
}

#[test]
fn unmap_of_10_tib_is_split_into_valid_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let tib: u64 = 1 << 40;
    let blocks = 11 * tib / 512;
    let lun = |max_desc: u32| LunConfig {
        backend: Backing::File {
            path: dir.path().join(format!("huge{max_desc}.img")),
            size_bytes: Some(blocks * 512),
        },
        limits: BlockLimitsConfig {
            max_unmap_descriptor_count: max_desc,
            ..Default::default()
        },
        ..Default::default()
    };
    let (t, _d) = target(ScsiTargetConfig {
        luns: BTreeMap::from([((0, 0), lun(u32::MAX)), ((0, 1), lun(4))]),
        ..Default::default()
    });
    let reg = registry();
    let bdevs = attach(&reg, &t, 1);
    let n = 10 * tib / 512; // 10 x 2^31 = 21,474,836,480 blocks
    let per_desc = u32::MAX as u64;
    let descs = n.div_ceil(per_desc); // 6 descriptors of <= 2^32-1 blocks
    assert_eq!(descs, 6);
    // Unlimited descriptors: one UNMAP with every descriptor.
    // (The scan's zero-length UNMAP probe counts as one command of each LUN.)
    let probe = t.lun_stats(0, 0).unwrap().unmaps;
    let b0 = bdevs.iter().find(|b| b.name() == "St0").unwrap();
    let mut ch = b0.open_channel().unwrap();
    ch.run(IoRequest::no_data(IoOp::Unmap, 0, n, 1))
        .result
        .unwrap();
    drop(ch);
    let s = t.lun_stats(0, 0).unwrap();
    assert_eq!(s.unmaps - probe, 1);
    assert_eq!(s.blocks_unmapped, n);
    assert_eq!(
        t.stats().unmap_descriptor_histogram.get(&(descs as usize)),
        Some(&1)
    );
    // At most 4 descriptors per command: ceil(descs / 4) commands.
    let probe = t.lun_stats(0, 1).unwrap().unmaps;
    let b1 = bdevs.iter().find(|b| b.name() == "St0l1").unwrap();
    let mut ch = b1.open_channel().unwrap();
    ch.run(IoRequest::no_data(IoOp::Unmap, 0, n, 2))
        .result
        .unwrap();
    let s = t.lun_stats(0, 1).unwrap();
    assert_eq!(s.unmaps - probe, descs.div_ceil(4));
    assert_eq!(s.blocks_unmapped, n);
    assert!(t
        .stats()
        .unmap_descriptor_histogram
        .keys()
        .all(|&d| d <= 4095));
    assert_eq!(t.stats().unmap_limit_rejected, 0);
}

#[test]
fn unit_attention_and_not_ready_at_start_are_handled() {
    let lun = LunConfig {
        not_ready_tur_count: 3,
        start_required: true,
        ..ram_lun(8)
    };
    let (t, _d) = target(ScsiTargetConfig {
        luns: BTreeMap::from([((0, 0), lun)]),
        power_on_unit_attention: true,
        ..Default::default()
    });
    let reg = registry();
    let b = attach(&reg, &t, 1).pop().unwrap();
    let mut ch = b.open_channel().unwrap();
    ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .result
        .unwrap();
    let s = t.stats();
    assert!(s.unit_attentions >= 1, "{s:?}");
    assert!(opcode_count(&t, 0x1b) >= 1, "START STOP UNIT was sent");
}

#[test]
fn device_errors_are_typed_and_retries_are_bounded() {
    let (t, _d) = target(ScsiTargetConfig::default());
    let reg = registry();
    let b = attach(&reg, &t, 1).pop().unwrap();
    let mut ch = b.open_channel().unwrap();
    // MEDIUM ERROR: not retried, typed with sense.
    t.scsi_faults().set_failure(ScsiFailure::MEDIUM_ERROR);
    t.faults().fail_next(1);
    let c = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1));
    assert_eq!(
        c.result,
        Err(IoError::Sense {
            key: 3,
            asc: 0x11,
            ascq: 0
        })
    );
    // BUSY twice: retried, succeeds.
    t.scsi_faults().set_failure(ScsiFailure::BUSY);
    t.faults().fail_next(2);
    ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2))
        .result
        .unwrap();
    // BUSY forever: gives up with a clear error, no hang.
    t.faults().fail_next(1000);
    let c = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 3));
    match c.result {
        Err(IoError::Scsi(m)) => assert!(m.contains("retries"), "{m}"),
        r => panic!("{r:?}"),
    }
    t.faults().clear();
    ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 4))
        .result
        .unwrap();
}

#[test]
fn lun_reset_answered_and_unanswered() {
    let (t, _d) = target(ScsiTargetConfig::default());
    let reg = registry();
    let b = attach(&reg, &t, 1).pop().unwrap();
    b.reset(Duration::from_secs(5)).unwrap();
    t.scsi_faults().set_tmf_never_answer(true);
    let start = Instant::now();
    let e = b.reset(Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, IoError::Timeout(_)), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
    // I/O still works after a lost TMF.
    let mut ch = b.open_channel().unwrap();
    ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .result
        .unwrap();
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn luns_hot_added_and_removed_while_io_runs_on_another() {
    let (t, _d) = target(ScsiTargetConfig {
        num_request_queues: 2,
        ..Default::default()
    });
    let reg = std::sync::Arc::new(registry());
    let b0 = attach(&reg, &t, 2).pop().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // I/O on LUN 0 from another thread for the whole test.
    let io = {
        let b0 = b0.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut ch = b0.open_channel().unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = ch.run(IoRequest::write(
                    n % 1000,
                    1,
                    IoBuf::Heap(vec![n as u8; 512]),
                    n,
                ));
                c.result.unwrap();
                n += 1;
            }
            n
        })
    };
    t.add_lun(0, 1, ram_lun(8)).unwrap();
    wait_for("the hot-added LUN", || reg.bdev("St0l1").is_some());
    let b1 = reg.bdev("St0l1").unwrap();
    {
        let mut ch = b1.open_channel().unwrap();
        ch.run(IoRequest::write(0, 8, IoBuf::Heap(pattern(4096, 3)), 1))
            .result
            .unwrap();
        let c = ch.run(IoRequest::read(0, 8, IoBuf::Heap(vec![0; 4096]), 2));
        assert_eq!(c.buf.unwrap().as_slice(), &pattern(4096, 3)[..]);
    }
    t.remove_lun(0, 1).unwrap();
    wait_for("the hot-removed LUN", || reg.bdev("St0l1").is_none());
    assert!(b1.is_removed());
    let mut ch = b1.open_channel().unwrap();
    let c = ch.run(IoRequest::read(0, 8, IoBuf::Heap(vec![0; 4096]), 3));
    assert!(
        matches!(c.result, Err(IoError::Removed(_))),
        "{:?}",
        c.result
    );
    drop(ch);
    // Capacity change.
    t.resize_lun(0, 0, 128 << 20).unwrap();
    wait_for("the new capacity", || b0.num_blocks() == (128 << 20) / 512);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = io.join().unwrap();
    assert!(n > 10, "I/O kept running ({n} writes)");
}

/// A target that sends no events (no HOTPLUG, no CHANGE) replaces the disk at 0:1 with
/// one of 4096-byte blocks and says so only by unit attentions: REPORTED LUNS DATA HAS
/// CHANGED makes vireo rescan, the old bdev is removed and a new one with the new
/// geometry takes its name (it used to keep the old bdev, whose 512-byte LBAs then
/// landed at 8 times the offset); CAPACITY DATA HAS CHANGED updates the capacity.
#[test]
fn unit_attentions_alone_make_vireo_rescan_and_a_replaced_lun_a_new_bdev() {
    let (t, _d) = target(ScsiTargetConfig {
        luns: two_luns(),
        hotplug: false,
        change: false,
        num_request_queues: 2,
        ..Default::default()
    });
    let reg = std::sync::Arc::new(registry());
    // Two queues: the rescan takes the one the channel below does not hold.
    let _bdevs = attach(&reg, &t, 2);
    let b0 = reg.bdev("St0").unwrap();
    let b1 = reg.bdev("St0l1").unwrap();
    assert_eq!(b1.info().block_size, 512);
    t.remove_lun(0, 1).unwrap();
    t.add_lun(
        0,
        1,
        LunConfig {
            block_size: 4096,
            ..ram_lun(8)
        },
    )
    .unwrap();
    t.raise_unit_attention(0, 0, vireo_scsi::Asc::new(0x3f, 0x0e))
        .unwrap();
    let mut ch = b0.open_channel().unwrap();
    ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .result
        .unwrap();
    wait_for("the replaced LUN's new bdev", || {
        reg.bdev("St0l1")
            .is_some_and(|b| b.info().block_size == 4096)
    });
    assert!(b1.is_removed(), "the old bdev is gone");
    // Capacity: a resize raises CAPACITY DATA HAS CHANGED only (no CHANGE event).
    t.resize_lun(0, 0, 16 << 20).unwrap();
    ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2))
        .result
        .unwrap();
    wait_for("the new capacity", || b0.num_blocks() == (16 << 20) / 512);
    assert!(!b0.is_removed(), "a resized LUN keeps its bdev");
}

#[test]
fn cli_target_scsi_and_perf_verify_unmap() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _target = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_vireo"))
            .args([
                "target",
                "--type",
                "scsi",
                "--targets",
                "2",
                "--luns",
                "2",
                "--size",
                "64m",
                "--max-transfer",
                "64",
                "-s",
            ])
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the target socket", || sock.exists());
    let conf = write_config(
        dir.path(),
        "c.json",
        &[scsi_params("VirtioScsi0", &sock, 1, 512)],
    );
    for w in ["verify", "unmap"] {
        let j = perf_json(&conf, &["-w", w, "-o", "64k", "-q", "16", "-t", "1"]);
        assert_eq!(
            j["jobs"].as_array().unwrap().len(),
            4,
            "{w}: all four LUNs on one queue"
        );
        assert_eq!(j["total"]["errors"], 0, "{w}");
        assert_eq!(j["total"]["verify_failures"], 0, "{w}");
    }
}

#[test]
fn a_burst_of_hot_adds_beyond_the_event_buffers_is_caught_by_a_rescan() {
    let (t, _d) = target(ScsiTargetConfig {
        num_request_queues: 1,
        ..Default::default()
    });
    let reg = registry();
    attach(&reg, &t, 1);
    // More LUNs at once than the driver keeps event buffers (16): some events are
    // dropped and the device reports EVENTS_MISSED, which triggers a full rescan.
    for l in 1..=40u16 {
        t.add_lun(0, l, ram_lun(1)).unwrap();
    }
    wait_for("every hot-added LUN", || reg.bdevs().len() == 41);
    let s = t.stats();
    assert!(s.events_sent >= 1, "{s:?}");
    eprintln!("events sent {} dropped {}", s.events_sent, s.events_dropped);
    for l in [1u16, 17, 40] {
        let b = reg.bdev(&format!("St0l{l}")).unwrap();
        let mut ch = b.open_channel().unwrap();
        ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
            .result
            .unwrap();
    }
}

/// LUNs found by a rescan (a burst of hot-adds beyond the event buffers) whose bdev
/// name another controller's bdev has are left out and said so; once the name is free,
/// the LUN is added when the device reports it again.
#[test]
fn a_lun_whose_bdev_name_is_taken_is_left_out_until_the_name_is_free() {
    let (t, d) = target(ScsiTargetConfig {
        num_request_queues: 1,
        ..Default::default()
    });
    let blk_sock = d.path().join("blk.sock");
    let _blk = vireo_target::spawn_blk_target(
        &blk_sock,
        vireo_target::BlkTargetConfig {
            backend: Backing::Ram {
                size_bytes: 8 << 20,
            },
            ..Default::default()
        },
    )
    .unwrap();
    let reg = registry();
    attach(&reg, &t, 1);
    reg.attach(&blk_params("St0l17", &blk_sock, 1)).unwrap();
    for l in 1..=40u16 {
        t.add_lun(0, l, ram_lun(1)).unwrap();
    }
    let left = || reg.with_controller("S", |c| c.luns_not_added()).unwrap();
    // S's 40 LUNs but one, and the blk bdev.
    wait_for("the other hot-added LUNs", || {
        reg.bdevs().len() == 41 && !left().is_empty()
    });
    let mut names: Vec<String> = reg.bdevs().iter().map(|b| b.name().to_string()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 41, "bdev names are unique: {names:?}");
    assert_eq!(reg.bdev("St0l17").unwrap().info().driver, "virtio_blk");
    let l = left();
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(
        (l[0].target, l[0].lun, l[0].bdev.as_str()),
        (0, 17, "St0l17")
    );
    assert!(l[0].reason.contains("controller St0l17"), "{}", l[0].reason);

    reg.detach("St0l17").unwrap();
    t.remove_lun(0, 17).unwrap();
    t.add_lun(0, 17, ram_lun(1)).unwrap();
    wait_for("LUN 17 once its name is free", || {
        reg.bdev("St0l17")
            .is_some_and(|b| b.info().driver == "virtio_scsi")
    });
    assert_eq!(left(), vec![]);
    assert_eq!(reg.bdevs().len(), 41);
}

#[test]
fn hot_add_waits_for_a_free_queue_when_channels_hold_them_all() {
    let (t, _d) = target(ScsiTargetConfig {
        num_request_queues: 1,
        ..Default::default()
    });
    let reg = registry();
    let b0 = attach(&reg, &t, 1).pop().unwrap();
    let ch = b0.open_channel().unwrap();
    t.add_lun(0, 5, ram_lun(4)).unwrap();
    // The only request queue is held by `ch`: the scan of the new LUN waits.
    std::thread::sleep(Duration::from_millis(200));
    assert!(reg.bdev("St0l5").is_none());
    drop(ch);
    wait_for("the deferred hot-add", || reg.bdev("St0l5").is_some());
}

#[test]
fn a_channel_waiting_for_ring_space_freed_by_another_lun_gets_it() {
    let (t, _d) = target(ScsiTargetConfig {
        luns: two_luns(),
        ..Default::default()
    });
    let reg = registry();
    let bdevs = reg
        .attach(&scsi_params("S", t.socket_path(), 1, 16))
        .unwrap();
    let a = bdevs.iter().find(|b| b.name() == "St0").unwrap();
    let b = bdevs.iter().find(|b| b.name() == "St0l1").unwrap();
    let mut ca = a.open_channel().unwrap();
    let mut cb = b.open_channel().unwrap();
    // A fills the 16-descriptor ring; everything B submits has to wait for space that
    // only A's completions free.
    for i in 0..64u64 {
        ca.submit(IoRequest::write(i, 1, IoBuf::Heap(vec![1; 512]), i))
            .unwrap();
    }
    ca.publish();
    for i in 0..8u64 {
        cb.submit(IoRequest::write(i, 1, IoBuf::Heap(vec![2; 512]), i))
            .unwrap();
    }
    let (mut da, mut db) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while da.len() < 64 {
        assert!(Instant::now() < deadline, "A stalled");
        ca.poll(&mut da);
    }
    while db.len() < 8 {
        assert!(
            Instant::now() < deadline,
            "B stalled waiting for ring space"
        );
        cb.poll(&mut db);
    }
    assert!(da.iter().chain(db.iter()).all(|c| c.result.is_ok()));
}

#[test]
fn a_target_without_a_config_space_is_scanned_with_spec_defaults() {
    // Like SPDK's vhost-scsi: no CONFIG protocol feature, so no num_queues, max_target
    // or sense/CDB sizes; vireo takes the queue count from GET_QUEUE_NUM and scans
    // targets 0..=63.
    let mut luns = BTreeMap::new();
    for t in [0u8, 5, 63] {
        luns.insert((t, 0), ram_lun(8));
    }
    luns.insert((5, 2), ram_lun(8));
    let (t, _d) = target(ScsiTargetConfig {
        luns,
        num_request_queues: 2,
        config_space: false,
        ..Default::default()
    });
    // More request queues than GET_QUEUE_NUM allows is refused with the count.
    let e = registry()
        .attach(&scsi_params("S", t.socket_path(), 3, 128))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vq_count=3") && e.contains("offers 2"), "{e}");
    let reg = registry();
    let bdevs = reg
        .attach(&scsi_params("S", t.socket_path(), 2, 128))
        .expect("attach without a config space");
    let mut names: Vec<_> = bdevs.iter().map(|b| b.name().to_string()).collect();
    names.sort();
    assert_eq!(names, ["St0", "St5", "St5l2", "St63"]);
    // Data goes to the right LUN through both queues.
    let threads: Vec<_> = bdevs
        .iter()
        .take(2)
        .cloned()
        .enumerate()
        .map(|(i, b)| {
            std::thread::spawn(move || {
                let mut ch = b.open_channel().unwrap();
                let data = pattern(4096, i as u8);
                let c = ch.run(IoRequest::write(8, 8, IoBuf::Heap(data.clone()), 1));
                assert_eq!(c.result, Ok(()));
                let c = ch.run(IoRequest::read(8, 8, IoBuf::Heap(vec![0; 4096]), 2));
                assert_eq!(c.result, Ok(()));
                assert_eq!(c.buf.unwrap().as_slice(), &data[..]);
            })
        })
        .collect();
    for h in threads {
        h.join().unwrap();
    }
}

#[test]
fn flush_reaches_only_a_lun_with_a_write_cache() {
    // WCE=0 in the caching mode page: writes are durable when they complete, a flush
    // completes at once without SYNCHRONIZE CACHE; WCE=1 sends one.
    let mut luns = BTreeMap::new();
    luns.insert(
        (0, 0),
        LunConfig {
            write_cache: false,
            ..ram_lun(8)
        },
    );
    luns.insert((0, 1), ram_lun(8));
    let (t, _d) = target(ScsiTargetConfig {
        luns,
        ..Default::default()
    });
    let reg = registry();
    let bdevs = attach(&reg, &t, 1);
    let by_name = |n: &str| bdevs.iter().find(|b| b.name() == n).unwrap().clone();
    let (wt, wb) = (by_name("St0"), by_name("St0l1"));
    assert!(!wt.info().volatile_write_cache && wb.info().volatile_write_cache);
    let sync10 = 0x35;
    let before = opcode_count(&t, sync10);
    let mut ch = wt.open_channel().unwrap();
    assert_eq!(
        ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, 1)).result,
        Ok(())
    );
    assert_eq!(opcode_count(&t, sync10), before);
    drop(ch);
    let mut ch = wb.open_channel().unwrap();
    assert_eq!(
        ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, 1)).result,
        Ok(())
    );
    assert_eq!(opcode_count(&t, sync10), before + 1);
    drop(ch);
    // MODE PARAMETERS CHANGED on the write-through LUN: its cache may be on now, so
    // flushes reach it from then on.
    t.raise_unit_attention(0, 0, vireo_scsi::Asc::MODE_PARAMETERS_CHANGED)
        .unwrap();
    let mut ch = wt.open_channel().unwrap();
    let c = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2));
    assert_eq!(c.result, Ok(()), "the unit attention is retried");
    assert!(wt.info().volatile_write_cache);
    let c = ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, 3));
    assert_eq!(c.result, Ok(()));
    assert_eq!(opcode_count(&t, sync10), before + 2);
}

#[test]
fn a_wrong_dev_type_is_named_in_the_error() {
    let (t, _d) = target(ScsiTargetConfig::default());
    let e = registry()
        .attach(&blk_params("X", t.socket_path(), 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains(r#"set "dev_type": "scsi""#), "{e}");
}

/// `io_timeout` on a SCSI controller: a request the LUN holds past the limit fails
/// with a timeout; if the LUN still holds it a period later the channel sends ABORT
/// TASK, a period after that a LOGICAL UNIT RESET (escalation); I/O works afterwards.
#[test]
fn io_timeout_fails_the_io_then_resets_the_lun() {
    let (t, _d) = target(ScsiTargetConfig::default());
    let reg = registry();
    let mut p = scsi_params("S", t.socket_path(), 1, 128);
    p.io_timeout = Some(Duration::from_millis(100));
    let b = reg.attach(&p).expect("attach").pop().unwrap();
    let mut ch = b.open_channel().unwrap();
    ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .result
        .unwrap();
    let resets = t.stats().tmf_lun_reset;
    let aborts = t.stats().tmf_abort_task;
    t.faults().set_completion_delay(Duration::from_millis(800));
    let c = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2));
    assert!(
        matches!(c.result, Err(IoError::Timeout(_))),
        "{:?}",
        c.result
    );
    // Keep polling past the escalation point.
    let until = Instant::now() + Duration::from_millis(500);
    let mut out = Vec::new();
    while Instant::now() < until {
        ch.poll(&mut out);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        t.stats().tmf_abort_task > aborts,
        "ABORT TASK was sent for the timed-out request"
    );
    assert!(
        t.stats().tmf_lun_reset > resets,
        "the LUN was reset after the timed-out request stayed out"
    );
    t.faults().clear();
    // The delayed request comes back (as reset or completed) and the LUN answers again.
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        ch.poll(&mut out);
        std::thread::sleep(Duration::from_millis(5));
    }
    ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 3))
        .result
        .unwrap();
}

/// A read or write longer than one data segment (4 MiB) goes out as one command with
/// several data descriptors, in both directions, and the data comes back whole.
#[test]
fn a_command_with_several_data_segments_moves_all_its_data() {
    let (t, _d) = target(ScsiTargetConfig {
        luns: BTreeMap::from([((0, 0), ram_lun(32))]),
        ..Default::default()
    });
    let reg = registry();
    let b = attach(&reg, &t, 1).pop().unwrap();
    let len = 10 << 20;
    assert!(
        b.info().limits.max_rw_blocks >= (len / 512) as u64,
        "{:?}",
        b.info().limits
    );
    let mut ch = b.open_channel().unwrap();
    let data = pattern(len, 9);
    let writes = opcode_count(&t, 0x2a) + opcode_count(&t, 0x8a);
    ch.run(IoRequest::write(
        3,
        (len / 512) as u64,
        IoBuf::Heap(data.clone()),
        1,
    ))
    .result
    .unwrap();
    assert_eq!(
        opcode_count(&t, 0x2a) + opcode_count(&t, 0x8a) - writes,
        1,
        "one WRITE command"
    );
    let c = ch.run(IoRequest::read(
        3,
        (len / 512) as u64,
        IoBuf::Heap(vec![0; len]),
        2,
    ));
    c.result.unwrap();
    assert!(c.buf.unwrap().as_slice() == &data[..]);
    assert!(t.stats().max_data_bytes >= len as u64, "{:?}", t.stats());
}

/// Two LUN channels of one thread share one request queue and its eventfd. B reaps and
/// disarms while A is still armed: the ring's interrupts stay on and its signal is left
/// for A, whose completion B's poll put in A's outbox (B's disarm used to turn
/// interrupts off and consume the signal, and A slept on its fd for ever).
#[test]
fn a_sibling_channel_disarming_leaves_the_shared_queue_armed_for_the_other() {
    let (t, _d) = target(ScsiTargetConfig {
        luns: two_luns(),
        ..Default::default()
    });
    let reg = std::sync::Arc::new(registry());
    let _bdevs = attach(&reg, &t, 1);
    let mut a = reg.bdev("St0").unwrap().open_channel().unwrap();
    let mut b = reg.bdev("St0l1").unwrap().open_channel().unwrap();
    t.faults().set_completion_delay(Duration::from_millis(200));
    a.submit(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .unwrap();
    b.submit(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2))
        .unwrap();
    let vireo_bdev::Armed::Fd(fd) = a.arm() else {
        panic!("A: no fd to sleep on");
    };
    assert!(matches!(b.arm(), vireo_bdev::Armed::Fd(_)));
    // B takes its completion (and A's, into A's outbox) and is done.
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while got.is_empty() && Instant::now() < until {
        b.poll(&mut got);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(got.len(), 1, "B's read completed");
    // A, asleep on its fd, is woken.
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, 2000) };
    assert_eq!(r, 1, "A's completion fd was not signalled");
    let mut out = Vec::new();
    a.poll(&mut out);
    assert_eq!(out.len(), 1);
    assert!(out[0].result.is_ok());
    t.faults().set_completion_delay(Duration::ZERO);
}
