//! The I/O path: one request queue per thread and controller, shared by that thread's
//! LUN channels.

use super::*;
use wire::response;

/// A channel's state inside its thread queue.
struct ChanState {
    ctx: Arc<LunCtx>,
    outbox: Vec<ChildDone>,
    in_flight: usize,
    /// The channel was dropped with commands still on the device: its id is not reused
    /// (their late completions must not reach another channel) until they are back.
    closed: bool,
}

/// One request queue of a virtio-scsi controller, used by every LUN channel of one
/// thread (so a controller with a single request queue still serves all its LUNs).
pub(super) struct ThreadQueue {
    sq: ScsiQueue,
    shared: Arc<Shared>,
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
    data_segs: Vec<Segment>,
    completed: Vec<u16>,
    retry: Vec<u16>,
    failed: Option<IoError>,
    /// The queue's index on the device.
    index: u16,
    /// The link generation of the queue's ring.
    generation: u64,
    /// The connection is gone and reconnection is under way.
    suspended: bool,
    /// Commands of a lost connection (channel, request), sent again once it is back.
    resubmit: std::collections::VecDeque<(u32, Child)>,
}

/// `slot_chan` of a slot without a command.
const NO_CHAN: u32 = u32::MAX;

/// The tag of the command in `slot` of request queue `index`: unique among a LUN's
/// commands on every queue, as ABORT TASK needs.
fn command_tag(index: u16, slot: u16) -> u64 {
    ((index as u64) << 16) | slot as u64
}

impl ThreadQueue {
    /// The command in `slot` and its channel, if any.
    #[inline]
    fn child(&self, slot: u16) -> Option<(u32, Child)> {
        let chan = *self.slot_chan.get(slot as usize)?;
        (chan != NO_CHAN).then(|| (chan, self.slot_child[slot as usize]))
    }

    /// Take the command out of `slot`.
    fn take_child(&mut self, slot: u16) -> Option<(u32, Child)> {
        let c = self.child(slot);
        if c.is_some() {
            self.slot_chan[slot as usize] = NO_CHAN;
        }
        c
    }

    fn register(&mut self, ctx: Arc<LunCtx>) -> u32 {
        let st = ChanState {
            ctx,
            outbox: Vec::new(),
            in_flight: 0,
            closed: false,
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

    /// The queue failed: fail every command on it; a device that broke the protocol
    /// fails the controller.
    fn fail_all(&mut self, f: QueueFailure) {
        if self.failed.is_some() || self.suspended {
            return;
        }
        if f == QueueFailure::Disconnected && self.shared.link.enabled() {
            // Wait for the connection; the commands are taken back when it returns.
            self.sq.rq.fail(f);
            self.suspended = true;
            return;
        }
        if let QueueFailure::Device(why) = &f {
            self.shared.health.fail(why);
        }
        self.sq.rq.fail(f.clone());
        self.fail_waiting(queue_error(&f));
    }

    /// Take the commands off the lost ring: to send again (keeping their channel's
    /// count), or to fail as aborted (vireo dropped the connection itself: the old
    /// back-end may still work on them).
    fn take_back(&mut self, aborted: bool) {
        for slot in self.sq.rq.drain_in_flight() {
            // The old queue's memory stays with it; so does an UNMAP list.
            if let Some(b) = self.slot_unmap[slot as usize].take() {
                std::mem::forget(b);
            }
            if let Some((chan, c)) = self.take_child(slot) {
                if aborted {
                    self.deliver(
                        chan,
                        ChildDone::new(
                            c.parent,
                            Err(IoError::Aborted(
                                "the device stopped answering and vireo reconnected".into(),
                            )),
                        ),
                    );
                } else {
                    self.resubmit.push_back((chan, c));
                }
            }
        }
        // The write-zeroes source may be read by the old back-end: not reused.
        std::mem::forget(self.zero.take());
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

    /// Fail the commands kept for a reconnection, and everything after them.
    fn fail_waiting(&mut self, e: IoError) {
        for slot in self.sq.rq.drain_in_flight() {
            if let Some((chan, c)) = self.take_child(slot) {
                self.deliver(chan, ChildDone::new(c.parent, Err(e.clone())));
            }
        }
        while let Some((chan, c)) = self.resubmit.pop_front() {
            self.deliver(chan, ChildDone::new(c.parent, Err(e.clone())));
        }
        self.suspended = false;
        self.failed = Some(e);
    }

    /// While suspended: take the new ring once the connection is back and send the
    /// kept commands again.
    fn resume(&mut self) {
        match self.shared.link.check(self.generation, self.index) {
            LinkView::Waiting => {}
            LinkView::Failed(why, forced) => {
                self.fail_waiting(crate::link::failed_error(why, forced))
            }
            LinkView::Ready(generation, renewed) => {
                let Renewed::Fresh { ring, aborted } = *renewed else {
                    self.fail_waiting(IoError::ReconnectFailed(
                        "a virtio-scsi queue cannot go on with its old ring".into(),
                    ));
                    return;
                };
                self.take_back(aborted);
                match ScsiQueue::new(
                    &self.shared.mem,
                    ring,
                    self.shared.geo,
                    self.shared.health.broken_arc(),
                ) {
                    Ok(sq) => {
                        // The old queue leaks its memory (it failed).
                        drop(std::mem::replace(&mut self.sq, sq));
                        self.generation = generation;
                        self.suspended = false;
                        self.send_kept();
                    }
                    Err(e) => self.fail_waiting(e),
                }
            }
        }
    }

    /// Send kept commands while the ring has room.
    fn send_kept(&mut self) {
        while let Some((chan, c)) = self.resubmit.pop_front() {
            let open = matches!(self.chans.get(chan as usize), Some(Some(st)) if !st.closed);
            if !open {
                // Its channel is gone: nobody waits for the answer.
                self.deliver(chan, ChildDone::new(c.parent, Err(IoError::Disconnected)));
                continue;
            }
            let Some(slot) = self.sq.rq.take_slot() else {
                self.resubmit.push_front((chan, c));
                break;
            };
            match self.issue(chan, slot, &c) {
                Ok(()) => {
                    self.slot_child[slot as usize] = c;
                    self.slot_chan[slot as usize] = chan;
                    self.slot_tries[slot as usize] = 0;
                }
                Err(IssueError::RingFull) => {
                    self.sq.rq.release_slot(slot);
                    self.resubmit.push_front((chan, c));
                    break;
                }
                Err(IssueError::Failed(e)) => {
                    self.sq.rq.release_slot(slot);
                    self.deliver(chan, ChildDone::new(c.parent, Err(e)));
                }
            }
        }
        self.publish();
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
                    self.zero = None;
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
                    unmap: ctx.write_same_unmap,
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
        if c.op.has_data() && c.len > 0 && c.len as u64 <= SEGMENT_BYTES {
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
            let (mut addr, mut left) = (c.addr, c.len as u64);
            while left > 0 {
                let k = left.min(SEGMENT_BYTES);
                data.push(Segment {
                    addr,
                    len: k as u32,
                });
                addr += k;
                left -= k;
            }
        }
        let r = match (c.op, data_in) {
            (IoOp::Read, _) => sq.add(slot, &[], &data),
            (IoOp::Write, _) => sq.add(slot, &data, &[]),
            _ => sq.add(slot, &out_segs[..n_out], &[]),
        };
        self.data_segs = data;
        r.map_err(|()| IssueError::RingFull)
    }

    fn queue(&mut self, chan: u32, c: Child) -> Result<(), Child> {
        if let Some(e) = self.failed.clone() {
            if let Some(Some(st)) = self.chans.get_mut(chan as usize) {
                st.outbox.push(ChildDone::new(c.parent, Err(e)));
            }
            return Ok(());
        }
        if self.suspended || !self.resubmit.is_empty() {
            // Waits for the connection (and the commands kept from the last one).
            return Err(c);
        }
        let Some(slot) = self.sq.rq.take_slot() else {
            return Err(c);
        };
        match self.issue(chan, slot, &c) {
            Ok(()) => {
                self.slot_child[slot as usize] = c;
                self.slot_chan[slot as usize] = chan;
                self.slot_tries[slot as usize] = 0;
                if let Some(Some(st)) = self.chans.get_mut(chan as usize) {
                    st.in_flight += 1;
                }
                Ok(())
            }
            Err(IssueError::RingFull) => {
                self.sq.rq.release_slot(slot);
                Err(c)
            }
            Err(IssueError::Failed(e)) => {
                self.sq.rq.release_slot(slot);
                if let Some(Some(st)) = self.chans.get_mut(chan as usize) {
                    st.outbox.push(ChildDone::new(c.parent, Err(e)));
                }
                Ok(())
            }
        }
    }

    fn publish(&mut self) {
        if self.failed.is_some() || self.suspended {
            return;
        }
        if let Err(f) = self.sq.rq.publish() {
            self.fail_all(f);
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
    /// into their outboxes.
    fn poll_all(&mut self, me: u32, out: &mut Vec<ChildDone>) {
        if self.suspended {
            self.resume();
        } else if !self.resubmit.is_empty() {
            self.send_kept();
        }
        if self.failed.is_some() || self.suspended {
            return;
        }
        let mut completed = std::mem::take(&mut self.completed);
        completed.clear();
        let r = self.sq.rq.poll(|_, slot, _| completed.push(slot));
        let mut fatal: Option<String> = None;
        let mut retry = std::mem::take(&mut self.retry);
        retry.clear();
        for &slot in &completed {
            let Some((chan, c)) = self.child(slot) else {
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
            self.deliver_from_poll(chan, ChildDone::new(c.parent, result), me, out);
        }
        self.completed = completed;
        // Retries reuse their slot; the ring has room since their chains were freed.
        for &slot in &retry {
            self.slot_tries[slot as usize] += 1;
            let Some((chan, c)) = self.child(slot) else {
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
            self.publish();
        }
        if let Err(f) = r {
            self.fail_all(f);
        } else if let Some(why) = fatal {
            self.fail_all(QueueFailure::Device(why));
        }
    }
}

impl Drop for ThreadQueue {
    fn drop(&mut self) {
        if self.shared.link.enabled() {
            let ring = if self.suspended {
                None
            } else {
                self.sq.rq.take_ring()
            };
            let link = &self.shared.link;
            match ring {
                Some(q) => {
                    let mut q = q;
                    q.set_tag(self.generation);
                    link.give_back(q, self.sq.rq.lost(), &self.shared.queues)
                }
                None => {
                    for b in self.slot_unmap.iter_mut().filter_map(Option::take) {
                        std::mem::forget(b);
                    }
                    std::mem::forget(self.zero.take());
                    // The ring was lost with a connection: the queue's new one goes to
                    // the pool.
                    link.release(self.index, &self.shared.queues);
                }
            }
            return;
        }
        match self.sq.rq.take_ring() {
            Some(q) => self.shared.queues.give(q),
            None => {
                // The device may still read these buffers.
                for b in self.slot_unmap.iter_mut().filter_map(Option::take) {
                    std::mem::forget(b);
                }
                std::mem::forget(self.zero.take());
            }
        }
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

/// A LUN channel: a handle on its thread's queue of the controller.
pub(super) struct ScsiChannel {
    tq: Rc<RefCell<ThreadQueue>>,
    id: u32,
}

/// Open a channel on `ctx`'s LUN for the calling thread.
pub(super) fn open_channel(
    shared: &Arc<Shared>,
    ctx: &Arc<LunCtx>,
    bdev: &str,
) -> Result<Box<dyn ChannelDriver>, BdevError> {
    shared.link.wait_reconnected();
    if shared.health.is_failed() {
        return Err(BdevError::Failed(shared.name.clone()));
    }
    let tq = thread_queue(shared, bdev)?;
    let id = tq.borrow_mut().register(ctx.clone());
    shared.queues.opened();
    Ok(Box::new(ScsiChannel { tq, id }))
}

impl ChannelDriver for ScsiChannel {
    fn queue(&mut self, c: Child) -> Result<(), Child> {
        self.tq.borrow_mut().queue(self.id, c)
    }

    fn abort(&mut self, parent: u32, timeout: Duration) -> Result<(), IoError> {
        self.tq.borrow_mut().abort(self.id, parent, timeout)
    }

    fn reset_controller(&mut self) -> Result<(), IoError> {
        let tq = self.tq.borrow();
        tq.shared.link.force(tq.generation)
    }

    fn publish(&mut self) {
        self.tq.borrow_mut().publish();
    }

    fn poll(&mut self, out: &mut Vec<ChildDone>) -> usize {
        let before = out.len();
        let mut tq = self.tq.borrow_mut();
        tq.poll_all(self.id, out);
        if let Some(Some(st)) = tq.chans.get_mut(self.id as usize) {
            if !st.outbox.is_empty() {
                out.append(&mut st.outbox);
            }
        }
        out.len() - before
    }

    fn arm(&mut self) -> Option<(std::os::fd::RawFd, bool)> {
        let mut tq = self.tq.borrow_mut();
        if tq.failed.is_some() || tq.suspended {
            return None;
        }
        // Completions a sibling channel reaped for this one are ready already.
        let waiting =
            matches!(tq.chans.get(self.id as usize), Some(Some(st)) if !st.outbox.is_empty());
        let armed = tq.sq.rq.arm()?;
        Some((armed.0, armed.1 || waiting))
    }

    fn disarm(&mut self) {
        self.tq.borrow_mut().sq.rq.disarm();
    }
}

impl Drop for ScsiChannel {
    fn drop(&mut self) {
        let mut tq = self.tq.borrow_mut();
        tq.shared.queues.closed();
        let failed = tq.failed.is_some();
        if let Some(entry) = tq.chans.get_mut(self.id as usize) {
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
fn thread_queue(shared: &Arc<Shared>, bdev: &str) -> Result<Rc<RefCell<ThreadQueue>>, BdevError> {
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
    let tq = Rc::new(RefCell::new(ThreadQueue {
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
        data_segs: Vec::new(),
        completed: Vec::with_capacity(n),
        retry: Vec::new(),
        failed: None,
        index,
        generation,
        suspended: false,
        resubmit: std::collections::VecDeque::new(),
    }));
    THREAD_QUEUES.with(|t| t.borrow_mut().push((key, Rc::downgrade(&tq))));
    Ok(tq)
}
