//! `vireo perf`'s command line: the arguments, their conversion to [`PerfOptions`]
//! (cores, wait mode, time limits), the target to run on, and the report's way out.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use vireo_bdev::Bdev;
use vireo_virtio::DmaConfig;

use super::PerfOptions;
use crate::units::parse_size;

/// `--wait-mode`: how an I/O thread waits for its completions. The names are the
/// library's `WaitMode` variants.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum WaitArg {
    /// Spin on the queue (lowest latency; the thread keeps its CPU busy).
    Poll,
    /// Sleep on the queue's completion eventfd; interrupts are enabled only while the
    /// thread sleeps.
    // `wait`, its name before it was the library's, keeps scripts working (not listed).
    #[value(alias = "wait")]
    Sleep,
    /// Spin --hybrid-spin-us after the last completion, then sleep.
    Hybrid,
}

#[derive(clap::Args, Debug)]
pub struct PerfArgs {
    /// Configuration file: SPDK-style JSON or INI (the legacy Virtio INI format); without
    /// it, an in-process target on RAM is used.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Bdev to run on (repeatable); default: every bdev.
    #[arg(short = 'b', long = "bdev")]
    bdevs: Vec<String>,
    /// Workload.
    #[arg(short = 'w', long = "workload", value_enum, default_value = "verify")]
    workload: super::Workload,
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
    /// How I/O threads wait for completions (the library's `WaitMode`); the process's
    /// CPU time per I/O is reported.
    #[arg(long, value_enum, default_value = "poll")]
    wait_mode: WaitArg,
    /// Spin time of --wait-mode hybrid, in microseconds.
    #[arg(long, default_value_t = 50)]
    hybrid_spin_us: u64,
    /// Draw the latency CDF of each job and IOPS over time (one point per second) to
    /// this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    #[command(flatten)]
    pub dma: crate::dma::DmaArgs,
}

/// `vireo perf`: run the workload, print the report; Ok(false) when an I/O failed or a
/// verify did not match.
pub fn cmd_perf(dma: &DmaConfig, a: PerfArgs) -> Result<bool> {
    // SIGINT/SIGTERM: stop, let in-flight I/O finish, report, clean up, exit non-zero.
    crate::signals::install();
    // Declared first so it is dropped last, after the controllers that use it.
    let mut _embedded = None;
    // The cores and depth first: a bad -m or -q costs nothing.
    let cores = select_cores(a.cores.as_deref(), &allowed_cpus()?)?;
    if !(1..=super::MAX_QUEUE_DEPTH).contains(&a.queue_depth) {
        bail!(
            "-q {}: the queue depth is 1 to {} (I/Os each job keeps in flight)",
            a.queue_depth,
            super::MAX_QUEUE_DEPTH
        );
    }
    let reg = crate::dma::registry(dma)?;
    // Without a config: an in-process vhost-user-blk target on RAM, one queue per core.
    let bdevs = match &a.config {
        Some(c) => crate::ini::attach_config(&reg, c)?,
        None => {
            let (guard, b) = crate::embedded::perf_target(&reg, cores.len() as u16, a.json)?;
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
    let opts = PerfOptions {
        workload: a.workload,
        io_size: a.io_size,
        queue_depth: a.queue_depth,
        seconds: a.time,
        cores,
        read_percent: a.read_percent,
        seed,
        progress: !a.json && super::stderr_is_terminal(),
        io_timeout: std::time::Duration::try_from_secs_f64(a.io_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--io-timeout must be a positive number of seconds")?,
        wait_mode: match a.wait_mode {
            WaitArg::Poll => vireo_bdev::WaitMode::Poll,
            WaitArg::Sleep => vireo_bdev::WaitMode::Sleep,
            WaitArg::Hybrid => {
                vireo_bdev::WaitMode::Hybrid(std::time::Duration::from_micros(a.hybrid_spin_us))
            }
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
    let rep = super::run(&selected, &opts)?;
    if let Some(p) = &a.plot {
        super::plot::write_svg(p, &rep)?;
        eprintln!("vireo: plot written to {}", p.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        super::report::print_report(&rep);
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

/// The CPUs this process may run on (its inherited affinity, as `taskset` sets it).
pub(super) fn allowed_cpus() -> Result<Vec<usize>> {
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
    match arg {
        None => Ok(vec![allowed[0]]),
        Some(s) => parse_cores(s, allowed),
    }
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

/// Parse `-m` (`0x3`, `0,1`, `0-3`, `[0,2]`) into cores this process may run on
/// (`allowed`), each named once. Every number is checked against `allowed` before a
/// range is expanded: a huge one is an error, not a huge allocation.
fn parse_cores(arg: &str, allowed: &[usize]) -> Result<Vec<usize>> {
    let s = arg.trim().trim_start_matches('[').trim_end_matches(']');
    let check = |c: u128| -> Result<usize> {
        match usize::try_from(c) {
            Ok(c) if allowed.contains(&c) => Ok(c),
            _ => bail!(
                "-m {arg}: CPU {c} is not one this process may run on (allowed: {}); \
                 pick CPUs from that set or change the affinity (taskset)",
                cpu_list(allowed)
            ),
        }
    };
    let number = |n: &str, part: &str| -> Result<u128> {
        n.trim().parse::<u64>().map(u128::from).with_context(|| {
            format!("-m {arg}: invalid core {part:?} (a CPU number, a range like 0-3 or a mask like 0x3)")
        })
    };
    let mut cores = Vec::new();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let mask = u128::from_str_radix(hex, 16)
            .with_context(|| format!("-m {arg}: invalid core mask {s:?} (at most 128 bits)"))?;
        for i in 0..128 {
            if mask & (1u128 << i) != 0 {
                cores.push(check(i)?);
            }
        }
    } else {
        for part in s.split(',').filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let (a, b) = (number(a, part)?, number(b, part)?);
                if a > b {
                    bail!(
                        "-m {arg}: invalid core range {part:?} (the first CPU is above the last)"
                    );
                }
                // Both ends first: the range is then no longer than the allowed set.
                check(b)?;
                for c in a..=b {
                    cores.push(check(c)?);
                }
            } else {
                cores.push(check(number(part, part)?)?);
            }
        }
    }
    if cores.is_empty() {
        bail!("-m {arg}: no cores in {s:?}");
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(c) = cores.iter().find(|&&c| !seen.insert(c)) {
        bail!("-m {arg}: CPU {c} is named twice (one thread runs on each core named)");
    }
    Ok(cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_parse() {
        let all: Vec<usize> = (0..8).collect();
        assert_eq!(parse_cores("0x3", &all).unwrap(), vec![0, 1]);
        assert_eq!(parse_cores("0,2", &all).unwrap(), vec![0, 2]);
        assert_eq!(parse_cores("[0-2]", &all).unwrap(), vec![0, 1, 2]);
        assert!(parse_cores("0x0", &all).is_err());
        assert!(parse_cores("3-1", &all).is_err());
        assert!(parse_cores("x", &all).is_err());
    }

    /// A range is checked against the CPUs there are before it is expanded: a huge one
    /// is an error naming the CPU, not an 800 GB allocation or a capacity overflow.
    #[test]
    fn huge_core_ranges_are_refused_before_anything_is_allocated() {
        let allowed = [0, 1, 2, 3];
        for (s, want) in [
            ("0-99999999999", "CPU 99999999999 is not one"),
            (
                "0-18446744073709551615",
                "CPU 18446744073709551615 is not one",
            ),
            (
                "18446744073709551615",
                "CPU 18446744073709551615 is not one",
            ),
            ("2-4", "CPU 4 is not one"),
            ("0,18446744073709551616", "invalid core"),
            ("0x1ffffffffffffffffffffffffffffffff", "invalid core mask"),
        ] {
            let e = select_cores(Some(s), &allowed)
                .map(|c| format!("{c:?}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
        assert_eq!(select_cores(Some("1-3"), &allowed).unwrap(), vec![1, 2, 3]);
        // One thread per core: a core named twice is a mistake, not two threads on it.
        let e = select_cores(Some("0-2,1"), &allowed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CPU 1 is named twice"), "{e}");
    }
}
