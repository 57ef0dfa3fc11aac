//! The channel against a scripted driver: each device request is recorded, nothing
//! completes until the test says so, and the ring holds as many requests as the test
//! sets (to force queue-full waits). No device, no threads: these run in milliseconds.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vireo_virtio::{DmaConfig, DmaMemory};

use super::*;
use crate::bdev::{BdevInfo, Limits, OpSupport};
use crate::driver::BdevDriver;

/// What the scripted device holds and what it was asked to do.
#[derive(Default)]
struct Script {
    /// Requests the ring holds at once; more are refused (queue full).
    capacity: usize,
    /// Requests on the ring, in the order they were queued.
    on_ring: Vec<Child>,
    /// Requests visible to the device (published).
    visible: usize,
    /// Every request queued, in order.
    log: Vec<Child>,
    publishes: usize,
    /// Completions handed to the channel by its next poll.
    done: Vec<ChildDone>,
    /// How ABORT TASK answers (None: unsupported).
    abort_ok: Option<bool>,
    aborts: Vec<u32>,
    lun_reset_supported: bool,
    lun_resets: usize,
    controller_reset_supported: bool,
    controller_resets: usize,
    /// When each escalation step reached the driver.
    step_times: Vec<Instant>,
}

#[derive(Clone)]
struct Device(Arc<Mutex<Script>>);

impl Device {
    fn new(capacity: usize) -> Device {
        Device(Arc::new(Mutex::new(Script {
            capacity,
            ..Script::default()
        })))
    }

    fn s(&self) -> MutexGuard<'_, Script> {
        self.0.lock().unwrap()
    }

    /// Complete the oldest `n` visible requests with `result`.
    fn complete(&self, n: usize, result: Result<(), IoError>) -> Vec<Child> {
        let mut s = self.s();
        let n = n.min(s.visible);
        let taken: Vec<Child> = s.on_ring.drain(..n).collect();
        s.visible -= n;
        for c in &taken {
            s.done.push(ChildDone::new(c.parent, result.clone()));
        }
        taken
    }

    /// (publishes, requests visible to the device)
    fn published(&self) -> (usize, usize) {
        let s = self.s();
        (s.publishes, s.visible)
    }

    /// (aborts, LUN resets, controller resets) asked for
    fn steps(&self) -> (usize, usize, usize) {
        let s = self.s();
        (s.aborts.len(), s.lun_resets, s.controller_resets)
    }

    fn log(&self) -> Vec<Child> {
        self.s().log.clone()
    }
}

struct ScriptedChannel(Device);

impl ChannelDriver for ScriptedChannel {
    fn queue(&mut self, child: &Child) -> bool {
        let mut s = self.0.s();
        if s.on_ring.len() >= s.capacity {
            return false;
        }
        s.on_ring.push(child.clone());
        s.log.push(child.clone());
        true
    }

    fn publish(&mut self) {
        let mut s = self.0.s();
        s.publishes += 1;
        s.visible = s.on_ring.len();
    }

    fn poll(&mut self, out: &mut Vec<ChildDone>) -> usize {
        let mut s = self.0.s();
        let n = s.done.len();
        out.append(&mut s.done);
        n
    }

    fn abort(&mut self, parent: u32, _timeout: Duration) -> Result<(), IoError> {
        let mut s = self.0.s();
        match s.abort_ok {
            None => Err(IoError::Unsupported {
                op: "abort",
                bdev: String::new(),
            }),
            Some(ok) => {
                s.aborts.push(parent);
                s.step_times.push(Instant::now());
                if ok {
                    Ok(())
                } else {
                    Err(IoError::Device)
                }
            }
        }
    }

    fn reset_controller(&mut self) -> Result<(), IoError> {
        let mut s = self.0.s();
        if !s.controller_reset_supported {
            return Err(IoError::Unsupported {
                op: "controller reset",
                bdev: String::new(),
            });
        }
        s.controller_resets += 1;
        s.step_times.push(Instant::now());
        Ok(())
    }
}

struct ScriptedBdev(Device);

impl BdevDriver for ScriptedBdev {
    fn open_channel(&self) -> Result<Box<dyn ChannelDriver>, BdevError> {
        Ok(Box::new(ScriptedChannel(self.0.clone())))
    }

    fn open_exclusive_channel(&self) -> Result<Box<dyn ChannelDriver + Send>, BdevError> {
        Ok(Box::new(ScriptedChannel(self.0.clone())))
    }

    fn reset(&self, _timeout: Duration) -> Result<(), IoError> {
        let mut s = self.0.s();
        if !s.lun_reset_supported {
            return Err(IoError::Unsupported {
                op: "reset",
                bdev: String::new(),
            });
        }
        s.lun_resets += 1;
        s.step_times.push(Instant::now());
        Ok(())
    }
}

fn memory() -> Arc<DmaMemory> {
    DmaMemory::new(DmaConfig {
        initial_region_size: 4 << 20,
        max_total_size: 16 << 20,
        ..DmaConfig::default()
    })
    .unwrap()
}

fn info() -> BdevInfo {
    BdevInfo {
        name: "T0".into(),
        controller: "T".into(),
        driver: "virtio_blk",
        block_size: 512,
        num_blocks: 1024,
        read_only: false,
        volatile_write_cache: true,
        ops: OpSupport {
            read: true,
            write: true,
            flush: true,
            unmap: true,
            write_zeroes: true,
            reset: false,
        },
        limits: Limits {
            max_rw_blocks: 8,
            max_unmap_blocks: 64,
            max_write_zeroes_blocks: 64,
            ..Limits::default()
        },
        num_queues: 1,
        queue_size: 16,
        packed_ring: false,
        serial: None,
        device_id: None,
        vendor: None,
        product: None,
        scsi: None,
    }
}

/// A channel on a scripted device whose ring holds `capacity` requests.
fn setup_with(capacity: usize, edit: impl FnOnce(&mut BdevInfo)) -> (Device, Arc<Bdev>, IoChannel) {
    let dev = Device::new(capacity);
    let mut i = info();
    edit(&mut i);
    let bdev = Arc::new(Bdev::new(i, Arc::new(ScriptedBdev(dev.clone())), memory()));
    let ch = bdev.open_channel().unwrap();
    (dev, bdev, ch)
}

fn setup(capacity: usize) -> (Device, Arc<Bdev>, IoChannel) {
    setup_with(capacity, |_| {})
}

fn dma(bdev: &Bdev, blocks: u64) -> IoBuf {
    IoBuf::Dma(bdev.alloc_buf(blocks as usize * 512).unwrap())
}

fn heap(blocks: u64, fill: u8) -> IoBuf {
    IoBuf::Heap(vec![fill; blocks as usize * 512])
}

fn poll_all(ch: &mut IoChannel) -> Vec<Completion> {
    let mut out = Vec::new();
    ch.poll(&mut out);
    out
}

/// Poll until `n` completions arrived or `limit` passed.
fn poll_until(ch: &mut IoChannel, n: usize, limit: Duration) -> Vec<Completion> {
    let until = Instant::now() + limit;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < until {
        ch.poll(&mut out);
        std::thread::sleep(Duration::from_micros(200));
    }
    out
}

// --- validation ---

/// The fast yes/no of validation and the checks that explain a refusal agree on every
/// request of a grid (ops, ranges around the end, buffer shapes, read-only, removed).
#[test]
fn validation_fast_path_and_its_explanation_agree() {
    let ops = [
        IoOp::Read,
        IoOp::Write,
        IoOp::Flush,
        IoOp::Unmap,
        IoOp::WriteZeroes,
    ];
    let ranges = [
        (0, 0),
        (0, 1),
        (1020, 4),
        (1020, 5),
        (1024, 1),
        (u64::MAX, 2),
    ];
    let mut checked = 0;
    for read_only in [false, true] {
        for unmap in [false, true] {
            for removed in [false, true] {
                let (_, bdev, _) = setup_with(16, |i| {
                    i.read_only = read_only;
                    i.ops.unmap = unmap;
                });
                if removed {
                    bdev.mark_removed();
                }
                for op in ops {
                    for (offset, blocks) in ranges {
                        // None: no buffer; Some(v): a buf (one length) or an iov (more).
                        for shape in [
                            vec![],
                            vec![0usize],
                            vec![blocks as usize % 8],
                            vec![1, 3],
                            vec![2, 2],
                        ] {
                            let mut req = IoRequest::no_data(op, offset, blocks, 0);
                            match shape.len() {
                                0 => {}
                                1 => req.buf = Some(heap(shape[0] as u64, 0)),
                                _ => req.iov = shape.iter().map(|&n| heap(n as u64, 0)).collect(),
                            }
                            let fast = validate::acceptable(&bdev, &req);
                            let slow = validate::check(&bdev, &req);
                            assert_eq!(fast, slow.is_ok(), "{op:?} {offset}+{blocks} {shape:?} ro={read_only} unmap={unmap} removed={removed}: {slow:?}");
                            if !fast {
                                let e = validate::validate(&bdev, &req).unwrap_err();
                                assert_eq!(format!("{e:?}"), format!("{:?}", slow.unwrap_err()));
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(checked, 8 * 5 * 6 * 5);
}

#[test]
fn a_request_past_the_end_is_refused_with_its_buffer_back() {
    let (dev, bdev, mut ch) = setup(16);
    let r = ch
        .submit(IoRequest::read(1020, 8, dma(&bdev, 8), 7))
        .unwrap_err();
    assert!(
        matches!(
            r.error,
            IoError::OutOfRange {
                offset: 1020,
                end: 1028,
                num_blocks: 1024
            }
        ),
        "{:?}",
        r.error
    );
    assert_eq!(r.user_data, 7);
    assert_eq!(r.buf.map(|b| b.len()), Some(4096));
    assert!(dev.log().is_empty());
}

#[test]
fn an_lba_range_that_overflows_is_out_of_range() {
    let (_, _, mut ch) = setup(16);
    let r = ch
        .submit(IoRequest::no_data(IoOp::Unmap, u64::MAX, 2, 1))
        .unwrap_err();
    assert!(matches!(r.error, IoError::OutOfRange { end: u64::MAX, .. }));
}

#[test]
fn zero_blocks_are_refused() {
    let (_, _, mut ch) = setup(16);
    let r = ch
        .submit(IoRequest::no_data(IoOp::WriteZeroes, 0, 0, 1))
        .unwrap_err();
    assert!(matches!(r.error, IoError::InvalidRequest(_)));
}

#[test]
fn a_buffer_of_the_wrong_length_is_refused() {
    let (_, _, mut ch) = setup(16);
    let r = ch
        .submit(IoRequest::write(0, 2, heap(1, 0), 1))
        .unwrap_err();
    assert!(
        matches!(r.error, IoError::InvalidBuffer(_)),
        "{:?}",
        r.error
    );
    assert_eq!(r.buf.map(|b| b.len()), Some(512));
}

#[test]
fn a_vectored_request_with_a_plain_buffer_too_is_refused() {
    let (_, _, mut ch) = setup(16);
    let mut req = IoRequest::readv(0, 2, vec![heap(1, 0), heap(1, 0)], 1);
    req.buf = Some(heap(2, 0));
    let r = ch.submit(req).unwrap_err();
    assert!(matches!(r.error, IoError::InvalidBuffer(_)));
    assert_eq!(r.iov.len(), 2);
}

#[test]
fn a_read_only_bdev_refuses_writes_but_reads_and_flushes() {
    let (dev, bdev, mut ch) = setup_with(16, |i| i.read_only = true);
    let r = ch
        .submit(IoRequest::write(0, 1, dma(&bdev, 1), 1))
        .unwrap_err();
    assert!(matches!(r.error, IoError::ReadOnly(_)));
    let r = ch
        .submit(IoRequest::no_data(IoOp::Unmap, 0, 1, 2))
        .unwrap_err();
    assert!(matches!(r.error, IoError::ReadOnly(_)));
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 3)).unwrap();
    ch.submit(IoRequest::no_data(IoOp::Flush, 0, 0, 4)).unwrap();
    assert_eq!(dev.log().len(), 2);
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn an_unsupported_operation_names_the_bdev() {
    let (_, _, mut ch) = setup_with(16, |i| i.ops.unmap = false);
    let r = ch
        .submit(IoRequest::no_data(IoOp::Unmap, 0, 1, 1))
        .unwrap_err();
    match r.error {
        IoError::Unsupported { op, bdev } => assert_eq!((op, bdev.as_str()), ("unmap", "T0")),
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_removed_bdev_refuses_io() {
    let (_, bdev, mut ch) = setup(16);
    bdev.mark_removed();
    let r = ch
        .submit(IoRequest::read(0, 1, dma(&bdev, 1), 1))
        .unwrap_err();
    assert!(matches!(r.error, IoError::Removed(_)));
}

#[test]
fn a_capacity_change_moves_the_end() {
    let (_, bdev, mut ch) = setup(16);
    bdev.set_num_blocks(2048);
    ch.submit(IoRequest::read(2040, 8, dma(&bdev, 8), 1))
        .unwrap();
    bdev.set_num_blocks(16);
    let r = ch
        .submit(IoRequest::read(16, 1, dma(&bdev, 1), 2))
        .unwrap_err();
    assert!(matches!(
        r.error,
        IoError::OutOfRange { num_blocks: 16, .. }
    ));
    // The device never answers: close without waiting for it.
    ch.abandon();
}

// --- publish, split, completion ---

#[test]
fn nothing_is_visible_to_the_device_before_publish_or_poll() {
    let (dev, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 1)).unwrap();
    ch.submit(IoRequest::read(1, 1, dma(&bdev, 1), 2)).unwrap();
    assert_eq!(dev.published(), (0, 0));
    ch.publish();
    assert_eq!(dev.published(), (1, 2));
    // Nothing new: no second publish.
    ch.publish();
    assert_eq!(dev.s().publishes, 1);
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn a_dma_buffer_is_used_in_place() {
    let (dev, bdev, mut ch) = setup(16);
    let b = bdev.alloc_buf(4096).unwrap();
    let iova = b.iova();
    ch.submit(IoRequest::read(0, 8, IoBuf::Dma(b), 1)).unwrap();
    assert_eq!(dev.log()[0].addr, iova);
    assert_eq!(dev.log()[0].len, 4096);
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn a_long_read_is_split_and_completes_once_after_its_last_piece() {
    let (dev, bdev, mut ch) = setup(16);
    let b = bdev.alloc_buf(20 * 512).unwrap();
    let iova = b.iova();
    ch.submit(IoRequest::read(100, 20, IoBuf::Dma(b), 9))
        .unwrap();
    let log = dev.log();
    let pieces: Vec<(u64, u64, u64)> = log
        .iter()
        .map(|c| (c.lba, c.blocks, c.addr - iova))
        .collect();
    assert_eq!(pieces, vec![(100, 8, 0), (108, 8, 4096), (116, 4, 8192)]);
    assert!(log.iter().all(|c| c.parent == log[0].parent));
    assert_eq!(ch.stats().device_requests, 3);
    ch.publish();
    dev.complete(2, Ok(()));
    assert!(poll_all(&mut ch).is_empty());
    assert_eq!(ch.in_flight(), 1);
    dev.complete(1, Ok(()));
    let out = poll_all(&mut ch);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].user_data, 9);
    assert!(out[0].result.is_ok());
    assert_eq!(out[0].buf.as_ref().map(IoBuf::len), Some(20 * 512));
    assert_eq!(ch.in_flight(), 0);
}

#[test]
fn the_first_error_of_a_split_io_is_its_result() {
    let (dev, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::write(0, 24, dma(&bdev, 24), 1))
        .unwrap();
    ch.publish();
    dev.complete(1, Ok(()));
    dev.complete(1, Err(IoError::Device));
    dev.complete(1, Err(IoError::DeviceUnsupported));
    let out = poll_all(&mut ch);
    assert_eq!(out.len(), 1);
    assert!(matches!(out[0].result, Err(IoError::Device)));
    let st = ch.stats();
    assert_eq!((st.io_errors, st.num_write_ops), (1, 0));
}

#[test]
fn a_full_ring_makes_requests_wait_in_order_and_go_out_as_space_frees() {
    let (dev, bdev, mut ch) = setup(2);
    for i in 0..5 {
        ch.submit(IoRequest::read(i, 1, dma(&bdev, 1), i)).unwrap();
    }
    assert_eq!(dev.s().on_ring.len(), 2);
    assert_eq!(
        ch.stats().queue_full_waits,
        1,
        "counted once per request that found the ring full first"
    );
    assert_eq!(ch.in_flight(), 5);
    ch.publish();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        dev.complete(1, Ok(()));
        for c in poll_all(&mut ch) {
            seen.push(c.user_data);
        }
    }
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    let lbas: Vec<u64> = dev.log().iter().map(|c| c.lba).collect();
    assert_eq!(
        lbas,
        vec![0, 1, 2, 3, 4],
        "waiting requests keep their order"
    );
}

#[test]
fn requests_behind_waiting_ones_wait_too() {
    let (dev, bdev, mut ch) = setup(1);
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 0)).unwrap();
    ch.submit(IoRequest::read(1, 1, dma(&bdev, 1), 1)).unwrap();
    // Space frees up, but the waiting request goes first.
    ch.publish();
    dev.complete(1, Ok(()));
    ch.submit(IoRequest::read(2, 1, dma(&bdev, 1), 2)).unwrap();
    assert_eq!(dev.log().iter().map(|c| c.lba).collect::<Vec<_>>(), vec![0]);
    let out = poll_all(&mut ch);
    assert_eq!(out.len(), 1);
    assert_eq!(
        dev.log().iter().map(|c| c.lba).collect::<Vec<_>>(),
        vec![0, 1]
    );
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn a_completion_for_an_unknown_or_idle_slot_is_ignored() {
    let (dev, bdev, mut ch) = setup(16);
    dev.s().done.push(ChildDone::new(42, Ok(())));
    assert!(poll_all(&mut ch).is_empty());
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 1)).unwrap();
    ch.publish();
    let c = dev.complete(1, Ok(()));
    // The same slot completed twice: the second is not a second completion.
    dev.s().done.push(ChildDone::new(c[0].parent, Ok(())));
    assert_eq!(poll_all(&mut ch).len(), 1);
    assert!(poll_all(&mut ch).is_empty());
}

#[test]
fn slots_are_reused_after_completion() {
    let (dev, bdev, mut ch) = setup(16);
    for round in 0..3 {
        ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), round))
            .unwrap();
        ch.publish();
        dev.complete(1, Ok(()));
        assert_eq!(poll_all(&mut ch).len(), 1);
    }
    let parents: Vec<u32> = dev.log().iter().map(|c| c.parent).collect();
    assert_eq!(parents, vec![0, 0, 0]);
}

// --- bounce buffers ---

#[test]
fn a_heap_write_goes_through_a_bounce_buffer_in_dma_memory() {
    let (dev, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::write(0, 2, heap(2, 0xab), 1)).unwrap();
    let c = dev.log()[0].clone();
    assert_eq!(c.len, 1024);
    let mut t = bdev.memory().translator();
    assert_eq!(
        t.translate(c.addr, 1024),
        Some(c.addr),
        "the bounce buffer is device memory"
    );
    ch.publish();
    dev.complete(1, Ok(()));
    let out = poll_all(&mut ch);
    assert_eq!(
        out[0].buf.as_ref().map(IoBuf::as_slice),
        Some(&[0xab; 1024][..])
    );
}

#[test]
fn bounce_buffers_are_pooled_and_reused() {
    let (dev, _, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 1, heap(1, 0), 1)).unwrap();
    ch.publish();
    dev.complete(1, Ok(()));
    poll_all(&mut ch);
    assert_eq!(ch.bounce.pooled(), 1);
    ch.submit(IoRequest::read(0, 4, heap(4, 0), 2)).unwrap();
    let log = dev.log();
    assert_eq!(
        log[0].addr, log[1].addr,
        "the same 4 KiB class buffer again"
    );
    assert_eq!(ch.bounce.pooled(), 0);
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn a_vectored_write_is_gathered_into_one_request() {
    let (dev, _, mut ch) = setup(16);
    let iov = vec![heap(1, 1), heap(2, 2), heap(1, 3)];
    ch.submit(IoRequest::writev(10, 4, iov, 5)).unwrap();
    let log = dev.log();
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].lba, log[0].blocks, log[0].len), (10, 4, 2048));
    ch.publish();
    dev.complete(1, Ok(()));
    let out = poll_all(&mut ch);
    assert_eq!(out[0].iov.len(), 3, "the segments come back");
    assert_eq!(out[0].iov[1].as_slice(), &[2u8; 1024][..]);
}

// --- flush, run, arm ---

#[test]
fn a_flush_on_a_write_through_device_completes_without_a_request() {
    let (dev, _, mut ch) = setup_with(16, |i| i.volatile_write_cache = false);
    ch.submit(IoRequest::no_data(IoOp::Flush, 0, 0, 3)).unwrap();
    assert!(dev.log().is_empty());
    assert_eq!(ch.in_flight(), 1);
    let out = poll_all(&mut ch);
    assert_eq!((out[0].user_data, out[0].op), (3, IoOp::Flush));
    assert!(out[0].result.is_ok());
    assert_eq!(ch.stats().num_flush_ops, 1);
}

#[test]
fn a_flush_reaches_a_device_with_a_write_cache_and_one_that_turns_it_on() {
    let (dev, bdev, mut ch) = setup_with(16, |i| i.volatile_write_cache = false);
    bdev.write_cache_flag().store(true, Ordering::Relaxed);
    ch.submit(IoRequest::no_data(IoOp::Flush, 0, 0, 3)).unwrap();
    let log = dev.log();
    assert_eq!((log.len(), log[0].op, log[0].blocks), (1, IoOp::Flush, 0));
    assert!(bdev.info().volatile_write_cache);
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn run_returns_its_own_completion_and_keeps_the_others_for_poll() {
    let (dev, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 1)).unwrap();
    ch.publish();
    // The device answers both at once, the other one first.
    let d = dev.clone();
    let t = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(5);
        while d.s().visible < 2 && Instant::now() < until {
            std::thread::yield_now();
        }
        d.complete(2, Ok(()));
    });
    let c = ch.run(IoRequest::write(5, 1, dma(&bdev, 1), 2));
    t.join().unwrap();
    assert_eq!(c.user_data, 2);
    assert_eq!(ch.in_flight(), 1);
    let out = poll_all(&mut ch);
    assert_eq!(out.iter().map(|c| c.user_data).collect::<Vec<_>>(), vec![1]);
}

#[test]
fn run_of_an_invalid_request_returns_the_refusal() {
    let (_, bdev, mut ch) = setup(16);
    let c = ch.run(IoRequest::read(5000, 1, dma(&bdev, 1), 8));
    assert!(matches!(c.result, Err(IoError::OutOfRange { .. })));
    assert_eq!(c.user_data, 8);
    assert!(c.buf.is_some());
}

#[test]
fn arm_says_ready_when_completions_wait_and_nofd_without_an_eventfd() {
    let (_, bdev, mut ch) = setup_with(16, |i| i.volatile_write_cache = false);
    assert_eq!(ch.arm(), Armed::NoFd, "nothing in flight");
    ch.submit(IoRequest::no_data(IoOp::Flush, 0, 0, 1)).unwrap();
    assert_eq!(ch.arm(), Armed::Ready);
    poll_all(&mut ch);
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 2)).unwrap();
    assert_eq!(ch.arm(), Armed::NoFd, "the scripted driver has no eventfd");
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn wait_returns_at_its_timeout_when_the_device_is_silent() {
    let (_, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 1)).unwrap();
    let mut out = Vec::new();
    let t = Instant::now();
    assert_eq!(
        ch.wait(&mut out, 1, Duration::from_millis(30), WaitMode::Sleep),
        0
    );
    assert!(t.elapsed() >= Duration::from_millis(30));
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn statistics_count_completed_io_and_reach_the_bdev() {
    let (dev, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 2, dma(&bdev, 2), 1)).unwrap();
    ch.submit(IoRequest::write(0, 1, dma(&bdev, 1), 2)).unwrap();
    ch.submit(IoRequest::no_data(IoOp::Unmap, 0, 4, 3)).unwrap();
    ch.publish();
    dev.complete(3, Ok(()));
    assert_eq!(poll_all(&mut ch).len(), 3);
    let st = ch.stats();
    assert_eq!((st.num_read_ops, st.bytes_read), (1, 1024));
    assert_eq!((st.num_write_ops, st.bytes_written), (1, 512));
    assert_eq!((st.num_unmap_ops, st.bytes_unmapped), (1, 2048));
    drop(ch);
    assert_eq!(
        bdev.iostat().num_read_ops,
        1,
        "a closed channel's counts stay with the bdev"
    );
}

// --- time limits and escalation ---

const LIMIT: Duration = Duration::from_millis(20);

#[test]
fn a_silent_device_times_out_and_keeps_the_buffer_it_uses_in_place() {
    let (_, bdev, mut ch) = setup(16);
    let t = Instant::now();
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 1).with_timeout(LIMIT))
        .unwrap();
    let out = poll_until(&mut ch, 1, Duration::from_secs(5));
    assert!(t.elapsed() >= LIMIT);
    assert!(
        matches!(out[0].result, Err(IoError::Timeout(_))),
        "{:?}",
        out[0].result
    );
    assert!(out[0].buf.is_none(), "the device may still write it");
    assert_eq!(ch.in_flight(), 0);
    assert_eq!(ch.stats().io_errors, 1);
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn a_timed_out_heap_buffer_is_given_back() {
    let (_, _, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 1, heap(1, 7), 1).with_timeout(LIMIT))
        .unwrap();
    let out = poll_until(&mut ch, 1, Duration::from_secs(5));
    assert_eq!(
        out[0].buf.as_ref().map(IoBuf::as_slice),
        Some(&[7u8; 512][..])
    );
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn a_late_completion_after_a_timeout_is_not_delivered_and_frees_the_slot() {
    let (dev, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 1).with_timeout(LIMIT))
        .unwrap();
    assert_eq!(poll_until(&mut ch, 1, Duration::from_secs(5)).len(), 1);
    assert_eq!(ch.device_outstanding(), 1);
    dev.complete(1, Ok(()));
    assert!(poll_all(&mut ch).is_empty());
    assert_eq!(ch.device_outstanding(), 0);
    assert_eq!(ch.timed, 0);
}

#[test]
fn the_bdev_default_time_limit_applies_to_io_that_names_none() {
    let (_, bdev, mut ch) = setup(16);
    bdev.set_default_timeout(Some(LIMIT));
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 1)).unwrap();
    let out = poll_until(&mut ch, 1, Duration::from_secs(5));
    assert!(matches!(out[0].result, Err(IoError::Timeout(_))));
    bdev.set_default_timeout(None);
    assert_eq!(bdev.default_timeout(), None);
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn io_answered_in_time_does_not_time_out() {
    let (dev, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 1).with_timeout(Duration::from_secs(30)))
        .unwrap();
    ch.publish();
    dev.complete(1, Ok(()));
    let out = poll_all(&mut ch);
    assert!(out[0].result.is_ok());
    assert_eq!(ch.timed, 0);
}

/// Time out one read (its completion is the caller's timeout).
fn time_out_one(bdev: &Arc<Bdev>, ch: &mut IoChannel) {
    ch.submit(IoRequest::read(0, 1, dma(bdev, 1), 1).with_timeout(LIMIT))
        .unwrap();
    assert_eq!(poll_until(ch, 1, Duration::from_secs(5)).len(), 1);
}

/// Poll until the escalation steps taken (aborts, LUN resets, controller resets) are no
/// longer `from`; returns them. A poll takes at most one step, so a change seen here is
/// the first step after `from`.
fn next_step(
    ch: &mut IoChannel,
    dev: &Device,
    from: (usize, usize, usize),
) -> (usize, usize, usize) {
    let until = Instant::now() + Duration::from_secs(10);
    while dev.steps() == from && Instant::now() < until {
        poll_all(ch);
        std::thread::sleep(Duration::from_micros(200));
    }
    dev.steps()
}

#[test]
fn escalation_aborts_first_and_stops_there_when_the_abort_is_sent() {
    let (dev, bdev, mut ch) = setup(16);
    dev.s().abort_ok = Some(true);
    dev.s().lun_reset_supported = true;
    time_out_one(&bdev, &mut ch);
    assert_eq!(next_step(&mut ch, &dev, (0, 0, 0)), (1, 0, 0));
    assert_eq!(dev.s().aborts, vec![0], "the timed-out I/O's slot");
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn escalation_goes_from_abort_to_lun_reset_to_controller_reset_one_period_apart() {
    let (dev, bdev, mut ch) = setup(16);
    {
        let mut s = dev.s();
        s.abort_ok = Some(true);
        s.lun_reset_supported = true;
        s.controller_reset_supported = true;
    }
    time_out_one(&bdev, &mut ch);
    let steps = next_step(&mut ch, &dev, (0, 0, 0));
    assert_eq!(steps, (1, 0, 0));
    let steps = next_step(&mut ch, &dev, steps);
    assert_eq!(steps, (1, 1, 0));
    let steps = next_step(&mut ch, &dev, steps);
    assert_eq!(steps, (1, 1, 1));
    // A period apart at least, as the driver saw them.
    let t = dev.s().step_times.clone();
    let period = LIMIT - Duration::from_millis(1);
    assert!(
        t[1] - t[0] >= period && t[2] - t[1] >= period,
        "{:?} {:?}",
        t[1] - t[0],
        t[2] - t[1]
    );
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn an_unsupported_abort_falls_through_to_a_lun_reset_in_the_same_step() {
    let (dev, bdev, mut ch) = setup(16);
    dev.s().lun_reset_supported = true;
    time_out_one(&bdev, &mut ch);
    assert_eq!(next_step(&mut ch, &dev, (0, 0, 0)), (0, 1, 0));
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn without_abort_or_lun_reset_the_controller_is_reset() {
    let (dev, bdev, mut ch) = setup(16);
    dev.s().controller_reset_supported = true;
    time_out_one(&bdev, &mut ch);
    assert_eq!(next_step(&mut ch, &dev, (0, 0, 0)), (0, 0, 1));
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn a_failed_abort_does_not_skip_to_the_next_step_at_once() {
    let (dev, bdev, mut ch) = setup(16);
    dev.s().abort_ok = Some(false);
    dev.s().lun_reset_supported = true;
    time_out_one(&bdev, &mut ch);
    assert_eq!(next_step(&mut ch, &dev, (0, 0, 0)), (1, 0, 0));
    // The device never answers: close without waiting for it.
    ch.abandon();
}

#[test]
fn an_aborted_request_retires_its_buffers_and_completes_without_them() {
    let (dev, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 1, heap(1, 0), 1)).unwrap();
    ch.publish();
    dev.complete(1, Err(IoError::Aborted("reset".into())));
    let out = poll_all(&mut ch);
    assert!(matches!(out[0].result, Err(IoError::Aborted(_))));
    assert!(out[0].buf.is_none(), "the old back-end may still write it");
    assert_eq!(ch.bounce.pooled(), 0, "the bounce buffer is never reused");
    let _ = bdev;
}

/// The in-place segments of a vectored request stay with a device that may still use
/// them, as a single in-place buffer does: not handed back on a timeout, never freed
/// when aborted, failed with the connection, or left on an abandoned channel (they
/// used to be handed back or freed, and a later allocation got the same memory).
#[test]
fn in_place_vectored_segments_stay_with_a_device_that_may_still_use_them() {
    // Two segments of DMA memory, and a device that takes two per request: in place.
    let segs = |bdev: &Bdev| vec![dma(bdev, 1), dma(bdev, 1)];
    // Timed out.
    let (_, bdev, mut ch) = setup_with(16, |i| i.limits.max_segments = 8);
    ch.submit(IoRequest::readv(0, 2, segs(&bdev), 1).with_timeout(LIMIT))
        .unwrap();
    let out = poll_until(&mut ch, 1, Duration::from_secs(5));
    assert!(matches!(out[0].result, Err(IoError::Timeout(_))));
    assert!(out[0].iov.is_empty(), "the device may still write them");
    ch.abandon();
    // Aborted, and failed with the connection or the controller: retired, not freed.
    for err in [
        IoError::Aborted("reset".into()),
        IoError::Disconnected,
        IoError::ControllerFailed("bad used id".into()),
    ] {
        let (dev, bdev, mut ch) = setup_with(16, |i| i.limits.max_segments = 8);
        let mem = bdev.memory().clone();
        ch.submit(IoRequest::readv(0, 2, segs(&bdev), 1)).unwrap();
        ch.publish();
        let free = mem.free_bytes();
        dev.complete(1, Err(err));
        let out = poll_all(&mut ch);
        assert!(out[0].iov.is_empty());
        assert_eq!(
            mem.free_bytes(),
            free,
            "{:?}: segments freed",
            out[0].result
        );
    }
    // Left on an abandoned channel.
    let (_, bdev, mut ch) = setup_with(16, |i| i.limits.max_segments = 8);
    let mem = bdev.memory().clone();
    ch.submit(IoRequest::readv(0, 2, segs(&bdev), 1)).unwrap();
    ch.publish();
    let free = mem.free_bytes();
    ch.abandon();
    assert_eq!(
        mem.free_bytes(),
        free,
        "segments freed by an abandoned channel"
    );
}

// --- closing ---

#[test]
fn an_abandoned_channel_closes_at_once_with_io_on_the_device() {
    let (dev, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 1)).unwrap();
    ch.publish();
    let t = Instant::now();
    ch.abandon();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(dev.s().on_ring.len(), 1, "the device still holds it");
}

#[test]
fn dropping_a_channel_waits_for_its_io() {
    let (dev, bdev, mut ch) = setup(16);
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 1)).unwrap();
    ch.publish();
    let d = dev.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        d.complete(1, Ok(()));
    });
    drop(ch);
    t.join().unwrap();
    assert!(dev.s().on_ring.is_empty());
    assert_eq!(bdev.iostat().num_read_ops, 1);
}

#[test]
fn poll_with_hands_over_ready_device_and_timed_out_completions_once_each() {
    let (dev, bdev, mut ch) = setup_with(16, |i| i.volatile_write_cache = false);
    // Ready at once (a flush on a write-through device), from the device, timed out.
    ch.submit(IoRequest::no_data(IoOp::Flush, 0, 0, 1)).unwrap();
    ch.submit(IoRequest::read(0, 1, dma(&bdev, 1), 2)).unwrap();
    ch.submit(IoRequest::read(1, 1, dma(&bdev, 1), 3).with_timeout(LIMIT))
        .unwrap();
    ch.publish();
    dev.complete(1, Ok(()));
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(5);
    while seen.len() < 3 && Instant::now() < until {
        let before = seen.len();
        let n = ch.poll_with(|c| seen.push((c.user_data, c.result.is_ok(), c.buf.is_some())));
        assert_eq!(n, seen.len() - before, "the count is what was handed over");
    }
    assert_eq!(
        seen,
        vec![(1, true, false), (2, true, true), (3, false, false)],
        "each once, with its result and its buffer (none for the timed-out read)"
    );
    assert_eq!(ch.in_flight(), 0);
    assert_eq!(ch.poll_with(|_| panic!("nothing more")), 0);
    ch.abandon();
}
