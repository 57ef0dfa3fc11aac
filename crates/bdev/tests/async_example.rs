//! `examples/async_verify.rs` against qemu-storage-daemon (file backend), in both
//! driver modes: tokio's reactor on the completion eventfd, and the polling driver.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The example binary `cargo test` built beside this test.
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let p = dir.join("examples/async_verify");
    assert!(p.exists(), "{} (cargo test builds examples)", p.display());
    p
}

#[test]
fn async_example_verifies_against_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sock = dir.path().join("qsd.sock");
    let mut qsd = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=d0,filename={}", img.display()),
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (package qemu-utils)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    for mode in ["event", "poll"] {
        let out = Command::new(example())
            .arg(&sock)
            .args([mode, "24", "40"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode}: {text}");
        assert!(
            text.contains("24 tasks x 40 rounds: 1920 I/Os") && text.contains(" 0 verify failures"),
            "{mode}: {text}"
        );
    }
    let _ = qsd.kill();
    let _ = qsd.wait();
    // The last round's stamps are in the file: task t's block at LBA t*8.. (4 KiB I/O).
    let data = std::fs::read(&img).unwrap();
    assert!(data[..24 * 4096].iter().any(|&b| b != 0));
    assert!(
        data[24 * 4096..].iter().all(|&b| b == 0),
        "nothing beyond the tasks' blocks"
    );
}
