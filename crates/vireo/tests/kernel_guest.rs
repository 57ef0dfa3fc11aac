//! vireo on the kernel's vhost devices, inside a guest (the host kernel is not ours):
//! - `trtype` "vhost-kernel": Linux's LIO SCSI target through `/dev/vhost-scsi` (Debian's
//!   6.1 kernel, modules vhost_scsi and target_core_file): two fileio LUNs configured in
//!   configfs under one vhost WWPN;
//! - `trtype` "vdpa": qemu-storage-daemon's VDUSE export bound to vhost_vdpa with
//!   iproute2's `vdpa` (bookworm-backports' 6.12 kernel: Debian's 6.1 has no vDPA).
//!
//! The guest runs vireo's four workloads (unmap, flush, write_zeroes, verify), then copies
//! the backing files onto virtio-blk disks whose host images the test checks block by
//! block. vireo's C library drives the vDPA device too (`virtio-blk-vhost-vdpa`). Needs
//! qemu-system-x86_64, cpio, qemu-storage-daemon and /sbin/vdpa (iproute2), which
//! `.ci/run` installs, and the C library built (scripts/test.sh builds it first).

mod common;

use std::path::PathBuf;

use common::guest::*;

/// The WWPN of the LIO vhost target in the guest.
const WWPN: &str = "naa.5001405000000001";

/// Every workload passed and every image holds vireo's stamps (at least 64 blocks).
fn check(run: &GuestRun, images: &[&PathBuf]) {
    assert_eq!(run.rc, 0, "{}", run.console);
    run.expect_rc("bdevs", 0);
    for w in ["unmap", "flush", "write_zeroes", "verify"] {
        run.expect_rc(w, 0);
    }
    run.expect_rc("copy", 0);
    for img in images {
        let n = stamped_blocks(img);
        assert!(
            n >= 64,
            "{}: only {n} stamped blocks after verify\n{}",
            img.display(),
            run.console
        );
    }
}

/// An attach of `trtype` with more parameters `extra` (JSON members), as /tmp/NAME.json.
fn config(name: &str, members: &str) -> String {
    format!(
        "cat > /tmp/{name}.json <<EOF\n{{\"subsystems\":[{{\"subsystem\":\"bdev\",\"config\":[\n {{\"method\":\"bdev_virtio_attach_controller\",\"params\":{{{members}}}}}]}}]}}\nEOF\n"
    )
}

/// A LIO target in configfs: fileio backstores /tmp/lun0 and /tmp/lun1 (16 MiB, UNMAP
/// and WRITE SAME with UNMAP on, a unit serial so that the VPD pages are reported) as
/// LUNs 0 and 1 of `tpgt_1` (virtio-scsi target 1) of the vhost WWPN, with a nexus.
const LIO_SCRIPT: &str = r#"
mount -t configfs none /sys/kernel/config
C=/sys/kernel/config/target T=/sys/kernel/config/target/vhost/$W/tpgt_1
mkdir -p $T
for i in 0 1; do
  dd if=/dev/zero of=/tmp/lun$i bs=1M count=0 seek=16 2>/dev/null
  B=$C/core/fileio_0/lun$i
  mkdir -p $B
  echo "fd_dev_name=/tmp/lun$i,fd_dev_size=16777216" > $B/control
  echo 1 > $B/enable
  echo "5001405-vireo-$i" > $B/wwn/vpd_unit_serial
  echo 1 > $B/attrib/emulate_tpu
  echo 1 > $B/attrib/emulate_tpws
  mkdir $T/lun/lun_$i
  ln -s $B $T/lun/lun_$i/backstore
done
echo $W > $T/nexus
"#;

/// The kernel's vhost-scsi with two LUNs of a LIO fileio target: the four workloads
/// pass on both, and the backing files hold the data; a WWPN that does not exist and a
/// vhost-scsi device named as vDPA are refused with what is wrong.
#[test]
fn vhost_scsi_two_luns_of_a_lio_target() {
    let dir = tempfile::tempdir().unwrap();
    let out0 = image(dir.path(), "lun0", 16);
    let out1 = image(dir.path(), "lun1", 16);
    let mut cmd = format!("W={WWPN}\n{LIO_SCRIPT}");
    cmd += &config(
        "c",
        &format!(
            r#""name":"K","trtype":"vhost-kernel","traddr":"/dev/vhost-scsi","wwpn":"{WWPN}","dev_type":"scsi""#
        ),
    );
    cmd += &config(
        "nowwpn",
        r#""name":"K","trtype":"vhost-kernel","traddr":"/dev/vhost-scsi","wwpn":"naa.5001405000000099","dev_type":"scsi""#,
    );
    cmd += &config(
        "notvdpa",
        r#""name":"K","trtype":"vdpa","traddr":"/dev/vhost-scsi","dev_type":"scsi""#,
    );
    cmd += "vireo bdevs -c /tmp/c.json; echo \"RC bdevs=$?\"\n";
    cmd += &workloads("/tmp/c.json");
    // Over JSON-RPC: attach, bdev_get_bdevs and save_config name the transport.
    cmd += &format!(
        r#"vireo serve -r /tmp/rpc.sock > /tmp/serve.log 2>&1 & S=$!
n=0; while [ ! -S /tmp/rpc.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
vireo rpc -r /tmp/rpc.sock bdev_virtio_attach_controller '{{"name":"R","trtype":"vhost-kernel","traddr":"/dev/vhost-scsi","wwpn":"{WWPN}","dev_type":"scsi"}}'; echo "RC rpc_attach=$?"
vireo rpc -r /tmp/rpc.sock bdev_get_bdevs '{{"name":"Rt1l1"}}' | tr -d ' 
'; echo
vireo rpc -r /tmp/rpc.sock save_config | tr -d ' 
'; echo
vireo rpc -r /tmp/rpc.sock bdev_virtio_detach_controller '{{"name":"R"}}'; echo "RC rpc_detach=$?"
kill $S; wait $S
"#
    );
    cmd += "vireo bdevs -c /tmp/nowwpn.json; echo \"RC nowwpn=$?\"\n";
    cmd += "vireo bdevs -c /tmp/notvdpa.json; echo \"RC notvdpa=$?\"\n";
    // The backing files onto the disks the host checks.
    cmd += "dd if=/tmp/lun0 of=/dev/vda bs=1M 2>/dev/null && dd if=/tmp/lun1 of=/dev/vdb bs=1M 2>/dev/null && sync; echo \"RC copy=$?\"\n";
    let run = run_guest(
        &[
            "--mod",
            "vhost_scsi",
            "--mod",
            "target_core_file",
            "--blk-img",
            out0.to_str().unwrap(),
            "--blk-img",
            out1.to_str().unwrap(),
        ],
        &cmd,
    );
    check(&run, &[&out0, &out1]);
    for name in ["Kt1 ", "Kt1l1 "] {
        assert!(run.out.contains(name), "bdev {name} listed\n{}", run.out);
    }
    assert!(
        run.out.contains("FILEIO serial 5001405-vireo-1"),
        "{}",
        run.out
    );
    run.expect_rc("rpc_attach", 0);
    run.expect_rc("rpc_detach", 0);
    // bdev_get_bdevs's virtio object ("type", "path", "wwpn") and save_config's params
    // ("trtype", "traddr", "wwpn").
    for want in [
        r#""type":"vhost-kernel""#.to_string(),
        r#""path":"/dev/vhost-scsi""#.to_string(),
        r#""trtype":"vhost-kernel""#.to_string(),
        r#""traddr":"/dev/vhost-scsi""#.to_string(),
    ] {
        assert!(run.out.contains(&want), "{want} missing\n{}", run.out);
    }
    let wwpn = format!(r#""wwpn":"{WWPN}""#);
    assert!(run.out.matches(&wwpn).count() >= 2, "{}", run.out);
    run.expect_rc("nowwpn", 2);
    assert!(
        run.out
            .contains("WWPN naa.5001405000000099 not found: there is no /sys/kernel/config/target/vhost/naa.5001405000000099"),
        "{}",
        run.out
    );
    run.expect_rc("notvdpa", 2);
    assert!(
        run.out
            .contains("/dev/vhost-scsi is not a vhost-vdpa device"),
        "{}",
        run.out
    );
}

/// qemu-storage-daemon's VDUSE virtio-blk export (on a file in the guest) as
/// /dev/vhost-vdpa-0: the four workloads pass and the file holds the data; asking for
/// virtio-scsi on it is refused with the device's type.
#[test]
fn vhost_vdpa_on_a_vduse_export() {
    let dir = tempfile::tempdir().unwrap();
    let out = image(dir.path(), "vdpa", 16);
    let mut cmd = String::from(
        r#"
dd if=/dev/zero of=/tmp/vdpa.img bs=1M count=0 seek=16 2>/dev/null
qemu-storage-daemon --blockdev driver=file,node-name=f0,filename=/tmp/vdpa.img,discard=unmap \
  --export vduse-blk,id=v0,node-name=f0,name=vduse0,writable=on,num-queues=1 &
n=0; while [ ! -e /dev/vduse/vduse0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
vdpa dev add name vduse0 mgmtdev vduse; echo "RC vdpa=$?"
n=0; while [ ! -e /dev/vhost-vdpa-0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
"#,
    );
    cmd += &config(
        "c",
        r#""name":"V","trtype":"vdpa","traddr":"/dev/vhost-vdpa-0","dev_type":"blk""#,
    );
    cmd += &config(
        "scsi",
        r#""name":"V","trtype":"vdpa","traddr":"/dev/vhost-vdpa-0","dev_type":"scsi""#,
    );
    cmd += "vireo bdevs -c /tmp/c.json; echo \"RC bdevs=$?\"\n";
    cmd += &workloads("/tmp/c.json");
    cmd += &config(
        "notscsi",
        &format!(
            r#""name":"V","trtype":"vhost-kernel","traddr":"/dev/vhost-vdpa-0","wwpn":"{WWPN}","dev_type":"scsi""#
        ),
    );
    cmd += "vireo bdevs -c /tmp/scsi.json; echo \"RC scsi=$?\"\n";
    cmd += "vireo bdevs -c /tmp/notscsi.json; echo \"RC notscsi=$?\"\n";
    cmd += "dd if=/tmp/vdpa.img of=/dev/vda bs=1M 2>/dev/null && sync; echo \"RC copy=$?\"\n";
    // After the copy (it writes LBA 0): vireo's libblkio with libblkio's driver name and `path` the device.
    cmd += "blkio_hello virtio-blk-vhost-vdpa /dev/vhost-vdpa-0; echo \"RC capi=$?\"\n";
    let (lib, hello) = blkio_hello(dir.path());
    let run = run_guest(
        &[
            "--add",
            &format!("{}:/extra/lib/libblkio.so.1", lib.display()),
            "--add",
            &format!("{}:/extra/blkio_hello", hello.display()),
            "--kver",
            "6.12.95+deb12-amd64",
            "--mem",
            "1G",
            "--mod",
            "vduse",
            "--mod",
            "vhost_vdpa",
            "--add",
            "/usr/bin/qemu-storage-daemon",
            "--add",
            &vdpa_tool(),
            "--blk-img",
            out.to_str().unwrap(),
        ],
        &cmd,
    );
    run.expect_rc("vdpa", 0);
    check(&run, &[&out]);
    run.expect_rc("capi", 0);
    assert!(
        run.out
            .contains("hello from virtio-blk-vhost-vdpa through vireo"),
        "{}",
        run.out
    );
    run.expect_rc("scsi", 2);
    assert!(
        run.out
            .contains("/dev/vhost-vdpa-0 is a virtio-blk device, not virtio-scsi"),
        "{}",
        run.out
    );
    run.expect_rc("notscsi", 2);
    assert!(
        run.out
            .contains("/dev/vhost-vdpa-0 is not a vhost-scsi device"),
        "{}",
        run.out
    );
}

/// iproute2's `vdpa` (in /sbin or /usr/sbin).
fn vdpa_tool() -> String {
    for p in ["/sbin/vdpa", "/usr/sbin/vdpa"] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("iproute2's vdpa tool is missing: apt-get install iproute2 (see .ci/run)");
}

/// vireo's C library (stripped) and docs/examples/blkio_hello.c built against it, in
/// `dir`, for the guest (the program finds the library in /extra/lib).
fn blkio_hello(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    use std::process::Command;
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_vireo"))
        .parent()
        .unwrap();
    let lib = bin_dir.join("libblkio.so");
    assert!(
        lib.exists(),
        "{} is missing: build the C library first (cargo build -p vireo-capi; scripts/test.sh does)",
        lib.display()
    );
    let hello = dir.join("blkio_hello");
    let st = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&hello)
        .arg(repo().join("docs/examples/blkio_hello.c"))
        .arg("-I")
        .arg(repo().join("crates/capi/include"))
        .arg(&lib)
        .arg("-Wl,-rpath,/extra/lib")
        .status()
        .expect("cc runs");
    assert!(st.success(), "cc failed to build blkio_hello");
    let guest_lib = dir.join("libblkio.so.1");
    let st = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&lib)
        .arg(&guest_lib)
        .status()
        .expect("objcopy runs");
    assert!(st.success());
    (guest_lib, hello)
}
