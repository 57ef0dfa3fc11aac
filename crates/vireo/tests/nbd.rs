//! vireo's NBD export (`vireo serve --nbd`) with QEMU's own NBD client (`qemu-img`,
//! `qemu-io`) in front and qemu-storage-daemon behind.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::*;

struct Serve {
    child: Child,
    dir: tempfile::TempDir,
}

impl Serve {
    fn start(qsd: &Qsd, nbd: &str) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let conf = write_config(
            dir.path(),
            "c.json",
            &[blk_params("VirtioBlk0", &qsd.sock, 1)],
        );
        let rpc = dir.path().join("rpc.sock");
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let child = vireo()
            .args(["serve", "-c"])
            .arg(&conf)
            .arg("-r")
            .arg(&rpc)
            .args(["--nbd", nbd])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for_socket(&rpc);
        Serve { child, dir }
    }

    fn rpc(&self, method: &str, params: &str) -> Output {
        vireo()
            .args(["rpc", "-r"])
            .arg(self.dir.path().join("rpc.sock"))
            .arg(method)
            .arg(params)
            .output()
            .unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nbd_sock(dir: &Path) -> PathBuf {
    dir.join("nbd.sock")
}

fn url(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().expect("runs");
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn qemu_io(target: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(target);
    c.output().expect("qemu-io runs")
}

fn ok_io(target: &str, cmds: &[&str]) -> String {
    let o = qemu_io(target, cmds);
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "{cmds:?}: {text}"
    );
    text
}

/// qemu-storage-daemon exporting a sparse file of `mib` MiB: (its dir, the file, qsd).
fn file_qsd(mib: u64) -> (tempfile::TempDir, PathBuf, Qsd) {
    let dir = tempfile::tempdir().unwrap();
    let back = dir.path().join("back.img");
    std::fs::File::create(&back)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let qsd = Qsd::start(QsdOpts {
        backend: Backend::File(back.clone()),
        ..Default::default()
    });
    (dir, back, qsd)
}

/// Connect to the export `VirtioBlk0` by hand (fixed newstyle, NO_ZEROES, OPT_GO).
fn raw_client(sock: &Path) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let name = b"VirtioBlk0";
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    opt.extend_from_slice(&0u16.to_be_bytes());
    c.write_all(&opt).unwrap();
    c
}

/// A READ request of `len` bytes at `offset`.
fn read_request(handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// The issue's acceptance: a 256 MiB image copied in through the export of a
/// qemu-storage-daemon bdev compares identical (through the export and in the backing
/// file); a discard punches a hole in the backing file; write-zeroes reads back zeros.
#[test]
fn qemu_img_copies_through_the_export_and_discard_punches_a_hole() {
    let (_back_dir, back, qsd) = file_qsd(256);
    let dir = tempfile::tempdir().unwrap();
    let sock = nbd_sock(dir.path());
    let s = Serve::start(&qsd, &format!("unix:{}", sock.display()));
    // A source image: random data, a pattern, zeros.
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 256 << 20];
    let mut x = 0x1234_5678_9abc_def0u64;
    for (i, b) in data[..(96 << 20)].iter_mut().enumerate() {
        if i % 8 == 0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        *b = (x >> ((i % 8) * 8)) as u8;
    }
    data[(128 << 20)..(130 << 20)].fill(0xa5);
    std::fs::write(&src, &data).unwrap();
    let u = url(&sock, "VirtioBlk0");
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&u));
    let o = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&u));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Images are identical"));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the backing file holds the image"
    );

    let before = std::fs::metadata(&back).unwrap().blocks();
    ok_io(
        &u,
        &[
            "discard 0 64M",
            "write -z 128M 1M",
            "read -P 0 128M 1M",
            "read -P 0xa5 129M 1M",
        ],
    );
    let after = std::fs::metadata(&back).unwrap().blocks();
    assert!(
        after + (60 << 20) / 512 <= before,
        "discard punched a hole: {before} -> {after} blocks"
    );
    let back_data = std::fs::read(&back).unwrap();
    assert!(back_data[..(64 << 20)].iter().all(|&b| b == 0));
    assert!(back_data[(128 << 20)..(129 << 20)].iter().all(|&b| b == 0));
    drop(s);
}

/// Several clients at once (each writes and verifies its own region with FUA and
/// flush), a client that disconnects with requests in flight, a garbage handshake,
/// exports managed by RPC, and TCP.
#[test]
fn many_clients_rude_clients_rpc_and_tcp() {
    let (_back_dir, back, qsd) = file_qsd(512);
    let dir = tempfile::tempdir().unwrap();
    let sock = nbd_sock(dir.path());
    let s = Serve::start(&qsd, &format!("unix:{}", sock.display()));
    let u = url(&sock, "VirtioBlk0");
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let u = u.clone();
            std::thread::spawn(move || {
                let off = format!("{}M", i * 64);
                for k in 0..20u32 {
                    let p = (i * 20 + k) % 250 + 1;
                    ok_io(
                        &u,
                        &[
                            &format!("write -f -P {p} {off} 4M"),
                            "flush",
                            &format!("read -P {p} {off} 4M"),
                        ],
                    );
                }
            })
        })
        .collect();
    // A client that leaves mid-request.
    for _ in 0..5 {
        let mut c = raw_client(&sock);
        for k in 0..8u64 {
            c.write_all(&read_request(k, k << 20, 1 << 20)).unwrap();
        }
        drop(c);
    }
    // Garbage instead of a handshake.
    let mut c = UnixStream::connect(&sock).unwrap();
    let _ = c.write_all(&[0xff; 64]);
    drop(c);
    for t in clients {
        t.join().unwrap();
    }
    // Still serving.
    ok_io(&u, &["write -P 0x33 300M 64k", "read -P 0x33 300M 64k"]);
    // Every client's last pattern is in the backing file.
    let data = std::fs::read(&back).unwrap();
    for i in 0..4u32 {
        let p = ((i * 20 + 19) % 250 + 1) as u8;
        let at = (i as usize * 64) << 20;
        assert!(
            data[at..at + (4 << 20)].iter().all(|&b| b == p),
            "client {i}'s region"
        );
    }
    // RPC: stop the export, it is gone; start it under another name.
    let o = s.rpc("nbd_stop_disk", r#"{"nbd_device":"VirtioBlk0"}"#);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !qemu_io(&u, &["read 0 4k"]).status.success(),
        "a stopped export is refused"
    );
    let o = s.rpc(
        "nbd_start_disk",
        r#"{"bdev_name":"VirtioBlk0","nbd_device":"disk-a"}"#,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok_io(
        &url(&sock, "disk-a"),
        &["write -P 0x44 0 64k", "read 0 64k"],
    );
    let o = s.rpc("nbd_get_disks", "{}");
    let listed = String::from_utf8_lossy(&o.stdout);
    assert!(
        listed.contains("disk-a") && !listed.contains("\"nbd_device\": \"VirtioBlk0\""),
        "{listed}"
    );
    let o = s.rpc("nbd_start_disk", r#"{"bdev_name":"nope"}"#);
    assert!(!o.status.success());
    drop(s);

    // TCP.
    let port = 20000 + (std::process::id() % 20000);
    let s = Serve::start(&qsd, &format!("tcp:127.0.0.1:{port}"));
    ok_io(
        &format!("nbd://127.0.0.1:{port}/VirtioBlk0"),
        &["write -P 0x55 1M 64k", "read 1M 64k"],
    );
    drop(s);
}

#[test]
fn bad_nbd_addresses_are_clear_errors() {
    let o = vireo()
        .args(["serve", "-r", "/tmp/x.sock", "--nbd", "ftp:x"])
        .output()
        .unwrap();
    assert_fails_with(&o, "unix:PATH or tcp:HOST:PORT");
    let o = vireo()
        .args([
            "serve",
            "-r",
            "/tmp/vireo-nbd-test-rpc.sock",
            "--nbd",
            "unix:/nonexistent-dir/x.sock",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A client that floods READs and never reads its replies cannot make the server
/// buffer without bound: its reader stops at the per-client limit, and other clients
/// are served meanwhile.
#[test]
fn a_client_that_never_reads_replies_is_held_back() {
    let qsd = Qsd::start(QsdOpts {
        backend: Backend::Null(1 << 30),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let sock = nbd_sock(dir.path());
    let s = Serve::start(&qsd, &format!("unix:{}", sock.display()));
    let mut c = raw_client(&sock);
    // 2000 READs of 1 MiB (2 GiB of replies) in the background; nobody reads them.
    c.set_write_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    let flood = std::thread::spawn(move || {
        let mut sent = 0u32;
        for k in 0..2000u64 {
            if c.write_all(&read_request(k, (k % 512) << 20, 1 << 20))
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        (sent, c)
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    // Another client is served meanwhile.
    ok_io(
        &url(&sock, "VirtioBlk0"),
        &["write -P 0x21 0 64k", "read 0 64k"],
    );
    let (sent, c) = flood.join().unwrap();
    assert!(
        sent < 2000,
        "the server stopped reading the flood ({sent} sent)"
    );
    drop(c);
    // And it is still serving after the flooder leaves.
    ok_io(&url(&sock, "VirtioBlk0"), &["read 0 64k"]);
    drop(s);
}

/// A controller whose bdev NBD clients used detaches once they have disconnected: the
/// export's I/O thread closes its channel with its last client (it used to keep it
/// until the device was gone, so the detach was refused for ever; found by
/// tests/rpc_properties.rs). While a client is connected the detach is refused.
#[test]
fn detach_after_the_nbd_clients_left() {
    let qsd = Qsd::start(QsdOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let sock = nbd_sock(dir.path());
    let s = Serve::start(&qsd, &format!("unix:{}", sock.display()));
    let detach = || s.rpc("bdev_virtio_detach_controller", r#"{"name":"VirtioBlk0"}"#);
    let client = || {
        let mut c = raw_client(&sock);
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        // The handshake's replies, up to NBD_REP_ACK; then one READ answered (the I/O
        // thread has its channel).
        loop {
            let mut h = [0u8; 20];
            c.read_exact(&mut h).unwrap();
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            c.read_exact(&mut d).unwrap();
            assert_eq!(ty & 0x8000_0000, 0, "export refused");
            if ty == 1 {
                break;
            }
        }
        c.write_all(&read_request(1, 0, 4096)).unwrap();
        let mut r = vec![0u8; 16 + 4096];
        c.read_exact(&mut r).unwrap();
        assert_eq!(&r[4..8], &[0, 0, 0, 0], "READ failed");
        c
    };
    let a = client();
    let b = client();
    let o = detach();
    assert!(!o.status.success(), "detach while clients are connected");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("open I/O channel"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    drop(a);
    // One client left: still in use.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !detach().status.success(),
        "detach while a client is connected"
    );
    drop(b);
    let t0 = std::time::Instant::now();
    loop {
        let o = detach();
        if o.status.success() {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(3),
            "the controller is still in use 3 s after its NBD clients left: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = s.rpc("bdev_get_bdevs", "{}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}
