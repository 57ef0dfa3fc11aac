//! Packed vs split virtqueues on one SPDK vhost-blk controller that offers both
//! (`blk.null.packed`: a Null bdev, `vhost_create_blk_controller -p`), with SPDK's own
//! initiator (bdevperf, split rings only) as the third contender.
//!
//! SPDK v25.09's vhost target runs on CPU 0; `vireo perf` with `packed_ring` on,
//! `vireo perf` with `packed_ring` off and bdevperf take turns on CPU 1 (the order
//! rotates each round: ABC, BCA, CAB), 4 KiB random reads, one queue each. Per QD the
//! bench prints the median of the per-round ratios packed/split, packed/SPDK and
//! split/SPDK (the three runs of a round are back to back, so their ratios are the
//! least exposed to the machine's slow phases), the median IOPS of each, and every run
//! in order (stderr).
//!
//! `cargo bench -p vireo-bench --bench packed_ring -- [--seconds S] [--rounds R] [--qd 1,32,128] [--vq-size N] [--target-stats|--target-profile]`
//! (`--vq-size`: vireo's queue size for both rings, default vireo's 128; `--target-stats`
//! and `--target-profile`: what each contender made the target do, as in `vs_spdk`).
//!
//! Needs an SPDK build (`SPDK_DIR` or `VIREO_SPDK_DIR`); without one it says SKIPPED
//! and exits 0. It builds `vireo` in release mode first.

use std::time::Duration;

use vireo_bench::{
    median, parse_args, report_target, run_probed, vireo_binary, vireo_iops, vireo_perf, Common,
    Probe,
};
use vireo_peers::spdk::{self, SpdkBuild, SpdkVhost};

fn main() {
    let mut c = Common {
        secs: 3.0,
        rounds: 5,
        qds: vec![1, 32, 128],
    };
    let mut vq_size: Option<u16> = None;
    let (mut target_stats, mut target_profile) = (false, false);
    parse_args(&mut c, |flag, value| {
        match flag {
            "--vq-size" => vq_size = Some(value()[0].parse().expect("--vq-size N")),
            "--target-stats" => target_stats = true,
            "--target-profile" => (target_stats, target_profile) = (true, true),
            _ => return false,
        }
        true
    });
    let Common { secs, rounds, qds } = c;
    let build = match SpdkBuild::from_env() {
        Ok(b) => b,
        Err(why) => {
            spdk::skipped("bench packed_ring", &why);
            return;
        }
    };
    let vireo = vireo_binary();
    let target = SpdkVhost::start(&build, 0).expect("SPDK vhost");
    let sock = target.socket("blk.null.packed");
    let conf = |ring: &str| {
        let mut c: serde_json::Value =
            serde_json::from_str(&spdk::attach_config("V", &sock, "blk", None)).unwrap();
        c["subsystems"][0]["config"][0]["params"]["packed_ring"] = ring.into();
        if let Some(n) = vq_size {
            c["subsystems"][0]["config"][0]["params"]["vq_size"] = n.into();
        }
        let p = target.dir().join(format!("vireo-{ring}.json"));
        std::fs::write(&p, c.to_string()).unwrap();
        p
    };
    let (packed_conf, split_conf) = (conf("on"), conf("off"));
    // SPDK's virtio-blk initiator wants a second queue in its config.
    let bconf = target.dir().join("bdevperf.json");
    std::fs::write(
        &bconf,
        spdk::attach_config("VirtioX", &sock, "blk", Some(2)),
    )
    .unwrap();
    println!(
        "4 KiB randread on SPDK v25.09 vhost-blk blk.null.packed (Null bdev, target on CPU 0), one queue, initiator on CPU 1, {secs} s x {rounds} rounds, order rotating; medians of the per-round ratios, median IOPS; vireo queue size {}, SPDK's 512",
        vq_size.unwrap_or(128)
    );
    println!(
        "{:>4} {:>13} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "QD", "packed/split", "packed/SPDK", "split/SPDK", "packed IOPS", "split IOPS", "SPDK IOPS"
    );
    let rpc_sock = target.dir().join("spdk.rpc");
    let (ctrl, bdev) = spdk::PACKED_CONTROLLERS
        .iter()
        .find(|c| c.0 == "blk.null.packed")
        .map(|c| (c.0, c.2))
        .expect("blk.null.packed");
    let probe = Probe {
        sock: &rpc_sock,
        ctrl,
        bdev,
        profile_core: target_profile.then_some(target.core()),
    };
    for &qd in &qds {
        let mut runs: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        let mut per_io: [Vec<_>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for round in 0..rounds {
            for k in 0..3 {
                let who = (round + k) % 3;
                let q = qd.to_string();
                let t = secs.to_string();
                let a = ["-q", &q, "-o", "4096", "-w", "randread", "-t", &t];
                let probe = target_stats.then_some(&probe);
                let (r, measured) = if who < 2 {
                    let conf = if who == 0 { &packed_conf } else { &split_conf };
                    run_probed(vireo_perf(&vireo, conf, &a), secs, vireo_iops, probe)
                } else {
                    let mut c = build.bdevperf_on(1);
                    c.arg("--json").arg(&bconf).args(a);
                    run_probed(c, secs, spdk::bdevperf_total_iops, probe)
                };
                let iops = r.iops;
                runs[who].push(iops);
                per_io[who].extend(measured);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let ratio = |a: usize, b: usize| {
            let r: Vec<f64> = runs[a].iter().zip(&runs[b]).map(|(x, y)| x / y).collect();
            (median(&mut r.clone()), r)
        };
        let (ps, ps_all) = ratio(0, 1);
        let (pd, _) = ratio(0, 2);
        let (sd, _) = ratio(1, 2);
        println!(
            "{qd:>4} {ps:>13.2} {pd:>12.2} {sd:>12.2} {:>12.0} {:>12.0} {:>12.0}",
            median(&mut runs[0].clone()),
            median(&mut runs[1].clone()),
            median(&mut runs[2].clone())
        );
        eprintln!(
            "  QD{qd} runs in order: packed {:.0?}, split {:.0?}, SPDK {:.0?}; packed/split per round {:.2?}",
            runs[0], runs[1], runs[2], ps_all
        );
        for (who, t) in ["vireo packed", "vireo split", "SPDK"].iter().zip(&per_io) {
            report_target(&format!("QD{qd}"), who, ctrl, t);
        }
    }
}
