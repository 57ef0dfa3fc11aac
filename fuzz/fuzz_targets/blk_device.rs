//! A fuzzer plays a virtio-blk device against vireo's whole completion path: the
//! blk driver and the bdev channel (splitting, bounce buffers, timeouts). An in-process
//! fake transport hands the rings to a device thread that answers each request as the
//! fuzz input says: a proper completion, a wrong status byte, a wrong used length, a
//! used id out of range or not in flight, a duplicate completion, or no answer.
//!
//! Oracle: no panic, no hang; every submitted I/O completes exactly once (with an
//! error where the device misbehaved, a timeout where it never answered), and a read
//! that succeeds gives its buffer back at its length.
#![no_main]

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vireo_bdev::{BlkController, BlkParams, IoBuf, IoOp, IoRequest};
use vireo_virtio::{DmaConfig, DmaMemory, Notifier, RingLayout, Transport};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

struct Dev {
    rings: Mutex<Vec<RingLayout>>,
    script: Mutex<VecDeque<u8>>,
    /// Attach is done: answer from the script from now on.
    fuzzing: AtomicBool,
    /// Answer the requests held so far (the run is over).
    release: AtomicBool,
    stop: AtomicBool,
}

impl Dev {
    fn byte(&self) -> u8 {
        self.script.lock().unwrap().pop_front().unwrap_or(0)
    }
}

struct FakeTransport {
    dev: Arc<Dev>,
    mem: Arc<DmaMemory>,
    broken: Arc<AtomicBool>,
}

impl Transport for FakeTransport {
    fn describe(&self) -> String {
        "fuzz device".into()
    }
    fn device_features(&mut self) -> vireo_virtio::Result<u64> {
        // VERSION_1 | EVENT_IDX | INDIRECT | SEG_MAX | BLK_SIZE | FLUSH | DISCARD | WRITE_ZEROES
        Ok((1 << 32)
            | (1 << 29)
            | (1 << 28)
            | (1 << 2)
            | (1 << 6)
            | (1 << 9)
            | (1 << 13)
            | (1 << 14))
    }
    fn set_driver_features(&mut self, _: u64) -> vireo_virtio::Result<()> {
        Ok(())
    }
    fn max_queues(&mut self) -> vireo_virtio::Result<Option<u16>> {
        Ok(Some(1))
    }
    fn max_queue_size(&mut self, _: u16) -> vireo_virtio::Result<Option<u16>> {
        Ok(Some(16))
    }
    fn has_config(&self) -> bool {
        true
    }
    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> vireo_virtio::Result<()> {
        let mut c = [0u8; 64];
        c[0..8].copy_from_slice(&(1u64 << 16).to_le_bytes()); // capacity in sectors
        c[12..16].copy_from_slice(&4u32.to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
        c[36..40].copy_from_slice(&64u32.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&2u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&4u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&64u32.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&2u32.to_le_bytes()); // max_write_zeroes_seg
        let o = offset as usize;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = c.get(o + i).copied().unwrap_or(0);
        }
        Ok(())
    }
    fn setup_queue(&mut self, _index: u16, layout: &RingLayout) -> vireo_virtio::Result<Notifier> {
        self.dev.rings.lock().unwrap().push(*layout);
        Ok(Notifier::Counter(Arc::new(AtomicU64::new(0))))
    }
    fn start(&mut self) -> vireo_virtio::Result<()> {
        Ok(())
    }
    fn shutdown(&mut self) -> vireo_virtio::Result<()> {
        Ok(())
    }
    fn memory(&self) -> &Arc<DmaMemory> {
        &self.mem
    }
    fn broken_flag(&self) -> Arc<AtomicBool> {
        self.broken.clone()
    }
}

fn u16_at(addr: u64) -> &'static AtomicU16 {
    // SAFETY: callers pass 2-byte aligned addresses inside live ring memory of the
    // fake device's queues (DMA memory that outlives the device thread).
    unsafe { &*(addr as *const AtomicU16) }
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: addresses come from descriptors the driver wrote, pointing into its DMA
    // memory (virtual addressing); the read is unaligned-safe.
    unsafe { std::ptr::read_unaligned(addr as *const T) }
}

fn write_u8(addr: u64, v: u8) {
    // SAFETY: a device-writable byte of a request buffer in live DMA memory.
    unsafe { std::ptr::write_volatile(addr as *mut u8, v) }
}

/// The device thread: serve every queue, following the script once attach is done.
fn serve(dev: Arc<Dev>) {
    let mut last_avail: Vec<u16> = Vec::new();
    let mut used_idx: Vec<u16> = Vec::new();
    // Requests held back: (queue, head, writable bytes, status byte address).
    let mut held: Vec<(usize, u16, u32, Option<u64>)> = Vec::new();
    while !dev.stop.load(Ordering::Acquire) {
        if dev.release.load(Ordering::Acquire) && !held.is_empty() {
            let rings = dev.rings.lock().unwrap().clone();
            for (q, head, len, status_at) in held.drain(..) {
                let r = &rings[q];
                if let Some(a) = status_at {
                    write_u8(a, 0);
                }
                let slot = used_idx[q] as u64 % r.size as u64;
                let e = r.used_va + 4 + 8 * slot;
                // SAFETY: the used entry `slot` lies inside the used ring.
                unsafe {
                    std::ptr::write_volatile(e as *mut u32, head as u32);
                    std::ptr::write_volatile((e + 4) as *mut u32, len);
                }
                fence(Ordering::Release);
                used_idx[q] = used_idx[q].wrapping_add(1);
                u16_at(r.used_va + 2).store(used_idx[q], Ordering::Release);
            }
        }
        let rings = dev.rings.lock().unwrap().clone();
        last_avail.resize(rings.len(), 0);
        used_idx.resize(rings.len(), 0);
        let mut busy = false;
        for (q, r) in rings.iter().enumerate() {
            let size = r.size as u64;
            let avail_idx = u16_at(r.avail_va + 2).load(Ordering::Acquire);
            while last_avail[q] != avail_idx {
                busy = true;
                let head: u16 = read(r.avail_va + 4 + 2 * (last_avail[q] as u64 % size));
                last_avail[q] = last_avail[q].wrapping_add(1);
                // Walk the chain (direct or one indirect table).
                let mut segs: Vec<(u64, u32, bool)> = Vec::new();
                let mut i = head as u64;
                let mut table = r.desc_va;
                let mut limit = size;
                for _ in 0..64 {
                    let d = table + 16 * (i % limit);
                    let (addr, len, flags, next): (u64, u32, u16, u16) =
                        (read(d), read(d + 8), read(d + 12), read(d + 14));
                    if flags & DESC_F_INDIRECT != 0 {
                        table = addr;
                        limit = (len / 16).max(1) as u64;
                        i = 0;
                        continue;
                    }
                    segs.push((addr, len, flags & DESC_F_WRITE != 0));
                    if flags & DESC_F_NEXT == 0 {
                        break;
                    }
                    i = next as u64;
                }
                let writable: u32 = segs.iter().filter(|s| s.2).map(|s| s.1).sum();
                let status_at = segs
                    .iter()
                    .rev()
                    .find(|s| s.2 && s.1 > 0)
                    .map(|s| s.0 + s.1 as u64 - 1);
                let (mut id, mut len, mut status, mut complete, mut twice) =
                    (head as u32, writable, 0u8, true, false);
                if dev.fuzzing.load(Ordering::Acquire) {
                    match dev.byte() % 10 {
                        0..=3 => {}
                        4 => status = dev.byte(),
                        5 => {
                            len =
                                u32::from_le_bytes([dev.byte(), dev.byte(), dev.byte(), dev.byte()])
                        }
                        6 => id = dev.byte() as u32 % (2 * size as u32),
                        7 => complete = false,
                        8 => twice = true,
                        _ => status = 2, // UNSUPP
                    }
                }
                if !complete {
                    held.push((q, head, writable, status_at));
                    continue;
                }
                if let Some(a) = status_at {
                    write_u8(a, status);
                }
                for _ in 0..(1 + twice as usize) {
                    let slot = used_idx[q] as u64 % size;
                    let e = r.used_va + 4 + 8 * slot;
                    // SAFETY: the used entry `slot` lies inside the used ring.
                    unsafe {
                        std::ptr::write_volatile(e as *mut u32, id);
                        std::ptr::write_volatile((e + 4) as *mut u32, len);
                    }
                    fence(Ordering::Release);
                    used_idx[q] = used_idx[q].wrapping_add(1);
                    u16_at(r.used_va + 2).store(used_idx[q], Ordering::Release);
                }
            }
        }
        if !busy {
            std::thread::yield_now();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (plan, script) = data.split_at(data.len().min(24));
    let dev = Arc::new(Dev {
        rings: Mutex::new(Vec::new()),
        script: Mutex::new(script.iter().copied().collect()),
        fuzzing: AtomicBool::new(false),
        release: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
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
    let t = FakeTransport {
        dev: dev.clone(),
        mem,
        broken: Arc::new(AtomicBool::new(false)),
    };
    let d2 = dev.clone();
    let server = std::thread::spawn(move || serve(d2));
    let ctrl = BlkController::attach(
        &BlkParams {
            name: "F".into(),
            vq_count: 1,
            vq_size: 16,
            reconnect_timeout: None,
        },
        Box::new(t),
    );
    let ctrl = match ctrl {
        Ok(c) => c,
        Err(e) => panic!("an honest device must attach: {e}"),
    };
    dev.fuzzing.store(true, Ordering::Release);
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
    dev.release.store(true, Ordering::Release);
    drop(ch);
    dev.stop.store(true, Ordering::Release);
    server.join().unwrap();
    drop(ctrl);
});
