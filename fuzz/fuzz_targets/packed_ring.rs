//! The packed ring's driver side against a device that does anything: an honest device
//! (`vireo_virtio::testing::packed::PackedDeviceRing`, written from the spec) takes and
//! completes requests in any order, and between its moves the input overwrites ring
//! entries, the device event suppression structure, and used descriptors with
//! arbitrary bytes, ids, lengths and wrap bits.
//!
//! Oracle: no panic, no hang; every completion the driver reports names a request in
//! flight, once, with a length within its device-writable bytes; a device error ends
//! the run (the queue is abandoned, as the request queue does); while the device only
//! told the truth, the ring's free entries and the requests the device holds add up to
//! the whole ring and every request comes back with the length the device wrote.
#![no_main]

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vireo_virtio::testing::packed::{KickMe, PackedDeviceRing};
use vireo_virtio::{
    features::transport as tf, DmaBuf, DmaConfig, DmaMemory, Notifier, PackedQueue, QueueOptions,
    Segment,
};

fn memory() -> &'static Arc<DmaMemory> {
    static MEM: OnceLock<Arc<DmaMemory>> = OnceLock::new();
    MEM.get_or_init(|| {
        DmaMemory::new(DmaConfig {
            initial_region_size: 8 << 20,
            ..Default::default()
        })
        .expect("memory")
    })
}

/// Data buffers for the segments (inside the DMA memory, so the honest device accepts
/// them).
fn data() -> &'static DmaBuf {
    static BUF: OnceLock<DmaBuf> = OnceLock::new();
    BUF.get_or_init(|| memory().alloc(64 << 10, 4096).expect("buffer"))
}

struct Input<'a>(&'a [u8]);
impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.byte()?,
            self.byte()?,
            self.byte()?,
            self.byte()?,
        ]))
    }
}

fuzz_target!(|bytes: &[u8]| {
    let mut input = Input(bytes);
    let (Some(mode), Some(size)) = (input.byte(), input.byte()) else {
        return;
    };
    let size = 1 + (size % 16) as u16;
    let indirect_max = if mode & 2 != 0 { 6 } else { 0 };
    let opts = QueueOptions {
        event_idx: mode & 1 != 0,
        indirect_max,
        packed: true,
    };
    let mut features = tf::VERSION_1 | tf::RING_PACKED;
    if opts.event_idx {
        features |= tf::RING_EVENT_IDX;
    }
    if indirect_max > 0 {
        features |= tf::RING_INDIRECT_DESC;
    }
    let mut q = PackedQueue::new(
        memory(),
        0,
        size,
        opts,
        Notifier::Counter(Arc::new(AtomicU64::new(0))),
    )
    .expect("queue");
    let slot_heads = mode & 4 != 0 && q.use_slot_heads();
    let layout = q.layout();
    let mut dev = PackedDeviceRing::new(&layout, features);
    let translate = |a: u64, l: u64| {
        memory()
            .regions()
            .iter()
            .find(|r| a >= r.iova && l <= r.len && a - r.iova <= r.len - l)
            .map(|r| r.va + (a - r.iova))
    };
    let base = data().iova();
    // Requests in flight: token -> device-writable bytes.
    let mut in_flight: HashMap<u64, u32> = HashMap::new();
    // Buffers the honest device took: (id, writable bytes).
    let mut held: Vec<(u16, u32)> = Vec::new();
    let mut next_token = 0u64;
    let mut honest = true;
    for _ in 0..256 {
        let Some(op) = input.byte() else { break };
        match op % 8 {
            // Add a request of 1..=8 segments.
            0 | 1 => {
                let (Some(n), Some(out)) = (input.byte(), input.byte()) else {
                    break;
                };
                let n = 1 + (n % 8) as usize;
                let n_out = out as usize % (n + 1);
                let segs: Vec<Segment> = (0..n)
                    .map(|i| Segment {
                        addr: base + 4096 * i as u64,
                        len: 512 * (1 + i as u32),
                    })
                    .collect();
                let token = if slot_heads {
                    let t = (op as u64 >> 3) % size as u64;
                    if in_flight.contains_key(&t) {
                        continue;
                    }
                    t
                } else {
                    next_token += 1;
                    next_token
                };
                let writable: u32 = segs[n_out..].iter().map(|s| s.len).sum();
                if q.add(&segs, n_out, token).is_ok() {
                    in_flight.insert(token, writable);
                }
            }
            2 => {
                let _ = q.publish();
            }
            // The honest device takes what is available and completes some.
            3 => {
                while let Some(c) = dev.take(translate) {
                    match c {
                        Ok(c) => {
                            let w = c.writable.iter().map(|s| s.1).sum();
                            held.push((c.id, w));
                        }
                        Err(e) => {
                            // Only lies can make a list malformed.
                            assert!(!honest, "the driver wrote a malformed list: {e}");
                            break;
                        }
                    }
                }
                let k = input.byte().unwrap_or(0) as usize % (held.len() + 1);
                for _ in 0..k {
                    let i = input.byte().unwrap_or(0) as usize % held.len();
                    let (id, w) = held.swap_remove(i);
                    let written = w.min(input.u32().unwrap_or(0) % (w + 1));
                    if dev.entries_of(id).is_some() {
                        dev.put_used(id, written);
                    }
                }
            }
            // Poll.
            4 => {
                let mut seen = Vec::new();
                let r = q.poll(|u| seen.push(u));
                for u in seen {
                    let w = in_flight
                        .remove(&u.token)
                        .expect("a completion names a token in flight, once");
                    assert!(u.len <= w, "length {} beyond {w} writable bytes", u.len);
                }
                if r.is_err() {
                    assert!(!honest, "an honest device failed the queue: {r:?}");
                    return;
                }
            }
            // A lie: arbitrary bytes over a ring entry.
            5 => {
                let (Some(e), Some(a), Some(b)) = (input.byte(), input.u32(), input.u32()) else {
                    break;
                };
                let entry = (e as u16 % size) as u64;
                let mut raw = [0u8; 16];
                raw[8..12].copy_from_slice(&a.to_le_bytes());
                raw[12..16].copy_from_slice(&b.to_le_bytes());
                // SAFETY: entry < size: 16 bytes inside the queue's own descriptor ring;
                // this plays the device's part (which may write anything there).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        raw.as_ptr(),
                        (layout.desc_va + 16 * entry) as *mut u8,
                        16,
                    )
                };
                honest = false;
            }
            // A lie through the device's own write path: any id, length, WRITE bit, skip.
            6 => {
                let (Some(id), Some(len), Some(skip)) = (input.u16(), input.u32(), input.byte())
                else {
                    break;
                };
                dev.put_used_raw(id, len, skip & 1 != 0, (skip >> 1) as u16 % (size + 1));
                held.retain(|h| h.0 != id);
                honest = false;
            }
            // Notification and interrupt suppression.
            _ => {
                let m = input.byte().unwrap_or(0);
                match m % 6 {
                    0 => dev.kick_me(KickMe::Always),
                    1 => dev.kick_me(KickMe::Never),
                    2 => dev.kick_me(KickMe::AtNext),
                    3 => dev.kick_me(KickMe::At {
                        offset: input.u16().unwrap_or(0) & 0x7fff,
                        wrap: m & 0x80 != 0,
                    }),
                    4 => {
                        let _ = q.enable_interrupts();
                    }
                    _ => q.disable_interrupts(),
                }
            }
        }
        assert!(q.num_free() <= size);
        assert_eq!(q.in_flight() as usize, in_flight.len());
    }
    // The end: an honest device completes everything it holds; the driver gets it all.
    if honest {
        let _ = q.publish();
        while let Some(c) = dev.take(translate) {
            let c = c.expect("an honest run has well-formed lists");
            held.push((c.id, c.writable.iter().map(|s| s.1).sum()));
        }
        for (id, w) in held.drain(..) {
            dev.put_used(id, w);
        }
        let mut seen = Vec::new();
        q.poll(|u| seen.push(u)).expect("an honest device");
        for u in seen {
            let w = in_flight.remove(&u.token).expect("in flight, once");
            assert!(u.len <= w);
        }
        assert!(
            in_flight.is_empty(),
            "every request came back: {in_flight:?}"
        );
        assert_eq!(q.num_free(), size);
    }
});
