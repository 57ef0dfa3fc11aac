//! `vireo bdevs`: attach the controllers of a config, scan, and list the bdevs.

use std::path::PathBuf;

use anyhow::Result;
use vireo_virtio::DmaConfig;

#[derive(clap::Args, Debug)]
pub struct BdevsArgs {
    /// Configuration file: SPDK-style JSON or INI (the legacy Virtio INI format).
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub dma: crate::dma::DmaArgs,
}

/// `vireo bdevs`: attach the config's controllers, list their bdevs (and the LUNs
/// skipped because they are not disks).
pub fn cmd_bdevs(dma: &DmaConfig, a: BdevsArgs) -> Result<()> {
    let reg = crate::dma::registry(dma)?;
    let bdevs = crate::ini::attach_config(&reg, &a.config)?;
    if a.json {
        let infos: Vec<_> = bdevs.iter().map(|b| b.info().clone()).collect();
        vireo::outln!("{}", serde_json::to_string_pretty(&infos)?)?;
        return Ok(());
    }
    vireo::outln!(
        "{:<18} {:<11} {:>6} {:>14} {:>11} {:>3} {:>5} {:>6} {:>5} {:>5} {:>5} {:>10} {:>10}  device",
        "name",
        "driver",
        "bs",
        "blocks",
        "capacity",
        "qs",
        "qsize",
        "ring",
        "unmap",
        "cache",
        "wzero",
        "max_io",
        "max_unmap"
    )?;
    let yn = |b: bool| if b { "yes" } else { "no" };
    for b in &bdevs {
        let i = b.info();
        let mut device = String::new();
        if let Some(a) = i.scsi {
            device.push_str(&format!("target {} lun {} ", a.target, a.lun));
        }
        if let (Some(v), Some(p)) = (&i.vendor, &i.product) {
            device.push_str(&format!("{v} {p} "));
        }
        device.push_str(&format!("serial {}", i.serial.as_deref().unwrap_or("-")));
        if i.read_only {
            device.push_str(" (read-only)");
        }
        vireo::outln!(
            "{:<18} {:<11} {:>6} {:>14} {:>11} {:>3} {:>5} {:>6} {:>5} {:>5} {:>5} {:>10} {:>10}  {}",
            i.name,
            i.driver,
            i.block_size,
            i.num_blocks,
            human(i.capacity_bytes()),
            i.num_queues,
            i.queue_size,
            if i.packed_ring { "packed" } else { "split" },
            yn(i.ops.unmap),
            // Write-back (flushes reach the device) or write-through.
            if i.volatile_write_cache { "wb" } else { "wt" },
            yn(i.ops.write_zeroes),
            human(i.limits.max_rw_blocks * i.block_size as u64),
            if i.ops.unmap {
                human(
                    i.limits
                        .max_unmap_blocks
                        .saturating_mul(i.block_size as u64),
                )
            } else {
                "-".into()
            },
            device,
        )?;
    }
    for (ctrl, l) in reg.skipped_luns() {
        vireo::outln!(
            "skipped: controller {ctrl} target {} lun {}: peripheral device type {:#04x} ({} {}), not a disk",
            l.target, l.lun, l.device_type, l.vendor, l.product
        )?;
    }
    Ok(())
}

/// A size in B, KiB, MiB, ... with one decimal.
fn human(bytes: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
