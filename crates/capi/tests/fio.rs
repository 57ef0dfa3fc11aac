//! fio's libblkio engine on vireo's libblkio.so.1: verified random writes
//! (`--verify=crc32c`) through poll queues (`--hipri`), the completion fd
//! (`--libblkio_wait_mode=eventfd`) and two threads sharing one instance (`--numjobs=2
//! --thread`), against qemu-storage-daemon, `vireo target` (blk and scsi), and SPDK's
//! vhost target when `SPDK_DIR` names a build; vhost-device-scsi, which serves one
//! connection in its life, with fio's jobs as threads (`--thread`: the library hands the
//! connection fio's setup made to the job).
//!
//! Runs when `VIREO_FIO` names a fio binary (>= 3.34) built with the libblkio engine
//! against this library's installed prefix (docs/capi.md); otherwise each test says
//! SKIPPED and passes. Needs the library and the vireo binary built first, as
//! c_programs.rs does.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{installed, run_within, skipped, Peer, Prefix};

/// Bytes each fio job writes and verifies.
const JOB_SIZE: u64 = 16 << 20;

/// How long one fio run may take before the test calls it hung and kills it (a hang
/// guard: a run takes seconds).
const FIO_HANG: Duration = Duration::from_secs(300);

fn fio() -> Option<PathBuf> {
    match std::env::var_os("VIREO_FIO") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "VIREO_FIO={} is not a file", p.display());
            Some(p)
        }
        _ => None,
    }
}

fn prefix() -> &'static Prefix {
    installed("fio")
}

/// The fio binary, or a loud SKIPPED line naming the variable and `None`.
fn fio_or_skip(what: &str) -> Option<PathBuf> {
    let f = fio();
    if f.is_none() {
        skipped(
            &format!("fio on vireo's libblkio: {what} (crates/capi/tests/fio.rs)"),
            "set VIREO_FIO to a fio binary (>= 3.34) built with the libblkio engine against \
             the prefix of scripts/install-libblkio.sh (docs/capi.md, \"fio\")",
        );
    }
    f
}

/// The three ways fio waits, as extra arguments.
const VARIANTS: [(&str, &[&str]); 3] = [
    ("hipri", &["--hipri"]),
    ("2 threads", &["--numjobs=2", "--thread"]),
    ("eventfd", &["--libblkio_wait_mode=eventfd"]),
];

/// One fio run; `Err` says what went wrong: its exit status, a job's error, or a
/// verification that did not read everything back.
fn run_fio(
    fio: &Path,
    dir: &Path,
    driver: &str,
    sock: &Path,
    props: Option<&str>,
    variant: (&str, &[&str]),
    core: Option<usize>,
) -> Result<(), String> {
    let p = prefix();
    let (name, extra) = variant;
    let mut cmd = match core {
        // Next to a target that busy-polls another core.
        Some(c) => {
            let mut t = p.command(Path::new("taskset"));
            t.arg("-c").arg(c.to_string()).arg(fio);
            t
        }
        None => p.command(fio),
    };
    // fio leaves verify state files in its working directory when a job is cut short.
    cmd.current_dir(dir)
        .args([
            "--name=capi",
            "--ioengine=libblkio",
            &format!("--libblkio_driver={driver}"),
            &format!("--libblkio_path={}", sock.display()),
            "--rw=randwrite",
            "--verify=crc32c",
            "--bs=4k",
            &format!("--size={JOB_SIZE}"),
            &format!("--offset_increment={JOB_SIZE}"),
            "--iodepth=16",
            "--output-format=json",
        ])
        .args(extra);
    if let Some(props) = props {
        cmd.arg(format!("--libblkio_pre_connect_props={props}"));
    }
    let tag = format!("fio-{}", name.replace(' ', "-"));
    let ran = run_within(&mut cmd, dir, &tag, FIO_HANG)
        .map_err(|e| format!("fio {driver} {name}: {e}"))?;
    let ctx = |why: &str| format!("fio {driver} {name}: {why}\n{}", ran.text());
    if !ran.status.success() {
        return Err(ctx("failed"));
    }
    let json_start = ran.stdout.find('{').ok_or_else(|| ctx("no JSON report"))?;
    let report: serde_json::Value = serde_json::from_str(&ran.stdout[json_start..])
        .map_err(|e| ctx(&format!("fio's JSON: {e}")))?;
    let jobs = report["jobs"].as_array().ok_or_else(|| ctx("no jobs"))?;
    let want_jobs = if extra.contains(&"--numjobs=2") { 2 } else { 1 };
    if jobs.len() != want_jobs {
        return Err(ctx(&format!("{} jobs, want {want_jobs}", jobs.len())));
    }
    for j in jobs {
        let error = j["error"].as_i64();
        let written = j["write"]["io_bytes"].as_u64().unwrap_or(0);
        // The verify phase reads back every block written (the read side of the report).
        let verified = j["read"]["io_bytes"].as_u64().unwrap_or(0);
        if error != Some(0) || written != JOB_SIZE || verified != JOB_SIZE {
            return Err(ctx(&format!(
                "job error {error:?}, {written} bytes written, {verified} verified; want 0, \
                 {JOB_SIZE}, {JOB_SIZE}"
            )));
        }
    }
    println!(
        "fio {driver} {name}: ok ({want_jobs} job(s), {JOB_SIZE} bytes written and verified each)"
    );
    Ok(())
}

/// Every variant against one peer, then fail with what failed.
fn all_variants(fio: &Path, peer: &Peer, driver: &str, props: Option<&str>) {
    let failures: Vec<String> = VARIANTS
        .iter()
        .filter_map(|v| run_fio(fio, peer.dir.path(), driver, &peer.sock, props, *v, None).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{}\n--- peer log\n{}",
        failures.join("\n"),
        peer.log()
    );
}

#[test]
fn fio_on_qemu_storage_daemon() {
    let Some(fio) = fio_or_skip("qemu-storage-daemon") else {
        return;
    };
    let qsd = Peer::qsd(2 * JOB_SIZE, 2);
    all_variants(&fio, &qsd, "virtio-blk-vhost-user", None);
}

#[test]
fn fio_on_vireo_target_blk() {
    let Some(fio) = fio_or_skip("vireo target --type blk") else {
        return;
    };
    let t = Peer::vireo_target(&["--type", "blk", "--size", "64m", "--queues", "2"]);
    all_variants(&fio, &t, "virtio-blk-vhost-user", None);
}

#[test]
fn fio_on_vireo_target_scsi_lun1() {
    let Some(fio) = fio_or_skip("vireo target --type scsi") else {
        return;
    };
    let t = Peer::vireo_target(&[
        "--type", "scsi", "--luns", "2", "--size", "64m", "--queues", "2",
    ]);
    // The LUN through fio's pre-connect properties (set as strings).
    all_variants(&fio, &t, "virtio-scsi-vhost-user", Some("target=0:lun=1"));
}

#[test]
fn fio_on_vhost_device_scsi() {
    let Some(fio) = fio_or_skip("vhost-device-scsi") else {
        return;
    };
    // vhost-device-scsi (0.1.0) serves one front-end connection in its life. fio's engine
    // connects to read the capacity, destroys that instance and connects again for the
    // job: the library keeps the first connection for the second within one process, so
    // the job reaches the same connection with `--thread` (in fio's default forked jobs
    // the job is another process, which cannot share it). A fresh vhost-device-scsi for
    // each run.
    let variants: [(&str, &[&str]); 3] = [
        ("hipri thread", &["--hipri", "--thread"]),
        // It has one request queue: two jobs (two queues) cannot share it.
        ("block thread", &["--thread"]),
        (
            "eventfd thread",
            &["--libblkio_wait_mode=eventfd", "--thread"],
        ),
    ];
    let mut failures = Vec::new();
    for v in variants {
        let Some(peer) = Peer::vhost_device_scsi(1, 2 * JOB_SIZE) else {
            skipped(
                "fio on vhost-device-scsi (crates/capi/tests/fio.rs)",
                "vhost-device-scsi is not installed (cargo install vhost-device-scsi --locked)",
            );
            return;
        };
        if let Err(e) = run_fio(
            &fio,
            peer.dir.path(),
            "virtio-scsi-vhost-user",
            &peer.sock,
            None,
            v,
            None,
        ) {
            failures.push(format!("{e}\n--- peer log\n{}", peer.log()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn fio_on_spdk_vhost() {
    let Some(fio) = fio_or_skip("SPDK vhost") else {
        return;
    };
    let build = match vireo_peers::spdk::SpdkBuild::from_env() {
        Ok(b) => b,
        Err(why) => {
            skipped(
                "fio on SPDK's vhost target (crates/capi/tests/fio.rs)",
                &why,
            );
            return;
        }
    };
    let _one = vireo_peers::spdk::exclusive();
    // The target polls CPU 0; fio runs on CPU 1.
    let spdk = vireo_peers::spdk::SpdkVhost::start(&build, 0).expect("start SPDK vhost");
    let mut failures = Vec::new();
    for (ctrl, driver) in [
        ("blk.mal", "virtio-blk-vhost-user"),
        ("scsi.mal", "virtio-scsi-vhost-user"),
    ] {
        for v in VARIANTS {
            failures.extend(
                run_fio(
                    &fio,
                    spdk.dir(),
                    driver,
                    &spdk.socket(ctrl),
                    None,
                    v,
                    Some(1),
                )
                .err(),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- SPDK log\n{}",
        failures.join("\n"),
        spdk.log()
    );
}
