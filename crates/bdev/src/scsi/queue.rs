//! One virtio-scsi request queue: the generic [`RequestQueue`] with command slots, and
//! what the device's CDB and sense sizes make of them.

use crate::queue_life::queue_error;
use std::mem::offset_of;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_virtio::wire::scsi::{
    CmdReq, CmdSlot, RespHeader, CDB_SIZE, MAX_SENSE, REQ_HEADER, RESP_HEADER,
};
use vireo_virtio::{DmaBuf, DmaMemory, QueueFailure, RequestQueue, Segment, Virtqueue};

use super::wire::{response, Resp};
use crate::error::IoError;

const REQ_OFF: u64 = offset_of!(CmdSlot, req) as u64;
const RESP_OFF: usize = offset_of!(CmdSlot, resp);

/// Sizes the device asked for, fixed at attach.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// CDB bytes in a request.
    pub cdb_size: usize,
    /// Sense bytes in a response.
    pub sense_size: usize,
}

impl Geometry {
    /// Layout for the device's CDB and sense sizes (at most 32 and [`MAX_SENSE`]).
    pub fn new(cdb_size: usize, sense_size: usize) -> Geometry {
        Geometry {
            cdb_size: cdb_size.min(CDB_SIZE),
            sense_size: sense_size.min(MAX_SENSE),
        }
    }

    /// Request bytes the device reads.
    pub fn req_len(&self) -> usize {
        REQ_HEADER + self.cdb_size
    }

    /// Response bytes the device writes.
    pub fn resp_len(&self) -> usize {
        RESP_HEADER + self.sense_size
    }
}

/// A request queue with command slots.
pub struct ScsiQueue {
    pub rq: RequestQueue<CmdSlot>,
    pub geo: Geometry,
    segs: Vec<Segment>,
}

impl ScsiQueue {
    pub fn new(
        mem: &Arc<DmaMemory>,
        q: Virtqueue,
        geo: Geometry,
        broken: Arc<AtomicBool>,
    ) -> Result<ScsiQueue, IoError> {
        let rq = RequestQueue::new(mem, q, broken).map_err(|e| IoError::NoMemory(e.to_string()))?;
        Ok(ScsiQueue {
            rq,
            geo,
            segs: Vec::new(),
        })
    }

    /// Write the request of `slot` and arm its response (response code UNSET: a
    /// device that completes without writing one is caught).
    #[inline]
    pub fn prepare(&mut self, slot: u16, lun: &[u8; 8], tag: u64, cdb: &[u8]) {
        let s = self.rq.slot_mut(slot);
        let mut req = CmdReq {
            lun: *lun,
            tag: tag.into(),
            ..CmdReq::default()
        };
        let n = cdb.len().min(CDB_SIZE);
        req.cdb[..n].copy_from_slice(&cdb[..n]);
        s.req = req;
        s.resp.header = RespHeader {
            response: response::UNSET,
            ..RespHeader::default()
        };
    }

    /// Write the request of `slot` from a zero-padded CDB (a fixed-size copy: the I/O
    /// path's variant of [`prepare`](Self::prepare)).
    #[inline]
    pub fn prepare_padded(&mut self, slot: u16, lun: &[u8; 8], tag: u64, cdb: &[u8; CDB_SIZE]) {
        let s = self.rq.slot_mut(slot);
        s.req = CmdReq {
            lun: *lun,
            tag: tag.into(),
            task_attr: 0,
            prio: 0,
            crn: 0,
            cdb: *cdb,
        };
        s.resp.header = RespHeader {
            response: response::UNSET,
            ..RespHeader::default()
        };
    }

    /// Write the request of `slot` for a READ or WRITE whose CDB is `cdb_head` (its
    /// first 16 bytes, little-endian; the rest zero): stores from registers only, the
    /// I/O path's variant of [`prepare_padded`](Self::prepare_padded).
    #[inline]
    pub fn prepare_rw(&mut self, slot: u16, lun: &[u8; 8], tag: u64, cdb_head: u128) {
        let s = self.rq.slot_mut(slot);
        s.req.lun = *lun;
        s.req.tag = tag.into();
        s.req.task_attr = 0;
        s.req.prio = 0;
        s.req.crn = 0;
        s.req.cdb[..16].copy_from_slice(&cdb_head.to_le_bytes());
        s.req.cdb[16..].fill(0);
        s.resp.header = RespHeader {
            response: response::UNSET,
            ..RespHeader::default()
        };
    }

    /// The response header of a completed `slot`.
    #[inline]
    pub fn response_header(&self, slot: u16) -> RespHeader {
        self.rq.read_at(slot, RESP_OFF)
    }

    /// The response of a completed `slot` (sense bytes copied only when present).
    #[inline]
    pub fn response(&self, slot: u16) -> Resp {
        let h: RespHeader = self.rq.read_at(slot, RESP_OFF);
        let mut r = Resp {
            sense_len: h.sense_len.get(),
            resid: h.resid.get(),
            status_qualifier: h.status_qualifier.get(),
            status: h.status,
            response: h.response,
            sense: Vec::new(),
        };
        let n = (r.sense_len as usize).min(self.geo.sense_size);
        if n > 0 {
            let sense: [u8; MAX_SENSE] = self.rq.read_at(slot, RESP_OFF + RESP_HEADER);
            r.sense = sense[..n].to_vec();
        }
        r
    }

    /// Put `slot`'s command on the ring: request, data-out, response, data-in.
    #[inline]
    pub fn add(&mut self, slot: u16, data_out: &[Segment], data_in: &[Segment]) -> Result<(), ()> {
        let base = self.rq.slot_addr(slot);
        let mut segs = std::mem::take(&mut self.segs);
        segs.clear();
        segs.push(Segment {
            addr: base + REQ_OFF,
            len: self.geo.req_len() as u32,
        });
        // Element by element: `extend_from_slice` becomes a call to memcpy, which costs
        // more than the one or two segments a command has.
        for s in data_out {
            segs.push(*s);
        }
        segs.push(Segment {
            addr: base + RESP_OFF as u64,
            len: self.geo.resp_len() as u32,
        });
        for s in data_in {
            segs.push(*s);
        }
        let n_out = 1 + data_out.len();
        let r = self.rq.submit(slot, &segs, n_out).map_err(|_| ());
        self.segs = segs;
        r
    }

    /// Put `slot`'s command with one data segment on the ring (the common read or
    /// write), its chain built on the stack: request, then the data and the response in
    /// the order of their direction.
    #[inline]
    pub fn add_one_data(&mut self, slot: u16, data: Segment, write: bool) -> Result<(), ()> {
        let base = self.rq.slot_addr(slot);
        let req = Segment {
            addr: base + REQ_OFF,
            len: self.geo.req_len() as u32,
        };
        let resp = Segment {
            addr: base + RESP_OFF as u64,
            len: self.geo.resp_len() as u32,
        };
        let (segs, n_out) = if write {
            ([req, data, resp], 2)
        } else {
            ([req, resp, data], 1)
        };
        self.rq.submit(slot, &segs, n_out).map_err(|_| ())
    }

    /// Run one command synchronously (control path): returns the response, or an error
    /// if the device fails or does not answer in time (the slot then stays the
    /// device's).
    pub fn exec(
        &mut self,
        lun: &[u8; 8],
        cdb: &[u8],
        data_out: Option<&DmaBuf>,
        data_in: Option<&DmaBuf>,
        timeout: Duration,
        broken: &AtomicBool,
    ) -> Result<Resp, IoError> {
        let r = self.exec_inner(lun, cdb, data_out, data_in, timeout, broken);
        if r.is_err() && self.rq.failure().is_some() {
            // The command may still be on the device: its buffers stay allocated.
            data_out.map(DmaBuf::retire);
            data_in.map(DmaBuf::retire);
        }
        r
    }

    fn exec_inner(
        &mut self,
        lun: &[u8; 8],
        cdb: &[u8],
        data_out: Option<&DmaBuf>,
        data_in: Option<&DmaBuf>,
        timeout: Duration,
        broken: &AtomicBool,
    ) -> Result<Resp, IoError> {
        let slot = match self.rq.take_slot() {
            Some(s) => s,
            None => {
                return Err(match self.rq.failure() {
                    Some(f) => queue_error(f),
                    None => IoError::InvalidRequest("no free slot".into()),
                })
            }
        };
        self.prepare(slot, lun, 0x5ca0_0000 | slot as u64, cdb);
        let seg = |b: &DmaBuf| Segment {
            addr: b.iova(),
            len: b.len() as u32,
        };
        let out: Vec<Segment> = data_out.map(seg).into_iter().collect();
        let inn: Vec<Segment> = data_in.map(seg).into_iter().collect();
        if self.add(slot, &out, &inn).is_err() {
            self.rq.release_slot(slot);
            return Err(IoError::InvalidRequest("ring full".into()));
        }
        self.rq.publish().map_err(|f| queue_error(&f))?;
        let start = Instant::now();
        loop {
            let mut got = None;
            self.rq
                .poll(|_, s, _| got = Some(s))
                .map_err(|f| queue_error(&f))?;
            if let Some(s) = got {
                if s != slot {
                    let why = format!("completion for slot {s} while only {slot} was in flight");
                    self.rq.fail(QueueFailure::Device(why.clone()));
                    return Err(IoError::ControllerFailed(why));
                }
                let r = self.response(slot);
                self.rq.release_slot(slot);
                return Ok(r);
            }
            if broken.load(std::sync::atomic::Ordering::Relaxed) {
                self.rq.fail(QueueFailure::Disconnected);
                return Err(IoError::Disconnected);
            }
            if start.elapsed() > timeout {
                // The slot stays the device's: the queue is never reused.
                self.rq.fail(QueueFailure::Device(format!(
                    "SCSI command {:#04x} got no answer",
                    cdb.first().copied().unwrap_or(0)
                )));
                return Err(IoError::Timeout(format!(
                    "SCSI command {:#04x}",
                    cdb.first().copied().unwrap_or(0)
                )));
            }
            if start.elapsed() > Duration::from_millis(1) {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Give the ring back (for the controller's pool) when the queue works and the
    /// device holds nothing; otherwise the memory is kept from reuse.
    pub fn into_queue(mut self) -> Option<Virtqueue> {
        self.rq.take_ring()
    }
}
