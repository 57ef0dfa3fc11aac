//! DMA memory of the commands that do I/O through a [`Registry`]: `--hugepages` and
//! `--dma-region-size`.

use anyhow::{Context, Result};
use vireo_bdev::Registry;
use vireo_virtio::{DmaConfig, DmaMemory};

/// `--hugepages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HugePages {
    /// Huge pages when reserved, normal pages otherwise.
    Auto,
    /// Huge pages, or an error.
    On,
    /// Normal pages.
    Off,
}

/// The DMA memory settings of `--hugepages` and `--dma-region-size`.
pub fn config(hugepages: HugePages, region_size: usize) -> DmaConfig {
    DmaConfig {
        initial_region_size: region_size,
        hugetlb: hugepages != HugePages::Off,
        hugetlb_fallback: hugepages == HugePages::Auto,
        ..DmaConfig::default()
    }
}

/// A registry on DMA memory set up as `cfg` says.
pub fn registry(cfg: &DmaConfig) -> Result<Registry> {
    let mem = DmaMemory::new(cfg.clone()).context("cannot set up DMA memory")?;
    Ok(Registry::new(mem))
}
