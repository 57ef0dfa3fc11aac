//! The C API's cost per I/O: a minimal C loop on vireo's libblkio.so.1
//! (`crates/bench/c/capi_loop.c`: random 4 KiB reads on a poll queue, each completion
//! resubmitted at once) and fio's `libblkio` engine, each against `vireo perf` (the Rust
//! API), on the same device, same CPU, in rotating order.
//!
//! Targets: qemu-storage-daemon's vhost-user-blk export of a `null-co` node, and, with an
//! SPDK build, SPDK's vhost target (Null bdevs, CPU 0) behind virtio-blk and
//! virtio-scsi. Both initiators run on CPU 1 (`taskset`), 4 KiB random reads on one queue
//! (fio: one job, `--hipri`, so a poll queue as `vireo perf` polls); the table has the
//! medians of the per-round ratios C loop/vireo (1.00: the C API adds nothing) and
//! fio/vireo (what fio's user sees: the C API, fio's engine and fio's own per-I/O work)
//! and the median IOPS of each. The C loop is built with the system `cc`
//! (`-Wall -Wextra -Werror`).
//!
//! `VIREO_FIO=/path/to/fio cargo bench -p vireo-bench --bench capi_fio -- [--seconds S]
//! [--rounds R] [--qd 1,32] [--target qsd,spdk-blk,spdk-scsi] [--spdk-sockets DIR]`
//! (`--spdk-sockets`: the socket directory of an SPDK vhost target already running, with
//! `blk.null` and `scsi.null`, instead of starting one).
//!
//! fio must be 3.34 or later with the libblkio engine (docs/capi.md says how to build one); without
//! `VIREO_FIO` the bench says SKIPPED and exits 0, and SPDK's targets are skipped the
//! same way without `SPDK_DIR`. It builds `vireo` and `vireo-capi` in release mode first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vireo_peers::spdk::{self, SpdkBuild, SpdkVhost};

use vireo_bench::{median, parse_args, Common};

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// Build `crates/bench/c/capi_loop.c` against the library in `lib` into `out`.
fn build_capi_loop(lib: &Path, out: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("c/capi_loop.c");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../capi/include");
    let exe = out.join("capi_loop");
    let ok = Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .arg(format!("-I{}", include.display()))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lblkio")
        .status()
        .expect("cc")
        .success();
    assert!(ok, "cc {} failed", src.display());
    exe
}

fn capi_loop_iops(text: &str) -> f64 {
    // "iops N ios N seconds S"
    let mut w = text.split_whitespace();
    assert_eq!(w.next(), Some("iops"), "capi_loop output: {text}");
    w.next()
        .and_then(|n| n.parse().ok())
        .expect("capi_loop iops")
}

/// Build the binary and the library; the directory to put on LD_LIBRARY_PATH.
fn build() -> (PathBuf, PathBuf) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "-p", "vireo", "-p", "vireo-capi"])
        .status()
        .expect("cargo build")
        .success();
    assert!(ok, "cargo build --release failed");
    let release = target_dir().join("release");
    // The library's SONAME is libblkio.so.1: a directory with that name in it.
    let lib = release.join("capi-lib");
    std::fs::create_dir_all(&lib).unwrap();
    let link = lib.join("libblkio.so.1");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(release.join("libblkio.so"), &link).unwrap();
    let _ = std::fs::remove_file(lib.join("libblkio.so"));
    std::os::unix::fs::symlink(release.join("libblkio.so"), lib.join("libblkio.so")).unwrap();
    (release.join("vireo"), lib)
}

fn output(mut c: Command) -> String {
    let out = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn vireo_iops(text: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(text).expect("vireo perf --json");
    assert_eq!(v["total"]["errors"], 0, "vireo perf had errors");
    v["total"]["iops"].as_f64().expect("iops")
}

fn fio_iops(text: &str) -> f64 {
    // fio may print lines before the JSON document.
    let start = text.find('{').expect("fio JSON");
    let v: serde_json::Value = serde_json::from_str(&text[start..]).expect("fio JSON");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error");
    job["read"]["iops"].as_f64().expect("read iops")
}

/// One device to measure: its vhost-user socket and libblkio driver name.
struct Device {
    name: String,
    socket: PathBuf,
    dev_type: &'static str,
}

struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qsd(dir: &Path) -> (Qsd, Device) {
    let sock = dir.join("qsd.sock");
    let child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            "driver=null-co,node-name=n0,size=1073741824",
            "--export",
        ])
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon");
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (
        Qsd(child),
        Device {
            name: "qsd null-co".into(),
            socket: sock,
            dev_type: "blk",
        },
    )
}

fn main() {
    let mut c = Common {
        secs: 3.0,
        rounds: 3,
        qds: vec![1, 32],
    };
    let mut targets = vec![
        "qsd".to_string(),
        "spdk-blk".to_string(),
        "spdk-scsi".to_string(),
    ];
    // A running SPDK vhost target's socket directory (blk.null, scsi.null), instead of
    // starting one.
    let mut spdk_sockets: Option<PathBuf> = None;
    parse_args(&mut c, |flag, value| {
        match flag {
            "--target" => targets = value(),
            "--spdk-sockets" => spdk_sockets = Some(PathBuf::from(&value()[0])),
            _ => return false,
        }
        true
    });
    let Common { secs, rounds, qds } = c;
    let Some(fio) = std::env::var_os("VIREO_FIO").map(PathBuf::from) else {
        spdk::skipped(
            "bench capi_fio",
            "VIREO_FIO is not set: point it at a fio 3.34+ built with the libblkio engine (see docs/capi.md)",
        );
        return;
    };
    let (vireo, lib) = build();
    let dir = tempfile::tempdir().unwrap();
    let capi_loop = build_capi_loop(&lib, dir.path());
    let mut devices = Vec::new();
    let _qsd = if targets.iter().any(|t| t == "qsd") {
        let (q, d) = start_qsd(dir.path());
        devices.push(d);
        Some(q)
    } else {
        None
    };
    let spdk_wanted: Vec<&str> = targets
        .iter()
        .filter_map(|t| t.strip_prefix("spdk-"))
        .collect();
    let _spdk = if spdk_wanted.is_empty() {
        None
    } else if let Some(dir) = &spdk_sockets {
        for dev in &spdk_wanted {
            devices.push(Device {
                name: format!("SPDK {dev} Null"),
                socket: dir.join(format!("{dev}.null")),
                dev_type: if *dev == "scsi" { "scsi" } else { "blk" },
            });
        }
        None
    } else {
        match SpdkBuild::from_env() {
            Ok(b) => {
                let t = SpdkVhost::start(&b, 0).expect("SPDK vhost");
                for dev in &spdk_wanted {
                    devices.push(Device {
                        name: format!("SPDK {dev} Null"),
                        socket: t.socket(&format!("{dev}.null")),
                        dev_type: if *dev == "scsi" { "scsi" } else { "blk" },
                    });
                }
                Some(t)
            }
            Err(why) => {
                spdk::skipped("bench capi_fio on SPDK's vhost target", &why);
                None
            }
        }
    };
    println!(
        "4 KiB randread, one queue, initiator on CPU 1; C loop (crates/bench/c/capi_loop.c) and fio {} (libblkio engine, --hipri, one job) on vireo's libblkio.so.1 vs vireo perf; {secs} s x {rounds} rounds, rotating order",
        fio.display()
    );
    println!(
        "{:>16} {:>4} {:>8} {:>8} {:>12} {:>12} {:>12}",
        "device", "QD", "C/vireo", "fio/vir", "C med", "fio med", "vireo med"
    );
    for d in &devices {
        let conf = dir
            .path()
            .join(format!("{}.json", d.name.replace(' ', "_")));
        std::fs::write(&conf, spdk::attach_config("V", &d.socket, d.dev_type, None)).unwrap();
        let driver = format!("virtio-{}-vhost-user", d.dev_type);
        for &qd in &qds {
            // [C loop, fio, vireo perf] per round
            let mut iops: [Vec<f64>; 3] = Default::default();
            let (mut c_ratio, mut fio_ratio) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                let mut r = [0.0; 3];
                for k in 0..3 {
                    let which = (round + k) % 3;
                    let t = format!("{secs}");
                    let mut c = Command::new("taskset");
                    c.arg("-c").arg("1");
                    r[which] = match which {
                        0 => {
                            c.arg(&capi_loop).arg(&driver).arg(&d.socket);
                            c.arg(qd.to_string()).arg(&t);
                            capi_loop_iops(&output(c))
                        }
                        1 => {
                            c.arg(&fio).env("LD_LIBRARY_PATH", &lib).args([
                                "--name=capi",
                                "--ioengine=libblkio",
                                &format!("--libblkio_driver={driver}"),
                                &format!("--libblkio_path={}", d.socket.display()),
                                "--rw=randread",
                                "--bs=4k",
                                &format!("--iodepth={qd}"),
                                "--hipri",
                                "--size=512m",
                                "--time_based",
                                &format!("--runtime={t}"),
                                "--output-format=json",
                            ]);
                            fio_iops(&output(c))
                        }
                        _ => {
                            c.arg(&vireo)
                                .args(["perf", "--json", "-c"])
                                .arg(&conf)
                                .args([
                                    "-q",
                                    &qd.to_string(),
                                    "-o",
                                    "4096",
                                    "-w",
                                    "randread",
                                    "-t",
                                    &t,
                                ]);
                            vireo_iops(&output(c))
                        }
                    };
                }
                for k in 0..3 {
                    iops[k].push(r[k]);
                }
                c_ratio.push(r[0] / r[2]);
                fio_ratio.push(r[1] / r[2]);
            }
            let list = |v: &[f64]| v.iter().map(|x| *x as u64).collect::<Vec<_>>();
            println!(
                "{:>16} {:>4} {:>8.3} {:>8.3} {:>12.0} {:>12.0} {:>12.0}   C {:?} fio {:?} vireo {:?}",
                d.name,
                qd,
                median(&mut c_ratio),
                median(&mut fio_ratio),
                median(&mut iops[0].clone()),
                median(&mut iops[1].clone()),
                median(&mut iops[2].clone()),
                list(&iops[0]),
                list(&iops[1]),
                list(&iops[2]),
            );
        }
    }
}
