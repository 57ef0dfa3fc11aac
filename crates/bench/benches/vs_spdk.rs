//! vireo vs SPDK's own virtio initiator (bdevperf) on SPDK's polled vhost target.
//!
//! SPDK v25.09's vhost target runs on CPU 0 with Null bdevs behind a virtio-blk and a
//! virtio-scsi controller; `vireo perf` and SPDK's `bdevperf` take turns (ABBA order)
//! on CPU 1 with 4 KiB random reads, one queue each, and the bench prints the median of
//! the per-round ratios (each round's two runs are back to back), the median and the
//! best IOPS of each with their ratios, every run in order, and the resident memory of
//! each process (bdevperf's hugepages counted separately). On a shared machine whose
//! noise comes in phases (runs drop to half speed for seconds at a time), the per-round
//! ratio is the least exposed to them: both runs of a round usually see the same phase.
//!
//! `cargo bench -p vireo-bench --bench vs_spdk -- [--seconds S] [--rounds R] [--qd 1,32,128] [--dev blk,scsi] [--vq-size N] [--target-stats] [--target-profile] [--phase-split IOPS]`
//! (`--vq-size`: vireo's queue size, default its own default of 128; SPDK's initiator uses 512).
//!
//! `--target-stats`: what each initiator makes the target do, from the target's own
//! counters over the middle 40% of every run (SPDK's `thread_get_stats` and
//! `bdev_get_iostat`, read on its RPC socket): nanoseconds per I/O the controller's
//! thread was busy, and the reactor's idle time per I/O (polls that found nothing, on
//! every thread of the core). An initiator that keeps the target fed leaves little idle
//! time; the busy time is the target's own cost per request.
//!
//! `--phase-split IOPS`: also the pair medians of the rounds whose bdevperf run was
//! above IOPS and of the others (the machine's fast and slow phases apart).
//!
//! `--target-profile`: also `perf record -C <target core>` over the same window, and the
//! share of the target's samples in its vhost libraries (`libspdk_vhost` and
//! `librte_vhost`, `perf report --sort dso`) with each initiator. Needs `perf`.
//!
//! Needs an SPDK build (`SPDK_DIR` or `VIREO_SPDK_DIR`); without one it says SKIPPED
//! and exits 0. It builds `vireo` in release mode first (`cargo build --release -p vireo`).

use vireo_bench::{
    abba, parse_args, run_probed, vireo_binary, vireo_iops, vireo_perf, Abba, Common, Probe,
};
use vireo_peers::spdk::{self, SpdkBuild, SpdkVhost};

fn main() {
    let mut c = Common {
        secs: 3.0,
        rounds: 3,
        qds: vec![1, 32, 128],
    };
    let mut devs = vec!["blk".to_string(), "scsi".to_string()];
    // vireo's queue size (default: vireo's own default, 128, which every tested target
    // accepts; SPDK's initiator defaults to 512).
    let mut vq_size: Option<u16> = None;
    let (mut target_stats, mut target_profile) = (false, false);
    let mut phase_split: Option<f64> = None;
    parse_args(&mut c, |flag, value| {
        match flag {
            "--dev" => devs = value(),
            "--vq-size" => vq_size = Some(value()[0].parse().expect("--vq-size N")),
            "--target-stats" => target_stats = true,
            "--target-profile" => (target_stats, target_profile) = (true, true),
            "--phase-split" => phase_split = Some(value()[0].parse().expect("--phase-split IOPS")),
            _ => return false,
        }
        true
    });
    let Common { secs, rounds, qds } = c;
    let build = match SpdkBuild::from_env() {
        Ok(b) => b,
        Err(why) => {
            spdk::skipped("bench vs_spdk", &why);
            return;
        }
    };
    let vireo = vireo_binary();
    let target = SpdkVhost::start(&build, 0).expect("SPDK vhost");
    println!(
        "4 KiB randread on SPDK v25.09 vhost (Null bdev, target on CPU 0), one queue, initiator on CPU 1, {secs} s x {rounds} rounds each, ABBA; median of the per-round ratios, medians, bests; vireo queue size {}, SPDK's 512",
        vq_size.map_or("128 (default)".to_string(), |n| n.to_string())
    );
    Abba::header();
    for dev in &devs {
        let sock = target.socket(&format!("{dev}.null"));
        let vconf = target.dir().join(format!("vireo-{dev}.json"));
        let mut conf: serde_json::Value =
            serde_json::from_str(&spdk::attach_config("V", &sock, dev, None)).unwrap();
        if let Some(n) = vq_size {
            conf["subsystems"][0]["config"][0]["params"]["vq_size"] = n.into();
        }
        std::fs::write(&vconf, conf.to_string()).unwrap();
        // SPDK's virtio-blk initiator wants a second queue in its config.
        let bconf = target.dir().join(format!("bdevperf-{dev}.json"));
        let vq = if dev == "blk" { 2 } else { 1 };
        std::fs::write(&bconf, spdk::attach_config("VirtioX", &sock, dev, Some(vq))).unwrap();
        let rpc_sock = target.dir().join("spdk.rpc");
        let bdev = spdk::CONTROLLERS
            .iter()
            .find(|c| c.0 == format!("{dev}.null"))
            .map(|c| c.2)
            .expect("a Null controller");
        let ctrl = format!("{dev}.null");
        let probe = Probe {
            sock: &rpc_sock,
            ctrl: &ctrl,
            bdev,
            profile_core: target_profile.then_some(target.core()),
        };
        let probe = target_stats.then_some(&probe);
        for &qd in &qds {
            let a = abba(rounds, qd, secs, |is_vireo, args| {
                if is_vireo {
                    let c = vireo_perf(&vireo, &vconf, args);
                    run_probed(c, secs, vireo_iops, probe)
                } else {
                    let mut c = build.bdevperf_on(1);
                    c.arg("--json").arg(&bconf).args(args);
                    run_probed(c, secs, spdk::bdevperf_total_iops, probe)
                }
            });
            a.print(dev, qd, &ctrl);
            if let Some(iops) = phase_split {
                a.print_phases(dev, qd, iops);
            }
        }
    }
}
