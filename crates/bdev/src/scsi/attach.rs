//! Bringing a virtio-scsi controller up: negotiation, queues, the scan, LUN bdevs.

use super::*;

impl ScsiController {
    /// Bring up the device, scan every target and LUN, and create the bdevs.
    pub fn attach(
        params: &ScsiParams,
        transport: Box<dyn Transport>,
    ) -> Result<ScsiController, BdevError> {
        let claims = crate::names::NameClaims::standalone(&params.name);
        Self::attach_claiming(params, transport, claims)
    }

    /// As [`attach`](Self::attach); LUNs found later (hot-plug, rescan) claim their
    /// bdev names through `claims` and are left out when the name is taken (the
    /// registry claims the names of the LUNs found at attach).
    pub(crate) fn attach_claiming(
        params: &ScsiParams,
        mut transport: Box<dyn Transport>,
        claims: crate::names::NameClaims,
    ) -> Result<ScsiController, BdevError> {
        let name = params.name.as_str();
        let verr = |source| BdevError::virtio(name, source);
        crate::pool::check_queue_size(name, params.vq_size)?;
        let offered = transport.device_features().map_err(verr)?;
        let wanted = COMMON_FEATURES
            | sf::HOTPLUG
            | sf::CHANGE
            | params
                .packed_ring
                .feature(offered)
                .map_err(|e| bad(name, e))?;
        let features = negotiate(transport.as_mut(), wanted).map_err(verr)?;
        let cfg = if transport.has_config() {
            let mut raw = [0u8; wire::CONFIG_LEN];
            transport
                .read_config_fields(wire::CONFIG_FIELDS, &mut raw)
                .map_err(verr)?;
            ScsiConfig::parse(&raw).ok_or_else(|| bad(name, "short configuration"))?
        } else {
            // No configuration space (SPDK's vhost-scsi, for one): the request queues
            // the back-end has (GET_QUEUE_NUM counts the control and event queues too),
            // else as many as asked for; spec defaults for the rest.
            let queues = match transport.max_queues().map_err(verr)? {
                Some(n) => (n as u32).saturating_sub(2),
                None => params.vq_count as u32,
            };
            let cfg = ScsiConfig::assumed(queues);
            tracing::info!(controller = %name, ?cfg, "{} has no readable configuration space; assuming spec defaults and scanning targets 0..={}", transport.describe(), cfg.max_target);
            cfg
        };
        let has = |f: u64| features & f != 0;
        if cfg.num_queues == 0 {
            return Err(bad(name, "num_queues is 0"));
        }
        let cdb_size = match cfg.cdb_size {
            0 => 32,
            n if n < 16 => {
                return Err(bad(
                    name,
                    format!("cdb_size {n} is below the 16 bytes READ(16) needs"),
                ))
            }
            n => n.min(32) as usize,
        };
        let sense_size = match cfg.sense_size {
            0 => 96,
            n => (n as usize).min(wire::MAX_SENSE),
        };
        let geo = Geometry::new(cdb_size, sense_size);
        let dev_queues = cfg.num_queues.min(u16::MAX as u32 - 2) as u16;
        let transport_queues = transport.max_queues().map_err(verr)?;
        let avail = match transport_queues {
            Some(n) => dev_queues.min(n.saturating_sub(2)),
            None => dev_queues,
        };
        // 0: every queue the device offers (the C API's connect), up to 256: the
        // device's number does not size vireo's memory and eventfds unchecked.
        let vq_count = match params.vq_count {
            0 => avail.min(crate::pool::MAX_ALL_QUEUES),
            n => n,
        };
        if vq_count == 0 || vq_count > avail {
            return Err(BdevError::TooFewQueues {
                name: name.to_string(),
                asked: vq_count,
                offered: avail,
                detail: match transport_queues {
                    // Control and event queues come first: fewer than 3 is no scsi device.
                    Some(n) if n < 3 => format!(
                        " (the back-end has only {n} queue(s); a virtio-scsi device has a control, an event and at least one request queue)"
                    ),
                    _ if avail == 0 => " (num_queues 0)".to_string(),
                    _ => format!("; set \"vq_count\" to at most {avail}"),
                },
            });
        }
        // The count chosen, for everything that reads the parameters from here on.
        let params = &ScsiParams {
            vq_count,
            ..params.clone()
        };
        let mut vq_size = params.vq_size;
        if let Some(max) = transport.max_queue_size(2).map_err(verr)? {
            if max < 4 {
                return Err(bad(
                    name,
                    format!("request queue 0 offers at most {max} entries; vireo needs at least 4"),
                ));
            }
            while vq_size > max {
                vq_size /= 2;
            }
        }
        let seg_max = if cfg.seg_max == 0 {
            u32::MAX
        } else {
            cfg.seg_max
        };
        let ring_room = vq_size as u32 - 2;
        let max_segments = seg_max.min(ring_room).max(1) as usize;
        let indirect_max = if has(tf::RING_INDIRECT_DESC) {
            ((max_segments + 2) as u32).min(vq_size as u32) as u16
        } else {
            0
        };
        let opts = QueueOptions {
            event_idx: has(tf::RING_EVENT_IDX),
            indirect_max,
            packed: has(tf::RING_PACKED),
        };
        let mem = transport.memory().clone();
        let mk = |t: &mut Box<dyn Transport>, i: u16, size: u16, o: QueueOptions| {
            create_queue(t.as_mut(), i, size, o).map_err(|e| BdevError::queue_setup(name, size, e))
        };
        let small = vq_size.min(64);
        let plain = QueueOptions {
            indirect_max: 0,
            ..opts
        };
        let control_q = mk(&mut transport, 0, small, plain)?;
        let mut event_q = mk(&mut transport, 1, small, plain)?;
        let mut queues = Vec::new();
        for i in 0..vq_count {
            queues.push(mk(&mut transport, 2 + i, vq_size, opts)?);
        }
        transport
            .start()
            .map_err(|e| BdevError::queue_setup(name, vq_size, e))?;

        // Event buffers, when the device may send events.
        let events = has(sf::HOTPLUG) || has(sf::CHANGE);
        let ev_size = (cfg.event_info_size as usize).clamp(16, 64);
        let mut ev_buf = mem
            .alloc(ev_size * EVENT_BUFFERS as usize, 64)
            .map_err(verr)?;
        ev_buf.as_mut_slice().fill(0);
        if events {
            events::post_event_buffers(&mut event_q, &ev_buf, ev_size).map_err(verr)?;
        }
        let control = ControlQueue::new(&mem, control_q, transport.broken_flag()).map_err(verr)?;

        let shared = Arc::new(ScsiShared {
            name: name.to_string(),
            geo,
            mem: mem.clone(),
            health: Health::new(name, transport.broken_flag()),
            link: crate::reconnect::Link::new(name, params.reconnect_timeout),
            queues: QueuePool::new(queues),
            max_segments,
            max_sectors: cfg.max_sectors,
            packed_ring: opts.packed,
            control: Mutex::new(Some(control)),
            rescan_wanted: AtomicBool::new(false),
        });

        // Scan.
        let max_target = cfg.max_target.min(MAX_TARGET);
        let found;
        {
            let q = shared.queues.take_for(name)?;
            let mut sq = ScsiQueue::new(&mem, q, geo, shared.health.broken_arc()).map_err(|e| {
                BdevError::Io {
                    name: name.to_string(),
                    what: "allocate request slots".into(),
                    source: e,
                }
            })?;
            let mut scanner = Scanner {
                q: &mut sq,
                mem: &mem,
                broken: &shared.health.broken_arc(),
            };
            let r = scan_all(&mut scanner, max_target, name);
            // A queue the device may still use is kept from reuse (see RequestQueue).
            found = r?;
            if let Some(q) = sq.into_queue() {
                shared.queues.give(q);
            }
        }
        let mut luns = Vec::new();
        let mut skipped = Vec::new();
        for info in found {
            if info.device_type != 0 {
                skipped.push(info);
                continue;
            }
            luns.push(make_lun(&shared, info, params, vq_size));
        }
        tracing::info!(controller = %name, luns = luns.len(), skipped = skipped.len(), "virtio-scsi controller attached");
        let luns = Arc::new(Mutex::new(luns));
        let not_added = Arc::new(Mutex::new(Vec::new()));
        let stop_events = Arc::new(AtomicBool::new(false));
        // The event thread runs whether or not the device reports events: unit
        // attentions on the I/O path ask it for rescans too.
        let event_thread = {
            let ctx = EventCtx {
                shared: shared.clone(),
                luns: luns.clone(),
                not_added: not_added.clone(),
                claims,
                params: params.clone(),
                vq_size,
                max_target,
                ev_buf,
                ev_size,
                stop: stop_events.clone(),
            };
            Some(
                std::thread::Builder::new()
                    .name(format!("{name}-events"))
                    .spawn(move || event_loop(ctx, event_q))
                    .map_err(|e| BdevError::Config(format!("cannot start event thread: {e}")))?,
            )
        };
        let transport = Arc::new(Mutex::new(transport));
        let redo = ScsiReconnect {
            shared: Arc::downgrade(&shared),
            wanted,
            features,
            num_queues: cfg.num_queues,
            cdb_size,
            sense_size,
            vq_count,
            vq_size,
            small,
            opts,
            plain,
            events,
        };
        crate::reconnect::start(name, &shared.link, &shared, &transport, Box::new(redo))?;
        Ok(ScsiController {
            transport,
            shared,
            luns,
            not_added,
            skipped,
            features,
            config: cfg,
            event_thread,
            stop_events,
            params: params.clone(),
        })
    }
}

/// What a reconnection must bring back as it was.
struct ScsiReconnect {
    shared: std::sync::Weak<ScsiShared>,
    wanted: u64,
    features: u64,
    num_queues: u32,
    cdb_size: usize,
    sense_size: usize,
    vq_count: u16,
    vq_size: u16,
    small: u16,
    opts: QueueOptions,
    plain: QueueOptions,
    events: bool,
}

impl crate::reconnect::Reconnect for ScsiReconnect {
    /// Bring the device up again: the control queue is installed here, the event
    /// queue's and request queues' rings go to their users (fresh rings: vireo resends
    /// from its own records).
    fn run(
        &mut self,
        t: &mut dyn Transport,
        ctx: &mut crate::reconnect::ReconnectCtx,
    ) -> Result<Vec<NewRing>, ReconnectError> {
        let transient = |e: vireo_virtio::Error| ReconnectError::Transient(e.to_string());
        crate::reconnect::renegotiate(t, self.wanted, self.features)?;
        if t.has_config() {
            let mut raw = [0u8; wire::CONFIG_LEN];
            t.read_config_fields(wire::CONFIG_FIELDS, &mut raw)
                .map_err(transient)?;
            let cfg = ScsiConfig::parse(&raw)
                .ok_or_else(|| ReconnectError::Transient("short configuration".into()))?;
            let cdb = if cfg.cdb_size == 0 {
                32
            } else {
                cfg.cdb_size.min(32) as usize
            };
            let sense = if cfg.sense_size == 0 {
                96
            } else {
                (cfg.sense_size as usize).min(wire::MAX_SENSE)
            };
            if cfg.num_queues < self.vq_count as u32
                || cdb < self.cdb_size
                || sense < self.sense_size
            {
                return Err(ReconnectError::Permanent(format!(
                    "the device came back with {} request queues, CDB size {}, sense size {} (was {}, {}, {})",
                    cfg.num_queues, cfg.cdb_size, cfg.sense_size, self.num_queues, self.cdb_size, self.sense_size
                )));
            }
        }
        let control = create_queue(t, 0, self.small, self.plain).map_err(transient)?;
        let event = create_queue(t, 1, self.small, self.plain).map_err(transient)?;
        let mut rings = Vec::with_capacity(self.vq_count as usize + 1);
        for i in 0..self.vq_count {
            rings.push(NewRing::Fresh {
                ring: create_queue(t, 2 + i, self.vq_size, self.opts).map_err(transient)?,
                aborted: ctx.forced,
            });
        }
        t.start().map_err(transient)?;
        let shared = self
            .shared
            .upgrade()
            .ok_or_else(|| ReconnectError::Permanent("the controller is gone".into()))?;
        let ctl = ControlQueue::new(&shared.mem, control, t.broken_flag())
            .map_err(|e| ReconnectError::Transient(e.to_string()))?;
        // The old control queue: a failed one leaks its memory itself.
        *lock(&shared.control) = Some(ctl);
        if self.events {
            rings.push(NewRing::Fresh {
                ring: event,
                aborted: ctx.forced,
            });
        } else {
            // Nobody polls it; its memory stays with the device.
            std::mem::forget(event);
        }
        Ok(rings)
    }
}

pub(super) fn scan_all(
    s: &mut Scanner<'_>,
    max_target: u16,
    name: &str,
) -> Result<Vec<LunInfo>, BdevError> {
    let mut found = Vec::new();
    for t in 0..=max_target {
        let t = t as u8;
        let luns = match s.report_luns(t) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(
                e @ (IoError::Disconnected | IoError::ControllerFailed(_) | IoError::Timeout(_)),
            ) => {
                return Err(BdevError::Io {
                    name: name.to_string(),
                    what: format!("scan target {t}"),
                    source: e,
                })
            }
            Err(e) => {
                tracing::warn!(controller = %name, target = t, "REPORT LUNS failed: {e}; skipping target");
                continue;
            }
        };
        for l in luns {
            match s.lun(t, l) {
                Ok(Some(info)) => found.push(info),
                Ok(None) => {}
                Err(
                    e
                    @ (IoError::Disconnected | IoError::ControllerFailed(_) | IoError::Timeout(_)),
                ) => {
                    return Err(BdevError::Io {
                        name: name.to_string(),
                        what: format!("scan target {t} LUN {l}"),
                        source: e,
                    })
                }
                Err(e) => {
                    tracing::warn!(controller = %name, target = t, lun = l, "LUN not usable: {e}");
                }
            }
        }
    }
    Ok(found)
}

pub(super) fn make_lun(
    shared: &Arc<ScsiShared>,
    info: LunInfo,
    params: &ScsiParams,
    vq_size: u16,
) -> LunEntry {
    let bs = info.block_size as u64;
    // Read/write: VPD B0 maximum transfer length, segments, and 65535 blocks for 10-byte
    // CDBs unless the LUN needs (and has) 16-byte ones.
    // A command's byte count is a u32 (the residual is measured against it): at most
    // u32::MAX bytes, whatever the block count a 16-byte CDB could carry.
    let mut max_rw = (shared.max_segments as u64 * SEGMENT_BYTES / bs).min(u32::MAX as u64 / bs);
    if let Some(mt) = info.limits.and_then(|l| l.max_transfer()) {
        max_rw = max_rw.min(mt as u64);
    }
    if shared.max_sectors != 0 {
        max_rw = max_rw.min(shared.max_sectors as u64 * 512 / bs);
    }
    if !info.rw16 {
        max_rw = max_rw.min(vireo_scsi::MAX_RW10_BLOCKS as u64);
    }
    let max_rw = max_rw.max(1);
    // UNMAP: at most 4095 descriptors of at most 2^32-1 blocks, further bounded by VPD B0.
    let (mut per_desc, mut max_desc, mut max_lbas) =
        (u32::MAX as u64, MAX_UNMAP_DESCRIPTORS_PER_LIST, u64::MAX);
    if let Some(bl) = info.limits {
        if bl.max_unmap_lba_count != 0 && bl.max_unmap_lba_count != u32::MAX {
            max_lbas = bl.max_unmap_lba_count as u64;
            per_desc = per_desc.min(max_lbas);
        }
        if bl.max_unmap_descriptor_count != 0 && bl.max_unmap_descriptor_count != u32::MAX {
            max_desc = max_desc.min(bl.max_unmap_descriptor_count as usize);
        }
    }
    let max_unmap = (per_desc * max_desc as u64).min(max_lbas);
    let lbprz = info.provisioning.map(|p| p.lbprz & 1 == 1).unwrap_or(false);
    let lbpws = info.provisioning.map(|p| p.lbpws).unwrap_or(false);
    let max_ws = info
        .limits
        .map(|l| l.max_write_same_length)
        .filter(|&n| n != 0)
        .unwrap_or(65535)
        .min(u32::MAX as u64);
    let name = lun_name(&shared.name, info.target, info.lun);
    let bdev_info = BdevInfo {
        name: name.clone(),
        controller: shared.name.clone(),
        driver: "virtio_scsi",
        block_size: info.block_size,
        num_blocks: info.num_blocks,
        read_only: info.read_only,
        volatile_write_cache: info.write_cache.unwrap_or(true),
        ops: OpSupport {
            read: true,
            write: !info.read_only,
            flush: true,
            unmap: info.unmap && !info.read_only,
            write_zeroes: info.write_same && !info.read_only,
            reset: true,
        },
        limits: Limits {
            max_rw_blocks: max_rw,
            max_segments: shared.max_segments as u32,
            max_segment_bytes: SEGMENT_BYTES as u32,
            max_unmap_blocks: if info.unmap { max_unmap } else { 0 },
            max_unmap_segments: if info.unmap { max_desc as u32 } else { 0 },
            max_write_zeroes_blocks: if info.write_same { max_ws } else { 0 },
            optimal_io_blocks: info.limits.map(|l| l.optimal_transfer_length).unwrap_or(0),
            physical_block_size: info.physical_block_size,
        },
        num_queues: params.vq_count,
        queue_size: vq_size,
        packed_ring: shared.packed_ring,
        serial: info.serial.clone(),
        device_id: info.device_id.clone(),
        vendor: Some(info.vendor.clone()),
        product: Some(info.product.clone()),
        scsi: Some(ScsiAddress {
            target: info.target,
            lun: info.lun,
        }),
    };
    let ctx = Arc::new(LunCtx {
        lun: lun_bytes(info.target, info.lun),
        block_size: info.block_size,
        rw16: info.rw16,
        unmap_per_desc: per_desc,
        unmap_max_desc: max_desc,
        write_same_unmap: lbprz && lbpws,
        num_blocks: AtomicU64::new(info.num_blocks),
        write_cache: std::sync::OnceLock::new(),
    });
    let driver = Arc::new(LunDriver {
        shared: shared.clone(),
        ctx: ctx.clone(),
        name,
    });
    let bdev = Arc::new(Bdev::new(bdev_info, driver, shared.mem.clone()));
    let _ = ctx.write_cache.set(bdev.write_cache_flag());
    LunEntry { info, bdev, ctx }
}
