//! `vireo serve`: attach a config's controllers, export the bdevs over NBD (`--nbd`)
//! and serve JSON-RPC until SIGINT or SIGTERM.
//!
//! The one module that joins the JSON-RPC server ([`crate::rpc`]) and the NBD server
//! ([`crate::nbd`]): it builds the method table from each subsystem's handlers and
//! hands the NBD server to the NBD methods. Neither server names the other.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use vireo_bdev::Registry;
use vireo_virtio::DmaConfig;

use crate::nbd::{self, NbdServer};
use crate::rpc::{self, Methods};
use crate::ublk::UblkServer;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Configuration file to attach at start: SPDK-style JSON or INI (the legacy
    /// Virtio INI format); default: start empty.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Unix socket to serve JSON-RPC on.
    #[arg(short = 'r', long = "rpc-socket")]
    socket: PathBuf,
    #[command(flatten)]
    nbd: nbd::NbdArgs,
    /// Export a bdev as the kernel block device /dev/ublkbID (default ID: the
    /// next free one from 0); repeatable. Needs the kernel's ublk_drv. The ublk_* RPCs
    /// (ublk_create_target, ublk_start_disk, ...) manage devices at run time.
    #[arg(long, value_name = "BDEV[:ID]")]
    ublk: Vec<String>,
    /// Tags per queue of the --ublk devices.
    #[arg(long, value_name = "N", default_value_t = crate::ublk::DEFAULT_QUEUE_DEPTH)]
    ublk_queue_depth: u16,
    /// Queues of each --ublk device, each served by its own thread on its own channel.
    #[arg(long, value_name = "N", default_value_t = crate::ublk::DEFAULT_NUM_QUEUES)]
    ublk_queues: u16,
    #[command(flatten)]
    pub dma: crate::dma::DmaArgs,
}

/// Every method `vireo serve` answers: the server's own, the bdev subsystem's and the
/// NBD subsystem's (those answer "no NBD listener" without `nbd`).
fn methods(reg: Arc<Registry>, nbd: Option<Arc<NbdServer>>, ublk: Arc<UblkServer>) -> Methods {
    let mut m = Methods::new();
    rpc::bdev::register(&mut m, reg.clone());
    nbd::rpc::register(&mut m, nbd);
    crate::ublk::rpc::register(&mut m, reg, ublk);
    m
}

/// `--ublk BDEV[:ID]`: the bdev and the device id (None: the next free one).
fn parse_ublk(s: &str) -> Result<(String, Option<u32>)> {
    match s.rsplit_once(':') {
        Some((b, id)) if !b.is_empty() => {
            let id = id
                .parse::<u32>()
                .ok()
                .filter(|&i| i != u32::MAX)
                .with_context(|| {
                    format!(
                        "--ublk {s}: the device id after ':' must be a number, like VirtioBlk0:0"
                    )
                })?;
            Ok((b.to_string(), Some(id)))
        }
        _ if !s.is_empty() => Ok((s.to_string(), None)),
        _ => anyhow::bail!("--ublk takes BDEV or BDEV:ID"),
    }
}

/// Start the --ublk devices: the target, then each device.
fn start_ublk(server: &UblkServer, ublk: &[String], queues: u16, depth: u16) -> Result<()> {
    if ublk.is_empty() {
        return Ok(());
    }
    let wanted: Vec<(String, Option<u32>)> =
        ublk.iter().map(|s| parse_ublk(s)).collect::<Result<_>>()?;
    if server.target_opt().is_none() {
        server.create_target(None).context("--ublk")?;
    }
    let t = server.target()?;
    let mut next = 0u32;
    for (bdev, id) in wanted {
        let id = match id {
            Some(i) => i,
            None => {
                let used: Vec<u32> = t.list().iter().map(|d| d.id).collect();
                while used.contains(&next)
                    || std::path::Path::new(&format!("/dev/ublkc{next}")).exists()
                {
                    next += 1;
                }
                next
            }
        };
        t.start_disk(&bdev, id, queues, depth)
            .with_context(|| format!("--ublk {bdev}:{id}"))?;
        eprintln!("vireo: bdev {bdev} is /dev/ublkb{id}");
    }
    Ok(())
}

/// `vireo serve`: attach the config's controllers, then serve JSON-RPC on the socket
/// until SIGINT or SIGTERM.
pub fn cmd_serve(dma: &DmaConfig, a: ServeArgs) -> Result<()> {
    let reg = Arc::new(crate::dma::registry(dma)?);
    if let Some(c) = &a.config {
        crate::ini::attach_config(&reg, c)?;
    }
    crate::signals::install();
    let opts = a.nbd.options()?;
    // Both sockets are bound before anything serves on either: a start that fails
    // (a socket in use) leaves neither behind. The RPC socket comes last: whoever waits
    // for it to appear finds the NBD socket there already.
    let nbd_listener = match &a.nbd.nbd {
        Some(l) => Some(nbd::Listener::bind(l, &opts)?),
        None => None,
    };
    let socket = a.socket;
    let listener = crate::socket::bind(&socket)?;
    let _guard = crate::socket::SocketFile(socket.clone());
    listener
        .set_nonblocking(true)
        .context("cannot make the RPC socket non-blocking")?;
    let mut nbd_thread = None;
    let mut nbd_server = None;
    if let Some(l) = nbd_listener {
        let server = NbdServer::with_options(reg.clone(), true, true, opts);
        nbd_server = Some(server.clone());
        nbd_thread = Some(
            std::thread::Builder::new()
                .name("vireo-nbd".into())
                .spawn(move || nbd::serve(server, l, crate::signals::stop_requested))
                .context("cannot start the NBD server thread")?,
        );
    }
    let ublk = UblkServer::new(reg.clone());
    let methods = Arc::new(methods(reg.clone(), nbd_server, ublk.clone()));
    if let Some(doc) = a
        .config
        .as_ref()
        .and_then(|c| std::fs::read(c).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    {
        if let Err(e) = crate::ublk::rpc::apply_config(&methods, &doc) {
            ublk.target_opt().inspect(|t| t.shutdown());
            anyhow::bail!("{e}");
        }
    }
    if let Err(e) = start_ublk(&ublk, &a.ublk, a.ublk_queues, a.ublk_queue_depth) {
        ublk.target_opt().inspect(|t| t.shutdown());
        return Err(e);
    }
    eprintln!(
        "vireo: serving JSON-RPC on {} ({} bdevs)",
        socket.display(),
        reg.bdevs().len()
    );
    rpc::serve(&listener, methods, crate::signals::stop_requested);
    eprintln!("vireo: shutting down");
    if let Some(t) = nbd_thread {
        // The NBD threads have closed their clients and channels when it ends.
        match t.join() {
            Ok(Err(e)) => tracing::warn!("NBD server: {e:#}"),
            Err(_) => tracing::warn!("the NBD server thread panicked"),
            Ok(Ok(())) => {}
        }
    }
    // The kernel devices go before the bdevs they serve.
    if let Some(t) = ublk.target_opt() {
        t.shutdown();
    }
    for (a, _) in reg.controllers() {
        if let Err(e) = reg.detach(&a.name) {
            tracing::warn!(controller = %a.name, "detach at shutdown failed: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The methods `rpc_get_methods` lists: every name SPDK's tools and the tests call.
    #[test]
    fn serve_answers_every_method() {
        let reg = Registry::new(vireo_virtio::DmaMemory::new(Default::default()).unwrap());
        let reg = Arc::new(reg);
        let m = methods(reg.clone(), None, UblkServer::new(reg));
        assert_eq!(
            m.call("rpc_get_methods", &serde_json::Value::Null),
            Ok(serde_json::json!([
                "bdev_get_bdevs",
                "bdev_get_iostat",
                "bdev_virtio_attach_controller",
                "bdev_virtio_blk_set_hotplug",
                "bdev_virtio_detach_controller",
                "bdev_virtio_scsi_get_devices",
                "framework_get_config",
                "framework_get_subsystems",
                "nbd_get_disks",
                "nbd_start_disk",
                "nbd_stop_disk",
                "rpc_get_methods",
                "save_config",
                "spdk_get_version",
                "ublk_create_target",
                "ublk_destroy_target",
                "ublk_get_disks",
                "ublk_recover_disk",
                "ublk_start_disk",
                "ublk_stop_disk"
            ]))
        );
    }
}
