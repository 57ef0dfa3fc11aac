//! Benchmarks live in `benches/`; run `cargo bench -p vireo-bench`. This library holds
//! what several of them share: running `vireo perf` (built in release mode) and other
//! initiators, reading their IOPS, sampling their memory, and the median.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

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
pub fn vireo_binary() -> PathBuf {
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
