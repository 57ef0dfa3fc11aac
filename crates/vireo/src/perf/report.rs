//! `vireo perf`'s text report (`--json` prints the [`PerfReport`] itself).

use super::PerfReport;

/// The text report of a run: a line per job and the total, CPU use, and what went
/// wrong first.
pub fn print_report(r: &PerfReport) -> Result<(), vireo::OutputError> {
    vireo::outln!(
        "{:<16} {:>5} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "job",
        "core",
        "IOPS",
        "MiB/s",
        "avg_us",
        "p50_us",
        "p99_us",
        "max_us",
        "errors",
        "verify"
    )?;
    for j in r.jobs.iter().chain(std::iter::once(&r.total)) {
        vireo::outln!(
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
        )?;
    }
    vireo::outln!(
        "cpu: {:.2} s for the process, {:.2} us per I/O (wait mode {})",
        r.cpu_seconds,
        r.cpu_us_per_io,
        r.wait_mode
    )?;
    if let Some(e) = &r.total.first_error {
        vireo::outln!("first error: {e}")?;
    }
    if let Some(l) = r.total.first_mismatch_lba {
        if r.total.first_mismatch_read_zeros {
            vireo::outln!(
                "first verify mismatch at LBA {l}: the data read back is all zeros; the device \
                 seems to store nothing (e.g. qemu-storage-daemon's null-co driver or SPDK's \
                 Null bdev), so verify cannot pass on it"
            )?;
        } else {
            vireo::outln!("first verify mismatch at LBA {l}")?;
        }
    }
    if r.interrupted {
        vireo::outln!("interrupted: the run was stopped early (partial results)")?;
    }
    Ok(())
}
