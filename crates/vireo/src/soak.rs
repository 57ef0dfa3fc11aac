//! `vireo soak`: verified I/O with periodic flushes against a target on a file while the
//! target is killed and restarted, frozen and disconnected; nothing acknowledged may be
//! lost, nothing may fail, nothing may hang.
//!
//! The target runs as a child process (qemu-storage-daemon's vhost-user-blk export or
//! `vireo target`, both on a file). vireo attaches with `reconnect_timeout` and runs one
//! channel of random 4 KiB-aligned writes (stamped with LBA, seed and a generation) and
//! reads, never two requests on one block range at once. Every acknowledged write sets
//! the generation a later read of that range must find; a final pass reads back every
//! range ever written. Faults rotate every `--cycle`: `kill` (SIGKILL, then a new target
//! process on the same file and socket after `--down`), `stop` (SIGSTOP for `--freeze`, then SIGCONT),
//! `disconnect` (`vireo target` only: SIGUSR1 makes it drop the connection at its next
//! request).

use std::collections::VecDeque;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vireo_bdev::config::{MAX_TIMEOUT, MIN_TIMEOUT};
use vireo_bdev::{AttachParams, Bdev, Completion, DevType, IoBuf, IoRequest, Registry, TrType};
use vireo_virtio::DmaConfig;

use crate::perf::{check_stamp, stamp};

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// Target process: qemu-storage-daemon (qsd) or `vireo target` (vireo), on a file.
    #[arg(long, value_enum, default_value = "vireo")]
    target: SoakTarget,
    /// Device type: blk or scsi (scsi: --target vireo).
    #[arg(long, default_value = "blk", value_parser = ["blk", "scsi"])]
    dev_type: String,
    /// Backing file (default: one in a temporary directory).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Size of the disk (suffixes k, m, g).
    #[arg(long, default_value = "256m", value_parser = crate::units::parse_size)]
    size: usize,
    /// Seconds to run (ignored with --cycles).
    #[arg(short = 't', long = "time", default_value_t = 60.0)]
    time: f64,
    /// Stop after this many faults (and one more cycle).
    #[arg(long, default_value_t = 0)]
    cycles: u64,
    /// Seconds between two faults.
    #[arg(long, default_value_t = 5.0)]
    cycle: f64,
    /// Faults, in turn (comma-separated): kill, stop, disconnect (vireo target only).
    /// Default: every fault the target supports (qsd: kill,stop; vireo and vireo-ram:
    /// kill,stop,disconnect).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<Fault>,
    /// How long a stop fault freezes the target, in seconds.
    #[arg(long, default_value_t = 1.0)]
    freeze: f64,
    /// How long a killed target stays down before it is restarted, in seconds.
    #[arg(long, default_value_t = 0.2)]
    down: f64,
    /// reconnect_timeout of the controller, in seconds.
    #[arg(long, default_value_t = 30.0)]
    reconnect_timeout: f64,
    /// Requests in flight.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 16)]
    queue_depth: usize,
    /// Bytes per I/O (a multiple of 4096).
    #[arg(short = 'o', long = "io-size", default_value = "4096", value_parser = crate::units::parse_size)]
    io_size: usize,
    /// A flush after this many writes.
    #[arg(long, default_value_t = 64)]
    flush_every: u64,
    /// Seed of the stamps and offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub dma: crate::dma::DmaArgs,
}

/// `vireo soak`: run the soak, print the report; Ok(false) when anything failed or was
/// lost.
pub fn cmd_soak(dma: &DmaConfig, a: SoakArgs) -> Result<bool> {
    let secs = |v: f64, what: &str| {
        std::time::Duration::try_from_secs_f64(v)
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| format!("--{what} must be a positive number of seconds"))
    };
    // Not given: every fault this target can take (an unsupported one given explicitly
    // is refused by run(), with the reason).
    let faults = if a.faults.is_empty() {
        a.target.faults().to_vec()
    } else {
        a.faults
    };
    let o = SoakOptions {
        target: a.target,
        dev_type: if a.dev_type == "scsi" {
            vireo_bdev::DevType::Scsi
        } else {
            vireo_bdev::DevType::Blk
        },
        file: a.file,
        size: a.size as u64,
        duration: secs(a.time, "time")?,
        cycles: a.cycles,
        cycle: secs(a.cycle, "cycle")?,
        faults,
        freeze: secs(a.freeze, "freeze")?,
        down: std::time::Duration::try_from_secs_f64(a.down)
            .ok()
            .context("--down must be a non-negative number of seconds")?,
        reconnect_timeout: Some(secs(a.reconnect_timeout, "reconnect-timeout")?)
            .filter(|t| (MIN_TIMEOUT..=MAX_TIMEOUT).contains(t))
            .with_context(|| {
                format!(
                    "--reconnect-timeout must be 0.001 to 86400 seconds (the controller's reconnect_timeout), got {}",
                    a.reconnect_timeout
                )
            })?,
        queue_depth: a.queue_depth,
        io_size: a.io_size,
        flush_every: a.flush_every.max(1),
        seed: a.seed,
        vireo: None,
    };
    crate::signals::install();
    let reg = crate::dma::registry(dma)?;
    let rep = run(&reg, &o)?;
    if a.json {
        vireo::outln!("{}", serde_json::to_string_pretty(&rep)?)?;
    } else {
        vireo::outln!(
            "soak: {:.0} s, {} kills, {} stops, {} disconnects, {} reconnects; {} I/Os, {} writes ({} MiB), {} reads verified, {} flushes, {} ranges read back at the end; {} MiB verified; {} errors, {} verify failures; longest I/O {:.1} ms",
            rep.seconds,
            rep.kills,
            rep.stops,
            rep.disconnects,
            rep.reconnects,
            rep.ios,
            rep.writes,
            rep.bytes_written >> 20,
            rep.reads_verified,
            rep.flushes,
            rep.final_ranges_checked,
            rep.bytes_verified >> 20,
            rep.errors,
            rep.verify_failures,
            rep.max_latency_ms
        )?;
        if let Some(n) = rep.target_resent {
            vireo::outln!("  the target served {n} requests again from its inflight buffer")?;
        }
        for p in &rep.problems {
            vireo::outln!("  {p}")?;
        }
    }
    Ok(rep.ok())
}

/// Which target process the soak drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SoakTarget {
    /// qemu-storage-daemon, vhost-user-blk export of a file.
    Qsd,
    /// `vireo target --type blk --file`.
    Vireo,
    /// `vireo target --type blk` on RAM: a kill loses every write. Not a soak target:
    /// it shows that the soak catches lost writes.
    VireoRam,
}

impl SoakTarget {
    /// The faults this target can be put through, in the order the soak rotates them.
    pub fn faults(self) -> &'static [Fault] {
        match self {
            // qemu-storage-daemon cannot be told to drop a connection.
            SoakTarget::Qsd => &[Fault::Kill, Fault::Stop],
            SoakTarget::Vireo | SoakTarget::VireoRam => {
                &[Fault::Kill, Fault::Stop, Fault::Disconnect]
            }
        }
    }
}

/// A fault the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// SIGKILL the target, start a new one on the same file and socket.
    Kill,
    /// SIGSTOP the target for the freeze time, then SIGCONT.
    Stop,
    /// Make the target drop the connection with requests in flight (`vireo target`).
    Disconnect,
}

/// What `vireo soak` does.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub target: SoakTarget,
    /// virtio-blk or virtio-scsi (`vireo target` only).
    pub dev_type: DevType,
    /// Backing file (created; default: a file in a temporary directory).
    pub file: Option<PathBuf>,
    pub size: u64,
    pub duration: Duration,
    /// Stop after this many faults (0: run for the duration).
    pub cycles: u64,
    pub cycle: Duration,
    pub faults: Vec<Fault>,
    pub freeze: Duration,
    /// How long a killed target stays down before its restart.
    pub down: Duration,
    pub reconnect_timeout: Duration,
    pub queue_depth: usize,
    pub io_size: usize,
    /// A flush after this many completed writes.
    pub flush_every: u64,
    pub seed: u64,
    /// The vireo binary to run as target (default: this one).
    pub vireo: Option<PathBuf>,
}

/// The soak's result.
#[derive(Debug, Default, Serialize)]
pub struct SoakReport {
    pub target: Option<SoakTarget>,
    pub seconds: f64,
    pub kills: u64,
    pub stops: u64,
    pub disconnects: u64,
    pub reconnects: u64,
    pub ios: u64,
    pub writes: u64,
    pub reads_verified: u64,
    pub flushes: u64,
    pub bytes_written: u64,
    pub bytes_verified: u64,
    /// Ranges read back by the final pass.
    pub final_ranges_checked: u64,
    pub errors: u64,
    pub verify_failures: u64,
    /// The first few errors and mismatches, as text.
    pub problems: Vec<String>,
    /// Longest time one I/O took, in milliseconds.
    pub max_latency_ms: f64,
    /// `vireo target`: requests it served again from its inflight buffer
    /// (INFLIGHT_SHMFD) after a kill or a disconnect, from its log.
    pub target_resent: Option<u64>,
    pub interrupted: bool,
}

impl SoakReport {
    /// Nothing failed, nothing was lost.
    pub fn ok(&self) -> bool {
        self.errors == 0 && self.verify_failures == 0 && !self.interrupted
    }

    fn problem(&mut self, p: String) {
        if self.problems.len() < 20 {
            self.problems.push(p);
        }
    }
}

/// The target process, restartable on the same file and socket.
struct TargetProc {
    kind: SoakTarget,
    dev_type: DevType,
    socket: PathBuf,
    file: PathBuf,
    size: u64,
    log: PathBuf,
    vireo: PathBuf,
    child: Option<Child>,
}

impl TargetProc {
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = match self.kind {
            SoakTarget::Qsd => {
                let mut c = Command::new("qemu-storage-daemon");
                c.args([
                    "--blockdev",
                    &format!(
                        "driver=file,node-name=disk0,filename={},cache.direct=off,aio=threads,discard=unmap",
                        self.file.display()
                    ),
                    "--export",
                    &format!(
                        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=1",
                        self.socket.display()
                    ),
                ]);
                c
            }
            SoakTarget::Vireo | SoakTarget::VireoRam => {
                let mut c = Command::new(&self.vireo);
                c.arg("target")
                    .args([
                        "--type",
                        if self.dev_type == DevType::Scsi {
                            "scsi"
                        } else {
                            "blk"
                        },
                        "-s",
                    ])
                    .arg(&self.socket)
                    .args(["--size", &self.size.to_string()]);
                if self.kind == SoakTarget::Vireo {
                    c.arg("--file").arg(&self.file);
                }
                // Its log says when it serves requests again from the inflight buffer.
                c.env("VIREO_LOG", "vireo_target=info");
                c
            }
        };
        // A stale socket of a killed target is replaced by the new one.
        let _ = std::fs::remove_file(&self.socket);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| match self.kind {
                SoakTarget::Qsd => {
                    "cannot start qemu-storage-daemon (apt-get install qemu-utils)".to_string()
                }
                _ => format!("cannot start {} target", self.vireo.display()),
            })?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(pid, sig) };
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The socket accepts connections (the first start only: a probe is a connection
    /// a single-client target serves before the next).
    fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            // Bounded: a target that is not accepting must not hang the wait.
            if vireo_virtio::unix::connect_unix(&self.socket, Duration::from_millis(200)).is_ok() {
                std::thread::sleep(Duration::from_millis(50));
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!(
                        "the target exited ({st}) before listening: {}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the target did not listen on {}", self.socket.display())
    }
}

impl Drop for TargetProc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

/// One block range in flight.
struct Slot {
    buf: Option<IoBuf>,
    range: u64,
    write: bool,
    gen: u64,
    start: Instant,
}

/// Run the soak.
pub fn run(reg: &Registry, o: &SoakOptions) -> Result<SoakReport> {
    if o.dev_type == DevType::Scsi && o.target == SoakTarget::Qsd {
        bail!("--dev-type scsi needs --target vireo (qemu-storage-daemon exports vhost-user-blk)");
    }
    if o.faults.is_empty() {
        bail!("--faults needs at least one of kill, stop, disconnect");
    }
    if o.faults.contains(&Fault::Disconnect) && !o.target.faults().contains(&Fault::Disconnect) {
        bail!("--faults disconnect needs --target vireo (qemu-storage-daemon cannot be told to drop a connection)");
    }
    if o.io_size == 0 || !o.io_size.is_multiple_of(4096) || o.size < (o.io_size as u64) * 4 {
        bail!("--io-size must be a multiple of 4096 and --size at least four I/Os");
    }
    if o.queue_depth == 0 || o.queue_depth as u64 > o.size / o.io_size as u64 / 2 {
        bail!("--queue-depth must be between 1 and half the number of I/O-sized ranges");
    }
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let file = match &o.file {
        Some(f) => f.clone(),
        None => dir.path().join("soak.img"),
    };
    {
        // The disk's data: the owner's only (an existing file keeps its mode).
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&file)
            .with_context(|| format!("cannot create {}", file.display()))?;
        f.set_len(o.size)
            .with_context(|| format!("cannot size {}", file.display()))?;
    }
    let mut target = TargetProc {
        kind: o.target,
        dev_type: o.dev_type,
        socket: dir.path().join("soak.sock"),
        file,
        size: o.size,
        log: dir.path().join("target.log"),
        vireo: match &o.vireo {
            Some(v) => v.clone(),
            None => std::env::current_exe().context("cannot find the vireo binary")?,
        },
        child: None,
    };
    target.start()?;
    target.wait_listening(Duration::from_secs(10))?;
    let name = "Soak0".to_string();
    let bdevs = reg
        .attach(&AttachParams {
            wwpn: None,
            name: name.clone(),
            trtype: TrType::User,
            traddr: target.socket.display().to_string(),
            dev_type: o.dev_type,
            vq_count: 1,
            vq_size: 128,
            io_timeout: None,
            reconnect_timeout: Some(o.reconnect_timeout),
            packed_ring: Default::default(),
        })
        .context("cannot attach to the target")?;
    let bdev = bdevs[0].clone();

    let mut rep = SoakReport {
        target: Some(o.target),
        ..SoakReport::default()
    };
    let stop_faults = Arc::new(AtomicBool::new(false));
    // Raised by the fault thread one cycle after its last fault (with --cycles).
    let finished = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let started = Instant::now();
    let end = (o.cycles == 0).then(|| started + o.duration);
    let run_result = std::thread::scope(|s| -> Result<()> {
        let faults = s.spawn({
            let stop = stop_faults.clone();
            let finished = finished.clone();
            let counts = counts.clone();
            let target = &mut target;
            let reconnects = || reg.with_controller(&name, |c| c.reconnects()).unwrap_or(0);
            move || {
                let r = inject(target, o, &stop, &counts, &reconnects);
                finished.store(true, Ordering::Release);
                r
            }
        });
        let r = workload(&bdev, o, end, &finished, &mut rep);
        stop_faults.store(true, Ordering::Release);
        let f = faults
            .join()
            .map_err(|_| anyhow::anyhow!("the fault thread panicked"))?;
        r.and(f)
    });
    rep.kills = counts[0].load(Ordering::Relaxed);
    rep.stops = counts[1].load(Ordering::Relaxed);
    rep.disconnects = counts[2].load(Ordering::Relaxed);
    rep.seconds = started.elapsed().as_secs_f64();
    rep.reconnects = reg.with_controller(&name, |c| c.reconnects()).unwrap_or(0);
    rep.interrupted = crate::signals::stop_requested();
    if let Err(e) = run_result {
        rep.errors += 1;
        rep.problem(format!("{e:#}"));
    }
    let _ = reg.detach(&name);
    if o.target != SoakTarget::Qsd {
        rep.target_resent = Some(resent_in_log(&target.log));
    }
    drop(target);
    Ok(rep)
}

/// Requests `vireo target` says it served again ("serving N requests again").
fn resent_in_log(log: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let at = l.find("serving ")?;
            let rest = &l[at + 8..];
            let n = rest.split(' ').next()?;
            rest.contains("requests again")
                .then(|| n.parse::<u64>().ok())?
        })
        .sum()
}

/// Inject faults every cycle until told to stop (or `cycles` were done).
/// A fault that breaks the connection waits for the controller to be back (at most
/// reconnect_timeout) before the next cycle starts, so each is one outage.
fn inject(
    t: &mut TargetProc,
    o: &SoakOptions,
    stop: &AtomicBool,
    counts: &[AtomicU64; 3],
    reconnects: &dyn Fn() -> u64,
) -> Result<()> {
    let mut i = 0usize;
    let mut done = 0u64;
    let pause = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until && !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    loop {
        pause(o.cycle);
        if stop.load(Ordering::Acquire) || (o.cycles > 0 && done >= o.cycles) {
            return Ok(());
        }
        let f = o.faults[i % o.faults.len()];
        i += 1;
        let before = reconnects();
        match f {
            Fault::Kill => {
                t.signal(libc::SIGKILL);
                t.kill();
                counts[0].fetch_add(1, Ordering::Relaxed);
                // Down for a while, then a new process on the same file and socket.
                pause(o.down);
                t.start()?;
            }
            Fault::Stop => {
                t.signal(libc::SIGSTOP);
                counts[1].fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(o.freeze);
                t.signal(libc::SIGCONT);
            }
            Fault::Disconnect => {
                t.signal(libc::SIGUSR1);
                counts[2].fetch_add(1, Ordering::Relaxed);
            }
        }
        if f != Fault::Stop {
            let until = Instant::now() + o.reconnect_timeout;
            while reconnects() == before && Instant::now() < until && !stop.load(Ordering::Acquire)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        done += 1;
        if o.cycles > 0 && done >= o.cycles {
            // The last outage heals under load before the run ends.
            pause(o.cycle);
            return Ok(());
        }
    }
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The verified workload, then the final read-back of every written range.
fn workload(
    bdev: &Arc<Bdev>,
    o: &SoakOptions,
    end: Option<Instant>,
    finished: &AtomicBool,
    rep: &mut SoakReport,
) -> Result<()> {
    let bs = bdev.info().block_size as usize;
    let per = (o.io_size / bs) as u64;
    let ranges = o.size / o.io_size as u64;
    let mut ch = bdev.open_channel()?;
    let mut expected = vec![0u64; ranges as usize];
    let mut busy = vec![false; ranges as usize];
    let mut rng = Rng(o.seed | 1);
    let mut gen = 0u64;
    let mut slots: Vec<Slot> = Vec::with_capacity(o.queue_depth);
    for _ in 0..o.queue_depth {
        slots.push(Slot {
            buf: Some(IoBuf::Dma(bdev.alloc_buf(o.io_size)?)),
            range: 0,
            write: false,
            gen: 0,
            start: Instant::now(),
        });
    }
    const FLUSH: u64 = u64::MAX;
    let mut writes_since_flush = 0u64;
    let mut flush_out = false;
    let mut out: Vec<Completion> = Vec::new();
    let mut in_flight = 0usize;
    let mut free: VecDeque<usize> = (0..o.queue_depth).collect();
    let mut last_progress = Instant::now();
    loop {
        let running = !crate::signals::stop_requested()
            && !finished.load(Ordering::Acquire)
            && end.is_none_or(|e| Instant::now() < e);
        if running {
            while let Some(i) = free.pop_front() {
                // A range no other request holds.
                let mut r = rng.next() % ranges;
                let mut tries = 0;
                while busy[r as usize] && tries < 64 {
                    r = rng.next() % ranges;
                    tries += 1;
                }
                if busy[r as usize] {
                    free.push_front(i);
                    break;
                }
                busy[r as usize] = true;
                let s = &mut slots[i];
                s.range = r;
                s.write = expected[r as usize] == 0 || rng.next().is_multiple_of(2);
                let lba = r * per;
                let mut buf = s.buf.take().context("slot without buffer")?;
                if s.write {
                    gen += 1;
                    s.gen = gen;
                    stamp(buf.as_mut_slice(), bs, lba, o.seed, gen);
                } else {
                    s.gen = expected[r as usize];
                    // A read that transfers nothing must not pass for the last write.
                    buf.as_mut_slice().fill(0xa5);
                }
                s.start = Instant::now();
                let req = if s.write {
                    IoRequest::write(lba, per, buf, i as u64)
                } else {
                    IoRequest::read(lba, per, buf, i as u64)
                };
                if let Err(rej) = ch.submit(req) {
                    bail!("submit refused: {}", rej.error);
                }
                in_flight += 1;
            }
            if writes_since_flush >= o.flush_every && !flush_out {
                writes_since_flush = 0;
                if let Err(rej) =
                    ch.submit(IoRequest::no_data(vireo_bdev::IoOp::Flush, 0, 0, FLUSH))
                {
                    bail!("flush refused: {}", rej.error);
                }
                flush_out = true;
                in_flight += 1;
            }
        } else if in_flight == 0 {
            break;
        }
        out.clear();
        if ch.poll(&mut out) == 0 {
            if last_progress.elapsed() > o.reconnect_timeout + Duration::from_secs(30) {
                bail!(
                    "no I/O completed for {:.0} s with {in_flight} in flight: hung",
                    last_progress.elapsed().as_secs_f64()
                );
            }
            std::hint::spin_loop();
            continue;
        }
        last_progress = Instant::now();
        for c in out.drain(..) {
            in_flight -= 1;
            rep.ios += 1;
            if c.user_data == FLUSH {
                flush_out = false;
                match c.result {
                    Ok(()) => rep.flushes += 1,
                    Err(e) => {
                        rep.errors += 1;
                        rep.problem(format!("flush failed: {e}"));
                    }
                }
                continue;
            }
            let i = c.user_data as usize;
            let s = &mut slots[i];
            rep.max_latency_ms = rep
                .max_latency_ms
                .max(s.start.elapsed().as_secs_f64() * 1e3);
            let buf = match c.buf {
                Some(b) => b,
                None => IoBuf::Dma(bdev.alloc_buf(o.io_size)?),
            };
            let lba = s.range * per;
            match c.result {
                Ok(()) if s.write => {
                    expected[s.range as usize] = s.gen;
                    rep.writes += 1;
                    rep.bytes_written += o.io_size as u64;
                    writes_since_flush += 1;
                }
                Ok(()) => {
                    rep.reads_verified += 1;
                    rep.bytes_verified += o.io_size as u64;
                    if let Some(bad) = check_stamp(buf.as_slice(), bs, lba, o.seed, s.gen) {
                        rep.verify_failures += 1;
                        rep.problem(format!(
                            "LBA {bad}: does not hold generation {} (an acknowledged write was lost or corrupted)",
                            s.gen
                        ));
                    }
                }
                Err(e) => {
                    rep.errors += 1;
                    rep.problem(format!(
                        "{} of LBA {lba}: {e}",
                        if s.write { "write" } else { "read" }
                    ));
                    if s.write {
                        // The range's content is unknown now.
                        expected[s.range as usize] = 0;
                    }
                }
            }
            s.buf = Some(buf);
            busy[s.range as usize] = false;
            free.push_back(i);
        }
    }
    // Final pass: every range ever written holds its last acknowledged generation.
    let mut next = 0u64;
    let mut outstanding = 0usize;
    let mut free: Vec<usize> = (0..o.queue_depth).collect();
    loop {
        while next < ranges {
            if expected[next as usize] == 0 {
                next += 1;
                continue;
            }
            let Some(i) = free.pop() else { break };
            let s = &mut slots[i];
            s.range = next;
            s.gen = expected[next as usize];
            let mut buf = s.buf.take().context("slot without buffer")?;
            buf.as_mut_slice().fill(0xa5);
            if let Err(rej) = ch.submit(IoRequest::read(next * per, per, buf, i as u64)) {
                bail!("final read refused: {}", rej.error);
            }
            outstanding += 1;
            next += 1;
        }
        if outstanding == 0 {
            break;
        }
        out.clear();
        ch.poll(&mut out);
        for c in out.drain(..) {
            outstanding -= 1;
            let i = c.user_data as usize;
            let s = &mut slots[i];
            let buf = match c.buf {
                Some(b) => b,
                None => IoBuf::Dma(bdev.alloc_buf(o.io_size)?),
            };
            rep.final_ranges_checked += 1;
            match c.result {
                Ok(()) => {
                    rep.bytes_verified += o.io_size as u64;
                    if let Some(bad) = check_stamp(buf.as_slice(), bs, s.range * per, o.seed, s.gen)
                    {
                        rep.verify_failures += 1;
                        rep.problem(format!(
                            "final pass, LBA {bad}: does not hold generation {} (an acknowledged write was lost)",
                            s.gen
                        ));
                    }
                }
                Err(e) => {
                    rep.errors += 1;
                    rep.problem(format!("final read of LBA {}: {e}", s.range * per));
                }
            }
            s.buf = Some(buf);
            free.push(i);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without --faults the soak puts a target through what it supports, no more.
    #[test]
    fn each_target_has_the_faults_it_supports() {
        assert_eq!(SoakTarget::Qsd.faults(), &[Fault::Kill, Fault::Stop]);
        for t in [SoakTarget::Vireo, SoakTarget::VireoRam] {
            assert_eq!(t.faults(), &[Fault::Kill, Fault::Stop, Fault::Disconnect]);
        }
    }
}
