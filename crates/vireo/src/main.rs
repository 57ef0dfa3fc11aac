//! `vireo`: a userspace, polled-mode virtio storage initiator.
//!
//! This file holds the command line's top level and the dispatch to the subcommands,
//! each in its own module with its own arguments. Module graph (arrows: "names"):
//!
//! ```text
//! main      -> bdevs, perf::cmd, target, serve, rpc::client, soak, pcisetup, convert,
//!              dma, perf
//! serve     -> rpc, rpc::bdev, nbd, nbd::rpc, ublk, ublk::rpc, socket, ini, dma, signals
//! ublk::rpc -> ublk, rpc, config        (rpc never names ublk)
//! nbd::rpc  -> nbd, rpc                 (rpc never names nbd)
//! nbd       -> socket
//! rpc::bdev -> rpc, config
//! perf::cmd -> perf, perf::report, perf::plot, embedded, ini, dma, units, signals
//! soak      -> perf, dma, units, signals
//! perf      -> signals
//! target    -> units, signals (and embedded, built without the test target)
//! bdevs     -> ini, dma
//! convert   -> ini
//! ini       -> config
//! dma       -> units
//! leaves: rpc (core), rpc::client, socket, config, units, signals, embedded,
//!         pcisetup, perf::report, perf::plot (these two name only their parent)
//! ```
//!
//! rpc (with rpc::bdev, rpc::client), nbd (with nbd::rpc), ublk (with ublk::rpc), config, ini, socket and
//! units live in the library (lib.rs), which the fuzz targets link; the others are the
//! binary's.

mod bdevs;
mod convert;
mod dma;
mod embedded;
mod pcisetup;
mod perf;
mod serve;
mod signals;
mod soak;
mod target;

// The library's modules (lib.rs), under the same paths: `crate::rpc`, `crate::ini`, ...
// (all of them, so a module of the binary may name any; none names `config` today).
#[allow(unused_imports)]
use vireo::{config, cpus, ini, nbd, rpc, socket, ublk, units};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vireo",
    version,
    about = "Userspace polled-mode virtio storage initiator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// `--hugepages` and `--dma-region-size` before the subcommand (hidden).
    #[command(flatten)]
    legacy_dma: dma::LegacyDmaArgs,
    /// Debug log of a component, as SPDK's -L: virtio (rings, vhost-user), virtio_blk,
    /// virtio_scsi, bdev, rpc, target, io (a trace line per I/O submitted and
    /// completed), or all (repeatable; VIREO_LOG takes tracing filter directives too).
    #[arg(short = 'L', long = "log", global = true, value_parser = parse_log_flag)]
    log: Vec<&'static str>,
}

/// The tracing filter directive of a `-L` component.
fn parse_log_flag(s: &str) -> std::result::Result<&'static str, String> {
    Ok(match s {
        "virtio" => "vireo_virtio=debug",
        "virtio_blk" => "vireo_bdev::blk=debug",
        "virtio_scsi" => "vireo_bdev::scsi=debug",
        "bdev" => "vireo_bdev=debug",
        "rpc" => "vireo::rpc=debug",
        "target" => "vireo_target=debug",
        "io" => "vireo_io=trace",
        "all" => "debug",
        other => {
            return Err(format!(
                "unknown log component {other:?} (virtio, virtio_blk, virtio_scsi, bdev, rpc, target, io, all)"
            ))
        }
    })
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Attach the controllers of a config, scan, and list the bdevs.
    Bdevs(bdevs::BdevsArgs),
    /// Run a workload on bdevs (flags as in SPDK's bdevperf).
    Perf(perf::cmd::PerfArgs),
    /// Serve the in-tree vhost-user test target until interrupted.
    Target(target::TargetArgs),
    /// Attach a config's controllers and serve SPDK-compatible JSON-RPC until
    /// SIGINT/SIGTERM.
    Serve(serve::ServeArgs),
    /// Send one JSON-RPC request to `vireo serve` and print the result.
    Rpc(rpc::client::RpcArgs),
    /// Verified I/O with flushes while the target is killed, frozen and disconnected:
    /// nothing acknowledged may be lost (exit 1 if anything failed or was lost).
    Soak(soak::SoakArgs),
    /// List virtio PCI functions: type, driver, IOMMU group, how vireo reaches them.
    Pci(pcisetup::PciArgs),
    /// Bind virtio PCI functions to vfio-pci or uio_pci_generic for vireo, or give them
    /// back to the kernel (like SPDK's setup.sh).
    Setup(pcisetup::SetupArgs),
    /// Print the SPDK JSON equivalent of a config file (INI or JSON).
    Config(convert::ConfigArgs),
}

/// The error and its causes, skipping causes the message already spells out.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if msg.contains(&c) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&c);
    }
    msg
}

/// Whether writing the output failed because its reader closed the pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<vireo::OutputError>()
            .is_some_and(vireo::OutputError::is_broken_pipe)
    })
}

fn main() {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The subcommand's own matches: which DMA options its line set.
    let sub = matches
        .subcommand()
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    let dma = |a: &dma::DmaArgs| a.config(&sub, &cli.legacy_dma);
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    for d in &cli.log {
        if let Ok(d) = d.parse() {
            filter = filter.add_directive(d);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(perf::stderr_is_terminal())
        .init();
    // Ok(true): success (exit 0); Ok(false): the command ran and found a failure (exit
    // 1); Err: it could not run (exit 2).
    let r = match cli.cmd {
        Cmd::Bdevs(a) => bdevs::cmd_bdevs(&dma(&a.dma), a).map(|_| true),
        Cmd::Perf(a) => perf::cmd::cmd_perf(&dma(&a.dma), a),
        Cmd::Soak(a) => soak::cmd_soak(&dma(&a.dma), a),
        Cmd::Target(a) => target::cmd_target(a).map(|_| true),
        Cmd::Serve(a) => serve::cmd_serve(&dma(&a.dma), a).map(|_| true),
        Cmd::Pci(a) => pcisetup::cmd_pci(a).map(|_| true),
        Cmd::Setup(a) => pcisetup::cmd_setup(a),
        Cmd::Config(a) => convert::cmd_config(a),
        Cmd::Rpc(a) => rpc::client::cmd_rpc(a),
    };
    match r {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        // The reader of the output went away (`vireo perf --json | head -1`): the
        // command has cleaned up; end quietly, as a filter does.
        Err(e) if is_broken_pipe(&e) => {}
        Err(e) => {
            eprintln!("vireo: error: {}", error_chain(&e));
            std::process::exit(2);
        }
    }
}
