//! vireo's NBD export (`vireo serve --nbd`) with QEMU's own NBD client (`qemu-img`,
//! `qemu-io`) in front and qemu-storage-daemon behind.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

struct Serve {
    child: Child,
    dir: tempfile::TempDir,
}

impl Serve {
    fn start(qsd: &Qsd, nbd: &str) -> Serve {
        Serve::start_with(qsd, nbd, &[])
    }

    /// `vireo serve` with more flags (`--nbd-timeout 3`, ...).
    fn start_with(qsd: &Qsd, nbd: &str, extra: &[&str]) -> Serve {
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
            .args(extra)
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
        if std::thread::panicking() {
            eprintln!(
                "vireo serve's log:\n{}",
                std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
            );
        }
    }
}

/// qemu-storage-daemon (its default null device) behind `vireo serve` with an
/// NBD unix socket and `extra` flags: (daemon, the socket's directory, socket, server).
fn unix_serve(extra: &[&str]) -> (Qsd, tempfile::TempDir, PathBuf, Serve) {
    let qsd = Qsd::start(QsdOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let sock = nbd_sock(dir.path());
    let s = Serve::start_with(&qsd, &format!("unix:{}", sock.display()), extra);
    (qsd, dir, sock, s)
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
    raw_client_to(sock, "VirtioBlk0")
}

/// Connect to `export` by hand (fixed newstyle, NO_ZEROES, OPT_GO sent, not answered).
fn raw_client_to(sock: &Path, export: &str) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let name = export.as_bytes();
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

/// A client that takes its replies a trickle at a time cannot hold the server's
/// payload memory: with --nbd-max-memory 64m, two 32 MiB READs read back 64 KiB a
/// second (progress, but under 1 MiB per --nbd-timeout) get the client closed, and
/// another client's READ, which waited for the memory, is served (any progress used to
/// keep the trickler, and every other READ and WRITE waited for as long as it liked).
#[test]
fn a_client_that_trickles_its_replies_cannot_hold_the_memory() {
    let (_qsd, _dir, sock, s) = unix_serve(&["--nbd-timeout", "2", "--nbd-max-memory", "64m"]);
    let (mut slow, _, _) = go(&sock, "VirtioBlk0");
    slow.write_all(&read_request(1, 0, 32 << 20)).unwrap();
    slow.write_all(&read_request(2, 32 << 20, 32 << 20))
        .unwrap();
    let trickle = std::thread::spawn(move || {
        let mut b = vec![0u8; 64 << 10];
        let mut got = 0usize;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            match slow.read(&mut b) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n,
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let (mut other, _, _) = go(&sock, "VirtioBlk0");
    other.write_all(&request(0, 0, 7, 0, 4096)).unwrap();
    assert_eq!(
        simple_reply(&mut other, 4096),
        (0, 7),
        "served once the trickler went"
    );
    let got = trickle.join().unwrap();
    assert!(
        got < 64 << 20,
        "the trickler was closed ({got} bytes taken)"
    );
    drop(s);
}

/// A controller whose bdev NBD clients used detaches once they have disconnected: the
/// export's I/O thread closes its channel with its last client (it used to keep it
/// until the device was gone, so the detach was refused for ever; found by
/// tests/rpc_properties.rs). While a client is connected the detach is refused.
#[test]
fn detach_after_the_nbd_clients_left() {
    let (_qsd, _dir, sock, s) = unix_serve(&[]);
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

/// One option reply: (type, data).
fn option_reply(c: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(
        &h[..8],
        &0x0003_e889_0455_65a9u64.to_be_bytes(),
        "option reply magic"
    );
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    c.read_exact(&mut d).unwrap();
    (ty, d)
}

/// A client by hand through NBD_OPT_GO's ACK: (stream, export size, transmission flags).
fn go(sock: &Path, export: &str) -> (UnixStream, u64, u16) {
    let mut c = raw_client_to(sock, export);
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (mut size, mut flags) = (0, 0);
    loop {
        let (ty, d) = option_reply(&mut c);
        assert_eq!(
            ty & 0x8000_0000,
            0,
            "export refused: {}",
            String::from_utf8_lossy(&d)
        );
        if ty == 3 && d.len() == 12 && d[..2] == [0, 0] {
            size = u64::from_be_bytes(d[2..10].try_into().unwrap());
            flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
        }
        if ty == 1 {
            return (c, size, flags);
        }
    }
}

/// A request header.
fn request(cmd: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// A simple reply's (error, handle); `data` bytes follow it when the error is 0.
fn simple_reply(c: &mut UnixStream, data: usize) -> (u32, u64) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
    let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
    if error == 0 && data > 0 {
        let mut d = vec![0u8; data];
        c.read_exact(&mut d).unwrap();
    }
    (error, u64::from_be_bytes(h[8..16].try_into().unwrap()))
}

const EPERM: u32 = 1;
const EINVAL: u32 = 22;

/// The NBD spec on a read-only export: it advertises neither WRITE_ZEROES, FUA nor
/// TRIM, and answers WRITE, TRIM and WRITE_ZEROES with EPERM; a command flag the
/// server does not know is EINVAL (TRIM used to succeed and WRITE_ZEROES to answer
/// ENOTSUP; unknown flags were ignored).
#[test]
fn a_read_only_export_follows_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let back = dir.path().join("ro.img");
    std::fs::File::create(&back)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let qsd = Qsd::start(QsdOpts {
        backend: Backend::File(back),
        read_only: true,
        ..Default::default()
    });
    let sock = nbd_sock(dir.path());
    let s = Serve::start(&qsd, &format!("unix:{}", sock.display()));
    let (mut c, size, flags) = go(&sock, "VirtioBlk0");
    assert_eq!(size, 16 << 20);
    assert_ne!(flags & 2, 0, "READ_ONLY advertised: {flags:#x}");
    for (bit, what) in [(8, "FUA"), (32, "TRIM"), (64, "WRITE_ZEROES")] {
        assert_eq!(flags & bit, 0, "{what} advertised on a read-only export");
    }
    c.write_all(&request(4, 0, 1, 0, 4096)).unwrap();
    assert_eq!(simple_reply(&mut c, 0), (EPERM, 1), "TRIM");
    c.write_all(&request(6, 0, 2, 0, 4096)).unwrap();
    assert_eq!(simple_reply(&mut c, 0), (EPERM, 2), "WRITE_ZEROES");
    let mut w = request(1, 0, 3, 0, 4096);
    w.extend_from_slice(&[7u8; 4096]);
    c.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut c, 0), (EPERM, 3), "WRITE");
    c.write_all(&request(0, 0x80, 4, 0, 4096)).unwrap();
    assert_eq!(
        simple_reply(&mut c, 4096),
        (EINVAL, 4),
        "READ, unknown flag"
    );
    c.write_all(&request(0, 0, 5, 0, 4096)).unwrap();
    assert_eq!(simple_reply(&mut c, 4096), (0, 5), "READ");
    drop(s);
}

const ENOSPC: u32 = 28;

/// Requests past the end of the export: a WRITE or WRITE_ZEROES is ENOSPC (the spec's
/// answer to a write there), a READ, TRIM or BLOCK_STATUS is EINVAL (it used to be
/// ENOSPC for all).
#[test]
fn requests_past_the_end_get_the_specs_error_codes() {
    let (_qsd, _dir, sock, s) = unix_serve(&[]);
    let (mut c, size, flags) = go(&sock, "VirtioBlk0");
    assert_ne!(
        flags & 64,
        0,
        "qsd's virtio-blk has write-zeroes: advertised"
    );
    let end = size;
    c.write_all(&request(0, 0, 1, end, 4096)).unwrap();
    assert_eq!(simple_reply(&mut c, 0), (EINVAL, 1), "READ past the end");
    let mut w = request(1, 0, 2, end - 2048, 4096);
    w.extend_from_slice(&[7u8; 4096]);
    c.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut c, 0), (ENOSPC, 2), "WRITE past the end");
    c.write_all(&request(6, 0, 3, end, 4096)).unwrap();
    assert_eq!(
        simple_reply(&mut c, 0),
        (ENOSPC, 3),
        "WRITE_ZEROES past the end"
    );
    c.write_all(&request(4, 0, 4, end, 4096)).unwrap();
    assert_eq!(simple_reply(&mut c, 0), (EINVAL, 4), "TRIM past the end");
    c.write_all(&request(0, 0, 5, end - 4096, 4096)).unwrap();
    assert_eq!(simple_reply(&mut c, 4096), (0, 5), "the last block reads");
    drop(s);
}

/// Connections that never finish a handshake (no certificate is needed to open one)
/// are capped on their own: 80 of them neither fill the server nor make it close a
/// served client that is idle beyond --nbd-timeout (they used to count as clients,
/// and the 65th made the server full, which closes idle clients).
#[test]
fn stalled_handshakes_do_not_crowd_out_served_clients() {
    let (_qsd, _dir, sock, s) = unix_serve(&["--nbd-timeout", "2"]);
    let (mut served, _, _) = go(&sock, "VirtioBlk0");
    // The served client is idle beyond the timeout from 2 s on; the stalled handshakes,
    // opened at 1.5 s, last until their own deadline at 3.5 s.
    std::thread::sleep(Duration::from_millis(1500));
    let silent: Vec<UnixStream> = (0..80)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    served.write_all(&request(0, 0, 1, 0, 4096)).unwrap();
    assert_eq!(
        simple_reply(&mut served, 4096),
        (0, 1),
        "the idle served client was kept"
    );
    drop(silent);
    // New clients are served again once the stalled handshakes are gone.
    served_again(&sock);
    drop(s);
}

/// Fill the server (`already` clients connected) with clients by hand up to 64; the
/// next one is told it is full (an option error that says "full"), not just closed.
fn fill_server(sock: &Path, already: usize) -> Vec<UnixStream> {
    let clients: Vec<UnixStream> = (already..64).map(|_| go(sock, "VirtioBlk0").0).collect();
    let mut c = raw_client(sock);
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (ty, msg) = option_reply(&mut c);
    let msg = String::from_utf8_lossy(&msg).into_owned();
    assert!(ty & 0x8000_0000 != 0, "a 65th client was served");
    assert!(msg.contains("full"), "the refusal says why: {msg:?}");
    clients
}

/// Wait until a new client is served again (a guard against a hang, not a timing
/// assertion).
fn served_again(sock: &Path) {
    let sock = sock.to_path_buf();
    within(120, "a new client is served", move || loop {
        let mut c = raw_client(&sock);
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let (ty, _) = option_reply(&mut c);
        if ty & 0x8000_0000 == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    });
}

/// 64 clients that finished the handshake fill the server and the next one is told
/// so; when the 64 stall halfway through a request (8 of its 28 bytes), they are
/// dropped after --nbd-timeout and new clients are served again (they used to lock
/// every new client out for ever, and a refused client was closed without a word).
#[test]
fn stalled_clients_time_out_and_a_full_server_says_so() {
    let (_qsd, _dir, sock, s) = unix_serve(&["--nbd-timeout", "2"]);
    let mut stalled = fill_server(&sock, 0);
    for c in &mut stalled {
        c.write_all(&request(0, 0, 9, 0, 4096)[..8]).unwrap();
    }
    served_again(&sock);
    // The stalled clients were closed.
    let mut buf = [0u8; 1];
    for c in &mut stalled {
        assert_eq!(
            c.read(&mut buf).unwrap_or(0),
            0,
            "a stalled client was closed"
        );
    }
    drop(s);
}

/// Idle clients may stay as long as they like while there is room (no idle limit by
/// default), but once the server is full and turns a client away, those idle for
/// longer than --nbd-timeout are closed: idle clients cannot lock new ones out either.
#[test]
fn a_full_server_closes_clients_idle_beyond_the_timeout() {
    let (_qsd, _dir, sock, s) = unix_serve(&["--nbd-timeout", "2"]);
    let (mut first, _, _) = go(&sock, "VirtioBlk0");
    std::thread::sleep(Duration::from_secs(3));
    first.write_all(&request(0, 0, 1, 0, 4096)).unwrap();
    assert_eq!(
        simple_reply(&mut first, 4096),
        (0, 1),
        "idle with room: kept"
    );
    let _idle = fill_server(&sock, 1);
    served_again(&sock);
    drop(s);
}

/// The DMA memory (memfds named vireo-dma-*) `pid` holds, in bytes allocated (each
/// file once, however many descriptors it has open).
fn dma_bytes(pid: u32) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy().contains("memfd:vireo-dma") {
            if let Ok(m) = std::fs::metadata(e.path()) {
                if seen.insert(m.ino()) {
                    total += m.blocks() * 512;
                }
            }
        }
    }
    total
}

/// Clients that queue big READs and never read the replies cannot make the server hold
/// more than its memory budget together, and the memory goes back once they leave
/// (16 clients with four 32 MiB READs each used to pin 1 GiB, for ever).
#[test]
fn memory_for_clients_is_bounded_and_given_back() {
    let (_qsd, _dir, sock, s) = unix_serve(&[]);
    let pid = s.child.id();
    let clients: Vec<UnixStream> = (0..16)
        .map(|_| {
            let (mut c, _, _) = go(&sock, "VirtioBlk0");
            for k in 0..4u64 {
                c.write_all(&request(0, 0, k, k << 25, 32 << 20)).unwrap();
            }
            c
        })
        .collect();
    // Whatever the server could read of the requests is in flight or answered (and
    // stuck in the sockets) within a few seconds; the peak is watched meanwhile.
    let mut peak = 0;
    for _ in 0..40 {
        peak = peak.max(dma_bytes(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The budget is 256 MiB of payload; DMA regions are allocated whole and double as
    // they are added: 4 + 8 + 16 MiB (the first region and two too small for a 32 MiB
    // buffer) + 32 + 64 + 128 + 256 MiB at most.
    assert!(
        peak <= 512 << 20,
        "the clients made the server hold {} MiB of DMA memory",
        peak >> 20
    );
    drop(clients);
    within(
        60,
        "the memory goes back after the clients left",
        move || loop {
            let now = dma_bytes(pid);
            if now < 48 << 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        },
    );
    drop(s);
}

/// `nbd_stop_disk` disconnects the export's clients, and then the controller detaches
/// (the export's I/O thread used to keep its channel); a detach refused because the
/// controller is busy answers -EBUSY (-16), not invalid params.
#[test]
fn nbd_stop_disk_lets_the_controller_detach() {
    let (_qsd, _dir, sock, s) = unix_serve(&[]);
    let (mut c, _, _) = go(&sock, "VirtioBlk0");
    c.write_all(&request(0, 0, 1, 0, 4096)).unwrap();
    assert_eq!(simple_reply(&mut c, 4096), (0, 1));
    let detach = || s.rpc("bdev_virtio_detach_controller", r#"{"name":"VirtioBlk0"}"#);
    let o = detach();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "detach while a client is connected");
    assert!(err.contains("error -16"), "busy is -EBUSY: {err}");
    let o = s.rpc("nbd_stop_disk", r#"{"nbd_device":"VirtioBlk0"}"#);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The client is disconnected.
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap_or(0), 0, "the client was closed");
    // (A guard against a hang, not a timing assertion: the detach works once the
    // export's thread has closed its channel.)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let o = detach();
        if o.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the controller still does not detach after nbd_stop_disk: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An export goes with its bdev: after a detach neither nbd_get_disks nor NBD_OPT_LIST
/// shows it, and a new bdev of the name the export had is exported, not hidden behind
/// the dead export.
#[test]
fn exports_go_with_their_bdev() {
    let (qsd, _dir, sock, s) = unix_serve(&[]);
    let o = s.rpc(
        "nbd_start_disk",
        r#"{"bdev_name":"VirtioBlk0","nbd_device":"VirtioBlk1"}"#,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = s.rpc("bdev_virtio_detach_controller", r#"{"name":"VirtioBlk0"}"#);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = s.rpc("nbd_get_disks", "{}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]), "exports of a detached bdev");
    // NBD_OPT_LIST by hand: no names.
    let mut c = UnixStream::connect(&sock).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&3u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    c.write_all(&opt).unwrap();
    let (ty, _) = option_reply(&mut c);
    assert_eq!(ty, 1, "LIST lists nothing");
    // A new controller named like the dead export.
    let params = serde_json::to_string(&blk_params("VirtioBlk1", &qsd.sock, 1)).unwrap();
    let o = s.rpc("bdev_virtio_attach_controller", &params);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = s.rpc("nbd_get_disks", "{}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!([{"nbd_device": "VirtioBlk1", "bdev_name": "VirtioBlk1"}])
    );
    ok_io(
        &url(&sock, "VirtioBlk1"),
        &["write -P 0x5a 0 64k", "read 0 64k"],
    );
}

/// A `vireo serve` that fails to start (its RPC socket is in use) leaves no NBD socket
/// behind.
#[test]
fn a_serve_that_cannot_start_leaves_no_nbd_socket() {
    let dir = tempfile::tempdir().unwrap();
    let rpc = dir.path().join("rpc.sock");
    let _busy = std::os::unix::net::UnixListener::bind(&rpc).unwrap();
    let sock = nbd_sock(dir.path());
    let o = vireo()
        .args(["serve", "-r"])
        .arg(&rpc)
        .arg("--nbd")
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_fails_with(&o, "in use");
    assert!(!sock.exists(), "the NBD socket was left behind");
}

/// Whether `tool` runs; a test that needs it and does not find it says so loudly.
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("********************************************************************");
        eprintln!("SKIPPED: {tool} is not installed (CI installs it: see .ci/run)");
        eprintln!("********************************************************************");
    }
    ok
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA in `dir` (ca-cert.pem, ca-key.pem), EC P-256, valid for two days.
fn make_ca(dir: &Path, cn: &str) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// `out`/{ROLE-cert.pem, ROLE-key.pem} (role server or client) signed by the CA in
/// `ca`, and the CA's certificate as `out`/ca-cert.pem: a directory as QEMU's
/// tls-creds-x509 reads it.
fn make_creds(ca: &Path, out: &Path, role: &str) {
    std::fs::create_dir_all(out).unwrap();
    let usage = if role == "server" {
        "serverAuth"
    } else {
        "clientAuth"
    };
    std::fs::write(
        out.join("ext.cnf"),
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        ),
    )
    .unwrap();
    let key = format!("{role}-key.pem");
    let cert = format!("{role}-cert.pem");
    openssl(
        out,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            "req.csr",
            "-subj",
            &format!("/CN=vireo-test-{role}"),
        ],
    );
    let ca_cert = ca.join("ca-cert.pem");
    let ca_key = ca.join("ca-key.pem");
    openssl(
        out,
        &[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            ca_cert.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-set_serial",
            "2",
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            "ext.cnf",
        ],
    );
    std::fs::copy(&ca_cert, out.join("ca-cert.pem")).unwrap();
}

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA in `d`/ca, server and client credentials signed by it (`d`/server,
/// `d`/client), a qemu-storage-daemon file of `mib` MiB, and `vireo serve` exporting it
/// over TCP on a free loopback port with TLS required: (the daemon's directory, file,
/// daemon, port, server).
fn tls_serve(d: &Path, mib: u64) -> (tempfile::TempDir, PathBuf, Qsd, u16, Serve) {
    make_ca(&d.join("ca"), "vireo-test-ca");
    make_creds(&d.join("ca"), &d.join("server"), "server");
    make_creds(&d.join("ca"), &d.join("client"), "client");
    let (back_dir, back, qsd) = file_qsd(mib);
    let port = free_port();
    let creds = d.join("server");
    let s = Serve::start_with(
        &qsd,
        &format!("tcp:127.0.0.1:{port}"),
        &["--nbd-tls-creds", creds.to_str().unwrap()],
    );
    (back_dir, back, qsd, port, s)
}

/// TLS (NBD_OPT_STARTTLS) with certificates the test makes: qemu-img writes an image
/// through the export and qemu-io reads it back with the right CA; a client whose CA
/// (and certificate) come from another CA is refused, and so is a client without TLS
/// (`--nbd-tls require`, the default with credentials).
#[test]
fn tls_with_the_right_ca_and_refused_with_a_wrong_one() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_back_dir, _back, qsd, port, s) = tls_serve(d, 64);
    make_ca(&d.join("other-ca"), "vireo-other-ca");
    make_creds(&d.join("other-ca"), &d.join("stranger"), "client");
    let src = d.join("src.raw");
    std::fs::write(&src, vec![0x5au8; 4 << 20]).unwrap();
    let object = |creds: &Path| {
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        )
    };
    let target = format!(
        "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export=VirtioBlk0,file.tls-creds=tls0"
    );
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "--object"])
        .arg(object(&d.join("client")))
        .arg("--target-image-opts")
        .arg(&src)
        .arg(&target));
    let qemu_io_tls = |creds: &Path, cmd: &str| {
        Command::new("qemu-io")
            .arg("--object")
            .arg(object(creds))
            .args(["--image-opts", &target, "-c", cmd])
            .output()
            .expect("qemu-io runs")
    };
    let o = qemu_io_tls(&d.join("client"), "read -P 0x5a 0 4M");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !text.contains("failed") && !text.contains("verification"),
        "read back over TLS: {text}"
    );
    // A client trusting another CA (with a certificate of that CA) is refused.
    let o = qemu_io_tls(&d.join("stranger"), "read 0 4k");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() || text.contains("failed"),
        "a client with the wrong CA was served: {text}"
    );
    assert!(!text.contains("read 4096/4096"), "{text}");
    // A client without TLS is refused.
    let o = qemu_io(
        &format!("nbd://127.0.0.1:{port}/VirtioBlk0"),
        &["read 0 4k"],
    );
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !text.contains("read 4096/4096"),
        "a plain client was served: {text}"
    );
    assert!(
        text.contains("TLS"),
        "the refusal says TLS is required: {text}"
    );
    drop(s);
    // --nbd-tls allow: plain clients and TLS clients alike.
    let creds = d.join("server");
    let port = free_port();
    let s = Serve::start_with(
        &qsd,
        &format!("tcp:127.0.0.1:{port}"),
        &[
            "--nbd-tls-creds",
            creds.to_str().unwrap(),
            "--nbd-tls",
            "allow",
        ],
    );
    ok_io(
        &format!("nbd://127.0.0.1:{port}/VirtioBlk0"),
        &["read -P 0x5a 0 64k"],
    );
    let target = format!(
        "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export=VirtioBlk0,file.tls-creds=tls0"
    );
    let o = Command::new("qemu-io")
        .arg("--object")
        .arg(object(&d.join("client")))
        .args(["--image-opts", &target, "-c", "read -P 0x5a 0 64k"])
        .output()
        .expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !text.contains("failed"),
        "TLS with allow: {text}"
    );
    drop(s);
}

/// An option reply from any stream: (type, data).
fn option_reply_from(c: &mut impl Read) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    c.read_exact(&mut d).unwrap();
    (ty, d)
}

/// A TLS session the server ends (after NBD_CMD_DISC) ends with a close_notify alert,
/// so the client sees an orderly end of the stream, not a truncation: a client by
/// hand over rustls (STARTTLS, OPT_GO, DISC), whose read of the end fails with
/// UnexpectedEof when the server closes the socket without the alert.
#[test]
fn a_tls_session_ends_with_close_notify() {
    if !have("openssl") {
        return;
    }
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_back_dir, _back, _qsd, port, s) = tls_serve(d, 16);
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut hello = [0u8; 18];
    tcp.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    tcp.write_all(&3u32.to_be_bytes()).unwrap();
    // NBD_OPT_STARTTLS (5), no data: acknowledged, then the TLS handshake.
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&5u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    tcp.write_all(&opt).unwrap();
    let (ty, _) = option_reply_from(&mut tcp);
    assert_eq!(ty, 1, "STARTTLS acknowledged");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(d.join("client/ca-cert.pem")).unwrap())
        .unwrap();
    let certs = vec![CertificateDer::from_pem_file(d.join("client/client-cert.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(d.join("client/client-key.pem")).unwrap();
    // ring, as the server uses (deprecated only for lacking post-quantum exchange).
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // NBD_OPT_GO (7) for VirtioBlk0, inside TLS.
    let name = b"VirtioBlk0";
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    opt.extend_from_slice(&0u16.to_be_bytes());
    tls.write_all(&opt).unwrap();
    loop {
        let (ty, data) = option_reply_from(&mut tls);
        assert_eq!(ty & 0x8000_0000, 0, "{}", String::from_utf8_lossy(&data));
        if ty == 1 {
            break;
        }
    }
    // A read, to be sure the session carries I/O, then NBD_CMD_DISC (2).
    tls.write_all(&request(0, 0, 7, 0, 4096)).unwrap();
    let mut h = [0u8; 16];
    tls.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(&h[4..8], &[0, 0, 0, 0], "read error");
    let mut data = vec![0u8; 4096];
    tls.read_exact(&mut data).unwrap();
    tls.write_all(&request(2, 0, 8, 0, 0)).unwrap();
    let mut rest = Vec::new();
    match tls.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "nothing follows DISC"),
        Err(e) => panic!("the server ended the TLS session without close_notify: {e}"),
    }
    drop(s);
}

/// Plain TCP on an address other than loopback is refused unless --nbd-insecure;
/// the unix socket is the owner's only (0600).
#[test]
fn plain_tcp_beyond_loopback_needs_nbd_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let rpc = dir.path().join("rpc.sock");
    let port = free_port();
    let o = vireo()
        .args(["serve", "-r"])
        .arg(&rpc)
        .args(["--nbd", &format!("tcp:0.0.0.0:{port}")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_fails_with(&o, "--nbd-insecure");
    assert!(!rpc.exists(), "the RPC socket was left behind");
    let mut child = vireo()
        .args(["serve", "-r"])
        .arg(&rpc)
        .args(["--nbd", &format!("tcp:0.0.0.0:{port}"), "--nbd-insecure"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&rpc);
    let _ = child.kill();
    let _ = child.wait();
    let sock = nbd_sock(dir.path());
    let mut child = vireo()
        .args(["serve", "-r"])
        .arg(dir.path().join("rpc2.sock"))
        .args(["--nbd", &format!("unix:{}", sock.display())])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode, 0o600, "the NBD socket is the owner's only");
}

/// `len` bytes of xorshift noise (deterministic for `seed`).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// fio's nbd engine (libnbd) writes and verifies with crc32c at QD 1 and 32, four jobs
/// (four connections, multi-conn) on one export, each on its own quarter.
#[test]
fn fio_verifies_through_the_export_with_four_connections() {
    if !have("fio") {
        return;
    }
    let (_back_dir, _back, qsd) = file_qsd(64);
    let dir = tempfile::tempdir().unwrap();
    let sock = nbd_sock(dir.path());
    let s = Serve::start(&qsd, &format!("unix:{}", sock.display()));
    for qd in [1, 32] {
        let o = Command::new("fio")
            // (fio's verify state files go to the test's directory, not the crate's.)
            .current_dir(dir.path())
            .args([
                "--name=verify",
                "--verify_state_save=0",
                "--ioengine=nbd",
                &format!("--uri={}", url(&sock, "VirtioBlk0")),
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--size=8m",
                "--offset_increment=16m",
                "--numjobs=4",
                &format!("--iodepth={qd}"),
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=json",
            ])
            .output()
            .expect("fio runs");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "fio QD{qd}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        // fio's nbd engine prints a line before the JSON.
        let json: serde_json::Value =
            serde_json::from_str(&out[out.find('{').expect("fio JSON")..]).unwrap();
        let jobs = json["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 4);
        for j in jobs {
            assert_eq!(j["error"], 0, "QD{qd}: {j}");
            assert!(
                j["write"]["io_bytes"].as_u64().unwrap() >= 8 << 20,
                "QD{qd}: {j}"
            );
            assert!(
                j["read"]["io_bytes"].as_u64().unwrap() >= 8 << 20,
                "QD{qd}: verified"
            );
        }
    }
    drop(s);
}

/// nbdcopy copies a random 256 MiB file in and out with four connections (multi-conn),
/// byte for byte; nbdinfo shows the export (its size, multi-conn, the list, the map
/// through base:allocation).
#[test]
fn nbdcopy_round_trip_with_multi_conn_and_nbdinfo() {
    if !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let (_back_dir, back, qsd) = file_qsd(256);
    let dir = tempfile::tempdir().unwrap();
    let sock = nbd_sock(dir.path());
    let s = Serve::start(&qsd, &format!("unix:{}", sock.display()));
    let u = url(&sock, "VirtioBlk0");
    let data = noise(256 << 20, 0x9e37_79b9_7f4a_7c15);
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--flush"])
        .arg(&src)
        .arg(&u));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the backing file holds the copy"
    );
    let out = dir.path().join("out.raw");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(&u)
        .arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "copied out byte for byte"
    );
    let o = run(Command::new("nbdinfo").arg("--json").arg(&u));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "VirtioBlk0", "{v}");
    assert_eq!(e["export-size"], 256u64 << 20, "{v}");
    assert_eq!(e["can_multi_conn"], true, "{v}");
    let o = run(Command::new("nbdinfo").arg("--list").arg(&u));
    assert!(String::from_utf8_lossy(&o.stdout).contains("VirtioBlk0"));
    let o = run(Command::new("nbdinfo").arg("--map").arg(&u));
    let map = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        map.lines().count() == 1 && map.contains("data"),
        "one data extent: {map}"
    );
    drop(s);
}

/// Many connections at once to a bdev whose controller has one queue, over four I/O
/// threads: each is served (the threads without the queue hand their clients to the
/// one that has it, or is opening it; a client that came while the channel was being
/// opened used to be closed).
#[test]
fn simultaneous_clients_share_a_single_queue() {
    let (_qsd, _dir, sock, s) = unix_serve(&["--nbd-threads", "4"]);
    for round in 0..5 {
        let clients: Vec<_> = (0..12)
            .map(|k| {
                let sock = sock.clone();
                std::thread::spawn(move || {
                    let (mut c, _, _) = go(&sock, "VirtioBlk0");
                    c.write_all(&request(0, 0, k, k << 12, 4096)).unwrap();
                    simple_reply(&mut c, 4096)
                })
            })
            .collect();
        for (k, t) in clients.into_iter().enumerate() {
            let r = t.join().expect("a client was not served");
            assert_eq!(r, (0, k as u64), "round {round}");
        }
    }
    drop(s);
}

/// --nbd-idle-timeout closes a client with nothing outstanding; one that keeps sending
/// requests stays.
#[test]
fn idle_clients_are_closed_after_nbd_idle_timeout() {
    let (_qsd, _dir, sock, s) = unix_serve(&["--nbd-idle-timeout", "2"]);
    let (mut idle, _, _) = go(&sock, "VirtioBlk0");
    let (mut busy, _, _) = go(&sock, "VirtioBlk0");
    for k in 0..30u64 {
        busy.write_all(&request(0, 0, k, 0, 4096)).unwrap();
        assert_eq!(
            simple_reply(&mut busy, 4096),
            (0, k),
            "a busy client is served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut b = [0u8; 1];
    assert_eq!(
        idle.read(&mut b).unwrap_or(0),
        0,
        "the idle client was closed"
    );
    drop(s);
}
