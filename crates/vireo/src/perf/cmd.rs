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
    let cores = select_cores(a.cores.as_deref(), &crate::cpus::allowed_cpus()?)?;
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
        vireo::outln!("{}", serde_json::to_string_pretty(&rep)?)?;
    } else {
        super::report::print_report(&rep)?;
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

/// The cores of `-m`, or the first allowed CPU; every core must be in `allowed`.
fn select_cores(arg: Option<&str>, allowed: &[usize]) -> Result<Vec<usize>> {
    match arg {
        None => Ok(vec![allowed[0]]),
        Some(s) => crate::cpus::parse_cores("-m", s, allowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_parse() {
        let all: Vec<usize> = (0..8).collect();
        assert_eq!(
            crate::cpus::parse_cores("-m", "0x3", &all).unwrap(),
            vec![0, 1]
        );
        assert_eq!(
            crate::cpus::parse_cores("-m", "0,2", &all).unwrap(),
            vec![0, 2]
        );
        assert_eq!(
            crate::cpus::parse_cores("-m", "[0-2]", &all).unwrap(),
            vec![0, 1, 2]
        );
        assert!(crate::cpus::parse_cores("-m", "0x0", &all).is_err());
        assert!(crate::cpus::parse_cores("-m", "3-1", &all).is_err());
        assert!(crate::cpus::parse_cores("-m", "x", &all).is_err());
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
