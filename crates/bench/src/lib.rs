//! Benchmarks live in `benches/`; run `cargo bench -p vireo-bench`. This library holds
//! what several of them share: running `vireo perf` (built in release mode) and other
//! initiators, reading their IOPS, sampling their memory, and the median.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What every bench takes: seconds per run, rounds, queue depths.
pub struct Common {
    /// `--seconds S`.
    pub secs: f64,
    /// `--rounds R`.
    pub rounds: usize,
    /// `--qd N,M`.
    pub qds: Vec<usize>,
}

/// Read the command line: `--seconds`, `--rounds` and `--qd` into `c` (defaults as
/// given), cargo's own `--bench` ignored, every other flag to `own(flag, value)`, where
/// `value()` takes the flag's value split at commas. `own` returns false for a flag it
/// does not know, which stops the bench naming it.
pub fn parse_args(
    c: &mut Common,
    mut own: impl FnMut(&str, &mut dyn FnMut() -> Vec<String>) -> bool,
) {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{a} needs a value"))
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        match a.as_str() {
            "--seconds" => c.secs = value()[0].parse().expect("--seconds S"),
            "--rounds" => c.rounds = value()[0].parse().expect("--rounds R"),
            "--qd" => {
                c.qds = value()
                    .iter()
                    .map(|q| q.parse().expect("--qd N,M"))
                    .collect()
            }
            "--bench" => {}
            other => {
                if !own(other, &mut value) {
                    panic!("unknown argument {other}");
                }
            }
        }
    }
}

/// Resident memory of `pid` in KiB: (VmRSS, HugetlbPages).
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("HugetlbPages:"))
}

/// One run: IOPS and memory sampled in the middle of it.
pub struct Run {
    /// IOPS the parser found in the output.
    pub iops: f64,
    /// VmRSS in KiB.
    pub rss_kib: u64,
    /// HugetlbPages in KiB.
    pub huge_kib: u64,
}

/// Run `cmd` (about `secs` seconds), sample its memory past the middle, parse its IOPS.
pub fn run(mut cmd: Command, secs: f64, parse: impl Fn(&str) -> Option<f64>) -> Run {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    std::thread::sleep(Duration::from_secs_f64(0.3 + secs * 0.6));
    let (rss_kib, huge_kib) = memory_kib(pid);
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    let iops = parse(&text).unwrap_or_else(|| {
        panic!(
            "no IOPS in the output of {cmd:?}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Run {
        iops,
        rss_kib,
        huge_kib,
    }
}

/// `vireo perf --json`'s total IOPS; `None` when the run had errors.
pub fn vireo_iops(text: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v["total"]["errors"] != 0 {
        return None;
    }
    v["total"]["iops"].as_f64()
}

/// The median (the upper one of an even count); sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Build `vireo` in release mode; its path.
///
/// `VIREO_BIN` names another binary to measure instead (an older build, for an A/B
/// against the same peer: run the bench once with each).
pub fn vireo_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("VIREO_BIN") {
        return PathBuf::from(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "-p", "vireo", "--bin", "vireo"])
        .status()
        .expect("cargo build")
        .success();
    assert!(ok, "cargo build --release -p vireo failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("release/vireo")
}

/// `vireo perf --json -m 1 -c CONF ARGS` (one job on CPU 1).
pub fn vireo_perf(vireo: &Path, conf: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(vireo);
    c.args(["perf", "--json", "-m", "1", "-c"])
        .arg(conf)
        .args(args);
    c
}

/// vireo against SPDK's initiator at one queue depth: every run of each, in order.
#[derive(Default)]
pub struct Abba {
    /// vireo's IOPS, run by run.
    pub vireo: Vec<f64>,
    /// SPDK's IOPS, run by run.
    pub spdk: Vec<f64>,
    /// Memory of vireo's last run (VmRSS, HugetlbPages; KiB).
    pub vireo_mem: (u64, u64),
    /// Memory of SPDK's last run.
    pub spdk_mem: (u64, u64),
    /// What vireo's runs made the target do (when probed).
    pub vireo_target: Vec<PerIo>,
    /// What SPDK's runs made the target do.
    pub spdk_target: Vec<PerIo>,
}

/// `rounds` rounds of one vireo run and one SPDK run (4 KiB random reads at `qd` for
/// `secs`), in ABBA order: each round's two runs are back to back, so their ratio is the
/// least exposed to the machine's slow phases, which last seconds and hit both sides.
/// `run_one(is_vireo, args)` runs one side with these bdevperf-style arguments.
pub fn abba(
    rounds: usize,
    qd: usize,
    secs: f64,
    mut run_one: impl FnMut(bool, &[&str]) -> (Run, Option<PerIo>),
) -> Abba {
    let mut a = Abba::default();
    let (q, t) = (qd.to_string(), secs.to_string());
    let args = ["-q", &q, "-o", "4096", "-w", "randread", "-t", &t];
    for round in 0..rounds {
        for is_vireo in [round % 2 == 0, round % 2 != 0] {
            let (r, per_io) = run_one(is_vireo, &args);
            if is_vireo {
                a.vireo.push(r.iops);
                a.vireo_mem = (r.rss_kib, r.huge_kib);
                a.vireo_target.extend(per_io);
            } else {
                a.spdk.push(r.iops);
                a.spdk_mem = (r.rss_kib, r.huge_kib);
                a.spdk_target.extend(per_io);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    a
}

impl Abba {
    /// The columns of [`Abba::print`].
    pub fn header() {
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
    }

    /// One line: the median of the per-round ratios, the medians and bests of each side
    /// with their ratios, and memory; every run in order on stderr; and what each side
    /// made the target `ctrl` do, when probed.
    pub fn print(&self, dev: &str, qd: usize, ctrl: &str) {
        let mut pairs: Vec<f64> = self
            .vireo
            .iter()
            .zip(&self.spdk)
            .map(|(a, b)| a / b)
            .collect();
        let pair_list: Vec<String> = pairs.iter().map(|r| format!("{r:.2}")).collect();
        let pm = median(&mut pairs);
        let (mut v, mut s) = (self.vireo.clone(), self.spdk.clone());
        let (mv, ms) = (median(&mut v), median(&mut s));
        let best = |x: &[f64]| x.iter().copied().fold(0.0, f64::max);
        let (bv, bs) = (best(&v), best(&s));
        // Memory not measured (a wrapper process ran the initiator): "-".
        let mib = |kib: u64| match kib {
            0 => "-".to_string(),
            k => (k / 1024).to_string(),
        };
        let (vmem, smem) = (self.vireo_mem, self.spdk_mem);
        println!(
            "{dev:>5} {qd:>4} {pm:>9.2} {mv:>12.0} {ms:>12.0} {:>6.2} {bv:>12.0} {bs:>12.0} {:>6.2}   {:>7} MiB {:>9} MiB (+{} MiB)",
            mv / ms,
            bv / bs,
            mib(vmem.0),
            mib(smem.0),
            mib(smem.1)
        );
        eprintln!(
            "  {dev} QD{qd} runs in order: vireo {:.0?}, SPDK {:.0?}, ratios {}",
            self.vireo,
            self.spdk,
            pair_list.join(" ")
        );
        for (who, t) in [("vireo", &self.vireo_target), ("SPDK", &self.spdk_target)] {
            report_target(&format!("{dev} QD{qd}"), who, ctrl, t);
        }
    }

    /// The pair medians of the rounds whose SPDK run was above `iops` and of the others:
    /// the machine's fast and slow phases apart (a round that straddles a phase change
    /// lands on the side of its SPDK run).
    pub fn print_phases(&self, dev: &str, qd: usize, iops: f64) {
        let (mut fast, mut slow) = (Vec::new(), Vec::new());
        for (v, s) in self.vireo.iter().zip(&self.spdk) {
            if *s > iops { &mut fast } else { &mut slow }.push(v / s);
        }
        let side = |r: &mut Vec<f64>| match r.len() {
            0 => "none".to_string(),
            n => format!("{:.3} ({n} rounds)", median(r)),
        };
        println!(
            "  {dev} QD{qd} pair median of rounds with SPDK above {iops:.0} IOPS: {}; of the others: {}",
            side(&mut fast),
            side(&mut slow)
        );
    }
}

/// Where to read what a run made SPDK's target do (see [`target_per_io`]).
pub struct Probe<'a> {
    /// The target's RPC socket.
    pub sock: &'a Path,
    /// The controller's thread (its name).
    pub ctrl: &'a str,
    /// The bdev behind the controller.
    pub bdev: &'a str,
    /// `perf record` this core over the window too.
    pub profile_core: Option<usize>,
}

/// [`run`], and with `probe` the target's counters over the middle of the run.
pub fn run_probed(
    cmd: Command,
    secs: f64,
    parse: impl Fn(&str) -> Option<f64>,
    probe: Option<&Probe<'_>>,
) -> (Run, Option<PerIo>) {
    std::thread::scope(|sc| {
        let sampler = probe
            .map(|p| sc.spawn(move || target_per_io(p.sock, p.ctrl, p.bdev, secs, p.profile_core)));
        let r = run(cmd, secs, parse);
        (r, sampler.and_then(|h| h.join().ok().flatten()))
    })
}

/// The target's time per I/O over a window of one run.
pub struct PerIo {
    /// The controller's thread, busy.
    pub busy_ns: f64,
    /// Every thread of the reactor, idle (polls that found nothing).
    pub idle_ns: f64,
    /// Percent of the target core's samples in its vhost libraries (`--target-profile`).
    pub vhost_share: Option<f64>,
    /// Requests per poll of the controller's `vdev_worker` that found work (the batch the
    /// target takes from the ring at once; its per-poll cost is spread over it), from
    /// `thread_get_pollers`. `None` where the target does not report pollers.
    pub per_busy_poll: Option<f64>,
}

/// Print what `t` (runs with initiator `who`) made the target do: the medians of the
/// controller thread `ctrl`'s busy time and the reactor's idle time per I/O, and of the
/// vhost share when profiled, each with every run's value.
pub fn report_target(label: &str, who: &str, ctrl: &str, t: &[PerIo]) {
    if t.is_empty() {
        return;
    }
    let list: Vec<String> = t
        .iter()
        .map(|p| format!("{:.1}/{:.1}", p.busy_ns, p.idle_ns))
        .collect();
    let (mut b, mut i): (Vec<f64>, Vec<f64>) = t.iter().map(|p| (p.busy_ns, p.idle_ns)).unzip();
    println!(
        "  {label} target per I/O with {who}: {ctrl} busy {:.1} ns, reactor idle {:.1} ns (median of {} runs; busy/idle in order: {})",
        median(&mut b),
        median(&mut i),
        t.len(),
        list.join(" ")
    );
    let optional = |what: &str, unit: &str, v: fn(&PerIo) -> Option<f64>| {
        let mut vals: Vec<f64> = t.iter().filter_map(v).collect();
        if vals.is_empty() {
            return;
        }
        let list: Vec<String> = vals.iter().map(|x| format!("{x:.1}")).collect();
        println!(
            "  {label} target's {what} with {who}: {:.1}{unit} (median; in order: {})",
            median(&mut vals),
            list.join(" ")
        );
    };
    optional("requests per busy poll", "", |p| p.per_busy_poll);
    optional("vhost share", "%", |p| p.vhost_share);
}

/// SPDK's counters in the middle 40% of a run of about `secs` seconds that starts now,
/// read on its RPC socket `sock`: the controller thread `ctrl`'s busy time and the reactor's idle time,
/// per I/O of `bdev`. `None` if the target did not answer or did no I/O.
/// With `profile_core`, `perf record` that core over the window too.
pub fn target_per_io(
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
    let per_busy_poll = match (a.worker_busy, b.worker_busy) {
        (Some(x), Some(y)) if y > x => Some(ios / (y - x)),
        _ => None,
    };
    Some(PerIo {
        busy_ns: ns(b.ctrl_busy - a.ctrl_busy),
        idle_ns: ns(b.idle - a.idle),
        vhost_share,
        per_busy_poll,
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
    /// Polls of the controller's `vdev_worker` that found work.
    worker_busy: Option<f64>,
}

fn counters(sock: &Path, ctrl: &str, bdev: &str) -> Option<Counters> {
    let st = rpc(sock, "thread_get_stats", None)?;
    let mut c = Counters {
        tick_rate: st["tick_rate"].as_f64()?,
        ctrl_busy: 0.0,
        idle: 0.0,
        ios: 0.0,
        worker_busy: None,
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
    c.worker_busy = worker_busy(sock, ctrl);
    Some(c)
}

/// The busy polls of the `vdev_worker` pollers on thread `ctrl` (`thread_get_pollers`).
fn worker_busy(sock: &Path, ctrl: &str) -> Option<f64> {
    let p = rpc(sock, "thread_get_pollers", None)?;
    let t = p["threads"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == ctrl)?;
    let mut busy = None;
    for list in ["active_pollers", "timed_pollers", "paused_pollers"] {
        for q in t[list].as_array().into_iter().flatten() {
            if q["name"] == "vdev_worker" {
                *busy.get_or_insert(0.0) += q["busy_count"].as_f64()?;
            }
        }
    }
    busy
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
