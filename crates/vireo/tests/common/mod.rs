//! Test helpers: real peers started on temporary sockets and always cleaned up.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_bdev::{AttachParams, Bdev, DevType, Registry, TrType};
use vireo_virtio::{DmaConfig, DmaMemory};

/// Backing of a qemu-storage-daemon export.
pub enum Backend {
    /// null-co of this many bytes (reads zeroes).
    Null(u64),
    /// null-co that leaves read buffers untouched (stores and returns nothing).
    NullNoData(u64),
    /// A raw file (page cache, so the test can look at it).
    File(PathBuf),
}

/// Options of a qemu-storage-daemon vhost-user-blk export.
pub struct QsdOpts {
    pub backend: Backend,
    pub queues: u16,
    pub lbs: u32,
    pub read_only: bool,
}

impl Default for QsdOpts {
    fn default() -> Self {
        QsdOpts {
            backend: Backend::Null(1 << 30),
            queues: 1,
            lbs: 512,
            read_only: false,
        }
    }
}

/// A running qemu-storage-daemon; killed on drop.
pub struct Qsd {
    child: Option<Child>,
    pub sock: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Qsd {
    pub fn start(o: QsdOpts) -> Qsd {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("vhost.sock");
        let ro = if o.read_only { "on" } else { "off" };
        let blockdev = match &o.backend {
            Backend::Null(size) => {
                format!("driver=null-co,node-name=disk0,size={size},read-zeroes=on")
            }
            Backend::NullNoData(size) => {
                format!("driver=null-co,node-name=disk0,size={size},read-zeroes=off")
            }
            Backend::File(p) => format!(
                "driver=file,node-name=disk0,filename={},cache.direct=off,aio=threads,discard=unmap,read-only={ro}",
                p.display()
            ),
        };
        let export = format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable={},num-queues={},logical-block-size={}",
            sock.display(),
            if o.read_only { "off" } else { "on" },
            o.queues,
            o.lbs
        );
        let log = std::fs::File::create(dir.path().join("qsd.log")).expect("log");
        let child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &blockdev, "--export", &export])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("qemu-storage-daemon must be installed (apt-get install qemu-utils)");
        let q = Qsd {
            child: Some(child),
            sock,
            dir,
        };
        q.wait_for_socket();
        q
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.sock).is_ok() {
                // qsd serves one front-end at a time per export and takes the next
                // after this probe disconnects.
                std::thread::sleep(Duration::from_millis(20));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "qemu-storage-daemon did not listen on {}: {}",
            self.sock.display(),
            std::fs::read_to_string(self.dir.path().join("qsd.log")).unwrap_or_default()
        );
    }

    /// Kill the daemon now (a target that goes away mid-run).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A file of `size` bytes in a fresh temporary directory.
pub fn image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).expect("image");
    f.set_len(size).expect("size image");
    p
}

/// A registry on the default DMA memory (a 4 MiB first region, as `vireo` has): the tests
/// grow it with every peer.
pub fn registry() -> Registry {
    Registry::new(DmaMemory::new(DmaConfig::default()).expect("DMA memory"))
}

pub fn blk_params(name: &str, sock: &Path, vq_count: u16) -> AttachParams {
    AttachParams {
        wwpn: None,
        name: name.into(),
        trtype: TrType::User,
        traddr: sock.display().to_string(),
        dev_type: DevType::Blk,
        vq_count,
        vq_size: 256,
        io_timeout: None,
        reconnect_timeout: None,
        packed_ring: Default::default(),
    }
}

pub fn attach_blk(reg: &Registry, sock: &Path, vq_count: u16) -> Arc<Bdev> {
    let mut b = reg
        .attach(&blk_params("VirtioBlk0", sock, vq_count))
        .expect("attach");
    assert_eq!(b.len(), 1);
    b.pop().unwrap()
}

/// Run `f` on a thread and fail the test if it does not finish in time.
pub fn within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s (hang)"))
}

/// Where `cargo install vhost-device-scsi` puts the binary, or `None` when it is missing.
pub fn vds_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("VHOST_DEVICE_SCSI") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let candidates = [
        PathBuf::from(format!("{home}/.cargo/bin/vhost-device-scsi")),
        PathBuf::from("/usr/local/bin/vhost-device-scsi"),
        PathBuf::from("/usr/bin/vhost-device-scsi"),
    ];
    candidates.into_iter().find(|p| p.exists())
}

/// A running vhost-device-scsi (one LUN of target 0 per image; serves one connection).
pub struct Vds {
    child: Option<Child>,
    pub sock: PathBuf,
    pub dir: tempfile::TempDir,
    pub images: Vec<PathBuf>,
}

impl Vds {
    /// Start it on `n` fresh images of `size` bytes. Panics with an install hint when the
    /// binary is missing (CI installs it; see .ci/run).
    pub fn start(n: usize, size: u64) -> Vds {
        let bin = vds_binary()
            .expect("vhost-device-scsi is not installed: cargo install vhost-device-scsi --locked");
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("scsi.sock");
        let images: Vec<PathBuf> = (0..n)
            .map(|i| {
                let p = dir.path().join(format!("lun{i}.img"));
                std::fs::File::create(&p).unwrap().set_len(size).unwrap();
                p
            })
            .collect();
        let log = std::fs::File::create(dir.path().join("vds.log")).expect("log");
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(&sock)
            .args(&images)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start vhost-device-scsi");
        // It serves a single connection: wait for the socket file, do not probe it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "vhost-device-scsi did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        Vds {
            child: Some(child),
            sock,
            dir,
            images,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vds.log")).unwrap_or_default()
    }
}

impl Drop for Vds {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn scsi_params(name: &str, sock: &Path, vq_count: u16, vq_size: u16) -> AttachParams {
    AttachParams {
        wwpn: None,
        name: name.into(),
        trtype: TrType::User,
        traddr: sock.display().to_string(),
        dev_type: DevType::Scsi,
        vq_count,
        vq_size,
        io_timeout: None,
        reconnect_timeout: None,
        packed_ring: Default::default(),
    }
}

/// Write an SPDK JSON config that attaches `controllers`; returns its path.
pub fn write_config(dir: &Path, file: &str, controllers: &[AttachParams]) -> PathBuf {
    let calls: Vec<serde_json::Value> = controllers
        .iter()
        .map(|p| serde_json::json!({"method": "bdev_virtio_attach_controller", "params": serde_json::to_value(p).unwrap()}))
        .collect();
    let doc = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": calls}]});
    let path = dir.join(file);
    std::fs::write(&path, doc.to_string()).expect("write config");
    path
}

/// The `vireo` binary under test.
pub fn vireo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vireo"))
}

/// `vireo perf` random writes (4 KiB, QD32, `secs` seconds, on `bdev` if given) on
/// `conf` while `restart` restarts the target 2 s in: the run must end successfully
/// with no failed I/O (a pause, not an outage). The report and what perf logged.
pub fn perf_through_a_restart(
    conf: &Path,
    bdev: Option<&str>,
    secs: u32,
    restart: impl FnOnce(),
) -> (serde_json::Value, String) {
    let mut cmd = vireo();
    cmd.args(["perf", "--json", "-m", "1"]);
    if let Some(b) = bdev {
        cmd.args(["-b", b]);
    }
    let child = cmd
        .arg("-c")
        .arg(conf)
        .args([
            "-w",
            "randwrite",
            "-o",
            "4096",
            "-q",
            "32",
            "-t",
            &secs.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    restart();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("perf JSON: {e}\n{err}"));
    assert!(out.status.success(), "{}: {j}\n{err}", conf.display());
    assert_eq!(j["total"]["errors"], 0, "{}: {j}\n{err}", conf.display());
    assert!(
        j["total"]["ios"].as_u64().unwrap() > 0,
        "{}: {j}",
        conf.display()
    );
    (j, err)
}

/// Run `vireo perf -c CONF ARGS... --json`, require success, return the report.
pub fn perf_json(conf: &Path, args: &[&str]) -> serde_json::Value {
    perf_report(conf, args, true)
}

/// `vireo perf -c CONF ARGS... --json` that is expected to fail: its report.
pub fn failing_perf_json(conf: &Path, args: &[&str]) -> serde_json::Value {
    perf_report(conf, args, false)
}

fn perf_report(conf: &Path, args: &[&str], succeed: bool) -> serde_json::Value {
    let out = vireo()
        .args(["perf", "-c"])
        .arg(conf)
        .args(args)
        .arg("--json")
        .output()
        .expect("run vireo perf");
    assert_eq!(
        out.status.success(),
        succeed,
        "vireo perf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("perf --json output")
}

/// `vireo ARGS` in the background, stdout and stderr captured.
pub fn spawn_vireo(args: &[&str]) -> std::process::Child {
    vireo()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vireo")
}

/// Wait until something listens on the unix socket `path` (at most 10 s).
pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
}

/// Assert that a command failed and said `what` on stderr.
pub fn assert_fails_with(out: &std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure saying {what:?}");
    assert!(err.contains(what), "expected {what:?} in: {err}");
}

/// Run `cmd`, assert it succeeded (showing its stderr if not) and parse its stdout as
/// JSON.
pub fn json_output(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}
pub mod guest;
