//! The in-process vhost-user-blk target `vireo perf` runs on without `-c` (the in-tree
//! test target inside the binary). Cargo feature `embedded-target` (on by default);
//! without it the binary does not depend on the test target and `vireo perf` without
//! `-c` says so.

use std::sync::Arc;

use anyhow::Result;
use vireo_bdev::{Bdev, Registry};

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
            // The target's socket goes there: the owner's only.
            let made = {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new().mode(0o700).create(&d)
            };
            match made {
                Ok(()) => return Ok(d),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", d.display())),
            }
        }
        bail!("cannot create a temporary directory in {}", base.display())
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
            wwpn: None,
            name: "Embedded0".into(),
            trtype: vireo_bdev::TrType::User,
            traddr: sock.display().to_string(),
            dev_type: vireo_bdev::DevType::Blk,
            vq_count: queues,
            vq_size: 256,
            io_timeout: None,
            reconnect_timeout: None,
            packed_ring: Default::default(),
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
}

/// What a binary built without the feature says.
#[cfg(not(feature = "embedded-target"))]
pub const MISSING: &str =
    "this vireo was built without the embedded test target (cargo feature embedded-target)";

#[cfg(not(feature = "embedded-target"))]
mod off {
    use super::*;

    /// Nothing to keep alive.
    pub struct Guard;

    /// Without the feature: an error that says what to do.
    pub fn perf_target(_: &Registry, _: u16, _: bool) -> Result<(Guard, Vec<Arc<Bdev>>)> {
        anyhow::bail!("{MISSING}: give vireo perf a configuration with -c")
    }
}

#[cfg(not(feature = "embedded-target"))]
pub use off::*;
