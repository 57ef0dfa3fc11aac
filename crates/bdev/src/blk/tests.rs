//! The virtio-blk driver against the fake device (`vireo_virtio::testing::FakeBlk`, a RAM
//! disk served in process): attach, the command set, device errors and lies, queue-full
//! waits, and what becomes of requests when the connection goes away.
//!
//! This file is compiled twice: as module `tests`, where the fake disk offers split
//! rings only, and as `tests_packed`, where it offers `VIRTIO_F_RING_PACKED` too and
//! the driver takes it (`packed_ring` auto): every test runs on both kinds of ring.

use std::time::{Duration, Instant};

use vireo_virtio::testing::{test_memory, FakeBlk};
use vireo_virtio::wire::blk::{S_IOERR, S_UNSUPP, T_DISCARD, T_FLUSH, T_IN, T_OUT, T_WRITE_ZEROES};

use super::*;
use crate::config::PackedRing;
use crate::io::{Completion, IoBuf, IoOp, IoRequest};
use crate::IoChannel;

const SECTORS: u64 = 1 << 16;

/// Whether this copy of the tests runs on packed rings.
fn packed() -> bool {
    module_path!().ends_with("tests_packed")
}

/// A fake disk (`FakeBlk::new`) that offers packed rings in the packed copy.
fn disk(sectors: u64, queues: u16, seg_max: u32) -> FakeBlk {
    let b = FakeBlk::new(sectors, queues, seg_max);
    if packed() {
        b.offer_packed_ring();
    }
    b
}

fn params(reconnect: Option<Duration>) -> BlkParams {
    BlkParams {
        name: "B".into(),
        vq_count: 1,
        vq_size: 16,
        reconnect_timeout: reconnect,
        packed_ring: Default::default(),
    }
}

fn attach_with(blk: &FakeBlk, p: &BlkParams) -> BlkController {
    let mem = test_memory(4 << 20);
    BlkController::attach(p, blk.dev.connect(&mem)).expect("attach")
}

/// A disk that answers every request as it is kicked, and its controller.
fn attached(reconnect: Option<Duration>) -> (FakeBlk, BlkController) {
    let blk = disk(SECTORS, 1, 8);
    blk.auto_serve(true);
    let c = attach_with(&blk, &params(reconnect));
    (blk, c)
}

fn wait_for(ch: &mut IoChannel, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while out.len() < n && Instant::now() < until {
        ch.poll(&mut out);
        std::thread::yield_now();
    }
    assert_eq!(out.len(), n, "completions within 10 s");
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn attach_reads_the_geometry_and_limits_from_the_config_space() {
    let (_blk, c) = attached(None);
    let i = c.bdev().info();
    assert_eq!(
        (i.name.as_str(), i.block_size, i.num_blocks),
        ("B", 512, SECTORS)
    );
    assert!(i.ops.unmap && i.ops.write_zeroes && i.ops.flush);
    assert!(i.volatile_write_cache, "FLUSH offered: a write cache");
    assert_eq!(i.limits.max_segments, 8);
    assert_eq!(i.queue_size, 16);
    assert_eq!(i.packed_ring, packed(), "auto: packed when offered");
}

#[test]
fn packed_ring_on_needs_the_device_to_offer_it_and_off_keeps_split_rings() {
    let blk = disk(SECTORS, 1, 8);
    blk.auto_serve(true);
    let mut p = params(None);
    p.packed_ring = PackedRing::On;
    let mem = test_memory(4 << 20);
    match BlkController::attach(&p, blk.dev.connect(&mem)) {
        Ok(c) => {
            assert!(
                packed(),
                "attached with packed_ring on to a split-only device"
            );
            assert!(c.bdev().info().packed_ring);
        }
        Err(e) => {
            assert!(!packed(), "{e}");
            let m = e.to_string();
            assert!(
                m.contains("packed_ring") && m.contains("RING_PACKED"),
                "{m}"
            );
        }
    }
    p.packed_ring = PackedRing::Off;
    let c = attach_with(&blk, &p);
    assert!(!c.bdev().info().packed_ring);
    assert_eq!(
        blk.dev.driver_features() & vireo_virtio::features::transport::RING_PACKED,
        0
    );
    let mut ch = c.bdev().open_channel().unwrap();
    ch.submit(IoRequest::write(3, 1, IoBuf::Heap(vec![7; 512]), 1))
        .unwrap();
    assert!(wait_for(&mut ch, 1)[0].result.is_ok());
}

#[test]
fn queue_sizes_follow_the_device_and_a_ring_too_small_for_a_request_is_refused() {
    let blk = disk(SECTORS, 1, 8);
    blk.auto_serve(true);
    // Not a power of two: the largest one below it.
    blk.dev.set_max_queue_size(12);
    let c = attach_with(&blk, &params(None));
    assert_eq!(c.bdev().info().queue_size, 8);
    drop(c);
    for max in [1, 2, 3] {
        blk.dev.set_max_queue_size(max);
        let mem = test_memory(4 << 20);
        let e = BlkController::attach(&params(None), blk.dev.connect(&mem))
            .err()
            .unwrap_or_else(|| panic!("attached with queues of {max}"))
            .to_string();
        assert!(e.contains(&format!("at most {max} entries")), "{e}");
    }
}

#[test]
fn write_zeroes_may_unmap_unless_the_request_keeps_the_blocks_allocated() {
    // The fake disk says write-zeroes may unmap (config byte 56).
    let (blk, c) = attached(None);
    let mut ch = c.bdev().open_channel().unwrap();
    let c1 = ch.run(IoRequest::no_data(IoOp::WriteZeroes, 0, 8, 1));
    assert!(c1.result.is_ok());
    let c2 = ch.run(IoRequest::no_data(IoOp::WriteZeroes, 8, 8, 2).with_no_unmap());
    assert!(c2.result.is_ok());
    assert_eq!(
        blk.write_zeroes_flags_seen(),
        vec![vireo_virtio::wire::blk::WRITE_ZEROES_FLAG_UNMAP, 0]
    );
}

#[test]
fn every_queue_means_at_most_256_of_them() {
    let blk = disk(SECTORS, 300, 8);
    blk.auto_serve(true);
    let mut p = params(None);
    p.vq_count = 0;
    let c = attach_with(&blk, &p);
    assert_eq!(c.bdev().info().num_queues, 256);
}

#[test]
fn the_serial_number_comes_from_get_id() {
    let blk = disk(SECTORS, 1, 8);
    blk.serial("vireo-serial-1");
    blk.auto_serve(true);
    let c = attach_with(&blk, &params(None));
    assert_eq!(c.bdev().info().serial.as_deref(), Some("vireo-serial-1"));
}

#[test]
fn a_write_reaches_the_disk_and_reads_back() {
    let (blk, c) = attached(None);
    let mut ch = c.bdev().open_channel().unwrap();
    let data = pattern(8192, 3);
    let mut b = c.bdev().alloc_buf(8192).unwrap();
    b.as_mut_slice().copy_from_slice(&data);
    let w = ch.run(IoRequest::write(100, 16, IoBuf::Dma(b), 1));
    assert!(w.result.is_ok(), "{:?}", w.result);
    assert_eq!(blk.read_disk(100, 8192), data);
    let r = ch.run(IoRequest::read(100, 16, IoBuf::Heap(vec![0; 8192]), 2));
    assert_eq!(r.buf.unwrap().as_slice(), &data[..]);
    let seen: Vec<u32> = blk.requests_seen().iter().map(|r| r.0).collect();
    assert_eq!(&seen[seen.len() - 2..], &[T_OUT, T_IN]);
}

#[test]
fn a_vectored_read_is_scattered_to_its_segments() {
    let (blk, c) = attached(None);
    let data = pattern(2048, 9);
    blk.write_disk(8, &data);
    let mut ch = c.bdev().open_channel().unwrap();
    let iov = vec![IoBuf::Heap(vec![0; 512]), IoBuf::Heap(vec![0; 1536])];
    let r = ch.run(IoRequest::readv(8, 4, iov, 1));
    assert!(r.result.is_ok());
    assert_eq!(r.iov[0].as_slice(), &data[..512]);
    assert_eq!(r.iov[1].as_slice(), &data[512..]);
}

#[test]
fn discard_and_write_zeroes_clear_the_disk() {
    let (blk, c) = attached(None);
    blk.write_disk(0, &[0xff; 4096]);
    let mut ch = c.bdev().open_channel().unwrap();
    assert!(ch
        .run(IoRequest::no_data(IoOp::Unmap, 0, 4, 1))
        .result
        .is_ok());
    assert!(ch
        .run(IoRequest::no_data(IoOp::WriteZeroes, 4, 4, 2))
        .result
        .is_ok());
    assert_eq!(blk.read_disk(0, 4096), vec![0; 4096]);
    let types: Vec<u32> = blk.requests_seen().iter().map(|r| r.0).collect();
    assert!(types.contains(&T_DISCARD) && types.contains(&T_WRITE_ZEROES));
}

#[test]
fn a_flush_is_sent_to_a_device_with_a_write_cache() {
    let (blk, c) = attached(None);
    let mut ch = c.bdev().open_channel().unwrap();
    assert!(ch
        .run(IoRequest::no_data(IoOp::Flush, 0, 0, 1))
        .result
        .is_ok());
    assert_eq!(blk.requests_seen().last().map(|r| r.0), Some(T_FLUSH));
}

#[test]
fn a_read_longer_than_the_segment_limit_is_split_into_requests_the_device_takes() {
    // SIZE_MAX 4 KiB and SEG_MAX 8: at most 32 KiB (64 blocks) per request.
    let blk = disk(SECTORS, 1, 8);
    blk.dev.set_features(FakeBlk::FEATURES | bf::SIZE_MAX);
    let mut config = blk.dev.config();
    config[8..12].copy_from_slice(&4096u32.to_le_bytes());
    blk.dev.set_config(config);
    blk.auto_serve(true);
    let c = attach_with(&blk, &params(None));
    assert_eq!(c.bdev().info().limits.max_rw_blocks, 64);
    let blocks = 64 * 2 + 3;
    let data = pattern(blocks as usize * 512, 5);
    blk.write_disk(0, &data);
    let mut ch = c.bdev().open_channel().unwrap();
    let before = blk.requests_seen().len();
    let r = ch.run(IoRequest::read(
        0,
        blocks,
        IoBuf::Heap(vec![0; data.len()]),
        1,
    ));
    assert!(r.result.is_ok(), "{:?}", r.result);
    assert_eq!(r.buf.unwrap().as_slice(), &data[..]);
    let reqs: Vec<(u64, u32)> = blk.requests_seen()[before..]
        .iter()
        .map(|r| (r.1, r.2))
        .collect();
    assert_eq!(reqs, vec![(0, 32768), (64, 32768), (128, 1536)]);
}

#[test]
fn device_status_errors_become_io_errors_and_the_controller_works_on() {
    let (blk, c) = attached(None);
    let mut ch = c.bdev().open_channel().unwrap();
    blk.fail_next(1, S_IOERR);
    let r = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1));
    assert!(matches!(r.result, Err(IoError::Device)), "{:?}", r.result);
    blk.fail_next(1, S_UNSUPP);
    let r = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2));
    assert!(
        matches!(r.result, Err(IoError::DeviceUnsupported)),
        "{:?}",
        r.result
    );
    let r = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 3));
    assert!(r.result.is_ok());
    assert!(c.failure().is_none());
}

#[test]
fn an_invalid_status_byte_fails_the_controller_for_good() {
    let (blk, c) = attached(None);
    let mut ch = c.bdev().open_channel().unwrap();
    blk.fail_next(1, 0x7f);
    let r = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1));
    assert!(
        matches!(r.result, Err(IoError::ControllerFailed(_))),
        "{:?}",
        r.result
    );
    assert!(c.failure().unwrap().contains("status byte"));
    let r = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2));
    assert!(
        matches!(r.result, Err(IoError::ControllerFailed(_))),
        "{:?}",
        r.result
    );
}

#[test]
fn a_used_id_that_was_never_offered_fails_the_controller() {
    let (blk, c) = attached(None);
    let mut ch = c.bdev().open_channel().unwrap();
    blk.hold(true);
    ch.submit(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .unwrap();
    ch.publish();
    blk.dev.push_used(0, 15, 1);
    let out = wait_for(&mut ch, 1);
    assert!(
        matches!(out[0].result, Err(IoError::ControllerFailed(_))),
        "{:?}",
        out[0].result
    );
    assert!(c.failure().is_some());
}

#[test]
fn a_full_ring_makes_requests_wait_and_all_complete() {
    let blk = disk(SECTORS, 1, 8);
    blk.auto_serve(true);
    let mut p = params(None);
    p.vq_size = 4;
    let c = attach_with(&blk, &p);
    blk.hold(true);
    let mut ch = c.bdev().open_channel().unwrap();
    for i in 0..12 {
        ch.submit(IoRequest::write(i, 1, IoBuf::Heap(vec![i as u8; 512]), i))
            .unwrap();
    }
    ch.publish();
    assert!(ch.stats().queue_full_waits > 0);
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while out.len() < 12 && Instant::now() < until {
        blk.release_held(0);
        ch.poll(&mut out);
        blk.serve(0);
    }
    assert_eq!(out.len(), 12);
    assert!(out.iter().all(|c| c.result.is_ok()));
    for i in 0..12u64 {
        assert_eq!(blk.read_disk(i, 512), vec![i as u8; 512]);
    }
}

#[test]
fn without_reconnection_a_lost_back_end_fails_in_flight_io_as_disconnected() {
    let (blk, c) = attached(None);
    let mut ch = c.bdev().open_channel().unwrap();
    blk.hold(true);
    ch.submit(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .unwrap();
    ch.publish();
    blk.dev.disconnect();
    let out = wait_for(&mut ch, 1);
    assert!(
        matches!(out[0].result, Err(IoError::Disconnected)),
        "{:?}",
        out[0].result
    );
    let r = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2));
    assert!(r.result.is_err(), "the queue stays failed");
}

#[test]
fn with_reconnection_requests_of_the_lost_connection_are_sent_again_in_order() {
    let (blk, c) = attached(Some(Duration::from_secs(10)));
    let mut ch = c.bdev().open_channel().unwrap();
    blk.hold(true);
    for i in 0..4u64 {
        ch.submit(IoRequest::write(
            10 + i,
            1,
            IoBuf::Heap(vec![0x40 + i as u8; 512]),
            i,
        ))
        .unwrap();
    }
    ch.publish();
    blk.serve(0);
    assert_eq!(blk.held(), 4);
    let seen_before = blk.requests_seen().len();
    // The back-end goes away holding all four; the held ones are never answered.
    blk.dev.disconnect();
    blk.hold(false);
    // A new request submitted during the outage waits behind the kept ones.
    ch.submit(IoRequest::write(20, 1, IoBuf::Heap(vec![0x55; 512]), 9))
        .unwrap();
    let out = wait_for(&mut ch, 5);
    assert!(
        out.iter().all(|c| c.result.is_ok()),
        "{:?}",
        out.iter().map(|c| &c.result).collect::<Vec<_>>()
    );
    let resent: Vec<u64> = blk.requests_seen()[seen_before..]
        .iter()
        .map(|r| r.1)
        .collect();
    assert_eq!(
        resent,
        vec![10, 11, 12, 13, 20],
        "kept requests first, in order, then the new one"
    );
    assert!(c.reconnects() >= 1);
    assert_eq!(blk.read_disk(20, 512), vec![0x55; 512]);
}

#[test]
fn a_back_end_that_does_not_come_back_within_the_window_fails_the_waiting_io() {
    let (blk, c) = attached(Some(Duration::from_millis(300)));
    let mut ch = c.bdev().open_channel().unwrap();
    blk.hold(true);
    ch.submit(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .unwrap();
    ch.publish();
    blk.dev.refuse_connections(true);
    blk.dev.disconnect();
    let out = wait_for(&mut ch, 1);
    assert!(
        matches!(out[0].result, Err(IoError::ReconnectFailed(_))),
        "{:?}",
        out[0].result
    );
    assert!(c.failure().is_some());
}

#[test]
fn a_forced_controller_reset_aborts_outstanding_requests_and_io_goes_on() {
    let (blk, c) = attached(Some(Duration::from_secs(10)));
    let mut ch = c.bdev().open_channel().unwrap();
    blk.hold(true);
    ch.submit(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .unwrap();
    ch.publish();
    blk.serve(0);
    c.bdev().reset_controller().unwrap();
    blk.hold(false);
    let out = wait_for(&mut ch, 1);
    assert!(
        matches!(out[0].result, Err(IoError::Aborted(_))),
        "{:?}",
        out[0].result
    );
    assert!(out[0].buf.is_none(), "the old back-end may still write it");
    let r = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2));
    assert!(r.result.is_ok(), "{:?}", r.result);
}

#[test]
fn a_controller_reset_needs_reconnection() {
    let (_blk, c) = attached(None);
    let e = c.bdev().reset_controller().unwrap_err();
    assert!(matches!(e, IoError::Unsupported { .. }), "{e:?}");
}

#[test]
fn a_capacity_change_on_reconnection_resizes_the_bdev() {
    let (blk, c) = attached(Some(Duration::from_secs(10)));
    let mut ch = c.bdev().open_channel().unwrap();
    blk.set_capacity(SECTORS * 2);
    blk.dev.disconnect();
    let until = Instant::now() + Duration::from_secs(10);
    while c.reconnects() == 0 && Instant::now() < until {
        let mut out = Vec::new();
        ch.poll(&mut out);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(c.bdev().num_blocks(), SECTORS * 2);
    let r = ch.run(IoRequest::read(
        SECTORS * 2 - 1,
        1,
        IoBuf::Heap(vec![0; 512]),
        1,
    ));
    assert!(r.result.is_ok(), "{:?}", r.result);
}

#[test]
fn a_closed_channel_gives_its_queue_back_for_the_next_one() {
    // The device must outlive the controller: `_blk`, not `_`.
    let (_blk, c) = attached(None);
    for i in 0..3 {
        let mut ch = c.bdev().open_channel().expect("a queue is free again");
        assert!(ch
            .run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), i))
            .result
            .is_ok());
    }
    let _one = c.bdev().open_channel().unwrap();
    assert!(
        c.bdev().open_channel().is_err(),
        "one queue: a second channel at once is refused"
    );
}

/// A disk offering `features` instead of the usual ones, answering as kicked.
fn attached_offering(features: u64) -> (FakeBlk, BlkController) {
    let blk = disk(SECTORS, 1, 8);
    blk.dev.set_features(features);
    blk.auto_serve(true);
    let c = attach_with(&blk, &params(None));
    (blk, c)
}

#[test]
fn a_read_only_device_refuses_writes_and_serves_reads() {
    let (_blk, c) = attached_offering(FakeBlk::FEATURES | bf::RO);
    assert!(c.bdev().info().read_only);
    let mut ch = c.bdev().open_channel().unwrap();
    let w = ch.run(IoRequest::write(0, 1, IoBuf::Heap(vec![1; 512]), 1));
    assert!(
        matches!(w.result, Err(IoError::ReadOnly(_))),
        "{:?}",
        w.result
    );
    assert!(ch
        .run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2))
        .result
        .is_ok());
}

#[test]
fn without_flush_the_device_is_write_through_and_flushes_send_nothing() {
    let (blk, c) = attached_offering(FakeBlk::FEATURES & !bf::FLUSH);
    assert!(!c.bdev().info().volatile_write_cache);
    let mut ch = c.bdev().open_channel().unwrap();
    let before = blk.requests_seen().len();
    assert!(ch
        .run(IoRequest::no_data(IoOp::Flush, 0, 0, 1))
        .result
        .is_ok());
    assert_eq!(blk.requests_seen().len(), before);
}

#[test]
fn without_discard_unmap_is_refused_before_the_device() {
    let (blk, c) = attached_offering(FakeBlk::FEATURES & !bf::DISCARD);
    assert!(!c.bdev().info().ops.unmap);
    let mut ch = c.bdev().open_channel().unwrap();
    let before = blk.requests_seen().len();
    let r = ch.run(IoRequest::no_data(IoOp::Unmap, 0, 8, 1));
    assert!(
        matches!(r.result, Err(IoError::Unsupported { op: "unmap", .. })),
        "{:?}",
        r.result
    );
    assert_eq!(blk.requests_seen().len(), before);
}

#[test]
fn a_device_without_get_id_has_no_serial() {
    let blk = disk(SECTORS, 1, 8);
    blk.fail_next(1, S_UNSUPP);
    blk.auto_serve(true);
    let c = attach_with(&blk, &params(None));
    assert_eq!(c.bdev().info().serial, None);
}

#[test]
fn each_channel_gets_its_own_queue_of_a_multi_queue_device() {
    let blk = disk(SECTORS, 2, 8);
    blk.auto_serve(true);
    let mut p = params(None);
    p.vq_count = 2;
    let c = attach_with(&blk, &p);
    assert_eq!(c.bdev().info().num_queues, 2);
    let mut a = c.bdev().open_channel().unwrap();
    let mut b = c.bdev().open_channel().unwrap();
    let (ka, kb) = (blk.dev.kicks(0), blk.dev.kicks(1));
    assert!(a
        .run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .result
        .is_ok());
    assert!(b
        .run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2))
        .result
        .is_ok());
    assert_eq!(
        (blk.dev.kicks(0) - ka, blk.dev.kicks(1) - kb),
        (1, 1),
        "one request on each queue"
    );
}

#[test]
fn a_request_the_device_keeps_times_out_and_its_late_answer_is_absorbed() {
    let (blk, c) = attached(None);
    let mut ch = c.bdev().open_channel().unwrap();
    blk.hold(true);
    let limit = Duration::from_millis(20);
    ch.submit(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1).with_timeout(limit))
        .unwrap();
    let out = wait_for(&mut ch, 1);
    assert!(
        matches!(out[0].result, Err(IoError::Timeout(_))),
        "{:?}",
        out[0].result
    );
    blk.hold(false);
    blk.release_held(0);
    let r = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2));
    assert_eq!(r.user_data, 2);
    assert!(r.result.is_ok());
    assert_eq!(ch.in_flight(), 0);
}

#[test]
fn a_silent_device_is_escalated_to_a_controller_reset_and_io_goes_on() {
    let (blk, c) = attached(Some(Duration::from_secs(10)));
    let mut ch = c.bdev().open_channel().unwrap();
    blk.hold(true);
    let limit = Duration::from_millis(20);
    ch.submit(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1).with_timeout(limit))
        .unwrap();
    let out = wait_for(&mut ch, 1);
    assert!(matches!(out[0].result, Err(IoError::Timeout(_))));
    // virtio-blk has neither ABORT TASK nor a LUN reset: the next step is the
    // controller, a reconnection vireo forces.
    let until = Instant::now() + Duration::from_secs(10);
    while c.reconnects() == 0 && Instant::now() < until {
        let mut out = Vec::new();
        ch.poll(&mut out);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(c.reconnects(), 1);
    assert_eq!(blk.dev.aborts(), 1, "vireo dropped the connection itself");
    // The queue looks at its connection's flag every few hundred idle polls; until it
    // has taken its new ring, a request would go to the old one and fail as aborted
    // with it (the old back-end may still be alive).
    for _ in 0..2048 {
        let mut out = Vec::new();
        ch.poll(&mut out);
        assert!(
            out.is_empty(),
            "the timed-out request completed once already"
        );
    }
    blk.hold(false);
    let r = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2));
    assert!(r.result.is_ok(), "{:?}", r.result);
    assert_eq!(ch.in_flight(), 0);
}

/// Caller memory as the C API gets it: a file of `len` bytes mapped shared.
fn caller_memory(len: usize) -> (std::fs::File, *mut u8) {
    use std::os::fd::AsRawFd;
    let f = tempfile::tempfile().unwrap();
    f.set_len(len as u64).unwrap();
    // SAFETY: a fresh shared mapping of the whole file at an address the kernel picks;
    // no existing memory is affected. The test never unmaps it (the process ends).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    (f, p.cast())
}

/// The C API's path: a channel on a queue of its own moves to another thread, and
/// caller memory shared with the device (`add_external`) is used in place, while a
/// caller buffer outside it is bounced.
#[test]
fn a_movable_channel_moves_threads_and_uses_shared_caller_memory_in_place() {
    use std::os::fd::AsFd;
    use std::ptr::NonNull;
    use std::sync::{Arc, Mutex};
    use vireo_virtio::ForeignBuf;

    let blk = disk(SECTORS, 1, 8);
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let log = seen.clone();
    blk.on_kick(move |b, q| {
        for r in b.dev.take_requests(q) {
            // The data segment: after the header (write) or before the status (read).
            let data = if r.readable.len() > 1 {
                r.readable[1].0
            } else {
                r.writable[0].0
            };
            log.lock().unwrap().push(data);
            let w = b.execute(&r);
            b.dev.complete(q, &r, w);
        }
    });
    let c = attach_with(&blk, &params(None));
    let bdev = c.bdev().clone();
    let (file, base) = caller_memory(1 << 20);
    bdev.memory()
        .add_external(base as u64, 1 << 20, Some(file.as_fd()), 0)
        .unwrap();
    let ch = bdev.open_movable_channel().unwrap();
    seen.lock().unwrap().clear(); // the attach's own requests
    let data = pattern(4096, 7);
    let base_addr = base as usize;
    let worker = std::thread::spawn(move || {
        let mut ch = ch;
        let base = base_addr as *mut u8;
        // SAFETY: 8 KiB into the 1 MiB mapping; nothing else touches it during the I/O.
        let at = unsafe { base.add(8192) };
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), at, 4096) };
        // SAFETY: `at` is valid for 4096 bytes, ours until the completion returns it.
        let buf = unsafe { ForeignBuf::new(NonNull::new(at).unwrap(), 4096) };
        ch.submit(IoRequest::write(16, 8, IoBuf::Foreign(buf), 1))
            .unwrap();
        let done = wait_for(&mut ch, 1);
        assert!(done[0].result.is_ok(), "{:?}", done[0].result);
        // A read into caller memory outside any shared region: bounced.
        let mut outside = vec![0u8; 4096];
        // SAFETY: `outside` lives until after the completion below.
        let buf = unsafe { ForeignBuf::new(NonNull::new(outside.as_mut_ptr()).unwrap(), 4096) };
        ch.submit(IoRequest::read(16, 8, IoBuf::Foreign(buf), 2))
            .unwrap();
        let done = wait_for(&mut ch, 1);
        assert!(done[0].result.is_ok());
        (ch, outside, data)
    });
    let (ch, outside, data) = worker.join().unwrap();
    assert_eq!(blk.read_disk(16, 4096), data);
    assert_eq!(
        outside, data,
        "the bounced read came back into the caller's buffer"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0],
        base as u64 + 8192,
        "the write's data was used in place"
    );
    assert!(
        !(base as u64..base as u64 + (1 << 20)).contains(&seen[1]),
        "the read of unshared memory went through a bounce buffer"
    );
    drop(ch);
    assert!(bdev.memory().remove_external(base as u64, 1 << 20));
}

/// A vectored I/O whose segments lie in memory the device reaches goes to the device
/// as those segments (no bounce), split at max_rw_blocks with each request taking its
/// byte range of them; one with more pieces than seg_max, or a heap segment, is bounced.
#[test]
fn vectored_io_in_shared_memory_goes_to_the_device_in_place() {
    use std::os::fd::AsFd;
    use std::ptr::NonNull;
    use std::sync::{Arc, Mutex};
    use vireo_virtio::ForeignBuf;

    // seg_max 8: 8 data segments per request (max_rw_blocks follows from it).
    let blk = disk(SECTORS, 1, 8);
    type Log = Arc<Mutex<Vec<Vec<(u64, u32)>>>>;
    let seen: Log = Arc::default();
    let log = seen.clone();
    blk.on_kick(move |b, q| {
        for r in b.dev.take_requests(q) {
            // Data segments: a write's readable after the header, a read's writable
            // before the status.
            let data: Vec<(u64, u32)> = if r.readable.len() > 1 {
                r.readable[1..].to_vec()
            } else {
                r.writable[..r.writable.len() - 1].to_vec()
            };
            log.lock().unwrap().push(data);
            let w = b.execute(&r);
            b.dev.complete(q, &r, w);
        }
    });
    let c = attach_with(&blk, &params(None));
    let bdev = c.bdev().clone();
    let (file, base) = caller_memory(1 << 20);
    let base = base as u64;
    bdev.memory()
        .add_external(base, 1 << 20, Some(file.as_fd()), 0)
        .unwrap();
    let mut ch = bdev.open_channel().unwrap();
    seen.lock().unwrap().clear();
    let data = pattern(6144, 3);
    let at = |off: u64, len: usize| {
        let p = (base + off) as *mut u8;
        // SAFETY: inside the 1 MiB mapping; each test segment is used by one I/O at a time.
        unsafe { ForeignBuf::new(NonNull::new(p).unwrap(), len) }
    };
    // Three segments of 1024, 512 and 4608 bytes (6 KiB, 12 sectors) at odd places.
    let segs = [(0x1000u64, 1024usize), (0x8200, 512), (0x20000, 4608)];
    let mut off = 0;
    for &(o, l) in &segs {
        // SAFETY: as above.
        let dst = unsafe { std::slice::from_raw_parts_mut((base + o) as *mut u8, l) };
        dst.copy_from_slice(&data[off..off + l]);
        off += l;
    }
    let iov = segs
        .iter()
        .map(|&(o, l)| IoBuf::Foreign(at(o, l)))
        .collect();
    ch.submit(IoRequest::writev(40, 12, iov, 1)).unwrap();
    assert!(wait_for(&mut ch, 1)[0].result.is_ok());
    assert_eq!(blk.read_disk(40, 6144), data, "the data reached the disk");
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one request: {got:?}");
    assert_eq!(
        got[0],
        vec![
            (base + 0x1000, 1024),
            (base + 0x8200, 512),
            (base + 0x20000, 4608)
        ],
        "the caller's segments, in place"
    );
    // Read it back in place into other segments.
    seen.lock().unwrap().clear();
    let back = [(0x40000u64, 2048usize), (0x50000, 4096)];
    let iov = back
        .iter()
        .map(|&(o, l)| IoBuf::Foreign(at(o, l)))
        .collect();
    ch.submit(IoRequest::readv(40, 12, iov, 2)).unwrap();
    assert!(wait_for(&mut ch, 1)[0].result.is_ok());
    let mut read = Vec::new();
    for &(o, l) in &back {
        // SAFETY: as above.
        read.extend_from_slice(unsafe { std::slice::from_raw_parts((base + o) as *const u8, l) });
    }
    assert_eq!(read, data);
    assert_eq!(
        seen.lock().unwrap()[0],
        vec![(base + 0x40000, 2048), (base + 0x50000, 4096)]
    );
    // Nine segments: more than seg_max, bounced into one extent outside the region.
    seen.lock().unwrap().clear();
    let iov = (0..9)
        .map(|i| IoBuf::Foreign(at(0x60000 + i * 0x1000, 512)))
        .collect();
    ch.submit(IoRequest::writev(0, 9, iov, 3)).unwrap();
    assert!(wait_for(&mut ch, 1)[0].result.is_ok());
    let got = seen.lock().unwrap().clone();
    assert!(
        got.iter()
            .flatten()
            .all(|&(a, _)| !(base..base + (1 << 20)).contains(&a)),
        "bounced: {got:?}"
    );
    // A heap segment among them: bounced too.
    seen.lock().unwrap().clear();
    let iov = vec![IoBuf::Foreign(at(0x70000, 512)), IoBuf::Heap(vec![7; 512])];
    ch.submit(IoRequest::writev(0, 2, iov, 4)).unwrap();
    assert!(wait_for(&mut ch, 1)[0].result.is_ok());
    assert_eq!(blk.read_disk(1, 512), vec![7; 512]);
    let got = seen.lock().unwrap().clone();
    assert!(got
        .iter()
        .flatten()
        .all(|&(a, _)| !(base..base + (1 << 20)).contains(&a)));
}

/// A controller dropped while its reconnection thread is trying (the back-end gone and
/// refusing) takes the thread with it: nothing connects afterwards, and the drop
/// returns (the thread was joined, so the transport's own shutdown can run).
#[test]
fn dropping_a_controller_ends_its_reconnection_thread() {
    let (blk, c) = attached(Some(Duration::from_secs(60)));
    blk.dev.refuse_connections(true);
    blk.dev.disconnect();
    // The thread is trying: connection attempts are refused and counted.
    let before = blk.dev.reconnect_attempts();
    let until = Instant::now() + Duration::from_secs(10);
    while blk.dev.reconnect_attempts() == before && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        blk.dev.reconnect_attempts() > before,
        "the reconnection thread tried"
    );
    drop(c);
    let after = blk.dev.reconnect_attempts();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        blk.dev.reconnect_attempts(),
        after,
        "no attempt after the drop"
    );
}
