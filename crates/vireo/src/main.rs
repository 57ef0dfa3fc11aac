//! `vireo`: a userspace, polled-mode virtio storage initiator.

mod config;
mod embedded;
mod ini;
mod nbd;
mod pcisetup;
mod perf;
mod plot;
mod rpc;
mod serve;
mod signals;
mod soak;
mod socket;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use vireo_bdev::{Bdev, Registry};
use vireo_virtio::{DmaConfig, DmaMemory};

#[derive(Parser, Debug)]
#[command(
    name = "vireo",
    version,
    about = "Userspace polled-mode virtio storage initiator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// DMA memory in huge pages (MFD_HUGETLB): `auto` (the default) when the machine
    /// has them reserved (/proc/sys/vm/nr_hugepages), normal pages otherwise; `on`
    /// (plain `--hugepages`) requires them; `off` never. Back-ends built on DPDK (SPDK's
    /// vhost) register guest memory in 2 MiB units and are only safe with huge pages.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "on"
    )]
    hugepages: HugePages,
    /// Size of the first DMA memory region (suffixes k, m, g); more regions are added
    /// as needed.
    #[arg(long, global = true, default_value = "64m", value_parser = parse_size)]
    dma_region_size: usize,
    /// Debug log of a component, as SPDK's -L: virtio (rings, vhost-user), virtio_blk,
    /// virtio_scsi, bdev, rpc, target, io (a trace line per I/O submitted and
    /// completed), or all (repeatable; VIREO_LOG takes tracing filter directives too).
    #[arg(short = 'L', long = "log", global = true, value_parser = parse_log_flag)]
    log: Vec<&'static str>,
}

/// The tracing filter directive of a `-L` component.
fn parse_log_flag(s: &str) -> std::result::Result<&'static str, String> {
    Ok(match s {
        "virtio" => "vireo_virtio=debug",
        "virtio_blk" => "vireo_bdev::blk=debug",
        "virtio_scsi" => "vireo_bdev::scsi=debug",
        "bdev" => "vireo_bdev=debug",
        "rpc" => "vireo::rpc=debug",
        "target" => "vireo_target=debug",
        "io" => "vireo_io=trace",
        "all" => "debug",
        other => {
            return Err(format!(
                "unknown log component {other:?} (virtio, virtio_blk, virtio_scsi, bdev, rpc, target, io, all)"
            ))
        }
    })
}

/// `--hugepages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum HugePages {
    /// Huge pages when reserved, normal pages otherwise.
    Auto,
    /// Huge pages, or an error.
    On,
    /// Normal pages.
    Off,
}

/// Process-wide DMA memory settings from the command line.
static DMA: std::sync::OnceLock<DmaConfig> = std::sync::OnceLock::new();

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Attach the controllers of a config, scan, and list the bdevs.
    Bdevs {
        /// SPDK-style JSON configuration.
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a workload on bdevs (flags as in SPDK's bdevperf).
    Perf(PerfArgs),
    /// Serve the in-tree vhost-user test target until interrupted.
    Target(TargetArgs),
    /// Attach a config's controllers and serve SPDK-compatible JSON-RPC until
    /// SIGINT/SIGTERM.
    Serve(serve::ServeArgs),
    /// Send one JSON-RPC request to `vireo serve` and print the result.
    Rpc(rpc::client::RpcArgs),
    /// Verified I/O with flushes while the target is killed, frozen and disconnected:
    /// nothing acknowledged may be lost (exit 1 if anything failed or was lost).
    Soak(SoakArgs),
    /// List virtio PCI functions: type, driver, IOMMU group, how vireo reaches them.
    Pci {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bind virtio PCI functions to vfio-pci or uio_pci_generic for vireo, or give them
    /// back to the kernel (like SPDK's setup.sh).
    Setup {
        /// `bind` or `unbind`.
        #[arg(value_parser = ["bind", "unbind"])]
        action: String,
        /// PCI addresses (0000:00:04.0), or `all` for every virtio-blk/scsi function.
        #[arg(required = true)]
        bdfs: Vec<String>,
        /// Driver to bind to: vfio-pci (IOMMU or no-IOMMU mode) or uio_pci_generic.
        #[arg(long, default_value = "vfio-pci")]
        driver: String,
        /// Bind even if a disk of the function is mounted or otherwise in use.
        #[arg(long)]
        force: bool,
    },
    /// Print the SPDK JSON equivalent of a config file (INI or JSON).
    Config {
        /// `convert`.
        #[arg(value_parser = ["convert"])]
        action: String,
        /// The config file.
        file: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct SoakArgs {
    /// Target process: qemu-storage-daemon (qsd) or `vireo target` (vireo), on a file.
    #[arg(long, value_enum, default_value = "vireo")]
    target: soak::SoakTarget,
    /// Device type: blk or scsi (scsi: --target vireo).
    #[arg(long, default_value = "blk", value_parser = ["blk", "scsi"])]
    dev_type: String,
    /// Backing file (default: one in a temporary directory).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Size of the disk (suffixes k, m, g).
    #[arg(long, default_value = "256m", value_parser = parse_size)]
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
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill,stop,disconnect"
    )]
    faults: Vec<soak::Fault>,
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
    #[arg(short = 'o', long = "io-size", default_value = "4096", value_parser = parse_size)]
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
}

fn cmd_soak(a: SoakArgs) -> Result<bool> {
    let secs = |v: f64, what: &str| {
        std::time::Duration::try_from_secs_f64(v)
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| format!("--{what} must be a positive number of seconds"))
    };
    if a.faults.is_empty() {
        anyhow::bail!("--faults needs at least one of kill, stop, disconnect");
    }
    let o = soak::SoakOptions {
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
        faults: a.faults,
        freeze: secs(a.freeze, "freeze")?,
        down: std::time::Duration::try_from_secs_f64(a.down)
            .ok()
            .context("--down must be a non-negative number of seconds")?,
        reconnect_timeout: secs(a.reconnect_timeout, "reconnect-timeout")?,
        queue_depth: a.queue_depth,
        io_size: a.io_size,
        flush_every: a.flush_every.max(1),
        seed: a.seed,
        vireo: None,
    };
    signals::install();
    let reg = registry()?;
    let rep = soak::run(&reg, &o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
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
        );
        if let Some(n) = rep.target_resent {
            println!("  the target served {n} requests again from its inflight buffer");
        }
        for p in &rep.problems {
            println!("  {p}");
        }
    }
    Ok(rep.ok())
}

#[derive(clap::Args, Debug)]
struct TargetArgs {
    /// Device type: blk or scsi.
    #[arg(long = "type", default_value = "blk")]
    dev_type: String,
    /// scsi: targets (ids 0..N).
    #[arg(long, default_value_t = 1)]
    targets: u8,
    /// scsi: LUNs per target (0..M).
    #[arg(long, default_value_t = 1)]
    luns: u16,
    /// scsi: VPD B0 maximum transfer length in blocks (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_transfer: u32,
    /// scsi: VPD B0 maximum unmap LBA count (0: unmap unsupported; default no limit).
    #[arg(long, default_value_t = u32::MAX)]
    max_unmap_lba: u32,
    /// scsi: VPD B0 maximum unmap block descriptor count (default no limit).
    #[arg(long, default_value_t = u32::MAX)]
    max_unmap_desc: u32,
    /// Socket to listen on.
    #[arg(short = 's', long)]
    socket: PathBuf,
    /// RAM disk size (suffixes k, m, g), unless --file is given.
    #[arg(long, default_value = "1g", value_parser = parse_size)]
    size: usize,
    /// Back the disk with this file instead of RAM (created and sized if needed).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Logical block size (512 or 4096).
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Request queues.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Largest queue size (descriptors) a front-end may set.
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// Largest segments per request (seg_max).
    #[arg(long, default_value_t = 126)]
    seg_max: u32,
    /// Largest segment in bytes (size_max).
    #[arg(long, default_value = "1m", value_parser = parse_size)]
    size_max: usize,
    /// Export read-only.
    #[arg(long)]
    read_only: bool,
    /// blk: do not offer VIRTIO_BLK_F_FLUSH (a write-through device).
    #[arg(long)]
    no_flush: bool,
    /// scsi: do not offer the vhost-user CONFIG protocol feature (no readable
    /// configuration space, like SPDK's vhost-scsi).
    #[arg(long)]
    no_config_space: bool,
    /// Fault: delay every completion by this many microseconds.
    #[arg(long, default_value_t = 0)]
    delay_us: u64,
    /// Fault: hold back up to N completions of a queue and complete them in reverse order.
    #[arg(long, default_value_t = 0)]
    reorder: u32,
    /// Fault: fail the first N requests (blk: IOERR; scsi: CHECK CONDITION, MEDIUM ERROR).
    #[arg(long, default_value_t = 0)]
    fail_next: u64,
    /// Fault: serve N requests, then drop the front-end with the next one in flight (once).
    #[arg(long)]
    disconnect_after: Option<u64>,
    /// Fault: report a used length beyond the request's buffers for the first N requests.
    #[arg(long, default_value_t = 0)]
    lie_used_len: u64,
    /// Fault: complete the first N requests with a used id outside the ring.
    #[arg(long, default_value_t = 0)]
    bad_used_id: u64,
    /// scsi fault: never answer task management functions.
    #[arg(long)]
    tmf_never_answer: bool,
}

#[derive(clap::Args, Debug)]
struct PerfArgs {
    /// SPDK-style JSON configuration; without it, an in-process target on RAM is used.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Bdev to run on (repeatable); default: every bdev.
    #[arg(short = 'b', long = "bdev")]
    bdevs: Vec<String>,
    /// Workload.
    #[arg(short = 'w', long = "workload", value_enum, default_value = "verify")]
    workload: perf::Workload,
    /// Bytes per I/O (suffixes k, m accepted).
    #[arg(short = 'o', long = "io-size", default_value = "4096", value_parser = parse_size)]
    io_size: usize,
    /// Queue depth per job.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 32)]
    queue_depth: usize,
    /// Seconds to run.
    #[arg(short = 't', long = "time", default_value_t = 5.0)]
    time: f64,
    /// Cores: a mask (0x3), a list (0,1) or ranges (0-3); one thread and channel each.
    /// Default: the first CPU this process may run on (it respects `taskset`).
    #[arg(short = 'm', long = "cpumask")]
    cores: Option<String>,
    /// Read percentage of rw and randrw.
    #[arg(short = 'M', long = "rwmixread", default_value_t = 50)]
    read_percent: u32,
    /// Seconds without any completion after which outstanding I/O counts as failed.
    #[arg(long, default_value_t = 30.0)]
    io_timeout: f64,
    /// Seed for verify stamps and random offsets (default: time-based).
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON document on stdout.
    #[arg(long)]
    json: bool,
    /// How I/O threads wait for completions: poll (spin), wait (sleep on the queue's
    /// completion eventfd, interrupts enabled only while asleep) or hybrid (spin
    /// --hybrid-spin-us after the last completion, then sleep).
    #[arg(long, default_value = "poll", value_parser = ["poll", "wait", "hybrid"])]
    wait_mode: String,
    /// Spin time of --wait-mode hybrid, in microseconds.
    #[arg(long, default_value_t = 50)]
    hybrid_spin_us: u64,
    /// Draw the latency CDF of each job and IOPS over time (one point per second) to
    /// this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1024),
        Some('m' | 'M') => (&s[..s.len() - 1], 1024 * 1024),
        Some('g' | 'G') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mult)
        .map_err(|e| format!("invalid size {s:?}: {e}"))
}

/// The CPUs this process may run on (its inherited affinity, as `taskset` sets it).
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot read this process's CPU affinity (sched_getaffinity)");
        }
        set
    };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads bit `i` < CPU_SETSIZE of the set filled above.
    let cpus: Vec<usize> = (0..max)
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect();
    if cpus.is_empty() {
        bail!("this process may run on no CPU at all (empty affinity)");
    }
    Ok(cpus)
}

/// The cores of `-m`, or the first allowed CPU; every core must be in `allowed`.
fn select_cores(arg: Option<&str>, allowed: &[usize]) -> Result<Vec<usize>> {
    let Some(s) = arg else {
        return Ok(vec![allowed[0]]);
    };
    let cores = parse_cores(s)?;
    if let Some(&c) = cores.iter().find(|c| !allowed.contains(c)) {
        bail!(
            "-m {s}: CPU {c} is not one this process may run on (allowed: {}); \
             pick CPUs from that set or change the affinity (taskset)",
            cpu_list(allowed)
        );
    }
    Ok(cores)
}

/// `0-3,6` style list of CPUs.
fn cpu_list(cpus: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Parse `-m`: `0x3`, `0,1`, `0-3`, `[0,2]`.
fn parse_cores(s: &str) -> Result<Vec<usize>> {
    let s = s.trim().trim_start_matches('[').trim_end_matches(']');
    let mut cores = Vec::new();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let mask =
            u128::from_str_radix(hex, 16).with_context(|| format!("invalid core mask {s:?}"))?;
        for i in 0..128 {
            if mask & (1u128 << i) != 0 {
                cores.push(i);
            }
        }
    } else {
        for part in s.split(',').filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let a: usize = a
                    .trim()
                    .parse()
                    .with_context(|| format!("invalid core range {part:?}"))?;
                let b: usize = b
                    .trim()
                    .parse()
                    .with_context(|| format!("invalid core range {part:?}"))?;
                if a > b {
                    bail!("invalid core range {part:?}");
                }
                cores.extend(a..=b);
            } else {
                cores.push(
                    part.trim()
                        .parse()
                        .with_context(|| format!("invalid core {part:?}"))?,
                );
            }
        }
    }
    if cores.is_empty() {
        bail!("no cores in {s:?}");
    }
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if let Some(&c) = cores.iter().find(|&&c| c >= n.max(1024)) {
        bail!("core {c} does not exist");
    }
    Ok(cores)
}

fn registry() -> Result<Registry> {
    let cfg = DMA.get().cloned().unwrap_or_default();
    let mem = DmaMemory::new(cfg).context("cannot set up DMA memory")?;
    Ok(Registry::new(mem))
}

fn attach_config(reg: &Registry, path: &std::path::Path) -> Result<Vec<Arc<Bdev>>> {
    let calls = ini::load(path)?;
    Ok(reg.apply(&calls)?)
}

fn cmd_bdevs(config: PathBuf, json: bool) -> Result<()> {
    let reg = registry()?;
    let bdevs = attach_config(&reg, &config)?;
    if json {
        let infos: Vec<_> = bdevs.iter().map(|b| b.info().clone()).collect();
        println!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(());
    }
    println!(
        "{:<18} {:<11} {:>6} {:>14} {:>11} {:>3} {:>5} {:>5} {:>5} {:>5} {:>10} {:>10}  device",
        "name",
        "driver",
        "bs",
        "blocks",
        "capacity",
        "qs",
        "qsize",
        "unmap",
        "cache",
        "wzero",
        "max_io",
        "max_unmap"
    );
    let yn = |b: bool| if b { "yes" } else { "no" };
    for b in &bdevs {
        let i = b.info();
        let mut device = String::new();
        if let Some(a) = i.scsi {
            device.push_str(&format!("target {} lun {} ", a.target, a.lun));
        }
        if let (Some(v), Some(p)) = (&i.vendor, &i.product) {
            device.push_str(&format!("{v} {p} "));
        }
        device.push_str(&format!("serial {}", i.serial.as_deref().unwrap_or("-")));
        if i.read_only {
            device.push_str(" (read-only)");
        }
        println!(
            "{:<18} {:<11} {:>6} {:>14} {:>11} {:>3} {:>5} {:>5} {:>5} {:>5} {:>10} {:>10}  {}",
            i.name,
            i.driver,
            i.block_size,
            i.num_blocks,
            human(i.capacity_bytes()),
            i.num_queues,
            i.queue_size,
            yn(i.ops.unmap),
            // Write-back (flushes reach the device) or write-through.
            if i.volatile_write_cache { "wb" } else { "wt" },
            yn(i.ops.write_zeroes),
            human(i.limits.max_rw_blocks * i.block_size as u64),
            if i.ops.unmap {
                human(
                    i.limits
                        .max_unmap_blocks
                        .saturating_mul(i.block_size as u64),
                )
            } else {
                "-".into()
            },
            device,
        );
    }
    for (ctrl, l) in reg.skipped_luns() {
        println!(
            "skipped: controller {ctrl} target {} lun {}: peripheral device type {:#04x} ({} {}), not a disk",
            l.target, l.lun, l.device_type, l.vendor, l.product
        );
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn cmd_perf(a: PerfArgs) -> Result<bool> {
    // SIGINT/SIGTERM: stop, let in-flight I/O finish, report, clean up, exit non-zero.
    signals::install();
    // Declared first so it is dropped last, after the controllers that use it.
    let mut _embedded = None;
    let reg = registry()?;
    let cores = select_cores(a.cores.as_deref(), &allowed_cpus()?)?;
    // Without a config: an in-process vhost-user-blk target on RAM, one queue per core.
    let bdevs = match &a.config {
        Some(c) => attach_config(&reg, c)?,
        None => {
            let (guard, b) = embedded::perf_target(&reg, cores.len() as u16, a.json)?;
            _embedded = Some(guard);
            b
        }
    };
    let selected: Vec<Arc<Bdev>> = if a.bdevs.is_empty() {
        bdevs
    } else {
        a.bdevs
            .iter()
            .map(|n| {
                reg.bdev(n).with_context(|| {
                    let names: Vec<_> = reg.bdevs().iter().map(|b| b.name().to_string()).collect();
                    format!("no bdev named {n:?} (have: {})", names.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let opts = perf::PerfOptions {
        workload: a.workload,
        io_size: a.io_size,
        queue_depth: a.queue_depth,
        seconds: a.time,
        cores,
        read_percent: a.read_percent,
        seed,
        progress: !a.json && perf::stderr_is_terminal(),
        io_timeout: std::time::Duration::try_from_secs_f64(a.io_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--io-timeout must be a positive number of seconds")?,
        wait_mode: match a.wait_mode.as_str() {
            "poll" => vireo_bdev::WaitMode::Poll,
            "wait" => vireo_bdev::WaitMode::Sleep,
            _ => vireo_bdev::WaitMode::Hybrid(std::time::Duration::from_micros(a.hybrid_spin_us)),
        },
    };
    if let Some(p) = &a.plot {
        if p.extension().and_then(|e| e.to_str()) != Some("svg") {
            bail!(
                "--plot writes SVG: give a file name ending in .svg (got {})",
                p.display()
            );
        }
    }
    let rep = perf::run(&selected, &opts)?;
    if let Some(p) = &a.plot {
        plot::write_svg(p, &rep)?;
        eprintln!("vireo: plot written to {}", p.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print_report(&rep);
    }
    if rep.stalled {
        // A device that stopped answering would hold an orderly detach for the whole
        // control-message timeout: leave it (the socket closes with the process), clean
        // up what is ours, and go.
        eprintln!("vireo: a device stopped answering; exiting without detaching it");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        // (Without the embedded-target feature the guard holds nothing.)
        #[allow(clippy::drop_non_drop)]
        drop(_embedded);
        std::process::exit(1);
    }
    Ok(rep.ok())
}

fn print_report(r: &perf::PerfReport) {
    println!(
        "{:<16} {:>5} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "job", "core", "IOPS", "MiB/s", "avg_us", "p50_us", "p99_us", "max_us", "errors", "verify"
    );
    for j in r.jobs.iter().chain(std::iter::once(&r.total)) {
        println!(
            "{:<16} {:>5} {:>12.0} {:>10.2} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>8} {:>8}",
            j.bdev,
            j.core.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            j.iops,
            j.mib_per_s,
            j.latency_us.mean,
            j.latency_us.p50,
            j.latency_us.p99,
            j.latency_us.max,
            j.errors,
            j.verify_failures
        );
    }
    println!(
        "cpu: {:.2} s for the process, {:.2} us per I/O (wait mode {})",
        r.cpu_seconds, r.cpu_us_per_io, r.wait_mode
    );
    if let Some(e) = &r.total.first_error {
        println!("first error: {e}");
    }
    if let Some(l) = r.total.first_mismatch_lba {
        println!("first verify mismatch at LBA {l}");
    }
    if r.interrupted {
        println!("interrupted: the run was stopped early (partial results)");
    }
}

/// The error and its causes, skipping causes the message already spells out.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if msg.contains(&c) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&c);
    }
    msg
}

fn main() {
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    for d in &cli.log {
        if let Ok(d) = d.parse() {
            filter = filter.add_directive(d);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(perf::stderr_is_terminal())
        .init();
    let _ = DMA.set(DmaConfig {
        initial_region_size: cli.dma_region_size,
        hugetlb: cli.hugepages != HugePages::Off,
        hugetlb_fallback: cli.hugepages == HugePages::Auto,
        ..DmaConfig::default()
    });
    let r = match cli.cmd {
        Cmd::Bdevs { config, json } => cmd_bdevs(config, json).map(|_| true),
        Cmd::Perf(a) => cmd_perf(a),
        Cmd::Soak(a) => cmd_soak(a),
        Cmd::Target(a) => embedded::cmd_target(a).map(|_| true),
        Cmd::Serve(a) => registry()
            .and_then(|reg| serve::cmd_serve(reg, a))
            .map(|_| true),
        Cmd::Pci { json } => pcisetup::cmd_pci(json).map(|_| true),
        Cmd::Setup {
            action,
            bdfs,
            driver,
            force,
        } => pcisetup::cmd_setup(&action, &bdfs, &driver, force),
        Cmd::Config { file, .. } => ini::load(&file).and_then(|calls| {
            println!("{}", serde_json::to_string_pretty(&ini::to_json(&calls))?);
            Ok(true)
        }),
        Cmd::Rpc(a) => rpc::client::cmd_rpc(a),
    };
    match r {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("vireo: error: {}", error_chain(&e));
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_parse() {
        assert_eq!(parse_cores("0x3").unwrap(), vec![0, 1]);
        assert_eq!(parse_cores("0,2").unwrap(), vec![0, 2]);
        assert_eq!(parse_cores("[0-2]").unwrap(), vec![0, 1, 2]);
        assert!(parse_cores("0x0").is_err());
        assert!(parse_cores("3-1").is_err());
        assert!(parse_cores("x").is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert!(parse_size("abc").is_err());
    }
}
