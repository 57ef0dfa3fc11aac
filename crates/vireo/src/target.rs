//! `vireo target`: serve the in-tree vhost-user test target (blk or scsi, on RAM or a
//! file, with faults) until interrupted. Cargo feature `embedded-target` (on by
//! default); without it the command says it is not available.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// Device type: blk or scsi.
    #[arg(long = "type", default_value = "blk")]
    dev_type: String,
    /// scsi: targets (ids 0..N).
    #[arg(long, default_value_t = 1)]
    targets: u8,
    /// scsi: LUNs per target (0..M).
    #[arg(long, default_value_t = 1)]
    luns: u16,
    /// scsi: VPD B0 maximum transfer length in blocks (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_transfer: u32,
    /// scsi: VPD B0 maximum unmap LBA count: blocks one UNMAP may name (at least 1), or
    /// `unlimited` (the same as 4294967295).
    #[arg(long, default_value = "unlimited", value_parser = crate::units::parse_limit)]
    max_unmap_lba: u32,
    /// scsi: VPD B0 maximum unmap block descriptor count: descriptors one UNMAP may carry
    /// (at least 1), or `unlimited` (the same as 4294967295).
    #[arg(long, default_value = "unlimited", value_parser = crate::units::parse_limit)]
    max_unmap_desc: u32,
    /// Socket to listen on.
    #[arg(short = 's', long)]
    socket: PathBuf,
    /// RAM disk size (suffixes k, m, g), unless --file is given.
    #[arg(long, default_value = "1g", value_parser = crate::units::parse_size)]
    size: usize,
    /// Back the disk with this file instead of RAM (created and sized if needed).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Logical block size (512 or 4096).
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Request queues.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Largest queue size (descriptors) a front-end may set.
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// Largest segments per request (seg_max).
    #[arg(long, default_value_t = 126)]
    seg_max: u32,
    /// Largest segment in bytes (size_max; below 4g).
    #[arg(long, default_value = "1m", value_parser = crate::units::parse_size_u32)]
    size_max: u32,
    /// Export read-only.
    #[arg(long)]
    read_only: bool,
    /// blk: do not offer VIRTIO_BLK_F_FLUSH (a write-through device).
    #[arg(long)]
    no_flush: bool,
    /// scsi: do not offer the vhost-user CONFIG protocol feature (no readable
    /// configuration space, like SPDK's vhost-scsi).
    #[arg(long)]
    no_config_space: bool,
    /// Fault: delay every completion by this many microseconds.
    #[arg(long, default_value_t = 0)]
    delay_us: u64,
    /// Fault: hold back up to N completions of a queue and complete them in reverse order.
    #[arg(long, default_value_t = 0)]
    reorder: u32,
    /// Fault: fail the first N requests (blk: IOERR; scsi: CHECK CONDITION, MEDIUM ERROR).
    #[arg(long, default_value_t = 0)]
    fail_next: u64,
    /// Fault: serve N requests, then drop the front-end with the next one in flight (once).
    #[arg(long)]
    disconnect_after: Option<u64>,
    /// Fault: report a used length beyond the request's buffers for the first N requests.
    #[arg(long, default_value_t = 0)]
    lie_used_len: u64,
    /// Fault: complete the first N requests with a used id outside the ring.
    #[arg(long, default_value_t = 0)]
    bad_used_id: u64,
    /// scsi fault: never answer task management functions.
    #[arg(long)]
    tmf_never_answer: bool,
}

#[cfg(feature = "embedded-target")]
pub use on::*;

#[cfg(feature = "embedded-target")]
mod on {
    use super::*;
    use anyhow::bail;

    /// Serve until SIGINT/SIGTERM (then the caller stops the target, which removes its
    /// socket); each SIGUSR1 drops the front-end's connection at
    /// its next request (with the requests in flight: a scripted disconnect).
    fn wait_for_stop_signal(faults: &vireo_target::Faults) {
        let mut seen = crate::signals::usr1_count();
        while !crate::signals::stop_requested() {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let now = crate::signals::usr1_count();
            if now != seen {
                seen = now;
                eprintln!(
                    "vireo: SIGUSR1: dropping the front-end's connection at its next request"
                );
                faults.disconnect_after(0);
            }
        }
    }

    /// Arm the faults given on the command line.
    fn arm(a: &TargetArgs, f: &vireo_target::Faults) {
        f.set_completion_delay(std::time::Duration::from_micros(a.delay_us));
        f.set_reorder_window(a.reorder);
        f.fail_next(a.fail_next);
        if let Some(n) = a.disconnect_after {
            f.disconnect_after(n);
        }
        f.lie_used_len_next(a.lie_used_len);
        f.bad_used_id_next(a.bad_used_id);
    }

    fn cmd_target_scsi(a: TargetArgs) -> Result<()> {
        if a.targets == 0 || a.luns == 0 {
            bail!("--targets and --luns must be at least 1");
        }
        let mut luns = std::collections::BTreeMap::new();
        for t in 0..a.targets {
            for l in 0..a.luns {
                let backend = match &a.file {
                    Some(base) => vireo_target::Backing::File {
                        path: base.with_extension(format!("t{t}l{l}.img")),
                        size_bytes: Some(a.size as u64),
                    },
                    None => vireo_target::Backing::Ram {
                        size_bytes: a.size as u64,
                    },
                };
                luns.insert(
                    (t, l),
                    vireo_target::LunConfig {
                        backend,
                        block_size: a.block_size,
                        read_only: a.read_only,
                        limits: vireo_target::BlockLimitsConfig {
                            max_transfer_length: a.max_transfer,
                            max_unmap_lba_count: a.max_unmap_lba,
                            max_unmap_descriptor_count: a.max_unmap_desc,
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                );
            }
        }
        let t = vireo_target::spawn_scsi_target(
            &a.socket,
            vireo_target::ScsiTargetConfig {
                luns,
                num_request_queues: a.queues,
                queue_size: a.queue_size,
                seg_max: a.seg_max,
                config_space: !a.no_config_space,
                tmf_never_answer: a.tmf_never_answer,
                ..Default::default()
            },
        )?;
        arm(&a, t.faults());
        eprintln!(
            "vireo: vhost-user-scsi target listening on {} ({} targets x {} LUNs)",
            a.socket.display(),
            a.targets,
            a.luns
        );
        wait_for_stop_signal(t.faults());
        t.stop();
        Ok(())
    }

    pub fn cmd_target(a: TargetArgs) -> Result<()> {
        crate::signals::install();
        crate::signals::install_usr1();
        match a.dev_type.as_str() {
            "blk" => {}
            "scsi" => return cmd_target_scsi(a),
            other => bail!("unknown target type {other:?} (blk or scsi)"),
        }
        let backend = match &a.file {
            Some(path) => vireo_target::Backing::File {
                path: path.clone(),
                size_bytes: Some(a.size as u64),
            },
            None => vireo_target::Backing::Ram {
                size_bytes: a.size as u64,
            },
        };
        let t = vireo_target::spawn_blk_target(
            &a.socket,
            vireo_target::BlkTargetConfig {
                backend,
                block_size: a.block_size,
                num_queues: a.queues,
                queue_size: a.queue_size,
                seg_max: a.seg_max,
                size_max: a.size_max,
                read_only: a.read_only,
                flush: !a.no_flush,
                ..Default::default()
            },
        )?;
        arm(&a, t.faults());
        eprintln!(
            "vireo: vhost-user-blk target listening on {}",
            a.socket.display()
        );
        wait_for_stop_signal(t.faults());
        t.stop();
        Ok(())
    }
}

#[cfg(not(feature = "embedded-target"))]
mod off {
    use super::*;

    /// Without the feature: an error.
    pub fn cmd_target(_: TargetArgs) -> Result<()> {
        anyhow::bail!(
            "{}: vireo target is not available",
            crate::embedded::MISSING
        )
    }
}

#[cfg(not(feature = "embedded-target"))]
pub use off::*;
