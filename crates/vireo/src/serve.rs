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
    #[command(flatten)]
    pub dma: crate::dma::DmaArgs,
}

/// Every method `vireo serve` answers: the server's own, the bdev subsystem's and the
/// NBD subsystem's (those answer "no NBD listener" without `nbd`).
fn methods(reg: Arc<Registry>, nbd: Option<Arc<NbdServer>>) -> Methods {
    let mut m = Methods::new();
    rpc::bdev::register(&mut m, reg);
    nbd::rpc::register(&mut m, nbd);
    m
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
    // (a socket in use) leaves neither behind.
    let socket = a.socket;
    let listener = crate::socket::bind(&socket)?;
    let _guard = crate::socket::SocketFile(socket.clone());
    listener
        .set_nonblocking(true)
        .context("cannot make the RPC socket non-blocking")?;
    let nbd_listener = match &a.nbd.nbd {
        Some(l) => Some(nbd::Listener::bind(l, &opts)?),
        None => None,
    };
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
    let methods = Arc::new(methods(reg.clone(), nbd_server));
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
        let m = methods(Arc::new(reg), None);
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
                "spdk_get_version"
            ]))
        );
    }
}
