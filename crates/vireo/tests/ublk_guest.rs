//! ublk (bdevs as /dev/ublkbN) inside a real guest: the host's kernel is not ours, so
//! QEMU (TCG) boots bookworm-backports' 6.12 kernel with `ublk_drv` (scripts/guest-vm.sh
//! `--kver` `--mod`), vireo serves a virtio-blk PCI function (uio_pci_generic) and the
//! in-tree vhost-user target as /dev/ublkb0 and /dev/ublkb1, and the guest runs fio
//! (io_uring and libaio, verify=crc32c, QD 1 and 32), ext4 (mkfs, mount, files written
//! and read back, fsck -n), blkdiscard, and a kill -9 of vireo during a verify with
//! `ublk_recover_disk` after it (fio finishes with no error).
//!
//! Needs qemu-system-x86_64, cpio, fio, e2fsprogs and the 6.12 kernel package from
//! bookworm-backports (`.ci/run` sets them up). `VIREO_UBLK_FIGURES=1` also runs
//! `ublk_figures_in_guest` (slow): fio on /dev/ublkb0 vs vireo perf vs the guest's own
//! virtio_blk on the same PCI function, 4 KiB randread QD 1 and 32, as ratios.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The vireo binary without debug info (the guest's initramfs holds it):
/// VIREO_UBLK_GUEST_BIN (a release build, for the figures) or the test's build.
fn vireo_for_guest() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("vireo-ublk-bin-{}", std::process::id()));
        let bin = std::env::var("VIREO_UBLK_GUEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_vireo").to_string());
        let st = Command::new("objcopy")
            .args(["--strip-debug", &bin])
            .arg(&out)
            .status()
            .expect("objcopy (binutils) runs");
        assert!(st.success(), "objcopy --strip-debug failed");
        out
    })
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The kernel with ublk_drv: VIREO_UBLK_KVER, else a 6.12 one already downloaded, else
/// the newest bookworm-backports 6.12 apt knows.
fn ublk_kver() -> String {
    if let Ok(v) = std::env::var("VIREO_UBLK_KVER") {
        return v;
    }
    let cache = std::env::var("VIREO_GUEST_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/vireo-guest", std::env::var("HOME").unwrap()));
    let cached = sh(&format!(
        "ls {cache}/debs/ 2>/dev/null | sed -n 's/^linux-image-\\(6\\.12\\.[^_]*-amd64\\)_.*/\\1/p' | sort -V | tail -1"
    ));
    if !cached.is_empty() {
        return cached;
    }
    let known = sh(
        "apt-cache search --names-only '^linux-image-6\\.12\\.[0-9.]*\\+deb12-amd64$' \
         | sed 's/^linux-image-\\([^ ]*\\) .*/\\1/' | sort -V | tail -1",
    );
    assert!(
        !known.is_empty(),
        "no linux-image-6.12.*+deb12-amd64 known to apt: add bookworm-backports and apt-get update (.ci/run does)"
    );
    known
}

struct GuestRun {
    out: String,
    console: String,
}

impl GuestRun {
    fn rc(&self, name: &str) -> Option<i32> {
        self.out
            .lines()
            .filter_map(|l| l.find("RC ").map(|i| &l[i + 3..]))
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
    }

    fn expect_rc(&self, name: &str, want: i32) {
        let got = self.rc(name);
        assert_eq!(
            got,
            Some(want),
            "{name}: exit status {got:?}, expected {want}\n{}",
            self.console
        );
    }
}

/// Boot the 6.12 guest with ublk_drv and ext4, vireo, fio and e2fsprogs in it, a
/// virtio-blk function on a fresh `img_mib` image, and run `cmd` (`extra`: more
/// guest-vm.sh arguments).
fn run_guest_with(cmd: &str, img_mib: u64, timeout: u32, extra: &[String]) -> GuestRun {
    for tool in [
        "qemu-system-x86_64",
        "cpio",
        "fio",
        "mkfs.ext4",
        "fsck.ext4",
    ] {
        assert!(
            !sh(&format!("command -v {tool}")).is_empty(),
            "{tool} is missing: install qemu-system-x86 (bookworm-backports), cpio, fio and e2fsprogs (see .ci/run)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b0");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(img_mib << 20)
        .unwrap();
    let mut c = Command::new(repo().join("scripts/guest-vm.sh"));
    c.args(["--kver", &ublk_kver()]);
    for m in ["ublk_drv", "ext4", "crc32c_generic"] {
        c.args(["--mod", m]);
    }
    c.arg("--add")
        .arg(format!("{}:/extra/vireo", vireo_for_guest().display()));
    // By their real paths (mkfs.ext4 and fsck.ext4 are links) under their own names.
    for tool in ["fio", "mkfs.ext4", "fsck.ext4", "blkdiscard"] {
        c.arg("--add")
            .arg(sh(&format!("echo $(realpath $(command -v {tool})):{tool}")));
    }
    c.args(["--mem", "1G", "--append", "hugepages=128"]);
    c.args(extra);
    c.arg("--blk-img").arg(&img);
    c.args(["--timeout", &timeout.to_string(), "--"]).arg(cmd);
    let o = c.output().expect("guest-vm.sh runs");
    let console =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    let out = console
        .split_once("=== guest-cmd begin ===")
        .map(|(_, r)| r.split("=== guest-cmd end").next().unwrap_or(""))
        .unwrap_or("")
        .to_string();
    GuestRun { out, console }
}

/// Guest side: bind the PCI function, start the in-tree target, write the config of
/// both bdevs (P: the PCI function, T: the target) and the helpers.
const SETUP: &str = r#"
vireo setup bind all --driver uio_pci_generic >/dev/null; echo "RC bind=$?"
B=$(vireo pci | awk '$2=="blk"{print $1}' | head -1)
vireo target --socket /tmp/t.sock --size 16m --queues 2 > /tmp/target.log 2>&1 &
cat > /tmp/c.json <<EOF
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_virtio_attach_controller","params":{"name":"P","trtype":"pci","traddr":"$B","dev_type":"blk"}},
 {"method":"bdev_virtio_attach_controller","params":{"name":"T","trtype":"user","traddr":"/tmp/t.sock","dev_type":"blk","vq_count":2}}]}]}
EOF
i=0; while [ ! -S /tmp/t.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
wait_dev() { i=0; while [ ! -b $1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ -b $1 ]; }
# fio verify: a written pattern read back and checked (crc32c), fatal on the first mismatch.
fverify() { # NAME DEV ENGINE QD SIZE
  [ -b $2 ] || { echo "RC $1=99 (no $2)"; return; }
  fio --name=$1 --filename=$2 --ioengine=$3 --iodepth=$4 --size=$5 --direct=1 --rw=randwrite \
      --bs=4k --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --output=/tmp/$1.fio
  r=$?; echo "RC $1=$r"; [ $r = 0 ] || cat /tmp/$1.fio
}
"#;

const TESTS: &str = r#"
vireo serve -c /tmp/c.json -r /tmp/r.sock --ublk P:0 > /tmp/serve.log 2>&1 &
SP=$!
wait_dev /dev/ublkb0; i=0; while [ ! -S /tmp/r.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
vireo rpc -r /tmp/r.sock ublk_start_disk '{"bdev_name":"T","ublk_id":1,"num_queues":2,"queue_depth":64}'
vireo rpc -r /tmp/r.sock ublk_start_disk '{"bdev_name":"P","ublk_id":2,"num_queues":2}'; echo "RC too_many_queues=$?"
wait_dev /dev/ublkb1; echo "RC devices=$?"
cat /tmp/serve.log
vireo rpc -r /tmp/r.sock ublk_get_disks
for d in 0 1; do for e in io_uring libaio; do for q in 1 32; do
  fverify fio_${e}_qd${q}_ublkb$d /dev/ublkb$d $e $q 2m
done; done; done
for d in 0 1; do blkdiscard /dev/ublkb$d; echo "RC discard_ublkb$d=$?"; done
for d in 0 1; do
  mkfs.ext4 -q -F /dev/ublkb$d; echo "RC mkfs_ublkb$d=$?"
  mkdir -p /mnt/$d && mount -t ext4 /dev/ublkb$d /mnt/$d; echo "RC mount_ublkb$d=$?"
  dd if=/dev/urandom of=/tmp/f$d bs=64k count=16 2>/dev/null
  cp /tmp/f$d /mnt/$d/big && echo hello > /mnt/$d/small && mkdir /mnt/$d/dir && cp /tmp/f$d /mnt/$d/dir/copy
  umount /mnt/$d; echo "RC umount_ublkb$d=$?"
  mount -t ext4 /dev/ublkb$d /mnt/$d
  cmp /tmp/f$d /mnt/$d/big && cmp /tmp/f$d /mnt/$d/dir/copy && [ "$(cat /mnt/$d/small)" = hello ]; echo "RC readback_ublkb$d=$?"
  umount /mnt/$d
  fsck.ext4 -n /dev/ublkb$d > /tmp/fsck$d 2>&1; r=$?; echo "RC fsck_ublkb$d=$r"; [ $r = 0 ] || cat /tmp/fsck$d
done
# kill -9 during a verify of both devices; a new vireo takes them back
fio --name=r0 --filename=/dev/ublkb0 --ioengine=io_uring --iodepth=16 --size=8m --direct=1 --rw=randwrite \
    --bs=4k --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --output=/tmp/r0.fio &
F0=$!
fio --name=r1 --filename=/dev/ublkb1 --ioengine=libaio --iodepth=16 --size=8m --direct=1 --rw=randwrite \
    --bs=4k --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --output=/tmp/r1.fio &
F1=$!
# kill once both devices have requests in flight (/sys/block/*/inflight: reads writes)
inflight() { awk '{print $1+$2}' /sys/block/$1/inflight; }
sleep 0.5; i=0
until [ "$(inflight ublkb0)" -gt 0 ] && [ "$(inflight ublkb1)" -gt 0 ] || [ $i -ge 400 ]; do sleep 0.02; i=$((i+1)); done
kill -0 $F0 && kill -0 $F1; echo "RC fio_running_at_kill=$?"
kill -9 $SP; wait $SP 2>/dev/null
ls /dev/ublkb0 /dev/ublkb1 >/dev/null; echo "RC kept_after_kill=$?"
rm -f /tmp/r.sock
vireo serve -c /tmp/c.json -r /tmp/r.sock > /tmp/serve2.log 2>&1 &
SP=$!
i=0; while [ ! -S /tmp/r.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
vireo rpc -r /tmp/r.sock ublk_create_target '{"cpumask":"0x3"}'; echo "RC create_target=$?"
vireo rpc -r /tmp/r.sock ublk_recover_disk '{"bdev_name":"P","ublk_id":0}'; echo "RC recover0=$?"
vireo rpc -r /tmp/r.sock ublk_recover_disk '{"bdev_name":"T","ublk_id":1}'; echo "RC recover1=$?"
# the cpumask's CPUs, one per queue in turn: each queue thread pinned to its CPU
for t in /proc/$SP/task/*; do
  c=$(cat $t/comm); case $c in vireo-ublk*) echo "PIN $c $(awk '/Cpus_allowed_list/{print $2}' $t/status)";; esac
done
wait $F0; r=$?; echo "RC fio_recovery_ublkb0=$r"; [ $r = 0 ] || cat /tmp/r0.fio
wait $F1; r=$?; echo "RC fio_recovery_ublkb1=$r"; [ $r = 0 ] || cat /tmp/r1.fio
grep -h "issued rwts" /tmp/r0.fio /tmp/r1.fio
vireo rpc -r /tmp/r.sock save_config
vireo rpc -r /tmp/r.sock ublk_stop_disk '{"ublk_id":1}'; echo "RC stop1=$?"
[ ! -e /dev/ublkb1 ]; echo "RC gone1=$?"
# a bdev that goes away takes its device with it: the PCI function is removed
echo 1 > /sys/bus/pci/devices/$B/remove &
i=0; while [ -e /dev/ublkb0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ ! -e /dev/ublkb0 ]; echo "RC gone0=$?"
vireo rpc -r /tmp/r.sock ublk_get_disks
kill $SP; wait $SP; echo "RC serve_exit=$?"
cat /tmp/serve2.log | tail -20
"#;

/// The guest tests of the issue, in one boot (about a minute under TCG).
#[test]
fn ublk_on_pci_and_target_fio_ext4_discard_recovery() {
    // Two vCPUs: the kernel gives a ublk device at most one queue per CPU.
    let smp = vec!["--smp".to_string(), "2".to_string()];
    let run = run_guest_with(&format!("{SETUP}{TESTS}"), 16, 280, &smp);
    for pin in [
        "PIN vireo-ublk1q0 0",
        "PIN vireo-ublk1q1 1",
        "PIN vireo-ublk0q0 0",
    ] {
        assert!(
            run.out.contains(pin),
            "ublk_create_target's cpumask pins the queue threads: {pin}\n{}",
            run.out
        );
    }
    assert!(
        run.out.contains("\"num_queues\": 2"),
        "ublkb1 has 2 queues\n{}",
        run.console
    );
    run.expect_rc("too_many_queues", 1);
    assert!(
        run.out.contains("num_queues must be at most 1"),
        "{}",
        run.console
    );
    for name in [
        "bind",
        "devices",
        "discard_ublkb0",
        "discard_ublkb1",
        "fio_running_at_kill",
        "kept_after_kill",
        "create_target",
        "recover0",
        "recover1",
        "fio_recovery_ublkb0",
        "fio_recovery_ublkb1",
        "stop1",
        "gone0",
        "gone1",
        "serve_exit",
    ] {
        run.expect_rc(name, 0);
    }
    for d in 0..2 {
        for e in ["io_uring", "libaio"] {
            for q in [1, 32] {
                run.expect_rc(&format!("fio_{e}_qd{q}_ublkb{d}"), 0);
            }
        }
        for step in ["mkfs", "mount", "umount", "readback", "fsck"] {
            run.expect_rc(&format!("{step}_ublkb{d}"), 0);
        }
    }
    println!("{}", run.out);
}

/// SPDK's build or source tree (VIREO_SPDK_DIR or SPDK_DIR) with scripts/rpc.py.
fn spdk_rpc_py() -> Option<PathBuf> {
    let dir = std::env::var("VIREO_SPDK_DIR")
        .or_else(|_| std::env::var("SPDK_DIR"))
        .ok()?;
    let p = Path::new(&dir).join("scripts/rpc.py");
    p.exists().then_some(p)
}

const RPC_PY_GUEST: &str = r#"
vireo target --socket /tmp/t.sock --size 16m > /tmp/target.log 2>&1 &
i=0; while [ ! -S /tmp/t.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
cat > /tmp/c.json <<EOF
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_virtio_attach_controller","params":{"name":"T","trtype":"user","traddr":"/tmp/t.sock","dev_type":"blk"}}]}]}
EOF
vireo serve -c /tmp/c.json -r /tmp/r.sock > /tmp/serve.log 2>&1 &
i=0; while [ ! -S /tmp/r.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
R="python3 /spdk/scripts/rpc.py -s /tmp/r.sock"
$R ublk_create_target -m 0x1; echo "RC create_target=$?"
$R ublk_start_disk T 3 -q 1 -d 64; echo "RC start_disk=$?"
[ -b /dev/ublkb3 ]; echo "RC ublkb3=$?"
$R ublk_get_disks; echo "RC get_disks=$?"
$R ublk_get_disks -n 3 | grep -q '"bdev_name": "T"'; echo "RC get_disk3=$?"
dd if=/dev/urandom of=/tmp/x bs=4k count=64 2>/dev/null; dd if=/tmp/x of=/dev/ublkb3 bs=4k oflag=direct 2>/dev/null
dd if=/dev/ublkb3 of=/tmp/y bs=4k count=64 iflag=direct 2>/dev/null; cmp /tmp/x /tmp/y; echo "RC data=$?"
$R ublk_stop_disk 3; echo "RC stop_disk=$?"
[ ! -e /dev/ublkb3 ]; echo "RC gone=$?"
$R ublk_destroy_target; echo "RC destroy_target=$?"
"#;

/// SPDK's rpc.py, unchanged, drives the ublk methods of `vireo serve`: on the host
/// (whose kernel has no ublk_drv: ublk_create_target answers what to load) and in the
/// guest for real (python3 with its standard library and SPDK's scripts/rpc.py and
/// python/ copied in).
#[test]
fn spdk_rpc_py_drives_the_ublk_methods() {
    let Some(rpc_py) = spdk_rpc_py() else {
        eprintln!("********************************************************************");
        eprintln!("SKIPPED: spdk_rpc_py_drives_the_ublk_methods: set SPDK_DIR (or");
        eprintln!("  VIREO_SPDK_DIR) to an SPDK v25.09 tree (scripts/rpc.py, python/).");
        eprintln!("********************************************************************");
        return;
    };
    let spdk = rpc_py.parent().unwrap().parent().unwrap().to_path_buf();
    // Host side.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("r.sock");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_vireo"))
        .args(["serve", "-r"])
        .arg(&sock)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let rpc = |args: &[&str]| {
        let o = Command::new("python3")
            .arg(&rpc_py)
            .arg("-s")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let (ok, out) = rpc(&["ublk_get_disks"]);
    assert!(ok && out.trim() == "[]", "{out}");
    let (ok, out) = rpc(&["ublk_create_target", "-m", "0x1"]);
    if Path::new("/dev/ublk-control").exists() {
        assert!(ok, "{out}");
        let (ok, out) = rpc(&["ublk_destroy_target"]);
        assert!(ok, "{out}");
    } else {
        assert!(!ok && out.contains("modprobe ublk_drv"), "{out}");
    }
    let (ok, out) = rpc(&["ublk_start_disk", "X", "1"]);
    assert!(!ok && out.contains("ublk_create_target"), "{out}");
    let _ = serve.kill();
    let _ = serve.wait();

    // Guest side: this python3 with its standard library (trimmed) where it looks for
    // it, SPDK's rpc.py and package.
    let python = sh("python3 -c 'import sys, os; print(os.path.realpath(sys.executable))'");
    let stdlib = sh("python3 -c 'import sysconfig; print(sysconfig.get_paths()[\"stdlib\"])'");
    let prefix = sh("python3 -c 'import sys; print(sys.prefix)'");
    let py = dir.path().join("stdlib");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "mkdir -p {py} && cd {stdlib} && tar -c --exclude=test --exclude=idlelib \
             --exclude=tkinter --exclude=ensurepip --exclude=lib2to3 --exclude=pydoc_data \
             --exclude=__pycache__ --exclude='config-*' --exclude=site-packages . | tar -x -C {py}",
            py = py.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let extra = vec![
        "--add".to_string(),
        format!("{python}:python3"),
        "--add".to_string(),
        format!("{}:{stdlib}", py.display()),
        "--add".to_string(),
        format!("{}:/spdk/scripts/rpc.py", rpc_py.display()),
        "--add".to_string(),
        format!("{}:/spdk/python", spdk.join("python").display()),
    ];
    let cmd = format!("export PYTHONHOME={prefix}\n{RPC_PY_GUEST}");
    let run = run_guest_with(&cmd, 8, 200, &extra);
    println!("{}", run.out);
    for name in [
        "create_target",
        "start_disk",
        "ublkb3",
        "get_disks",
        "get_disk3",
        "data",
        "stop_disk",
        "gone",
        "destroy_target",
    ] {
        run.expect_rc(name, 0);
    }
}

const FIGURES: &str = r#"
echo 1 > /proc/sys/kernel/printk
vireo setup bind all --driver uio_pci_generic >/dev/null; echo "RC bind=$?"
B=$(vireo pci | awk '$2=="blk"{print $1}' | head -1)
cat > /tmp/p.json <<EOF
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_virtio_attach_controller","params":{"name":"P","trtype":"pci","traddr":"$B","dev_type":"blk"}}]}]}
EOF
wait_dev() { i=0; while [ ! -b $1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ -b $1 ]; }
fiofig() { # KIND DEV QD
  fio --name=f --filename=$2 --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=$3 \
      --runtime=$T --time_based --size=48m --output-format=terse --eta=never \
    | awk -F';' -v k=$1 -v q=$3 '{print "FIG " k " " q " " $8}'
}
fig_ublk() {
  vireo serve -c /tmp/p.json -r /tmp/r.sock --ublk P:0 > /tmp/s.log 2>&1 & SP=$!
  wait_dev /dev/ublkb0 || cat /tmp/s.log
  fiofig ublk /dev/ublkb0 $1
  kill $SP; wait $SP
}
fig_perf() {
  vireo perf -c /tmp/p.json -w randread -q $1 -o 4096 -t $T --json > /tmp/perf.json 2>/dev/null
  echo "FIGJSON perf $1 $(tr -d '\n ' < /tmp/perf.json)"
}
fig_kernel() {
  vbind virtio-pci $B >/dev/null 2>&1
  D=$(ls /sys/bus/pci/devices/$B/virtio*/block/ 2>/dev/null | head -1)
  wait_dev /dev/$D
  fiofig kernel /dev/$D $1
  vbind uio_pci_generic $B >/dev/null 2>&1
}
for r in $ROUNDS; do
  for q in 1 32; do
    case $r in
      1) fig_ublk $q; fig_perf $q; fig_kernel $q ;;
      2) fig_perf $q; fig_kernel $q; fig_ublk $q ;;
      *) fig_kernel $q; fig_ublk $q; fig_perf $q ;;
    esac
  done
done
"#;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The figures of the issue (VIREO_UBLK_FIGURES=1; a release build through
/// VIREO_UBLK_GUEST_BIN): on one virtio-blk PCI function in one guest run, 4 KiB
/// random reads at QD 1 and 32 through fio io_uring on /dev/ublkb0 (vireo's ublk
/// server), `vireo perf` on the same bdev, and fio io_uring on the guest kernel's own
/// virtio_blk; each round runs the three in a rotated order; ratios of the rounds'
/// medians. TCG makes the absolute numbers meaningless, so only ratios are printed.
#[test]
fn ublk_figures_in_guest() {
    if std::env::var("VIREO_UBLK_FIGURES").is_err() {
        eprintln!("SKIPPED: ublk_figures_in_guest (slow): set VIREO_UBLK_FIGURES=1 to run it");
        return;
    }
    let secs = std::env::var("VIREO_UBLK_FIGURE_SECS").unwrap_or_else(|_| "5".into());
    let cmd = format!("T={secs}\nROUNDS='1 2 3'\n{FIGURES}");
    let extra = vec!["--smp".to_string(), "2".to_string()];
    let run = run_guest_with(&cmd, 64, 900, &extra);
    run.expect_rc("bind", 0);
    let mut iops: std::collections::HashMap<(String, u32), Vec<f64>> = Default::default();
    for l in run.out.lines() {
        let l = l.trim();
        if let Some(r) = l.strip_prefix("FIG ") {
            let f: Vec<&str> = r.split_whitespace().collect();
            if let (Some(k), Some(q), Some(v)) = (f.first(), f.get(1), f.get(2)) {
                if let (Ok(q), Ok(v)) = (q.parse(), v.parse()) {
                    iops.entry((k.to_string(), q)).or_default().push(v);
                }
            }
        } else if let Some(r) = l.strip_prefix("FIGJSON perf ") {
            let (q, json) = r.split_once(' ').unwrap_or(("0", "{}"));
            let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
            if let (Ok(q), Some(x)) = (q.parse(), v["total"]["iops"].as_f64()) {
                iops.entry(("perf".into(), q)).or_default().push(x);
            }
        }
    }
    for q in [1u32, 32] {
        let get = |k: &str| {
            let v = iops.get(&(k.to_string(), q)).cloned().unwrap_or_default();
            assert_eq!(v.len(), 3, "{k} QD{q}: {v:?}\n{}", run.console);
            v
        };
        let (u, p, k) = (get("ublk"), get("perf"), get("kernel"));
        let ratio = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
        println!(
            "FIGURES QD{q}: ublk/perf {:.2}, ublk/kernel {:.2}, perf/kernel {:.2} (round medians of ratios; IOPS ublk {:?} perf {:?} kernel {:?})",
            ratio(&u, &p),
            ratio(&u, &k),
            ratio(&p, &k),
            u,
            p,
            k
        );
    }
}
