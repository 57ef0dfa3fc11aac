//! vireo's NBD export vs qemu-storage-daemon's own, with fio's nbd engine (libnbd) as
//! the client: 4 KiB random reads.
//!
//! `cargo bench -p vireo-bench --bench nbd_vs_qsd -- [--seconds S] [--rounds R]
//!  [--part qd|conns|all] [--vireo PATH] [-- EXTRA vireo serve FLAGS...]`
//!
//! - `qd`: one qemu-storage-daemon with a null-co node exported twice, as
//!   vhost-user-blk (for `vireo serve --nbd`, one queue) and as its own NBD export; fio
//!   at QD 1 and 32 against each, alternating (the order swaps every round), reported
//!   as medians and the median of the pairs' ratios.
//! - `conns`: 1, 2 and 4 connections (fio numjobs, QD 16 each) through `vireo serve
//!   --nbd` on a controller with 4 queues, against `vireo target` (RAM) and against
//!   qemu-storage-daemon (null-co, num-queues=4).
//!
//! Needs `fio` with its nbd engine (Debian's fio) and qemu-storage-daemon; the vireo
//! binary is `target/release/vireo` (build it first: `cargo build --release -p vireo`)
//! unless `--vireo` names another. Do not run it next to a build: it measures CPUs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vireo_bench::median;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; SIGTERM lets vireo remove its sockets.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Proc {
    let f = std::fs::File::create(log).expect("log");
    Proc(
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
    )
}

/// qemu-storage-daemon: a null-co node as vhost-user-blk (`queues`) and, with
/// `nbd`, as its own NBD export named `n`.
fn qsd(dir: &Path, queues: u16, nbd: Option<&Path>) -> (Proc, PathBuf) {
    let vhost = dir.join("vhost.sock");
    let mut c = Command::new("qemu-storage-daemon");
    c.args(["--blockdev", "driver=null-co,node-name=n,size=1073741824"]);
    c.args([
        "--export",
        &format!(
            "type=vhost-user-blk,id=v,node-name=n,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            vhost.display()
        ),
    ]);
    if let Some(p) = nbd {
        c.args([
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", p.display()),
        ]);
        c.args(["--export", "type=nbd,id=e,node-name=n,name=n,writable=on"]);
    }
    let p = spawn(&mut c, &dir.join("qsd.log"));
    wait_socket(&vhost);
    std::thread::sleep(Duration::from_millis(50));
    (p, vhost)
}

/// `vireo serve` of one blk controller on `vhost` with `queues`, NBD on `nbd`.
fn serve(
    vireo: &Path,
    dir: &Path,
    vhost: &Path,
    queues: u16,
    nbd: &Path,
    extra: &[String],
) -> Proc {
    let conf = dir.join("serve.json");
    let doc = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [{
        "method": "bdev_virtio_attach_controller",
        "params": {"name": "VirtioBlk0", "trtype": "user", "traddr": vhost.display().to_string(),
                   "dev_type": "blk", "vq_count": queues}}]}]});
    std::fs::write(&conf, doc.to_string()).expect("config");
    let rpc = dir.join("rpc.sock");
    let p = spawn(
        Command::new(vireo)
            .args(["serve", "-c"])
            .arg(&conf)
            .arg("-r")
            .arg(&rpc)
            .arg("--nbd")
            .arg(format!("unix:{}", nbd.display()))
            .args(extra),
        &dir.join("serve.log"),
    );
    wait_socket(nbd);
    p
}

/// fio's nbd engine, 4 KiB random reads: total IOPS.
fn fio(uri: &str, qd: usize, jobs: usize, secs: u64) -> f64 {
    let out = Command::new("fio")
        .args([
            "--name=nbd",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            "--bs=4k",
            &format!("--iodepth={qd}"),
            &format!("--numjobs={jobs}"),
            "--group_reporting",
            "--time_based",
            &format!("--runtime={secs}"),
            "--output-format=json",
        ])
        .output()
        .expect("fio must be installed (apt-get install fio)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // fio's nbd engine prints a line before the JSON.
    let json = &text[text.find('{').expect("fio JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio JSON");
    v["jobs"][0]["read"]["iops"].as_f64().expect("iops")
}

/// CPU seconds process `pid` used so far (user + system).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field.
    let rest = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    f.iter().sum::<u64>() as f64 / hz
}

/// CPU seconds the reaped children of this process used so far (user + system): fio's,
/// once a run has ended.
fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// fio run while measuring the CPU time of `pids`: (IOPS, CPU µs per I/O of all of
/// them).
fn fio_cpu(uri: &str, qd: usize, jobs: usize, secs: u64, pids: &[u32]) -> (f64, f64) {
    let before: f64 = pids.iter().map(|&p| cpu_secs(p)).sum();
    let iops = fio(uri, qd, jobs, secs);
    let after: f64 = pids.iter().map(|&p| cpu_secs(p)).sum();
    (iops, (after - before) * 1e6 / (iops * secs as f64).max(1.0))
}

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn part_qd(vireo: &Path, secs: u64, rounds: usize, extra: &[String]) {
    let dir = tempfile::tempdir().expect("dir");
    let qnbd = dir.path().join("qsd-nbd.sock");
    let vnbd = dir.path().join("vireo-nbd.sock");
    let (q, vhost) = qsd(dir.path(), 1, Some(&qnbd));
    let s = serve(vireo, dir.path(), &vhost, 1, &vnbd, extra);
    let (qpid, vpid) = (q.0.id(), s.0.id());
    let (vu, qu) = (uri(&vnbd, "VirtioBlk0"), uri(&qnbd, "n"));
    println!("| QD | vireo serve --nbd (IOPS) | qemu-storage-daemon NBD (IOPS) | ratio (pair median) | CPU µs/IO: vireo + qsd behind it | CPU µs/IO: qsd's NBD |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for qd in [1usize, 32] {
        // Warm-up (connections, DMA memory).
        fio(&vu, qd, 1, 1);
        fio(&qu, qd, 1, 1);
        let (mut a, mut b, mut r, mut ca, mut cb) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..rounds {
            let run_v = || fio_cpu(&vu, qd, 1, secs, &[vpid, qpid]);
            let run_q = || fio_cpu(&qu, qd, 1, secs, &[qpid]);
            let (x, y) = if i % 2 == 0 {
                let x = run_v();
                (x, run_q())
            } else {
                let y = run_q();
                (run_v(), y)
            };
            eprintln!(
                "QD{qd} round {i}: vireo {:.0} ({:.1} us CPU/IO) qsd {:.0} ({:.1} us) ({:.2}x)",
                x.0,
                x.1,
                y.0,
                y.1,
                x.0 / y.0
            );
            a.push(x.0);
            b.push(y.0);
            r.push(x.0 / y.0);
            ca.push(x.1);
            cb.push(y.1);
        }
        println!(
            "| {qd} | {:.0} | {:.0} | {:.2}x | {:.1} | {:.1} |",
            median(&mut a),
            median(&mut b),
            median(&mut r),
            median(&mut ca),
            median(&mut cb)
        );
    }
}

fn part_conns(vireo: &Path, secs: u64, rounds: usize, extra: &[String]) {
    println!("| back-end (4 queues) | 1 conn (IOPS) | 2 conns | 4 conns | 2 / 1 | 4 / 1 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for backend in ["vireo target (RAM)", "qemu-storage-daemon (null-co)"] {
        let dir = tempfile::tempdir().expect("dir");
        let vnbd = dir.path().join("vireo-nbd.sock");
        let (_b, vhost) = if backend.starts_with("vireo") {
            let vhost = dir.path().join("target.sock");
            let p = spawn(
                Command::new(vireo)
                    .args(["target", "--type", "blk", "--queues", "4", "-s"])
                    .arg(&vhost),
                &dir.path().join("target.log"),
            );
            wait_socket(&vhost);
            std::thread::sleep(Duration::from_millis(50));
            (p, vhost)
        } else {
            qsd(dir.path(), 4, None)
        };
        let _s = serve(vireo, dir.path(), &vhost, 4, &vnbd, extra);
        let u = uri(&vnbd, "VirtioBlk0");
        fio(&u, 16, 1, 1);
        let (serve_pid, backend_pid) = (_s.0.id(), _b.0.id());
        let mut res = Vec::new();
        for jobs in [1usize, 2, 4] {
            let mut v = Vec::new();
            for _ in 0..rounds {
                // CPU seconds of fio, vireo serve and the back-end over the run: on a
                // machine with few CPUs, what a second connection could run on.
                let before = [
                    children_cpu_secs(),
                    cpu_secs(serve_pid),
                    cpu_secs(backend_pid),
                ];
                let iops = fio(&u, 16, jobs, secs);
                let after = [
                    children_cpu_secs(),
                    cpu_secs(serve_pid),
                    cpu_secs(backend_pid),
                ];
                eprintln!(
                    "{backend}: {jobs} conns: {iops:.0} IOPS; CPU s over {secs} s: fio {:.2}, vireo serve {:.2}, back-end {:.2}",
                    after[0] - before[0],
                    after[1] - before[1],
                    after[2] - before[2]
                );
                v.push(iops);
            }
            res.push(median(&mut v));
        }
        println!(
            "| {backend} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x |",
            res[0],
            res[1],
            res[2],
            res[1] / res[0],
            res[2] / res[0]
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut secs = 5u64;
    let mut rounds = 5usize;
    let mut part = "all".to_string();
    let mut vireo = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/release/vireo"
    ));
    let mut extra = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                secs = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--rounds N")
            }
            "--part" => part = args.next().expect("--part qd|conns|all"),
            "--vireo" => vireo = args.next().expect("--vireo PATH").into(),
            "--bench" => {}
            // (cargo bench appends --bench to the arguments: not a vireo serve flag)
            "--" => extra.extend(args.by_ref().filter(|a| a != "--bench")),
            x => panic!("unknown argument {x}"),
        }
    }
    if Command::new("fio").arg("--version").output().is_err() {
        eprintln!("SKIPPED: fio is not installed (apt-get install fio)");
        return;
    }
    assert!(
        vireo.exists(),
        "{} is missing: cargo build --release -p vireo",
        vireo.display()
    );
    if part == "qd" || part == "all" {
        part_qd(&vireo, secs, rounds, &extra);
    }
    if part == "conns" || part == "all" {
        part_conns(&vireo, secs, rounds, &extra);
    }
}
