//! One virtio-scsi request queue with its request/response slots.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_virtio::{DmaBuf, DmaMemory, Segment, SplitQueue, Used};

use super::wire::{response, Resp, MAX_SENSE, REQ_HEADER, RESP_HEADER};
use crate::error::IoError;

/// Sizes the device asked for, fixed at attach.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// CDB bytes in a request.
    pub cdb_size: usize,
    /// Sense bytes in a response.
    pub sense_size: usize,
    /// Bytes per slot: request header at 0, response at `resp_off`.
    pub stride: usize,
    /// Offset of the response in a slot.
    pub resp_off: usize,
}

impl Geometry {
    /// Layout for the device's CDB and sense sizes.
    pub fn new(cdb_size: usize, sense_size: usize) -> Geometry {
        let resp_off = (REQ_HEADER + cdb_size).next_multiple_of(16);
        let stride = (resp_off + RESP_HEADER + sense_size).next_multiple_of(64);
        Geometry {
            cdb_size,
            sense_size,
            stride,
            resp_off,
        }
    }

    /// Request bytes.
    pub fn req_len(&self) -> usize {
        REQ_HEADER + self.cdb_size
    }

    /// Response bytes.
    pub fn resp_len(&self) -> usize {
        RESP_HEADER + self.sense_size
    }
}

/// A request queue and its slots (one per descriptor).
pub struct ScsiQueue {
    pub q: SplitQueue,
    pub geo: Geometry,
    slots: Option<DmaBuf>,
    base: u64,
    pub free: Vec<u16>,
    pub used: Vec<Used>,
    pub segs: Vec<Segment>,
}

impl ScsiQueue {
    pub fn new(mem: &Arc<DmaMemory>, q: SplitQueue, geo: Geometry) -> Result<ScsiQueue, IoError> {
        let n = q.size() as usize;
        let mut slots = mem
            .alloc(n * geo.stride, 4096)
            .map_err(|e| IoError::NoMemory(e.to_string()))?;
        slots.as_mut_slice().fill(0);
        Ok(ScsiQueue {
            base: slots.iova(),
            slots: Some(slots),
            free: (0..n as u16).rev().collect(),
            used: Vec::with_capacity(n),
            segs: Vec::new(),
            q,
            geo,
        })
    }

    fn slot_ptr(&self, slot: u16) -> *mut u8 {
        (self.base + (slot as usize * self.geo.stride) as u64) as *mut u8
    }

    /// Device address of the request header of `slot`.
    pub fn req_addr(&self, slot: u16) -> u64 {
        self.base + (slot as usize * self.geo.stride) as u64
    }

    /// Device address of the response of `slot`.
    pub fn resp_addr(&self, slot: u16) -> u64 {
        self.req_addr(slot) + self.geo.resp_off as u64
    }

    /// Write the request header and arm the response of `slot`.
    pub fn prepare(&mut self, slot: u16, lun: &[u8; 8], tag: u64, cdb: &[u8]) {
        let mut h = [0u8; REQ_HEADER + 32];
        h[0..8].copy_from_slice(lun);
        h[8..16].copy_from_slice(&tag.to_le_bytes());
        // task_attr SIMPLE (0), prio 0, crn 0.
        let n = cdb.len().min(self.geo.cdb_size).min(32);
        h[REQ_HEADER..REQ_HEADER + n].copy_from_slice(&cdb[..n]);
        let len = self.geo.req_len().min(h.len());
        let resp_off = self.geo.resp_off;
        let p = self.slot_ptr(slot);
        // SAFETY: the slot is owned by this queue and not in flight; the header and the
        // response header lie inside the slot's `stride` bytes (Geometry::new), and a
        // CDB area beyond 32 bytes was zeroed at allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(h.as_ptr(), p, len);
            // Response: sense_len 0, resid 0, status 0, response UNSET.
            std::ptr::write_bytes(p.add(resp_off), 0, RESP_HEADER);
            std::ptr::write_volatile(p.add(resp_off + 11), response::UNSET);
        }
    }

    /// Read the response of a completed `slot`.
    pub fn response(&self, slot: u16) -> Resp {
        // On the stack: no allocation per completion (the sense bytes are copied out
        // only when the device wrote some).
        let mut buf = [0u8; RESP_HEADER + MAX_SENSE];
        let b = &mut buf[..self.geo.resp_len().min(RESP_HEADER + MAX_SENSE)];
        // SAFETY: the response lies inside the slot; the device wrote it before it
        // published the used entry, which the ring read with Acquire ordering.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.slot_ptr(slot).add(self.geo.resp_off),
                b.as_mut_ptr(),
                b.len(),
            )
        };
        Resp::parse(b).unwrap_or(Resp {
            sense_len: 0,
            resid: 0,
            status_qualifier: 0,
            status: 0,
            response: response::UNSET,
            sense: Vec::new(),
        })
    }

    /// Put `slot`'s command on the ring: request, data-out, response, data-in.
    pub fn add(&mut self, slot: u16, data_out: &[Segment], data_in: &[Segment]) -> Result<(), ()> {
        let mut segs = std::mem::take(&mut self.segs);
        segs.clear();
        segs.push(Segment {
            addr: self.req_addr(slot),
            len: self.geo.req_len() as u32,
        });
        segs.extend_from_slice(data_out);
        segs.push(Segment {
            addr: self.resp_addr(slot),
            len: self.geo.resp_len() as u32,
        });
        segs.extend_from_slice(data_in);
        let n_out = 1 + data_out.len();
        let r = self.q.add(&segs, n_out, slot as u64).map_err(|_| ());
        self.segs = segs;
        r
    }

    /// Run one command synchronously (control path): returns the response and the used
    /// length, or an error if the device fails or does not answer in time.
    pub fn exec(
        &mut self,
        lun: &[u8; 8],
        cdb: &[u8],
        data_out: Option<&DmaBuf>,
        data_in: Option<&DmaBuf>,
        timeout: Duration,
        broken: &std::sync::atomic::AtomicBool,
    ) -> Result<Resp, IoError> {
        let slot = self
            .free
            .pop()
            .ok_or_else(|| IoError::InvalidRequest("no free slot".into()))?;
        self.prepare(slot, lun, 0x5ca0_0000 | slot as u64, cdb);
        let seg = |b: &DmaBuf| Segment {
            addr: b.iova(),
            len: b.len() as u32,
        };
        let out: Vec<Segment> = data_out.map(seg).into_iter().collect();
        let inn: Vec<Segment> = data_in.map(seg).into_iter().collect();
        if self.add(slot, &out, &inn).is_err() {
            self.free.push(slot);
            return Err(IoError::InvalidRequest("ring full".into()));
        }
        self.q
            .publish()
            .map_err(|e| IoError::ControllerFailed(e.to_string()))?;
        let start = Instant::now();
        loop {
            let mut got = None;
            self.q
                .poll(|u| got = Some(u))
                .map_err(|e| IoError::ControllerFailed(e.to_string()))?;
            if let Some(u) = got {
                if u.token != slot as u64 {
                    return Err(IoError::ControllerFailed(format!(
                        "completion for slot {} while only {slot} was in flight",
                        u.token
                    )));
                }
                self.free.push(slot);
                return Ok(self.response(slot));
            }
            if broken.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(IoError::Disconnected);
            }
            if start.elapsed() > timeout {
                // The slot stays owned by the device.
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

    /// Give the memory up for good (the device may still use it).
    pub fn leak(mut self) {
        std::mem::forget(self.slots.take());
        std::mem::forget(self);
    }
}

impl ScsiQueue {
    /// Give the ring back (for the controller's pool), freeing the slots.
    pub fn into_queue(mut self) -> SplitQueue {
        self.slots.take();
        let ScsiQueue { q, .. } = self;
        q
    }
}
