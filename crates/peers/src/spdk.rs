//! SPDK's vhost target and bdevperf, started from an existing build.
//!
//! The target busy-polls its core; an initiator must never poll on the same core (every
//! I/O would then wait for a scheduler slice). Tests pin the target to CPU 0 and the
//! initiator to CPU 1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The environment variables that point at an SPDK build, in order of preference.
pub const ENV_VARS: [&str; 2] = ["VIREO_SPDK_DIR", "SPDK_DIR"];

/// 2 MiB hugepages the target (1 GiB) and one bdevperf (512 MiB) need, with margin.
const HUGEPAGES: u64 = 1536;

/// The controllers [`SpdkVhost::start`] creates: (socket name, type, backing bdev).
pub const CONTROLLERS: [(&str, &str, &str); 4] = [
    ("blk.null", "blk", "Null1"),
    ("scsi.null", "scsi", "Null0"),
    ("blk.mal", "blk", "Malloc1"),
    ("scsi.mal", "scsi", "Malloc0"),
];

/// The controllers [`SpdkVhost::start`] creates with packed virtqueues offered
/// (`vhost_create_blk_controller -p`; split-ring drivers still work on them): (socket
/// name, type, backing bdev).
pub const PACKED_CONTROLLERS: [(&str, &str, &str); 2] = [
    ("blk.null.packed", "blk", "Null2"),
    ("blk.mal.packed", "blk", "Malloc2"),
];

/// An SPDK build: `build/bin/vhost`, `build/examples/bdevperf`, `scripts/rpc.py`.
#[derive(Debug, Clone)]
pub struct SpdkBuild {
    dir: PathBuf,
}

impl SpdkBuild {
    /// The build named by `VIREO_SPDK_DIR` or `SPDK_DIR`; `Err` says why there is none.
    pub fn from_env() -> Result<SpdkBuild, String> {
        let Some((var, dir)) = ENV_VARS
            .iter()
            .find_map(|v| std::env::var_os(v).map(|d| (*v, PathBuf::from(d))))
        else {
            return Err(format!(
                "no SPDK build: set {} to an SPDK v25.09 tree built with vhost and virtio",
                ENV_VARS.join(" or ")
            ));
        };
        let b = SpdkBuild { dir };
        for p in [b.vhost(), b.bdevperf(), b.rpc_py()] {
            if !p.exists() {
                return Err(format!(
                    "{var}={}: {} is missing",
                    b.dir.display(),
                    p.display()
                ));
            }
        }
        Ok(b)
    }

    /// The vhost target binary.
    pub fn vhost(&self) -> PathBuf {
        self.dir.join("build/bin/vhost")
    }

    /// The bdevperf binary.
    pub fn bdevperf(&self) -> PathBuf {
        self.dir.join("build/examples/bdevperf")
    }

    /// SPDK's JSON-RPC client.
    pub fn rpc_py(&self) -> PathBuf {
        self.dir.join("scripts/rpc.py")
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        let lib = self.dir.join("build/lib");
        let ld = match std::env::var_os("LD_LIBRARY_PATH") {
            Some(old) => {
                let mut v = lib.into_os_string();
                v.push(":");
                v.push(old);
                v
            }
            None => lib.into_os_string(),
        };
        c.env("LD_LIBRARY_PATH", ld);
        c
    }

    /// `bdevperf` pinned to `core` (`-m`), with 512 MiB of hugepage memory in one file
    /// (`-s 512 -g`, so SPDK's memory fits a vhost-user memory table) and no PCI
    /// (`-u`); add the workload arguments.
    pub fn bdevperf_on(&self, core: usize) -> Command {
        let mut c = self.command(&self.bdevperf());
        c.args([
            "-m",
            &format!("{:#x}", 1u64 << core),
            "-s",
            "512",
            "-u",
            "-g",
        ]);
        c
    }
}

/// Print a loud notice that `what` was skipped and why.
pub fn skipped(what: &str, why: &str) {
    eprintln!(
        "\n********************************************************************\n\
         SKIPPED: {what}\n  {why}\n\
         ********************************************************************\n"
    );
}

/// A target for the test named `test`: the build `build` found (else a loud skip
/// notice and `None`), two CPUs (target and initiator; else a skip), the
/// [`exclusive`] lock, then `start(build)`, which must succeed.
pub fn start_for_test<B, T>(
    test: &str,
    build: Result<B, String>,
    start: impl FnOnce(&B) -> Result<T, String>,
) -> Option<(T, MutexGuard<'static, ()>)> {
    let build = match build {
        Ok(b) => b,
        Err(why) => {
            skipped(test, &why);
            return None;
        }
    };
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        skipped(test, "needs 2 CPUs (target and initiator)");
        return None;
    }
    let guard = exclusive();
    let t = start(&build).unwrap_or_else(|e| panic!("{test}: cannot start the SPDK target: {e}"));
    Some((t, guard))
}

/// One SPDK peer at a time per process: each wants the same core and hugepages.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reserve 2 MiB hugepages and mount hugetlbfs where DPDK looks (needs root).
pub fn ensure_hugepages() -> Result<(), String> {
    let nr = "/proc/sys/vm/nr_hugepages";
    let have: u64 = std::fs::read_to_string(nr)
        .map_err(|e| format!("{nr}: {e}"))?
        .trim()
        .parse()
        .unwrap_or(0);
    if have < HUGEPAGES {
        std::fs::write(nr, HUGEPAGES.to_string())
            .map_err(|e| format!("cannot reserve {HUGEPAGES} hugepages in {nr}: {e}"))?;
    }
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"));
    if !mounted {
        std::fs::create_dir_all("/dev/hugepages").map_err(|e| e.to_string())?;
        let ok = Command::new("mount")
            .args(["-t", "hugetlbfs", "none", "/dev/hugepages"])
            .status()
            .map_err(|e| e.to_string())?
            .success();
        if !ok {
            return Err("cannot mount hugetlbfs on /dev/hugepages".into());
        }
    }
    Ok(())
}

/// Make the child die with the thread that started it: a test killed by a timeout
/// must not leave a target polling a core (and holding its core lock) behind.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl,
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running SPDK application in a directory of its own (sockets, `spdk.rpc`, its log):
/// what the vhost and the vfio-user targets share. Killed on drop.
struct Process {
    child: Child,
    dir: tempfile::TempDir,
    /// The log's file name in `dir`.
    log: &'static str,
}

impl Process {
    /// Start `cmd` with its output appended to `dir`/`log`.
    fn spawn(mut cmd: Command, dir: &Path, log: &str) -> Result<Child, String> {
        let what = cmd.get_program().to_string_lossy().into_owned();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(log))
            .map_err(|e| e.to_string())?;
        die_with_parent(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().map_err(|e| e.to_string())?)
            .stderr(f)
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))
    }

    /// Stop the application and remove its sockets `names` and its RPC socket, for a
    /// restart in the same directory.
    fn stop(&mut self, names: impl IntoIterator<Item = &'static str>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in names.into_iter().chain(["spdk.rpc", "spdk.rpc.lock"]) {
            let _ = std::fs::remove_file(self.dir.path().join(f));
        }
    }

    /// Wait (at most 30 s) for the RPC socket, then make the first call `first` until
    /// the server takes it (the socket exists before the server accepts).
    fn first_rpc(
        &mut self,
        what: &str,
        mut first: impl FnMut() -> Result<String, String>,
    ) -> Result<(), String> {
        let rpc = self.dir.path().join("spdk.rpc");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !rpc.exists() {
            if Instant::now() > deadline || self.child.try_wait().ok().flatten().is_some() {
                return Err(format!("SPDK {what} did not start: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut r = Err(String::new());
        for _ in 0..100 {
            r = first();
            if r.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        r.map(|_| ())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(self.log)).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running SPDK vhost target with the [`CONTROLLERS`]; killed on drop.
pub struct SpdkVhost {
    p: Process,
    build: SpdkBuild,
    core: usize,
}

impl SpdkVhost {
    /// Start the target pinned to `core` and create Null and Malloc bdevs (4 KiB
    /// blocks; Null 1 GiB, Malloc 256 MiB) behind a blk and a scsi controller each
    /// ([`CONTROLLERS`]), and a Null (1 GiB) and a Malloc (128 MiB) bdev behind a blk
    /// controller with packed rings each ([`PACKED_CONTROLLERS`]).
    pub fn start(build: &SpdkBuild, core: usize) -> Result<SpdkVhost, String> {
        ensure_hugepages()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let child = Self::spawn(build, dir.path(), core)?;
        let mut v = SpdkVhost {
            p: Process {
                child,
                dir,
                log: "vhost.log",
            },
            build: build.clone(),
            core,
        };
        v.configure()?;
        Ok(v)
    }

    /// Kill the target and start it again in the same directory with the same bdevs
    /// and controllers (a target restart, as a front-end sees it: the sockets close,
    /// then accept again; Malloc bdevs come back empty).
    pub fn restart(&mut self) -> Result<(), String> {
        self.p.stop(
            CONTROLLERS
                .iter()
                .chain(PACKED_CONTROLLERS.iter())
                .map(|c| c.0),
        );
        self.p.child = Self::spawn(&self.build, self.p.dir.path(), self.core)?;
        self.configure()
    }

    /// Start `vhost` pinned to `core` with its sockets in `dir` (log: `dir/vhost.log`,
    /// appended).
    fn spawn(build: &SpdkBuild, dir: &Path, core: usize) -> Result<Child, String> {
        let mask = format!("{:#x}", 1u64 << core);
        let mut cmd = build.command(&build.vhost());
        cmd.arg("-S")
            .arg(dir)
            .args(["-m", &mask, "-s", "1024", "-u", "-r"])
            .arg(dir.join("spdk.rpc"));
        Process::spawn(cmd, dir, "vhost.log")
    }

    /// Wait for the RPC socket, then create the bdevs and controllers.
    fn configure(&mut self) -> Result<(), String> {
        let mask = format!("{:#x}", 1u64 << self.core);
        let (build, dir) = (&self.build, self.p.dir.path().to_path_buf());
        self.p.first_rpc("vhost", || {
            rpc_py(
                build.command(Path::new("python3")),
                &build.rpc_py(),
                &dir,
                &["bdev_null_create", "Null0", "1024", "4096"],
            )
        })?;
        self.rpc(&["bdev_null_create", "Null1", "1024", "4096"])?;
        self.rpc(&["bdev_malloc_create", "-b", "Malloc0", "256", "4096"])?;
        self.rpc(&["bdev_malloc_create", "-b", "Malloc1", "256", "4096"])?;
        self.rpc(&["bdev_null_create", "Null2", "1024", "4096"])?;
        self.rpc(&["bdev_malloc_create", "-b", "Malloc2", "128", "4096"])?;
        for (sock, ty, bdev) in CONTROLLERS {
            if ty == "scsi" {
                self.rpc(&["vhost_create_scsi_controller", "--cpumask", &mask, sock])?;
                self.rpc(&["vhost_scsi_controller_add_target", sock, "0", bdev])?;
            } else {
                self.rpc(&[
                    "vhost_create_blk_controller",
                    "--cpumask",
                    &mask,
                    sock,
                    bdev,
                ])?;
            }
        }
        for (sock, _, bdev) in PACKED_CONTROLLERS {
            self.create_packed_blk(sock, bdev)?;
        }
        Ok(())
    }

    /// Create a blk controller with packed rings offered (rpc.py v25.09 takes `-p`; it
    /// rejects the long spelling `--packed_ring`).
    pub fn create_packed_blk(&self, sock: &str, bdev: &str) -> Result<(), String> {
        let mask = format!("{:#x}", 1u64 << self.core);
        self.rpc(&[
            "vhost_create_blk_controller",
            "--cpumask",
            &mask,
            "-p",
            sock,
            bdev,
        ])
        .map(|_| ())
    }

    /// The core the target polls on.
    pub fn core(&self) -> usize {
        self.core
    }

    /// The socket of controller `name` (one of [`CONTROLLERS`]).
    pub fn socket(&self, name: &str) -> PathBuf {
        self.p.dir.path().join(name)
    }

    /// A directory that lives as long as the target (for configs).
    pub fn dir(&self) -> &Path {
        self.p.dir.path()
    }

    /// Run one SPDK RPC; its output, or an error with it.
    pub fn rpc(&self, args: &[&str]) -> Result<String, String> {
        rpc_py(
            self.build.command(Path::new("python3")),
            &self.build.rpc_py(),
            self.p.dir.path(),
            args,
        )
    }

    /// What the target logged.
    pub fn log(&self) -> String {
        self.p.log()
    }
}

/// The environment variables that point at an SPDK build configured `--with-vfio-user`
/// (`spdk-vhost.sh build-vfu`), in order of preference.
pub const VFU_ENV_VARS: [&str; 2] = ["VIREO_SPDK_VFU_DIR", "SPDK_VFU_DIR"];

/// The endpoints [`SpdkVfu::start`] creates: (socket name, type). Both offer packed
/// rings (split-ring drivers still work on them); the scsi one has targets 0 and 1.
pub const VFU_ENDPOINTS: [(&str, &str); 2] = [("vfu.blk", "blk"), ("vfu.scsi", "scsi")];

/// An SPDK build with vfio-user: `build/bin/spdk_tgt` (serving `vfu_virtio` endpoints),
/// `build/examples/bdevperf`, `scripts/rpc.py`, and the libvfio-user it was built with.
#[derive(Debug, Clone)]
pub struct SpdkVfuBuild {
    build: SpdkBuild,
}

impl SpdkVfuBuild {
    /// The build named by `VIREO_SPDK_VFU_DIR` or `SPDK_VFU_DIR`; `Err` says why there is
    /// none.
    pub fn from_env() -> Result<SpdkVfuBuild, String> {
        let Some((var, dir)) = VFU_ENV_VARS
            .iter()
            .find_map(|v| std::env::var_os(v).map(|d| (*v, PathBuf::from(d))))
        else {
            return Err(format!(
                "no SPDK build with vfio-user: set {} to an SPDK v25.09 tree built by `spdk-vhost.sh build-vfu` (configure --with-vfio-user)",
                VFU_ENV_VARS.join(" or ")
            ));
        };
        let b = SpdkVfuBuild {
            build: SpdkBuild { dir },
        };
        for p in [
            b.tgt(),
            b.build.bdevperf(),
            b.build.rpc_py(),
            b.libvfio_user(),
        ] {
            if !p.exists() {
                return Err(format!(
                    "{var}={}: {} is missing",
                    b.build.dir.display(),
                    p.display()
                ));
            }
        }
        Ok(b)
    }

    /// The target binary.
    pub fn tgt(&self) -> PathBuf {
        self.build.dir.join("build/bin/spdk_tgt")
    }

    fn libvfio_user(&self) -> PathBuf {
        self.build.dir.join("build/libvfio-user/usr/local/lib")
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = self.build.command(program);
        let mut ld = self.libvfio_user().into_os_string();
        if let Some(old) = c.get_envs().find(|(k, _)| *k == "LD_LIBRARY_PATH") {
            if let Some(v) = old.1 {
                ld.push(":");
                ld.push(v);
            }
        }
        c.env("LD_LIBRARY_PATH", ld);
        c
    }

    /// `bdevperf` pinned to `core`, with 512 MiB of hugepage memory in one file, no PCI,
    /// and IOVA = VA (`--iova-mode va`: with physical addresses the vfio-user target
    /// cannot map the queues and bdevperf hangs); add the workload arguments. Run it
    /// with a time limit.
    pub fn bdevperf_on(&self, core: usize) -> Command {
        let mut c = self.command(&self.build.bdevperf());
        c.args([
            "-m",
            &format!("{:#x}", 1u64 << core),
            "-s",
            "512",
            "-u",
            "-g",
            "--iova-mode",
            "va",
        ]);
        c
    }
}

/// A running SPDK target with the [`VFU_ENDPOINTS`] (Malloc bdevs of 64 MiB, 512 B
/// blocks); killed on drop.
pub struct SpdkVfu {
    p: Process,
    build: SpdkVfuBuild,
    core: usize,
}

impl SpdkVfu {
    /// Start the target pinned to `core` and create the endpoints.
    pub fn start(build: &SpdkVfuBuild, core: usize) -> Result<SpdkVfu, String> {
        ensure_hugepages()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let child = Self::spawn(build, dir.path(), core)?;
        let mut v = SpdkVfu {
            p: Process {
                child,
                dir,
                log: "tgt.log",
            },
            build: build.clone(),
            core,
        };
        let base = v.p.dir.path().to_path_buf();
        v.configure(&base)?;
        Ok(v)
    }

    /// Kill the target and start it again with the same endpoints (the sockets close,
    /// then accept again; the Malloc bdevs come back empty).
    pub fn restart(&mut self) -> Result<(), String> {
        self.p.stop(VFU_ENDPOINTS.iter().map(|e| e.0));
        self.p.child = Self::spawn(&self.build, self.p.dir.path(), self.core)?;
        // The endpoints are created in a directory of their own and moved into place
        // once complete: a client reconnecting in between would find the scsi
        // endpoint without its targets (SPDK adds them after creating it).
        let staging = self.p.dir.path().join("staging");
        std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
        self.configure(&staging)?;
        for (sock, _) in VFU_ENDPOINTS {
            std::fs::rename(staging.join(sock), self.socket(sock)).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn spawn(build: &SpdkVfuBuild, dir: &Path, core: usize) -> Result<Child, String> {
        let mask = format!("{:#x}", 1u64 << core);
        let mut cmd = build.command(&build.tgt());
        cmd.args(["-m", &mask, "-s", "512", "--iova-mode", "va", "-r"])
            .arg(dir.join("spdk.rpc"));
        Process::spawn(cmd, dir, "tgt.log")
    }

    /// Create the bdevs and the endpoints, with their sockets in `base`.
    fn configure(&mut self, base: &Path) -> Result<(), String> {
        let mask = format!("{:#x}", 1u64 << self.core);
        let (build, dir) = (&self.build, self.p.dir.path().to_path_buf());
        self.p.first_rpc("spdk_tgt", || {
            rpc_py(
                build.command(Path::new("python3")),
                &build.build.rpc_py(),
                &dir,
                &["bdev_malloc_create", "-b", "Malloc0", "64", "512"],
            )
        })?;
        self.rpc(&["bdev_malloc_create", "-b", "Malloc1", "64", "512"])?;
        self.rpc(&["bdev_malloc_create", "-b", "Malloc2", "64", "512"])?;
        let base = base.to_string_lossy().into_owned();
        self.rpc(&["vfu_tgt_set_base_path", &base])?;
        #[rustfmt::skip]
        self.rpc(&["vfu_virtio_create_blk_endpoint", "vfu.blk", "--bdev-name", "Malloc0",
            "--cpumask", &mask, "--num-queues", "2", "--qsize", "256", "--packed-ring"])?;
        #[rustfmt::skip]
        self.rpc(&["vfu_virtio_create_scsi_endpoint", "vfu.scsi", "--cpumask", &mask,
            "--num-io-queues", "2", "--qsize", "256", "--packed-ring"])?;
        for (t, b) in [("0", "Malloc1"), ("1", "Malloc2")] {
            #[rustfmt::skip]
            self.rpc(&["vfu_virtio_scsi_add_target", "vfu.scsi", "--scsi-target-num", t,
                "--bdev-name", b])?;
        }
        Ok(())
    }

    /// The build.
    pub fn build(&self) -> &SpdkVfuBuild {
        &self.build
    }

    /// The socket of endpoint `name` (one of [`VFU_ENDPOINTS`]).
    pub fn socket(&self, name: &str) -> PathBuf {
        self.p.dir.path().join(name)
    }

    /// A directory that lives as long as the target (for configs).
    pub fn dir(&self) -> &Path {
        self.p.dir.path()
    }

    /// Run one SPDK RPC; its output, or an error with it.
    pub fn rpc(&self, args: &[&str]) -> Result<String, String> {
        rpc_py(
            self.build.command(Path::new("python3")),
            &self.build.build.rpc_py(),
            self.p.dir.path(),
            args,
        )
    }

    /// What the target logged.
    pub fn log(&self) -> String {
        self.p.log()
    }
}

/// Run SPDK's rpc.py (`python`, with the build's environment) against the target whose
/// socket is `dir`/spdk.rpc: its output, or an error with what it printed.
fn rpc_py(mut python: Command, rpc_py: &Path, dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = python
        .arg(rpc_py)
        .arg("-s")
        .arg(dir.join("spdk.rpc"))
        .args(args)
        .output()
        .map_err(|e| format!("rpc.py: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rpc.py {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// An SPDK JSON config attaching one controller of transport `trtype` (`user`,
/// `vfio-user`) at `traddr`, for bdevperf or vireo.
pub fn attach_config_tr(
    name: &str,
    trtype: &str,
    traddr: &Path,
    dev_type: &str,
    vq_count: Option<u16>,
) -> String {
    attach_config(name, traddr, dev_type, vq_count).replacen(
        r#""trtype":"user""#,
        &format!(r#""trtype":"{trtype}""#),
        1,
    )
}

/// An SPDK JSON config attaching one virtio controller (for bdevperf or vireo).
pub fn attach_config(name: &str, socket: &Path, dev_type: &str, vq_count: Option<u16>) -> String {
    let mut params = format!(
        r#""name":"{name}","trtype":"user","traddr":"{}","dev_type":"{dev_type}""#,
        socket.display()
    );
    if let Some(n) = vq_count {
        params.push_str(&format!(r#","vq_count":{n}"#));
    }
    format!(
        r#"{{"subsystems":[{{"subsystem":"bdev","config":[{{"method":"bdev_virtio_attach_controller","params":{{{params}}}}}]}}]}}"#
    )
}

/// The total IOPS of a bdevperf run, from its "Total" line.
pub fn bdevperf_total_iops(output: &str) -> Option<f64> {
    output
        .lines()
        .find(|l| l.trim_start().starts_with("Total") && l.contains(':') && !l.contains("cores"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bdevperf_totals() {
        let out = "[2026-11-29 05:08:59.654893] app.c: 964:spdk_app_start: *NOTICE*: Total cores available: 1\n Device Information          : runtime(s)       IOPS      MiB/s\n Total                       :            4878224.48   19055.56       0.00\n";
        assert_eq!(bdevperf_total_iops(out), Some(4878224.48));
        assert_eq!(bdevperf_total_iops("nothing"), None);
    }

    #[test]
    fn config_names_the_controller() {
        let c = attach_config("V", Path::new("/s"), "blk", Some(2));
        assert!(c.contains(r#""traddr":"/s""#) && c.contains(r#""vq_count":2"#));
        assert!(!attach_config("V", Path::new("/s"), "scsi", None).contains("vq_count"));
    }
}
