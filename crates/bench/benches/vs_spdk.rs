//! vireo vs SPDK's own virtio initiator (bdevperf) on SPDK's polled vhost target.
//!
//! SPDK v25.09's vhost target runs on CPU 0 with Null bdevs behind a virtio-blk and a
//! virtio-scsi controller; `vireo perf` and SPDK's `bdevperf` take turns (ABBA order)
//! on CPU 1 with 4 KiB random reads, one queue each, and the bench prints the median of
//! the per-round ratios (each round's two runs are back to back), the median and the
//! best IOPS of each with their ratios, every run in order, and the resident memory of
//! each process (bdevperf's hugepages counted separately). On a shared machine whose
//! noise comes in phases (runs drop to half speed for seconds at a time), the per-round
//! ratio is the least exposed to them: both runs of a round usually see the same phase.
//!
//! `cargo bench -p vireo-bench --bench vs_spdk -- [--seconds S] [--rounds R] [--qd 1,32,128] [--dev blk,scsi] [--vq-size N] [--target-stats]`
//! (`--vq-size`: vireo's queue size, default its own default of 128; SPDK's initiator uses 512).
//!
//! `--target-stats`: what each initiator makes the target do, from the target's own
//! counters over the middle 40% of every run (SPDK's `thread_get_stats` and
//! `bdev_get_iostat`, read on its RPC socket): nanoseconds per I/O the controller's
//! thread was busy, and the reactor's idle time per I/O (polls that found nothing, on
//! every thread of the core). An initiator that keeps the target fed leaves little idle
//! time; the busy time is the target's own cost per request.
//!
//! `--target-profile`: also `perf record -C <target core>` over the same window, and the
//! share of the target's samples in its vhost libraries (`libspdk_vhost` and
//! `librte_vhost`, `perf report --sort dso`) with each initiator. Needs `perf`.
//!
//! Needs an SPDK build (`SPDK_DIR` or `VIREO_SPDK_DIR`); without one it says SKIPPED
//! and exits 0. It builds `vireo` in release mode first (`cargo build --release -p vireo`).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vireo_bench::{median, run, vireo_binary, vireo_iops};
use vireo_peers::spdk::{self, SpdkBuild, SpdkVhost};

fn main() {
    let mut secs = 3.0;
    let mut rounds = 3;
    let mut qds = vec![1usize, 32, 128];
    let mut devs = vec!["blk".to_string(), "scsi".to_string()];
    // vireo's queue size (default: vireo's own default, 128, which every tested target
    // accepts; SPDK's initiator defaults to 512).
    let mut vq_size: Option<u16> = None;
    let mut target_stats = false;
    let mut target_profile = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut list = || {
            args.next()
                .expect("a value")
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        match a.as_str() {
            "--seconds" => secs = list()[0].parse().expect("--seconds N"),
            "--rounds" => rounds = list()[0].parse().expect("--rounds N"),
            "--qd" => {
                qds = list()
                    .iter()
                    .map(|q| q.parse().expect("--qd N,M"))
                    .collect()
            }
            "--dev" => devs = list(),
            "--vq-size" => vq_size = Some(list()[0].parse().expect("--vq-size N")),
            "--target-stats" => target_stats = true,
            "--target-profile" => {
                target_stats = true;
                target_profile = true;
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let build = match SpdkBuild::from_env() {
        Ok(b) => b,
        Err(why) => {
            spdk::skipped("bench vs_spdk", &why);
            return;
        }
    };
    let vireo = vireo_binary();
    let target = SpdkVhost::start(&build, 0).expect("SPDK vhost");
    println!(
        "4 KiB randread on SPDK v25.09 vhost (Null bdev, target on CPU 0), one queue, initiator on CPU 1, {secs} s x {rounds} rounds each, ABBA; median of the per-round ratios, medians, bests; vireo queue size {}, SPDK's 512",
        vq_size.map_or("128 (default)".to_string(), |n| n.to_string())
    );
    println!(
        "{:>5} {:>4} {:>9} {:>12} {:>12} {:>6} {:>12} {:>12} {:>6}   {:>10} {:>22}",
        "dev",
        "QD",
        "pair med",
        "vireo med",
        "SPDK med",
        "ratio",
        "vireo best",
        "SPDK best",
        "ratio",
        "vireo RSS",
        "bdevperf RSS (+huge)"
    );
    for dev in &devs {
        let sock = target.socket(&format!("{dev}.null"));
        let vconf = target.dir().join(format!("vireo-{dev}.json"));
        let mut conf: serde_json::Value =
            serde_json::from_str(&spdk::attach_config("V", &sock, dev, None)).unwrap();
        if let Some(n) = vq_size {
            conf["subsystems"][0]["config"][0]["params"]["vq_size"] = n.into();
        }
        std::fs::write(&vconf, conf.to_string()).unwrap();
        // SPDK's virtio-blk initiator wants a second queue in its config.
        let bconf = target.dir().join(format!("bdevperf-{dev}.json"));
        let vq = if dev == "blk" { 2 } else { 1 };
        std::fs::write(&bconf, spdk::attach_config("VirtioX", &sock, dev, Some(vq))).unwrap();
        let rpc_sock = target.dir().join("spdk.rpc");
        let bdev = spdk::CONTROLLERS
            .iter()
            .find(|c| c.0 == format!("{dev}.null"))
            .map(|c| c.2)
            .expect("a Null controller");
        let ctrl = format!("{dev}.null");
        for &qd in &qds {
            let (mut v, mut s) = (Vec::new(), Vec::new());
            let (mut tv, mut ts) = (Vec::new(), Vec::new());
            let (mut vmem, mut smem) = ((0, 0), (0, 0));
            for round in 0..rounds {
                let order = if round % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for is_vireo in order {
                    let q = qd.to_string();
                    let t = secs.to_string();
                    let args = [
                        "-q",
                        q.as_str(),
                        "-o",
                        "4096",
                        "-w",
                        "randread",
                        "-t",
                        t.as_str(),
                    ];
                    let (r, per_io) = std::thread::scope(|sc| {
                        let sampler = target_stats.then(|| {
                            let core = target_profile.then_some(target.core());
                            let (sock, ctrl) = (&rpc_sock, &ctrl);
                            sc.spawn(move || target_per_io(sock, ctrl, bdev, secs, core))
                        });
                        let r = if is_vireo {
                            let mut c = Command::new(&vireo);
                            c.args(["perf", "--json", "-m", "1", "-c"])
                                .arg(&vconf)
                                .args(args);
                            run(c, secs, vireo_iops)
                        } else {
                            let mut c = build.bdevperf_on(1);
                            c.arg("--json").arg(&bconf).args(args);
                            run(c, secs, spdk::bdevperf_total_iops)
                        };
                        (r, sampler.and_then(|h| h.join().ok().flatten()))
                    });
                    if is_vireo {
                        v.push(r.iops);
                        vmem = (r.rss_kib, r.huge_kib);
                        tv.extend(per_io);
                    } else {
                        s.push(r.iops);
                        smem = (r.rss_kib, r.huge_kib);
                        ts.extend(per_io);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            // Each round's two runs are back to back: their ratio is the least exposed
            // to the machine's slow phases, which last seconds and hit both sides.
            let mut pairs: Vec<f64> = v.iter().zip(&s).map(|(a, b)| a / b).collect();
            let pair_list: Vec<String> = pairs.iter().map(|r| format!("{r:.2}")).collect();
            let pm = median(&mut pairs);
            let (runs_v, runs_s) = (v.clone(), s.clone());
            let (mv, ms) = (median(&mut v), median(&mut s));
            let best = |x: &[f64]| x.iter().copied().fold(0.0, f64::max);
            let (bv, bs) = (best(&v), best(&s));
            println!(
                "{dev:>5} {qd:>4} {pm:>9.2} {mv:>12.0} {ms:>12.0} {:>6.2} {bv:>12.0} {bs:>12.0} {:>6.2}   {:>7} MiB {:>9} MiB (+{} MiB)",
                mv / ms,
                bv / bs,
                vmem.0 / 1024,
                smem.0 / 1024,
                smem.1 / 1024
            );
            eprintln!(
                "  {dev} QD{qd} runs in order: vireo {runs_v:.0?}, SPDK {runs_s:.0?}, ratios {}",
                pair_list.join(" ")
            );
            if target_stats {
                for (who, t) in [("vireo", &tv), ("SPDK", &ts)] {
                    let list: Vec<String> = t
                        .iter()
                        .map(|p| format!("{:.1}/{:.1}", p.busy_ns, p.idle_ns))
                        .collect();
                    let mut shares: Vec<f64> = t.iter().filter_map(|p| p.vhost_share).collect();
                    let (mut b, mut i): (Vec<f64>, Vec<f64>) =
                        t.iter().map(|p| (p.busy_ns, p.idle_ns)).unzip();
                    if b.is_empty() {
                        continue;
                    }
                    println!(
                        "  {dev} QD{qd} target per I/O with {who}: {} busy {:.1} ns, reactor idle {:.1} ns (median of {} runs; busy/idle in order: {})",
                        ctrl,
                        median(&mut b),
                        median(&mut i),
                        t.len(),
                        list.join(" ")
                    );
                    if !shares.is_empty() {
                        let list: Vec<String> = shares.iter().map(|x| format!("{x:.1}")).collect();
                        println!(
                            "  {dev} QD{qd} target's vhost share with {who}: {:.1}% (median; in order: {})",
                            median(&mut shares),
                            list.join(" ")
                        );
                    }
                }
            }
        }
    }
}

/// The target's time per I/O over a window of one run.
struct PerIo {
    /// The controller's thread, busy.
    busy_ns: f64,
    /// Every thread of the reactor, idle (polls that found nothing).
    idle_ns: f64,
    /// Percent of the target core's samples in its vhost libraries (`--target-profile`).
    vhost_share: Option<f64>,
}

/// The target's counters in the middle 40% of a run of about `secs` seconds that
/// starts now: the controller thread `ctrl`'s busy time and the reactor's idle time,
/// per I/O of `bdev`. `None` if the target did not answer or did no I/O.
/// With `profile_core`, `perf record` that core over the window too.
fn target_per_io(
    sock: &Path,
    ctrl: &str,
    bdev: &str,
    secs: f64,
    profile_core: Option<usize>,
) -> Option<PerIo> {
    std::thread::sleep(Duration::from_secs_f64(0.3 + 0.3 * secs));
    let a = counters(sock, ctrl, bdev)?;
    let t = Instant::now();
    let window = Duration::from_secs_f64(0.4 * secs);
    let vhost_share = match profile_core {
        Some(core) => {
            let data =
                std::env::temp_dir().join(format!("vireo-vs-spdk-{}.perf", std::process::id()));
            let rec = Command::new("perf")
                .args(["record", "-q", "-C", &core.to_string(), "-o"])
                .arg(&data)
                .args(["--", "sleep", &format!("{:.3}", window.as_secs_f64())])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            let share = rec
                .ok()
                .filter(|s| s.success())
                .and_then(|_| vhost_share(&data));
            let _ = std::fs::remove_file(&data);
            share
        }
        None => {
            std::thread::sleep(window.saturating_sub(t.elapsed()));
            None
        }
    };
    let b = counters(sock, ctrl, bdev)?;
    let ios = b.ios - a.ios;
    if ios <= 0.0 || a.tick_rate <= 0.0 {
        return None;
    }
    let ns = |ticks: f64| ticks / a.tick_rate * 1e9 / ios;
    Some(PerIo {
        busy_ns: ns(b.ctrl_busy - a.ctrl_busy),
        idle_ns: ns(b.idle - a.idle),
        vhost_share,
    })
}

/// Percent of the samples in `data` in SPDK's and DPDK's vhost libraries.
fn vhost_share(data: &Path) -> Option<f64> {
    let out = Command::new("perf")
        .args(["report", "--sort", "dso", "--stdio", "-i"])
        .arg(data)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut share = None;
    for l in text.lines() {
        let mut f = l.split_whitespace();
        let (Some(pct), Some(dso)) = (f.next(), f.next()) else {
            continue;
        };
        if dso.starts_with("libspdk_vhost") || dso.starts_with("librte_vhost") {
            let v: f64 = pct.trim_end_matches('%').parse().ok()?;
            *share.get_or_insert(0.0) += v;
        }
    }
    share
}

/// One reading of the target's counters.
struct Counters {
    tick_rate: f64,
    ctrl_busy: f64,
    idle: f64,
    ios: f64,
}

fn counters(sock: &Path, ctrl: &str, bdev: &str) -> Option<Counters> {
    let st = rpc(sock, "thread_get_stats", None)?;
    let mut c = Counters {
        tick_rate: st["tick_rate"].as_f64()?,
        ctrl_busy: 0.0,
        idle: 0.0,
        ios: 0.0,
    };
    for t in st["threads"].as_array()? {
        if t["name"] == ctrl {
            c.ctrl_busy = t["busy"].as_f64()?;
        }
        c.idle += t["idle"].as_f64()?;
    }
    let io = rpc(
        sock,
        "bdev_get_iostat",
        Some(serde_json::json!({ "name": bdev })),
    )?;
    // An object with a "bdevs" list (SPDK 23.05 and later), or the list itself.
    let list = io.get("bdevs").unwrap_or(&io);
    let b = list.get(0)?;
    c.ios = b["num_read_ops"].as_f64()? + b["num_write_ops"].as_f64()?;
    Some(c)
}

/// One JSON-RPC call on SPDK's socket, its result. Spoken directly: `rpc.py`'s Python
/// start-up would take CPU time from the run being measured.
fn rpc(sock: &Path, method: &str, params: Option<serde_json::Value>) -> Option<serde_json::Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = serde_json::json!({ "jsonrpc": "2.0", "id": 1, "method": method });
    if let Some(p) = params {
        req["params"] = p;
    }
    s.write_all(req.to_string().as_bytes()).ok()?;
    let reply = serde_json::Deserializer::from_reader(&mut s)
        .into_iter::<serde_json::Value>()
        .next()?
        .ok()?;
    reply.get("result").cloned()
}
