//! vireo over vfio-user against SPDK's `vfu_virtio` endpoints (SPDK v25.09 configured
//! `--with-vfio-user`, built by `spdk-vhost.sh build-vfu`). CI cannot build it: set
//! `SPDK_VFU_DIR` (or `VIREO_SPDK_VFU_DIR`) to the build; without one the SPDK tests
//! here report themselves as SKIPPED on stderr and pass. The tests of clear errors for
//! sockets that are not vfio-user servers need no peer and always run.
//!
//! The target polls CPU 0; vireo runs on CPU 1.

mod common;

use std::path::Path;

use common::*;
use vireo_peers::spdk::{self, SpdkVfu, SpdkVfuBuild};

/// The SPDK build and a running target, or `None` after a loud skip notice.
fn spdk_vfu(test: &str) -> Option<(SpdkVfu, std::sync::MutexGuard<'static, ()>)> {
    spdk::start_for_test(
        &format!("spdk_vfu::{test}"),
        SpdkVfuBuild::from_env(),
        |b| SpdkVfu::start(b, 0),
    )
}

/// A config of one vfio-user controller with `extra` params, in `dir`.
fn config(dir: &Path, sock: &Path, dev_type: &str, extra: serde_json::Value) -> std::path::PathBuf {
    let mut c: serde_json::Value = serde_json::from_str(&spdk::attach_config_tr(
        "V",
        "vfio-user",
        sock,
        dev_type,
        None,
    ))
    .unwrap();
    if let Some(m) = extra.as_object() {
        for (k, v) in m {
            c["subsystems"][0]["config"][0]["params"][k] = v.clone();
        }
    }
    let conf = dir.join(format!(
        "{dev_type}-{}-{}.json",
        sock.file_name().unwrap().to_string_lossy(),
        extra.to_string().len()
    ));
    std::fs::write(&conf, c.to_string()).unwrap();
    conf
}

/// `vireo perf` on CPU 1 with a config of one vfio-user controller.
fn perf(
    dir: &Path,
    sock: &Path,
    dev_type: &str,
    extra: serde_json::Value,
    args: &[&str],
) -> serde_json::Value {
    let conf = config(dir, sock, dev_type, extra);
    let out = vireo()
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
fn endpoints_attach_and_list_their_disks() {
    let Some((v, _g)) = spdk_vfu("endpoints_attach_and_list_their_disks") else {
        return;
    };
    for ring in ["off", "on"] {
        let conf = config(
            v.dir(),
            &v.socket("vfu.blk"),
            "blk",
            serde_json::json!({"packed_ring": ring}),
        );
        let b: serde_json::Value = json_output(vireo().args(["bdevs", "--json", "-c"]).arg(&conf));
        assert_eq!(b[0]["name"], "V", "{b}");
        assert_eq!(b[0]["block_size"], 512, "{b}");
        assert_eq!(b[0]["num_blocks"], 131072, "{b}");
        assert_eq!(b[0]["packed_ring"], ring == "on", "{b}");
    }
    let conf = config(
        v.dir(),
        &v.socket("vfu.scsi"),
        "scsi",
        serde_json::json!({}),
    );
    let b: serde_json::Value = json_output(vireo().args(["bdevs", "--json", "-c"]).arg(&conf));
    let names: Vec<&str> = b
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Vt0", "Vt1"], "both targets: {b}");
    assert_eq!(b[1]["num_blocks"], 131072, "{b}");
}

#[test]
fn workloads_pass_on_blk_split_and_packed_and_scsi() {
    let Some((v, _g)) = spdk_vfu("workloads_pass_on_blk_split_and_packed_and_scsi") else {
        return;
    };
    let cases = [
        ("vfu.blk", "blk", serde_json::json!({"packed_ring": "off"})),
        ("vfu.blk", "blk", serde_json::json!({"packed_ring": "on"})),
        (
            "vfu.scsi",
            "scsi",
            serde_json::json!({"packed_ring": "off"}),
        ),
    ];
    for (sock, ty, extra) in cases {
        for w in ["verify", "unmap", "flush", "randwrite"] {
            for qd in ["1", "32"] {
                let j = perf(
                    v.dir(),
                    &v.socket(sock),
                    ty,
                    extra.clone(),
                    &["-w", w, "-o", "4096", "-q", qd, "-t", "1"],
                );
                let t = &j["total"];
                assert_eq!(t["errors"], 0, "{sock} {extra} {w} QD{qd}: {j}");
                assert_eq!(t["verify_failures"], 0, "{sock} {extra} {w} QD{qd}: {j}");
                assert!(
                    t["ios"].as_u64().unwrap() > 0,
                    "{sock} {extra} {w} QD{qd}: {j}"
                );
            }
        }
        // Large I/O: chains of many segments.
        let j = perf(
            v.dir(),
            &v.socket(sock),
            ty,
            extra.clone(),
            &["-w", "verify", "-o", "131072", "-q", "8", "-t", "1"],
        );
        assert_eq!(j["total"]["errors"], 0, "{j}");
        assert_eq!(j["total"]["verify_failures"], 0, "{j}");
    }
    // Both scsi targets take I/O: the second through its own bdev.
    let conf = config(
        v.dir(),
        &v.socket("vfu.scsi"),
        "scsi",
        serde_json::json!({}),
    );
    let out = vireo()
        .args(["perf", "--json", "-m", "1", "-c"])
        .arg(&conf)
        .args([
            "-b", "Vt1", "-w", "verify", "-o", "4096", "-q", "16", "-t", "1",
        ])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(j["total"]["errors"], 0, "{j}");
    assert!(j["total"]["ios"].as_u64().unwrap() > 0, "{j}");
    // vireo polls and turned INTx off: the target never tried to interrupt it.
    let log = v.log();
    assert!(!log.contains("no fd for interrupt"), "{log}");
}

#[test]
fn a_device_of_the_other_type_is_named() {
    let Some((v, _g)) = spdk_vfu("a_device_of_the_other_type_is_named") else {
        return;
    };
    let conf = config(v.dir(), &v.socket("vfu.scsi"), "blk", serde_json::json!({}));
    let out = vireo().args(["bdevs", "-c"]).arg(&conf).output().unwrap();
    assert_fails_with(&out, "virtio-scsi device, not virtio-blk");
}

/// The reference client works on the same endpoints (the peer is sane here).
#[test]
fn spdk_bdevperf_verifies_over_vfio_user() {
    let Some((v, _g)) = spdk_vfu("spdk_bdevperf_verifies_over_vfio_user") else {
        return;
    };
    for (sock, ty) in spdk::VFU_ENDPOINTS {
        let conf = v.dir().join(format!("bp-{sock}.json"));
        std::fs::write(
            &conf,
            spdk::attach_config_tr("VirtioX", "vfio-user", &v.socket(sock), ty, None),
        )
        .unwrap();
        let out = std::process::Command::new("timeout")
            .args(["-k", "5", "30"])
            .arg(v.build().bdevperf_on(1).get_program())
            .args(v.build().bdevperf_on(1).get_args())
            .envs(
                v.build()
                    .bdevperf_on(1)
                    .get_envs()
                    .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
            )
            .arg("--json")
            .arg(&conf)
            .args(["-q", "16", "-o", "4096", "-w", "verify", "-t", "1"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            spdk::bdevperf_total_iops(&text).unwrap_or(0.0) > 1000.0,
            "{sock}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A server restarted under I/O: with `reconnect_timeout` vireo waits for it, connects
/// again, maps its memory anew, and sends again what was in flight; the run ends
/// without an error. (The Malloc bdev comes back empty, so data written before the
/// restart cannot be verified after it. The restarted target creates the scsi endpoint
/// before it adds target 1, and vireo may connect in between: the scsi run uses target
/// 0, which is there from the endpoint's start.)
#[test]
fn a_restarted_server_is_a_pause_not_an_outage() {
    let Some((mut v, _g)) = spdk_vfu("a_restarted_server_is_a_pause_not_an_outage") else {
        return;
    };
    for (sock, ty) in spdk::VFU_ENDPOINTS {
        let conf = config(
            v.dir(),
            &v.socket(sock),
            ty,
            serde_json::json!({"reconnect_timeout": 30}),
        );
        let bdev = if ty == "scsi" { "Vt0" } else { "V" };
        perf_through_a_restart(&conf, Some(bdev), 6, || v.restart().expect("SPDK restarts"));
    }
}

/// Sockets that are not vfio-user servers are refused with a clear error (a silent one
/// after the reply timeout; no peer needed).
#[test]
fn a_socket_that_does_not_speak_vfio_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A server that accepts and says nothing.
    let silent = dir.path().join("silent.sock");
    let l1 = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    // A server that answers garbage.
    let garbage = dir.path().join("garbage.sock");
    let l2 = std::os::unix::net::UnixListener::bind(&garbage).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((s, _)) = l1.accept() {
            held.push(s);
        }
    });
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        while let Ok((mut s, _)) = l2.accept() {
            let mut b = [0u8; 64];
            let _ = s.read(&mut b);
            let _ = s.write_all(&[0xffu8; 64]);
        }
    });
    // A vhost-user target (the in-tree one).
    let vhost = dir.path().join("vhost.sock");
    let mut target = spawn_vireo(&["target", "--type", "blk", "-s", vhost.to_str().unwrap()]);
    wait_for_socket(&vhost);
    for (sock, what) in [
        (&vhost, "a vhost-user socket needs trtype \"user\""),
        (&silent, "does not speak vfio-user"),
        (&garbage, "does not speak vfio-user"),
        (&dir.path().join("none.sock"), "cannot connect"),
    ] {
        let conf = config(dir.path(), sock, "blk", serde_json::json!({}));
        let out = vireo().args(["bdevs", "-c"]).arg(&conf).output().unwrap();
        assert_fails_with(&out, what);
    }
    let _ = target.kill();
    let _ = target.wait();
}
