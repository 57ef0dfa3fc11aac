//! vireo against the in-tree vhost-user-blk target: limits and faults that real targets
//! cannot produce on demand.

mod common;

use std::time::Duration;

use common::*;
use vireo_bdev::{IoBuf, IoError, IoOp, IoRequest};
use vireo_target::{spawn_blk_target, Backing, BlkTargetConfig, TargetHandle};

fn target(cfg: BlkTargetConfig) -> (TargetHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let t = spawn_blk_target(&dir.path().join("blk.sock"), cfg).unwrap();
    (t, dir)
}

fn ram(size: u64) -> BlkTargetConfig {
    BlkTargetConfig {
        backend: Backing::Ram { size_bytes: size },
        ..Default::default()
    }
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ salt)
        .collect()
}

#[test]
fn io_is_split_to_tiny_seg_max_size_max_and_discard_limits() {
    let (t, _d) = target(BlkTargetConfig {
        seg_max: 3,
        size_max: 4096,
        max_discard_sectors: 64,
        max_discard_seg: 2,
        max_write_zeroes_sectors: 32,
        max_write_zeroes_seg: 1,
        ..ram(64 << 20)
    });
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let l = b.info().limits;
    assert_eq!(l.max_segments, 3);
    assert_eq!(l.max_segment_bytes, 4096);
    assert_eq!(l.max_rw_blocks, 3 * 4096 / 512);
    assert_eq!(l.max_unmap_blocks, 128);
    assert_eq!(l.max_write_zeroes_blocks, 32);
    let mut ch = b.open_channel().unwrap();
    // 1 MiB + 1 block, misaligned start: many device requests, one completion.
    let len = (1 << 20) + 512;
    let data = pattern(len, 1);
    ch.run(IoRequest::write(
        7,
        (len / 512) as u64,
        IoBuf::Heap(data.clone()),
        1,
    ))
    .result
    .unwrap();
    let c = ch.run(IoRequest::read(
        7,
        (len / 512) as u64,
        IoBuf::Heap(vec![0; len]),
        2,
    ));
    c.result.unwrap();
    assert!(c.buf.unwrap().as_slice() == &data[..]);
    ch.run(IoRequest::no_data(IoOp::Unmap, 100, 1000, 3))
        .result
        .unwrap();
    ch.run(IoRequest::no_data(IoOp::WriteZeroes, 5000, 100, 4))
        .result
        .unwrap();
    let s = t.stats();
    assert_eq!(s.oversize_rejected, 0, "{s:?}");
    assert_eq!(s.discard_limit_rejected, 0, "{s:?}");
    assert_eq!(s.write_zeroes_limit_rejected, 0, "{s:?}");
    assert!(s.max_segments <= 3 && s.max_segment_bytes <= 4096, "{s:?}");
    assert_eq!(s.io_errors, 0, "{s:?}");
    assert!(s.writes >= ((len / 12288) as u64), "{s:?}");
    assert_eq!(s.discards, 1000u64.div_ceil(128), "{s:?}");
    assert_eq!(s.write_zeroes, 100u64.div_ceil(32), "{s:?}");
    // The unmapped and zeroed ranges read as zeroes.
    let c = ch.run(IoRequest::read(5000, 100, IoBuf::Heap(vec![1; 51200]), 5));
    assert!(c.buf.unwrap().as_slice().iter().all(|&x| x == 0));
}

#[test]
fn polling_suppresses_interrupts() {
    let (t, _d) = target(ram(64 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    let mut done = Vec::new();
    for i in 0..32u64 {
        ch.submit(IoRequest::read(
            i * 8,
            8,
            IoBuf::Dma(b.alloc_buf(4096).unwrap()),
            i,
        ))
        .unwrap();
    }
    let mut n = 0;
    while n < 5000 {
        ch.poll(&mut done);
        for c in done.drain(..) {
            c.result.unwrap();
            n += 1;
            let ud = c.user_data;
            ch.submit(IoRequest::read((ud * 8) % 1000, 8, c.buf.unwrap(), ud))
                .unwrap();
        }
    }
    drop(ch);
    let s = t.stats();
    assert!(s.reads >= 5000);
    // At most the odd first notification; never one per request.
    assert!(
        s.interrupts <= 2,
        "device interrupted {} times for {} reads",
        s.interrupts,
        s.reads
    );
    assert!(
        s.kicks < s.reads,
        "kicks are batched: {} kicks for {} reads",
        s.kicks,
        s.reads
    );
}

#[test]
fn device_errors_fail_only_their_io() {
    let (t, _d) = target(ram(16 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    t.faults().fail_next(2);
    let mut errs = 0;
    for i in 0..6u64 {
        let c = ch.run(IoRequest::read(i, 1, IoBuf::Heap(vec![0; 512]), i));
        if let Err(e) = c.result {
            assert_eq!(e, IoError::Device);
            errs += 1;
        }
    }
    assert_eq!(errs, 2);
    assert!(
        reg.controllers()[0].1.is_none(),
        "IOERR does not fail the controller"
    );
}

#[test]
fn reordered_and_delayed_completions_are_matched_correctly() {
    let (t, _d) = target(ram(16 << 20));
    t.faults().set_reorder_window(8);
    t.faults().set_completion_delay(Duration::from_micros(200));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    let mut done = Vec::new();
    for i in 0..64u64 {
        let mut buf = b.alloc_buf(512).unwrap();
        buf.as_mut_slice().copy_from_slice(&pattern(512, i as u8));
        ch.submit(IoRequest::write(i, 1, IoBuf::Dma(buf), i))
            .unwrap();
    }
    while done.len() < 64 {
        ch.poll(&mut done);
    }
    assert!(done.iter().all(|c| c.result.is_ok()));
    let order: Vec<u64> = done.iter().map(|c| c.user_data).collect();
    assert_ne!(
        order,
        (0..64).collect::<Vec<_>>(),
        "completions came out of order"
    );
    t.faults().clear();
    for i in 0..64u64 {
        let c = ch.run(IoRequest::read(i, 1, IoBuf::Heap(vec![0; 512]), 100 + i));
        assert_eq!(c.buf.unwrap().as_slice(), &pattern(512, i as u8)[..]);
    }
}

/// A used length beyond the request's writable bytes is the device's mistake about
/// what it wrote (QEMU's virtio-scsi counts data-out bytes in it): the length is
/// clamped and the I/O, whose status the device did write, completes.
#[test]
fn a_used_length_beyond_the_buffers_is_clamped_not_fatal() {
    let (t, _d) = target(ram(16 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    let w = ch.run(IoRequest::write(0, 1, IoBuf::Heap(pattern(512, 7)), 1));
    w.result.unwrap();
    t.faults().lie_used_len_next(2);
    let c = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 2));
    c.result.unwrap();
    assert_eq!(c.buf.unwrap().as_slice(), &pattern(512, 7)[..]);
    let c = ch.run(IoRequest::write(1, 1, IoBuf::Heap(pattern(512, 8)), 3));
    c.result.unwrap();
    assert!(
        reg.controllers()[0].1.is_none(),
        "the controller stays healthy"
    );
    let c = ch.run(IoRequest::read(1, 1, IoBuf::Heap(vec![0; 512]), 4));
    assert_eq!(c.buf.unwrap().as_slice(), &pattern(512, 8)[..]);
}

#[test]
fn bad_used_id_fails_the_controller() {
    let (t, _d) = target(ram(16 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    t.faults().bad_used_id_next(1);
    let b2 = b.clone();
    let c = within(20, "bad used id", move || {
        let mut ch = b2.open_channel().unwrap();
        ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
    });
    assert!(
        matches!(c.result, Err(IoError::ControllerFailed(_))),
        "{:?}",
        c.result
    );
    let why = reg.controllers()[0].1.clone().unwrap();
    assert!(why.contains("used id"), "{why}");
}

#[test]
fn disconnect_mid_run_fails_in_flight_io_and_reattach_works() {
    let (t, _d) = target(ram(16 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    t.faults().disconnect_after(100);
    let b2 = b.clone();
    let (ok, errs) = within(30, "I/O across a disconnect", move || {
        let mut ch = b2.open_channel().unwrap();
        let mut done = Vec::new();
        for i in 0..16u64 {
            ch.submit(IoRequest::read(
                i,
                1,
                IoBuf::Dma(b2.alloc_buf(512).unwrap()),
                i,
            ))
            .unwrap();
        }
        let (mut ok, mut errs) = (0, 0);
        while ch.in_flight() > 0 {
            ch.poll(&mut done);
            for c in done.drain(..) {
                match c.result {
                    Ok(()) => {
                        ok += 1;
                        let ud = c.user_data;
                        ch.submit(IoRequest::read(ud, 1, c.buf.unwrap(), ud))
                            .unwrap();
                    }
                    Err(e) => {
                        assert_eq!(e, IoError::Disconnected);
                        errs += 1;
                    }
                }
            }
        }
        (ok, errs)
    });
    assert!(ok >= 90, "{ok} completed before the disconnect");
    assert!(errs >= 1, "in-flight I/O failed");
    // The target serves the next connection: detach and attach again.
    reg.detach("VirtioBlk0").unwrap();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .result
        .unwrap();
}

#[test]
fn queue_full_waits_instead_of_failing() {
    let (t, _d) = target(ram(64 << 20));
    t.faults().set_completion_delay(Duration::from_micros(50));
    let reg = registry();
    let mut p = blk_params("VirtioBlk0", t.socket_path(), 1);
    p.vq_size = 8;
    let b = reg.attach(&p).unwrap().pop().unwrap();
    let mut ch = b.open_channel().unwrap();
    // 200 I/Os submitted at once into an 8-slot ring.
    for i in 0..200u64 {
        ch.submit(IoRequest::write(
            i * 8,
            8,
            IoBuf::Heap(pattern(4096, i as u8)),
            i,
        ))
        .unwrap();
    }
    let mut done = Vec::new();
    while done.len() < 200 {
        ch.poll(&mut done);
    }
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert!(ch.stats().queue_full_waits > 0, "{:?}", ch.stats());
    for i in (0..200u64).step_by(37) {
        let c = ch.run(IoRequest::read(
            i * 8,
            8,
            IoBuf::Heap(vec![0; 4096]),
            1000 + i,
        ));
        assert_eq!(c.buf.unwrap().as_slice(), &pattern(4096, i as u8)[..]);
    }
}

#[test]
fn dma_memory_grows_through_add_mem_reg() {
    let (t, _d) = target(ram(256 << 20));
    let reg = registry(); // 4 MiB first region (the default)
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    // 64 MiB does not fit the first region: a new region is shared with the target.
    let len = 64 << 20;
    let mut buf = b.alloc_buf(len).unwrap();
    assert!(reg.memory().regions().len() >= 2);
    buf.as_mut_slice().copy_from_slice(&pattern(len, 9));
    ch.run(IoRequest::write(0, (len / 512) as u64, IoBuf::Dma(buf), 1))
        .result
        .unwrap();
    let c = ch.run(IoRequest::read(
        0,
        (len / 512) as u64,
        IoBuf::Dma(b.alloc_buf(len).unwrap()),
        2,
    ));
    c.result.unwrap();
    assert!(c.buf.unwrap().as_slice() == &pattern(len, 9)[..]);
}

#[test]
fn a_refused_queue_size_is_halved_until_the_back_end_accepts_it() {
    let (t, _d) = target(BlkTargetConfig {
        queue_size: 128,
        ..ram(16 << 20)
    });
    let reg = registry();
    let mut p = blk_params("VirtioBlk0", t.socket_path(), 1);
    p.vq_size = 1024;
    let b = reg.attach(&p).unwrap().pop().unwrap();
    assert_eq!(b.info().queue_size, 128);
    let mut ch = b.open_channel().unwrap();
    ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 1))
        .result
        .unwrap();
    // The registry (and so save_config) records what works.
    assert_eq!(reg.controllers()[0].0.vq_size, 128);
}

#[test]
fn run_keeps_other_completions_for_the_next_poll() {
    let (t, _d) = target(ram(16 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    for i in 0..8u64 {
        ch.submit(IoRequest::read(i, 1, IoBuf::Heap(vec![0; 512]), i))
            .unwrap();
    }
    let c = ch.run(IoRequest::read(100, 1, IoBuf::Heap(vec![0; 512]), 100));
    assert_eq!(c.user_data, 100);
    c.result.unwrap();
    let mut done = Vec::new();
    while done.len() < 8 {
        ch.poll(&mut done);
    }
    let mut ids: Vec<u64> = done.iter().map(|c| c.user_data).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..8).collect::<Vec<_>>());
}

#[test]
fn flush_reaches_only_a_device_with_a_write_cache() {
    // Without VIRTIO_BLK_F_FLUSH the device is write-through: a flush completes at once
    // and no request reaches it.
    let (t, _d) = target(BlkTargetConfig {
        flush: false,
        ..ram(8 << 20)
    });
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    assert!(b.info().ops.flush && !b.info().volatile_write_cache);
    let mut ch = b.open_channel().unwrap();
    for i in 0..3 {
        let c = ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, i));
        assert_eq!(c.result, Ok(()));
    }
    assert_eq!(t.stats().flushes, 0);
    assert_eq!(ch.stats().num_flush_ops, 3);
    // Completed at once, but counted in flight until poll hands it out.
    ch.submit(IoRequest::no_data(IoOp::Flush, 0, 0, 7)).unwrap();
    assert_eq!(ch.in_flight(), 1);
    let mut out = Vec::new();
    assert_eq!(ch.poll(&mut out), 1);
    assert_eq!((out[0].user_data, out[0].op), (7, IoOp::Flush));
    assert_eq!(ch.in_flight(), 0);
    // run() returns its own flush even when another completion with the same
    // user_data waits in the channel.
    ch.submit(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 9))
        .unwrap();
    while ch
        .run(IoRequest::read(8, 1, IoBuf::Heap(vec![0; 512]), 1))
        .user_data
        == 1
    {
        if ch.in_flight() == 1 {
            break; // the first read is done and waits for poll
        }
    }
    let c = ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, 9));
    assert_eq!((c.user_data, c.op), (9, IoOp::Flush));
    let mut out = Vec::new();
    while ch.in_flight() > 0 {
        ch.poll(&mut out);
    }
    assert_eq!((out[0].user_data, out[0].op), (9, IoOp::Read));
    // With it, every flush is a device request.
    let (t, _d) = target(ram(8 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    assert!(b.info().volatile_write_cache);
    let mut ch = b.open_channel().unwrap();
    let c = ch.run(IoRequest::no_data(IoOp::Flush, 0, 0, 1));
    assert_eq!(c.result, Ok(()));
    assert_eq!(t.stats().flushes, 1);
}

#[test]
fn concurrent_attaches_of_one_name_fail_at_once() {
    // The name is taken before connecting: the losers do not queue on the back-end
    // (which serves one front-end at a time) and time out, they fail right away.
    let (t, _d) = target(ram(8 << 20));
    let reg = std::sync::Arc::new(registry());
    let start = std::time::Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let reg = reg.clone();
            let sock = t.socket_path().to_path_buf();
            std::thread::spawn(move || reg.attach(&blk_params("Same", &sock, 1)))
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(r.to_string().contains("Same"), "{r}");
        assert!(
            matches!(
                r,
                vireo_bdev::BdevError::NameTaken(_) | vireo_bdev::BdevError::Attaching(_)
            ),
            "{r}"
        );
        assert_eq!(r.kind(), vireo_bdev::ErrorKind::AlreadyExists, "{r}");
    }
}

#[test]
fn a_wrong_dev_type_is_named_in_the_error() {
    let (t, _d) = target(ram(8 << 20));
    let e = registry()
        .attach(&scsi_params("X", t.socket_path(), 1, 128))
        .unwrap_err()
        .to_string();
    assert!(e.contains(r#"set "dev_type": "blk""#), "{e}");
}

/// Nanoseconds this thread ran on a CPU (/proc/thread-self/schedstat).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Wait mode: with completions 4 ms apart, a sleeping waiter gets every completion
/// (signalled through the call eventfd, interrupts enabled only while it sleeps) and
/// spends a fraction of the wall time on a CPU; a polling waiter spins the whole time.
#[test]
fn wait_mode_sleeps_on_the_completion_eventfd() {
    use vireo_bdev::{Armed, WaitMode};
    let (t, _d) = target(ram(16 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    ch.run(IoRequest::write(0, 8, IoBuf::Heap(pattern(4096, 3)), 1))
        .result
        .unwrap();
    t.faults()
        .set_completion_delay(std::time::Duration::from_millis(4));
    let mut measure = |mode: WaitMode| {
        let wall = std::time::Instant::now();
        let cpu = thread_cpu_ns();
        let mut out = Vec::new();
        for i in 0..25u64 {
            ch.submit(IoRequest::read(0, 8, IoBuf::Heap(vec![0; 4096]), 100 + i))
                .unwrap();
            let n = ch.wait(&mut out, 1, std::time::Duration::from_secs(5), mode);
            assert_eq!(n, 1, "{mode:?}: one completion per wait");
        }
        for c in out.drain(..) {
            c.result.unwrap();
            assert_eq!(c.buf.unwrap().as_slice(), &pattern(4096, 3)[..]);
        }
        (thread_cpu_ns() - cpu) as f64 / wall.elapsed().as_nanos() as f64
    };
    let sleeping = measure(WaitMode::Sleep);
    let hybrid = measure(WaitMode::Hybrid(std::time::Duration::from_micros(20)));
    let polling = measure(WaitMode::Poll);
    assert!(
        sleeping < 0.5 && hybrid < 0.5,
        "a sleeping waiter must not spin: CPU/wall sleep {sleeping:.2} hybrid {hybrid:.2} (poll {polling:.2})"
    );
    // The fd for a caller's own event loop.
    ch.submit(IoRequest::read(0, 8, IoBuf::Heap(vec![0; 4096]), 7))
        .unwrap();
    let fd = match ch.arm() {
        Armed::Fd(fd) => fd,
        Armed::Ready => panic!("nothing can be ready 4 ms early"),
        Armed::NoFd => panic!("vhost-user has a completion eventfd"),
    };
    assert!(vireo_virtio::wait_readable(
        &[fd],
        std::time::Duration::from_secs(5)
    ));
    let mut out = Vec::new();
    assert_eq!(ch.poll(&mut out), 1);
    assert_eq!(ch.arm(), Armed::NoFd, "nothing in flight");
}

/// Per-I/O time limit: an I/O the device holds past it completes with a timeout error
/// and no buffer (the device may still write it); when the device gives the request
/// back later the channel frees it quietly, and I/O goes on.
#[test]
fn a_timed_out_io_fails_without_its_buffer_and_the_channel_recovers() {
    use std::time::{Duration, Instant};
    let (t, _d) = target(ram(16 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    ch.run(IoRequest::write(0, 1, IoBuf::Heap(pattern(512, 9)), 1))
        .result
        .unwrap();
    t.faults().set_completion_delay(Duration::from_millis(700));
    let start = Instant::now();
    let c = ch.run(
        IoRequest::read(0, 1, IoBuf::Dma(b.alloc_buf(512).unwrap()), 2)
            .with_timeout(Duration::from_millis(100)),
    );
    let took = start.elapsed();
    assert!(
        matches!(c.result, Err(IoError::Timeout(_))),
        "{:?}",
        c.result
    );
    assert!(
        c.buf.is_none(),
        "a buffer used in place stays with the device"
    );
    assert!(
        took < Duration::from_millis(650),
        "completed at the limit, took {took:?}"
    );
    assert_eq!(ch.in_flight(), 0, "the caller has nothing in flight");
    // Without a limit, the next I/O waits for the slow device and succeeds; meanwhile
    // the timed-out request comes back and is freed.
    let c = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 3));
    c.result.unwrap();
    assert_eq!(c.buf.unwrap().as_slice(), &pattern(512, 9)[..]);
    t.faults().clear();
    // The controller's io_timeout applies to I/O that names none.
    b.set_default_timeout(Some(Duration::from_millis(100)));
    t.faults().set_completion_delay(Duration::from_millis(400));
    let c = ch.run(IoRequest::read(0, 1, IoBuf::Heap(vec![0; 512]), 4));
    assert!(
        matches!(c.result, Err(IoError::Timeout(_))),
        "{:?}",
        c.result
    );
    assert!(
        c.buf.is_some(),
        "a bounced buffer comes back: the device has the bounce"
    );
    t.faults().clear();
    b.set_default_timeout(None);
    let stats = ch.stats();
    drop(ch);
    assert!(
        stats.io_errors >= 2,
        "timeouts are counted as errors: {stats:?}"
    );
}

/// Vectored I/O: segments of any length gathered for a write and scattered for a read,
/// mixing heap and DMA segments; lengths that do not add up are refused.
#[test]
fn vectored_reads_and_writes_scatter_and_gather() {
    let (t, _d) = target(ram(16 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    let data = pattern(1536, 5);
    let mut dma = b.alloc_buf(412).unwrap();
    dma.as_mut_slice().copy_from_slice(&data[100..512]);
    let iov = vec![
        IoBuf::Heap(data[..100].to_vec()),
        IoBuf::Dma(dma),
        IoBuf::Heap(data[512..].to_vec()),
    ];
    let c = ch.run(IoRequest::writev(10, 3, iov, 1));
    c.result.unwrap();
    assert_eq!(c.iov.len(), 3, "the segments come back");
    let c = ch.run(IoRequest::readv(
        10,
        3,
        vec![
            IoBuf::Heap(vec![0; 700]),
            IoBuf::Dma(b.alloc_buf(836).unwrap()),
        ],
        2,
    ));
    c.result.unwrap();
    let mut back = c.iov[0].as_slice().to_vec();
    back.extend_from_slice(c.iov[1].as_slice());
    assert_eq!(back, data);
    // The plain read sees the same blocks.
    let c = ch.run(IoRequest::read(10, 3, IoBuf::Heap(vec![0; 1536]), 3));
    assert_eq!(c.buf.unwrap().as_slice(), &data[..]);
    // Segments that do not add up, or a buf beside them: refused, segments returned.
    let r = ch
        .submit(IoRequest::writev(0, 2, vec![IoBuf::Heap(vec![0; 1000])], 4))
        .unwrap_err();
    assert!(matches!(r.error, IoError::InvalidBuffer(_)), "{}", r.error);
    assert_eq!(r.iov.len(), 1);
    let mut req = IoRequest::readv(0, 1, vec![IoBuf::Heap(vec![0; 512])], 5);
    req.buf = Some(IoBuf::Heap(vec![0; 512]));
    assert!(ch.submit(req).is_err());
}

/// Detaching a controller with open channels is refused and changes nothing (it used to
/// stop the device under their I/O); after the channels close it works, and the old
/// bdev opens no new channel.
#[test]
fn detach_with_open_channels_is_refused_without_touching_the_controller() {
    let (t, _d) = target(ram(16 << 20));
    let reg = registry();
    let b = attach_blk(&reg, t.socket_path(), 1);
    let mut ch = b.open_channel().unwrap();
    let e = reg.detach("VirtioBlk0").unwrap_err().to_string();
    assert!(e.contains("open I/O channels"), "{e}");
    assert_eq!(reg.controllers().len(), 1, "still attached");
    ch.run(IoRequest::write(0, 1, IoBuf::Heap(pattern(512, 1)), 1))
        .result
        .unwrap();
    drop(ch);
    reg.detach("VirtioBlk0").unwrap();
    assert!(reg.controllers().is_empty());
    // A holder of the old bdev opens no channel on a detached controller.
    let Err(e) = b.open_channel() else {
        panic!("a channel on a detached controller");
    };
    assert_eq!(e.kind(), vireo_bdev::ErrorKind::Disconnected, "{e}");
    assert!(e.to_string().contains("being detached"), "{e}");
}

/// reconnect_timeout with a back-end that tracks in-flight requests (INFLIGHT_SHMFD,
/// which the in-tree target offers): the target drops the connection with requests it
/// took in flight; vireo reconnects, hands back the tracking buffer and the same rings,
/// the target serves those requests again, and every write completes once with its
/// data on the disk. Three disconnects in a row.
#[test]
fn a_dropped_connection_is_resumed_with_the_back_ends_inflight_buffer() {
    let (t, _d) = target(ram(16 << 20));
    let reg = registry();
    let mut p = blk_params("R", t.socket_path(), 1);
    p.reconnect_timeout = Some(std::time::Duration::from_secs(20));
    let b = reg.attach(&p).expect("attach").pop().unwrap();
    // Requests the target takes and holds (a slow device) when the connection drops.
    t.faults()
        .set_completion_delay(std::time::Duration::from_millis(2));
    let b2 = b.clone();
    let t_faults = t.faults_shared();
    let written = within(60, "writes across three disconnects", move || {
        let mut ch = b2.open_channel().unwrap();
        let mut done = Vec::new();
        let mut next = 0u64;
        let mut written = 0u64;
        let mut in_flight = 0;
        for round in 0..3 {
            t_faults.disconnect_after(40);
            while t_faults.disconnect_armed() || in_flight > 0 {
                while in_flight < 16 && next < 4096 && t_faults.disconnect_armed() {
                    let data = pattern(512, next as u8);
                    let mut buf = b2.alloc_buf(512).unwrap();
                    buf.as_mut_slice().copy_from_slice(&data);
                    ch.submit(IoRequest::write(next, 1, IoBuf::Dma(buf), next))
                        .unwrap();
                    next += 1;
                    in_flight += 1;
                }
                ch.poll(&mut done);
                for c in done.drain(..) {
                    in_flight -= 1;
                    c.result
                        .unwrap_or_else(|e| panic!("write {}: {e} (round {round})", c.user_data));
                    written += 1;
                }
            }
        }
        written
    });
    assert_eq!(written, {
        let mut ch = b.open_channel().unwrap();
        let mut n = 0;
        for lba in 0..written {
            let c = ch.run(IoRequest::read(lba, 1, IoBuf::Heap(vec![0; 512]), lba));
            c.result.unwrap();
            let Some(IoBuf::Heap(d)) = c.buf else {
                panic!()
            };
            assert_eq!(d, pattern(512, lba as u8), "LBA {lba}");
            n += 1;
        }
        n
    });
    let s = t.stats();
    assert_eq!(s.injected_disconnects, 3);
    assert!(
        s.resubmitted >= 3,
        "the target served requests again: {s:?}"
    );
    assert_eq!(reg.with_controller("R", |c| c.reconnects()), Some(3));
}

/// The back-end's in-flight records are per queue: when the connection drops with a
/// request taken on each of two queues, the new connection serves each again on its
/// own queue (the target does so as each ring is enabled). The in-tree target once filed
/// every queue's requests under queue 0 (each queue thread numbers its own queues from
/// 0): one of the two was then served on the wrong ring or never.
#[test]
fn requests_left_on_two_queues_are_each_served_again_on_their_own_queue() {
    let (t, _d) = target(BlkTargetConfig {
        num_queues: 2,
        ..ram(16 << 20)
    });
    let reg = registry();
    let mut p = blk_params("Q", t.socket_path(), 2);
    p.reconnect_timeout = Some(Duration::from_secs(20));
    let b = reg.attach(&p).expect("attach").pop().unwrap();
    let mut first = b.open_channel().unwrap();
    first
        .run(IoRequest::write(0, 1, IoBuf::Heap(pattern(512, 1)), 0))
        .result
        .unwrap();
    // This thread's queue: a write the target takes and holds (a slow device).
    t.faults().set_completion_delay(Duration::from_secs(2));
    let writes = t.stats().writes;
    first
        .submit(IoRequest::write(1, 1, IoBuf::Heap(pattern(512, 2)), 1))
        .unwrap();
    first.publish();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while t.stats().writes == writes {
        assert!(
            std::time::Instant::now() < deadline,
            "the target took no write"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Another thread, so another queue: a write whose arrival drops the connection.
    // The held write is then never completed either.
    t.faults().disconnect_after(0);
    let b2 = b.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ch = b2.open_channel().unwrap();
        let _ = tx.send(
            ch.run(IoRequest::write(7, 1, IoBuf::Heap(pattern(512, 7)), 7))
                .result,
        );
    });
    // Served again without the delay (if the new connection is quicker than this, the
    // test only takes longer).
    while t.stats().injected_disconnects == 0 {
        assert!(std::time::Instant::now() < deadline, "no disconnect");
        std::thread::sleep(Duration::from_millis(1));
    }
    t.faults().set_completion_delay(Duration::ZERO);
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the write left on the second queue did not complete (hang)")
        .expect("the write left on the second queue");
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while done.is_empty() && std::time::Instant::now() < deadline {
        first.poll(&mut done);
    }
    let r = done.pop().map(|c| c.result);
    assert!(
        matches!(r, Some(Ok(()))),
        "the write left on the first queue: {r:?}"
    );
    assert_eq!(t.stats().injected_disconnects, 1);
    assert_eq!(reg.with_controller("Q", |c| c.reconnects()), Some(1));
    assert_eq!(t.stats().resubmitted, 2);
    let c = first.run(IoRequest::read(0, 8, IoBuf::Heap(vec![0; 4096]), 2));
    c.result.unwrap();
    let Some(IoBuf::Heap(d)) = c.buf else {
        panic!()
    };
    assert_eq!(&d[..512], &pattern(512, 1)[..]);
    assert_eq!(&d[512..1024], &pattern(512, 2)[..]);
    assert_eq!(&d[3584..], &pattern(512, 7)[..]);
}

/// A channel that was idle through a reconnection that kept the rings (INFLIGHT_SHMFD)
/// closes: its ring, which the new connection serves, goes back to the pool with the
/// new doorbell (never freed), and the next channel on that queue works.
#[test]
fn an_idle_channel_closed_after_a_kept_ring_reconnection_leaves_a_working_queue() {
    let (t, _d) = target(BlkTargetConfig {
        num_queues: 2,
        ..ram(16 << 20)
    });
    let reg = registry();
    let mut p = blk_params("K", t.socket_path(), 2);
    p.reconnect_timeout = Some(std::time::Duration::from_secs(20));
    let b = reg.attach(&p).expect("attach").pop().unwrap();
    let mut idle = b.open_channel().unwrap();
    idle.run(IoRequest::write(0, 1, IoBuf::Heap(pattern(512, 1)), 0))
        .result
        .unwrap();
    let mut busy = b.open_channel().unwrap();
    t.faults().disconnect_after(5);
    for i in 0..20u64 {
        busy.run(IoRequest::write(10 + i, 1, IoBuf::Heap(pattern(512, 2)), i))
            .result
            .unwrap();
    }
    assert_eq!(t.stats().injected_disconnects, 1);
    assert_eq!(reg.with_controller("K", |c| c.reconnects()), Some(1));
    // The idle channel never noticed; it closes now.
    drop(idle);
    let mut next = b.open_channel().unwrap();
    next.run(IoRequest::write(1, 1, IoBuf::Heap(pattern(512, 3)), 1))
        .result
        .unwrap();
    let c = next.run(IoRequest::read(0, 2, IoBuf::Heap(vec![0; 1024]), 2));
    c.result.unwrap();
    let Some(IoBuf::Heap(d)) = c.buf else {
        panic!()
    };
    assert_eq!(&d[..512], &pattern(512, 1)[..]);
    assert_eq!(&d[512..], &pattern(512, 3)[..]);
}
