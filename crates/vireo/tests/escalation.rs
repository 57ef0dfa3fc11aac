//! A frozen target (SIGSTOP): I/O past `io_timeout` fails with a timeout at once, the
//! controller escalates (SCSI: ABORT TASK, LOGICAL UNIT RESET; then a controller reset,
//! which for vhost-user is a reconnection), and when the target resumes the controller
//! is back and I/O works, with the data written before the freeze intact.

mod common;

use std::time::{Duration, Instant};

use common::{registry, spawn_vireo, wait_for_socket};
use vireo_bdev::{AttachParams, DevType, ErrorKind, IoBuf, IoRequest, TrType};

struct Target {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
}

impl Target {
    fn start(dev_type: &str) -> Target {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("t.sock");
        let file = dir.path().join("disk.img");
        let child = spawn_vireo(&[
            "target",
            "--type",
            dev_type,
            "-s",
            sock.to_str().unwrap(),
            "--file",
            file.to_str().unwrap(),
            "--size",
            "16m",
        ]);
        wait_for_socket(&sock);
        Target {
            child,
            _dir: dir,
            sock,
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn frozen_target_escalates_and_recovers(dev_type: DevType) {
    let t = Target::start(if dev_type == DevType::Scsi {
        "scsi"
    } else {
        "blk"
    });
    let reg = registry();
    let io_timeout = Duration::from_millis(300);
    let bdev = reg
        .attach(&AttachParams {
            wwpn: None,
            name: "F".into(),
            trtype: TrType::User,
            traddr: t.sock.display().to_string(),
            dev_type,
            vq_count: 1,
            vq_size: 128,
            io_timeout: Some(io_timeout),
            reconnect_timeout: Some(Duration::from_secs(30)),
            packed_ring: Default::default(),
        })
        .expect("attach")
        .pop()
        .unwrap();
    let bs = bdev.info().block_size as u64;
    let blocks = 4096 / bs;
    let mut ch = bdev.open_channel().unwrap();
    // Data written before the freeze.
    let mut pattern = vec![0u8; 4096];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    ch.run(IoRequest::write(0, blocks, IoBuf::Heap(pattern.clone()), 1))
        .result
        .unwrap();

    // Freeze the target, then send it 8 writes.
    t.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(100));
    let frozen = Instant::now();
    for i in 0..8u64 {
        ch.submit(IoRequest::write(
            (1 + i) * blocks,
            blocks,
            IoBuf::Heap(vec![i as u8; 4096]),
            100 + i,
        ))
        .unwrap();
    }
    ch.publish();
    let mut out = Vec::new();
    let mut timeouts = 0;
    let mut other = Vec::new();
    let mut worst = Duration::ZERO;
    // While frozen: every I/O ends with a timeout (or, once the controller is reset, as
    // aborted) within io_timeout and a little.
    while frozen.elapsed() < Duration::from_secs(3) {
        out.clear();
        ch.poll(&mut out);
        for c in out.drain(..) {
            worst = worst.max(Duration::from_nanos(c.latency_ns));
            match c.result {
                Err(e) if e.kind() == ErrorKind::TimedOut => timeouts += 1,
                r => other.push(format!("{}: {r:?}", c.user_data)),
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        timeouts, 8,
        "every frozen write times out; others: {other:?}"
    );
    assert!(other.is_empty(), "{other:?}");
    assert!(
        worst < io_timeout + Duration::from_millis(1500),
        "an I/O took {worst:?} to fail (limit {io_timeout:?})"
    );
    // The target resumes: the controller reconnects (its reset), and I/O works.
    t.signal(libc::SIGCONT);
    let resumed = Instant::now();
    let back = loop {
        let c = ch.run(IoRequest::read(0, blocks, IoBuf::Heap(vec![0; 4096]), 2));
        match c.result {
            Ok(()) => break c,
            Err(e) => {
                assert!(
                    resumed.elapsed() < Duration::from_secs(20),
                    "the controller did not come back after the target resumed: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let Some(IoBuf::Heap(data)) = back.buf else {
        panic!("no buffer")
    };
    assert_eq!(data, pattern, "data written before the freeze is intact");
    let reconnects = reg.with_controller("F", |c| c.reconnects()).unwrap();
    assert!(reconnects >= 1, "the controller was reset (reconnected)");
    // The writes aborted during the freeze are written anew; nothing the thawed target
    // still held may land on top of them later.
    for i in 0..8u64 {
        ch.run(IoRequest::write(
            (1 + i) * blocks,
            blocks,
            IoBuf::Heap(vec![0xc0 + i as u8; 4096]),
            200 + i,
        ))
        .result
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..8u64 {
        let c = ch.run(IoRequest::read(
            (1 + i) * blocks,
            blocks,
            IoBuf::Heap(vec![0; 4096]),
            300 + i,
        ));
        c.result.unwrap();
        assert!(
            matches!(&c.buf, Some(IoBuf::Heap(d)) if d.iter().all(|&b| b == 0xc0 + i as u8)),
            "block {} holds the newest write",
            1 + i
        );
    }
    // New writes land and read back.
    ch.run(IoRequest::write(
        20 * blocks,
        blocks,
        IoBuf::Heap(vec![0x5a; 4096]),
        3,
    ))
    .result
    .unwrap();
    let c = ch.run(IoRequest::read(
        20 * blocks,
        blocks,
        IoBuf::Heap(vec![0; 4096]),
        4,
    ));
    c.result.unwrap();
    assert!(matches!(c.buf, Some(IoBuf::Heap(d)) if d.iter().all(|&b| b == 0x5a)));
}

#[test]
fn frozen_scsi_target_escalates_to_a_reconnection_and_recovers() {
    frozen_target_escalates_and_recovers(DevType::Scsi);
}

#[test]
fn frozen_blk_target_escalates_to_a_reconnection_and_recovers() {
    frozen_target_escalates_and_recovers(DevType::Blk);
}
