//! One request queue of a virtio-blk controller, owned by one I/O channel: requests
//! encoded into the queue's device-shared slots (virtio 1.2 section 5.2.6), completions
//! checked and handed back; failures and reconnections go through [`QueueLife`].

use std::mem::offset_of;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_virtio::wire::blk::{
    Range, ReqHeader, RequestSlot, ID_BYTES, SLOT_RANGES, S_IOERR, S_OK, S_UNSET, S_UNSUPP,
    T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use vireo_virtio::{Notifier, QueueFailure, RequestQueue, Segment, Virtqueue};
use vmm_sys_util::eventfd::EventFd;

use super::BlkShared;
use crate::driver::{ChannelDriver, Child, ChildDone};
use crate::error::IoError;
use crate::io::IoOp;
use crate::queue_life::{queue_error, Admission, LifeQueue, QueueLife};
use crate::reconnect::ControllerShared;

const HDR_OFF: u64 = offset_of!(RequestSlot, hdr) as u64;
const STATUS_OFF: usize = offset_of!(RequestSlot, status);
const RANGES_OFF: u64 = offset_of!(RequestSlot, ranges) as u64;

/// A virtio-blk request queue and what it holds.
struct BlkQueue {
    rq: RequestQueue<RequestSlot>,
    shared: Arc<BlkShared>,
    /// Each slot's request, kept to send it again after a reconnection.
    slot_child: Box<[Child]>,
    segs: Vec<Segment>,
    /// Requests that failed without a device completion (a failed queue), handed out
    /// by the next poll.
    failed_locally: Vec<ChildDone>,
}

/// One queue of a virtio-blk controller, owned by one channel.
pub(super) struct BlkChannel {
    q: BlkQueue,
    life: QueueLife<Child>,
}

impl BlkChannel {
    pub(super) fn new(shared: Arc<BlkShared>, ring: Virtqueue) -> Result<BlkChannel, IoError> {
        let n = ring.size() as usize;
        let index = ring.index();
        // The ring's generation and the flag to watch, read together (a ring of an
        // earlier connection gets a raised flag and is swapped for its new one).
        if !shared.queues.opened() {
            shared.queues.give(ring);
            return Err(IoError::Removed(format!(
                "controller {} is being detached",
                shared.name
            )));
        }
        let (generation, flag) = shared.link.bind(&ring, &shared.health);
        let rq = match RequestQueue::new(&shared.mem, ring, flag) {
            Ok(rq) => rq,
            Err(e) => {
                shared.queues.closed();
                return Err(IoError::NoMemory(e.to_string()));
            }
        };
        Ok(BlkChannel {
            q: BlkQueue {
                rq,
                slot_child: vec![Child::EMPTY; n].into_boxed_slice(),
                segs: Vec::with_capacity(shared.max_segments + 2),
                shared,
                failed_locally: Vec::new(),
            },
            life: QueueLife::new(index, generation),
        })
    }

    /// The queue failed with `f` (see [`QueueLife::on_failure`]).
    fn fail(&mut self, f: QueueFailure) {
        self.life.on_failure(&mut self.q, f);
    }

    /// Fetch the serial number synchronously.
    pub(super) fn get_id(&mut self, timeout: Duration) -> Result<Option<String>, IoError> {
        let mut id = self
            .q
            .shared
            .mem
            .alloc(ID_BYTES, 64)
            .map_err(|e| IoError::NoMemory(e.to_string()))?;
        id.as_mut_slice().fill(0);
        let slot = self
            .q
            .rq
            .take_slot()
            .ok_or_else(|| IoError::InvalidRequest("no slot".into()))?;
        let s = self.q.rq.slot_mut(slot);
        s.hdr = ReqHeader {
            type_: T_GET_ID.into(),
            ioprio: 0.into(),
            sector: 0.into(),
        };
        s.status = S_UNSET;
        let base = self.q.rq.slot_addr(slot);
        let segs = [
            Segment {
                addr: base + HDR_OFF,
                len: 16,
            },
            Segment {
                addr: id.iova(),
                len: ID_BYTES as u32,
            },
            Segment {
                addr: base + STATUS_OFF as u64,
                len: 1,
            },
        ];
        self.q
            .rq
            .submit(slot, &segs, 1)
            .map_err(|_| IoError::InvalidRequest("ring full".into()))?;
        if let Err(f) = self.q.rq.publish() {
            // The avail index may already be visible: the device may write the id.
            id.retire();
            self.fail(f.clone());
            return Err(queue_error(&f));
        }
        let start = Instant::now();
        let mut status = None;
        while status.is_none() {
            match self
                .q
                .rq
                .poll(|rq, s, _| status = Some(rq.read_at::<u8>(s, STATUS_OFF)))
            {
                Ok(_) => {}
                Err(f) => {
                    id.retire();
                    self.fail(f.clone());
                    return Err(queue_error(&f));
                }
            }
            if status.is_none() {
                if self.q.shared.health.is_broken() {
                    id.retire();
                    self.fail(QueueFailure::Disconnected);
                    return Err(IoError::Disconnected);
                }
                if start.elapsed() > timeout {
                    // The device still owns the id buffer.
                    id.retire();
                    let why = "GET_ID did not complete".to_string();
                    self.fail(QueueFailure::Device(why.clone()));
                    return Err(IoError::ControllerFailed(why));
                }
                std::thread::yield_now();
            }
        }
        self.q.rq.release_slot(slot);
        match status {
            Some(S_OK) => {
                let id = id.as_slice();
                let end = id.iter().position(|&c| c == 0).unwrap_or(ID_BYTES);
                let s: String = String::from_utf8_lossy(&id[..end])
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect();
                let s = s.trim().to_string();
                Ok(if s.is_empty() { None } else { Some(s) })
            }
            Some(S_IOERR | S_UNSUPP) => Ok(None),
            other => Err(IoError::ControllerFailed(format!(
                "invalid virtio-blk status byte {:#x} for GET_ID",
                other.unwrap_or(S_UNSET)
            ))),
        }
    }
}

impl LifeQueue for BlkQueue {
    type Request = Child;

    fn controller(&self) -> &dyn ControllerShared {
        &*self.shared
    }

    fn fail_ring(&mut self, f: QueueFailure) {
        self.rq.fail(f);
    }

    fn take_in_flight(&mut self) -> Vec<Child> {
        let slots = self.rq.drain_in_flight();
        slots
            .into_iter()
            .map(|s| std::mem::replace(&mut self.slot_child[s as usize], Child::EMPTY))
            .collect()
    }

    fn complete(&mut self, c: Child, result: Result<(), IoError>) {
        self.failed_locally.push(ChildDone::new(c.parent, result));
    }

    fn send(&mut self, c: Child) -> Result<(), Child> {
        if self.submit_child(&c) {
            Ok(())
        } else {
            Err(c)
        }
    }

    fn publish_ring(&mut self) -> Result<(), QueueFailure> {
        self.rq.publish()
    }

    fn reattach(
        &mut self,
        notifier: Notifier,
        signal: Option<Arc<EventFd>>,
    ) -> Result<(), IoError> {
        if self
            .rq
            .reattach(notifier, signal, self.shared.health.broken_arc())
        {
            Ok(())
        } else {
            Err(IoError::ReconnectFailed(
                "the request queue cannot be handed to the new connection".into(),
            ))
        }
    }

    fn replace_ring(&mut self, ring: Virtqueue) -> Result<(), IoError> {
        let rq = RequestQueue::new(&self.shared.mem, ring, self.shared.health.broken_arc())
            .map_err(|e| IoError::NoMemory(e.to_string()))?;
        // The old queue leaks its memory (it failed): a back-end that went away must
        // not write into reused memory.
        drop(std::mem::replace(&mut self.rq, rq));
        Ok(())
    }

    fn take_ring(&mut self) -> Option<Virtqueue> {
        self.rq.take_ring()
    }

    fn ring_lost(&self) -> bool {
        self.rq.lost()
    }
}

impl ChannelDriver for BlkChannel {
    fn queue(&mut self, c: &Child) -> bool {
        match self.life.admission() {
            Admission::Send => self.q.submit_child(c),
            // Waits for the connection (and the requests kept from the last one).
            Admission::Wait => false,
            Admission::Refuse(e) => {
                let e = e.clone();
                self.q.failed_locally.push(ChildDone::new(c.parent, Err(e)));
                true
            }
        }
    }

    fn publish(&mut self) {
        self.life.publish(&mut self.q);
    }

    fn poll(&mut self, out: &mut Vec<ChildDone>) -> usize {
        let before = out.len();
        if self.life.before_poll(&mut self.q) {
            if let Err(f) = self.q.reap(out) {
                self.fail(f);
            }
        }
        out.append(&mut self.q.failed_locally);
        out.len() - before
    }

    fn arm(&mut self) -> Option<(std::os::fd::RawFd, bool)> {
        if !self.life.is_up() || !self.q.failed_locally.is_empty() {
            return None;
        }
        self.q.rq.arm()
    }

    fn reset_controller(&mut self) -> Result<(), IoError> {
        self.life.reset_controller(&self.q)
    }

    fn disarm(&mut self) {
        self.q.rq.disarm();
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.q.rq.completion_fd()
    }
}

impl BlkQueue {
    /// Put one request on the ring (a copy of it in its slot); `false` when the ring is
    /// full. A request that cannot be sent at all completes with its error (`true`).
    #[inline]
    fn submit_child(&mut self, c: &Child) -> bool {
        let Some(slot) = self.rq.take_slot() else {
            return false;
        };
        let sh = &*self.shared;
        let base = self.rq.slot_addr(slot);
        let sector = c.lba * sh.sectors_per_block;
        if matches!(c.op, IoOp::Read | IoOp::Write)
            && c.len > 0
            && c.len as u64 <= sh.segment_bytes
            && c.sg.is_none()
        {
            // The common read or write: one data segment, the chain built on the stack.
            let s = self.rq.slot_mut(slot);
            s.status = S_UNSET;
            let (ty, n_out) = if c.op == IoOp::Read {
                (T_IN, 1)
            } else {
                (T_OUT, 2)
            };
            s.hdr = ReqHeader {
                type_: ty.into(),
                ioprio: 0.into(),
                sector: sector.into(),
            };
            let segs = [
                Segment {
                    addr: base + HDR_OFF,
                    len: 16,
                },
                Segment {
                    addr: c.addr,
                    len: c.len,
                },
                Segment {
                    addr: base + STATUS_OFF as u64,
                    len: 1,
                },
            ];
            let r = self.rq.submit(slot, &segs, n_out);
            return self.record_on_ring(slot, c, r.is_ok());
        }
        let mut segs = std::mem::take(&mut self.segs);
        segs.clear();
        segs.push(Segment {
            addr: base + HDR_OFF,
            len: 16,
        });
        let s = self.rq.slot_mut(slot);
        s.status = S_UNSET;
        let n_out = match c.op {
            IoOp::Read | IoOp::Write => {
                let ty = if c.op == IoOp::Read { T_IN } else { T_OUT };
                s.hdr = ReqHeader {
                    type_: ty.into(),
                    ioprio: 0.into(),
                    sector: sector.into(),
                };
                c.data_segments(sh.segment_bytes, |s| segs.push(s));
                if c.op == IoOp::Read {
                    1
                } else {
                    segs.len()
                }
            }
            IoOp::Flush => {
                s.hdr = ReqHeader {
                    type_: T_FLUSH.into(),
                    ioprio: 0.into(),
                    sector: 0.into(),
                };
                1
            }
            IoOp::Unmap | IoOp::WriteZeroes => {
                let (ty, per, flags) = if c.op == IoOp::Unmap {
                    (T_DISCARD, sh.range_sectors_unmap, 0u32)
                } else {
                    let flags = if c.no_unmap { 0 } else { sh.write_zeroes_flags };
                    (T_WRITE_ZEROES, sh.range_sectors_wz, flags)
                };
                s.hdr = ReqHeader {
                    type_: ty.into(),
                    ioprio: 0.into(),
                    sector: 0.into(),
                };
                let mut sec = sector;
                let mut left = c.blocks * sh.sectors_per_block;
                let mut i = 0usize;
                // The bdev layer splits to max_unmap_segments x range_sectors, at most
                // SLOT_RANGES ranges.
                while left > 0 && i < SLOT_RANGES {
                    let n = left.min(per);
                    s.ranges[i] = Range {
                        sector: sec.into(),
                        num_sectors: (n as u32).into(),
                        flags: flags.into(),
                    };
                    sec += n;
                    left -= n;
                    i += 1;
                }
                if left > 0 {
                    // The bdev layer's split keeps this unreachable; never send less.
                    self.rq.release_slot(slot);
                    self.segs = segs;
                    self.failed_locally.push(ChildDone::new(
                        c.parent,
                        Err(IoError::InvalidRequest(format!(
                            "{} of {} blocks needs more than {SLOT_RANGES} ranges",
                            c.op.name(),
                            c.blocks
                        ))),
                    ));
                    return true;
                }
                segs.push(Segment {
                    addr: base + RANGES_OFF,
                    len: (16 * i) as u32,
                });
                2
            }
        };
        segs.push(Segment {
            addr: base + STATUS_OFF as u64,
            len: 1,
        });
        let r = self.rq.submit(slot, &segs, n_out);
        self.segs = segs;
        self.record_on_ring(slot, c, r.is_ok())
    }

    /// After putting `c`'s chain in `slot` on the ring: record a copy of it, or give
    /// the slot back (no ring space: the caller keeps the child, which waits). Returns
    /// whether it went on the ring.
    #[inline]
    fn record_on_ring(&mut self, slot: u16, c: &Child, on_ring: bool) -> bool {
        if on_ring {
            // Copied once the request is on the ring: by then the stores that built
            // `c` have reached the cache.
            self.slot_child[slot as usize].clone_from(c);
        } else {
            self.rq.release_slot(slot);
        }
        on_ring
    }

    /// Reap completions into `out`, each status checked. A device that broke the
    /// protocol gives the failure to report.
    fn reap(&mut self, out: &mut Vec<ChildDone>) -> Result<(), QueueFailure> {
        let mut bad: Option<String> = None;
        let children = &self.slot_child;
        let r = self.rq.poll(|rq, slot, _len| {
            let result = match rq.read_at::<u8>(slot, STATUS_OFF) {
                S_OK => Ok(()),
                S_IOERR => Err(IoError::Device),
                S_UNSUPP => Err(IoError::DeviceUnsupported),
                S_UNSET => {
                    let why = "the device completed a request without writing its status";
                    bad.get_or_insert_with(|| why.to_string());
                    Err(IoError::ControllerFailed(why.into()))
                }
                other => {
                    let why = format!("invalid virtio-blk status byte {other:#x}");
                    bad.get_or_insert_with(|| why.clone());
                    Err(IoError::ControllerFailed(why))
                }
            };
            rq.release_slot(slot);
            out.push(ChildDone::new(children[slot as usize].parent, result));
        });
        r?;
        match bad {
            Some(why) => Err(QueueFailure::Device(why)),
            None => Ok(()),
        }
    }
}

impl Drop for BlkChannel {
    fn drop(&mut self) {
        self.q.shared.queues.closed();
        self.life.close(&mut self.q);
    }
}
