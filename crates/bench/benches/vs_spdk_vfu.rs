//! vireo vs SPDK's own virtio initiator (bdevperf `--iova-mode va`) over vfio-user, on
//! SPDK's `vfu_virtio` endpoints.
//!
//! SPDK v25.09's spdk_tgt (configured `--with-vfio-user`) runs on CPU 0 with a
//! virtio-blk endpoint (Malloc, 512 B blocks, packed rings offered) and a virtio-scsi
//! endpoint (targets 0 and 1, Malloc); `vireo perf` and SPDK's `bdevperf` take turns
//! (ABBA order) on CPU 1 with 4 KiB random reads on every bdev of the endpoint, with
//! the queues each initiator picks by default, and the bench prints the median of the
//! per-round ratios (each round's two runs are back to back), the medians and bests,
//! and every run in order.
//!
//! `cargo bench -p vireo-bench --bench vs_spdk_vfu -- [--seconds S] [--rounds R] [--qd 1,32,128] [--dev blk,scsi] [--packed-ring auto|on|off]`
//!
//! Needs an SPDK build with vfio-user (`SPDK_VFU_DIR` or `VIREO_SPDK_VFU_DIR`, built by
//! `spdk-vhost.sh build-vfu`); without one it says SKIPPED and exits 0. bdevperf runs
//! under `timeout -k` (a bdevperf that cannot map its queues hangs, ignoring SIGTERM).

use std::path::Path;
use std::process::{Command, Stdio};

use vireo_bench::{
    abba, parse_args, run_probed, vireo_binary, vireo_iops, vireo_perf, Abba, Common,
};
use vireo_peers::spdk::{self, SpdkVfu, SpdkVfuBuild};

/// SPDK's bdevperf over vfio-user with `conf`, killed after `limit` seconds (it may
/// hang, ignoring SIGTERM).
fn bdevperf(build: &SpdkVfuBuild, conf: &Path, limit: u64) -> Command {
    let b = build.bdevperf_on(1);
    let mut c = Command::new("timeout");
    c.args(["-k", "5", &limit.to_string()])
        .arg(b.get_program())
        .args(b.get_args())
        .envs(
            b.get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .arg("--json")
        .arg(conf);
    c
}

fn main() {
    let mut c = Common {
        secs: 3.0,
        rounds: 3,
        qds: vec![1, 32, 128],
    };
    let mut devs = vec!["blk".to_string(), "scsi".to_string()];
    let mut packed = "auto".to_string();
    parse_args(&mut c, |flag, value| {
        match flag {
            "--dev" => devs = value(),
            "--packed-ring" => packed = value()[0].clone(),
            _ => return false,
        }
        true
    });
    let Common { secs, rounds, qds } = c;
    let build = match SpdkVfuBuild::from_env() {
        Ok(b) => b,
        Err(why) => {
            spdk::skipped("bench vs_spdk_vfu", &why);
            return;
        }
    };
    let vireo = vireo_binary();
    let target = SpdkVfu::start(&build, 0).expect("SPDK spdk_tgt with vfio-user");
    println!(
        "4 KiB randread over vfio-user on SPDK v25.09 vfu_virtio (Malloc, target on CPU 0), initiator on CPU 1, {secs} s x {rounds} rounds each, ABBA; vireo packed_ring {packed}; median of the per-round ratios, medians, bests"
    );
    Abba::header();
    for dev in &devs {
        let sock = target.socket(&format!("vfu.{dev}"));
        let vconf = target.dir().join(format!("vireo-{dev}.json"));
        let mut conf: serde_json::Value =
            serde_json::from_str(&spdk::attach_config_tr("V", "vfio-user", &sock, dev, None))
                .unwrap();
        conf["subsystems"][0]["config"][0]["params"]["packed_ring"] = packed.clone().into();
        std::fs::write(&vconf, conf.to_string()).unwrap();
        let bconf = target.dir().join(format!("bdevperf-{dev}.json"));
        std::fs::write(
            &bconf,
            spdk::attach_config_tr("VirtioX", "vfio-user", &sock, dev, None),
        )
        .unwrap();
        // A first client of a fresh endpoint runs slowly (about a tenth of the rate at
        // QD1, whichever initiator it is): one untimed run of each before the rounds.
        for is_vireo in [true, false] {
            let args = ["-q", "1", "-o", "4096", "-w", "randread", "-t", "1"];
            let mut c = if is_vireo {
                let mut c = Command::new(&vireo);
                c.args(["perf", "--json", "-m", "1", "-c"]).arg(&vconf);
                c
            } else {
                bdevperf(&build, &bconf, 31)
            };
            let _ = c
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for &qd in &qds {
            let mut a = abba(rounds, qd, secs, |is_vireo, args| {
                if is_vireo {
                    let c = vireo_perf(&vireo, &vconf, args);
                    run_probed(c, secs, vireo_iops, None)
                } else {
                    let mut c = bdevperf(&build, &bconf, secs as u64 + 30);
                    c.args(args);
                    run_probed(c, secs, spdk::bdevperf_total_iops, None)
                }
            });
            // bdevperf runs under `timeout`, whose memory is not bdevperf's.
            a.spdk_mem = (0, 0);
            a.print(dev, qd, "");
        }
    }
}
