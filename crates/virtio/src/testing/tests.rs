//! The fake device against vireo's own driver side (Virtqueue, RequestQueue).

use std::mem::offset_of;
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::*;
use crate::features::blk as bf;
use crate::memory::DmaBuf;
use crate::request_queue::RequestQueue;
use crate::ring::{QueueOptions, Segment, Used, Virtqueue};
use crate::transport::{create_queue, negotiate, COMMON_FEATURES};
use crate::wire::blk::{
    Range, ReqHeader, RequestSlot, ID_BYTES, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID,
    T_IN, T_OUT, T_WRITE_ZEROES, WRITE_ZEROES_FLAG_UNMAP,
};

const ALL_BLK: u64 = COMMON_FEATURES
    | tf::RING_PACKED
    | bf::SEG_MAX
    | bf::BLK_SIZE
    | bf::FLUSH
    | bf::MQ
    | bf::DISCARD
    | bf::WRITE_ZEROES;

/// Negotiate `wanted`, set up queue 0 of `size` and start: the queue.
fn bring_up(t: &mut dyn Transport, wanted: u64, size: u16) -> Virtqueue {
    let f = negotiate(t, wanted).unwrap();
    let opts = QueueOptions {
        event_idx: f & tf::RING_EVENT_IDX != 0,
        indirect_max: if f & tf::RING_INDIRECT_DESC != 0 {
            8
        } else {
            0
        },
        packed: f & tf::RING_PACKED != 0,
    };
    let q = create_queue(t, 0, size, opts).unwrap();
    t.start().unwrap();
    q
}

/// A buffer filled with `fill`.
fn buf(mem: &Arc<DmaMemory>, len: usize, fill: u8) -> DmaBuf {
    let mut b = mem.alloc(len, 64).unwrap();
    b.as_mut_slice().fill(fill);
    b
}

fn seg(b: &DmaBuf) -> Segment {
    Segment {
        addr: b.iova(),
        len: b.len() as u32,
    }
}

/// A plain device (no blk semantics) with `features`, one queue of up to 64.
fn plain(features: u64) -> (FakeDevice, Arc<DmaMemory>, Box<dyn Transport>) {
    let dev = FakeDevice::new(features, vec![7; 8], 1, 64);
    let mem = test_memory(1 << 20);
    let t = dev.connect(&mem);
    (dev, mem, t)
}

fn poll_all(q: &mut Virtqueue) -> Vec<Used> {
    let mut v = Vec::new();
    q.poll(|u| v.push(u)).unwrap();
    v
}

#[test]
fn a_direct_chain_comes_back_resolved() {
    let (dev, mem, mut t) = plain(tf::VERSION_1);
    assert_eq!(t.max_queues().unwrap(), Some(1));
    assert_eq!(t.max_queue_size(0).unwrap(), Some(64));
    let mut c = [0u8; 4];
    t.read_config(4, &mut c).unwrap();
    assert_eq!(c, [7; 4]);
    assert!(t.read_config(6, &mut c).is_err(), "past the config space");
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 16);
    assert_eq!(dev.driver_features(), tf::VERSION_1);
    assert!(dev.started());
    let (a, b, w) = (buf(&mem, 16, 1), buf(&mem, 100, 2), buf(&mem, 33, 0));
    q.add(&[seg(&a), seg(&b), seg(&w)], 2, 5).unwrap();
    q.publish().unwrap();
    let reqs = dev.take_requests(0);
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.readable, vec![(a.iova(), 16), (b.iova(), 100)]);
    assert_eq!(r.writable, vec![(w.iova(), 33)]);
    let mut want = vec![1u8; 16];
    want.extend([2u8; 100]);
    assert_eq!(r.read_all(), want);
    assert_eq!(r.writable_len(), 33);
    r.write_at(30, b"xyz");
    assert_eq!(&w.as_slice()[30..], b"xyz");
    assert!(dev.take_requests(0).is_empty(), "taken once");
    assert!(catch_unwind(AssertUnwindSafe(|| r.write_at(31, b"xyz"))).is_err());
}

#[test]
fn an_indirect_chain_comes_back_resolved_across_segments() {
    let (dev, mem, mut t) = plain(COMMON_FEATURES);
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 8);
    let bufs: Vec<DmaBuf> = (0..6).map(|i| buf(&mem, 10 + i, i as u8)).collect();
    let segs: Vec<Segment> = bufs.iter().map(seg).collect();
    q.add(&segs, 3, 9).unwrap();
    q.publish().unwrap();
    let reqs = dev.take_requests(0);
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    let flags_at = |i: u64| {
        let desc = dev.layout(0).unwrap().desc_va;
        // SAFETY: descriptor `i` (< 8) of the ring's table, mapped while `q` lives.
        unsafe { std::ptr::read_unaligned((desc + 16 * i + 12) as *const u16) }
    };
    assert_eq!(
        flags_at(r.head as u64),
        DESC_F_INDIRECT,
        "one indirect descriptor"
    );
    let want = |range: std::ops::Range<usize>| -> Vec<(u64, u32)> {
        bufs[range]
            .iter()
            .map(|b| (b.iova(), b.len() as u32))
            .collect()
    };
    assert_eq!(r.readable, want(0..3));
    assert_eq!(r.writable, want(3..6));
    // 13 + 14 + 15 writable bytes: a write from 10 spans the first two segments.
    r.write_at(10, &[0xaa; 5]);
    assert_eq!(&bufs[3].as_slice()[10..], &[0xaa; 3]);
    assert_eq!(&bufs[4].as_slice()[..2], &[0xaa; 2]);
    assert_eq!(bufs[4].as_slice()[2], 4);
}

#[test]
fn a_completion_goes_round_trip_and_signals_follow_the_driver_s_wishes() {
    let (dev, mem, mut t) = plain(COMMON_FEATURES);
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 8);
    let (a, w) = (buf(&mem, 16, 0), buf(&mem, 64, 0));
    for token in [1, 2] {
        q.add(&[seg(&a), seg(&w)], 1, token).unwrap();
    }
    q.publish().unwrap();
    let reqs = dev.take_requests(0);
    assert_eq!(dev.outstanding(0), 2);
    dev.complete(0, &reqs[1], 40);
    assert_eq!(
        poll_all(&mut q),
        vec![Used { token: 2, len: 40 }],
        "completed out of order"
    );
    assert_eq!(
        dev.signals(0),
        0,
        "polling: the used event is parked far away"
    );
    assert!(!q.enable_interrupts());
    dev.complete(0, &reqs[0], 3);
    assert_eq!(dev.signals(0), 1, "interrupts enabled: signalled");
    assert_eq!(poll_all(&mut q), vec![Used { token: 1, len: 3 }]);
    assert_eq!(dev.outstanding(0), 0);
    let again = catch_unwind(AssertUnwindSafe(|| dev.complete(0, &reqs[0], 3)));
    assert!(again.is_err(), "completing twice is a test bug");
}

#[test]
fn kicks_are_counted_and_the_device_asks_for_each_batch() {
    let (dev, mem, mut t) = plain(COMMON_FEATURES);
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 8);
    let (a, w) = (buf(&mem, 16, 0), buf(&mem, 1, 0));
    let submit = |q: &mut Virtqueue, token| {
        q.add(&[seg(&a), seg(&w)], 1, token).unwrap();
        q.publish().unwrap()
    };
    assert!(submit(&mut q, 1));
    assert!(!submit(&mut q, 2), "the device has not taken the first yet");
    assert_eq!(dev.kicks(0), 1);
    let reqs = dev.take_requests(0);
    assert_eq!(reqs.len(), 2);
    assert!(submit(&mut q, 3), "taking asks for the next kick");
    assert_eq!(dev.kicks(0), 2);
    // Without EVENT_IDX every publish kicks.
    let (dev, mem, mut t) = plain(tf::VERSION_1);
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 8);
    let (a, w) = (buf(&mem, 16, 0), buf(&mem, 1, 0));
    for token in 0..3 {
        q.add(&[seg(&a), seg(&w)], 1, token).unwrap();
        assert!(q.publish().unwrap());
    }
    assert_eq!(dev.kicks(0), 3);
}

/// Overwrite the u16 at byte `off` of descriptor `i` of the table at `desc` (flags: 12,
/// next: 14), as a buggy driver would have written it.
fn poke(desc: u64, i: u64, off: u64, v: u16) {
    // SAFETY: descriptor `i` of a ring's table (tests pass i < the queue size), mapped
    // while the queue lives; nothing else touches it during the test.
    unsafe { std::ptr::write_unaligned((desc + 16 * i + off) as *mut u16, v) };
}

/// The panic message of `take_requests` on queue 0.
fn take_panics(dev: &FakeDevice) -> String {
    let e = catch_unwind(AssertUnwindSafe(|| dev.take_requests(0))).unwrap_err();
    e.downcast_ref::<String>().cloned().unwrap_or_default()
}

#[test]
fn malformed_chains_panic_as_driver_bugs() {
    // Head 0 readable -> 1 writable, then the flags turned into writable -> readable.
    let (dev, mem, mut t) = plain(tf::VERSION_1);
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 8);
    let (a, w) = (buf(&mem, 16, 0), buf(&mem, 16, 0));
    q.add(&[seg(&a), seg(&w)], 1, 1).unwrap();
    q.publish().unwrap();
    let desc = dev.layout(0).unwrap().desc_va;
    poke(desc, 0, 12, DESC_F_NEXT | DESC_F_WRITE);
    poke(desc, 1, 12, 0);
    let m = take_panics(&dev);
    assert!(
        m.contains("driver bug") && m.contains("device-readable descriptor after"),
        "{m}"
    );
    // A loop: 0 -> 1 -> 0.
    let (dev, mem, mut t) = plain(tf::VERSION_1);
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 8);
    let (a, w) = (buf(&mem, 16, 0), buf(&mem, 16, 0));
    q.add(&[seg(&a), seg(&w)], 1, 1).unwrap();
    q.publish().unwrap();
    let desc = dev.layout(0).unwrap().desc_va;
    poke(desc, 1, 12, DESC_F_NEXT);
    poke(desc, 1, 14, 0);
    let m = take_panics(&dev);
    assert!(m.contains("driver bug") && m.contains("loop"), "{m}");
    // An address outside the DMA memory.
    let (dev, _mem, mut t) = plain(tf::VERSION_1);
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 8);
    let heap = [0u8; 16];
    let s = Segment {
        addr: heap.as_ptr() as u64,
        len: 16,
    };
    q.add(&[s], 1, 1).unwrap();
    q.publish().unwrap();
    assert!(take_panics(&dev).contains("outside the DMA memory"));
}

#[test]
fn a_device_that_lies_is_caught_by_the_driver() {
    let (dev, mem, mut t) = plain(COMMON_FEATURES);
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 8);
    let (a, w) = (buf(&mem, 16, 0), buf(&mem, 8, 0));
    q.add(&[seg(&a), seg(&w)], 1, 1).unwrap();
    q.publish().unwrap();
    let r = dev.take_requests(0).remove(0);
    dev.push_used(0, r.head as u32, 1000);
    assert_eq!(poll_all(&mut q), vec![Used { token: 1, len: 8 }]);
    assert_eq!(q.len_overruns(), 1, "a length beyond the writable bytes");
    dev.push_used(0, 5, 0);
    assert!(q.poll(|_| {}).is_err(), "an id not in flight");
}

#[test]
fn disconnect_and_abort_raise_the_broken_flag() {
    let (dev, mem, mut t) = plain(COMMON_FEATURES);
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 8);
    let broken = t.broken_flag();
    let (a, w) = (buf(&mem, 16, 0), buf(&mem, 8, 0));
    q.add(&[seg(&a), seg(&w)], 1, 1).unwrap();
    q.publish().unwrap();
    assert!(!broken.load(Ordering::Acquire) && dev.connected());
    dev.disconnect();
    assert!(broken.load(Ordering::Acquire) && !dev.connected());
    assert!(
        dev.take_requests(0).is_empty(),
        "a gone back-end takes nothing"
    );
    assert!(t.device_features().is_err(), "control calls fail");
    // abort() on the transport does the same from the driver's side.
    let t2 = dev.connect(&mem);
    assert!(!t2.broken_flag().load(Ordering::Acquire));
    t2.abort();
    assert!(t2.broken_flag().load(Ordering::Acquire) && !dev.connected());
}

#[test]
fn the_reopener_connects_anew_unless_refused() {
    let (dev, mem, mut t) = plain(COMMON_FEATURES);
    let mut q = bring_up(t.as_mut(), COMMON_FEATURES, 8);
    let (a, w) = (buf(&mem, 16, 0), buf(&mem, 8, 0));
    q.add(&[seg(&a), seg(&w)], 1, 1).unwrap();
    q.publish().unwrap();
    let old = dev.take_requests(0).remove(0);
    let reopen = t.reopener().unwrap();
    dev.refuse_connections(true);
    assert!(reopen(std::time::Duration::from_millis(1)).is_err());
    assert_eq!(dev.connections(), 1);
    dev.refuse_connections(false);
    let mut t2 = reopen(std::time::Duration::from_millis(1)).unwrap();
    assert_eq!(dev.connections(), 2);
    assert!(
        t.broken_flag().load(Ordering::Acquire),
        "the old connection is gone"
    );
    assert!(!t2.broken_flag().load(Ordering::Acquire));
    assert_eq!(dev.kicks(0), 0, "a new connection counts anew");
    // The old connection's request can no longer complete; the new one works.
    dev.complete(0, &old, 8);
    assert!(!q.has_used());
    let mut q2 = bring_up(t2.as_mut(), COMMON_FEATURES, 8);
    q2.add(&[seg(&a), seg(&w)], 1, 7).unwrap();
    q2.publish().unwrap();
    assert_eq!(dev.kicks(0), 1);
    let r = dev.take_requests(0).remove(0);
    dev.complete(0, &r, 8);
    assert_eq!(poll_all(&mut q2), vec![Used { token: 7, len: 8 }]);
}

/// A miniature virtio-blk driver on a [`RequestQueue`] against a [`FakeBlk`].
struct Drv {
    mem: Arc<DmaMemory>,
    _t: Box<dyn Transport>,
    rq: RequestQueue<RequestSlot>,
    /// Serve the queue after each publish (off: the test or a kick hook does).
    serve: bool,
}

const STATUS_OFF: usize = offset_of!(RequestSlot, status);

impl Drv {
    fn new(disk: &FakeBlk) -> Drv {
        let mem = test_memory(1 << 20);
        let mut t = disk.dev.connect(&mem);
        let ring = bring_up(t.as_mut(), ALL_BLK, 16);
        let rq = RequestQueue::new(&mem, ring, t.broken_flag()).unwrap();
        Drv {
            mem,
            _t: t,
            rq,
            serve: true,
        }
    }

    /// Submit one request: the slot; `ranges` go in the slot after the header.
    fn submit(
        &mut self,
        type_: u32,
        sector: u64,
        out: Option<&DmaBuf>,
        ranges: &[Range],
        input: Option<&DmaBuf>,
    ) -> u16 {
        let slot = self.rq.take_slot().unwrap();
        let s = self.rq.slot_mut(slot);
        s.hdr = ReqHeader {
            type_: type_.into(),
            ioprio: 0.into(),
            sector: sector.into(),
        };
        s.ranges[..ranges.len()].copy_from_slice(ranges);
        let base = self.rq.slot_addr(slot);
        let mut segs = vec![Segment {
            addr: base,
            len: 16,
        }];
        if !ranges.is_empty() {
            segs.push(Segment {
                addr: base + offset_of!(RequestSlot, ranges) as u64,
                len: 16 * ranges.len() as u32,
            });
        }
        segs.extend(out.map(seg));
        let n_out = segs.len();
        segs.extend(input.map(seg));
        segs.push(Segment {
            addr: base + STATUS_OFF as u64,
            len: 1,
        });
        self.rq.submit(slot, &segs, n_out).unwrap();
        self.rq.publish().unwrap();
        slot
    }

    /// Completions so far: (slot, status, used length).
    fn reap(&mut self) -> Vec<(u16, u8, u32)> {
        let mut done = Vec::new();
        self.rq
            .poll(|rq, slot, len| {
                done.push((slot, rq.read_at::<u8>(slot, STATUS_OFF), len));
                rq.release_slot(slot);
            })
            .unwrap();
        done
    }

    /// One request to completion: (status, used length).
    fn io(
        &mut self,
        disk: &FakeBlk,
        type_: u32,
        sector: u64,
        out: Option<&DmaBuf>,
        ranges: &[Range],
        input: Option<&DmaBuf>,
    ) -> (u8, u32) {
        let slot = self.submit(type_, sector, out, ranges, input);
        if self.serve {
            assert_eq!(disk.serve(0), 1);
        }
        let done = self.reap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0, slot);
        (done[0].1, done[0].2)
    }
}

#[test]
fn a_fake_blk_write_then_read_returns_the_data() {
    for packed in [false, true] {
        let disk = FakeBlk::new(1024, 1, 8);
        if packed {
            disk.offer_packed_ring();
        }
        fake_blk_write_then_read(&disk);
        assert_eq!(disk.dev.driver_features() & tf::RING_PACKED != 0, packed);
    }
}

fn fake_blk_write_then_read(disk: &FakeBlk) {
    let disk = disk.clone();
    let mut d = Drv::new(&disk);
    let mut data = d.mem.alloc(4096, 512).unwrap();
    for (i, b) in data.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    assert_eq!(d.io(&disk, T_OUT, 100, Some(&data), &[], None), (S_OK, 1));
    assert_eq!(disk.read_disk(100, 4096), data.as_slice());
    let back = buf(&d.mem, 4096, 0);
    assert_eq!(d.io(&disk, T_IN, 100, None, &[], Some(&back)), (S_OK, 4097));
    assert_eq!(back.as_slice(), data.as_slice());
    // Past the end, and not whole sectors: IOERR.
    assert_eq!(d.io(&disk, T_IN, 1020, None, &[], Some(&back)).0, S_IOERR);
    let odd = buf(&d.mem, 100, 0);
    assert_eq!(d.io(&disk, T_OUT, 0, Some(&odd), &[], None).0, S_IOERR);
    assert_eq!(d.io(&disk, T_FLUSH, 0, None, &[], None), (S_OK, 1));
    assert_eq!(
        disk.requests_seen(),
        vec![
            (T_OUT, 100, 4096),
            (T_IN, 100, 4096),
            (T_IN, 1020, 4096),
            (T_OUT, 0, 100),
            (T_FLUSH, 0, 0),
        ]
    );
}

#[test]
fn get_id_answers_the_serial() {
    let disk = FakeBlk::new(8, 1, 4);
    disk.serial("vireo-serial-1");
    let mut d = Drv::new(&disk);
    let id = buf(&d.mem, ID_BYTES, 0xff);
    assert_eq!(
        d.io(&disk, T_GET_ID, 0, None, &[], Some(&id)),
        (S_OK, ID_BYTES as u32 + 1)
    );
    let mut want = b"vireo-serial-1".to_vec();
    want.resize(ID_BYTES, 0);
    assert_eq!(id.as_slice(), want);
}

#[test]
fn discard_and_write_zeroes_change_the_disk() {
    let disk = FakeBlk::new(64, 1, 4);
    disk.write_disk(0, &[0x55; 64 * 512]);
    let mut d = Drv::new(&disk);
    let range = |sector: u64, n: u32, flags: u32| Range {
        sector: sector.into(),
        num_sectors: n.into(),
        flags: flags.into(),
    };
    let (st, _) = d.io(
        &disk,
        T_DISCARD,
        0,
        None,
        &[range(2, 2, 0), range(10, 1, 0)],
        None,
    );
    assert_eq!(st, S_OK);
    let (st, _) = d.io(
        &disk,
        T_WRITE_ZEROES,
        0,
        None,
        &[range(20, 3, WRITE_ZEROES_FLAG_UNMAP)],
        None,
    );
    assert_eq!(st, S_OK);
    let img = disk.read_disk(0, 64 * 512);
    for s in 0..64 {
        let zero = matches!(s, 2 | 3 | 10 | 20..=22);
        let want = if zero { 0 } else { 0x55 };
        assert!(
            img[s * 512..(s + 1) * 512].iter().all(|&b| b == want),
            "sector {s}"
        );
    }
    assert_eq!(disk.requests_seen()[0], (T_DISCARD, 0, 32));
    // A discard may not ask to unmap; a range past the end is an I/O error.
    let (st, _) = d.io(&disk, T_DISCARD, 0, None, &[range(0, 1, 1)], None);
    assert_eq!(st, S_UNSUPP);
    let (st, _) = d.io(&disk, T_WRITE_ZEROES, 0, None, &[range(63, 2, 0)], None);
    assert_eq!(st, S_IOERR);
    // Unknown types are unsupported.
    assert_eq!(d.io(&disk, 99, 0, None, &[], None).0, S_UNSUPP);
}

#[test]
fn fail_next_answers_with_the_status_given() {
    let disk = FakeBlk::new(64, 1, 4);
    let mut d = Drv::new(&disk);
    let data = buf(&d.mem, 512, 9);
    disk.fail_next(2, S_IOERR);
    assert_eq!(d.io(&disk, T_OUT, 0, Some(&data), &[], None), (S_IOERR, 1));
    assert_eq!(d.io(&disk, T_OUT, 1, Some(&data), &[], None), (S_IOERR, 1));
    assert_eq!(disk.read_disk(0, 1024), vec![0; 1024], "not executed");
    disk.fail_next(1, 0x7f);
    assert_eq!(d.io(&disk, T_FLUSH, 0, None, &[], None), (0x7f, 1));
    assert_eq!(d.io(&disk, T_OUT, 0, Some(&data), &[], None), (S_OK, 1));
    assert_eq!(disk.read_disk(0, 512), vec![9; 512]);
}

#[test]
fn held_requests_are_answered_on_release() {
    let disk = FakeBlk::new(64, 1, 4);
    let mut d = Drv::new(&disk);
    let data = buf(&d.mem, 512, 3);
    disk.hold(true);
    let s1 = d.submit(T_OUT, 5, Some(&data), &[], None);
    let s2 = d.submit(T_FLUSH, 0, None, &[], None);
    assert_eq!(disk.serve(0), 2, "collected");
    assert_eq!(disk.held(), 2);
    assert!(d.reap().is_empty());
    assert_eq!(disk.read_disk(5, 512), vec![0; 512]);
    assert_eq!(disk.release_held(0), 2);
    assert_eq!(d.reap(), vec![(s1, S_OK, 1), (s2, S_OK, 1)]);
    assert_eq!(disk.read_disk(5, 512), vec![3; 512]);
    // Held across a reconnection: dropped, never answered.
    let _ = d.submit(T_FLUSH, 0, None, &[], None);
    assert_eq!(disk.serve(0), 1);
    let _new = disk.dev.connect(&d.mem);
    assert_eq!(disk.release_held(0), 0);
    assert_eq!(disk.held(), 0);
    assert_eq!(d.rq.in_flight(), 1);
}

#[test]
fn auto_serve_answers_in_the_kick_without_a_thread() {
    let disk = FakeBlk::new(64, 2, 4);
    disk.serial("auto");
    disk.auto_serve(true);
    let mut d = Drv::new(&disk);
    d.serve = false;
    assert_eq!(disk.dev.driver_features() & bf::MQ, bf::MQ);
    let id = buf(&d.mem, ID_BYTES, 0);
    assert_eq!(
        d.io(&disk, T_GET_ID, 0, None, &[], Some(&id)),
        (S_OK, ID_BYTES as u32 + 1)
    );
    assert_eq!(&id.as_slice()[..5], b"auto\0");
    let data = buf(&d.mem, 1024, 0xee);
    for i in 0..40 {
        assert_eq!(
            d.io(&disk, T_OUT, 2 * (i % 30), Some(&data), &[], None),
            (S_OK, 1)
        );
    }
    assert_eq!(
        disk.dev.kicks(0),
        41,
        "every publish kicked (EVENT_IDX re-armed)"
    );
    assert_eq!(disk.read_disk(58, 1024), vec![0xee; 1024]);
    disk.auto_serve(false);
    let _ = d.submit(T_FLUSH, 0, None, &[], None);
    assert!(d.reap().is_empty());
    assert_eq!(disk.serve(0), 1);
    assert_eq!(d.reap().len(), 1);
}

#[test]
fn the_fakes_go_to_other_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<FakeDevice>();
    send_sync::<FakeBlk>();
    send_sync::<FakeRequest>();
    // A device thread serving while the driver polls works too.
    let disk = FakeBlk::new(64, 1, 4);
    let mut d = Drv::new(&disk);
    d.serve = false;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (disk, stop) = (disk.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if disk.serve(0) == 0 {
                    std::thread::yield_now();
                }
            }
        })
    };
    let data = buf(&d.mem, 512, 1);
    let slot = d.submit(T_OUT, 3, Some(&data), &[], None);
    let mut done = Vec::new();
    while done.is_empty() {
        done = d.reap();
    }
    stop.store(true, Ordering::Release);
    server.join().unwrap();
    assert_eq!(done, vec![(slot, S_OK, 1)]);
    assert_eq!(disk.read_disk(3, 512), vec![1; 512]);
}

#[test]
fn a_packed_ring_is_served_when_negotiated() {
    let features = COMMON_FEATURES | tf::RING_PACKED;
    let (dev, mem, mut t) = plain(features);
    let mut q = bring_up(t.as_mut(), features, 6);
    assert!(q.is_packed(), "any size: 6 entries");
    let (a, b, w) = (buf(&mem, 16, 1), buf(&mem, 100, 2), buf(&mem, 33, 0));
    q.add(&[seg(&a), seg(&b), seg(&w)], 2, 5).unwrap();
    q.add(&[seg(&a), seg(&w)], 1, 6).unwrap();
    assert!(q.publish().unwrap(), "the first batch is notified");
    let reqs = dev.take_requests(0);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].readable, vec![(a.iova(), 16), (b.iova(), 100)]);
    assert_eq!(reqs[0].writable, vec![(w.iova(), 33)]);
    assert_eq!(reqs[1].readable, vec![(a.iova(), 16)]);
    assert_eq!(dev.outstanding(0), 2);
    // With event index the device asks to be kicked at its next read position: the
    // next batch notifies, one made before it took the previous would not.
    q.add(&[seg(&a), seg(&w)], 1, 7).unwrap();
    assert!(q.publish().unwrap());
    assert_eq!(dev.kicks(0), 2);
    let more = dev.take_requests(0);
    assert_eq!(more.len(), 1);
    // Out of order, a length, interrupts off until asked for.
    dev.complete(0, &reqs[1], 20);
    assert_eq!(poll_all(&mut q), vec![Used { token: 6, len: 20 }]);
    assert_eq!(dev.signals(0), 0, "polled: interrupts off");
    assert!(!q.enable_interrupts());
    dev.complete(0, &more[0], 0);
    assert_eq!(dev.signals(0), 1, "armed: the next used entry interrupts");
    q.disable_interrupts();
    dev.complete(0, &reqs[0], 33);
    assert_eq!(dev.signals(0), 1);
    assert_eq!(
        poll_all(&mut q),
        vec![Used { token: 7, len: 0 }, Used { token: 5, len: 33 }]
    );
    assert_eq!(q.num_free(), 6);
    // A lie: an id not in flight, where the device's next used descriptor goes.
    q.add(&[seg(&a), seg(&w)], 1, 8).unwrap();
    q.publish().unwrap();
    dev.push_used(0, 3, 0);
    assert!(q.poll(|_| {}).is_err());
}

#[test]
fn a_ring_of_the_wrong_kind_is_refused_at_set_up() {
    let features = COMMON_FEATURES | tf::RING_PACKED;
    let (_dev, mem, mut t) = plain(features);
    negotiate(t.as_mut(), features).unwrap();
    let split = crate::ring::SplitQueue::new(
        &mem,
        0,
        8,
        QueueOptions::default(),
        Notifier::Counter(Default::default()),
    )
    .unwrap();
    let e = t.setup_queue(0, &split.layout()).unwrap_err().to_string();
    assert!(e.contains("split ring") && e.contains("RING_PACKED"), "{e}");
}

#[test]
fn a_malformed_packed_list_panics_as_a_driver_bug() {
    let features = COMMON_FEATURES | tf::RING_PACKED;
    let (dev, mem, mut t) = plain(features);
    let mut q = bring_up(t.as_mut(), features, 8);
    let (a, w) = (buf(&mem, 16, 0), buf(&mem, 16, 0));
    q.add(&[seg(&a), seg(&w)], 1, 1).unwrap();
    q.publish().unwrap();
    // The second descriptor of the list loses its AVAIL bit: the list is not whole.
    let desc = dev.layout(0).unwrap().desc_va;
    poke(desc, 1, 14, DESC_F_WRITE | (1 << 15));
    let m = take_panics(&dev);
    assert!(
        m.contains("driver bug") && m.contains("not available"),
        "{m}"
    );
}
