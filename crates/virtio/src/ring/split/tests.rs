//! The driver ring against rust-vmm's `virtio-queue`, the device-side model.

use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicU64;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::memory::DmaConfig;

struct Harness {
    mem: Arc<DmaMemory>,
    gm: GuestMemoryMmap,
    dev: Queue,
    q: SplitQueue,
    kicks: Arc<AtomicU64>,
}

/// Map every region of the driver's memory into a device-side guest memory at
/// GPA == driver VA, the way a vhost-user back-end sees it.
fn device_view(mem: &DmaMemory) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = mem
        .regions()
        .iter()
        .map(|r| {
            // SAFETY: the descriptor belongs to the memory, which outlives this call.
            let fd = unsafe { BorrowedFd::borrow_raw(r.fd) };
            let file = File::from(fd.try_clone_to_owned().unwrap());
            (
                GuestAddress(r.iova),
                r.len as usize,
                Some(FileOffset::new(file, 0)),
            )
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges).unwrap()
}

fn harness(size: u16, opts: QueueOptions) -> Harness {
    let mem = DmaMemory::new(DmaConfig {
        initial_region_size: 8 << 20,
        ..DmaConfig::default()
    })
    .unwrap();
    let kicks = Arc::new(AtomicU64::new(0));
    let q = SplitQueue::new(&mem, 0, size, opts, Notifier::Counter(kicks.clone())).unwrap();
    let gm = device_view(&mem);
    let l = q.layout();
    let mut dev = Queue::new(size).unwrap();
    dev.set_size(size);
    dev.set_desc_table_address(Some(l.desc_iova as u32), Some((l.desc_iova >> 32) as u32));
    dev.set_avail_ring_address(Some(l.avail_iova as u32), Some((l.avail_iova >> 32) as u32));
    dev.set_used_ring_address(Some(l.used_iova as u32), Some((l.used_iova >> 32) as u32));
    dev.set_event_idx(opts.event_idx);
    dev.set_ready(true);
    assert!(dev.is_valid(&gm));
    Harness {
        mem,
        gm,
        dev,
        q,
        kicks,
    }
}

/// Pop every available chain: (head, [(addr, len, write)]).
/// A chain as the device saw it: head and (addr, len, device-writable) per descriptor.
type Chain = (u16, Vec<(u64, u32, bool)>);

fn pop_all(h: &mut Harness) -> Vec<Chain> {
    let mut out = Vec::new();
    let gm = &h.gm;
    for chain in h.dev.iter(gm).unwrap() {
        let head = chain.head_index();
        let descs = chain
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        out.push((head, descs));
    }
    out
}

fn segs(n: usize, _n_out: usize) -> Vec<Segment> {
    (0..n)
        .map(|i| Segment {
            addr: 0x1000 * (i as u64 + 1),
            len: 512 * (i as u32 + 1),
        })
        .collect()
}

#[test]
fn chains_reach_the_device_intact_and_complete_in_any_order() {
    let mut h = harness(16, QueueOptions::default());
    let reqs = [(3usize, 1usize), (1, 0), (4, 2), (2, 2)];
    for (t, &(n, n_out)) in reqs.iter().enumerate() {
        h.q.add(&segs(n, n_out), n_out, 100 + t as u64).unwrap();
    }
    assert!(h.q.publish().unwrap());
    assert_eq!(h.kicks.load(Ordering::Relaxed), 1);
    let chains = pop_all(&mut h);
    assert_eq!(chains.len(), 4);
    for ((_, descs), &(n, n_out)) in chains.iter().zip(reqs.iter()) {
        let want: Vec<(u64, u32, bool)> = segs(n, n_out)
            .iter()
            .enumerate()
            .map(|(i, s)| (s.addr, s.len, i >= n_out))
            .collect();
        assert_eq!(descs, &want);
    }
    // Complete in reverse order with plausible lengths.
    for (head, descs) in chains.iter().rev() {
        let w: u32 = descs.iter().filter(|d| d.2).map(|d| d.1).sum();
        h.dev.add_used(&h.gm, *head, w).unwrap();
    }
    let mut got = Vec::new();
    assert_eq!(h.q.poll(|u| got.push(u)).unwrap(), 4);
    let tokens: Vec<u64> = got.iter().map(|u| u.token).collect();
    assert_eq!(tokens, vec![103, 102, 101, 100]);
    assert_eq!(h.q.num_free(), 16);
    assert_eq!(h.q.in_flight(), 0);
}

#[test]
fn full_ring_refuses_without_consuming_and_recovers() {
    let mut h = harness(8, QueueOptions::default());
    for t in 0..4 {
        h.q.add(&segs(2, 1), 1, t).unwrap();
    }
    assert_eq!(h.q.add(&segs(1, 1), 1, 9), Err(QueueFull));
    assert_eq!(h.q.num_free(), 0);
    h.q.publish().unwrap();
    let chains = pop_all(&mut h);
    h.dev.add_used(&h.gm, chains[1].0, 0).unwrap();
    let mut n = 0;
    h.q.poll(|u| {
        assert_eq!(u.token, 1);
        n += 1
    })
    .unwrap();
    assert_eq!(n, 1);
    h.q.add(&segs(2, 1), 1, 10).unwrap();
    h.q.publish().unwrap();
    let again = pop_all(&mut h);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1.len(), 2);
}

#[test]
fn many_segments_take_one_slot_with_indirect_descriptors() {
    let opts = QueueOptions {
        event_idx: false,
        indirect_max: 64,
        packed: false,
    };
    let mut h = harness(4, opts);
    for t in 0..4 {
        h.q.add(&segs(40, 20), 20, t).unwrap();
    }
    assert_eq!(h.q.num_free(), 0);
    h.q.publish().unwrap();
    let chains = pop_all(&mut h);
    assert_eq!(chains.len(), 4);
    for (_, d) in &chains {
        assert_eq!(d.len(), 40);
        assert!(d[..20].iter().all(|x| !x.2) && d[20..].iter().all(|x| x.2));
    }
    for (head, _) in &chains {
        h.dev.add_used(&h.gm, *head, 4096).unwrap();
    }
    assert_eq!(h.q.poll(|_| {}).unwrap(), 4);
    assert_eq!(h.q.num_free(), 4);
}

#[test]
fn notifications_follow_the_device_event_index() {
    let opts = QueueOptions {
        event_idx: true,
        indirect_max: 0,
        packed: false,
    };
    let mut h = harness(16, opts);
    // The device wants a kick for the first buffer (avail_event = 0).
    h.q.add(&segs(1, 0), 0, 1).unwrap();
    assert!(h.q.publish().unwrap());
    // The device consumes and suppresses notifications while it polls.
    pop_all(&mut h);
    h.dev.disable_notification(&h.gm).unwrap();
    // With event idx, disable_notification does not move avail_event; the device
    // model sets it when it consumes. Emulate a polling device: avail_event far ahead.
    let ev_off = (4 + 8 * 16) as usize;
    h.q.used_u16(ev_off).store(1000, Ordering::Relaxed);
    h.q.add(&segs(1, 0), 0, 2).unwrap();
    assert!(!h.q.publish().unwrap(), "device asked not to be kicked");
    // Re-enabling sets avail_event to the next index: kick again.
    h.dev.enable_notification(&h.gm).unwrap();
    pop_all(&mut h);
    h.dev.enable_notification(&h.gm).unwrap();
    h.q.add(&segs(1, 0), 0, 3).unwrap();
    assert!(h.q.publish().unwrap());
    // Batching: two adds, one publish, at most one kick.
    let before = h.kicks.load(Ordering::Relaxed);
    pop_all(&mut h);
    h.dev.enable_notification(&h.gm).unwrap();
    h.q.add(&segs(1, 0), 0, 4).unwrap();
    h.q.add(&segs(1, 0), 0, 5).unwrap();
    h.q.publish().unwrap();
    assert_eq!(h.kicks.load(Ordering::Relaxed), before + 1);
    // The driver asks for no interrupt: used_event is parked far ahead of its last used index.
    for (head, _) in pop_all(&mut h) {
        h.dev.add_used(&h.gm, head, 0).unwrap();
    }
    assert!(!h.dev.needs_notification(&h.gm).unwrap());
}

#[test]
fn no_notify_flag_suppresses_kicks_without_event_idx() {
    let mut h = harness(8, QueueOptions::default());
    h.q.add(&segs(1, 0), 0, 1).unwrap();
    assert!(h.q.publish().unwrap());
    h.dev.disable_notification(&h.gm).unwrap();
    h.q.add(&segs(1, 0), 0, 2).unwrap();
    assert!(!h.q.publish().unwrap());
    // Interrupts are off: the avail flags carry NO_INTERRUPT (the model ignores it).
    assert_eq!(
        h.q.avail_u16(0).load(Ordering::Relaxed),
        AVAIL_F_NO_INTERRUPT
    );
    for (head, _) in pop_all(&mut h) {
        h.dev.add_used(&h.gm, head, 0).unwrap();
    }
    assert!(h.q.enable_interrupts());
    assert_eq!(h.q.poll(|_| {}).unwrap(), 2);
}

fn write_used(h: &Harness, slot: usize, id: u32, len: u32, idx: u16) {
    let base = h.q.layout().used_va as *mut u8;
    let mut e = [0u8; 8];
    e[..4].copy_from_slice(&id.to_le_bytes());
    e[4..].copy_from_slice(&len.to_le_bytes());
    // SAFETY: test-only write of a used entry inside the queue's own used ring.
    unsafe { std::ptr::copy_nonoverlapping(e.as_ptr(), base.add(4 + 8 * slot), 8) };
    h.q.used_u16(2).store(idx, Ordering::Release);
}

#[test]
fn lying_device_is_caught() {
    // Out-of-range id.
    let mut h = harness(8, QueueOptions::default());
    h.q.add(&segs(2, 1), 1, 1).unwrap();
    h.q.publish().unwrap();
    write_used(&h, 0, 99, 0, 1);
    assert!(matches!(h.q.poll(|_| {}), Err(Error::Device(_))));

    // An id that is in range but not in flight.
    let mut h = harness(8, QueueOptions::default());
    h.q.add(&segs(2, 1), 1, 1).unwrap();
    h.q.publish().unwrap();
    write_used(&h, 0, 5, 0, 1);
    assert!(matches!(h.q.poll(|_| {}), Err(Error::Device(_))));

    // A length beyond the writable bytes (segment 2 is 1024 bytes) is clamped and
    // counted: the request completes.
    let mut h = harness(8, QueueOptions::default());
    h.q.add(&segs(2, 1), 1, 1).unwrap();
    h.q.publish().unwrap();
    write_used(&h, 0, 0, 1025, 1);
    let mut lens = Vec::new();
    assert_eq!(h.q.poll(|u| lens.push(u.len)).unwrap(), 1);
    assert_eq!(lens, vec![1024]);
    assert_eq!(h.q.len_overruns(), 1);

    // A used index that runs ahead of what was submitted.
    let mut h = harness(8, QueueOptions::default());
    h.q.add(&segs(2, 1), 1, 1).unwrap();
    h.q.publish().unwrap();
    write_used(&h, 0, 0, 0, 3);
    assert!(matches!(h.q.poll(|_| {}), Err(Error::Device(_))));

    // A completion of a request added but not yet made available: the device cannot
    // know it (a driver that took it would hand the head out twice).
    let mut h = harness(8, QueueOptions::default());
    h.q.add(&segs(2, 1), 1, 1).unwrap();
    write_used(&h, 0, 0, 0, 1);
    let e = h.q.poll(|_| panic!("completed")).unwrap_err().to_string();
    assert!(e.contains("made available"), "{e}");

    // Two published, a third not: a used index within the published count that names
    // the third fails there (the one before it completes).
    let mut h = harness(8, QueueOptions::default());
    h.q.add(&segs(2, 1), 1, 1).unwrap();
    h.q.add(&segs(2, 1), 1, 2).unwrap();
    h.q.publish().unwrap();
    let heads: Vec<u16> = pop_all(&mut h).iter().map(|c| c.0).collect();
    h.q.add(&segs(2, 1), 1, 3).unwrap();
    let third = h.q.order[2] as u32;
    write_used(&h, 0, heads[0] as u32, 0, 1);
    write_used(&h, 1, third, 0, 2);
    let mut done = Vec::new();
    let e = h.q.poll(|u| done.push(u.token)).unwrap_err().to_string();
    assert!(e.contains("not yet made available"), "{e}");
    assert_eq!(done, vec![1]);
}

#[test]
fn wraps_around_the_16_bit_index() {
    let mut h = harness(8, QueueOptions::default());
    for round in 0..70_000u64 / 3 {
        for k in 0..3 {
            h.q.add(&segs(2, 1), 1, round * 3 + k).unwrap();
        }
        h.q.publish().unwrap();
        for (head, _) in pop_all(&mut h) {
            h.dev.add_used(&h.gm, head, 1).unwrap();
        }
        let mut n = 0;
        h.q.poll(|u| {
            assert_eq!(u.token / 3, round);
            n += 1;
        })
        .unwrap();
        assert_eq!(n, 3);
    }
    let _ = &h.mem;
}

#[test]
fn bad_sizes_are_rejected() {
    let mem = DmaMemory::new(DmaConfig {
        initial_region_size: 1 << 20,
        ..DmaConfig::default()
    })
    .unwrap();
    let n = || Notifier::Counter(Arc::new(AtomicU64::new(0)));
    assert!(SplitQueue::new(&mem, 0, 0, QueueOptions::default(), n()).is_err());
    assert!(SplitQueue::new(&mem, 0, 100, QueueOptions::default(), n()).is_err());
    let _unused: Option<OwnedFd> = None;
}

#[test]
fn short_chains_go_direct_until_the_ring_is_crowded() {
    let opts = QueueOptions {
        event_idx: false,
        indirect_max: 16,
        packed: false,
    };
    let mut h = harness(8, opts);
    h.q.add(&segs(3, 1), 1, 1).unwrap();
    h.q.add(&segs(3, 1), 1, 2).unwrap();
    assert_eq!(h.q.num_free(), 2, "two direct chains of three descriptors");
    h.q.add(&segs(3, 1), 1, 3).unwrap();
    assert_eq!(
        h.q.num_free(),
        1,
        "no room for a direct chain: one indirect descriptor"
    );
    h.q.add(&segs(6, 1), 1, 4).unwrap();
    assert_eq!(h.q.num_free(), 0, "long chains are always indirect");
    h.q.publish().unwrap();
    let chains = pop_all(&mut h);
    assert_eq!(chains.len(), 4);
    assert!(chains.iter().take(3).all(|(_, d)| d.len() == 3));
    assert_eq!(chains[3].1.len(), 6);
    for (head, _) in &chains {
        h.dev.add_used(&h.gm, *head, 0).unwrap();
    }
    assert_eq!(h.q.poll(|_| {}).unwrap(), 4);
    assert_eq!(h.q.num_free(), 8);
}

#[test]
fn reused_heads_carry_each_request_s_own_chain() {
    // The driver skips writing a descriptor that already holds what it last wrote
    // there; a reused head with different buffers or another chain length must still
    // reach the device exactly as submitted.
    let mut h = harness(8, QueueOptions::default());
    let other: Vec<Segment> = (0..3)
        .map(|i| Segment {
            addr: 0x9000 + 0x100 * i,
            len: 64 + i as u32,
        })
        .collect();
    let shapes: [(Vec<Segment>, usize); 4] = [
        (segs(3, 1), 1),
        (segs(3, 1), 1),
        (other.clone(), 2),
        (segs(2, 1), 1),
    ];
    for round in 0..40u64 {
        let (sg, n_out) = &shapes[(round as usize * 7 / 3) % shapes.len()];
        h.q.add(sg, *n_out, round).unwrap();
        h.q.publish().unwrap();
        let chains = pop_all(&mut h);
        assert_eq!(chains.len(), 1);
        let want: Vec<(u64, u32, bool)> = sg
            .iter()
            .enumerate()
            .map(|(i, s)| (s.addr, s.len, i >= *n_out))
            .collect();
        assert_eq!(chains[0].1, want, "round {round}");
        h.dev.add_used(&h.gm, chains[0].0, 0).unwrap();
        assert_eq!(h.q.poll(|u| assert_eq!(u.token, round)).unwrap(), 1);
    }
    assert_eq!(h.q.num_free(), 8);
    let _ = &h.mem;
}

#[test]
fn a_device_that_scribbles_over_the_descriptor_table_cannot_confuse_the_driver() {
    let mut h = harness(8, QueueOptions::default());
    for round in 0..10u64 {
        h.q.add(&segs(3, 1), 1, round).unwrap();
        h.q.publish().unwrap();
        let chains = pop_all(&mut h);
        let head = chains.first().map(|c| c.0).unwrap_or(0);
        let l = h.q.layout();
        // SAFETY: test-only writes inside the queue's own descriptor table, as a
        // hostile device could do.
        unsafe { std::ptr::write_bytes(l.desc_va as *mut u8, 0xee, DESC_SIZE * 8) };
        write_used(&h, round as usize % 8, head as u32, 0, (round + 1) as u16);
        // Completion comes from the driver's own records: token, free list.
        assert_eq!(h.q.poll(|u| assert_eq!(u.token, round)).unwrap(), 1);
        assert_eq!(h.q.num_free(), 8);
        assert_eq!(h.q.in_flight(), 0);
        // Resynchronise the device model with the driver (it consumed one chain).
        h.dev.set_next_avail((round + 1) as u16);
        h.dev.set_next_used((round + 1) as u16);
    }
    let _ = &h.mem;
}

#[test]
fn the_next_in_order_hint_follows_submission_order() {
    let mut h = harness(8, QueueOptions::default());
    assert_eq!(h.q.next_in_order(), None);
    for t in 10..13 {
        h.q.add(&segs(2, 1), 1, t).unwrap();
    }
    h.q.publish().unwrap();
    let chains = pop_all(&mut h);
    assert_eq!(h.q.next_in_order(), Some(10));
    h.dev.add_used(&h.gm, chains[0].0, 0).unwrap();
    h.q.poll(|_| {}).unwrap();
    assert_eq!(h.q.next_in_order(), Some(11));
    // Out of order: 12 completes before 11; the hint never names a finished request.
    h.dev.add_used(&h.gm, chains[2].0, 0).unwrap();
    h.q.poll(|_| {}).unwrap();
    assert_eq!(h.q.next_in_order(), None);
    h.dev.add_used(&h.gm, chains[1].0, 0).unwrap();
    h.q.poll(|_| {}).unwrap();
    assert_eq!(h.q.next_in_order(), None);
    let _ = &h.mem;
}

/// Heads of the chains the device pops, without completing them.
fn pop_heads(h: &mut Harness) -> Vec<u16> {
    let gm = &h.gm;
    h.dev.iter(gm).unwrap().map(|c| c.head_index()).collect()
}

/// Add `n` three-descriptor chains (tokens 0..n), publish, and pop them: their heads.
fn submit_chains(h: &mut Harness, n: u64) -> Vec<u16> {
    for t in 0..n {
        h.q.add(&segs(3, 1), 1, t).unwrap();
    }
    h.q.publish().unwrap();
    pop_heads(h)
}

#[test]
fn a_batch_s_chains_come_back_in_completion_order() {
    // A caller that resubmits in completion order must find each request's head (and
    // so its unchanged descriptors) again: the k-th add after a reap gets the head of
    // the batch's k-th completion, whatever order the device completed in.
    let mut h = harness(16, QueueOptions::default());
    let heads = submit_chains(&mut h, 4);
    assert_eq!(heads.len(), 4);
    let order = [heads[2], heads[0], heads[3], heads[1]];
    for &hd in &order {
        h.dev.add_used(&h.gm, hd, 0).unwrap();
    }
    let mut tokens = Vec::new();
    assert_eq!(h.q.poll(|u| tokens.push(u.token)).unwrap(), 4);
    assert_eq!(tokens, vec![2, 0, 3, 1]);
    for t in tokens {
        h.q.add(&segs(3, 1), 1, 10 + t).unwrap();
    }
    h.q.publish().unwrap();
    assert_eq!(pop_heads(&mut h), order.to_vec());
    let _ = &h.mem;
}

#[test]
fn after_an_overflow_freed_chains_are_taken_most_recent_first() {
    // Requests that waited for room take the chains in any order, so no pairing is
    // kept then: the batch goes back as a stack (the newest on top).
    let mut h = harness(8, QueueOptions::default());
    for t in 0..4 {
        h.q.add(&segs(2, 1), 1, t).unwrap();
    }
    assert!(h.q.add(&segs(2, 1), 1, 9).is_err());
    assert!(h.q.overflowed());
    h.q.publish().unwrap();
    let heads = pop_heads(&mut h);
    for &hd in &heads[..2] {
        h.dev.add_used(&h.gm, hd, 0).unwrap();
    }
    assert_eq!(h.q.poll(|_| {}).unwrap(), 2);
    assert!(!h.q.overflowed(), "a reap ends the overflow");
    h.q.add(&segs(2, 1), 1, 20).unwrap();
    h.q.add(&segs(2, 1), 1, 21).unwrap();
    h.q.publish().unwrap();
    assert_eq!(pop_heads(&mut h), vec![heads[1], heads[0]]);
    let _ = &h.mem;
}

#[test]
fn the_parked_used_event_keeps_the_device_quiet_across_index_wraps() {
    // The used event is parked half the index space ahead of the driver's last used
    // index: the device must never be asked to interrupt, through more than one wrap
    // of the 16-bit indices.
    let mut h = harness(
        8,
        QueueOptions {
            event_idx: true,
            indirect_max: 0,
            packed: false,
        },
    );
    h.q.disable_interrupts();
    for t in 0..(3 * 0x10000u64 / 2) {
        h.q.add(&segs(1, 0), 0, t).unwrap();
        h.q.publish().unwrap();
        for (head, _) in pop_all(&mut h) {
            h.dev.add_used(&h.gm, head, 0).unwrap();
        }
        assert!(
            !h.dev.needs_notification(&h.gm).unwrap(),
            "interrupt requested after {t} completions"
        );
        assert_eq!(h.q.poll(|u| assert_eq!(u.token, t)).unwrap(), 1);
    }
    let _ = &h.mem;
}

#[test]
fn chains_keep_completion_order_across_reaps_before_the_next_add() {
    // A caller may poll more than once before it resubmits: the chains of both reaps
    // come back in completion order.
    let mut h = harness(16, QueueOptions::default());
    let heads = submit_chains(&mut h, 3);
    h.dev.add_used(&h.gm, heads[1], 0).unwrap();
    assert_eq!(h.q.poll(|_| {}).unwrap(), 1);
    h.dev.add_used(&h.gm, heads[0], 0).unwrap();
    h.dev.add_used(&h.gm, heads[2], 0).unwrap();
    assert_eq!(h.q.poll(|_| {}).unwrap(), 2);
    for t in 0..3 {
        h.q.add(&segs(3, 1), 1, 10 + t).unwrap();
    }
    h.q.publish().unwrap();
    assert_eq!(pop_heads(&mut h), vec![heads[1], heads[0], heads[2]]);
    let _ = &h.mem;
}

#[test]
fn mixed_direct_and_indirect_chains_freed_out_of_order_leave_a_whole_free_list() {
    // Chains of 1, 2 and 3 descriptors and indirect ones, completed out of order:
    // afterwards every descriptor is free exactly once (single-descriptor adds take
    // all of them, each head distinct).
    let mut h = harness(
        16,
        QueueOptions {
            event_idx: false,
            indirect_max: 8,
            packed: false,
        },
    );
    let shapes = [1usize, 3, 6, 2, 1, 3, 5];
    for (t, &n) in shapes.iter().enumerate() {
        h.q.add(&segs(n, 1.min(n - 1)), 1.min(n - 1), t as u64)
            .unwrap();
    }
    h.q.publish().unwrap();
    let heads = pop_heads(&mut h);
    for &i in &[3usize, 0, 6, 1] {
        h.dev.add_used(&h.gm, heads[i], 0).unwrap();
    }
    assert_eq!(h.q.poll(|_| {}).unwrap(), 4);
    for &i in &[5usize, 2, 4] {
        h.dev.add_used(&h.gm, heads[i], 0).unwrap();
    }
    assert_eq!(h.q.poll(|_| {}).unwrap(), 3);
    assert_eq!(h.q.num_free(), 16);
    for t in 0..16 {
        h.q.add(&segs(1, 0), 0, 100 + t).unwrap();
    }
    assert!(h.q.add(&segs(1, 0), 0, 200).is_err());
    h.q.publish().unwrap();
    let mut all = pop_heads(&mut h);
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 16);
    let _ = &h.mem;
}

fn indirect_opts(max: u16) -> QueueOptions {
    QueueOptions {
        event_idx: false,
        indirect_max: max,
        packed: false,
    }
}

/// The descriptor table and the indirect tables as raw bytes.
fn tables(h: &Harness) -> (Vec<u8>, Vec<u8>) {
    let n = h.q.size as usize * DESC_SIZE;
    // SAFETY: the queue's descriptor table is `size` descriptors long.
    let desc = unsafe { std::slice::from_raw_parts(h.q.desc as *const u8, n) }.to_vec();
    let ind = h.q.indirect.as_ref().unwrap();
    (desc, ind.as_slice().to_vec())
}

#[test]
fn slot_heads_put_each_request_at_its_token_s_head_through_its_own_table() {
    let mut h = harness(8, indirect_opts(8));
    assert!(h.q.use_slot_heads());
    assert!(h.q.use_slot_heads(), "asking again changes nothing");
    let reqs: [(u64, usize, usize); 3] = [(5, 3, 1), (2, 3, 2), (7, 2, 1)];
    let chain = |t: u64, n: usize| -> Vec<Segment> {
        (0..n)
            .map(|i| Segment {
                addr: 0x10_000 * (t + 1) + 0x1000 * i as u64,
                len: 512 * (i as u32 + 1),
            })
            .collect()
    };
    let mut before = None;
    for round in 0..3 {
        for &(t, n, n_out) in &reqs {
            h.q.add(&chain(t, n), n_out, t).unwrap();
        }
        assert_eq!(h.q.num_free(), 5);
        h.q.publish().unwrap();
        let got = pop_all(&mut h);
        assert_eq!(
            got.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![5, 2, 7],
            "each request at its token's head"
        );
        for ((_, descs), &(t, n, n_out)) in got.iter().zip(&reqs) {
            let want: Vec<(u64, u32, bool)> = chain(t, n)
                .iter()
                .enumerate()
                .map(|(i, s)| (s.addr, s.len, i >= n_out))
                .collect();
            assert_eq!(descs, &want, "round {round}");
        }
        // Out of order.
        for &(head, _) in got.iter().rev() {
            h.dev.add_used(&h.gm, head, 0).unwrap();
        }
        let mut tokens = Vec::new();
        assert_eq!(h.q.poll(|u| tokens.push(u.token)).unwrap(), 3);
        assert_eq!(tokens, vec![7, 2, 5]);
        assert_eq!(h.q.num_free(), 8);
        // The same requests again leave every table and ring entry as they were.
        let now = tables(&h);
        if let Some(b) = &before {
            assert!(b == &now, "round {round} rewrote a table");
        }
        before = Some(now);
    }
    // Another request in a slot: its table carries the new chain.
    let other = segs(4, 1);
    h.q.add(&other, 1, 2).unwrap();
    h.q.publish().unwrap();
    let got = pop_all(&mut h);
    assert_eq!(got[0].0, 2);
    let want: Vec<(u64, u32, bool)> = other
        .iter()
        .enumerate()
        .map(|(i, s)| (s.addr, s.len, i >= 1))
        .collect();
    assert_eq!(got[0].1, want);
}

#[test]
fn slot_heads_refuse_a_busy_head_a_long_chain_and_a_token_beyond_the_ring() {
    let mut h = harness(8, indirect_opts(4));
    assert!(h.q.use_slot_heads());
    h.q.add(&segs(3, 1), 1, 3).unwrap();
    assert_eq!(h.q.add(&segs(3, 1), 1, 3), Err(QueueFull), "head 3 is out");
    assert_eq!(h.q.add(&segs(3, 1), 1, 8), Err(QueueFull), "no head 8");
    assert_eq!(
        h.q.add(&segs(5, 1), 1, 4),
        Err(QueueFull),
        "longer than a table"
    );
    assert_eq!(h.q.num_free(), 7);
    assert_eq!(h.q.in_flight(), 1);
    h.q.publish().unwrap();
    assert_eq!(pop_all(&mut h).len(), 1);
}

#[test]
fn slot_heads_need_indirect_descriptors_and_an_idle_ring() {
    let mut h = harness(8, QueueOptions::default());
    assert!(!h.q.use_slot_heads(), "no indirect descriptors");
    let mut h2 = harness(8, indirect_opts(8));
    h2.q.add(&segs(2, 1), 1, 0).unwrap();
    assert!(!h2.q.use_slot_heads(), "a request is on the ring");
    // Without slot heads the ring goes on as before.
    h.q.add(&segs(3, 1), 1, 42).unwrap();
    h.q.publish().unwrap();
    assert_eq!(pop_all(&mut h)[0].1.len(), 3);
}

#[test]
fn slot_heads_check_what_the_device_returns() {
    // segs(3, 1): 512 bytes out, then 1024 + 1536 device-writable.
    let slot_ring = || {
        let mut h = harness(8, indirect_opts(8));
        assert!(h.q.use_slot_heads());
        h.q.add(&segs(3, 1), 1, 6).unwrap();
        h.q.publish().unwrap();
        h
    };
    // A length beyond the writable bytes of the slot's chain is clamped and counted.
    let mut h = slot_ring();
    write_used(&h, 0, 6, 9999, 1);
    let mut got = Vec::new();
    assert_eq!(h.q.poll(|u| got.push((u.token, u.len))).unwrap(), 1);
    assert_eq!(got, vec![(6, 2560)]);
    assert_eq!(h.q.len_overruns(), 1);
    // Exactly the writable bytes pass as they are.
    h.q.add(&segs(3, 1), 1, 6).unwrap();
    h.q.publish().unwrap();
    write_used(&h, 1, 6, 2560, 2);
    got.clear();
    assert_eq!(h.q.poll(|u| got.push((u.token, u.len))).unwrap(), 1);
    assert_eq!(got, vec![(6, 2560)]);
    assert_eq!(h.q.len_overruns(), 1);
    // A head that is not on the device (slot 3 has no request).
    let mut h = slot_ring();
    write_used(&h, 0, 3, 0, 1);
    assert!(matches!(h.q.poll(|_| {}), Err(Error::Device(_))));
    // The same head twice.
    let mut h = slot_ring();
    write_used(&h, 0, 6, 0, 1);
    write_used(&h, 1, 6, 0, 2);
    assert!(matches!(h.q.poll(|_| {}), Err(Error::Device(_))));
}
