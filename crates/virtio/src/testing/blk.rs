//! A virtio-blk RAM disk on a [`FakeDevice`] (virtio 1.2 section 5.2).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{FakeDevice, FakeRequest};
use crate::features::{blk as bf, transport as tf};
use crate::wire::blk::{
    ID_BYTES, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
    WRITE_ZEROES_FLAG_UNMAP,
};

const SECTOR: usize = 512;
/// Bytes of the configuration space (`struct virtio_blk_config` of virtio 1.2).
const CONFIG_LEN: usize = 64;
/// Largest queue size the fake disk offers.
const MAX_QUEUE_SIZE: u16 = 256;
/// Discard and write-zeroes limits of the configuration space (per range, ranges).
const MAX_RANGE_SECTORS: u32 = 1 << 16;
const MAX_RANGE_SEGS: u32 = 16;

struct BlkState {
    /// Written sectors; the others read as zeroes.
    disk: BTreeMap<u64, Box<[u8; SECTOR]>>,
    hold: bool,
    held: Vec<FakeRequest>,
    /// Requests still to fail, and their status byte.
    fail: (usize, u8),
    log: Vec<(u32, u64, u32)>,
    /// The flags of each write-zeroes range answered.
    wz_flags: Vec<u32>,
    serial: [u8; ID_BYTES],
}

/// A virtio-blk RAM disk on a [`FakeDevice`]: IN, OUT, FLUSH, GET_ID, DISCARD and
/// WRITE_ZEROES, on a sparse disk (unwritten sectors read as zeroes, any capacity).
///
/// Its limits come from the configuration space at each request (capacity, discard
/// and write-zeroes limits), so a test may change them with
/// [`FakeDevice::set_config`] (or [`set_capacity`](Self::set_capacity)). Cheap to clone:
/// every clone is the same disk.
///
/// Answers (virtio 1.2 5.2.6): a read or write that is not whole sectors or reaches
/// past the capacity, or a range that does, gets `IOERR`; a command whose feature was
/// not negotiated, an unknown type, a discard or write-zeroes request that is not whole
/// ranges, has more ranges or sectors than the limits, or flags it may not have, gets
/// `UNSUPP`. A request without a status byte or header is a driver bug: it panics.
#[derive(Clone)]
pub struct FakeBlk {
    /// The device.
    pub dev: FakeDevice,
    state: Arc<Mutex<BlkState>>,
}

impl std::fmt::Debug for FakeBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeBlk").field("dev", &self.dev).finish()
    }
}

impl FakeBlk {
    /// The features a disk of one queue offers (more queues add `MQ`).
    pub const FEATURES: u64 = tf::VERSION_1
        | tf::RING_EVENT_IDX
        | tf::RING_INDIRECT_DESC
        | bf::SEG_MAX
        | bf::BLK_SIZE
        | bf::FLUSH
        | bf::DISCARD
        | bf::WRITE_ZEROES;

    /// A disk of `sectors` 512-byte sectors with `num_queues` request queues (of at most
    /// 256 descriptors) and `seg_max` data segments per request. Offered features:
    /// `VERSION_1`, `RING_EVENT_IDX`, `RING_INDIRECT_DESC`, `SEG_MAX`, `BLK_SIZE` (512),
    /// `FLUSH`, `DISCARD`, `WRITE_ZEROES`, and `MQ` with more than one queue. Discard and
    /// write-zeroes take 16 ranges of up to 65536 sectors each, alignment 1, and
    /// write-zeroes may unmap.
    pub fn new(sectors: u64, num_queues: u16, seg_max: u32) -> FakeBlk {
        let mut features = Self::FEATURES;
        if num_queues > 1 {
            features |= bf::MQ;
        }
        let mut c = vec![0u8; CONFIG_LEN];
        let mut put = |off: usize, v: &[u8]| c[off..off + v.len()].copy_from_slice(v);
        put(0, &sectors.to_le_bytes());
        put(12, &seg_max.to_le_bytes());
        put(20, &(SECTOR as u32).to_le_bytes());
        put(34, &num_queues.to_le_bytes());
        put(36, &MAX_RANGE_SECTORS.to_le_bytes());
        put(40, &MAX_RANGE_SEGS.to_le_bytes());
        put(44, &1u32.to_le_bytes());
        put(48, &MAX_RANGE_SECTORS.to_le_bytes());
        put(52, &MAX_RANGE_SEGS.to_le_bytes());
        put(56, &[1]);
        FakeBlk {
            dev: FakeDevice::new(features, c, num_queues, MAX_QUEUE_SIZE),
            state: Arc::new(Mutex::new(BlkState {
                disk: BTreeMap::new(),
                hold: false,
                held: Vec::new(),
                fail: (0, S_OK),
                log: Vec::new(),
                wz_flags: Vec::new(),
                serial: [0; ID_BYTES],
            })),
        }
    }

    /// Offer `VIRTIO_F_RING_PACKED` too (from the next negotiation on): a driver that
    /// takes it gets its queues served as packed rings.
    pub fn offer_packed_ring(&self) {
        self.dev
            .set_features(self.dev.offered_features() | tf::RING_PACKED);
    }

    fn lock(&self) -> MutexGuard<'_, BlkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serve every pending request of queue `q` (or only collect them while
    /// [`hold`](Self::hold) is on); returns how many were taken off the ring.
    pub fn serve(&self, q: u16) -> usize {
        let reqs = self.dev.take_requests(q);
        let n = reqs.len();
        {
            let mut st = self.lock();
            if st.hold {
                st.held.extend(reqs);
                return n;
            }
        }
        for r in &reqs {
            let written = self.execute(r);
            self.dev.complete(q, r, written);
        }
        n
    }

    /// Serve the queue on every kick, in the kicking thread (on: a driver that waits
    /// for its device synchronously needs no device thread); replaces any
    /// [`on_kick`](Self::on_kick) hook.
    pub fn auto_serve(&self, on: bool) {
        if on {
            self.on_kick(|b, q| {
                b.serve(q);
            });
        } else {
            self.dev.on_kick(None);
        }
    }

    /// Run `hook(disk, queue)` on every kick of the current connection (see
    /// [`FakeDevice::on_kick`]). The hook gets the disk as its argument and must not
    /// capture it (a reference cycle).
    pub fn on_kick(&self, hook: impl Fn(&FakeBlk, u16) + Send + Sync + 'static) {
        let state = Arc::downgrade(&self.state);
        self.dev.on_kick(Some(Arc::new(move |dev: &FakeDevice, q| {
            if let Some(state) = state.upgrade() {
                hook(
                    &FakeBlk {
                        dev: dev.clone(),
                        state,
                    },
                    q,
                );
            }
        })));
    }

    /// Hold requests instead of serving them: [`serve`](Self::serve) then only collects
    /// them, [`release_held`](Self::release_held) answers them.
    pub fn hold(&self, on: bool) {
        self.lock().hold = on;
    }

    /// Requests held and not yet released, on every queue.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Answer the held requests of queue `q`; returns how many were answered (those of
    /// a connection that is gone are dropped unanswered and not counted).
    pub fn release_held(&self, q: u16) -> usize {
        let reqs: Vec<FakeRequest> = {
            let mut st = self.lock();
            let (mine, rest) = std::mem::take(&mut st.held)
                .into_iter()
                .partition(|r| r.queue() == q);
            st.held = rest;
            mine
        };
        let mut n = 0;
        for r in &reqs {
            if !self.dev.is_live(r) {
                continue;
            }
            let written = self.execute(r);
            if self.dev.complete_inner(q, r, written) {
                n += 1;
            }
        }
        n
    }

    /// Answer the next `n` requests with `status` (`IOERR` = 1, `UNSUPP` = 2, or an
    /// invalid value) instead of executing them; their used length is 1.
    pub fn fail_next(&self, n: usize, status: u8) {
        self.lock().fail = (n, status);
    }

    /// `len` bytes of the disk from sector `sector`.
    pub fn read_disk(&self, sector: u64, len: usize) -> Vec<u8> {
        let st = self.lock();
        let mut out = vec![0u8; len];
        for (k, chunk) in out.chunks_mut(SECTOR).enumerate() {
            if let Some(s) = st.disk.get(&(sector + k as u64)) {
                chunk.copy_from_slice(&s[..chunk.len()]);
            }
        }
        out
    }

    /// Write `data` to the disk from sector `sector` (a partial last sector keeps the
    /// rest of its bytes).
    pub fn write_disk(&self, sector: u64, data: &[u8]) {
        let mut st = self.lock();
        for (k, chunk) in data.chunks(SECTOR).enumerate() {
            let s = st
                .disk
                .entry(sector + k as u64)
                .or_insert_with(|| Box::new([0; SECTOR]));
            s[..chunk.len()].copy_from_slice(chunk);
        }
    }

    /// The requests answered so far, in the order they were answered: (type, sector,
    /// data bytes: read or written data, range bytes of a discard or write-zeroes, the
    /// id buffer of GET_ID). Failed ones ([`fail_next`](Self::fail_next)) included.
    pub fn requests_seen(&self) -> Vec<(u32, u64, u32)> {
        self.lock().log.clone()
    }

    /// The flags of every write-zeroes range answered so far, in order.
    pub fn write_zeroes_flags_seen(&self) -> Vec<u32> {
        self.lock().wz_flags.clone()
    }

    /// The device id GET_ID answers (at most 20 bytes; NUL-padded, none when exactly 20).
    pub fn serial(&self, id: &str) {
        let mut s = [0u8; ID_BYTES];
        let b = id.as_bytes();
        let n = b.len().min(ID_BYTES);
        s[..n].copy_from_slice(&b[..n]);
        self.lock().serial = s;
    }

    /// Change the capacity in the configuration space (512-byte sectors); sectors past
    /// it are forgotten.
    pub fn set_capacity(&self, sectors: u64) {
        let mut c = self.dev.config();
        c[0..8].copy_from_slice(&sectors.to_le_bytes());
        self.dev.set_config(c);
        let mut st = self.lock();
        let _ = st.disk.split_off(&sectors);
    }

    /// Execute `req` against the disk (or fail it, see [`fail_next`](Self::fail_next)),
    /// write its status byte (the last device-writable byte) and log it; returns the
    /// used length a device reports (data written plus the status byte). The request
    /// is not completed: [`FakeDevice::complete`] (or `push_used`) does that.
    ///
    /// # Panics
    /// If the request has no status byte or a header shorter than 16 bytes (a driver
    /// bug).
    pub fn execute(&self, req: &FakeRequest) -> u32 {
        let wlen = req.writable_len();
        assert!(
            wlen >= 1,
            "driver bug: virtio-blk request at head {} without a device-writable status byte",
            req.head
        );
        let out = req.read_all();
        assert!(
            out.len() >= 16,
            "driver bug: virtio-blk request at head {} with {} device-readable bytes (the header has 16)",
            req.head,
            out.len()
        );
        let type_ = u32::from_le_bytes(out[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(out[8..16].try_into().unwrap_or_default());
        let data_in = wlen - 1;
        let data_out = &out[16..];
        let cfg = self.dev.config();
        let u32_at = |o: usize| {
            cfg.get(o..o + 4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        let capacity = cfg
            .get(0..8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
        let features = self.dev.driver_features();
        let bytes = match type_ {
            T_IN | T_GET_ID => data_in,
            _ => data_out.len(),
        };
        let mut st = self.lock();
        st.log.push((type_, sector, bytes as u32));
        if st.fail.0 > 0 {
            st.fail.0 -= 1;
            let status = st.fail.1;
            drop(st);
            req.write_at(wlen - 1, &[status]);
            return 1;
        }
        // Whether `n` sectors from `s` lie inside the disk.
        let inside = |s: u64, n: u64| s.checked_add(n).is_some_and(|end| end <= capacity);
        let (status, written) = match type_ {
            T_IN => {
                if !data_in.is_multiple_of(SECTOR) || !inside(sector, (data_in / SECTOR) as u64) {
                    (S_IOERR, 0)
                } else {
                    let mut buf = vec![0u8; data_in];
                    for (k, chunk) in buf.chunks_mut(SECTOR).enumerate() {
                        if let Some(s) = st.disk.get(&(sector + k as u64)) {
                            chunk.copy_from_slice(&s[..]);
                        }
                    }
                    req.write_at(0, &buf);
                    (S_OK, data_in)
                }
            }
            T_OUT => {
                let n = data_out.len();
                if !n.is_multiple_of(SECTOR) || !inside(sector, (n / SECTOR) as u64) {
                    (S_IOERR, 0)
                } else {
                    for (k, chunk) in data_out.chunks(SECTOR).enumerate() {
                        let mut s = Box::new([0u8; SECTOR]);
                        s.copy_from_slice(chunk);
                        st.disk.insert(sector + k as u64, s);
                    }
                    (S_OK, 0)
                }
            }
            T_FLUSH if features & bf::FLUSH != 0 => (S_OK, 0),
            T_GET_ID => {
                let n = data_in.min(ID_BYTES);
                req.write_at(0, &st.serial[..n]);
                (S_OK, n)
            }
            T_DISCARD | T_WRITE_ZEROES => {
                let (feature, max_sectors, max_seg, flags_ok) = if type_ == T_DISCARD {
                    (bf::DISCARD, u32_at(36), u32_at(40), 0)
                } else {
                    (
                        bf::WRITE_ZEROES,
                        u32_at(48),
                        u32_at(52),
                        WRITE_ZEROES_FLAG_UNMAP,
                    )
                };
                let ranges: Vec<(u64, u32, u32)> = data_out
                    .chunks(16)
                    .map(|r| {
                        let r: [u8; 16] = r.try_into().unwrap_or([0xff; 16]);
                        (
                            u64::from_le_bytes(r[0..8].try_into().unwrap_or_default()),
                            u32::from_le_bytes(r[8..12].try_into().unwrap_or_default()),
                            u32::from_le_bytes(r[12..16].try_into().unwrap_or_default()),
                        )
                    })
                    .collect();
                if features & feature == 0
                    || data_out.is_empty()
                    || !data_out.len().is_multiple_of(16)
                    || ranges.len() > max_seg.max(1) as usize
                    || ranges
                        .iter()
                        .any(|&(_, n, f)| n > max_sectors || f & !flags_ok != 0)
                {
                    (S_UNSUPP, 0)
                } else if ranges.iter().any(|&(s, n, _)| !inside(s, n as u64)) {
                    (S_IOERR, 0)
                } else {
                    if type_ == T_WRITE_ZEROES {
                        st.wz_flags.extend(ranges.iter().map(|r| r.2));
                    }
                    for &(s, n, _) in &ranges {
                        let keys: Vec<u64> =
                            st.disk.range(s..s + n as u64).map(|(&k, _)| k).collect();
                        for k in keys {
                            st.disk.remove(&k);
                        }
                    }
                    (S_OK, 0)
                }
            }
            _ => (S_UNSUPP, 0),
        };
        drop(st);
        req.write_at(wlen - 1, &[status]);
        written as u32 + 1
    }
}
