//! Bringing a virtio-blk controller back on a new connection as it was: the same
//! features, block size and queues; kept rings (in-flight tracking) or fresh ones.

use std::sync::Arc;

use vireo_virtio::{create_queue, DmaMemory, QueueOptions, Transport};

use super::{bf, BlkConfig, CONFIG_LEN};
use crate::bdev::Bdev;
use crate::reconnect::{self as link, NewRing, ReconnectCtx, ReconnectError};

/// What a reconnection must bring back as it was.
pub(super) struct BlkReconnect {
    pub(super) mem: Arc<DmaMemory>,
    /// The back-end's in-flight tracking buffer (kept rings), if it has one.
    pub(super) inflight: Option<vireo_virtio::InflightBuffer>,
    /// Where each queue's ring is (for handing kept rings to a new connection).
    pub(super) layouts: Vec<vireo_virtio::RingLayout>,
    pub(super) name: String,
    pub(super) wanted: u64,
    pub(super) features: u64,
    pub(super) block_size: u32,
    pub(super) sectors_per_block: u64,
    pub(super) capacity: u64,
    pub(super) vq_count: u16,
    pub(super) vq_size: u16,
    pub(super) opts: QueueOptions,
    pub(super) bdev: std::sync::Weak<Bdev>,
}

impl link::Reconnect for BlkReconnect {
    fn keeps_rings(&self) -> bool {
        self.inflight.is_some() && self.layouts.len() == self.vq_count as usize
    }

    fn run(
        &mut self,
        t: &mut dyn Transport,
        ctx: &mut ReconnectCtx,
    ) -> Result<Vec<NewRing>, ReconnectError> {
        let transient = |e: vireo_virtio::Error| ReconnectError::Transient(e.to_string());
        let got = link::renegotiate(t, self.wanted, self.features)?;
        let mut raw = [0u8; CONFIG_LEN];
        t.read_config(0, &mut raw).map_err(transient)?;
        let cfg = BlkConfig::parse(&raw)
            .ok_or_else(|| ReconnectError::Transient("short configuration".into()))?;
        let bs = if got & bf::BLK_SIZE != 0 {
            cfg.blk_size
        } else {
            512
        };
        if bs != self.block_size {
            return Err(ReconnectError::Permanent(format!(
                "the device came back with {bs}-byte blocks, not {} as before",
                self.block_size
            )));
        }
        if got & bf::MQ != 0 && cfg.num_queues.max(1) < self.vq_count {
            return Err(ReconnectError::Permanent(format!(
                "the device came back with {} queues; vq_count is {}",
                cfg.num_queues, self.vq_count
            )));
        }
        if cfg.capacity != self.capacity {
            let blocks = cfg.capacity / self.sectors_per_block;
            tracing::warn!(
                controller = %self.name,
                "the device came back with {} sectors (was {}): the bdev now has {blocks} blocks",
                cfg.capacity,
                self.capacity
            );
            self.capacity = cfg.capacity;
            if let Some(b) = self.bdev.upgrade() {
                b.set_num_blocks(blocks);
            }
        }
        let mut out = Vec::with_capacity(self.vq_count as usize);
        let keep = ctx.keep && t.tracks_inflight();
        if ctx.keep && !keep {
            // The back-end came back without in-flight tracking: fresh rings, and the
            // channels resend from their records.
            tracing::warn!(controller = %self.name, "the back-end no longer tracks in-flight requests; resending from vireo's records");
        }
        if keep {
            // The same rings, with the tracking buffer: the back-end resends what it had
            // taken and not completed; each ring goes on at its used index.
            let buf = self.inflight.as_ref().ok_or_else(|| {
                ReconnectError::Permanent("no in-flight buffer to hand back".into())
            })?;
            t.set_inflight(buf).map_err(transient)?;
            let mut renewed = Vec::new();
            for i in 0..self.vq_count {
                if ctx.lost.contains(&i) {
                    continue;
                }
                let layout = self.layouts[i as usize];
                let base =
                    vireo_virtio::ring::peek_used_index(&layout, &self.mem).ok_or_else(|| {
                        ReconnectError::Permanent(format!("queue {i}'s ring is not in DMA memory"))
                    })?;
                let notifier = t.resume_queue(i, &layout, base).map_err(transient)?;
                renewed.push((i, notifier, t.completion_signal(i)));
            }
            t.start().map_err(transient)?;
            for (index, notifier, signal) in renewed {
                if let Some(pos) = ctx.parked.iter().position(|q| q.index() == index) {
                    let mut ring = ctx.parked.swap_remove(pos);
                    ring.set_notifier(notifier);
                    ring.set_completion_signal(signal);
                    out.push(NewRing::Fresh {
                        ring,
                        aborted: false,
                    });
                } else {
                    out.push(NewRing::Kept {
                        index,
                        notifier,
                        signal,
                    });
                }
            }
            return Ok(out);
        }
        // Fresh rings (and a fresh tracking buffer: the old one describes old rings).
        if self.inflight.is_some() {
            self.inflight = t
                .get_inflight(self.vq_count, self.vq_size)
                .map_err(transient)?;
        }
        let mut layouts = Vec::with_capacity(self.vq_count as usize);
        for i in 0..self.vq_count {
            let ring = create_queue(t, i, self.vq_size, self.opts).map_err(transient)?;
            layouts.push(ring.layout());
            out.push(NewRing::Fresh {
                ring,
                aborted: ctx.forced,
            });
        }
        t.start().map_err(transient)?;
        self.layouts = layouts;
        Ok(out)
    }
}
