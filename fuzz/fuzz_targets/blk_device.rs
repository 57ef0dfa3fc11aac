//! A fuzzer plays a virtio-blk device against vireo's whole completion path: the
//! blk driver and the bdev channel (splitting, bounce buffers, timeouts). The device is
//! `vireo_virtio::testing`'s RAM disk ([`FakeBlk`]), answering in the driver's thread on
//! each kick as the fuzz input says: a proper completion, a wrong status byte, a wrong
//! used length, a used id out of range or not in flight, a duplicate completion, or no
//! answer.
//!
//! Oracle: no panic, no hang; every submitted I/O completes exactly once (with an
//! error where the device misbehaved, a timeout where it never answered), and a read
//! that succeeds gives its buffer back at its length. The fake device also panics on a
//! malformed chain (a driver bug). The first input byte picks split or packed rings.
#![no_main]

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vireo_bdev::{BlkController, BlkParams, IoBuf, IoOp, IoRequest};
use vireo_virtio::testing::{FakeBlk, FakeRequest};
use vireo_virtio::{DmaConfig, DmaMemory};

/// What the device does, shared with its kick hook.
struct Script {
    bytes: VecDeque<u8>,
    /// Attach is done: answer from the script from now on.
    fuzzing: bool,
    /// Requests never answered (until the run is over).
    held: Vec<FakeRequest>,
}

impl Script {
    fn byte(&mut self) -> u8 {
        self.bytes.pop_front().unwrap_or(0)
    }
}

/// Answer every new request of queue `q` (the device's kick hook).
fn answer(blk: &FakeBlk, q: u16, script: &Mutex<Script>) {
    let mut s = script.lock().unwrap_or_else(|e| e.into_inner());
    let size = blk.dev.layout(q).map_or(16, |l| l.size as u32);
    for req in blk.dev.take_requests(q) {
        let status_at = req.writable_len() - 1;
        if !s.fuzzing {
            let w = blk.execute(&req);
            blk.dev.complete(q, &req, w);
            continue;
        }
        match s.byte() % 10 {
            0..=3 => {
                let w = blk.execute(&req);
                blk.dev.complete(q, &req, w);
            }
            4 => {
                let status = s.byte();
                blk.execute(&req);
                req.write_at(status_at, &[status]);
                blk.dev.complete(q, &req, req.writable_len() as u32);
            }
            5 => {
                let len = u32::from_le_bytes([s.byte(), s.byte(), s.byte(), s.byte()]);
                blk.execute(&req);
                blk.dev.push_used(q, req.head as u32, len);
            }
            6 => {
                let id = s.byte() as u32 % (2 * size);
                let w = blk.execute(&req);
                blk.dev.push_used(q, id, w);
            }
            7 => s.held.push(req),
            8 => {
                let w = blk.execute(&req);
                blk.dev.complete(q, &req, w);
                blk.dev.push_used(q, req.head as u32, w);
            }
            _ => {
                // UNSUPP, without executing.
                req.write_at(status_at, &[2]);
                blk.dev.complete(q, &req, 1);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (plan, script) = data.split_at(data.len().min(24));
    // One queue of 16, 4 segments per request, discard and write-zeroes 2 ranges of
    // 64 sectors (alignment 4), without unmapping write-zeroes: requests split.
    let blk = FakeBlk::new(1 << 16, 1, 4);
    blk.dev.set_max_queue_size(16);
    let mut c = blk.dev.config();
    for (off, v) in [(36, 64u32), (40, 2), (44, 4), (48, 64), (52, 2)] {
        c[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    c[56] = 0;
    blk.dev.set_config(c);
    // The first byte of the plan also picks the ring: packed when odd.
    if plan[0] & 1 != 0 {
        blk.offer_packed_ring();
    }
    let script = Arc::new(Mutex::new(Script {
        bytes: script.iter().copied().collect(),
        fuzzing: false,
        held: Vec::new(),
    }));
    let s2 = script.clone();
    blk.on_kick(move |b, q| answer(b, q, &s2));
    // One memory for every run: a controller that failed keeps (never reuses) the
    // memory its device may still write, by design; a fresh memory per run would
    // multiply that.
    static MEM: std::sync::OnceLock<Arc<DmaMemory>> = std::sync::OnceLock::new();
    let mem = MEM
        .get_or_init(|| {
            DmaMemory::new(DmaConfig {
                initial_region_size: 16 << 20,
                max_total_size: 4 << 30,
                ..Default::default()
            })
            .unwrap()
        })
        .clone();
    let t = blk.dev.connect(&mem);
    let ctrl = BlkController::attach(
        &BlkParams {
            name: "F".into(),
            vq_count: 1,
            vq_size: 16,
            reconnect_timeout: None,
            packed_ring: Default::default(),
        },
        t,
    );
    let ctrl = match ctrl {
        Ok(c) => c,
        Err(e) => panic!("an honest device must attach: {e}"),
    };
    script.lock().unwrap().fuzzing = true;
    let bdev = ctrl.bdev().clone();
    let mut ch = bdev.open_channel().unwrap();
    // The plan: up to 24 I/Os of various kinds and sizes.
    let mut submitted = HashSet::new();
    for (k, &b) in plan.iter().enumerate() {
        let blocks = 1 + (b as u64 >> 3) % 24;
        let lba = (b as u64 * 97) % 60_000;
        let req = match b % 5 {
            0 => IoRequest::read(
                lba,
                blocks,
                IoBuf::Heap(vec![0; blocks as usize * 512]),
                k as u64,
            ),
            1 => IoRequest::write(
                lba,
                blocks,
                IoBuf::Dma(bdev.alloc_buf(blocks as usize * 512).unwrap()),
                k as u64,
            ),
            2 => IoRequest::no_data(IoOp::Flush, 0, 0, k as u64),
            3 => IoRequest::no_data(IoOp::Unmap, lba, blocks * 5, k as u64),
            _ => IoRequest::no_data(IoOp::WriteZeroes, lba, blocks * 5, k as u64),
        }
        .with_timeout(Duration::from_millis(30));
        match ch.submit(req) {
            Ok(()) => {
                submitted.insert(k as u64);
            }
            Err(r) => panic!("a valid request was refused: {}", r.error),
        }
    }
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while ch.in_flight() > 0 {
        ch.poll(&mut done);
        assert!(
            Instant::now() < deadline,
            "I/O hung: {} in flight",
            ch.in_flight()
        );
    }
    let mut seen = HashSet::new();
    for c in &done {
        assert!(seen.insert(c.user_data), "completed twice: {}", c.user_data);
        assert!(
            submitted.contains(&c.user_data),
            "unknown completion {}",
            c.user_data
        );
        if c.op == IoOp::Read && c.result.is_ok() {
            assert!(c
                .buf
                .as_ref()
                .is_some_and(|b| b.len() % 512 == 0 && !b.is_empty()));
        }
    }
    assert_eq!(seen, submitted, "every I/O completes once");
    // Let the device answer what it held, so the channel closes without leaking.
    let held = std::mem::take(&mut script.lock().unwrap().held);
    for r in &held {
        if blk.dev.is_live(r) {
            let w = blk.execute(r);
            blk.dev.complete(r.queue(), r, w);
        }
    }
    drop(ch);
    drop(ctrl);
});
