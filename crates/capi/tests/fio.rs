//! fio's libblkio engine on vireo's libblkio.so.1: verified random writes
//! (`--verify=crc32c`) through poll queues (`--hipri`), the completion fd
//! (`--libblkio_wait_mode=eventfd`) and two threads sharing one instance (`--numjobs=2
//! --thread`), against qemu-storage-daemon, `vireo target` (blk and scsi),
//! vhost-device-scsi when installed, and SPDK's vhost target when `SPDK_DIR` names a
//! build.
//!
//! Runs when `VIREO_FIO` names a fio binary (>= 3.34) built with the libblkio engine
//! against this library's installed prefix (docs/capi.md); otherwise each test says
//! SKIPPED and passes. Needs the library and the vireo binary built first, as
//! c_programs.rs does.

mod common;

use std::path::{Path, PathBuf};

use common::{installed, run, skipped, Peer, Prefix};

/// Bytes each fio job writes and verifies.
const JOB_SIZE: u64 = 16 << 20;

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
    ("eventfd", &["--libblkio_wait_mode=eventfd"]),
    ("2 threads", &["--numjobs=2", "--thread"]),
];

/// One fio run: its JSON report after checking the exit status, the errors and that
/// verification read everything back.
fn run_fio(
    fio: &Path,
    dir: &Path,
    driver: &str,
    sock: &Path,
    props: Option<&str>,
    variant: (&str, &[&str]),
    core: Option<usize>,
) {
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
    cmd.args([
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
    let ran = run(&mut cmd, dir, &tag);
    let ctx = || format!("fio {driver} {name}: {}", ran.text());
    assert!(ran.status.success(), "{}", ctx());
    let json_start = ran
        .stdout
        .find('{')
        .unwrap_or_else(|| panic!("no JSON: {}", ctx()));
    let report: serde_json::Value = serde_json::from_str(&ran.stdout[json_start..])
        .unwrap_or_else(|e| panic!("fio's JSON: {e}: {}", ctx()));
    let jobs = report["jobs"].as_array().expect("jobs");
    let want_jobs = if extra.contains(&"--numjobs=2") { 2 } else { 1 };
    assert_eq!(jobs.len(), want_jobs, "{}", ctx());
    for j in jobs {
        assert_eq!(j["error"].as_i64(), Some(0), "job error: {}", ctx());
        let written = j["write"]["io_bytes"].as_u64().unwrap_or(0);
        let verified = j["read"]["io_bytes"].as_u64().unwrap_or(0);
        // The verify phase reads back every block written (the read side of the report).
        assert_eq!(written, JOB_SIZE, "written: {}", ctx());
        assert_eq!(verified, JOB_SIZE, "verify read back: {}", ctx());
        assert_eq!(j["write"]["total_ios"].as_u64(), Some(JOB_SIZE / 4096));
        assert_eq!(j["read"]["total_ios"].as_u64(), Some(JOB_SIZE / 4096));
    }
    println!(
        "fio {driver} {name}: ok ({want_jobs} job(s), {JOB_SIZE} bytes written and verified each)"
    );
}

fn all_variants(fio: &Path, peer: &Peer, driver: &str, props: Option<&str>) {
    for v in VARIANTS {
        run_fio(fio, peer.dir.path(), driver, &peer.sock, props, v, None);
    }
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
    if common::vds_binary().is_none() {
        skipped(
            "fio on vhost-device-scsi (crates/capi/tests/fio.rs)",
            "vhost-device-scsi is not installed: cargo install vhost-device-scsi --locked",
        );
        return;
    }
    for v in VARIANTS {
        // It serves one front-end and exits: a fresh one per fio run.
        let vds = Peer::vhost_device_scsi(1, 2 * JOB_SIZE).unwrap();
        run_fio(
            &fio,
            vds.dir.path(),
            "virtio-scsi-vhost-user",
            &vds.sock,
            None,
            v,
            None,
        );
    }
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
    for (ctrl, driver) in [
        ("blk.mal", "virtio-blk-vhost-user"),
        ("scsi.mal", "virtio-scsi-vhost-user"),
    ] {
        for v in VARIANTS {
            run_fio(
                &fio,
                spdk.dir(),
                driver,
                &spdk.socket(ctrl),
                None,
                v,
                Some(1),
            );
        }
    }
}
