//! The event thread: hot-plug, capacity changes and rescans.

use super::*;

/// What the event thread needs.
pub(super) struct EventCtx {
    pub(super) shared: Arc<ScsiShared>,
    pub(super) luns: Arc<Mutex<Vec<LunEntry>>>,
    /// LUNs found whose bdev name was taken.
    pub(super) not_added: Arc<Mutex<Vec<LunNotAdded>>>,
    /// Bdev names of LUNs found later are claimed here first.
    pub(super) claims: crate::names::NameClaims,
    pub(super) params: ScsiParams,
    pub(super) vq_size: u16,
    pub(super) max_target: u16,
    pub(super) ev_buf: DmaBuf,
    pub(super) ev_size: usize,
    pub(super) stop: Arc<AtomicBool>,
}

/// Put every event buffer (`size` bytes each, in `buf`) on the event queue.
pub(super) fn post_event_buffers(
    q: &mut Virtqueue,
    buf: &DmaBuf,
    size: usize,
) -> vireo_virtio::Result<bool> {
    for i in 0..EVENT_BUFFERS.min(q.size()) {
        let seg = Segment {
            addr: buf.iova() + (i as usize * size) as u64,
            len: size as u32,
        };
        let _ = q.add(&[seg], 0, i as u64);
    }
    q.publish()
}

/// Poll the event queue; apply hot-plug and parameter-change events. After a
/// reconnection, the event queue's new ring gets fresh buffers.
pub(super) fn event_loop(mut ctx: EventCtx, mut q: Virtqueue) {
    let mut deferred: Vec<wire::Event> = Vec::new();
    let mut generation = ctx.shared.link.generation();
    let index = q.index();
    while !ctx.stop.load(Ordering::Acquire) {
        if ctx.shared.health.is_failed() {
            break;
        }
        if ctx.shared.health.is_broken() || ctx.shared.link.generation() != generation {
            if !ctx.shared.link.enabled() {
                break;
            }
            match ctx.shared.link.check(generation, index) {
                ReconnectStatus::Waiting => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                ReconnectStatus::Failed(..) => break,
                ReconnectStatus::Ready(g, renewed) => {
                    let NewRing::Fresh { ring, .. } = *renewed else {
                        ctx.shared
                            .health
                            .fail("the event queue cannot go on with its old ring");
                        break;
                    };
                    // The old ring and buffers stay with the old back-end.
                    std::mem::replace(&mut q, ring).leak();
                    let Ok(mut buf) = ctx
                        .shared
                        .mem
                        .alloc(ctx.ev_size * EVENT_BUFFERS as usize, 64)
                    else {
                        ctx.shared.health.fail("no DMA memory for event buffers");
                        break;
                    };
                    buf.as_mut_slice().fill(0);
                    std::mem::forget(std::mem::replace(&mut ctx.ev_buf, buf));
                    let _ = post_event_buffers(&mut q, &ctx.ev_buf, ctx.ev_size);
                    generation = g;
                    // Events may have been missed while the connection was down.
                    deferred.push(wire::Event::missed());
                }
            }
        }
        if ctx.shared.rescan_wanted.swap(false, Ordering::AcqRel) {
            deferred.push(wire::Event::missed());
        }
        let mut got = Vec::new();
        if let Err(e) = q.poll(|u| got.push(u)) {
            ctx.shared.health.fail(&format!("event queue: {e}"));
            break;
        }
        // Events that needed a request queue while every queue was held by a channel
        // are tried again until one is free.
        deferred.retain(|ev| !handle_event(&ctx, *ev));
        for u in got {
            let i = u.token as usize;
            let off = i * ctx.ev_size;
            let ev = wire::Event::parse(&ctx.ev_buf.as_slice()[off..off + ctx.ev_size]);
            if let Some(ev) = ev {
                if !handle_event(&ctx, ev) {
                    tracing::info!(controller = %ctx.shared.name, "every request queue is held by a channel; the event waits for a free one");
                    deferred.push(ev);
                }
            }
            // Give the buffer back to the device.
            let seg = Segment {
                addr: ctx.ev_buf.iova() + off as u64,
                len: ctx.ev_size as u32,
            };
            let _ = q.add(&[seg], 0, u.token);
        }
        let _ = q.publish();
        std::thread::sleep(Duration::from_millis(5));
    }
    // The device may still hold the event buffers.
    q.leak();
    std::mem::forget(ctx.ev_buf);
}

/// A free request queue for control-path commands, if there is one now.
fn borrow_queue(shared: &ScsiShared) -> Option<ScsiQueue> {
    let q = shared.queues.borrow()?;
    let (_, flag) = shared.link.bind(&q, &shared.health);
    let sq = ScsiQueue::new(&shared.mem, q, shared.geo, flag).ok();
    if sq.is_none() {
        // The queue went into the failed ScsiQueue::new and is dropped with it.
        shared.queues.lost_borrowed();
    }
    sq
}

/// Apply one event; `false` when it needs a request queue and none is free.
fn handle_event(ctx: &EventCtx, ev: wire::Event) -> bool {
    use wire::event::*;
    let missed = ev.event & EVENTS_MISSED != 0;
    let code = ev.event & !EVENTS_MISSED;
    tracing::info!(controller = %ctx.shared.name, event = code, reason = ev.reason, missed, lun = ?ev.address(), "virtio-scsi event");
    if missed && !rescan_all(ctx) {
        return false;
    }
    let Some((t, l)) = ev.address() else {
        return true;
    };
    match (code, ev.reason) {
        (TRANSPORT_RESET, REASON_REMOVED) => {
            remove_lun(ctx, t, l);
            true
        }
        (TRANSPORT_RESET, REASON_RESCAN) => add_lun(ctx, t, l),
        // Capacity data changed (2A/09) or anything else: re-read capacity.
        (PARAM_CHANGE, _) => refresh_capacity(ctx, t, l),
        _ => true,
    }
}

fn with_scanner<R>(ctx: &EventCtx, f: impl FnOnce(&mut Scanner<'_>) -> R) -> Option<R> {
    let mut sq = borrow_queue(&ctx.shared)?;
    let r = {
        let mut s = Scanner {
            q: &mut sq,
            mem: &ctx.shared.mem,
            broken: &ctx.shared.health.broken_arc(),
        };
        f(&mut s)
    };
    // A queue the device may still use is kept from reuse (see RequestQueue).
    let index = sq.rq.ring().map(|r| r.index());
    let lost = sq.rq.lost();
    let link = &ctx.shared.link;
    match sq.into_queue() {
        Some(q) if !lost => ctx.shared.queues.give_borrowed(q),
        Some(q) if link.enabled() => {
            // Idle, of a lost connection: the link says where it (or its successor)
            // goes.
            ctx.shared.queues.lost_borrowed();
            link.give_back(q, true, &ctx.shared.queues);
        }
        _ => {
            ctx.shared.queues.lost_borrowed();
            if let (Some(i), true) = (index, link.enabled()) {
                // Lost with a connection: the queue's next ring goes to the pool.
                link.release(i, &ctx.shared.queues);
            }
        }
    }
    Some(r)
}

fn add_lun(ctx: &EventCtx, t: u8, l: u16) -> bool {
    if lock(&ctx.luns)
        .iter()
        .any(|e| e.info.target == t && e.info.lun == l)
    {
        return true;
    }
    let Some(r) = with_scanner(ctx, |s| s.lun(t, l)) else {
        return false;
    };
    match r {
        Ok(Some(info)) if info.device_type == 0 => {
            let mut luns = lock(&ctx.luns);
            if !luns.iter().any(|e| e.info.target == t && e.info.lun == l) {
                add_disk(ctx, &mut luns, info);
            }
        }
        Ok(_) => forget_not_added(ctx, |n| n.target == t && n.lun == l),
        Err(e) => {
            tracing::warn!(controller = %ctx.shared.name, target = t, lun = l, "hot-added LUN not usable: {e}")
        }
    }
    true
}

/// Make a bdev of a disk LUN found after attach, if its name is free (`luns` is the
/// locked LUN list); else leave the LUN out, say why, and remember it.
fn add_disk(ctx: &EventCtx, luns: &mut Vec<LunEntry>, info: LunInfo) {
    let (t, l) = (info.target, info.lun);
    let name = lun_name(&ctx.shared.name, t, l);
    match ctx.claims.claim_bdevs(&[&name]) {
        Ok(()) => {
            forget_not_added(ctx, |n| n.target == t && n.lun == l);
            let entry = make_lun(&ctx.shared, info, &ctx.params, ctx.vq_size);
            tracing::info!(bdev = %entry.bdev.name(), "LUN added");
            luns.push(entry);
        }
        Err(e) => {
            let reason = e.to_string();
            let mut not_added = lock(&ctx.not_added);
            let known = not_added
                .iter()
                .any(|n| n.target == t && n.lun == l && n.reason == reason);
            if !known {
                // Said once per cause, not at every rescan that finds the LUN again.
                tracing::error!(controller = %ctx.shared.name, target = t, lun = l, bdev = %name, "LUN found but not added: {reason}");
                not_added.retain(|n| !(n.target == t && n.lun == l));
                not_added.push(LunNotAdded {
                    target: t,
                    lun: l,
                    bdev: name,
                    reason,
                });
            }
        }
    }
}

fn forget_not_added(ctx: &EventCtx, which: impl Fn(&LunNotAdded) -> bool) {
    lock(&ctx.not_added).retain(|n| !which(n));
}

/// A LUN that is gone: its bdev is marked removed and its name given back.
fn drop_lun(ctx: &EventCtx, e: &LunEntry) {
    e.bdev.mark_removed();
    ctx.claims.release_bdev(e.bdev.name());
    tracing::info!(bdev = %e.bdev.name(), "LUN removed");
}

fn remove_lun(ctx: &EventCtx, t: u8, l: u16) {
    forget_not_added(ctx, |n| n.target == t && n.lun == l);
    let mut luns = lock(&ctx.luns);
    if let Some(pos) = luns
        .iter()
        .position(|e| e.info.target == t && e.info.lun == l)
    {
        let e = luns.remove(pos);
        drop_lun(ctx, &e);
    }
}

/// Whether `new`, found at `old`'s address, is the same disk with the same geometry:
/// only then may its bdev go on (with a new capacity or write cache). A different
/// identity, block size or set of limits makes a new bdev: requests built for the old
/// geometry would land elsewhere on the device.
fn same_disk(old: &LunInfo, new: &LunInfo) -> bool {
    old.device_type == new.device_type
        && old.vendor == new.vendor
        && old.product == new.product
        && old.serial == new.serial
        && old.device_id == new.device_id
        && old.block_size == new.block_size
        && old.rw16 == new.rw16
        && old.read_only == new.read_only
        && old.unmap == new.unmap
        && old.write_same == new.write_same
        && old.limits == new.limits
}

/// Apply what a rescan found at an address that has a bdev: the same disk gets its
/// capacity and write cache updated; another one replaces the bdev. Returns whether
/// the entry stays.
fn update_lun(ctx: &EventCtx, e: &mut LunEntry, info: &LunInfo) -> bool {
    if !same_disk(&e.info, info) {
        tracing::warn!(bdev = %e.bdev.name(), "the LUN at this address changed its identity or geometry; its bdev goes and a new one is made");
        drop_lun(ctx, e);
        return false;
    }
    if e.info.num_blocks != info.num_blocks {
        e.ctx.num_blocks.store(info.num_blocks, Ordering::Relaxed);
        e.bdev.set_num_blocks(info.num_blocks);
        tracing::info!(bdev = %e.bdev.name(), blocks = info.num_blocks, "capacity changed");
    }
    // Mode parameters (the write cache) may have changed too.
    e.bdev
        .write_cache_flag()
        .store(info.write_cache.unwrap_or(true), Ordering::Relaxed);
    e.info.num_blocks = info.num_blocks;
    e.info.write_cache = info.write_cache;
    true
}

fn refresh_capacity(ctx: &EventCtx, t: u8, l: u16) -> bool {
    let Some(r) = with_scanner(ctx, |s| s.lun(t, l)) else {
        return false;
    };
    let Ok(Some(info)) = r else {
        return true;
    };
    let mut luns = lock(&ctx.luns);
    if let Some(pos) = luns
        .iter()
        .position(|e| e.info.target == t && e.info.lun == l)
    {
        if !update_lun(ctx, &mut luns[pos], &info) {
            luns.remove(pos);
            if info.device_type == 0 {
                add_disk(ctx, &mut luns, info);
            }
        }
    }
    true
}

fn rescan_all(ctx: &EventCtx) -> bool {
    let name = ctx.shared.name.clone();
    let Some(r) = with_scanner(ctx, |s| scan_all(s, ctx.max_target, &name)) else {
        return false;
    };
    let Ok(found) = r else { return true };
    forget_not_added(ctx, |n| {
        !found
            .iter()
            .any(|f| f.device_type == 0 && f.target == n.target && f.lun == n.lun)
    });
    let mut luns = lock(&ctx.luns);
    luns.retain_mut(|e| {
        match found
            .iter()
            .find(|f| f.target == e.info.target && f.lun == e.info.lun)
        {
            Some(f) => update_lun(ctx, e, f),
            None => {
                drop_lun(ctx, e);
                false
            }
        }
    });
    for info in found {
        if info.device_type != 0
            || luns
                .iter()
                .any(|e| e.info.target == info.target && e.info.lun == info.lun)
        {
            continue;
        }
        add_disk(ctx, &mut luns, info);
    }
    true
}
