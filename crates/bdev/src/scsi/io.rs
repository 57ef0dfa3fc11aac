//! The I/O path: one request queue per thread and controller, shared by that thread's
//! LUN channels.

use super::*;
use crate::queue_life::{Admission, LifeQueue, QueueLife};
use crate::reconnect::ControllerShared;
use std::borrow::Borrow;
use wire::response;

/// A channel's state inside its thread queue.
struct ChanState {
    ctx: Arc<LunCtx>,
    outbox: Vec<ChildDone>,
    in_flight: usize,
    /// The channel was dropped with commands still on the device: its id is not reused
    /// (their late completions must not reach another channel) until they are back.
    closed: bool,
    /// The channel asked for the queue's completion signal (its owner may sleep on it).
    armed: bool,
}

/// A virtio-scsi request queue, the commands it holds and the channels they are for.
struct ScsiRequests {
    sq: ScsiQueue,
    shared: Arc<ScsiShared>,
    chans: Vec<Option<ChanState>>,
    /// The command in each slot: (channel id, request).
    slot_child: Vec<Child>,
    /// The channel of each slot's command ([`NO_CHAN`]: the slot holds none).
    slot_chan: Vec<u32>,
    slot_tries: Vec<u8>,
    /// Bytes the residual of each slot's command is measured against, and whether a
    /// residual is acceptable.
    slot_xfer: Vec<(u32, bool)>,
    slot_unmap: Vec<Option<DmaBuf>>,
    unmap_pool: Vec<DmaBuf>,
    zero: Option<DmaBuf>,
    /// Smaller write-zeroes sources replaced by a larger one (a LUN with larger blocks):
    /// a WRITE SAME in flight may still read them, so they live as long as the queue.
    zero_retired: Vec<DmaBuf>,
    data_segs: Vec<Segment>,
    completed: Vec<u16>,
    retry: Vec<u16>,
    /// The queue's index on the device.
    index: u16,
}

/// One request queue of a virtio-scsi controller, used by every LUN channel of one
/// thread (so a controller with a single request queue still serves all its LUNs).
pub(super) struct ThreadQueue {
    q: ScsiRequests,
    life: QueueLife<(u32, Child)>,
}

/// `slot_chan` of a slot without a command.
const NO_CHAN: u32 = u32::MAX;

/// The tag of the command in `slot` of request queue `index`: unique among a LUN's
/// commands on every queue, as ABORT TASK needs.
fn command_tag(index: u16, slot: u16) -> u64 {
    ((index as u64) << 16) | slot as u64
}

impl ScsiRequests {
    /// The command in `slot` and its channel, if any.
    #[inline]
    fn child(&self, slot: u16) -> Option<(u32, &Child)> {
        let chan = *self.slot_chan.get(slot as usize)?;
        (chan != NO_CHAN).then(|| (chan, &self.slot_child[slot as usize]))
    }

    /// Take the command out of `slot`.
    fn take_child(&mut self, slot: u16) -> Option<(u32, Child)> {
        let chan = *self.slot_chan.get(slot as usize)?;
        if chan == NO_CHAN {
            return None;
        }
        self.slot_chan[slot as usize] = NO_CHAN;
        let c = std::mem::replace(&mut self.slot_child[slot as usize], Child::EMPTY);
        Some((chan, c))
    }

    /// Channel `chan` no longer waits on the queue's signal; the last one to go turns
    /// interrupts off.
    fn unarm(&mut self, chan: u32) {
        if let Some(Some(st)) = self.chans.get_mut(chan as usize) {
            if st.armed {
                st.armed = false;
                // Interrupts stay on, and the signal unconsumed, while another channel
                // of the thread is armed (they share the ring and its eventfd; one that
                // disarmed used to turn interrupts off under a sibling asleep on the fd).
                if !self.chans.iter().flatten().any(|c| c.armed) {
                    self.sq.rq.disarm();
                }
            }
        }
    }

    fn register(&mut self, ctx: Arc<LunCtx>) -> u32 {
        let st = ChanState {
            ctx,
            outbox: Vec::new(),
            in_flight: 0,
            closed: false,
            armed: false,
        };
        if let Some(i) = self.chans.iter().position(Option::is_none) {
            self.chans[i] = Some(st);
            return i as u32;
        }
        self.chans.push(Some(st));
        (self.chans.len() - 1) as u32
    }

    /// Send flushes of `chan`'s LUN to the device from now on.
    fn assume_write_cache(&self, chan: u32) {
        if let Some(Some(st)) = self.chans.get(chan as usize) {
            if let Some(f) = st.ctx.write_cache.get() {
                f.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Hand a finished command to its channel.
    fn deliver(&mut self, chan: u32, d: ChildDone) {
        let Some(entry) = self.chans.get_mut(chan as usize) else {
            return;
        };
        if let Some(c) = entry.as_mut() {
            c.in_flight = c.in_flight.saturating_sub(1);
            if !c.closed {
                c.outbox.push(d);
            } else if c.in_flight == 0 {
                // The last late completion of a dropped channel: the id is free now.
                *entry = None;
            }
        }
    }

    /// ABORT TASK for every command of `chan`'s request `parent` still on the device
    /// (each waits at most `timeout` for its answer). An aborted command is not retried.
    fn abort(&mut self, chan: u32, parent: u32, timeout: Duration) -> Result<(), IoError> {
        let lun = match self.chans.get(chan as usize) {
            Some(Some(st)) => st.ctx.lun,
            _ => return Ok(()),
        };
        let slots: Vec<u16> = (0..self.slot_chan.len() as u16)
            .filter(|&s| {
                self.slot_chan[s as usize] == chan && self.slot_child[s as usize].parent == parent
            })
            .collect();
        if slots.is_empty() {
            return Err(IoError::InvalidRequest(
                "none of its commands is on the device now".into(),
            ));
        }
        let until = std::time::Instant::now() + timeout;
        let mut first_err = None;
        for slot in slots {
            self.slot_tries[slot as usize] = MAX_RETRIES;
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let tag = command_tag(self.index, slot);
            if let Err(e) = tmf::abort_task(&self.shared, &lun, tag, left) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Build and queue the command of `c` (from channel `chan`) in `slot`.
    fn issue(&mut self, chan: u32, slot: u16, c: &Child) -> Result<(), IssueError> {
        // A copy of the LUN's parameters (no reference count traffic per I/O).
        let ctx = match self.chans.get(chan as usize) {
            Some(Some(st)) => LunParams::of(&st.ctx),
            _ => return Err(IoError::InvalidRequest("unknown channel".into()).into()),
        };
        let bs = ctx.block_size as u64;
        let mut padded = [0u8; 32];
        let mut rw_head: Option<u128> = None;
        let mut out_segs: [Segment; 1] = [Segment { addr: 0, len: 0 }];
        let mut n_out = 0usize;
        let mut data_in = false;
        match c.op {
            IoOp::Read | IoOp::Write => {
                rw_head = Some(
                    vireo_scsi::read_write_head(c.op == IoOp::Write, c.lba, c.blocks, ctx.rw16)
                        .ok_or_else(|| {
                            IoError::InvalidRequest(format!(
                                "LBA {} / {} blocks need READ/WRITE(16), which the LUN lacks",
                                c.lba, c.blocks
                            ))
                        })?,
                );
                data_in = c.op == IoOp::Read;
            }
            IoOp::Flush => {
                let n = ctx.num_blocks;
                let cdb = if n <= u32::MAX as u64 + 1 {
                    SyncCache10Cdb {
                        immed: false,
                        lba: 0,
                        blocks: 0,
                    }
                    .to_cdb()
                } else {
                    SyncCache16Cdb {
                        immed: false,
                        lba: 0,
                        blocks: 0,
                    }
                    .to_cdb()
                };
                padded = *cdb.padded();
            }
            IoOp::Unmap => {
                let mut buf = match self.slot_unmap[slot as usize].take() {
                    Some(b) => b,
                    None => match self.unmap_pool.pop() {
                        Some(b) => b,
                        None => self
                            .shared
                            .mem
                            .alloc(UNMAP_LIST_BYTES, 4096)
                            .map_err(|e| IoError::NoMemory(e.to_string()))?,
                    },
                };
                let len = {
                    let mut w = vireo_scsi::UnmapListWriter::new(buf.as_mut_slice())
                        .map_err(|e| IoError::InvalidRequest(e.to_string()))?;
                    let (mut lba, mut left) = (c.lba, c.blocks);
                    let mut n = 0usize;
                    while left > 0 {
                        let k = left.min(ctx.unmap_per_desc);
                        w.push(lba, k)
                            .map_err(|e| IoError::InvalidRequest(e.to_string()))?;
                        lba += k;
                        left -= k;
                        n += 1;
                        if n > ctx.unmap_max_desc {
                            return Err(IoError::InvalidRequest(format!(
                                "unmap of {} blocks needs more than {} descriptors",
                                c.blocks, ctx.unmap_max_desc
                            ))
                            .into());
                        }
                    }
                    w.finish()
                };
                let cdb = UnmapCdb {
                    anchor: false,
                    param_len: len,
                }
                .to_cdb();
                padded = *cdb.padded();
                out_segs[0] = Segment {
                    addr: buf.iova(),
                    len: len as u32,
                };
                n_out = 1;
                self.slot_unmap[slot as usize] = Some(buf);
            }
            IoOp::WriteZeroes => {
                if self.zero.as_ref().is_some_and(|z| (z.len() as u64) < bs) {
                    self.zero_retired.extend(self.zero.take());
                }
                if self.zero.is_none() {
                    let mut z = self
                        .shared
                        .mem
                        .alloc(bs as usize, 4096)
                        .map_err(|e| IoError::NoMemory(e.to_string()))?;
                    z.as_mut_slice().fill(0);
                    self.zero = Some(z);
                }
                let z = self.zero.as_ref().map_or(0, |z| z.iova());
                let cdb = WriteSame16Cdb {
                    lba: c.lba,
                    blocks: u32::try_from(c.blocks).map_err(|_| {
                        IoError::InvalidRequest("WRITE SAME of more than 2^32-1 blocks".into())
                    })?,
                    unmap: ctx.write_same_unmap && !c.no_unmap,
                    anchor: false,
                    ndob: false,
                    protect: 0,
                }
                .to_cdb();
                padded = *cdb.padded();
                out_segs[0] = Segment {
                    addr: z,
                    len: bs as u32,
                };
                n_out = 1;
            }
        }
        let sq = &mut self.sq;
        let tag = command_tag(self.index, slot);
        match rw_head {
            Some(head) => sq.prepare_rw(slot, &ctx.lun, tag, head),
            None => sq.prepare_padded(slot, &ctx.lun, tag, &padded),
        }
        // What the response's residual is measured against: the data of reads and
        // writes (a residual there is a short transfer, an error), the parameter data of
        // UNMAP and WRITE SAME (GOOD status says the command was done; some targets
        // report the parameter bytes as a residual).
        self.slot_xfer[slot as usize] = match c.op {
            IoOp::Read | IoOp::Write => (c.len, false),
            _ => (out_segs[..n_out].iter().map(|s| s.len).sum(), true),
        };
        if c.op.has_data() && c.len > 0 && c.len as u64 <= SEGMENT_BYTES && c.sg.is_none() {
            // The common read or write: one data segment, the chain built in place.
            let data = Segment {
                addr: c.addr,
                len: c.len,
            };
            return sq
                .add_one_data(slot, data, c.op == IoOp::Write)
                .map_err(|()| IssueError::RingFull);
        }
        // Data segments of longer reads and writes.
        let mut data = std::mem::take(&mut self.data_segs);
        data.clear();
        if c.op.has_data() {
            c.data_segments(SEGMENT_BYTES, |s| data.push(s));
        }
        let r = match (c.op, data_in) {
            (IoOp::Read, _) => sq.add(slot, &[], &data),
            (IoOp::Write, _) => sq.add(slot, &data, &[]),
            _ => sq.add(slot, &out_segs[..n_out], &[]),
        };
        self.data_segs = data;
        r.map_err(|()| IssueError::RingFull)
    }

    /// Put command `c` of channel `chan` on the ring (a copy of it in its slot);
    /// `Err(())` when the ring has no room. A command that cannot be sent at all comes
    /// back with its error.
    #[inline(always)]
    fn place(&mut self, chan: u32, c: &Child) -> Result<Option<IoError>, ()> {
        let Some(slot) = self.sq.rq.take_slot() else {
            return Err(());
        };
        match self.issue(chan, slot, c) {
            Ok(()) => {
                // Copied once the command is on the ring: by then the stores that built
                // `c` have reached the cache.
                self.slot_child[slot as usize].clone_from(c);
                self.slot_chan[slot as usize] = chan;
                self.slot_tries[slot as usize] = 0;
                Ok(None)
            }
            Err(IssueError::RingFull) => {
                self.sq.rq.release_slot(slot);
                Err(())
            }
            Err(IssueError::Failed(e)) => {
                self.sq.rq.release_slot(slot);
                Ok(Some(e))
            }
        }
    }

    /// Hand a finished command to its channel: straight into `out` when that is the
    /// polling channel `me` (no hop through its outbox), else to the outbox.
    #[inline]
    fn deliver_from_poll(&mut self, chan: u32, d: ChildDone, me: u32, out: &mut Vec<ChildDone>) {
        if chan == me {
            if let Some(Some(c)) = self.chans.get_mut(chan as usize) {
                c.in_flight = c.in_flight.saturating_sub(1);
                out.push(d);
                return;
            }
        }
        self.deliver(chan, d);
    }

    /// Reap the queue's completions: the polling channel `me`'s into `out`, the others'
    /// into their outboxes. A failed ring or a device that broke the protocol gives the
    /// failure to report.
    fn reap(&mut self, me: u32, out: &mut Vec<ChildDone>) -> Result<(), QueueFailure> {
        let mut completed = std::mem::take(&mut self.completed);
        completed.clear();
        let r = self.sq.rq.poll(|_, slot, _| completed.push(slot));
        let mut fatal: Option<String> = None;
        let mut retry = std::mem::take(&mut self.retry);
        retry.clear();
        for &slot in &completed {
            let Some((chan, parent)) = self.child(slot).map(|(ch, c)| (ch, c.parent)) else {
                // Not ours (cannot happen: the ring checks ids); keep the slot.
                self.sq.rq.release_slot(slot);
                continue;
            };
            // The common case first: GOOD, nothing left over.
            let h = self.sq.response_header(slot);
            let good = h.response == response::OK && h.status == 0 && h.resid.get() == 0;
            let (len, short_ok) = self.slot_xfer[slot as usize];
            let outcome = if good {
                Outcome::Done { transferred: len }
            } else {
                evaluate(&self.sq.response(slot), len, short_ok)
            };
            let result = match outcome {
                Outcome::Done { .. } => Ok(()),
                Outcome::Retry(why) => {
                    if self.slot_tries[slot as usize] < MAX_RETRIES {
                        retry.push(slot);
                        continue;
                    }
                    Err(IoError::Scsi(format!(
                        "gave up after {MAX_RETRIES} retries: {why}"
                    )))
                }
                Outcome::Check(s) => {
                    if s.is_unit_attention() && s.asc == 0x2a && s.ascq == 0x01 {
                        // MODE PARAMETERS CHANGED: the write cache may be on now.
                        self.assume_write_cache(chan);
                    }
                    if s.is_unit_attention()
                        && matches!((s.asc, s.ascq), (0x3f, 0x0e) | (0x2a, 0x09))
                    {
                        // REPORTED LUNS DATA / CAPACITY DATA HAS CHANGED: the LUNs are
                        // read again (a LUN replaced at this address becomes a new
                        // bdev; see events.rs).
                        self.shared.rescan_wanted.store(true, Ordering::Release);
                    }
                    if sense_is_retryable(&s) && self.slot_tries[slot as usize] < MAX_RETRIES {
                        retry.push(slot);
                        continue;
                    }
                    Err(sense_error(&s))
                }
                Outcome::Fail(e) => {
                    if let IoError::ControllerFailed(why) = &e {
                        fatal.get_or_insert_with(|| why.clone());
                    }
                    Err(e)
                }
            };
            self.slot_chan[slot as usize] = NO_CHAN;
            if let Some(b) = self.slot_unmap[slot as usize].take() {
                self.unmap_pool.push(b);
            }
            self.sq.rq.release_slot(slot);
            self.deliver_from_poll(chan, ChildDone::new(parent, result), me, out);
        }
        self.completed = completed;
        // Retries reuse their slot; the ring has room since their chains were freed.
        for &slot in &retry {
            self.slot_tries[slot as usize] += 1;
            let Some((chan, c)) = self.child(slot).map(|(ch, c)| (ch, c.clone())) else {
                continue;
            };
            if let Err(e) = self.issue(chan, slot, &c) {
                let e = match e {
                    IssueError::Failed(e) => e,
                    IssueError::RingFull => {
                        IoError::ControllerFailed("no ring space to retry a command".into())
                    }
                };
                self.slot_chan[slot as usize] = NO_CHAN;
                self.sq.rq.release_slot(slot);
                self.deliver(chan, ChildDone::new(c.parent, Err(e)));
            }
        }
        let retried = !retry.is_empty();
        self.retry = retry;
        if retried {
            // Nobody else publishes on behalf of a retry.
            self.sq.rq.publish()?;
        }
        r?;
        match fatal {
            Some(why) => Err(QueueFailure::Device(why)),
            None => Ok(()),
        }
    }

    /// Forget the buffers the device may still read: UNMAP lists and the write-zeroes
    /// source.
    fn forget_buffers(&mut self) {
        for b in self.slot_unmap.iter_mut().filter_map(Option::take) {
            std::mem::forget(b);
        }
        std::mem::forget(self.zero.take());
        for b in self.zero_retired.drain(..) {
            std::mem::forget(b);
        }
    }
}

impl LifeQueue for ScsiRequests {
    type Request = (u32, Child);

    fn controller(&self) -> &dyn ControllerShared {
        &*self.shared
    }

    fn fail_ring(&mut self, f: QueueFailure) {
        self.sq.rq.fail(f);
    }

    fn take_in_flight(&mut self) -> Vec<(u32, Child)> {
        let mut taken = Vec::new();
        for slot in self.sq.rq.drain_in_flight() {
            // The old queue's memory stays with it; so does an UNMAP list.
            if let Some(b) = self.slot_unmap[slot as usize].take() {
                std::mem::forget(b);
            }
            taken.extend(self.take_child(slot));
        }
        taken
    }

    fn complete(&mut self, (chan, c): (u32, Child), result: Result<(), IoError>) {
        self.deliver(chan, ChildDone::new(c.parent, result));
    }

    fn send(&mut self, (chan, c): (u32, Child)) -> Result<(), (u32, Child)> {
        let open = matches!(self.chans.get(chan as usize), Some(Some(st)) if !st.closed);
        if !open {
            // Its channel is gone: nobody waits for the answer.
            self.deliver(chan, ChildDone::new(c.parent, Err(IoError::Disconnected)));
            return Ok(());
        }
        let parent = c.parent;
        match self.place(chan, &c) {
            Ok(None) => Ok(()),
            Ok(Some(e)) => {
                self.deliver(chan, ChildDone::new(parent, Err(e)));
                Ok(())
            }
            Err(()) => Err((chan, c)),
        }
    }

    fn publish_ring(&mut self) -> Result<(), QueueFailure> {
        self.sq.rq.publish()
    }

    fn reattach(
        &mut self,
        _notifier: vireo_virtio::Notifier,
        _signal: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
    ) -> Result<(), IoError> {
        Err(IoError::ReconnectFailed(
            "a virtio-scsi queue cannot go on with its old ring".into(),
        ))
    }

    fn replace_ring(&mut self, ring: Virtqueue) -> Result<(), IoError> {
        let sq = ScsiQueue::new(
            &self.shared.mem,
            ring,
            self.shared.geo,
            self.shared.health.broken_arc(),
        )?;
        // The old queue leaks its memory (it failed); the write-zeroes source may be
        // read by the old back-end: not reused.
        drop(std::mem::replace(&mut self.sq, sq));
        std::mem::forget(self.zero.take());
        for b in self.zero_retired.drain(..) {
            std::mem::forget(b);
        }
        Ok(())
    }

    fn take_ring(&mut self) -> Option<Virtqueue> {
        self.sq.rq.take_ring()
    }

    fn ring_lost(&self) -> bool {
        self.sq.rq.lost()
    }

    fn forget_device_buffers(&mut self) {
        self.forget_buffers();
    }
}

impl ThreadQueue {
    fn queue(&mut self, chan: u32, c: &Child) -> bool {
        let refused = match self.life.admission() {
            Admission::Send => match self.q.place(chan, c) {
                Ok(None) => {
                    if let Some(Some(st)) = self.q.chans.get_mut(chan as usize) {
                        st.in_flight += 1;
                    }
                    return true;
                }
                Ok(Some(e)) => e,
                Err(()) => return false,
            },
            // Waits for the connection (and the commands kept from the last one).
            Admission::Wait => return false,
            Admission::Refuse(e) => e.clone(),
        };
        if let Some(Some(st)) = self.q.chans.get_mut(chan as usize) {
            st.outbox.push(ChildDone::new(c.parent, Err(refused)));
        }
        true
    }

    fn publish(&mut self) {
        self.life.publish(&mut self.q);
    }

    /// Reap the queue's completions: the polling channel `me`'s into `out`, the others'
    /// into their outboxes.
    fn poll_all(&mut self, me: u32, out: &mut Vec<ChildDone>) {
        if self.life.before_poll(&mut self.q) {
            if let Err(f) = self.q.reap(me, out) {
                self.life.on_failure(&mut self.q, f);
            }
        }
    }

    fn abort(&mut self, chan: u32, parent: u32, timeout: Duration) -> Result<(), IoError> {
        self.q.abort(chan, parent, timeout)
    }
}

impl Drop for ThreadQueue {
    fn drop(&mut self) {
        self.life.close(&mut self.q);
    }
}

/// Why a command did not go on the ring.
enum IssueError {
    /// No room now: the command waits in its channel.
    RingFull,
    /// The command cannot be sent at all.
    Failed(IoError),
}

impl From<IoError> for IssueError {
    fn from(e: IoError) -> Self {
        IssueError::Failed(e)
    }
}

/// A LUN channel: a handle on its thread's queue of the controller (`H` an
/// `Rc<RefCell<ThreadQueue>>` shared with the thread's other LUN channels), or on a
/// queue of its own (`H` a `RefCell<ThreadQueue>`, which can move between threads).
pub(super) struct ScsiChannel<H: Borrow<RefCell<ThreadQueue>> = Rc<RefCell<ThreadQueue>>> {
    tq: H,
    id: u32,
}

impl<H: Borrow<RefCell<ThreadQueue>>> ScsiChannel<H> {
    #[inline(always)]
    fn tq(&self) -> &RefCell<ThreadQueue> {
        self.tq.borrow()
    }
}

/// No channel opens on a controller that is being detached.
fn being_detached(shared: &ScsiShared, bdev: &str) -> BdevError {
    BdevError::Io {
        name: bdev.to_string(),
        what: "open a channel".into(),
        source: IoError::Removed(format!("controller {} is being detached", shared.name)),
    }
}

/// Open a channel on `ctx`'s LUN for the calling thread.
pub(super) fn open_channel(
    shared: &Arc<ScsiShared>,
    ctx: &Arc<LunCtx>,
    bdev: &str,
) -> Result<Box<dyn ChannelDriver>, BdevError> {
    shared.link.wait_reconnected();
    if shared.health.is_failed() {
        return Err(BdevError::Failed(shared.name.clone()));
    }
    if !shared.queues.opened() {
        return Err(being_detached(shared, bdev));
    }
    let tq = thread_queue(shared, bdev).inspect_err(|_| shared.queues.closed())?;
    let id = tq.borrow_mut().q.register(ctx.clone());
    Ok(Box::new(ScsiChannel { tq, id }))
}

/// Open a channel on `ctx`'s LUN with a queue of the controller to itself.
pub(super) fn open_exclusive_channel(
    shared: &Arc<ScsiShared>,
    ctx: &Arc<LunCtx>,
    bdev: &str,
) -> Result<Box<dyn ChannelDriver + Send>, BdevError> {
    shared.link.wait_reconnected();
    if shared.health.is_failed() {
        return Err(BdevError::Failed(shared.name.clone()));
    }
    if !shared.queues.opened() {
        return Err(being_detached(shared, bdev));
    }
    let mut tq = new_thread_queue(shared, bdev).inspect_err(|_| shared.queues.closed())?;
    let id = tq.q.register(ctx.clone());
    Ok(Box::new(ScsiChannel {
        tq: RefCell::new(tq),
        id,
    }))
}

impl<H: Borrow<RefCell<ThreadQueue>>> ChannelDriver for ScsiChannel<H> {
    fn queue(&mut self, c: &Child) -> bool {
        self.tq().borrow_mut().queue(self.id, c)
    }

    fn abort(&mut self, parent: u32, timeout: Duration) -> Result<(), IoError> {
        self.tq().borrow_mut().abort(self.id, parent, timeout)
    }

    fn reset_controller(&mut self) -> Result<(), IoError> {
        let tq = self.tq().borrow();
        tq.life.reset_controller(&tq.q)
    }

    fn publish(&mut self) {
        self.tq().borrow_mut().publish();
    }

    fn poll(&mut self, out: &mut Vec<ChildDone>) -> usize {
        let before = out.len();
        let mut tq = self.tq().borrow_mut();
        tq.poll_all(self.id, out);
        if let Some(Some(st)) = tq.q.chans.get_mut(self.id as usize) {
            if !st.outbox.is_empty() {
                out.append(&mut st.outbox);
            }
        }
        out.len() - before
    }

    fn arm(&mut self) -> Option<(std::os::fd::RawFd, bool)> {
        let mut tq = self.tq().borrow_mut();
        if !tq.life.is_up() {
            return None;
        }
        // Completions a sibling channel reaped for this one are ready already.
        let waiting =
            matches!(tq.q.chans.get(self.id as usize), Some(Some(st)) if !st.outbox.is_empty());
        let armed = tq.q.sq.rq.arm()?;
        if let Some(Some(st)) = tq.q.chans.get_mut(self.id as usize) {
            st.armed = true;
        }
        Some((armed.0, armed.1 || waiting))
    }

    fn disarm(&mut self) {
        let mut tq = self.tq().borrow_mut();
        tq.q.unarm(self.id);
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.tq().borrow().q.sq.rq.completion_fd()
    }
}

impl<H: Borrow<RefCell<ThreadQueue>>> Drop for ScsiChannel<H> {
    fn drop(&mut self) {
        let mut tq = self.tq().borrow_mut();
        tq.q.shared.queues.closed();
        tq.q.unarm(self.id);
        let failed = tq.life.is_failed();
        if let Some(entry) = tq.q.chans.get_mut(self.id as usize) {
            match entry.as_mut() {
                // Commands still on the device (a working queue): keep the id taken.
                Some(c) if c.in_flight > 0 && !failed => {
                    c.closed = true;
                    c.outbox.clear();
                }
                _ => *entry = None,
            }
        }
    }
}

thread_local! {
    /// This thread's queue of each controller, shared by its LUN channels.
    static THREAD_QUEUES: RefCell<Vec<(usize, Weak<RefCell<ThreadQueue>>)>> =
        const { RefCell::new(Vec::new()) };
}

/// The calling thread's queue of the controller: shared if one is open, else a free
/// queue of the controller's pool.
fn thread_queue(
    shared: &Arc<ScsiShared>,
    bdev: &str,
) -> Result<Rc<RefCell<ThreadQueue>>, BdevError> {
    let key = Arc::as_ptr(shared) as usize;
    let existing = THREAD_QUEUES.with(|t| {
        let mut t = t.borrow_mut();
        t.retain(|(_, w)| w.strong_count() > 0);
        t.iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
    });
    if let Some(tq) = existing {
        return Ok(tq);
    }
    let tq = Rc::new(RefCell::new(new_thread_queue(shared, bdev)?));
    THREAD_QUEUES.with(|t| t.borrow_mut().push((key, Rc::downgrade(&tq))));
    Ok(tq)
}

/// A queue of the controller's pool, with no channel on it yet.
fn new_thread_queue(shared: &Arc<ScsiShared>, bdev: &str) -> Result<ThreadQueue, BdevError> {
    let q = shared.queues.take_for(bdev)?;
    let n = q.size() as usize;
    let index = q.index();
    // The ring's generation and the flag to watch (see the blk channel).
    let (generation, flag) = shared.link.bind(&q, &shared.health);
    let sq = ScsiQueue::new(&shared.mem, q, shared.geo, flag).map_err(|e| BdevError::Io {
        name: shared.name.clone(),
        what: "allocate request slots".into(),
        source: e,
    })?;
    Ok(ThreadQueue {
        q: ScsiRequests {
            sq,
            shared: shared.clone(),
            chans: Vec::new(),
            slot_child: vec![Child::EMPTY; n],
            slot_chan: vec![NO_CHAN; n],
            slot_tries: vec![0; n],
            slot_xfer: vec![(0, false); n],
            slot_unmap: (0..n).map(|_| None).collect(),
            unmap_pool: Vec::new(),
            zero: None,
            zero_retired: Vec::new(),
            data_segs: Vec::new(),
            completed: Vec::with_capacity(n),
            retry: Vec::new(),
            index,
        },
        life: QueueLife::new(index, generation),
    })
}
