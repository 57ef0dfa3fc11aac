//! `vireo perf`: a bdevperf-style load generator with verification. This module is
//! the engine; `cmd` turns the command line into [`PerfOptions`], `report` prints
//! the text report and `plot` draws it.

pub mod cmd;
pub mod plot;
pub mod report;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use vireo_bdev::{Bdev, IoBuf, IoChannel, IoOp, IoRequest};
use vireo_virtio::clock;

/// What each I/O of a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential mix of reads and writes (-M).
    Rw,
    /// Random mix of reads and writes (-M).
    Randrw,
    /// Write stamped blocks, read them back and compare.
    Verify,
    /// Unmap (discard).
    Unmap,
    /// Flush.
    Flush,
    /// Write zeroes.
    #[value(name = "write_zeroes")]
    WriteZeroes,
}

impl Workload {
    fn random(self) -> bool {
        matches!(
            self,
            Workload::Randread | Workload::Randwrite | Workload::Randrw
        )
    }
}

/// Options of one run.
#[derive(Debug, Clone)]
pub struct PerfOptions {
    /// Workload.
    pub workload: Workload,
    /// Bytes per I/O.
    pub io_size: usize,
    /// Queue depth per job.
    pub queue_depth: usize,
    /// Seconds to run.
    pub seconds: f64,
    /// CPU cores, one thread each.
    pub cores: Vec<usize>,
    /// Read percentage of rw/randrw.
    pub read_percent: u32,
    /// Seed of the verify stamps and the random offsets.
    pub seed: u64,
    /// Print a progress line each second.
    pub progress: bool,
    /// Give up on I/O that makes no progress for this long.
    pub io_timeout: Duration,
    /// How the I/O threads wait for completions.
    pub wait_mode: vireo_bdev::WaitMode,
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyUs {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

/// Results of a job or of the whole run.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    /// Bdev name (or "total").
    pub bdev: String,
    /// Core the job ran on (none for the total).
    pub core: Option<usize>,
    /// I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_per_s: f64,
    /// Latency.
    pub latency_us: LatencyUs,
    /// Completed I/Os.
    pub ios: u64,
    /// Failed I/Os.
    pub errors: u64,
    /// Reads whose data did not match what was written.
    pub verify_failures: u64,
    /// First mismatching LBA, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_mismatch_lba: Option<u64>,
    /// The read of the first mismatch returned nothing but zeros: a device that stores
    /// nothing (qemu-storage-daemon's null-co, SPDK's Null bdev). Only present when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub first_mismatch_read_zeros: bool,
    /// First error message, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Seconds measured.
    pub seconds: f64,
    /// Completions in each second of the run (one point per second).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub iops_per_second: Vec<f64>,
    /// Latency distribution: (latency in µs, fraction of I/Os at or below it).
    #[serde(skip)]
    pub latency_cdf: Vec<(f64, f64)>,
}

/// The whole report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct PerfReport {
    /// Workload name.
    pub workload: String,
    /// Bytes per I/O.
    pub io_size: usize,
    /// Queue depth per job.
    pub queue_depth: usize,
    /// Per job.
    pub jobs: Vec<JobReport>,
    /// All jobs together.
    pub total: JobReport,
    /// The run was stopped early by SIGINT or SIGTERM.
    pub interrupted: bool,
    /// A device stopped answering and its I/O was given up on (`--io-timeout`).
    pub stalled: bool,
    /// CPU time (user + system) of the whole process during the run, in seconds.
    pub cpu_seconds: f64,
    /// CPU microseconds per completed I/O.
    pub cpu_us_per_io: f64,
    /// How the I/O threads waited: poll, sleep or hybrid (with its spin time).
    pub wait_mode: String,
}

impl PerfReport {
    /// Whether every I/O succeeded and every verify matched.
    pub fn ok(&self) -> bool {
        self.total.errors == 0
            && self.total.verify_failures == 0
            && self.total.ios > 0
            && !self.interrupted
    }
}

struct JobResult {
    bdev: String,
    core: usize,
    /// The job's index (its counter and timeline).
    index: usize,
    hist: Histogram<u64>,
    ios: u64,
    bytes: u64,
    errors: u64,
    verify_failures: u64,
    first_mismatch: Option<Mismatch>,
    first_error: Option<String>,
    elapsed: f64,
    /// I/O outstanding past --io-timeout was given up on.
    gave_up: bool,
}

impl JobResult {
    /// Count an error; the first one is kept for the report.
    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// The first verify mismatch of a job.
#[derive(Debug, Clone, Copy)]
struct Mismatch {
    /// The first block that does not carry its stamp.
    lba: u64,
    /// Every byte of that read came back zero (the device returned zeros for data it
    /// acknowledged writing).
    read_zeros: bool,
}

/// xorshift64*: fast, good enough for offsets and fill patterns.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    #[inline]
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Fill `buf` (starting at `lba`) with blocks stamped with LBA, seed and generation.
pub fn stamp(buf: &mut [u8], block_size: usize, lba: u64, seed: u64, gen: u64) {
    for (i, block) in buf.chunks_mut(block_size).enumerate() {
        let l = lba + i as u64;
        block[0..8].copy_from_slice(&l.to_le_bytes());
        block[8..16].copy_from_slice(&seed.to_le_bytes());
        block[16..24].copy_from_slice(&gen.to_le_bytes());
        let mut r = Rng::new(l ^ seed.rotate_left(17) ^ gen.rotate_left(41));
        for w in block[24..].chunks_mut(8) {
            let v = r.next().to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
    }
}

/// The first block of `buf` (starting at `lba`) that does not carry the stamp.
pub fn check_stamp(buf: &[u8], block_size: usize, lba: u64, seed: u64, gen: u64) -> Option<u64> {
    let mut want = vec![0u8; block_size];
    for (i, block) in buf.chunks(block_size).enumerate() {
        let l = lba + i as u64;
        stamp(&mut want, block_size, l, seed, gen);
        if block != &want[..block.len()] {
            return Some(l);
        }
    }
    None
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Write,
    Read,
}

struct Slot {
    buf: Option<IoBuf>,
    lba: u64,
    gen: u64,
    phase: Phase,
    /// Verify: the region index this slot holds (no other slot may use it meanwhile).
    held: Option<u64>,
}

/// What one job runs on: a bdev slice, from one core.
#[derive(Clone)]
struct JobSpec {
    bdev: Arc<Bdev>,
    core: usize,
    /// First block of this job's region.
    first: u64,
    /// Blocks of this job's region.
    region: u64,
    index: u64,
}

/// A running job: its channel, its I/O slots and its counters.
struct Job<'o> {
    o: &'o PerfOptions,
    ch: IoChannel,
    first: u64,
    bs: usize,
    blocks_per_io: u64,
    slots_in_region: u64,
    /// Verify: region indices held by a slot.
    busy: Vec<bool>,
    rng: Rng,
    seq_next: u64,
    gen_counter: u64,
    slots: Vec<Slot>,
    in_flight: usize,
    stopping: bool,
    /// Clock ticks ([`clock`]) of the last completion.
    last_progress: u64,
    idle_polls: u32,
    /// Slots whose I/O completed in this pass, to submit again.
    again: Vec<u32>,
    /// Latencies of one pass, recorded after its new I/Os are published.
    lats: Vec<u64>,
    hist: Histogram<u64>,
    res: JobResult,
}

/// Verify: a slot's write completed (it reads the blocks back next) or its read did
/// (the data must carry the stamp its write put there).
#[inline(never)]
fn check_slot(s: &mut Slot, res: &mut JobResult, bs: usize, seed: u64) {
    match s.phase {
        Phase::Write => s.phase = Phase::Read,
        Phase::Read => {
            if let Some(b) = s.buf.as_ref() {
                if let Some(bad) = check_stamp(b.as_slice(), bs, s.lba, seed, s.gen) {
                    res.verify_failures += 1;
                    if res.first_mismatch.is_none() {
                        res.first_mismatch = Some(Mismatch {
                            lba: bad,
                            read_zeros: b.as_slice().iter().all(|&x| x == 0),
                        });
                    }
                }
            }
            s.phase = Phase::Write;
        }
    }
}

impl<'o> Job<'o> {
    fn new(spec: &JobSpec, o: &'o PerfOptions) -> Result<Job<'o>> {
        let info = spec.bdev.info();
        let ch = spec
            .bdev
            .open_channel()
            .with_context(|| format!("cannot open an I/O channel on bdev {}", info.name))?;
        let bs = info.block_size as usize;
        let blocks_per_io = ((o.io_size / bs) as u64).max(1);
        let mut slots = Vec::with_capacity(o.queue_depth);
        for _ in 0..o.queue_depth {
            let buf = if matches!(
                o.workload,
                Workload::Unmap | Workload::Flush | Workload::WriteZeroes
            ) {
                None
            } else {
                let mut b = spec.bdev.alloc_buf(o.io_size)?;
                b.as_mut_slice().fill(0x5a);
                Some(IoBuf::Dma(b))
            };
            slots.push(Slot {
                buf,
                lba: 0,
                gen: 0,
                phase: Phase::Write,
                held: None,
            });
        }
        Ok(Job {
            o,
            ch,
            first: spec.first,
            bs,
            blocks_per_io,
            slots_in_region: (spec.region / blocks_per_io).max(1),
            busy: if o.workload == Workload::Verify {
                vec![false; (spec.region / blocks_per_io).max(1) as usize]
            } else {
                Vec::new()
            },
            rng: Rng::new(o.seed ^ spec.index.wrapping_mul(0xA24B_AED4_963E_E407)),
            seq_next: 0,
            gen_counter: 0,
            slots,
            in_flight: 0,
            stopping: false,
            last_progress: clock::ticks(),
            idle_polls: 0,
            again: Vec::with_capacity(o.queue_depth),
            lats: Vec::with_capacity(o.queue_depth),
            hist: Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).expect("bounds"),
            res: JobResult {
                bdev: info.name.clone(),
                core: spec.core,
                index: spec.index as usize,
                hist: Histogram::new(3).expect("hist"),
                ios: 0,
                bytes: 0,
                errors: 0,
                verify_failures: 0,
                first_mismatch: None,
                first_error: None,
                elapsed: 0.0,
                gave_up: false,
            },
        })
    }

    /// The next offset for slot `slot`. Verify never hands a block range that another
    /// slot is still writing or reading back to a second slot (it would report its own
    /// race as corruption); `run` makes sure there are enough ranges for every slot.
    fn next_offset(&mut self, slot: usize) -> u64 {
        let mut idx = self.pick_index();
        if self.o.workload == Workload::Verify {
            if let Some(old) = self.slots[slot].held.take() {
                self.busy[old as usize] = false;
            }
            // At most queue_depth - 1 ranges are busy, fewer than the region holds.
            while self.busy[idx as usize] {
                idx = (idx + 1) % self.slots_in_region;
            }
            self.busy[idx as usize] = true;
            self.slots[slot].held = Some(idx);
        }
        self.first + idx * self.blocks_per_io
    }

    fn pick_index(&mut self) -> u64 {
        if self.o.workload.random() {
            // Multiply-shift range reduction: uniform enough, and no division.
            ((self.rng.next() as u128 * self.slots_in_region as u128) >> 64) as u64
        } else {
            let i = self.seq_next % self.slots_in_region;
            self.seq_next += 1;
            i
        }
    }

    fn error(&mut self, e: String) {
        self.res.error(e);
    }

    /// Build and submit the I/O of slot `i`.
    fn submit(&mut self, i: usize, new_lba: Option<u64>) -> bool {
        let o = self.o;
        let op = match o.workload {
            Workload::Read | Workload::Randread => IoOp::Read,
            Workload::Write | Workload::Randwrite => IoOp::Write,
            Workload::Rw | Workload::Randrw => {
                if (self.rng.next() % 100) < o.read_percent as u64 {
                    IoOp::Read
                } else {
                    IoOp::Write
                }
            }
            Workload::Verify => match self.slots[i].phase {
                Phase::Write => IoOp::Write,
                Phase::Read => IoOp::Read,
            },
            Workload::Unmap => IoOp::Unmap,
            Workload::Flush => IoOp::Flush,
            Workload::WriteZeroes => IoOp::WriteZeroes,
        };
        if op.has_data() && self.slots[i].buf.is_none() && !self.replace_buffer(i) {
            return false;
        }
        let bs = self.bs;
        if o.workload == Workload::Verify && self.slots[i].phase == Phase::Write {
            self.gen_counter += 1;
        }
        let gen = self.gen_counter;
        let s = &mut self.slots[i];
        if let Some(l) = new_lba {
            s.lba = l;
        }
        if o.workload == Workload::Verify {
            if let Some(b) = s.buf.as_mut() {
                if s.phase == Phase::Write {
                    s.gen = gen;
                    stamp(b.as_mut_slice(), bs, s.lba, o.seed, s.gen);
                } else {
                    // Poison the buffer: a device that completes a read without
                    // returning data must not pass for one that stored it.
                    b.as_mut_slice().fill(0xdb);
                }
            }
        }
        let (lba, n) = if op == IoOp::Flush {
            (0, 0)
        } else {
            (s.lba, self.blocks_per_io)
        };
        let req = IoRequest {
            op,
            offset_blocks: lba,
            num_blocks: n,
            buf: if op.has_data() { s.buf.take() } else { None },
            iov: Vec::new(),
            user_data: i as u64,
            timeout: None,
            no_unmap: false,
        };
        if let Err(r) = self.ch.submit(req) {
            let s = &mut self.slots[i];
            s.buf = r.buf.or(s.buf.take());
            self.error(r.error.to_string());
            return false;
        }
        self.in_flight += 1;
        true
    }

    /// Slot `i` lost its buffer with its last I/O: one that timed out (a buffer the
    /// device uses in place stays with the device, which may still write it) or that a
    /// controller reset aborted (its buffer is never reused). A new buffer lets the slot
    /// go on; without one its next submission would be refused, and a job would end at
    /// its first timeouts instead of running its time while the device is reset.
    #[cold]
    fn replace_buffer(&mut self, i: usize) -> bool {
        match self.ch.bdev().alloc_buf(self.o.io_size) {
            Ok(mut b) => {
                b.as_mut_slice().fill(0x5a);
                self.slots[i].buf = Some(IoBuf::Dma(b));
                true
            }
            Err(e) => {
                self.error(format!("no buffer for the next I/O: {e}"));
                false
            }
        }
    }

    fn start(&mut self) {
        for i in 0..self.o.queue_depth {
            let l = self.next_offset(i);
            if !self.submit(i, Some(l)) {
                break;
            }
        }
    }

    /// One polling pass; returns whether the job still has I/O in flight.
    /// `deadline` is in clock ticks.
    fn poll(&mut self, deadline: u64, stop: &AtomicBool, counter: &AtomicU64) -> bool {
        if self.in_flight == 0 {
            return false;
        }
        // Completions are taken as the channel matches them (no copy through a vector);
        // their slots are submitted again once the pass is over.
        let o = self.o;
        let bs = self.bs;
        let mut again = std::mem::take(&mut self.again);
        let mut lats = std::mem::take(&mut self.lats);
        let (slots, res) = (&mut self.slots, &mut self.res);
        let n = self.ch.poll_with(|c| {
            let i = c.user_data as usize;
            let s = &mut slots[i];
            if c.buf.is_some() {
                s.buf = c.buf;
            }
            match c.result {
                Ok(()) => {
                    if o.workload == Workload::Verify {
                        check_slot(s, res, bs, o.seed);
                    }
                    res.ios += 1;
                    res.bytes += if c.op == IoOp::Flush {
                        0
                    } else {
                        o.io_size as u64
                    };
                    lats.push(c.latency_ns.max(1));
                }
                Err(e) => {
                    s.phase = Phase::Write;
                    res.error(e.to_string());
                }
            }
            again.push(i as u32);
        });
        self.in_flight -= n;
        if n == 0 {
            self.lats = lats;
            self.again = again;
            // A device that stops answering must not hang the run (the clock is read
            // once every 1024 idle polls).
            self.idle_polls = self.idle_polls.wrapping_add(1);
            if self.idle_polls.is_multiple_of(1024)
                && clock::ticks_to_ns(clock::ticks().saturating_sub(self.last_progress))
                    >= u64::try_from(self.o.io_timeout.as_nanos()).unwrap_or(u64::MAX)
            {
                let n = self.in_flight;
                self.res.error(format!(
                    "{n} I/Os did not complete within {} s; giving up on them",
                    self.o.io_timeout.as_secs_f64()
                ));
                self.res.errors += n as u64 - 1;
                self.in_flight = 0;
                self.res.gave_up = true;
                return false;
            }
            // Nothing to do: back to polling at once (a short idle pass is a short
            // wait between a completion's arrival and its discovery).
            return true;
        }
        // The channel's clock reading of this pass (no extra one).
        self.last_progress = self.ch.last_completion_ticks();
        // A failed device fails everything: stop early instead of spinning on errors.
        if !self.stopping
            && (self.last_progress >= deadline
                || stop.load(Ordering::Relaxed)
                || crate::signals::stop_requested()
                || self.res.errors >= 16 * o.queue_depth as u64)
        {
            self.stopping = true;
        }
        if !self.stopping {
            for &i in &again {
                let i = i as usize;
                // Verify: a slot reads back the blocks it just wrote before moving on.
                let new_lba =
                    if o.workload == Workload::Verify && self.slots[i].phase == Phase::Read {
                        None
                    } else {
                        Some(self.next_offset(i))
                    };
                self.submit(i, new_lba);
            }
            // The new I/Os go to the device before the bookkeeping of the old ones.
            self.ch.publish();
        }
        again.clear();
        self.again = again;
        for &l in &lats {
            let _ = self.hist.record(l);
        }
        if !lats.is_empty() {
            counter.fetch_add(lats.len() as u64, Ordering::Relaxed);
        }
        lats.clear();
        self.lats = lats;
        self.in_flight > 0
    }

    fn finish(self, elapsed: f64) -> JobResult {
        let Job {
            ch, hist, mut res, ..
        } = self;
        if res.gave_up {
            // The device stopped answering: do not wait for it again on the way out.
            ch.abandon();
        }
        res.elapsed = elapsed;
        res.hist = hist;
        res
    }
}

/// One thread: every job of one core, polled round robin (jobs on the same controller
/// may share its queue on this thread).
fn run_core(
    specs: &[JobSpec],
    o: &PerfOptions,
    stop: &AtomicBool,
    counters: &[AtomicU64],
    barrier: &Barrier,
) -> Result<Vec<JobResult>> {
    if let Some(s) = specs.first() {
        if let Err(e) = crate::cpus::pin_to(s.core) {
            tracing::warn!(core = s.core, "cannot pin thread to core: {e}");
        }
    }
    let jobs: Result<Vec<Job<'_>>> = specs.iter().map(|s| Job::new(s, o)).collect();
    // Everybody meets at the barrier, even a thread whose setup failed.
    barrier.wait();
    let mut jobs = jobs?;
    let start = Instant::now();
    let deadline = clock::ticks().saturating_add(clock::ns_to_ticks((o.seconds * 1e9) as u64));
    for j in &mut jobs {
        j.start();
    }
    let mut active = true;
    let mut last_progress = Instant::now();
    let mut last_done = 0u64;
    let mut fds = Vec::new();
    while active {
        active = false;
        for j in &mut jobs {
            let c = &counters[j.res.index];
            active |= j.poll(deadline, stop, c);
        }
        if o.wait_mode == vireo_bdev::WaitMode::Poll || !active {
            continue;
        }
        // Wait modes: sleep on the queues' completion eventfds once nothing happened
        // for a while (hybrid) or at once (wait).
        let done: u64 = jobs
            .iter()
            .map(|j| counters[j.res.index].load(Ordering::Relaxed))
            .sum();
        if done != last_done {
            last_done = done;
            last_progress = Instant::now();
            continue;
        }
        if let vireo_bdev::WaitMode::Hybrid(spin) = o.wait_mode {
            if last_progress.elapsed() < spin {
                continue;
            }
        }
        fds.clear();
        let mut ready = false;
        for j in &mut jobs {
            match j.ch.arm() {
                vireo_bdev::Armed::Ready => ready = true,
                vireo_bdev::Armed::Fd(fd) => {
                    if !fds.contains(&fd) {
                        fds.push(fd)
                    }
                }
                vireo_bdev::Armed::NoFd => {}
            }
        }
        if !ready {
            if fds.is_empty() {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                vireo_virtio::wait_readable(&fds, Duration::from_millis(10));
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(jobs.into_iter().map(|j| j.finish(elapsed)).collect())
}

fn latency(h: &Histogram<u64>) -> LatencyUs {
    let us = |v: u64| v as f64 / 1000.0;
    if h.is_empty() {
        return LatencyUs {
            mean: 0.0,
            p50: 0.0,
            p99: 0.0,
            p999: 0.0,
            max: 0.0,
        };
    }
    LatencyUs {
        mean: h.mean() / 1000.0,
        p50: us(h.value_at_quantile(0.5)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        max: us(h.max()),
    }
}

fn report(r: &JobResult, bdev: String, core: Option<usize>, secs: f64) -> JobReport {
    let secs = secs.max(1e-9);
    JobReport {
        bdev,
        core,
        iops: r.ios as f64 / secs,
        mib_per_s: r.bytes as f64 / secs / (1024.0 * 1024.0),
        latency_us: latency(&r.hist),
        ios: r.ios,
        errors: r.errors,
        verify_failures: r.verify_failures,
        first_mismatch_lba: r.first_mismatch.map(|m| m.lba),
        first_mismatch_read_zeros: r.first_mismatch.is_some_and(|m| m.read_zeros),
        first_error: r.first_error.clone(),
        seconds: secs,
        iops_per_second: Vec::new(),
        latency_cdf: cdf(&r.hist),
    }
}

/// The latency distribution as (µs, fraction) points, one per histogram step.
fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let n = h.len() as f64;
    h.iter_quantiles(10)
        .map(|v| {
            (
                v.value_iterated_to() as f64 / 1000.0,
                v.count_since_last_iteration() as f64,
            )
        })
        .scan(0.0, |acc, (us, c)| {
            *acc += c;
            Some((us.max(0.001), (*acc / n).min(1.0)))
        })
        .collect()
}

/// The deepest queue a job keeps (`-q`): twice the largest virtqueue; its slots are
/// allocated before the run.
pub const MAX_QUEUE_DEPTH: usize = 65536;

/// Run the workload on every bdev from every core; one channel per (bdev, core).
pub fn run(bdevs: &[Arc<Bdev>], o: &PerfOptions) -> Result<PerfReport> {
    if bdevs.is_empty() {
        bail!("no bdevs to run on");
    }
    if !(1..=MAX_QUEUE_DEPTH).contains(&o.queue_depth) {
        bail!("queue depth (-q) must be 1 to {MAX_QUEUE_DEPTH}");
    }
    if o.seconds.is_nan() || o.seconds <= 0.0 {
        bail!("run time (-t) must be positive");
    }
    if o.read_percent > 100 {
        bail!("read percentage (-M) must be 0..=100");
    }
    let no_data = matches!(o.workload, Workload::Flush);
    // One job per (bdev, core); each core's jobs run on one thread.
    let mut per_core: Vec<Vec<JobSpec>> = vec![Vec::new(); o.cores.len()];
    let mut index = 0u64;
    for b in bdevs {
        let info = b.info();
        let bs = info.block_size as usize;
        if !no_data && (o.io_size == 0 || !o.io_size.is_multiple_of(bs)) {
            bail!(
                "I/O size (-o) {} must be a non-zero multiple of bdev {}'s block size {}",
                o.io_size,
                info.name,
                bs
            );
        }
        let region = info.num_blocks / o.cores.len() as u64;
        let blocks_per_io = (o.io_size / bs) as u64;
        if o.workload == Workload::Verify
            && blocks_per_io > 0
            && (o.queue_depth as u64) > region / blocks_per_io
        {
            bail!(
                "verify needs a block range per queued I/O: -q {} exceeds the {} ranges of {} bytes in bdev {}'s {} per job; lower -q or -o",
                o.queue_depth,
                region / blocks_per_io,
                o.io_size,
                info.name,
                if o.cores.len() > 1 { "share" } else { "capacity" }
            );
        }
        if !no_data && region < blocks_per_io {
            bail!(
                "bdev {} ({} blocks) is too small for {} jobs of {}-byte I/O",
                info.name,
                info.num_blocks,
                o.cores.len(),
                o.io_size
            );
        }
        for (k, &core) in o.cores.iter().enumerate() {
            per_core[k].push(JobSpec {
                bdev: b.clone(),
                core,
                first: region * k as u64,
                region,
                index,
            });
            index += 1;
        }
    }
    // Every job allocates -q buffers of -o bytes before the run: refuse what the
    // machine cannot hold instead of growing memory for a long time first.
    if !matches!(
        o.workload,
        Workload::Unmap | Workload::Flush | Workload::WriteZeroes
    ) {
        let jobs = (bdevs.len() * o.cores.len()) as u128;
        let need = jobs * o.queue_depth as u128 * o.io_size as u128;
        if let Some(avail) = mem_available() {
            if need > avail as u128 / 2 {
                bail!(
                    "{} jobs x -q {} x -o {} need {} MiB of I/O buffers, more than half of the {} MiB of available memory; lower -q or -o",
                    jobs,
                    o.queue_depth,
                    o.io_size,
                    need >> 20,
                    avail >> 20
                );
            }
        }
        // DMA memory sized to the work: each memory (the vhost-user controllers share
        // one, a PCI controller has its own) gets one region for its jobs' buffers now,
        // when its first region has not room enough, instead of a large first region
        // for every process or growth in doublings while the jobs allocate.
        let mut per_memory: Vec<(Arc<vireo_virtio::DmaMemory>, usize)> = Vec::new();
        for b in bdevs {
            let bytes = o.cores.len() * o.queue_depth * o.io_size;
            match per_memory
                .iter_mut()
                .find(|(m, _)| Arc::ptr_eq(m, b.memory()))
            {
                Some((_, n)) => *n += bytes,
                None => per_memory.push((b.memory().clone(), bytes)),
            }
        }
        for (mem, bytes) in per_memory {
            mem.reserve(bytes).with_context(|| {
                format!(
                    "cannot set up {} MiB of DMA memory for the I/O buffers",
                    bytes >> 20
                )
            })?;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let njobs = per_core.iter().map(Vec::len).sum::<usize>();
    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..njobs).map(|_| AtomicU64::new(0)).collect());
    let barrier = Arc::new(Barrier::new(per_core.len() + 1));
    let mut handles = Vec::new();
    for (idx, specs) in per_core.into_iter().enumerate() {
        let o = o.clone();
        let stop = stop.clone();
        let counters = counters.clone();
        let barrier = barrier.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("perf-{idx}"))
                .spawn(move || run_core(&specs, &o, &stop, &counters, &barrier))
                .context("cannot start a perf thread")?,
        );
    }
    barrier.wait();
    let start = Instant::now();
    let cpu_start = process_cpu_seconds();
    // Once a second: each job's completions (the timeline), and the progress line.
    let mut timeline: Vec<Vec<f64>> = vec![Vec::new(); njobs];
    let mut last: Vec<u64> = vec![0; njobs];
    let mut tick = start;
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        if tick.elapsed() >= Duration::from_secs(1) {
            let dt = tick.elapsed().as_secs_f64();
            tick = Instant::now();
            let mut sum = 0.0;
            for (k, c) in counters.iter().enumerate() {
                let now = c.load(Ordering::Relaxed);
                let rate = (now - last[k]) as f64 / dt;
                last[k] = now;
                timeline[k].push(rate);
                sum += rate;
            }
            if o.progress {
                eprint!(
                    "\r[{:>5.1}s] {:>10.0} IOPS {:>9.2} MiB/s   ",
                    start.elapsed().as_secs_f64(),
                    sum,
                    sum * o.io_size as f64 / 1048576.0
                );
            }
        }
    }
    if o.progress {
        eprintln!();
    }
    let mut results = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h
            .join()
            .map_err(|_| anyhow::anyhow!("a perf thread panicked"))?
        {
            Ok(r) => results.extend(r),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let mut total = JobResult {
        bdev: "total".into(),
        core: 0,
        index: usize::MAX,
        hist: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("bounds"),
        ios: 0,
        bytes: 0,
        errors: 0,
        verify_failures: 0,
        first_mismatch: None,
        first_error: None,
        elapsed: 0.0,
        gave_up: false,
    };
    let mut job_reports = Vec::new();
    for r in &results {
        let mut jr = report(r, r.bdev.clone(), Some(r.core), r.elapsed);
        jr.iops_per_second = timeline.get(r.index).cloned().unwrap_or_default();
        job_reports.push(jr);
        let _ = total.hist.add(&r.hist);
        total.ios += r.ios;
        total.bytes += r.bytes;
        total.errors += r.errors;
        total.verify_failures += r.verify_failures;
        total.first_mismatch = total.first_mismatch.or(r.first_mismatch);
        if total.first_error.is_none() {
            total.first_error = r.first_error.clone();
        }
        total.elapsed = total.elapsed.max(r.elapsed);
        total.gave_up |= r.gave_up;
    }
    let secs = total.elapsed;
    let cpu_seconds = process_cpu_seconds() - cpu_start;
    Ok(PerfReport {
        cpu_seconds,
        cpu_us_per_io: if total.ios > 0 {
            cpu_seconds * 1e6 / total.ios as f64
        } else {
            0.0
        },
        wait_mode: match o.wait_mode {
            vireo_bdev::WaitMode::Poll => "poll".into(),
            vireo_bdev::WaitMode::Sleep => "sleep".into(),
            vireo_bdev::WaitMode::Hybrid(d) => format!("hybrid ({} us spin)", d.as_micros()),
        },
        workload: format!("{:?}", o.workload).to_lowercase(),
        io_size: o.io_size,
        queue_depth: o.queue_depth,
        jobs: job_reports,
        total: report(&total, "total".into(), None, secs),
        interrupted: crate::signals::stop_requested(),
        stalled: total.gave_up,
    })
}

/// User + system CPU time of the process so far, in seconds.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed rusage struct it is given; no other effect.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// MemAvailable of /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = m
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Whether progress lines make sense (stderr is a terminal).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_bdev::{BlkController, BlkParams, WaitMode};
    use vireo_virtio::testing::{test_memory, FakeBlk};

    /// A disk that keeps every request: each I/O times out (its buffer, used in place,
    /// stays with the device), escalates to a controller reset, and the requests the
    /// reset aborts lose their buffers too. The job goes on with new buffers until the
    /// error limit stops it; it used to end at its first timeouts, each slot's next
    /// submission refused for want of a buffer (the guest test's slow run then lasted
    /// 0.3 s, not its -t, and its process could exit while the device was still being
    /// brought back).
    #[test]
    fn a_job_goes_on_after_its_io_timed_out_and_was_aborted() {
        let blk = FakeBlk::new(1 << 16, 1, 8);
        blk.auto_serve(true);
        let params = BlkParams {
            name: "B".into(),
            vq_count: 1,
            vq_size: 16,
            reconnect_timeout: Some(Duration::from_secs(5)),
            packed_ring: Default::default(),
        };
        let c =
            BlkController::attach(&params, blk.dev.connect(&test_memory(4 << 20))).expect("attach");
        // From now on the device answers nothing.
        blk.hold(true);
        let bdev = c.bdev().clone();
        bdev.set_default_timeout(Some(Duration::from_millis(20)));
        let qd = 2;
        let o = PerfOptions {
            workload: Workload::Randread,
            io_size: 4096,
            queue_depth: qd,
            // Ended by the error limit (16 errors per queued I/O) long before this, which
            // only bounds a broken run.
            seconds: 60.0,
            cores: vec![crate::cpus::allowed_cpus().unwrap()[0]],
            read_percent: 100,
            seed: 1,
            progress: false,
            io_timeout: Duration::from_secs(60),
            wait_mode: WaitMode::Poll,
        };
        let rep = run(&[bdev], &o).expect("the run");
        assert!(
            rep.total.errors >= 16 * qd as u64,
            "the job stopped at the error limit, not at its first timeouts: {} errors, the first: {:?}",
            rep.total.errors,
            rep.total.first_error
        );
        assert!(
            rep.total
                .first_error
                .as_deref()
                .is_some_and(|e| e.contains("timed out")),
            "{:?}",
            rep.total.first_error
        );
        assert!(
            blk.held() > 2 * qd,
            "the device got new requests after the first timeouts: {}",
            blk.held()
        );
        assert!(
            c.reconnects() >= 1,
            "the controller was reset and came back"
        );
        assert_eq!(rep.total.ios, 0);
    }

    #[test]
    fn stamps_round_trip_and_catch_corruption() {
        let mut b = vec![0u8; 4096 * 4];
        stamp(&mut b, 4096, 100, 7, 3);
        assert_eq!(check_stamp(&b, 4096, 100, 7, 3), None);
        assert_eq!(check_stamp(&b, 4096, 100, 8, 3), Some(100));
        assert_eq!(check_stamp(&b, 4096, 100, 7, 4), Some(100));
        b[2 * 4096 + 1000] ^= 1;
        assert_eq!(check_stamp(&b, 4096, 100, 7, 3), Some(102));
        // A block written at another LBA is caught.
        let mut c = vec![0u8; 512];
        stamp(&mut c, 512, 5, 7, 3);
        assert_eq!(check_stamp(&c, 512, 6, 7, 3), Some(6));
    }
}
