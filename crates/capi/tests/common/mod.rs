//! Helpers of the C-side tests: the built library installed into a prefix (by
//! scripts/install-libblkio.sh), C programs compiled against it, and the peers they run
//! against, each started on a temporary socket and killed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long one C program or fio run may take before the test calls it hung (a guard
/// against hangs, not a performance bound: debug builds on a loaded 2-core machine).
pub const HANG: Duration = Duration::from_secs(600);

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// target/<profile>, the directory of this test binary's deps/.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// The library `cargo build -p vireo-capi` left next to this test binary.
pub fn built_library() -> PathBuf {
    let so = profile_dir().join("libblkio.so");
    assert!(
        so.exists() && profile_dir().join("libblkio.a").exists(),
        "{} (and libblkio.a) is missing: run `cargo build -p vireo-capi` first \
         (scripts/test.sh does)",
        so.display()
    );
    so
}

/// The vireo binary of the same build.
pub fn vireo_binary() -> PathBuf {
    let bin = profile_dir().join("vireo");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p vireo` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The library installed into `target/<profile>/capi-c/<name>/prefix` by
/// scripts/install-libblkio.sh (--no-build: it installs what is built), once per test
/// binary.
pub struct Prefix {
    pub prefix: PathBuf,
    /// Where compiled programs go.
    pub bin: PathBuf,
}

impl Prefix {
    pub fn lib(&self) -> PathBuf {
        self.prefix.join("lib")
    }

    pub fn pkg_config_path(&self) -> PathBuf {
        self.lib().join("pkgconfig")
    }

    /// `pkg-config ARGS blkio` against this prefix, split into words.
    pub fn pkg_config(&self, args: &[&str]) -> Vec<String> {
        let out = Command::new("pkg-config")
            .args(args)
            .arg("blkio")
            .env("PKG_CONFIG_PATH", self.pkg_config_path())
            .output()
            .expect("pkg-config must be installed (apt-get install pkg-config)");
        assert!(
            out.status.success(),
            "pkg-config {args:?} blkio: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect()
    }

    /// A command that runs `program` with this prefix's library on the loader's path.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("LD_LIBRARY_PATH", self.lib());
        c
    }
}

/// Run scripts/install-libblkio.sh into `prefix` without building; its output.
pub fn run_install_script(prefix: &Path) -> String {
    built_library();
    let profile = profile_dir();
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts/install-libblkio.sh"))
        .arg(prefix)
        .arg("--no-build")
        .env("CARGO_TARGET_DIR", profile.parent().unwrap());
    if profile.file_name().and_then(|n| n.to_str()) != Some("release") {
        cmd.arg("--debug");
    }
    let out = cmd.output().expect("run scripts/install-libblkio.sh");
    assert!(
        out.status.success(),
        "install-libblkio.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The prefix of this test binary (`name` tells the binaries apart), installed once.
pub fn installed(name: &str) -> &'static Prefix {
    static P: OnceLock<Prefix> = OnceLock::new();
    P.get_or_init(|| {
        let base = profile_dir().join("capi-c").join(name);
        let prefix = base.join("prefix");
        let bin = base.join("bin");
        std::fs::create_dir_all(&bin).expect("create the programs' directory");
        run_install_script(&prefix);
        Prefix { prefix, bin }
    })
}

/// `cc -Wall -Wextra -Werror EXTRA... SRC $(pkg-config --cflags --libs blkio) -o OUT`.
pub fn compile(p: &Prefix, src: &Path, out: &Path, extra: &[&str]) {
    let mut cmd = Command::new("cc");
    cmd.args(["-Wall", "-Wextra", "-Werror"])
        .args(extra)
        .arg(src)
        .args(p.pkg_config(&["--cflags"]))
        .arg("-o")
        .arg(out);
    if !extra.contains(&"-c") {
        cmd.args(p.pkg_config(&["--libs"]));
    }
    let res = cmd.output().expect("cc must be installed");
    assert!(
        res.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// The C sources of the tests.
pub fn c_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(name)
}

/// blkio_test, compiled once per test binary.
pub fn blkio_test(p: &'static Prefix) -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let out = p.bin.join("blkio_test");
        compile(p, &c_source("blkio_test.c"), &out, &[]);
        out
    })
}

/// What a finished program did.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn text(&self) -> String {
        format!(
            "exit status {}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Run `cmd` to completion with its output in files under `dir`; kill it and fail the
/// test when it outlives [`HANG`].
pub fn run(cmd: &mut Command, dir: &Path, what: &str) -> Ran {
    run_within(cmd, dir, what, HANG).unwrap_or_else(|e| panic!("{e}"))
}

/// Run `cmd` in a process group of its own with its output in files under `dir`; when it
/// outlives `limit`, kill the group (a forked child too: fio's jobs) and say so in `Err`.
pub fn run_within(
    cmd: &mut Command,
    dir: &Path,
    what: &str,
    limit: Duration,
) -> Result<Ran, String> {
    use std::os::unix::process::CommandExt;
    let out_path = dir.join(format!("{what}.stdout"));
    let err_path = dir.join(format!("{what}.stderr"));
    let out = std::fs::File::create(&out_path).expect("stdout file");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("start {what} ({cmd:?}): {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let pgid = child.id() as libc::pid_t;
            // fio's job processes call setsid(): find them by parentage, not by group.
            for pid in descendants(child.id()) {
                // SAFETY: kill(2) on a pid this test's child started; touches no memory.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            // SAFETY: kill(2) with a negative pid signals the process group the child leads
            // (process_group(0) above); it touches no memory.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            return Err(format!(
                "{what} did not finish within {} s (hang), killed:\n--- stdout\n{}--- stderr\n{}",
                limit.as_secs(),
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Ran {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    })
}

/// Every live descendant of `root` (from /proc's parent links), children first.
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| {
                let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                let after = &stat[stat.rfind(')')? + 1..];
                let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
                Some((pid, ppid))
            })
            .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// Print a loud notice that `what` was skipped, and why.
pub fn skipped(what: &str, why: &str) {
    eprintln!(
        "\n********************************************************************\n\
         SKIPPED: {what}\n  {why}\n\
         ********************************************************************\n"
    );
}

/// Wait until something accepts on the unix socket `path` (at most 10 s). The peers
/// here take the next front-end once the probe disconnects.
fn wait_for_socket(path: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!(
                "the peer exited ({s}) before listening on {}: {}",
                path.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {}: {}",
            path.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
}

/// A peer process on a socket in its own temporary directory; killed on drop.
pub struct Peer {
    child: Option<Child>,
    pub sock: PathBuf,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

impl Peer {
    fn spawn(mut cmd: Command, dir: tempfile::TempDir, sock: PathBuf, probe: bool) -> Peer {
        let log = dir.path().join("peer.log");
        let f = std::fs::File::create(&log).expect("log");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        if probe {
            wait_for_socket(&sock, &mut child, &log);
        } else {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !sock.exists() {
                assert!(
                    Instant::now() < deadline,
                    "no socket {}: {}",
                    sock.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Peer {
            child: Some(child),
            sock,
            dir,
            log,
        }
    }

    /// What the peer logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// qemu-storage-daemon exporting a raw file of `size` bytes as vhost-user-blk with
    /// `queues` queues and 512-byte blocks.
    pub fn qsd(size: u64, queues: u16) -> Peer {
        let dir = tempfile::tempdir().expect("temp dir");
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(size))
            .expect("image");
        let sock = dir.path().join("vhost.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk0,filename={},cache.direct=off,aio=threads,discard=unmap",
                img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},\
                 writable=on,num-queues={queues},logical-block-size=512",
                sock.display()
            ));
        Peer::spawn(cmd, dir, sock, true)
    }

    /// `vireo target ARGS -s SOCK` (RAM-backed).
    pub fn vireo_target(args: &[&str]) -> Peer {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("vt.sock");
        let mut cmd = Command::new(vireo_binary());
        cmd.arg("target").args(args).arg("-s").arg(&sock);
        Peer::spawn(cmd, dir, sock, true)
    }

    /// vhost-device-scsi on `n` fresh images of `size` bytes (target 0, LUN i), or `None`
    /// when it is not installed.
    pub fn vhost_device_scsi(n: usize, size: u64) -> Option<Peer> {
        let bin = vds_binary()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("scsi.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("--socket-path").arg(&sock).env("RUST_LOG", "warn");
        for i in 0..n {
            let p = dir.path().join(format!("lun{i}.img"));
            std::fs::File::create(&p)
                .and_then(|f| f.set_len(size))
                .expect("image");
            cmd.arg(p);
        }
        // Each connection it serves is its last one: wait for the file, do not probe.
        Some(Peer::spawn(cmd, dir, sock, false))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// vhost-device-scsi: $VHOST_DEVICE_SCSI, on PATH, or where `cargo install` puts it.
pub fn vds_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("VHOST_DEVICE_SCSI") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("vhost-device-scsi"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(PathBuf::from(format!(
        "{home}/.cargo/bin/vhost-device-scsi"
    )));
    candidates.into_iter().find(|p| p.is_file())
}
