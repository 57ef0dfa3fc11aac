//! End-to-end tests of the vhost-user-blk target over its socket, with rust-vmm's vhost-user
//! front-end for the control plane. The few I/O tests place descriptors in shared memory by
//! hand (a test harness, not a driver: no free list, no interrupt handling) to check that the
//! daemon really serves rings, faults included.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    handshake, le32, read_config, within, Chain, Harness, DATA_BASE, QUEUE_SIZE, SLOT_BASE,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vireo_target::{spawn_blk_target, Backing, BlkTargetConfig, TargetError, TargetHandle};
use vm_memory::{Bytes, GuestAddress};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const PROTOCOL_FEATURES: u64 = 1 << 30;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

fn socket(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("blk.sock")
}

fn ram_target(path: &Path, size_bytes: u64) -> TargetHandle {
    spawn_blk_target(
        path,
        BlkTargetConfig {
            backend: Backing::Ram { size_bytes },
            ..Default::default()
        },
    )
    .expect("target starts")
}

#[test]
fn handshake_features_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = spawn_blk_target(
        &path,
        BlkTargetConfig {
            backend: Backing::Ram {
                size_bytes: 8 << 20,
            },
            block_size: 4096,
            num_queues: 2,
            seg_max: 5,
            size_max: 65536,
            max_discard_seg: 3,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(target.socket_path(), path);
    assert_eq!(target.capacity_sectors(), (8 << 20) / 512);

    let mut fe = Frontend::connect(&path, 2).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        PROTOCOL_FEATURES,
    ] {
        assert_ne!(features & bit, 0, "feature {bit:#x} offered");
    }
    assert_eq!(features & VIRTIO_BLK_F_RO, 0);
    fe.set_features(features).unwrap();

    let proto = fe.get_protocol_features().unwrap();
    for f in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    ] {
        assert!(proto.contains(f), "{f:?} offered");
    }
    fe.set_protocol_features(proto).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    assert!(fe.get_max_mem_slots().unwrap() > 8);

    let config = read_config(&mut fe, 0, 60);
    assert_eq!(
        u64::from_le_bytes(config[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    assert_eq!(le32(&config, 8), 65536);
    assert_eq!(le32(&config, 12), 5);
    assert_eq!(le32(&config, 20), 4096);
    assert_eq!(u16::from_le_bytes([config[34], config[35]]), 2);
    assert_eq!(le32(&config, 40), 3);
    // A window in the middle, as a driver reading one field does.
    assert_eq!(read_config(&mut fe, 20, 4), 4096u32.to_le_bytes());
    // Bigger than the structure: zero padded.
    let big = read_config(&mut fe, 0, 256);
    assert_eq!(&big[..60], &config[..]);
    assert!(big[96..].iter().all(|&b| b == 0));

    drop(fe);
    target.stop();
    assert!(!path.exists(), "socket removed on stop");
}

#[test]
fn read_only_is_offered() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let _target = spawn_blk_target(
        &path,
        BlkTargetConfig {
            backend: Backing::Ram {
                size_bytes: 1 << 20,
            },
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let fe = Frontend::connect(&path, 1).unwrap();
    fe.set_owner().unwrap();
    assert_ne!(fe.get_features().unwrap() & VIRTIO_BLK_F_RO, 0);
}

#[test]
fn serves_one_front_end_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = ram_target(&path, 1 << 20);
    for round in 1..=3u64 {
        let mut fe = handshake(&path, 1);
        let config = read_config(&mut fe, 0, 8);
        assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), 2048);
        drop(fe);
        // The next connect succeeds once the target has noticed the disconnect.
        let deadline = Instant::now() + Duration::from_secs(5);
        while target.stats().connections < round {
            assert!(Instant::now() < deadline, "connection {round} not counted");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // A client that connects and leaves without a word does not break the loop.
    drop(UnixStream::connect(&path).unwrap());
    let mut fe = handshake(&path, 1);
    assert_eq!(read_config(&mut fe, 20, 4), 512u32.to_le_bytes());
    drop(fe);
    within(Duration::from_secs(5), "stop", move || target.stop());
}

#[test]
fn stop_without_any_front_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = ram_target(&path, 1 << 20);
    assert!(path.exists());
    within(Duration::from_secs(5), "stop", move || target.stop());
    assert!(!path.exists());
}

#[test]
fn stop_with_a_connected_front_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = ram_target(&path, 1 << 20);
    let fe = handshake(&path, 1);
    // A second client waits in the backlog meanwhile.
    let _queued = UnixStream::connect(&path).unwrap();
    let start = Instant::now();
    within(Duration::from_secs(5), "stop", move || target.stop());
    assert!(start.elapsed() < Duration::from_secs(2));
    // The front-end sees the connection gone.
    assert!(fe.get_features().is_err());
}

#[test]
fn drop_stops_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = ram_target(&path, 1 << 20);
    let _fe = handshake(&path, 1);
    within(Duration::from_secs(5), "drop", move || drop(target));
    assert!(!path.exists());
}

#[test]
fn start_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let e = spawn_blk_target(
        &dir.path().join("no/such/dir/blk.sock"),
        BlkTargetConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(e, TargetError::Listen { .. }), "{e}");
    assert!(e.to_string().contains("no/such/dir"), "{e}");

    // A regular file where the socket should go is not deleted.
    let taken = dir.path().join("precious.txt");
    std::fs::write(&taken, b"keep me").unwrap();
    let e = spawn_blk_target(&taken, BlkTargetConfig::default()).unwrap_err();
    assert!(matches!(e, TargetError::SocketPathTaken { .. }), "{e}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");

    // A stale socket is replaced.
    let stale = socket(&dir);
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let target = spawn_blk_target(&stale, BlkTargetConfig::default()).unwrap();
    drop(handshake(&stale, 1));
    target.stop();

    let e = spawn_blk_target(
        &socket(&dir),
        BlkTargetConfig {
            block_size: 1000,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            TargetError::InvalidConfig {
                field: "block_size",
                ..
            }
        ),
        "{e}"
    );

    let e = spawn_blk_target(
        &socket(&dir),
        BlkTargetConfig {
            backend: Backing::File {
                path: dir.path().join("missing.img"),
                size_bytes: None,
            },
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, TargetError::OpenBacking { .. }), "{e}");
}

// ---------------------------------------------------------------------------------------------
// I/O over the socket.

/// virtio-blk requests in the harness's scratch slots.
trait BlkRequests {
    fn slot(n: u64) -> u64;
    fn request(&self, n: u64, t: u32, sector: u64, data: &[(u64, u32)]) -> Chain;
    fn status(&self, n: u64) -> u8;
}

impl BlkRequests for Harness {
    fn slot(n: u64) -> u64 {
        SLOT_BASE + n * 32
    }

    /// A request in scratch slot `n`: header, then `data` segments, then the status byte.
    fn request(&self, n: u64, t: u32, sector: u64, data: &[(u64, u32)]) -> Chain {
        let hdr = Self::slot(n);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(hdr + 16)).unwrap();
        let device_writes = t != T_OUT;
        let mut chain = vec![(hdr, 16, false)];
        chain.extend(data.iter().map(|&(a, l)| (a, l, device_writes)));
        chain.push((hdr + 16, 1, true));
        chain
    }

    fn status(&self, n: u64) -> u8 {
        self.mem.read_obj(GuestAddress(Self::slot(n) + 16)).unwrap()
    }
}

#[test]
fn io_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = spawn_blk_target(
        &path,
        BlkTargetConfig {
            backend: Backing::File {
                path: dir.path().join("disk.img"),
                size_bytes: Some(4 << 20),
            },
            seg_max: 4,
            serial: "e2e-serial".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let mut h = Harness::connect(&path, 1);

    let a = h.fill(DATA_BASE, 4096, 1);
    let b = h.fill(DATA_BASE + 0x10000, 8192, 2);
    let w = h.request(
        0,
        T_OUT,
        16,
        &[(DATA_BASE, 4096), (DATA_BASE + 0x10000, 8192)],
    );
    h.submit(0, &[w]);
    assert_eq!(h.wait_used(0, 1), vec![(0, 1)]);
    assert_eq!(h.status(0), S_OK);

    // The data is in the file.
    let file = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert_eq!(&file[16 * 512..16 * 512 + 4096], &a[..]);
    assert_eq!(&file[16 * 512 + 4096..16 * 512 + 12288], &b[..]);

    // Read it back, get the serial, flush, and an unknown type, in one batch.
    let r = h.request(1, T_IN, 16, &[(DATA_BASE + 0x40000, 12288)]);
    let id = h.request(2, T_GET_ID, 0, &[(DATA_BASE + 0x80000, 20)]);
    let f = h.request(3, T_FLUSH, 0, &[]);
    let u = h.request(4, 77, 0, &[]);
    h.submit(0, &[r, id, f, u]);
    let used = h.wait_used(0, 4);
    assert_eq!(used, vec![(4, 12289), (7, 21), (10, 1), (12, 1)]);
    assert_eq!(
        [h.status(1), h.status(2), h.status(3), h.status(4)],
        [S_OK, S_OK, S_OK, S_UNSUPP]
    );
    let back = h.read(DATA_BASE + 0x40000, 12288);
    assert_eq!(&back[..4096], &a[..]);
    assert_eq!(&back[4096..], &b[..]);
    assert_eq!(&h.read(DATA_BASE + 0x80000, 10), b"e2e-serial");

    // Five segments break seg_max 4.
    let segs: Vec<(u64, u32)> = (0..5).map(|i| (DATA_BASE + i * 0x1000, 512)).collect();
    let big = h.request(5, T_IN, 0, &segs);
    h.submit(0, &[big]);
    h.wait_used(0, 1);
    assert_eq!(h.status(5), S_IOERR);

    let s = target.stats();
    assert_eq!((s.reads, s.writes, s.flushes, s.get_ids), (2, 1, 1, 1));
    assert_eq!((s.unsupported, s.oversize_rejected, s.io_errors), (1, 1, 1));
    assert_eq!(s.max_segments, 5);
    assert_eq!(s.bytes_written, 12288);
    assert_eq!(s.connections, 1);
    assert!(s.kicks >= 3);
}

#[test]
fn faults_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = ram_target(&path, 4 << 20);
    let mut h = Harness::connect(&path, 1);
    let reads = |h: &Harness, first: u64, n: u64| -> Vec<Chain> {
        (first..first + n)
            .map(|i| h.request(i, T_IN, i * 8, &[(DATA_BASE + i * 0x1000, 4096)]))
            .collect()
    };

    // Reordering: four requests in one batch come back in reverse.
    target.faults().set_reorder_window(4);
    h.submit(0, &reads(&h, 0, 4));
    let used = h.wait_used(0, 4);
    assert_eq!(
        used.iter().map(|u| u.0).collect::<Vec<_>>(),
        vec![9, 6, 3, 0]
    );
    target.faults().set_reorder_window(0);
    assert_eq!(target.stats().reordered_completions, 4);

    // Injected errors: the next two fail, the third succeeds.
    target.faults().fail_next(2);
    h.submit(0, &reads(&h, 4, 3));
    h.wait_used(0, 3);
    assert_eq!(
        [h.status(4), h.status(5), h.status(6)],
        [S_IOERR, S_IOERR, S_OK]
    );
    assert_eq!(target.stats().injected_errors, 2);

    // A lying used length.
    target.faults().lie_used_len_next(1);
    h.submit(0, &reads(&h, 7, 1));
    let used = h.wait_used(0, 1);
    assert_eq!(used[0].1, 4097 + 4096);
    assert_eq!(h.status(7), S_OK);

    // An out-of-range used id; the real head never comes back.
    target.faults().bad_used_id_next(1);
    h.submit(0, &reads(&h, 7, 1));
    let used = h.wait_used(0, 1);
    assert_eq!(used[0], (u32::from(QUEUE_SIZE) + 24, 4097));
    assert_eq!(target.stats().bad_used_ids, 1);
    // The ring goes on normally after it.
    h.submit(0, &reads(&h, 7, 1));
    assert_eq!(h.wait_used(0, 1)[0], (27, 4097));

    // Delayed completions.
    target
        .faults()
        .set_completion_delay(Duration::from_millis(30));
    let start = Instant::now();
    h.submit(0, &reads(&h, 8, 2));
    h.wait_used(0, 2);
    assert!(start.elapsed() >= Duration::from_millis(60));
    target.faults().set_completion_delay(Duration::ZERO);

    // Disconnect after one more request: the second is never completed.
    target.faults().disconnect_after(1);
    h.submit(0, &reads(&h, 10, 2));
    let used = h.wait_used(0, 1);
    assert_eq!(used[0].1, 4097);
    assert!(h.try_wait_used(0, 1, Duration::from_millis(300)).is_none());
    assert!(h.fe.get_features().is_err(), "connection dropped");
    assert_eq!(target.stats().injected_disconnects, 1);
    assert!(!target.faults().disconnect_armed());

    // The target serves the next front-end as usual.
    let mut h = Harness::connect(&path, 1);
    h.submit(0, &reads(&h, 0, 1));
    h.wait_used(0, 1);
    assert_eq!(h.status(0), S_OK);
    assert_eq!(target.stats().connections, 2);
    within(Duration::from_secs(5), "stop", move || target.stop());
}

#[test]
fn two_queues_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = spawn_blk_target(
        &path,
        BlkTargetConfig {
            backend: Backing::Ram {
                size_bytes: 4 << 20,
            },
            num_queues: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut h = Harness::connect(&path, 2);
    let d0 = h.fill(DATA_BASE, 4096, 7);
    let d1 = h.fill(DATA_BASE + 0x1000, 4096, 8);
    let w0 = h.request(0, T_OUT, 0, &[(DATA_BASE, 4096)]);
    let w1 = h.request(1, T_OUT, 8, &[(DATA_BASE + 0x1000, 4096)]);
    h.submit(0, &[w0]);
    h.submit(1, &[w1]);
    h.wait_used(0, 1);
    h.wait_used(1, 1);
    // Read each queue's data through the other queue.
    let r0 = h.request(2, T_IN, 8, &[(DATA_BASE + 0x10000, 4096)]);
    let r1 = h.request(3, T_IN, 0, &[(DATA_BASE + 0x20000, 4096)]);
    h.submit(0, &[r0]);
    h.submit(1, &[r1]);
    h.wait_used(0, 1);
    h.wait_used(1, 1);
    assert_eq!(h.read(DATA_BASE + 0x10000, 4096), d1);
    assert_eq!(h.read(DATA_BASE + 0x20000, 4096), d0);
    assert_eq!(target.stats().ok, 4);
    // Stop with rings live.
    within(Duration::from_secs(5), "stop", move || target.stop());
}

#[test]
fn stop_cuts_a_long_injected_delay_short() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = ram_target(&path, 1 << 20);
    let mut h = Harness::connect(&path, 1);
    target
        .faults()
        .set_completion_delay(Duration::from_secs(60));
    let reads: Vec<Chain> = (0..4)
        .map(|i| h.request(i, T_IN, 0, &[(DATA_BASE + i * 0x1000, 512)]))
        .collect();
    h.submit(0, &reads);
    std::thread::sleep(Duration::from_millis(50));
    assert!(h.try_wait_used(0, 1, Duration::from_millis(10)).is_none());
    let start = Instant::now();
    within(Duration::from_secs(5), "stop", move || target.stop());
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// Rough speed of the target: 4 KiB reads at queue depth 32 for one second, the harness
/// busy-polling the used ring. `cargo test -p vireo-target --release -- --ignored throughput
/// --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = ram_target(&path, 64 << 20);
    let mut h = Harness::connect(&path, 1);
    const DEPTH: u64 = 16; // 3 descriptors each: 48 of the 64 ring slots
    let mut done = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        let reads: Vec<Chain> = (0..DEPTH)
            .map(|i| {
                h.request(
                    i,
                    T_IN,
                    (done + i) * 8 % 100_000,
                    &[(DATA_BASE + i * 0x1000, 4096)],
                )
            })
            .collect();
        h.submit(0, &reads);
        let ring = &h.queues[0];
        let want = ring.used_seen.wrapping_add(DEPTH as u16);
        while h
            .mem
            .read_obj::<u16>(GuestAddress(ring.used() + 2))
            .unwrap()
            != want
        {
            std::hint::spin_loop();
        }
        h.queues[0].used_seen = want;
        done += DEPTH;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:.0} IOPS (batches of {DEPTH}), {} kicks, {} interrupts",
        done as f64 / secs,
        target.stats().kicks,
        target.stats().interrupts
    );
}

#[test]
fn inconsistent_avail_index_does_not_wedge_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket(&dir);
    let target = ram_target(&path, 1 << 20);
    let mut h = Harness::connect(&path, 1);
    // Claim 1000 new entries on a ring of 64.
    let avail = h.queues[0].avail();
    h.mem.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    h.queues[0].kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(h.try_wait_used(0, 1, Duration::from_millis(10)).is_none());
    assert_eq!(target.stats().ok, 0);
    // Still answering on the control plane, and stoppable.
    assert!(h.fe.get_features().is_ok());
    within(Duration::from_secs(5), "stop", move || target.stop());
}
