//! The in-tree vhost-user test target inside the binary: `vireo target` and the
//! in-process target `vireo perf` runs on without `-c`. Cargo feature
//! `embedded-target` (on by default); without it the binary does not depend on the
//! test target and these commands say so.

use std::sync::Arc;

use anyhow::Result;
use vireo_bdev::{Bdev, Registry};

use crate::TargetArgs;

#[cfg(feature = "embedded-target")]
pub use on::*;

#[cfg(feature = "embedded-target")]
mod on {
    use super::*;
    use anyhow::{bail, Context};

    use std::path::PathBuf;

    /// A private directory for sockets, removed on drop.
    struct TempDirGuard(PathBuf);

    impl Drop for TempDirGuard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir() -> Result<PathBuf> {
        let base = std::env::temp_dir();
        for i in 0..1000u32 {
            let d = base.join(format!("vireo-{}-{i}", std::process::id()));
            match std::fs::create_dir(&d) {
                Ok(()) => return Ok(d),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", d.display())),
            }
        }
        bail!("cannot create a temporary directory in {}", base.display())
    }

    /// Serve until SIGINT or SIGTERM (then the caller stops the target, which removes its
    /// socket).
    /// Serve until SIGINT/SIGTERM; each SIGUSR1 drops the front-end's connection at
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

    /// Keeps the embedded target and its socket directory alive.
    pub struct Guard {
        // Held for their Drop, in this order: the target stops, then its directory goes.
        _target: vireo_target::TargetHandle,
        _dir: TempDirGuard,
    }

    /// The in-process vhost-user-blk target `vireo perf` uses without `-c`: 1 GiB of RAM,
    /// one queue per core, attached as `Embedded0`.
    pub fn perf_target(reg: &Registry, queues: u16, json: bool) -> Result<(Guard, Vec<Arc<Bdev>>)> {
        let dir = tempdir()?;
        let sock = dir.join("embedded-blk.sock");
        let t = vireo_target::spawn_blk_target(
            &sock,
            vireo_target::BlkTargetConfig {
                backend: vireo_target::Backing::Ram {
                    size_bytes: 1 << 30,
                },
                num_queues: queues,
                ..Default::default()
            },
        )
        .context("cannot start the embedded vhost-user-blk target")?;
        if !json {
            eprintln!(
                "vireo: no -c given: using an in-process vhost-user-blk target on 1 GiB of RAM ({})",
                sock.display()
            );
        }
        let params = vireo_bdev::AttachParams {
            name: "Embedded0".into(),
            trtype: vireo_bdev::TrType::User,
            traddr: sock.display().to_string(),
            dev_type: vireo_bdev::DevType::Blk,
            vq_count: queues,
            vq_size: 256,
            io_timeout: None,
            reconnect_timeout: None,
        };
        let b = reg.attach(&params)?;
        Ok((
            Guard {
                _target: t,
                _dir: TempDirGuard(dir),
            },
            b,
        ))
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
                size_max: a.size_max as u32,
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

    /// Nothing to keep alive.
    pub struct Guard;

    const MISSING: &str =
        "this vireo was built without the embedded test target (cargo feature embedded-target)";

    /// Without the feature: an error that says what to do.
    pub fn perf_target(_: &Registry, _: u16, _: bool) -> Result<(Guard, Vec<Arc<Bdev>>)> {
        anyhow::bail!("{MISSING}: give vireo perf a configuration with -c")
    }

    /// Without the feature: an error.
    pub fn cmd_target(_: TargetArgs) -> Result<()> {
        anyhow::bail!("{MISSING}: vireo target is not available")
    }
}

#[cfg(not(feature = "embedded-target"))]
pub use off::*;
