//! A lying device: arbitrary used-ring entries and used index after some requests were
//! submitted. The driver must never panic, never return a token that is not in flight,
//! and never report a length beyond the request's device-writable bytes.
#![no_main]

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vireo_virtio::{DmaConfig, DmaMemory, Notifier, QueueOptions, Segment, SplitQueue};

fn memory() -> &'static Arc<DmaMemory> {
    static MEM: OnceLock<Arc<DmaMemory>> = OnceLock::new();
    MEM.get_or_init(|| {
        DmaMemory::new(DmaConfig {
            initial_region_size: 4 << 20,
            ..Default::default()
        })
        .expect("memory")
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let size = 8u16;
    let opts = QueueOptions {
        event_idx: data[0] & 1 != 0,
        indirect_max: if data[0] & 2 != 0 { 8 } else { 0 },
        packed: false,
    };
    let mut q = SplitQueue::new(memory(), 0, size, opts, Notifier::Counter(Arc::new(AtomicU64::new(0))))
        .expect("queue");
    // Submit a few requests with known writable lengths.
    // At most 4 two-descriptor chains fit 8 descriptors without indirect ones.
    let n = (data[1] % 5) as usize;
    let mut writable = HashMap::new();
    for t in 0..n {
        let segs = [
            Segment { addr: 0x1000, len: 16 },
            Segment { addr: 0x2000, len: 512 * (t as u32 + 1) },
        ];
        q.add(&segs, 1, 100 + t as u64).expect("room");
        writable.insert(100 + t as u64, 512 * (t as u32 + 1));
    }
    q.publish().expect("publish");
    // The device writes arbitrary used entries and index.
    let used = q.layout().used_va as *mut u8;
    let body = &data[4..];
    let len = body.len().min(4 + 8 * size as usize);
    // SAFETY: the used ring of an 8-entry queue is 4 + 8*8 (+2) bytes inside the queue's
    // own DMA allocation; `len` stays within it. This plays the device's part.
    unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), used, len) };
    let idx = u16::from_le_bytes([data[2], data[3]]);
    // SAFETY: bytes 2..4 of the used ring are its index, inside the allocation.
    unsafe { std::ptr::copy_nonoverlapping(idx.to_le_bytes().as_ptr(), used.add(2), 2) };
    let mut seen = Vec::new();
    let _ = q.poll(|u| seen.push(u));
    for u in seen {
        let w = writable.remove(&u.token).expect("token was in flight, reported once");
        assert!(u.len <= w);
    }
});
