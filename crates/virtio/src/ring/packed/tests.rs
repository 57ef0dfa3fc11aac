//! The packed ring against a device side written from the spec
//! (`crate::testing::packed::PackedDeviceRing`, which shares no code with this driver).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use super::*;
use crate::features::transport as tf;
use crate::memory::DmaConfig;
use crate::testing::packed::{DeviceChain, KickMe, PackedDeviceRing};

struct Harness {
    mem: Arc<DmaMemory>,
    q: PackedQueue,
    dev: PackedDeviceRing,
    kicks: Arc<AtomicU64>,
}

fn features(opts: QueueOptions) -> u64 {
    let mut f = tf::VERSION_1 | tf::RING_PACKED;
    if opts.event_idx {
        f |= tf::RING_EVENT_IDX;
    }
    if opts.indirect_max > 1 {
        f |= tf::RING_INDIRECT_DESC;
    }
    f
}

fn opts(event_idx: bool, indirect_max: u16) -> QueueOptions {
    QueueOptions {
        event_idx,
        indirect_max,
        packed: true,
    }
}

fn harness(size: u16, o: QueueOptions) -> Harness {
    let mem = DmaMemory::new(DmaConfig {
        initial_region_size: 4 << 20,
        ..DmaConfig::default()
    })
    .unwrap();
    let kicks = Arc::new(AtomicU64::new(0));
    let q = PackedQueue::new(&mem, 0, size, o, Notifier::Counter(kicks.clone())).unwrap();
    let dev = PackedDeviceRing::new(&q.layout(), features(o));
    Harness { mem, q, dev, kicks }
}

impl Harness {
    /// Every buffer the driver made available, in ring order.
    fn take_all(&mut self) -> Vec<DeviceChain> {
        let mem = self.mem.clone();
        let translate = |a: u64, l: u64| {
            mem.regions()
                .iter()
                .find(|r| a >= r.iova && l <= r.len && a - r.iova <= r.len - l)
                .map(|r| r.va + (a - r.iova))
        };
        let mut out = Vec::new();
        while let Some(c) = self.dev.take(translate) {
            out.push(c.unwrap_or_else(|e| panic!("driver bug: {e}")));
        }
        out
    }

    fn poll_all(&mut self) -> Vec<Used> {
        let mut v = Vec::new();
        self.q.poll(|u| v.push(u)).unwrap();
        v
    }

    fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::Relaxed)
    }
}

/// `n` segments inside the harness memory (their bytes are never read by these
/// tests, but the device checks that they lie in the memory).
fn segs(h: &Harness, n: usize, tag: u64) -> Vec<Segment> {
    let base = h.mem.regions()[0].iova;
    (0..n)
        .map(|i| Segment {
            addr: base + 0x10_0000 + 0x1000 * (i as u64) + tag * 8,
            len: 512 * (i as u32 + 1),
        })
        .collect()
}

fn expect_chain(c: &DeviceChain, s: &[Segment], n_out: usize) {
    let (r, w): (Vec<_>, Vec<_>) = s.iter().enumerate().partition(|(i, _)| *i < n_out);
    let pick =
        |v: Vec<(usize, &Segment)>| v.iter().map(|(_, s)| (s.addr, s.len)).collect::<Vec<_>>();
    assert_eq!(c.readable, pick(r));
    assert_eq!(c.writable, pick(w));
}

#[test]
fn chains_reach_the_device_intact_and_complete_in_any_order() {
    let mut h = harness(16, opts(false, 0));
    let reqs = [(3usize, 1usize), (1, 0), (4, 2), (2, 2)];
    let mut sent = Vec::new();
    for (t, &(n, n_out)) in reqs.iter().enumerate() {
        let s = segs(&h, n, t as u64);
        h.q.add(&s, n_out, 100 + t as u64).unwrap();
        sent.push((s, n_out));
    }
    assert_eq!(h.q.num_free(), 16 - 10);
    assert!(
        h.q.publish().unwrap(),
        "the device asks for every notification"
    );
    assert_eq!(h.kicks(), 1);
    let chains = h.take_all();
    assert_eq!(chains.len(), 4);
    for (c, (s, n_out)) in chains.iter().zip(&sent) {
        expect_chain(c, s, *n_out);
        assert_eq!(c.entries as usize, s.len());
        assert!(!c.indirect);
    }
    // Used in reverse order: each used descriptor goes at the device's next position
    // and skips the entries of the buffer it names.
    for c in chains.iter().rev() {
        let w: u32 = c.writable.iter().map(|x| x.1).sum();
        h.dev.put_used(c.id, w);
    }
    let got = h.poll_all();
    let tokens: Vec<u64> = got.iter().map(|u| u.token).collect();
    assert_eq!(tokens, vec![103, 102, 101, 100]);
    let lens: Vec<u32> = got.iter().map(|u| u.len).collect();
    assert_eq!(lens, vec![0, 1536 + 2048, 512, 1024 + 1536]);
    assert_eq!(h.q.num_free(), 16);
    assert_eq!(h.q.in_flight(), 0);
    assert_eq!(h.q.write_position_for_test(), h.dev.write_position());
}

impl PackedQueue {
    /// The driver's used position and wrap counter (where it expects the device's next
    /// used descriptor).
    fn write_position_for_test(&self) -> (u16, bool) {
        (self.next_used, self.used_wrap)
    }
}

#[test]
fn a_full_ring_refuses_without_consuming_and_recovers() {
    let mut h = harness(8, opts(false, 0));
    for t in 0..4 {
        let s = segs(&h, 2, t);
        h.q.add(&s, 1, t).unwrap();
    }
    let s = segs(&h, 1, 9);
    assert_eq!(h.q.add(&s, 1, 9), Err(QueueFull));
    assert!(h.q.overflowed());
    assert_eq!(h.q.num_free(), 0);
    h.q.publish().unwrap();
    let chains = h.take_all();
    assert_eq!(chains.len(), 4);
    h.dev.put_used(chains[1].id, 0);
    assert_eq!(h.poll_all().len(), 1);
    assert!(!h.q.overflowed(), "a reap clears it");
    assert_eq!(h.q.num_free(), 2);
    // Two entries free: a chain of two fits, a chain of three does not.
    let s3 = segs(&h, 3, 10);
    assert_eq!(h.q.add(&s3, 1, 10), Err(QueueFull));
    let s2 = segs(&h, 2, 11);
    h.q.add(&s2, 1, 11).unwrap();
    h.q.publish().unwrap();
    let more = h.take_all();
    assert_eq!(more.len(), 1);
    expect_chain(&more[0], &s2, 1);
}

#[test]
fn long_chains_and_a_crowded_ring_go_through_one_indirect_descriptor() {
    let mut h = harness(4, opts(false, 8));
    // Six segments: more than DIRECT_CHAIN_MAX, and more than the ring has entries.
    let long = segs(&h, 6, 0);
    h.q.add(&long, 3, 1).unwrap();
    assert_eq!(h.q.num_free(), 3);
    // Two short chains directly; then the ring has one entry left and a chain of two
    // goes indirect.
    let a = segs(&h, 1, 2);
    h.q.add(&a, 1, 2).unwrap();
    let b = segs(&h, 1, 3);
    h.q.add(&b, 0, 3).unwrap();
    let c = segs(&h, 2, 4);
    h.q.add(&c, 1, 4).unwrap();
    assert_eq!(h.q.num_free(), 0);
    h.q.publish().unwrap();
    let chains = h.take_all();
    assert_eq!(chains.len(), 4);
    assert!(chains[0].indirect && chains[3].indirect);
    assert!(!chains[1].indirect && !chains[2].indirect);
    expect_chain(&chains[0], &long, 3);
    expect_chain(&chains[3], &c, 1);
    // Completed out of order.
    for i in [3, 0, 2, 1] {
        h.dev.put_used(chains[i].id, 1);
    }
    let tokens: Vec<u64> = h.poll_all().iter().map(|u| u.token).collect();
    assert_eq!(tokens, vec![4, 1, 3, 2]);
    assert_eq!(h.q.num_free(), 4);
}

#[test]
fn a_chain_wraps_around_the_end_of_the_ring() {
    // Size 5 (packed rings need not be powers of two): a chain of three starting at
    // entry 3 takes entries 3, 4 and 0, the last with the next lap's flags.
    let mut h = harness(5, opts(false, 0));
    for t in 0..3 {
        let s = segs(&h, 1, t);
        h.q.add(&s, 0, t).unwrap();
    }
    h.q.publish().unwrap();
    for c in h.take_all() {
        h.dev.put_used(c.id, 0);
    }
    assert_eq!(h.poll_all().len(), 3);
    let s = segs(&h, 3, 7);
    h.q.add(&s, 1, 7).unwrap();
    h.q.publish().unwrap();
    let chains = h.take_all();
    assert_eq!(chains.len(), 1);
    expect_chain(&chains[0], &s, 1);
    assert_eq!(
        h.dev.read_position(),
        (1, false),
        "the device is in the next lap"
    );
    h.dev.put_used(chains[0].id, 1024 + 1536);
    let got = h.poll_all();
    assert_eq!(
        got,
        vec![Used {
            token: 7,
            len: 1024 + 1536
        }]
    );
    assert_eq!(h.q.write_position_for_test(), (1, false));
}

#[test]
fn notifications_follow_the_device_event_suppression() {
    // Without event index: DISABLE suppresses, ENABLE asks for each batch.
    let mut h = harness(8, opts(false, 0));
    h.dev.kick_me(KickMe::Never);
    let s = segs(&h, 1, 0);
    h.q.add(&s, 0, 1).unwrap();
    assert!(!h.q.publish().unwrap());
    assert!(!h.q.publish().unwrap(), "nothing new: no decision to make");
    h.dev.kick_me(KickMe::Always);
    h.q.add(&s, 0, 2).unwrap();
    h.q.add(&s, 0, 3).unwrap();
    assert!(h.q.publish().unwrap());
    assert_eq!(h.kicks(), 1);
    // DESC without event index negotiated is not valid: the driver notifies.
    h.dev.kick_me(KickMe::At {
        offset: 7,
        wrap: true,
    });
    h.q.add(&s, 0, 4).unwrap();
    assert!(h.q.publish().unwrap());

    // With event index: a notification exactly when the batch makes the named entry
    // available.
    let mut h = harness(4, opts(true, 0));
    let s = segs(&h, 1, 0);
    h.dev.kick_me(KickMe::At {
        offset: 2,
        wrap: true,
    });
    h.q.add(&s, 0, 1).unwrap(); // entry 0
    assert!(!h.q.publish().unwrap());
    h.q.add(&s, 0, 2).unwrap(); // entry 1
    h.q.add(&s, 0, 3).unwrap(); // entry 2: crosses the event
    assert!(h.q.publish().unwrap());
    assert_eq!(h.kicks(), 1);
    // The device catches up and asks for the next entry (3, this lap).
    let chains = h.take_all();
    assert_eq!(chains.len(), 3);
    h.dev.kick_me(KickMe::AtNext);
    for c in &chains {
        h.dev.put_used(c.id, 0);
    }
    assert_eq!(h.poll_all().len(), 3);
    h.q.add(&s, 0, 4).unwrap(); // entry 3
    h.q.add(&s, 0, 5).unwrap(); // entry 0 of the next lap
    assert!(h.q.publish().unwrap());
    assert_eq!(h.kicks(), 2);
    // An event of the next lap that the batch does not reach: no notification.
    let chains = h.take_all();
    h.dev.kick_me(KickMe::At {
        offset: 3,
        wrap: false,
    });
    for c in &chains {
        h.dev.put_used(c.id, 0);
    }
    h.poll_all();
    h.q.add(&s, 0, 6).unwrap(); // entry 1 (lap 2)
    assert!(!h.q.publish().unwrap());
    // An event in the previous lap counts as passed long ago: nothing either.
    h.dev.kick_me(KickMe::At {
        offset: 3,
        wrap: true,
    });
    h.q.add(&s, 0, 7).unwrap(); // entry 2
    assert!(!h.q.publish().unwrap());
    assert_eq!(h.kicks(), 2);
}

#[test]
fn the_event_check_handles_a_batch_that_crosses_the_end_of_the_ring() {
    for (event, lap, want) in [
        (7, true, true),   // in the batch, this lap
        (0, false, true),  // in the batch, the next lap
        (1, false, true),  // its last entry
        (2, false, false), // just past it
        (5, true, false),  // just before it
    ] {
        let mut h = harness(8, opts(true, 0));
        let s = segs(&h, 1, 0);
        // Six entries made available and used: the next batch starts at entry 6.
        for t in 0..6 {
            h.q.add(&s, 0, t).unwrap();
        }
        h.dev.kick_me(KickMe::Never);
        h.q.publish().unwrap();
        for c in h.take_all() {
            h.dev.put_used(c.id, 0);
        }
        assert_eq!(h.poll_all().len(), 6);
        // A batch of four: entries 6 and 7 of this lap, 0 and 1 of the next.
        h.dev.kick_me(KickMe::At {
            offset: event,
            wrap: lap,
        });
        for t in 0..4 {
            h.q.add(&s, 0, t).unwrap();
        }
        assert_eq!(
            h.q.publish().unwrap(),
            want,
            "event at {event} (wrap {lap})"
        );
    }
}

#[test]
fn interrupts_stay_off_until_a_waiter_asks() {
    for event_idx in [false, true] {
        let mut h = harness(4, opts(event_idx, 0));
        let s = segs(&h, 1, 0);
        h.q.add(&s, 0, 1).unwrap();
        h.q.publish().unwrap();
        let c = h.take_all();
        assert!(!h.dev.put_used(c[0].id, 0), "polled: no interrupt");
        assert!(h.q.enable_interrupts(), "a completion is already there");
        assert_eq!(h.poll_all().len(), 1);
        assert!(!h.q.enable_interrupts(), "nothing pending");
        h.q.add(&s, 0, 2).unwrap();
        h.q.publish().unwrap();
        let c = h.take_all();
        assert!(
            h.dev.put_used(c[0].id, 0),
            "armed: the next completion interrupts"
        );
        h.q.disable_interrupts();
        h.poll_all();
        h.q.add(&s, 0, 3).unwrap();
        h.q.publish().unwrap();
        let c = h.take_all();
        assert!(!h.dev.put_used(c[0].id, 0), "disarmed again");
    }
}

#[test]
fn with_event_index_the_interrupt_comes_for_the_next_used_entry_only() {
    let mut h = harness(4, opts(true, 0));
    let s = segs(&h, 1, 0);
    for t in 0..3 {
        h.q.add(&s, 0, t).unwrap();
    }
    h.q.publish().unwrap();
    let c = h.take_all();
    assert!(!h.q.enable_interrupts());
    assert!(
        h.dev.put_used(c[1].id, 0),
        "the used entry the driver waits for"
    );
    assert!(
        !h.dev.put_used(c[0].id, 0),
        "later ones do not interrupt again"
    );
}

/// A device that lies, by the used descriptor it writes at the driver's used position.
#[test]
fn a_lying_device_is_caught() {
    let lie = |id: u16, len: u32, write: bool| {
        let mut h = harness(8, opts(false, 0));
        let s = segs(&h, 2, 0);
        h.q.add(&s, 1, 1).unwrap();
        h.q.publish().unwrap();
        let _ = h.take_all();
        h.dev.put_used_raw(id, len, write, 2);
        let mut got = Vec::new();
        let r = h.q.poll(|u| got.push(u));
        (r, got, h.q.len_overruns())
    };
    // An id out of range, and one in range that is not in flight.
    assert!(matches!(lie(99, 0, true).0, Err(Error::Device(_))));
    assert!(matches!(lie(5, 0, true).0, Err(Error::Device(_))));
    // The id of the request (the first free id, 0): a length beyond the writable bytes
    // (1024) is clamped and counted.
    let (r, got, overruns) = lie(0, 5000, true);
    assert_eq!(r.unwrap(), 1);
    assert_eq!(
        got,
        vec![Used {
            token: 1,
            len: 1024
        }]
    );
    assert_eq!(overruns, 1);
    // Without VIRTQ_DESC_F_WRITE the length is reserved: 0.
    let (_, got, _) = lie(0, 100, false);
    assert_eq!(got, vec![Used { token: 1, len: 0 }]);

    // A completion of a request added but not made available yet (its first
    // descriptor's flags are still withheld): the device cannot know it, and a driver
    // that took it would hand its id and entries out while `publish` later makes them
    // available again.
    let mut h = harness(8, opts(false, 0));
    let s = segs(&h, 2, 0);
    h.q.add(&s, 1, 1).unwrap();
    h.dev.put_used_raw(0, 0, true, 2);
    let e = h.q.poll(|_| panic!("completed")).unwrap_err().to_string();
    assert!(e.contains("not yet made available"), "{e}");
    // One made available, then one not: the first completes, the second is refused.
    let mut h = harness(8, opts(false, 0));
    let s = segs(&h, 2, 0);
    h.q.add(&s, 1, 1).unwrap();
    h.q.publish().unwrap();
    let _ = h.take_all();
    h.q.add(&s, 1, 2).unwrap();
    h.dev.put_used_raw(0, 0, true, 2);
    h.dev.put_used_raw(1, 0, true, 2);
    let mut got = Vec::new();
    let e = h.q.poll(|u| got.push(u.token)).unwrap_err().to_string();
    assert!(e.contains("not yet made available"), "{e}");
    assert_eq!(got, vec![1]);
}

#[test]
fn only_a_descriptor_with_both_bits_of_the_current_lap_is_a_completion() {
    let mut h = harness(4, opts(false, 0));
    let s = segs(&h, 1, 0);
    h.q.add(&s, 0, 1).unwrap();
    h.q.publish().unwrap();
    let _ = h.take_all();
    let flags_entry0 = |h: &Harness| h.q.flags_at(0);
    // The driver's own available descriptor (AVAIL=1, USED=0) is not a completion.
    assert_eq!(
        flags_entry0(&h) & (DESC_F_AVAIL | DESC_F_USED),
        DESC_F_AVAIL
    );
    assert!(!h.q.has_used());
    // A "used" descriptor of the other lap (both bits 0) is not one either.
    let tail =
        |h: &Harness, flags: u16| h.q.tail(0).store(u64::from(flags) << 48, Ordering::Release);
    tail(&h, 0);
    assert!(!h.q.has_used());
    assert_eq!(h.poll_all().len(), 0);
    // AVAIL=0, USED=1: neither.
    tail(&h, DESC_F_USED);
    assert!(!h.q.has_used());
    // Both 1: the completion of id 0.
    tail(&h, DESC_F_USED | DESC_F_AVAIL);
    assert!(h.q.has_used());
    assert_eq!(h.poll_all(), vec![Used { token: 1, len: 0 }]);
    // Nothing in flight: whatever the device writes is not looked at.
    tail(&h, DESC_F_USED | DESC_F_AVAIL);
    assert!(!h.q.has_used());
    assert_eq!(h.poll_all().len(), 0);
}

#[test]
fn bad_sizes_are_rejected_and_any_size_up_to_32768_is_accepted() {
    let mem = DmaMemory::new(DmaConfig::default()).unwrap();
    let n = || Notifier::Counter(Arc::new(AtomicU64::new(0)));
    assert!(PackedQueue::new(&mem, 0, 0, opts(false, 0), n()).is_err());
    assert!(PackedQueue::new(&mem, 0, 32769, opts(false, 0), n()).is_err());
    for size in [1, 3, 100, 32768] {
        let q = PackedQueue::new(&mem, 0, size, opts(false, 0), n()).unwrap();
        let l = q.layout();
        assert!(l.packed);
        assert_eq!(l.desc_va % 16, 0);
        assert_eq!(l.avail_va % 4, 0);
        assert_eq!(l.used_va % 4, 0);
        assert!(l.avail_va >= l.desc_va + 16 * size as u64);
        assert_eq!(l.avail_iova - l.desc_iova, l.avail_va - l.desc_va);
    }
}

#[test]
fn slot_heads_put_each_request_under_its_token_through_its_own_table() {
    let mut h = harness(8, opts(false, 4));
    assert!(h.q.use_slot_heads());
    // Every slot at once, three segments each (more than the ring could hold
    // directly).
    let mut want = HashMap::new();
    for slot in (0..8u64).rev() {
        let s = segs(&h, 3, slot);
        h.q.add(&s, 1, slot).unwrap();
        want.insert(slot as u16, s);
    }
    assert_eq!(h.q.num_free(), 0);
    h.q.publish().unwrap();
    let chains = h.take_all();
    assert_eq!(chains.len(), 8);
    for c in &chains {
        assert!(c.indirect);
        assert_eq!(c.entries, 1);
        expect_chain(c, &want[&c.id], 1);
    }
    let ids: Vec<u16> = chains.iter().map(|c| c.id).collect();
    assert_eq!(
        ids,
        (0..8).rev().collect::<Vec<u16>>(),
        "ids are the tokens"
    );
    // The same slot with the same buffers leaves its table as it was (no store: the
    // bytes would be the same anyway; the table must still hold them).
    let table = |h: &Harness, id: u16| {
        let (p, _) = h.q.table(id).unwrap();
        // SAFETY: the table of a valid id, inside the queue's indirect buffer.
        unsafe { std::slice::from_raw_parts(p, 3 * DESC_SIZE) }.to_vec()
    };
    let before = table(&h, 5);
    for c in &chains {
        h.dev.put_used(c.id, 0);
    }
    assert_eq!(h.poll_all().len(), 8);
    h.q.add(&want[&5], 1, 5).unwrap();
    assert_eq!(table(&h, 5), before);
    h.q.publish().unwrap();
    let again = h.take_all();
    expect_chain(&again[0], &want[&5], 1);
}

#[test]
fn slot_heads_refuse_a_busy_slot_a_long_chain_and_a_token_beyond_the_ring() {
    let mut h = harness(8, opts(false, 4));
    assert!(h.q.use_slot_heads());
    let s = segs(&h, 2, 0);
    h.q.add(&s, 1, 3).unwrap();
    assert_eq!(h.q.add(&s, 1, 3), Err(QueueFull), "slot 3 is on the device");
    assert_eq!(
        h.q.add(&segs(&h, 5, 0), 1, 4),
        Err(QueueFull),
        "longer than a table"
    );
    assert_eq!(h.q.add(&s, 1, 8), Err(QueueFull), "beyond the ring");
    assert_eq!(h.q.in_flight(), 1);
}

#[test]
fn slot_heads_need_indirect_descriptors_and_an_idle_ring() {
    let mut h = harness(8, opts(false, 0));
    assert!(!h.q.use_slot_heads());
    let mut h = harness(8, opts(false, 4));
    let s = segs(&h, 1, 0);
    h.q.add(&s, 0, 0).unwrap();
    assert!(!h.q.use_slot_heads(), "not with requests in flight");
}

#[test]
fn the_next_in_order_hint_is_the_oldest_request() {
    let mut h = harness(8, opts(false, 0));
    assert_eq!(h.q.next_in_order(), None);
    for t in [10, 11, 12] {
        let s = segs(&h, 2, t);
        h.q.add(&s, 1, t).unwrap();
    }
    h.q.publish().unwrap();
    assert_eq!(h.q.next_in_order(), Some(10));
    let c = h.take_all();
    h.dev.put_used(c[0].id, 0);
    h.poll_all();
    assert_eq!(h.q.next_in_order(), Some(11));
    // Out of order: the hint names whatever started at the next used entry.
    // Out of order: 12's used descriptor goes at entry 2 and skips two, so the next
    // used position is entry 4, where 12's chain began; 12 is done: no hint (11, still
    // out, would complete there).
    h.dev.put_used(c[2].id, 0);
    h.poll_all();
    assert_eq!(h.q.next_in_order(), None);
    h.dev.put_used(c[1].id, 0);
    assert_eq!(h.poll_all(), vec![Used { token: 11, len: 0 }]);
}

/// A little deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random chains, random completion order, random batch sizes, over many laps of rings
/// of odd and even sizes: every request reaches the device as it was added and comes
/// back once with its own token, and the ring's accounting agrees with the device's.
#[test]
fn random_traffic_over_many_laps_agrees_with_the_device() {
    for (size, indirect, event_idx, slot_heads) in [
        (1u16, 0u16, false, false),
        (3, 0, true, false),
        (7, 4, false, false),
        (8, 4, true, true),
        (13, 6, true, false),
        (16, 0, false, false),
    ] {
        let mut h = harness(size, opts(event_idx, indirect));
        if slot_heads {
            assert!(h.q.use_slot_heads());
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ size as u64);
        let mut sent: HashMap<u64, (Vec<Segment>, usize)> = HashMap::new();
        let mut held: Vec<DeviceChain> = Vec::new();
        let mut next_token = 0u64;
        let mut free_slots: Vec<u64> = (0..size as u64).collect();
        let mut done = 0;
        for _round in 0..3000 {
            // Add a few.
            for _ in 0..rng.below(4) {
                let max_n = if indirect > 1 {
                    indirect as u64
                } else {
                    size as u64
                };
                let n = 1 + rng.below(max_n.min(6)) as usize;
                let n_out = rng.below(n as u64 + 1) as usize;
                let token = if slot_heads {
                    match free_slots.pop() {
                        Some(t) => t,
                        None => break,
                    }
                } else {
                    next_token += 1;
                    next_token
                };
                let s = segs(&h, n, token % 64);
                match h.q.add(&s, n_out, token) {
                    Ok(()) => {
                        sent.insert(token, (s, n_out));
                    }
                    Err(QueueFull) => {
                        if slot_heads {
                            free_slots.push(token);
                        }
                        break;
                    }
                }
            }
            let published = rng.below(3) != 0;
            if published {
                h.q.publish().unwrap();
            }
            // The device takes what is there and completes a random subset, in a
            // random order.
            held.extend(h.take_all());
            let k = rng.below(held.len() as u64 + 1) as usize;
            for _ in 0..k {
                let i = rng.below(held.len() as u64) as usize;
                let c = held.swap_remove(i);
                let w: u32 = c.writable.iter().map(|x| x.1).sum();
                h.dev.put_used(c.id, w);
            }
            for u in h.poll_all() {
                let (s, n_out) = sent.remove(&u.token).expect("a token in flight, once");
                let w: u32 = s[n_out..].iter().map(|x| x.len).sum();
                assert_eq!(u.len, w);
                if slot_heads {
                    free_slots.push(u.token);
                }
                done += 1;
            }
            assert_eq!(h.q.in_flight() as usize, sent.len());
            assert_eq!(h.dev.held(), held.len());
            assert_eq!(h.q.write_position_for_test(), h.dev.write_position());
            if published {
                // Everything added was taken (an unpublished batch is not visible): the
                // driver's free entries and the entries of the buffers the device holds
                // are the whole ring.
                assert_eq!(sent.len(), held.len());
                let entries: usize = held.iter().map(|c| c.entries as usize).sum();
                assert_eq!(h.q.num_free() as usize + entries, size as usize);
            } else {
                assert!(held.len() <= sent.len());
            }
        }
        assert!(done > 1000, "size {size}: {done} completions");
    }
}

#[test]
fn a_batch_becomes_available_at_publish_all_at_once() {
    let mut h = harness(8, opts(false, 4));
    assert!(h.q.use_slot_heads());
    for t in 0..3 {
        let s = segs(&h, 3, t);
        h.q.add(&s, 1, t).unwrap();
    }
    assert!(h.take_all().is_empty(), "nothing before publish");
    h.q.publish().unwrap();
    assert_eq!(h.take_all().len(), 3);
    // A second batch while the first is out; renotify releases a batch too (a queue
    // that stopped moving is notified about what it has).
    let s = segs(&h, 1, 9);
    h.q.add(&s, 0, 5).unwrap();
    assert!(h.take_all().is_empty());
    h.q.renotify().unwrap();
    assert_eq!(h.take_all().len(), 1);
    assert_eq!(h.q.in_flight(), 4);
}
