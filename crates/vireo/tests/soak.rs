//! Reconnection under fire: `vireo soak` kills and restarts, freezes and disconnects
//! real targets on files while verified I/O runs; nothing acknowledged may be lost and
//! no I/O may fail. Also: the soak itself catches lost writes, and a reconnection
//! window that passes fails the I/O with a clear error.

mod common;

use common::vireo;
use serde_json::Value;

/// `vireo soak ARGS --json`: (exit code, report).
fn soak(args: &[&str]) -> (i32, Value) {
    let out = vireo()
        .arg("soak")
        .args(args)
        .args(["--size", "64m", "--json"])
        .output()
        .expect("run vireo soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rep: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "soak printed no report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), rep)
}

fn n(rep: &Value, key: &str) -> u64 {
    rep[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {rep}"))
}

fn assert_nothing_lost(code: i32, rep: &Value) {
    assert_eq!(n(rep, "errors"), 0, "{rep:#}");
    assert_eq!(n(rep, "verify_failures"), 0, "{rep:#}");
    assert_eq!(code, 0, "{rep:#}");
    assert!(n(rep, "writes") > 1000, "{rep:#}");
    assert!(n(rep, "reads_verified") > 1000, "{rep:#}");
    assert!(n(rep, "flushes") > 10, "{rep:#}");
    assert!(n(rep, "final_ranges_checked") > 1000, "{rep:#}");
}

/// The first bar: qemu-storage-daemon (file) killed with SIGKILL and restarted
/// 10 times during a verify run with reconnect_timeout set: 0 errors, 0 verify failures.
#[test]
fn qsd_killed_and_restarted_ten_times_loses_nothing() {
    let (code, rep) = soak(&[
        "--target", "qsd", "--faults", "kill", "--cycles", "10", "--cycle", "0.7",
    ]);
    assert_nothing_lost(code, &rep);
    assert_eq!(n(&rep, "kills"), 10, "{rep:#}");
    assert_eq!(n(&rep, "reconnects"), 10, "{rep:#}");
}

/// qemu-storage-daemon frozen (SIGSTOP/SIGCONT) and killed in turn.
#[test]
fn qsd_frozen_and_killed_loses_nothing() {
    let (code, rep) = soak(&[
        "--target",
        "qsd",
        "--faults",
        "stop,kill",
        "--cycles",
        "4",
        "--cycle",
        "0.7",
        "--freeze",
        "0.5",
    ]);
    assert_nothing_lost(code, &rep);
    assert_eq!(n(&rep, "stops"), 2, "{rep:#}");
    assert_eq!(n(&rep, "kills"), 2, "{rep:#}");
    assert_eq!(n(&rep, "reconnects"), 2, "{rep:#}");
}

/// The in-tree target on a file: killed, frozen, and made to drop the connection with
/// requests in flight (SIGUSR1), in turn.
#[test]
fn vireo_target_killed_frozen_and_disconnected_loses_nothing() {
    let (code, rep) = soak(&[
        "--target",
        "vireo",
        "--faults",
        "kill,stop,disconnect",
        "--cycles",
        "6",
        "--cycle",
        "0.7",
        "--freeze",
        "0.5",
    ]);
    assert_nothing_lost(code, &rep);
    assert_eq!(n(&rep, "disconnects"), 2, "{rep:#}");
    assert_eq!(n(&rep, "reconnects"), 4, "{rep:#}");
    // The target offers INFLIGHT_SHMFD: each disconnect left at least the request it
    // dropped with in its buffer, served again by the next connection.
    assert!(n(&rep, "target_resent") >= 2, "{rep:#}");
}

/// The soak is not blind: a target that loses its data when killed (RAM) is caught.
#[test]
fn the_soak_catches_a_target_that_loses_acknowledged_writes() {
    let (code, rep) = soak(&[
        "--target",
        "vireo-ram",
        "--faults",
        "kill",
        "--cycles",
        "1",
        "--cycle",
        "0.5",
    ]);
    assert_eq!(code, 1, "{rep:#}");
    assert!(n(&rep, "verify_failures") > 0, "{rep:#}");
    let problems = rep["problems"].to_string();
    assert!(problems.contains("acknowledged write"), "{rep:#}");
}

/// A target that does not come back within reconnect_timeout: the waiting I/O fails
/// with an error that names the window, and the run says so (exit 1), no hang.
#[test]
fn a_reconnect_window_that_passes_fails_the_io_clearly() {
    let started = std::time::Instant::now();
    let (code, rep) = soak(&[
        "--target",
        "vireo",
        "--faults",
        "kill",
        "--cycles",
        "1",
        "--cycle",
        "0.5",
        "--down",
        "3",
        "--reconnect-timeout",
        "0.5",
    ]);
    assert_eq!(code, 1, "{rep:#}");
    assert!(n(&rep, "errors") > 0, "{rep:#}");
    let problems = rep["problems"].to_string();
    assert!(problems.contains("reconnect_timeout"), "{rep:#}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

/// virtio-scsi over the in-tree target: the control, event and request queues come
/// back after each fault, and the LUN's commands are sent again.
#[test]
fn vireo_scsi_target_killed_frozen_and_disconnected_loses_nothing() {
    let (code, rep) = soak(&[
        "--target",
        "vireo",
        "--dev-type",
        "scsi",
        "--faults",
        "kill,stop,disconnect",
        "--cycles",
        "6",
        "--cycle",
        "0.7",
        "--freeze",
        "0.5",
    ]);
    assert_nothing_lost(code, &rep);
    assert_eq!(n(&rep, "kills"), 2, "{rep:#}");
    assert_eq!(n(&rep, "reconnects"), 4, "{rep:#}");
}
