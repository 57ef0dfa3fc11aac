//! The virtio-blk device model: executes one request (a descriptor chain) against the backing
//! store and says what to put in the used ring. Nothing a driver sends can make it panic: every
//! malformed chain ends with IOERR, or (when there is no status byte to write) with a used
//! entry of length 0.

use std::sync::Arc;

use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::blk_config::{BlkTargetConfig, BLK_CONFIG_SIZE, SECTOR_SIZE};
use crate::blk_request::{
    parse_header, parse_ranges, LimitKind, Limits, Range, RangeOp, RequestError, RequestType,
    RANGE_FLAG_UNMAP, RANGE_SIZE, REQUEST_HEADER_SIZE,
};
use crate::chain::{slice_segments, total_len, ChainLayout, Segment};
use crate::faults::{add, bump, raise, StatCounters};
use crate::storage::Storage;
use crate::TargetError;

/// What the queue puts in the used ring for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Status byte written (`None`: the chain had no writable byte, nothing was written).
    pub status: Option<u8>,
    /// Used length: every device-writable byte of the chain (as QEMU reports it), 0 when the
    /// chain is not a request at all.
    pub used_len: u32,
}

/// Why a chain could not be served; mapped to a status and counted.
#[derive(Debug)]
enum Failure {
    /// A rule of virtio-blk broken (header, limits, range).
    Request(RequestError),
    /// The chain does not have the shape of its request type.
    Malformed(&'static str),
    /// Guest memory named by the chain cannot be accessed.
    Memory,
    /// The backing store failed.
    Storage(std::io::Error),
    /// The device is read-only.
    ReadOnly,
    /// Request type unknown or its feature not negotiated.
    Unsupported,
    /// Injected by `Faults::fail_next`.
    Injected,
}

impl From<RequestError> for Failure {
    fn from(e: RequestError) -> Self {
        Failure::Request(e)
    }
}

/// One virtio-blk disk: configuration, limits and backing store. Shared by all queues and all
/// connections of a target.
#[derive(Debug)]
pub(crate) struct BlkDevice {
    cfg: BlkTargetConfig,
    limits: Limits,
    storage: Storage,
    config_space: [u8; BLK_CONFIG_SIZE],
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    stats: Arc<StatCounters>,
}

fn has_feature(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

impl BlkDevice {
    /// Validates `cfg` and opens its backing store.
    pub(crate) fn new(cfg: BlkTargetConfig, stats: Arc<StatCounters>) -> Result<Self, TargetError> {
        cfg.validate()?;
        let storage = Storage::open(&cfg.backend, cfg.block_size, cfg.read_only)?;
        let capacity_sectors = storage.size() / SECTOR_SIZE;
        Ok(BlkDevice {
            limits: Limits::new(&cfg, capacity_sectors),
            config_space: cfg.config_space(capacity_sectors),
            id: cfg.id_bytes(),
            cfg,
            storage,
            stats,
        })
    }

    pub(crate) fn config(&self) -> &BlkTargetConfig {
        &self.cfg
    }

    pub(crate) fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    pub(crate) fn capacity_sectors(&self) -> u64 {
        self.limits.capacity_sectors
    }

    pub(crate) fn stats(&self) -> &StatCounters {
        &self.stats
    }

    pub(crate) fn stats_shared(&self) -> Arc<StatCounters> {
        Arc::clone(&self.stats)
    }

    /// Serves one request. `descriptors` are the chain's `(address, length, device_writable)`
    /// in order; `acked_features` what the driver negotiated; `inject_failure` fails the
    /// request with IOERR without executing it.
    pub(crate) fn execute<I>(
        &self,
        mem: &GuestMemoryMmap<()>,
        descriptors: I,
        acked_features: u64,
        inject_failure: bool,
    ) -> Outcome
    where
        I: IntoIterator<Item = (u64, u32, bool)>,
    {
        let layout = match ChainLayout::from_descriptors(descriptors) {
            Ok(layout) => layout,
            Err(e) => {
                debug!("dropping malformed descriptor chain: {e}");
                bump(&self.stats.malformed);
                return Outcome {
                    status: None,
                    used_len: 0,
                };
            }
        };
        let writable_len = layout.writable_len();
        let Some(status_seg) = writable_len
            .checked_sub(1)
            .and_then(|last| slice_segments(&layout.writable, last, 1).pop())
        else {
            debug!("dropping descriptor chain without a status byte");
            bump(&self.stats.malformed);
            return Outcome {
                status: None,
                used_len: 0,
            };
        };

        let status = match self.serve(mem, &layout, acked_features, inject_failure) {
            Ok(()) => {
                bump(&self.stats.ok);
                VIRTIO_BLK_S_OK as u8
            }
            Err(failure) => self.account(failure),
        };

        if mem
            .write_obj(status, GuestAddress(status_seg.addr))
            .is_err()
        {
            debug!(
                "status byte at {:#x} is not in guest memory",
                status_seg.addr
            );
            bump(&self.stats.malformed);
            return Outcome {
                status: None,
                used_len: 0,
            };
        }
        Outcome {
            status: Some(status),
            used_len: u32::try_from(writable_len).unwrap_or(u32::MAX),
        }
    }

    /// Counts a failure and returns its status byte.
    fn account(&self, failure: Failure) -> u8 {
        let s = &self.stats;
        let status = match &failure {
            Failure::Request(e) => {
                match e.limit_kind() {
                    Some(LimitKind::Data) => bump(&s.oversize_rejected),
                    Some(LimitKind::Discard) => bump(&s.discard_limit_rejected),
                    Some(LimitKind::WriteZeroes) => bump(&s.write_zeroes_limit_rejected),
                    None if e.is_out_of_range() => bump(&s.out_of_range),
                    None if matches!(e, RequestError::UnsupportedFlags { .. }) => {}
                    None => bump(&s.malformed),
                }
                debug!("request refused: {e}");
                e.status()
            }
            Failure::Malformed(what) => {
                debug!("malformed request: {what}");
                bump(&s.malformed);
                VIRTIO_BLK_S_IOERR as u8
            }
            Failure::Memory => {
                debug!("request names memory outside the guest's regions");
                bump(&s.malformed);
                VIRTIO_BLK_S_IOERR as u8
            }
            Failure::Storage(e) => {
                warn!("backing store error: {e}");
                VIRTIO_BLK_S_IOERR as u8
            }
            Failure::ReadOnly => {
                bump(&s.read_only_rejected);
                VIRTIO_BLK_S_IOERR as u8
            }
            Failure::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
            Failure::Injected => {
                bump(&s.injected_errors);
                VIRTIO_BLK_S_IOERR as u8
            }
        };
        if status == VIRTIO_BLK_S_UNSUPP as u8 {
            bump(&s.unsupported);
        } else {
            bump(&s.io_errors);
        }
        status
    }

    fn serve(
        &self,
        mem: &GuestMemoryMmap<()>,
        layout: &ChainLayout,
        acked: u64,
        inject_failure: bool,
    ) -> Result<(), Failure> {
        let mut header = [0u8; REQUEST_HEADER_SIZE];
        let header_segs = slice_segments(&layout.readable, 0, REQUEST_HEADER_SIZE as u64);
        if total_len(&header_segs) < REQUEST_HEADER_SIZE as u64 {
            return Err(RequestError::ShortHeader {
                len: layout.readable_len() as usize,
            }
            .into());
        }
        read_stream(mem, &header_segs, &mut header)?;
        let header = parse_header(&header)?;

        let s = &self.stats;
        bump(match header.request_type {
            RequestType::In => &s.reads,
            RequestType::Out => &s.writes,
            RequestType::Flush => &s.flushes,
            RequestType::GetId => &s.get_ids,
            RequestType::Discard => &s.discards,
            RequestType::WriteZeroes => &s.write_zeroes,
            RequestType::Unknown(t) => {
                debug!("unknown request type {t}");
                return Err(Failure::Unsupported);
            }
        });
        if inject_failure {
            return Err(Failure::Injected);
        }

        // Bytes after the header (device-readable) and before the status (device-writable).
        let readable_payload = layout.readable_len() - REQUEST_HEADER_SIZE as u64;
        let writable_payload = layout.writable_len() - 1;
        match header.request_type {
            RequestType::In => {
                if readable_payload != 0 {
                    return Err(Failure::Malformed("read with device-readable data"));
                }
                let data = slice_segments(&layout.writable, 0, writable_payload);
                let bytes = self.check_data(header.sector, &data)?;
                self.transfer(mem, header.sector, &data, true)?;
                add(&s.bytes_read, bytes);
                Ok(())
            }
            RequestType::Out => {
                if writable_payload != 0 {
                    return Err(Failure::Malformed("write with device-writable data"));
                }
                let data = slice_segments(
                    &layout.readable,
                    REQUEST_HEADER_SIZE as u64,
                    readable_payload,
                );
                let bytes = self.check_data(header.sector, &data)?;
                if self.cfg.read_only {
                    return Err(Failure::ReadOnly);
                }
                self.transfer(mem, header.sector, &data, false)?;
                add(&s.bytes_written, bytes);
                Ok(())
            }
            RequestType::Flush => {
                if !has_feature(acked, VIRTIO_BLK_F_FLUSH) {
                    return Err(Failure::Unsupported);
                }
                self.storage.flush().map_err(Failure::Storage)
            }
            RequestType::GetId => {
                let n = writable_payload.min(self.id.len() as u64) as usize;
                let segs = slice_segments(&layout.writable, 0, n as u64);
                write_stream(mem, &segs, &self.id[..n])
            }
            RequestType::Discard => {
                if !has_feature(acked, VIRTIO_BLK_F_DISCARD) || !self.cfg.discard {
                    return Err(Failure::Unsupported);
                }
                self.ranges(mem, layout, RangeOp::Discard, readable_payload)
            }
            RequestType::WriteZeroes => {
                if !has_feature(acked, VIRTIO_BLK_F_WRITE_ZEROES) || !self.cfg.write_zeroes {
                    return Err(Failure::Unsupported);
                }
                self.ranges(mem, layout, RangeOp::WriteZeroes, readable_payload)
            }
            RequestType::Unknown(_) => Err(Failure::Unsupported),
        }
    }

    /// Records the shape of a data request and checks it against the limits.
    fn check_data(&self, sector: u64, data: &[Segment]) -> Result<u64, Failure> {
        let s = &self.stats;
        let lens: Vec<u64> = data.iter().map(|seg| seg.len).collect();
        raise(&s.max_segments, lens.len() as u64);
        raise(
            &s.max_segment_bytes,
            lens.iter().copied().max().unwrap_or(0),
        );
        raise(&s.max_request_bytes, lens.iter().sum());
        Ok(self.limits.check_data(sector, &lens)?)
    }

    /// Moves the data of a checked `IN` (`to_guest`) or `OUT` between guest memory and storage.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap<()>,
        sector: u64,
        data: &[Segment],
        to_guest: bool,
    ) -> Result<(), Failure> {
        let mut offset = sector * SECTOR_SIZE;
        for seg in data {
            let len = usize::try_from(seg.len).map_err(|_| Failure::Memory)?;
            for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(seg.addr), len) {
                let slice = slice.map_err(|_| Failure::Memory)?;
                if to_guest {
                    self.storage.read_into(offset, &slice)
                } else {
                    self.storage.write_from(offset, &slice)
                }
                .map_err(Failure::Storage)?;
                offset += slice.len() as u64;
            }
        }
        Ok(())
    }

    /// Discard or write-zeroes: reads, checks and executes the range list.
    fn ranges(
        &self,
        mem: &GuestMemoryMmap<()>,
        layout: &ChainLayout,
        op: RangeOp,
        payload_len: u64,
    ) -> Result<(), Failure> {
        let s = &self.stats;
        let (max_ranges, max_range_sectors, max_seg) = match op {
            RangeOp::Discard => (
                &s.max_discard_ranges,
                &s.max_discard_range_sectors,
                self.limits.max_discard_seg,
            ),
            RangeOp::WriteZeroes => (
                &s.max_write_zeroes_ranges,
                &s.max_write_zeroes_range_sectors,
                self.limits.max_write_zeroes_seg,
            ),
        };
        if !payload_len.is_multiple_of(RANGE_SIZE as u64) {
            return Err(RequestError::RangeListLength {
                len: payload_len as usize,
            }
            .into());
        }
        let count = payload_len / RANGE_SIZE as u64;
        raise(max_ranges, count);
        if count > u64::from(max_seg) {
            // Refused before reading: the list may be arbitrarily long.
            return Err(RequestError::TooManyRanges {
                op,
                count: count as usize,
                max: max_seg,
            }
            .into());
        }
        let mut bytes = vec![0u8; payload_len as usize];
        let segs = slice_segments(&layout.readable, REQUEST_HEADER_SIZE as u64, payload_len);
        read_stream(mem, &segs, &mut bytes)?;
        let ranges = parse_ranges(&bytes)?;
        raise(
            max_range_sectors,
            ranges
                .iter()
                .map(|r| u64::from(r.num_sectors))
                .max()
                .unwrap_or(0),
        );
        self.limits.check_ranges(op, &ranges)?;
        if self.cfg.read_only {
            return Err(Failure::ReadOnly);
        }
        for Range {
            sector,
            num_sectors,
            flags,
        } in ranges
        {
            let (offset, len) = (sector * SECTOR_SIZE, u64::from(num_sectors) * SECTOR_SIZE);
            match op {
                RangeOp::Discard => self.storage.discard(offset, len),
                RangeOp::WriteZeroes => {
                    self.storage
                        .write_zeroes(offset, len, flags & RANGE_FLAG_UNMAP != 0)
                }
            }
            .map_err(Failure::Storage)?;
        }
        Ok(())
    }
}

/// Reads `buf.len()` bytes of the stream `segs` (which must hold that many).
fn read_stream(mem: &GuestMemoryMmap<()>, segs: &[Segment], buf: &mut [u8]) -> Result<(), Failure> {
    let mut done = 0usize;
    for seg in segs {
        let n = seg.len as usize;
        let dst = buf.get_mut(done..done + n).ok_or(Failure::Memory)?;
        mem.read_slice(dst, GuestAddress(seg.addr))
            .map_err(|_| Failure::Memory)?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(Failure::Memory)
    }
}

/// Writes `data` over the stream `segs` (which must hold exactly that many bytes).
fn write_stream(mem: &GuestMemoryMmap<()>, segs: &[Segment], data: &[u8]) -> Result<(), Failure> {
    let mut done = 0usize;
    for seg in segs {
        let n = seg.len as usize;
        let src = data.get(done..done + n).ok_or(Failure::Memory)?;
        mem.write_slice(src, GuestAddress(seg.addr))
            .map_err(|_| Failure::Memory)?;
        done += n;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(Failure::Memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk_config::Backing;
    use crate::faults::Stats;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    };

    const OK: Option<u8> = Some(VIRTIO_BLK_S_OK as u8);
    const IOERR: Option<u8> = Some(VIRTIO_BLK_S_IOERR as u8);
    const UNSUPP: Option<u8> = Some(VIRTIO_BLK_S_UNSUPP as u8);

    /// Guest memory of 4 MiB at 0 and a device on a 1 MiB RAM disk.
    struct Rig {
        mem: GuestMemoryMmap<()>,
        dev: BlkDevice,
        acked: u64,
    }

    const HDR: u64 = 0x1000;
    const STATUS: u64 = 0x2000;
    const DATA: u64 = 0x10_0000;

    impl Rig {
        fn new(cfg: BlkTargetConfig) -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let acked = cfg.device_features();
            let dev = BlkDevice::new(cfg, Arc::new(StatCounters::default())).unwrap();
            Rig { mem, dev, acked }
        }

        fn default() -> Self {
            Self::new(BlkTargetConfig {
                backend: Backing::Ram {
                    size_bytes: 1 << 20,
                },
                seg_max: 8,
                size_max: 64 << 10,
                max_discard_sectors: 64,
                max_discard_seg: 2,
                max_write_zeroes_sectors: 32,
                max_write_zeroes_seg: 1,
                serial: "rig-serial".into(),
                ..Default::default()
            })
        }

        fn header(&self, t: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&t.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        }

        fn run(&self, descs: &[(u64, u32, bool)]) -> Outcome {
            self.run_with(descs, false)
        }

        fn run_with(&self, descs: &[(u64, u32, bool)], inject: bool) -> Outcome {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let out = self
                .dev
                .execute(&self.mem, descs.iter().copied(), self.acked, inject);
            if let Some(status) = out.status {
                let written: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
                assert_eq!(written, status, "status byte in guest memory");
            }
            out
        }

        /// A plain request: header, data segments, status.
        fn request(
            &self,
            t: u32,
            sector: u64,
            data: &[(u64, u32)],
            device_writes: bool,
        ) -> Outcome {
            self.header(t, sector);
            let mut descs = vec![(HDR, 16, false)];
            descs.extend(data.iter().map(|&(a, l)| (a, l, device_writes)));
            descs.push((STATUS, 1, true));
            self.run(&descs)
        }

        fn fill(&self, addr: u64, len: usize, seed: u8) -> Vec<u8> {
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
            self.mem.write_slice(&data, GuestAddress(addr)).unwrap();
            data
        }

        fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        fn ranges(&self, t: u32, ranges: &[Range]) -> Outcome {
            self.header(t, 0);
            let bytes: Vec<u8> = ranges.iter().flat_map(|r| r.to_bytes()).collect();
            self.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
            let mut descs = vec![(HDR, 16, false)];
            if !bytes.is_empty() {
                descs.push((DATA, bytes.len() as u32, false));
            }
            descs.push((STATUS, 1, true));
            self.run(&descs)
        }

        fn stats(&self) -> Stats {
            self.dev.stats().snapshot()
        }
    }

    #[test]
    fn write_then_read_multi_segment() {
        let rig = Rig::default();
        let a = rig.fill(DATA, 4096, 1);
        let b = rig.fill(DATA + 0x8000, 512, 2);
        let out = rig.request(
            VIRTIO_BLK_T_OUT,
            8,
            &[(DATA, 4096), (DATA + 0x8000, 512)],
            false,
        );
        assert_eq!(
            out,
            Outcome {
                status: OK,
                used_len: 1
            }
        );

        // Read back with a different framing: one segment.
        let out = rig.request(VIRTIO_BLK_T_IN, 8, &[(DATA + 0x2_0000, 4608)], true);
        assert_eq!(
            out,
            Outcome {
                status: OK,
                used_len: 4609
            }
        );
        let back = rig.read_mem(DATA + 0x2_0000, 4608);
        assert_eq!(&back[..4096], &a[..]);
        assert_eq!(&back[4096..], &b[..]);

        let s = rig.stats();
        assert_eq!((s.reads, s.writes, s.ok), (1, 1, 2));
        assert_eq!((s.bytes_written, s.bytes_read), (4608, 4608));
        assert_eq!(s.max_segments, 2);
        assert_eq!(s.max_segment_bytes, 4608);
        assert_eq!(s.max_request_bytes, 4608);
    }

    #[test]
    fn header_and_data_in_one_descriptor() {
        let rig = Rig::default();
        // Header immediately followed by the data in the same buffer.
        rig.header(VIRTIO_BLK_T_OUT, 2);
        let data = rig.fill(HDR + 16, 512, 9);
        let out = rig.run(&[(HDR, 16 + 512, false), (STATUS, 1, true)]);
        assert_eq!(out.status, OK);
        // Data and status in one writable buffer.
        rig.header(VIRTIO_BLK_T_IN, 2);
        let out = rig.run(&[(HDR, 16, false), (STATUS - 512, 513, true)]);
        assert_eq!(
            out,
            Outcome {
                status: OK,
                used_len: 513
            }
        );
        assert_eq!(rig.read_mem(STATUS - 512, 512), data);
    }

    #[test]
    fn limits_are_enforced_and_counted() {
        let rig = Rig::default();
        // 9 segments > seg_max 8.
        let segs: Vec<(u64, u32)> = (0..9).map(|i| (DATA + i * 0x1000, 512)).collect();
        assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, &segs, false).status, IOERR);
        assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &segs, true).status, IOERR);
        // One segment > size_max 64 KiB.
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 128 << 10)], true)
                .status,
            IOERR
        );
        let s = rig.stats();
        assert_eq!(s.oversize_rejected, 3);
        assert_eq!(s.max_segments, 9);
        assert_eq!(s.max_segment_bytes, 128 << 10);
        // Exactly at the limits is fine.
        let segs: Vec<(u64, u32)> = (0..8).map(|i| (DATA + i * 0x1_0000, 64 << 10)).collect();
        assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, &segs, false).status, OK);
        assert_eq!(rig.stats().oversize_rejected, 3);
    }

    #[test]
    fn out_of_range_and_misaligned() {
        let rig = Rig::default();
        let last = (1 << 20) / 512 - 1;
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, last, &[(DATA, 512)], true)
                .status,
            OK
        );
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, last, &[(DATA, 1024)], true)
                .status,
            IOERR
        );
        assert_eq!(
            rig.request(VIRTIO_BLK_T_OUT, u64::MAX, &[(DATA, 512)], false)
                .status,
            IOERR
        );
        assert_eq!(rig.stats().out_of_range, 2);
        // Partial sector.
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 100)], true).status,
            IOERR
        );
        assert_eq!(rig.stats().malformed, 1);

        let rig4k = Rig::new(BlkTargetConfig {
            backend: Backing::Ram {
                size_bytes: 1 << 20,
            },
            block_size: 4096,
            ..Default::default()
        });
        assert_eq!(
            rig4k
                .request(VIRTIO_BLK_T_IN, 8, &[(DATA, 4096)], true)
                .status,
            OK
        );
        assert_eq!(
            rig4k
                .request(VIRTIO_BLK_T_IN, 1, &[(DATA, 4096)], true)
                .status,
            IOERR
        );
        assert_eq!(
            rig4k
                .request(VIRTIO_BLK_T_IN, 8, &[(DATA, 512)], true)
                .status,
            IOERR
        );
    }

    #[test]
    fn get_id_flush_and_unknown() {
        let rig = Rig::default();
        let out = rig.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20)], true);
        assert_eq!(
            out,
            Outcome {
                status: OK,
                used_len: 21
            }
        );
        let mut want = [0u8; 20];
        want[..10].copy_from_slice(b"rig-serial");
        assert_eq!(rig.read_mem(DATA, 20), want);

        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).status, OK);
        assert_eq!(rig.request(99, 0, &[], false).status, UNSUPP);
        let s = rig.stats();
        assert_eq!((s.get_ids, s.flushes, s.unsupported), (1, 1, 1));

        // Flush not negotiated.
        let mut rig = Rig::default();
        rig.acked &= !(1 << VIRTIO_BLK_F_FLUSH);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).status,
            UNSUPP
        );
    }

    #[test]
    fn discard_and_write_zeroes() {
        let rig = Rig::default();
        let r = |sector, num_sectors, flags| Range {
            sector,
            num_sectors,
            flags,
        };
        let pattern = rig.fill(DATA + 0x4_0000, 64 * 512, 3);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_OUT, 0, &[(DATA + 0x4_0000, 32 * 512)], false)
                .status,
            OK
        );
        // Zero sectors 4..8 with unmap.
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[r(4, 4, RANGE_FLAG_UNMAP)])
                .status,
            OK
        );
        rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x8_0000, 16 * 512)], true);
        let back = rig.read_mem(DATA + 0x8_0000, 16 * 512);
        assert_eq!(&back[..2048], &pattern[..2048]);
        assert!(back[2048..4096].iter().all(|&b| b == 0));
        assert_eq!(&back[4096..], &pattern[4096..16 * 512]);

        // Discard two ranges.
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_DISCARD, &[r(0, 2, 0), r(10, 64, 0)])
                .status,
            OK
        );
        // Limits.
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_DISCARD, &[r(0, 1, 0); 3]).status,
            IOERR
        );
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_DISCARD, &[r(0, 65, 0)]).status,
            IOERR
        );
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[r(0, 1, 0); 2])
                .status,
            IOERR
        );
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[r(0, 33, 0)]).status,
            IOERR
        );
        // Flags.
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_DISCARD, &[r(0, 1, RANGE_FLAG_UNMAP)])
                .status,
            UNSUPP
        );
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[r(0, 1, 4)]).status,
            UNSUPP
        );
        // Empty list, beyond capacity.
        assert_eq!(rig.ranges(VIRTIO_BLK_T_DISCARD, &[]).status, IOERR);
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_DISCARD, &[r(2047, 2, 0)]).status,
            IOERR
        );

        let s = rig.stats();
        assert_eq!(s.discard_limit_rejected, 2);
        assert_eq!(s.write_zeroes_limit_rejected, 2);
        assert_eq!(s.max_discard_ranges, 3);
        assert_eq!(s.max_discard_range_sectors, 65);
        assert_eq!(s.max_write_zeroes_range_sectors, 33);
        assert_eq!(s.out_of_range, 1);

        // Not negotiated.
        let mut rig = Rig::default();
        rig.acked &= !(1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES);
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_DISCARD, &[r(0, 1, 0)]).status,
            UNSUPP
        );
        assert_eq!(
            rig.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[r(0, 1, 0)]).status,
            UNSUPP
        );
    }

    #[test]
    fn read_only_refuses_writes() {
        let rig = Rig::new(BlkTargetConfig {
            backend: Backing::Ram {
                size_bytes: 1 << 20,
            },
            read_only: true,
            ..Default::default()
        });
        assert_eq!(
            rig.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512)], false)
                .status,
            IOERR
        );
        assert_eq!(
            rig.ranges(
                VIRTIO_BLK_T_DISCARD,
                &[Range {
                    sector: 0,
                    num_sectors: 1,
                    flags: 0
                }]
            )
            .status,
            IOERR
        );
        assert_eq!(
            rig.ranges(
                VIRTIO_BLK_T_WRITE_ZEROES,
                &[Range {
                    sector: 0,
                    num_sectors: 1,
                    flags: 0
                }]
            )
            .status,
            IOERR
        );
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512)], true).status,
            OK
        );
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).status, OK);
        assert_eq!(rig.stats().read_only_rejected, 3);
    }

    #[test]
    fn malformed_chains_never_panic() {
        let rig = Rig::default();
        rig.header(VIRTIO_BLK_T_IN, 0);
        // No status byte at all.
        assert_eq!(
            rig.run(&[(HDR, 16, false)]),
            Outcome {
                status: None,
                used_len: 0
            }
        );
        assert_eq!(
            rig.run(&[]),
            Outcome {
                status: None,
                used_len: 0
            }
        );
        // Readable after writable.
        assert_eq!(
            rig.run(&[
                (HDR, 16, false),
                (DATA, 512, true),
                (DATA, 512, false),
                (STATUS, 1, true)
            ]),
            Outcome {
                status: None,
                used_len: 0
            }
        );
        // Short header.
        assert_eq!(rig.run(&[(HDR, 8, false), (STATUS, 1, true)]).status, IOERR);
        assert_eq!(rig.run(&[(STATUS, 1, true)]).status, IOERR);
        // Data in the wrong direction.
        assert_eq!(
            rig.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
                .status,
            IOERR
        );
        rig.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            rig.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
                .status,
            IOERR
        );
        // Data outside guest memory, and straddling its end.
        rig.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            rig.run(&[(HDR, 16, false), (1 << 40, 512, true), (STATUS, 1, true)])
                .status,
            IOERR
        );
        assert_eq!(
            rig.run(&[
                (HDR, 16, false),
                ((4 << 20) - 256, 512, true),
                (STATUS, 1, true)
            ])
            .status,
            IOERR
        );
        assert_eq!(
            rig.run(&[
                (HDR, 16, false),
                (u64::MAX - 100, 512, true),
                (STATUS, 1, true)
            ])
            .status,
            IOERR
        );
        // Header outside guest memory.
        assert_eq!(
            rig.run(&[(1 << 40, 16, false), (STATUS, 1, true)]).status,
            IOERR
        );
        // Status byte outside guest memory: nothing to report.
        assert_eq!(
            rig.dev.execute(
                &rig.mem,
                [(HDR, 16, false), (1u64 << 40, 1, true)],
                rig.acked,
                false
            ),
            Outcome {
                status: None,
                used_len: 0
            }
        );
        // A huge range list is refused without being read.
        rig.header(VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            rig.run(&[
                (HDR, 16, false),
                (1 << 40, !15u32, false),
                (STATUS, 1, true)
            ])
            .status,
            IOERR
        );
        assert!(rig.stats().malformed >= 10);
    }

    #[test]
    fn injected_failure_skips_execution() {
        let rig = Rig::default();
        rig.fill(DATA, 512, 5);
        rig.header(VIRTIO_BLK_T_OUT, 0);
        let out = rig.run_with(
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            true,
        );
        assert_eq!(out.status, IOERR);
        let s = rig.stats();
        assert_eq!(
            (s.writes, s.injected_errors, s.io_errors, s.bytes_written),
            (1, 1, 1, 0)
        );
        // The disk still reads zeros.
        rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x1000, 512)], true);
        assert!(rig.read_mem(DATA + 0x1000, 512).iter().all(|&b| b == 0));
    }
}
