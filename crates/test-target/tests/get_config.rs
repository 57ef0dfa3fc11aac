//! GET_CONFIG as other front-ends send it: SPDK's sends the whole 256-byte region with a
//! `size` of just the bytes it wants and checks that the reply is as long as its request;
//! an unmodified SPDK asks for all 256 bytes. Raw messages over the socket, so the
//! message sizes are exactly what those front-ends put on the wire.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use vireo_target::{spawn_blk_target, spawn_scsi_target, BlkTargetConfig, ScsiTargetConfig};

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_CONFIG: u32 = 24;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
const PROTOCOL_F_CONFIG: u64 = 1 << 9;

fn send(s: &mut UnixStream, req: u32, body: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&req.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    s.write_all(&m).unwrap();
}

fn recv(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 12];
    s.read_exact(&mut h).unwrap();
    let size = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let mut body = vec![0u8; size];
    s.read_exact(&mut body).unwrap();
    (u32::from_le_bytes(h[0..4].try_into().unwrap()), body)
}

fn u64_reply(s: &mut UnixStream, req: u32) -> u64 {
    send(s, req, &[]);
    let (r, b) = recv(s);
    assert_eq!(r, req);
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Connect and negotiate the protocol features (CONFIG among them).
fn connect(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    send(&mut s, SET_OWNER, &[]);
    let f = u64_reply(&mut s, GET_FEATURES);
    assert!(f & PROTOCOL_FEATURES_BIT != 0);
    send(&mut s, SET_FEATURES, &f.to_le_bytes());
    let p = u64_reply(&mut s, GET_PROTOCOL_FEATURES);
    assert!(p & PROTOCOL_F_CONFIG != 0);
    send(
        &mut s,
        SET_PROTOCOL_FEATURES,
        &PROTOCOL_F_CONFIG.to_le_bytes(),
    );
    s
}

/// GET_CONFIG of `size` bytes at `offset` in a body carrying `region` payload bytes;
/// returns the reply's `size` field and payload.
fn get_config(s: &mut UnixStream, offset: u32, size: u32, region: usize) -> (u32, Vec<u8>) {
    let mut body = Vec::new();
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&size.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.resize(12 + region, 0);
    send(s, GET_CONFIG, &body);
    let (r, b) = recv(s);
    assert_eq!(r, GET_CONFIG);
    (
        u32::from_le_bytes(b[4..8].try_into().unwrap()),
        b[12..].to_vec(),
    )
}

fn check_reads(path: &Path, le32_at_0: u32) {
    let mut s = connect(path);
    // The whole 256 bytes (an unmodified SPDK): the config, then zeroes.
    let (n, all) = get_config(&mut s, 0, 256, 256);
    assert_eq!((n, all.len()), (256, 256));
    assert_eq!(u32::from_le_bytes(all[..4].try_into().unwrap()), le32_at_0);
    assert!(all[128..].iter().all(|&b| b == 0));
    // SPDK's partial read: size 24 in a 256-byte region; the reply is as long as the
    // request and carries the same bytes.
    let (n, part) = get_config(&mut s, 0, 24, 256);
    assert_eq!(n, 24);
    assert_eq!(part.len(), 256, "reply padded to the request's length");
    assert_eq!(&part[..24], &all[..24]);
    // A well-formed read at an offset.
    let (n, mid) = get_config(&mut s, 20, 8, 8);
    assert_eq!((n, &mid[..]), (8, &all[20..28]));
    // Reads the target cannot serve get an error reply (size 0), and the connection
    // goes on.
    assert_eq!(get_config(&mut s, 0, 0, 0).0, 0);
    assert_eq!(get_config(&mut s, 4090, 16, 16).0, 0);
    assert_eq!(get_config(&mut s, 0, 64, 8).0, 0);
    let (n, again) = get_config(&mut s, 0, 4, 4);
    assert_eq!((n, &again[..]), (4, &all[..4]));
}

#[test]
fn blk_answers_partial_whole_and_refused_config_reads() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let t = spawn_blk_target(&sock, BlkTargetConfig::default()).unwrap();
    // capacity (sectors) is the first field.
    let sectors = t.capacity_sectors();
    check_reads(&sock, sectors as u32);
}

#[test]
fn scsi_answers_partial_whole_and_refused_config_reads() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("scsi.sock");
    let _t = spawn_scsi_target(
        &sock,
        ScsiTargetConfig {
            num_request_queues: 3,
            ..Default::default()
        },
    )
    .unwrap();
    // num_queues is the first field.
    check_reads(&sock, 3);
}
