//! Guest runs (scripts/guest-vm.sh under QEMU TCG) for the tests of transports that
//! live in a guest: virtio-pci (pci_guest.rs) and the kernel's vhost-scsi and vhost-vdpa
//! (kernel_guest.rs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const SEED: u64 = 0x5eed_f91c;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The vireo binary without debug info (the guest's initramfs holds it).
pub fn vireo_for_guest() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("vireo-guest-bin-{}", std::process::id()));
        let st = Command::new("objcopy")
            .args(["--strip-debug", env!("CARGO_BIN_EXE_vireo")])
            .arg(&out)
            .status()
            .expect("objcopy (binutils) runs");
        assert!(st.success(), "objcopy --strip-debug failed");
        out
    })
}

pub struct GuestRun {
    pub rc: i32,
    /// The command's output (between the markers).
    pub out: String,
    /// Everything QEMU printed.
    pub console: String,
}

impl GuestRun {
    /// Values of `RC name=N` lines the guest command printed.
    pub fn rcs(&self) -> HashMap<String, i32> {
        self.out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("RC "))
            .filter_map(|l| l.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
            .collect()
    }

    pub fn expect_rc(&self, name: &str, want: i32) {
        let got = self.rcs().get(name).copied();
        assert_eq!(
            got,
            Some(want),
            "{name}: exit status {got:?}, expected {want}\n{}",
            self.console
        );
    }
}

pub fn run_guest(args: &[&str], cmd: &str) -> GuestRun {
    run_guest_env(args, cmd, &[])
}

pub fn run_guest_env(args: &[&str], cmd: &str, env: &[(&str, &str)]) -> GuestRun {
    for tool in ["qemu-system-x86_64", "cpio"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is missing: install qemu-system-x86 and cpio (from bookworm-backports; see .ci/run)"
        );
    }
    let mut c = Command::new(repo().join("scripts/guest-vm.sh"));
    c.arg("--add")
        .arg(format!("{}:/extra/vireo", vireo_for_guest().display()));
    c.args(args).args(["--timeout", "240", "--"]).arg(cmd);
    c.envs(env.iter().copied());
    let o = c.output().expect("guest-vm.sh runs");
    let mut console =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    if o.status.code() == Some(125) && !console.contains("guest-vm: up after") {
        // The guest's init prints "guest-vm: up" right after loading its virtio drivers:
        // the kernel panicked or hung before that (a hang while the drivers probe the
        // devices leaves only hung-task reports, "blocked for more than", on the quiet
        // console).
        console += "\npci_guest: no \"guest-vm: up\": the guest's kernel did not get as far as \
                    its command (panic or hang while booting or probing the devices; for \
                    vhost-user devices see the host side's log too)";
    }
    let out = console
        .split_once("=== guest-cmd begin ===")
        .map(|(_, r)| r.split("=== guest-cmd end").next().unwrap_or(""))
        .unwrap_or("")
        .to_string();
    GuestRun {
        rc: o.status.code().unwrap_or(-1),
        out,
        console,
    }
}

pub fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

/// Every non-zero 512-byte block of `img` must carry vireo perf's verify stamp for its
/// own LBA and our seed; returns how many do (a misdirected or torn write fails).
pub fn stamped_blocks(img: &Path) -> usize {
    let data = std::fs::read(img).unwrap();
    let mut n = 0;
    for (lba, b) in data.chunks(512).enumerate() {
        if b.iter().all(|&x| x == 0) {
            continue;
        }
        let at = u64::from_le_bytes(b[0..8].try_into().unwrap());
        let seed = u64::from_le_bytes(b[8..16].try_into().unwrap());
        assert_eq!(
            (at, seed),
            (lba as u64, SEED),
            "{}: block {lba} holds a stamp for LBA {at} seed {seed:#x}",
            img.display()
        );
        n += 1;
    }
    n
}

/// The workloads of the issue, verify last so the images end with stamped data.
pub fn workloads(config: &str) -> String {
    let mut s = String::new();
    for w in ["unmap", "flush", "write_zeroes", "verify"] {
        s += &format!(
            "vireo perf -c {config} -w {w} -q 8 -o 4096 -t 2 --seed {SEED} > /tmp/{w}.out 2>&1; r=$?; echo \"RC {w}=$r\"; [ $r = 0 ] || cat /tmp/{w}.out\n"
        );
    }
    s
}
