//! vireo against SPDK's polled vhost target (v25.09), the target SPDK's own virtio
//! initiator was written against. These tests need an SPDK build that CI cannot
//! install: set `SPDK_DIR` (or `VIREO_SPDK_DIR`) to it; without one every test here
//! reports itself as SKIPPED on stderr and passes (`./scripts/test.sh` says so too).
//!
//! The target polls CPU 0; vireo runs on CPU 1.

mod common;

use std::path::Path;

use common::*;
use vireo_peers::spdk::{self, SpdkBuild, SpdkVhost};

/// The SPDK build and a running target, or `None` after a loud skip notice.
fn spdk(test: &str) -> Option<(SpdkVhost, std::sync::MutexGuard<'static, ()>)> {
    spdk::start_for_test(&format!("spdk::{test}"), SpdkBuild::from_env(), |b| {
        SpdkVhost::start(b, 0)
    })
}

/// SPDK's bdevperf on CPU 1 with `conf`: `-q 32 -o 4096 -w WORKLOAD -t SECS`.
fn bdevperf(build: &SpdkBuild, conf: &Path, workload: &str, secs: &str) -> std::process::Output {
    build
        .bdevperf_on(1)
        .arg("--json")
        .arg(conf)
        .args(["-q", "32", "-o", "4096", "-w", workload, "-t", secs])
        .output()
        .unwrap()
}

/// A config of one controller (default vq_size) with `extra` params, in `dir`.
fn config(dir: &Path, sock: &Path, dev_type: &str, extra: serde_json::Value) -> std::path::PathBuf {
    let mut c: serde_json::Value =
        serde_json::from_str(&spdk::attach_config("V", sock, dev_type, None)).unwrap();
    if let Some(m) = extra.as_object() {
        for (k, v) in m {
            c["subsystems"][0]["config"][0]["params"][k] = v.clone();
        }
    }
    let conf = dir.join(format!(
        "{dev_type}-{}.json",
        sock.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&conf, c.to_string()).unwrap();
    conf
}

/// `vireo perf` on CPU 1 with a config of one controller (default vq_size).
fn perf(dir: &Path, sock: &Path, dev_type: &str, args: &[&str]) -> serde_json::Value {
    perf_with(dir, sock, dev_type, serde_json::json!({}), args)
}

/// `vireo perf` on CPU 1 with a config of one controller with `extra` params.
fn perf_with(
    dir: &Path,
    sock: &Path,
    dev_type: &str,
    extra: serde_json::Value,
    args: &[&str],
) -> serde_json::Value {
    let conf = config(dir, sock, dev_type, extra);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vireo"))
        .args(["perf", "--json", "-m", "1", "-c"])
        .arg(&conf)
        .args(args)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vireo perf {args:?} on {}: {e}\n{}",
            sock.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn every_controller_attaches_with_defaults() {
    let Some((v, _g)) = spdk("every_controller_attaches_with_defaults") else {
        return;
    };
    for (sock, ty, _) in spdk::CONTROLLERS {
        let conf = v.dir().join(format!("{sock}.json"));
        std::fs::write(&conf, spdk::attach_config("V", &v.socket(sock), ty, None)).unwrap();
        let b: serde_json::Value = json_output(vireo().args(["bdevs", "--json", "-c"]).arg(&conf));
        let name = if ty == "scsi" { "Vt0" } else { "V" };
        assert_eq!(b[0]["name"], name, "{sock}: {b}");
        assert_eq!(b[0]["block_size"], 4096, "{sock}");
        let blocks = if sock.ends_with("null") {
            262144
        } else {
            65536
        };
        assert_eq!(b[0]["num_blocks"], blocks, "{sock}");
        assert_eq!(b[0]["queue_size"], 128, "{sock}: the default vq_size");
    }
}

#[test]
fn workloads_pass_on_every_controller() {
    let Some((v, _g)) = spdk("workloads_pass_on_every_controller") else {
        return;
    };
    for (sock, ty, _) in spdk::CONTROLLERS {
        let malloc = sock.ends_with("mal");
        for w in ["verify", "unmap", "flush", "write_zeroes", "randwrite"] {
            let j = perf(
                v.dir(),
                &v.socket(sock),
                ty,
                &["-w", w, "-o", "4096", "-q", "32", "-t", "1"],
            );
            let t = &j["total"];
            match (w, malloc) {
                // A Null bdev stores nothing: reads return no data, and verify must
                // say so (SPDK's own bdevperf reports "Buffer mismatch" too).
                ("verify", false) => {
                    assert!(t["verify_failures"].as_u64().unwrap() > 0, "{sock}: {j}");
                    assert_eq!(t["errors"], 0, "{sock}: {j}");
                }
                // SPDK's Null bdev has no unmap: refused up front, with the reason.
                ("unmap", false) => {
                    let e = t["first_error"].as_str().unwrap_or("");
                    assert!(e.contains("unmap is not supported"), "{sock}: {j}");
                }
                _ => {
                    assert_eq!(t["errors"], 0, "{sock} {w}: {j}");
                    assert_eq!(t["verify_failures"], 0, "{sock} {w}: {j}");
                    assert!(t["ios"].as_u64().unwrap() > 1000, "{sock} {w}: {j}");
                }
            }
        }
    }
    // The target is still healthy: nothing was logged as an error about vireo's requests.
    let log = v.log();
    assert!(!log.contains("Invalid"), "{log}");
}

/// The default DMA memory (a 4 MiB first region) grows for large I/O on SPDK's target,
/// which has no CONFIGURE_MEM_SLOTS (every region goes in a new SET_MEM_TABLE, at most
/// 8): `vireo perf` adds one region for the buffers of both controllers' jobs (2 x 128 x
/// 1 MiB), and the data goes through it intact.
#[test]
fn default_dma_memory_grows_for_large_io() {
    let Some((v, _g)) = spdk("default_dma_memory_grows_for_large_io") else {
        return;
    };
    let mut c: serde_json::Value =
        serde_json::from_str(&spdk::attach_config("B", &v.socket("blk.mal"), "blk", None)).unwrap();
    let scsi: serde_json::Value = serde_json::from_str(&spdk::attach_config(
        "S",
        &v.socket("scsi.mal"),
        "scsi",
        None,
    ))
    .unwrap();
    let second = scsi["subsystems"][0]["config"][0].clone();
    c["subsystems"][0]["config"]
        .as_array_mut()
        .unwrap()
        .push(second);
    let conf = v.dir().join("grow.json");
    std::fs::write(&conf, c.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vireo"))
        .args(["perf", "--json", "-m", "1", "-c"])
        .arg(&conf)
        .args(["-w", "verify", "-q", "128", "-o", "1m", "-t", "1"])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vireo perf on blk.mal and scsi.mal: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let t = &j["total"];
    assert_eq!(t["errors"], 0, "{j}");
    assert_eq!(t["verify_failures"], 0, "{j}");
    // Every slot of both jobs (2 x 128 buffers of 1 MiB, in the grown memory) went
    // through the device at least once: perf drains what is in flight at the end, so
    // this holds however slow the machine is.
    assert!(t["ios"].as_u64().unwrap() >= 256, "{j}");
    assert_eq!(j["jobs"].as_array().unwrap().len(), 2, "{j}");
    let log = v.log();
    assert!(!log.contains("Invalid"), "{log}");
}

#[test]
fn spdk_bdevperf_runs_against_the_same_target() {
    // The peer itself works here: its own initiator reads the same controllers.
    let Some((v, _g)) = spdk("spdk_bdevperf_runs_against_the_same_target") else {
        return;
    };
    let build = SpdkBuild::from_env().unwrap();
    for (sock, ty, vq) in [("blk.null", "blk", 2), ("scsi.null", "scsi", 1)] {
        let conf = v.dir().join(format!("bp-{sock}.json"));
        std::fs::write(
            &conf,
            spdk::attach_config("VirtioX", &v.socket(sock), ty, Some(vq)),
        )
        .unwrap();
        let out = bdevperf(&build, &conf, "randread", "1");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            spdk::bdevperf_total_iops(&text).unwrap_or(0.0) > 1000.0,
            "{sock}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `vireo target` as a user runs it; killed on drop.
struct Target(std::process::Child);

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn spdk_bdevperf_verifies_against_vireo_target() {
    // Another initiator than vireo's own: SPDK's reads the whole config region, sets
    // 512-entry queues by default and checks every byte it wrote.
    let build = match SpdkBuild::from_env() {
        Ok(b) => b,
        Err(why) => {
            spdk::skipped("spdk::spdk_bdevperf_verifies_against_vireo_target", &why);
            return;
        }
    };
    let _g = spdk::exclusive();
    spdk::ensure_hugepages().expect("hugepages");
    let dir = tempfile::tempdir().unwrap();
    for (ty, queues) in [("blk", 2u16), ("scsi", 4)] {
        let sock = dir.path().join(format!("{ty}.sock"));
        let _t = Target(
            std::process::Command::new(env!("CARGO_BIN_EXE_vireo"))
                .args(["target", "--type", ty, "--size", "256m", "--queues"])
                .arg(queues.to_string())
                .arg("-s")
                .arg(&sock)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for_socket(&sock);
        let conf = dir.path().join(format!("bp-{ty}.json"));
        std::fs::write(
            &conf,
            spdk::attach_config("VirtioX", &sock, ty, Some(queues)),
        )
        .unwrap();
        let out = bdevperf(&build, &conf, "verify", "2");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{ty}: {text}");
        assert!(!text.contains("mismatch"), "{ty}: {text}");
        assert!(
            spdk::bdevperf_total_iops(&text).unwrap_or(0.0) > 100.0,
            "{ty}: {text}"
        );
    }
}

/// The packed-ring controllers (`vhost_create_blk_controller -p`): `packed_ring` auto
/// and on take packed rings, off takes split rings (which SPDK still serves there), and
/// the split controllers stay split with auto.
#[test]
fn packed_controllers_attach_with_packed_rings() {
    let Some((v, _g)) = spdk("packed_controllers_attach_with_packed_rings") else {
        return;
    };
    let ring = |sock: &str, value: &str| {
        let conf = config(
            v.dir(),
            &v.socket(sock),
            "blk",
            serde_json::json!({ "packed_ring": value }),
        );
        let b: serde_json::Value = json_output(vireo().args(["bdevs", "--json", "-c"]).arg(&conf));
        b[0]["packed_ring"]
            .as_bool()
            .expect("packed_ring in bdevs --json")
    };
    for (sock, _, _) in spdk::PACKED_CONTROLLERS {
        assert!(ring(sock, "auto"), "{sock}: auto");
        assert!(ring(sock, "on"), "{sock}: on");
        assert!(!ring(sock, "off"), "{sock}: off");
    }
    assert!(!ring("blk.null", "auto"), "a split-only controller");
    let conf = config(
        v.dir(),
        &v.socket("blk.mal"),
        "blk",
        serde_json::json!({"packed_ring": "on"}),
    );
    let out = vireo().args(["bdevs", "-c"]).arg(&conf).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("VIRTIO_F_RING_PACKED"),
        "{err}"
    );
}

/// Verify, unmap, flush, write-zeroes and random writes on SPDK's vhost-blk with
/// packed rings (the Malloc controller: every operation; the Null one: no data), at
/// QD 32 and at QD 128 (the whole ring in flight, as indirect descriptors).
#[test]
fn workloads_pass_on_packed_rings() {
    let Some((v, _g)) = spdk("workloads_pass_on_packed_rings") else {
        return;
    };
    let on = serde_json::json!({"packed_ring": "on"});
    for (sock, ty, _) in spdk::PACKED_CONTROLLERS {
        let malloc = sock.starts_with("blk.mal");
        for w in [
            "verify",
            "unmap",
            "flush",
            "write_zeroes",
            "randwrite",
            "randread",
        ] {
            for qd in ["32", "128"] {
                let j = perf_with(
                    v.dir(),
                    &v.socket(sock),
                    ty,
                    on.clone(),
                    &["-w", w, "-o", "4096", "-q", qd, "-t", "1"],
                );
                let t = &j["total"];
                match (w, malloc) {
                    ("verify", false) => {
                        assert!(t["verify_failures"].as_u64().unwrap() > 0, "{sock}: {j}");
                        assert_eq!(t["errors"], 0, "{sock}: {j}");
                    }
                    ("unmap", false) => {
                        let e = t["first_error"].as_str().unwrap_or("");
                        assert!(e.contains("unmap is not supported"), "{sock}: {j}");
                    }
                    _ => {
                        assert_eq!(t["errors"], 0, "{sock} {w} QD{qd}: {j}");
                        assert_eq!(t["verify_failures"], 0, "{sock} {w} QD{qd}: {j}");
                        assert!(t["ios"].as_u64().unwrap() > 0, "{sock} {w} QD{qd}: {j}");
                    }
                }
            }
        }
        // Large I/O: chains of many segments through the indirect tables.
        if malloc {
            let j = perf_with(
                v.dir(),
                &v.socket(sock),
                ty,
                on.clone(),
                &["-w", "verify", "-o", "131072", "-q", "8", "-t", "1"],
            );
            assert_eq!(j["total"]["errors"], 0, "{j}");
            assert_eq!(j["total"]["verify_failures"], 0, "{j}");
        }
    }
    let log = v.log();
    assert!(!log.contains("Invalid"), "{log}");
}

/// Reconnection on packed rings: SPDK's target is killed and started again under a
/// random-write run with `reconnect_timeout`; vireo reconnects with fresh packed rings
/// (SET_VRING_BASE with the wrap counter again), sends again what was in flight, and
/// the run ends without an error. (The Malloc bdev comes back empty, so data written
/// before the restart cannot be verified after it: the in-tree target's reconnection
/// tests check data.)
#[test]
fn packed_rings_survive_a_target_restart() {
    let Some((mut v, _g)) = spdk("packed_rings_survive_a_target_restart") else {
        return;
    };
    let (sock, _, _) = spdk::PACKED_CONTROLLERS[1];
    let conf = config(
        v.dir(),
        &v.socket(sock),
        "blk",
        serde_json::json!({"packed_ring": "on", "reconnect_timeout": 30}),
    );
    let (_j, err) =
        perf_through_a_restart(&conf, None, 8, || v.restart().expect("SPDK vhost restarts"));
    assert!(
        err.contains("closed the connection"),
        "the outage was noticed: {err}"
    );
}
