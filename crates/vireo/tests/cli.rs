//! The `vireo` binary end to end.

mod common;

use common::*;

/// A config attaching one blk controller `VirtioBlk0` at `sock` with `vq_count` queues.
fn config(dir: &std::path::Path, sock: &std::path::Path, vq_count: u16) -> std::path::PathBuf {
    let file = format!("vireo-{}.json", sock.file_stem().unwrap().to_string_lossy());
    let mut p = blk_params("VirtioBlk0", sock, vq_count);
    p.vq_size = 512;
    write_config(dir, &file, &[p])
}

#[test]
fn perf_verify_and_randread_against_qsd_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 256 << 20);
    let q = Qsd::start(QsdOpts {
        backend: Backend::File(img),
        ..Default::default()
    });
    let conf = config(dir.path(), &q.sock, 1);
    let v = perf_json(
        &conf,
        &["-w", "verify", "-o", "4096", "-q", "32", "-t", "2"],
    );
    assert_eq!(v["total"]["errors"], 0);
    assert_eq!(v["total"]["verify_failures"], 0);
    assert!(v["total"]["ios"].as_u64().unwrap() > 100);
    for k in ["mean", "p50", "p99", "p999", "max"] {
        assert!(v["total"]["latency_us"][k].as_f64().unwrap() > 0.0, "{k}");
    }
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);

    let v = perf_json(&conf, &["-w", "randread", "-o", "4k", "-q", "8", "-t", "1"]);
    assert!(v["total"]["iops"].as_f64().unwrap() > 100.0);
}

#[test]
fn perf_all_workloads_on_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 64 << 20);
    let q = Qsd::start(QsdOpts {
        backend: Backend::File(img),
        queues: 2,
        ..Default::default()
    });
    let conf = config(dir.path(), &q.sock, 2);
    for w in [
        "write",
        "read",
        "randwrite",
        "rw",
        "randrw",
        "verify",
        "unmap",
        "flush",
        "write_zeroes",
    ] {
        let v = perf_json(
            &conf,
            &[
                "-b",
                "VirtioBlk0",
                "-w",
                w,
                "-o",
                "8k",
                "-q",
                "4",
                "-t",
                "0.3",
                "-m",
                "0x3",
                "-M",
                "70",
            ],
        );
        assert_eq!(v["jobs"].as_array().unwrap().len(), 2, "{w}");
        assert_eq!(v["total"]["errors"], 0, "{w}");
        assert!(v["total"]["ios"].as_u64().unwrap() > 0, "{w}");
    }
}

#[test]
fn perf_without_config_runs_the_embedded_target() {
    let v: serde_json::Value = json_output(vireo().args(["perf", "-t", "0.5", "--json"]));
    assert_eq!(v["workload"], "verify");
    assert_eq!(v["total"]["verify_failures"], 0);
    assert!(v["total"]["ios"].as_u64().unwrap() > 0);
}

/// A reader that goes away before the report (`vireo perf --json | head -1` with a
/// late report) ends the command quietly: no panic, exit status 0.
#[test]
fn perf_output_to_a_closed_pipe_ends_quietly() {
    for extra in [&["--json"][..], &[][..]] {
        let mut child = vireo()
            .args(["perf", "-t", "0.3", "-w", "randread"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The read end closes before the report is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {err}");
    }
}

#[test]
fn bdevs_lists_and_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let q = Qsd::start(QsdOpts {
        backend: Backend::Null(1 << 30),
        lbs: 4096,
        ..Default::default()
    });
    let conf = config(dir.path(), &q.sock, 1);
    let v: serde_json::Value = json_output(vireo().args(["bdevs", "--json", "-c"]).arg(&conf));
    assert_eq!(v[0]["name"], "VirtioBlk0");
    assert_eq!(v[0]["block_size"], 4096);
    assert_eq!(v[0]["num_blocks"], (1u64 << 30) / 4096);

    // A bad key in the config: exit 2, the message names key and file.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_virtio_attach_controller","params":{"name":"X","trtype":"user","traddr":"/x","dev_type":"blk","vqcount":2}}]}]}"#).unwrap();
    let out = vireo().args(["bdevs", "-c"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vqcount") && err.contains("bad.json"), "{err}");

    // A missing socket.
    let missing = config(dir.path(), &dir.path().join("nothing.sock"), 1);
    let out = vireo()
        .args(["perf", "-t", "1", "-c"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));

    // An unknown bdev.
    let out = vireo()
        .args(["perf", "-t", "1", "-b", "Nope", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Nope"));
}

#[test]
fn perf_exit_status_is_nonzero_on_io_errors() {
    // A read-only export: writes are refused, so a write workload must fail.
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 16 << 20);
    let q = Qsd::start(QsdOpts {
        backend: Backend::File(img),
        read_only: true,
        ..Default::default()
    });
    let conf = config(dir.path(), &q.sock, 1);
    let out = vireo()
        .args(["perf", "-w", "write", "-t", "0.3", "--json", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["total"]["errors"].as_u64().unwrap() > 0);
    assert!(v["total"]["first_error"]
        .as_str()
        .unwrap()
        .contains("read-only"));
}

#[test]
fn perf_gives_up_on_a_device_that_stops_answering() {
    // The embedded target cannot be told to stall, so use the in-tree target with a
    // long completion delay and a short --io-timeout.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("slow.sock");
    let t = vireo_target::spawn_blk_target(
        &sock,
        vireo_target::BlkTargetConfig {
            backend: vireo_target::Backing::Ram {
                size_bytes: 16 << 20,
            },
            ..Default::default()
        },
    )
    .unwrap();
    t.faults()
        .set_completion_delay(std::time::Duration::from_secs(3));
    let conf = config(dir.path(), &sock, 1);
    let start = std::time::Instant::now();
    let out = vireo()
        .args([
            "perf",
            "-w",
            "read",
            "-q",
            "4",
            "-t",
            "0.2",
            "--io-timeout",
            "0.5",
            "--json",
            "-c",
        ])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        start.elapsed() < std::time::Duration::from_secs(20),
        "no hang"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["total"]["first_error"]
            .as_str()
            .unwrap()
            .contains("did not complete"),
        "{v}"
    );
    t.faults().clear();
}

/// `vireo` under `taskset -c CPU`.
fn vireo_on_cpu(cpu: usize) -> std::process::Command {
    let mut c = std::process::Command::new("taskset");
    c.args(["-c", &cpu.to_string()])
        .arg(env!("CARGO_BIN_EXE_vireo"));
    c
}

#[test]
fn perf_runs_on_the_first_allowed_cpu_and_refuses_others() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2
        || std::process::Command::new("taskset")
            .arg("-V")
            .output()
            .is_err()
    {
        eprintln!("SKIPPED: needs 2 CPUs and taskset (util-linux)");
        return;
    }
    // Without -m the I/O thread runs on the CPU taskset allows, not on CPU 0.
    let v: serde_json::Value = json_output(vireo_on_cpu(1).args(["perf", "-t", "0.3", "--json"]));
    assert_eq!(v["jobs"][0]["core"], 1, "{v}");
    assert_eq!(v["total"]["verify_failures"], 0);
    // -m naming a CPU outside the allowed set is a clear error.
    let out = vireo_on_cpu(1)
        .args(["perf", "-t", "0.3", "-m", "0"])
        .output()
        .unwrap();
    assert_fails_with(
        &out,
        "CPU 0 is not one this process may run on (allowed: 1)",
    );
}

#[test]
fn verify_catches_a_device_that_returns_no_data() {
    // null-co with read-zeroes=off completes reads without touching the buffer: the
    // data of the write before is still there unless verify poisons it before reading.
    let dir = tempfile::tempdir().unwrap();
    let q = Qsd::start(QsdOpts {
        backend: Backend::NullNoData(64 << 20),
        ..Default::default()
    });
    let conf = config(dir.path(), &q.sock, 1);
    let v = failing_perf_json(&conf, &["-w", "verify", "-q", "4", "-t", "0.3"]);
    assert!(v["total"]["verify_failures"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["total"]["errors"], 0);
    // The buffer came back as vireo poisoned it, not zeroed.
    assert!(v["total"].get("first_mismatch_read_zeros").is_none(), "{v}");
}

/// A device that reads back zeros for what it acknowledged writing (null-co): the
/// verify failure says so, and points at the device.
#[test]
fn verify_on_a_device_that_stores_nothing_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let q = Qsd::start(QsdOpts {
        backend: Backend::Null(64 << 20),
        ..Default::default()
    });
    let conf = config(dir.path(), &q.sock, 1);
    let out = vireo()
        .args(["perf", "-w", "verify", "-q", "4", "-t", "0.3", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("first verify mismatch at LBA")
            && text.contains("all zeros")
            && text.contains("seems to store nothing")
            && text.contains("null-co"),
        "{text}"
    );
    let v = failing_perf_json(&conf, &["-w", "verify", "-q", "4", "-t", "0.3"]);
    assert_eq!(v["total"]["first_mismatch_read_zeros"], true, "{v}");
    assert_eq!(v["jobs"][0]["first_mismatch_read_zeros"], true, "{v}");
}

#[test]
fn target_faults_are_reachable_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let mut t = start_target(
        &sock,
        &["--type", "blk", "--size", "64m", "--fail-next", "5"],
    );
    let conf = config(dir.path(), &sock, 1);
    let v = failing_perf_json(&conf, &["-w", "randread", "-q", "1", "-t", "0.3"]);
    let _ = t.kill();
    let _ = t.wait();
    // The first of the 5 failed requests is attach's GET_ID (an IOERR there just means
    // no serial number); the other 4 are reads.
    assert_eq!(v["total"]["errors"], 4, "{v}");
    assert!(v["total"]["ios"].as_u64().unwrap() > 5);
}

/// Start `vireo target ARGS -s SOCK` and wait until it listens.
fn start_target(sock: &std::path::Path, args: &[&str]) -> std::process::Child {
    let child = vireo()
        .arg("target")
        .args(args)
        .arg("-s")
        .arg(sock)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "target did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    child
}

#[test]
fn verify_never_gives_a_block_range_to_two_slots() {
    // 64 KiB = 16 ranges of 4 KiB; completions reordered so slots overtake each other.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("small.sock");
    let mut t = start_target(&sock, &["--type", "blk", "--size", "64k", "--reorder", "8"]);
    let conf = config(dir.path(), &sock, 1);
    let v = perf_json(
        &conf,
        &["-w", "verify", "-o", "4096", "-q", "16", "-t", "1"],
    );
    assert_eq!(v["total"]["verify_failures"], 0, "{v}");
    assert_eq!(v["total"]["errors"], 0, "{v}");
    // One more slot than ranges: refused up front instead of reporting its own race.
    let out = vireo()
        .args([
            "perf", "-w", "verify", "-o", "4096", "-q", "17", "-t", "1", "-c",
        ])
        .arg(&conf)
        .output()
        .unwrap();
    let _ = t.kill();
    let _ = t.wait();
    assert_fails_with(&out, "-q 17 exceeds the 16 ranges of 4096 bytes");
}

#[test]
fn sockets_are_private_and_a_live_one_is_never_taken_over() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let mut t = start_target(&sock, &["--type", "blk", "--size", "1m"]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "target socket mode {mode:o}");
    // A second target on the same path is refused; the first keeps serving.
    let out = vireo()
        .args(["target", "--type", "blk", "--size", "1m", "-s"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_fails_with(&out, "in use by a running server");
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    let _ = t.kill();
    let _ = t.wait();

    // The RPC socket too.
    let rpc = dir.path().join("rpc.sock");
    let mut s = vireo()
        .args(["serve", "-r"])
        .arg(&rpc)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&rpc);
    let mode = std::fs::metadata(&rpc).unwrap().permissions().mode() & 0o777;
    let _ = s.kill();
    let _ = s.wait();
    assert_eq!(mode, 0o600, "rpc socket mode {mode:o}");
}

#[test]
fn rpc_gives_up_on_a_silent_server() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("silent.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let start = std::time::Instant::now();
    let out = vireo()
        .args(["rpc", "--timeout", "1", "-r"])
        .arg(&sock)
        .arg("bdev_get_bdevs")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no answer") && err.contains("within 1 s"),
        "{err}"
    );
}

#[test]
fn impossible_cpu_memory_and_queue_parameters_are_refused() {
    // A CPU this process cannot run on.
    let out = vireo()
        .args(["perf", "-t", "0.1", "-m", "0x100"])
        .output()
        .unwrap();
    assert_fails_with(&out, "CPU 8 is not one this process may run on");
    // More I/O buffers than the machine holds: refused before allocating them.
    let out = vireo()
        .args(["perf", "-t", "1", "-o", "1g", "-q", "64", "-w", "randread"])
        .output()
        .unwrap();
    assert_fails_with(&out, "MiB of I/O buffers");
    // vq_count 0: the range the message gives is the one accepted.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("q0.json");
    std::fs::write(&bad, r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_virtio_attach_controller","params":{"name":"X","trtype":"user","traddr":"/x","dev_type":"blk","vq_count":0}}]}]}"#).unwrap();
    let out = vireo().args(["bdevs", "-c"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"vq_count\" must be an integer 1..=65535"),
        "{err}"
    );
}

#[test]
fn flush_workload_ends_on_a_write_through_device() {
    // Flushes complete without the device there: the run must still end on time.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("wt.sock");
    let mut t = start_target(&sock, &["--type", "blk", "--size", "8m", "--no-flush"]);
    let conf = config(dir.path(), &sock, 1);
    let start = std::time::Instant::now();
    let v = perf_json(&conf, &["-w", "flush", "-q", "4", "-t", "0.5"]);
    let _ = t.kill();
    let _ = t.wait();
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(v["total"]["errors"], 0, "{v}");
    assert!(v["total"]["ios"].as_u64().unwrap() > 0, "{v}");
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[test]
fn sigint_stops_perf_with_a_partial_report_and_sigterm_stops_the_target_cleanly() {
    let start = std::time::Instant::now();
    let child = spawn_vireo(&["perf", "-t", "60", "--json"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["interrupted"], true);
    assert!(v["total"]["ios"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["total"]["verify_failures"], 0);

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let mut t = start_target(&sock, &["--type", "scsi", "--size", "1m"]);
    signal(&t, "-TERM");
    let status = t.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "the target removes its socket");
}

#[test]
fn a_frozen_target_holds_perf_no_longer_than_its_io_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("frozen.sock");
    let mut t = start_target(&sock, &["--type", "blk", "--size", "16m"]);
    let conf = config(dir.path(), &sock, 1);
    let start = std::time::Instant::now();
    let conf_arg = conf.display().to_string();
    let perf = spawn_vireo(&[
        "perf",
        "-w",
        "randread",
        "-q",
        "8",
        "-t",
        "30",
        "--io-timeout",
        "1",
        "--json",
        "-c",
        &conf_arg,
    ]);
    std::thread::sleep(std::time::Duration::from_millis(700));
    signal(&t, "-STOP");
    let out = perf.wait_with_output().unwrap();
    let took = start.elapsed();
    signal(&t, "-CONT");
    let _ = t.kill();
    let _ = t.wait();
    // 0.7 s of running, 1 s of --io-timeout, and some slack: never the 5 s channel
    // close plus 10 s control-message timeout of an orderly detach.
    assert!(took < std::time::Duration::from_secs(8), "took {took:?}");
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stalled"], true, "{v}");
    assert!(v["total"]["errors"].as_u64().unwrap() > 0);
}

#[test]
fn the_seeds_ini_config_attaches() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("scsi.sock");
    let mut t = start_target(&sock, &["--type", "scsi", "--size", "8m"]);
    let ini = dir.path().join("virtio.ini");
    std::fs::write(&ini, format!("[Virtio]\n  Dev User {}\n", sock.display())).unwrap();
    let v = json_output(vireo().args(["bdevs", "--json", "-c"]).arg(&ini));
    let _ = t.kill();
    let _ = t.wait();
    assert_eq!(v[0]["name"], "VirtioScsi0t0", "{v}");
    // `vireo config convert` prints the JSON equivalent, which parses back.
    let j = json_output(vireo().args(["config", "convert"]).arg(&ini));
    let p = &j["subsystems"][0]["config"][0]["params"];
    assert_eq!(p["dev_type"], "scsi");
    assert_eq!(p["traddr"], sock.display().to_string());
}

#[test]
fn log_flags_turn_on_a_component() {
    let out = vireo()
        .args(["-L", "virtio_blk", "perf", "-t", "0.2", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("virtio-blk controller attached"), "{err}");
    let out = vireo()
        .args(["perf", "-t", "0.2", "--json"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("controller attached"));
    let out = vireo().args(["-L", "nope", "perf"]).output().unwrap();
    assert_fails_with(&out, "unknown log component \"nope\"");
}

/// `--plot` draws both charts (a line per job) and the JSON carries the per-second
/// timeline; anything but an .svg name is refused before the run.
#[test]
fn perf_plot_draws_latency_cdf_and_iops_over_time() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("run.svg");
    let out = vireo()
        .args(["perf", "-t", "2.5", "-q", "4", "--json", "--plot"])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tl = v["jobs"][0]["iops_per_second"]
        .as_array()
        .expect("timeline");
    assert!(tl.len() >= 2, "{tl:?}");
    assert!(tl.iter().all(|x| x.as_f64().unwrap() > 0.0), "{tl:?}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "an SVG document");
    assert!(text.contains("latency CDF") && text.contains("IOPS over time"));
    assert!(text.contains("Embedded0"), "the job is in the legend");
    assert!(
        text.matches("<polyline").count() >= 2,
        "a line in each chart"
    );

    let out = vireo()
        .args(["perf", "-t", "1", "--plot"])
        .arg(dir.path().join("run.png"))
        .output()
        .unwrap();
    assert_fails_with(&out, "--plot writes SVG");
}

/// `-L io`: a trace line per I/O submitted and completed.
#[test]
fn log_flag_io_traces_every_io() {
    let out = vireo()
        .args(["perf", "-t", "0.2", "-q", "1", "-L", "io"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let submits = err.matches("vireo_io: submit").count();
    let completes = err.matches("vireo_io: complete").count();
    assert!(submits > 10, "{submits} submit lines");
    assert!(
        completes + 1 >= submits,
        "{completes} complete lines for {submits} submits"
    );
    assert!(err.contains("op=\"write\"") && err.contains("latency_ns="));
    let quiet = vireo().args(["perf", "-t", "0.2"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("vireo_io"));
}

/// `vireo SUBCOMMAND --help`.
fn help(sub: &[&str]) -> String {
    let out = vireo().args(sub).arg("--help").output().unwrap();
    assert!(out.status.success(), "{sub:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

/// The DMA memory options are offered by the subcommands that allocate DMA memory, and
/// pad no other help; before the subcommand (where they used to be global) they still
/// work, and the subcommand's own setting wins.
#[test]
fn dma_options_only_on_subcommands_that_allocate_dma_memory() {
    for sub in ["bdevs", "perf", "serve", "soak"] {
        let h = help(&[sub]);
        assert!(
            h.contains("--hugepages") && h.contains("--dma-region-size"),
            "{sub}: {h}"
        );
    }
    for sub in [
        &[][..],
        &["rpc"],
        &["config"],
        &["pci"],
        &["setup"],
        &["target"],
    ] {
        let h = help(sub);
        assert!(
            !h.contains("--hugepages") && !h.contains("--dma-region-size"),
            "{sub:?}: {h}"
        );
    }
    let out = vireo()
        .args(["bdevs", "--dma-region-size", "lots", "-c", "x.json"])
        .output()
        .unwrap();
    assert_fails_with(&out, "invalid size \"lots\"");
    // Huge pages required on a machine that has none reserved: the option is applied
    // wherever it is given.
    let reserved = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap_or_default();
    if reserved.trim() != "0" {
        eprintln!("SKIPPED (the rest): this machine has huge pages reserved");
        return;
    }
    let missing = "/nonexistent/vireo.json";
    for args in [
        &["bdevs", "--hugepages=on", "-c", missing][..],
        &["--hugepages=on", "bdevs", "-c", missing],
        &["--hugepages", "bdevs", "-c", missing],
    ] {
        let out = vireo().args(args).output().unwrap();
        assert_fails_with(&out, "nr_hugepages");
    }
    let out = vireo()
        .args(["--hugepages=on", "bdevs", "--hugepages=off", "-c", missing])
        .output()
        .unwrap();
    assert_fails_with(&out, "cannot read config file");
}

/// `vireo target --max-unmap-lba/--max-unmap-desc`: the help's default is the one
/// used, "unlimited", which can be given by name; a number is still a number.
#[test]
fn max_unmap_defaults_read_as_unlimited() {
    let h = help(&["target"]);
    for opt in ["--max-unmap-lba", "--max-unmap-desc"] {
        let line = h
            .split("\n      --")
            .find(|l| l.starts_with(&opt[2..]))
            .unwrap_or_else(|| panic!("{opt} in {h}"));
        assert!(line.contains("[default: unlimited]"), "{line}");
        assert!(!line.contains("4294967295]"), "{line}");
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("u.sock");
    let mut t = start_target(
        &sock,
        &[
            "--type",
            "scsi",
            "--size",
            "8m",
            "--max-unmap-lba",
            "1000",
            "--max-unmap-desc",
            "unlimited",
        ],
    );
    let ini = dir.path().join("u.ini");
    std::fs::write(&ini, format!("[Virtio]\n  Dev User {}\n", sock.display())).unwrap();
    let v = json_output(vireo().args(["bdevs", "--json", "-c"]).arg(&ini));
    let _ = t.kill();
    let _ = t.wait();
    assert_eq!(v[0]["limits"]["max_unmap_blocks"], 1000, "{v}");
    let out = vireo()
        .args(["target", "--max-unmap-lba", "lots", "-s"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_fails_with(&out, "a number or `unlimited`");
}

/// `-c` reads SPDK's JSON and the legacy INI format, and its help says both.
#[test]
fn config_option_help_names_json_and_ini() {
    for sub in ["bdevs", "perf", "serve"] {
        let h = help(&[sub]);
        let line = h
            .split("\n  -")
            .find(|l| l.starts_with("c, --config"))
            .unwrap_or_else(|| panic!("-c in {sub}: {h}"));
        assert!(line.contains("JSON or INI"), "{sub}: {line}");
    }
}

/// `vireo soak --target qsd` without --faults runs the faults qemu-storage-daemon
/// supports (kill, stop) instead of refusing the default list; an explicit
/// unsupported fault is still a clear error.
#[test]
fn soak_on_qsd_defaults_to_the_faults_qsd_supports() {
    let out = vireo()
        .args([
            "soak", "--target", "qsd", "--cycles", "2", "--cycle", "0.5", "--size", "64m", "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kills"], 1, "{v}");
    assert_eq!(v["stops"], 1, "{v}");
    assert_eq!(v["disconnects"], 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["verify_failures"], 0, "{v}");
    let out = vireo()
        .args(["soak", "--target", "qsd", "--faults", "kill,disconnect"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_fails_with(&out, "--faults disconnect needs --target vireo");
}

/// The example configs in docs/examples load: every file there goes through `vireo
/// config convert` (which reads INI and JSON with the loader `-c` uses), and each
/// attaches what its comments and names say.
#[test]
fn the_example_configs_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples");
    let mut seen = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".json") || name.ends_with(".ini")) {
            continue;
        }
        let v = json_output(vireo().args(["config", "convert"]).arg(&path));
        let calls: Vec<(String, String, String)> = v["subsystems"][0]["config"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: {v}"))
            .iter()
            .map(|c| {
                let p = &c["params"];
                let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
                (s("name"), s("dev_type"), s("traddr"))
            })
            .collect();
        seen.insert(name, calls);
    }
    let c = |n: &str, t: &str, a: &str| (n.to_string(), t.to_string(), a.to_string());
    assert_eq!(
        seen.get("vhost-user-blk.json"),
        Some(&vec![c("VirtioBlk0", "blk", "/tmp/vhost.0")]),
        "{seen:?}"
    );
    assert_eq!(
        seen.get("vhost-user-scsi.json"),
        Some(&vec![c("VirtioScsi0", "scsi", "/tmp/vhost-scsi.0")]),
        "{seen:?}"
    );
    assert_eq!(
        seen.get("virtio.ini"),
        Some(&vec![
            c("VirtioScsi0", "scsi", "/tmp/vhost-scsi.0"),
            c("VirtioBlk0", "blk", "/tmp/vhost.0")
        ]),
        "{seen:?}"
    );
}

/// `vireo perf --wait-mode`: the sleeping mode is `sleep`, the library's
/// `WaitMode::Sleep`, and the report says so; `wait`, its old name, still works but is
/// not offered; an unknown name lists the three.
#[test]
fn wait_mode_sleep_is_the_librarys_name_and_wait_still_works() {
    let h = help(&["perf"]);
    let line = h
        .split("\n      --")
        .find(|l| l.starts_with("wait-mode"))
        .unwrap_or_else(|| panic!("--wait-mode in {h}"));
    for v in ["- poll:", "- sleep:", "- hybrid:", "completion eventfd"] {
        assert!(line.contains(v), "{v:?} in {line}");
    }
    assert!(
        !line.contains("- wait:"),
        "the old name is not offered: {line}"
    );
    for (arg, reported) in [
        ("sleep", "sleep"),
        ("wait", "sleep"),
        ("poll", "poll"),
        ("hybrid", "hybrid (50 us spin)"),
    ] {
        let v = json_output(vireo().args(["perf", "-t", "0.3", "--json", "--wait-mode", arg]));
        assert_eq!(v["wait_mode"], reported, "--wait-mode {arg}");
        assert_eq!(v["total"]["errors"], 0, "--wait-mode {arg}");
        assert_eq!(v["total"]["verify_failures"], 0, "--wait-mode {arg}");
        assert!(v["total"]["ios"].as_u64().unwrap() > 0, "--wait-mode {arg}");
    }
    let out = vireo()
        .args(["perf", "--wait-mode", "event"])
        .output()
        .unwrap();
    assert_fails_with(&out, "[possible values: poll, sleep, hybrid]");
}

/// Run `cmd`, killing it if it has not ended within 30 s (a wrapped size could start
/// a server that never stops).
fn output_within(cmd: &mut std::process::Command) -> std::process::Output {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Numbers that do not fit what they size are refused with the limit, before anything
/// is allocated: never wrapped, never a panic or an abort.
#[test]
fn numbers_too_large_for_what_they_size_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let sock = sock.to_str().unwrap();
    for (args, want) in [
        (
            vec!["perf", "-t", "0.1", "-m", "0-99999999999"],
            "-m 0-99999999999: CPU 99999999999 is not one this process may run on",
        ),
        (
            vec!["perf", "-t", "0.1", "-m", "0-18446744073709551615"],
            "CPU 18446744073709551615 is not one this process may run on",
        ),
        (
            vec!["perf", "-t", "0.1", "-m", "0,18446744073709551616"],
            "invalid core",
        ),
        (
            vec!["perf", "-t", "0.1", "-w", "flush", "-q", "99999999999"],
            "-q 99999999999: the queue depth is 1 to 65536",
        ),
        (
            vec!["soak", "-t", "1", "--reconnect-timeout", "1e-9"],
            "--reconnect-timeout must be 0.001 to 86400 seconds",
        ),
        (
            vec!["perf", "-t", "0.1", "-o", "17179869185g"],
            "size \"17179869185g\" is too large",
        ),
        (
            vec!["target", "--size", "17179869184g", "-s", sock],
            "size \"17179869184g\" is too large",
        ),
        (
            vec!["target", "--size", "1m", "--size-max", "4g", "-s", sock],
            "at most 4294967295 bytes",
        ),
    ] {
        let out = output_within(vireo().args(&args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in: {err}");
    }
}

/// `vireo target --file` creates its backing images for the owner only (they hold the
/// disk's data); a file that exists keeps its mode.
#[test]
fn target_backing_files_it_creates_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("b.sock");
    let img = dir.path().join("b.img");
    let mut t = start_target(
        &sock,
        &[
            "--type",
            "blk",
            "--size",
            "1m",
            "--file",
            img.to_str().unwrap(),
        ],
    );
    let _ = t.kill();
    let _ = t.wait();
    assert_eq!(mode(&img), 0o600, "blk backing file mode {:o}", mode(&img));
    let sock = dir.path().join("s.sock");
    let base = dir.path().join("s.img");
    let mut t = start_target(
        &sock,
        &[
            "--type",
            "scsi",
            "--size",
            "1m",
            "--file",
            base.to_str().unwrap(),
        ],
    );
    let _ = t.kill();
    let _ = t.wait();
    let lun = base.with_extension("t0l0.img");
    assert_eq!(mode(&lun), 0o600, "scsi backing file mode {:o}", mode(&lun));
    // An existing image is the user's: its mode is left alone.
    let own = dir.path().join("own.img");
    std::fs::write(&own, vec![0u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o640)).unwrap();
    let sock = dir.path().join("o.sock");
    let mut t = start_target(
        &sock,
        &[
            "--type",
            "blk",
            "--size",
            "1m",
            "--file",
            own.to_str().unwrap(),
        ],
    );
    let _ = t.kill();
    let _ = t.wait();
    assert_eq!(mode(&own), 0o640);
}
