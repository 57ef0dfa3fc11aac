//! What the socket-level tests of both targets share: the vhost-user handshake, config reads,
//! a time limit, and a harness that places descriptors in shared memory by hand (a test
//! harness, not a driver: no free list, no interrupt handling).

#![allow(dead_code)]

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Connects and negotiates everything the target offers.
pub fn handshake(path: &Path, queues: u64) -> Frontend {
    let mut fe = Frontend::connect(path, queues).expect("connect");
    fe.set_owner().expect("set_owner");
    let features = fe.get_features().expect("get_features");
    fe.set_features(features).expect("set_features");
    let proto = fe.get_protocol_features().expect("get_protocol_features");
    fe.set_protocol_features(proto)
        .expect("set_protocol_features");
    fe
}

pub fn read_config(fe: &mut Frontend, offset: u32, size: u32) -> Vec<u8> {
    let (_, payload) = fe
        .get_config(
            offset,
            size,
            VhostUserConfigFlags::WRITABLE,
            &vec![0u8; size as usize],
        )
        .expect("get_config");
    payload
}

pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Runs `f` on another thread and fails the test if it takes longer than `limit`.
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} took longer than {limit:?}"))
}

// ---------------------------------------------------------------------------------------------
// I/O over the socket.

pub const QUEUE_SIZE: u16 = 64;
pub const MEM_SIZE: usize = 16 << 20;
/// Per-request scratch slots (each test file lays them out), data from DATA_BASE.
pub const SLOT_BASE: u64 = 0x10_0000;
pub const DATA_BASE: u64 = 0x20_0000;

/// Shared guest memory, a connection and hand-placed rings.
pub struct Harness {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    _file: File,
    pub queues: Vec<Ring>,
}

pub struct Ring {
    pub base: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
    pub kick: EventFd,
    _call: EventFd,
}

impl Ring {
    pub fn desc(&self) -> u64 {
        self.base
    }
    pub fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    pub fn used(&self) -> u64 {
        self.base + 0x2000
    }
}

/// A request to place: descriptors as `(guest address, length, device_writable)`.
pub type Chain = Vec<(u64, u32, bool)>;

impl Harness {
    pub fn connect(path: &Path, queues: usize) -> Self {
        let file = tempfile::tempfile().unwrap();
        file.set_len(MEM_SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let mut fe = handshake(path, queues as u64);
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        fe.set_mem_table(&regions).unwrap();
        let host = mem.iter().next().unwrap().as_ptr() as u64;

        let mut rings = Vec::new();
        for q in 0..queues {
            let ring = Ring {
                base: (q as u64) * 0x1_0000,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
                kick: EventFd::new(0).unwrap(),
                _call: EventFd::new(0).unwrap(),
            };
            fe.set_vring_num(q, QUEUE_SIZE).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: host + ring.desc(),
                    used_ring_addr: host + ring.used(),
                    avail_ring_addr: host + ring.avail(),
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(q, 0).unwrap();
            fe.set_vring_call(q, &ring._call).unwrap();
            fe.set_vring_kick(q, &ring.kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            rings.push(ring);
        }
        Harness {
            fe,
            mem,
            _file: file,
            queues: rings,
        }
    }

    /// Places the chains on queue `q`, publishes them with one avail index update and kicks.
    pub fn submit(&mut self, q: usize, chains: &[Chain]) {
        let mem = &self.mem;
        let ring = &mut self.queues[q];
        for chain in chains {
            let head = ring.next_desc;
            for (i, &(addr, len, writable)) in chain.iter().enumerate() {
                let index = ring.next_desc;
                ring.next_desc = (ring.next_desc + 1) % QUEUE_SIZE;
                let last = i + 1 == chain.len();
                let flags: u16 = u16::from(!last) | if writable { 2 } else { 0 };
                let at = ring.desc() + u64::from(index) * 16;
                mem.write_obj(addr, GuestAddress(at)).unwrap();
                mem.write_obj(len, GuestAddress(at + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                mem.write_obj(ring.next_desc, GuestAddress(at + 14))
                    .unwrap();
            }
            let slot = ring.avail() + 4 + u64::from(ring.avail_idx % QUEUE_SIZE) * 2;
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            ring.avail_idx = ring.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(ring.avail_idx, GuestAddress(ring.avail() + 2))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ring.kick.write(1).unwrap();
    }

    /// Waits for `n` more used entries on queue `q`; returns `(head, len)` in used-ring order.
    pub fn wait_used(&mut self, q: usize, n: u16) -> Vec<(u32, u32)> {
        self.try_wait_used(q, n, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{n} completions on queue {q} did not arrive"))
    }

    pub fn try_wait_used(
        &mut self,
        q: usize,
        n: u16,
        timeout: Duration,
    ) -> Option<Vec<(u32, u32)>> {
        let deadline = Instant::now() + timeout;
        let ring = &mut self.queues[q];
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(ring.used() + 2)).unwrap();
            if idx.wrapping_sub(ring.used_seen) >= n {
                break;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mut out = Vec::new();
        for _ in 0..n {
            let at = ring.used() + 4 + u64::from(ring.used_seen % QUEUE_SIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            ring.used_seen = ring.used_seen.wrapping_add(1);
        }
        Some(out)
    }

    pub fn fill(&self, addr: u64, len: usize, seed: u8) -> Vec<u8> {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        self.mem.write_slice(&data, GuestAddress(addr)).unwrap();
        data
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}
