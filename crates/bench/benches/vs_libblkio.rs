//! vireo vs libblkio: 4 KiB random reads against one qemu-storage-daemon vhost-user-blk
//! null-co export, both on one queue, alternating runs so both see the same noise.
//!
//! `cargo bench -p vireo-bench --bench vs_libblkio -- [--seconds S] [--rounds R] [--socket PATH]
//!  [--mode poll|sleep|hybrid]`
//! `poll`: both spin on a polled queue. `sleep`: both sleep until a completion is
//! signalled (vireo `WaitMode::Sleep`; libblkio an interrupt-driven queue with
//! `do_io(min_completions = 1)`). `hybrid`: vireo spins 50 us then sleeps (libblkio has
//! no such mode and sleeps as in `sleep`). CPU is the initiator thread's time on a CPU
//! per I/O.
//! Without `--socket`, the bench starts its own qemu-storage-daemon.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vireo_bdev::{AttachParams, Completion, DevType, IoBuf, IoRequest, Registry, TrType};
use vireo_virtio::{DmaConfig, DmaMemory};

use vireo_bench::median;

const IO: usize = 4096;
const SIZE: u64 = 1 << 30;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn offset(&mut self) -> u64 {
        (self.next() % (SIZE / IO as u64)) * IO as u64
    }
}

/// Nanoseconds this thread ran on a CPU.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Poll,
    Sleep,
    Hybrid,
}

/// (IOPS, CPU µs per I/O)
fn run_vireo(sock: &Path, qd: usize, secs: f64, mode: Mode) -> (f64, f64) {
    let reg = Registry::new(DmaMemory::new(DmaConfig::default()).expect("dma"));
    let b = reg
        .attach(&AttachParams {
            wwpn: None,
            name: "B".into(),
            trtype: TrType::User,
            traddr: sock.display().to_string(),
            dev_type: DevType::Blk,
            vq_count: 1,
            vq_size: 256,
            io_timeout: None,
            reconnect_timeout: None,
            packed_ring: Default::default(),
        })
        .expect("vireo attach")
        .pop()
        .expect("bdev");
    let mut ch = b.open_channel().expect("channel");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut done: Vec<Completion> = Vec::with_capacity(qd);
    for i in 0..qd {
        let buf = IoBuf::Dma(b.alloc_buf(IO).expect("buf"));
        let lba = rng.offset() / 512;
        ch.submit(IoRequest::read(lba, (IO / 512) as u64, buf, i as u64))
            .expect("submit");
    }
    let start = Instant::now();
    let cpu0 = thread_cpu_ns();
    let end = start + Duration::from_secs_f64(secs);
    let mut ios = 0u64;
    let mut stop = false;
    let wait = match mode {
        Mode::Poll => vireo_bdev::WaitMode::Poll,
        Mode::Sleep => vireo_bdev::WaitMode::Sleep,
        Mode::Hybrid => vireo_bdev::WaitMode::Hybrid(Duration::from_micros(50)),
    };
    while ch.in_flight() > 0 {
        if mode == Mode::Poll {
            ch.poll(&mut done);
        } else {
            ch.wait(&mut done, 1, Duration::from_secs(1), wait);
        }
        if !done.is_empty() && Instant::now() >= end {
            stop = true;
        }
        for c in done.drain(..) {
            c.result.expect("vireo read");
            ios += 1;
            if !stop {
                let lba = rng.offset() / 512;
                ch.submit(IoRequest::read(lba, 8, c.buf.expect("buf"), c.user_data))
                    .expect("submit");
            }
        }
    }
    let cpu = (thread_cpu_ns() - cpu0) as f64 / 1000.0;
    (
        ios as f64 / start.elapsed().as_secs_f64(),
        cpu / ios.max(1) as f64,
    )
}

/// (IOPS, CPU µs per I/O)
fn run_blkio(sock: &Path, qd: usize, secs: f64, mode: Mode) -> (f64, f64) {
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", &sock.display().to_string())
        .expect("path");
    b.connect().expect("blkio connect");
    let polled = mode == Mode::Poll;
    b.set_i32("num-queues", if polled { 0 } else { 1 })
        .expect("num-queues");
    b.set_i32("num-poll-queues", if polled { 1 } else { 0 })
        .expect("num-poll-queues");
    let mut out = b.start().expect("blkio start");
    let mut q = if polled {
        out.poll_queues.pop().expect("poll queue")
    } else {
        out.queues.pop().expect("queue")
    };
    let region = b.alloc_mem_region(IO * qd).expect("region");
    b.map_mem_region(&region).expect("map");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let buf = |i: usize| (region.addr + i * IO) as *mut u8;
    for i in 0..qd {
        q.read(rng.offset(), buf(i), IO, i, blkio::ReqFlags::empty());
    }
    let mut comps: Vec<MaybeUninit<blkio::Completion>> =
        (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let start = Instant::now();
    let cpu0 = thread_cpu_ns();
    let end = start + Duration::from_secs_f64(secs);
    let mut ios = 0u64;
    let mut in_flight = qd;
    let mut stop = false;
    let min = if polled { 0 } else { 1 };
    while in_flight > 0 {
        let n = q.do_io(&mut comps, min, None, None).expect("do_io");
        if n > 0 && Instant::now() >= end {
            stop = true;
        }
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "libblkio read failed");
            ios += 1;
            in_flight -= 1;
            if !stop {
                q.read(
                    rng.offset(),
                    buf(c.user_data),
                    IO,
                    c.user_data,
                    blkio::ReqFlags::empty(),
                );
                in_flight += 1;
            }
        }
    }
    let iops = ios as f64 / start.elapsed().as_secs_f64();
    let cpu = (thread_cpu_ns() - cpu0) as f64 / 1000.0 / ios.max(1) as f64;
    drop(q);
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    (iops, cpu)
}

/// The daemon, the directory holding its socket (removed on drop), the socket path.
struct Qsd(Child, #[allow(dead_code)] tempfile::TempDir, PathBuf);

impl Qsd {
    fn start() -> Qsd {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("bench.sock");
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &format!("driver=null-co,node-name=disk0,size={SIZE},read-zeroes=on"),
                "--export",
                &format!(
                    "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                    sock.display()
                ),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon");
        for _ in 0..200 {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        Qsd(child, dir, sock)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let mut secs = 3.0;
    let mut rounds = 3;
    let mut sock: Option<PathBuf> = None;
    let mut only: Option<String> = None;
    let mut qds = vec![1usize, 32];
    let mut mode = Mode::Poll;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                secs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--seconds N")
            }
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds N")
            }
            "--socket" => sock = args.next().map(PathBuf::from),
            // For profiling one side: --only vireo|libblkio.
            "--only" => only = args.next(),
            "--qd" => qds = vec![args.next().and_then(|v| v.parse().ok()).expect("--qd N")],
            "--mode" => {
                mode = match args.next().as_deref() {
                    Some("poll") => Mode::Poll,
                    // `event`: its name before it was the library's, still accepted (not listed).
                    Some("sleep" | "event") => Mode::Sleep,
                    Some("hybrid") => Mode::Hybrid,
                    other => panic!("--mode poll|sleep|hybrid, got {other:?}"),
                }
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let own = if sock.is_none() {
        Some(Qsd::start())
    } else {
        None
    };
    let sock = sock.unwrap_or_else(|| own.as_ref().expect("qsd").2.clone());
    let mode_name = match mode {
        Mode::Poll => "both polling",
        Mode::Sleep => "both sleeping until signalled (sleep mode)",
        Mode::Hybrid => "vireo hybrid (50 us spin, then sleep) vs libblkio sleeping",
    };
    println!("4 KiB randread, qemu-storage-daemon null-co {} GiB, one queue, {mode_name}, {secs} s x {rounds} rounds each, alternating ABBA; median", SIZE >> 30);
    println!(
        "{:>4} {:>12} {:>12} {:>6} {:>14} {:>14}",
        "QD", "vireo IOPS", "blkio IOPS", "ratio", "vireo cpu/IO", "blkio cpu/IO"
    );
    for qd in qds {
        let mut v = Vec::new();
        let mut l = Vec::new();
        let (mut vc, mut lc) = (Vec::new(), Vec::new());
        // ABBA order, so neither side always runs first after the other.
        for round in 0..rounds {
            let order: [bool; 2] = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_vireo in order {
                if is_vireo && only.as_deref() != Some("libblkio") {
                    let (i, c) = run_vireo(&sock, qd, secs, mode);
                    v.push(i);
                    vc.push(c);
                } else if !is_vireo && only.as_deref() != Some("vireo") {
                    let (i, c) = run_blkio(&sock, qd, secs, mode);
                    l.push(i);
                    lc.push(c);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if v.is_empty() || l.is_empty() {
            eprintln!("  QD{qd} runs: vireo {v:.0?}, libblkio {l:.0?}");
            continue;
        }
        let (mv, ml) = (median(&mut v), median(&mut l));
        let (mvc, mlc) = (median(&mut vc), median(&mut lc));
        println!(
            "{qd:>4} {mv:>12.0} {ml:>12.0} {:>6.2} {:>11.2} us {:>11.2} us",
            mv / ml,
            mvc,
            mlc
        );
        eprintln!("  QD{qd} runs: vireo {v:.0?}, libblkio {l:.0?}");
    }
}
