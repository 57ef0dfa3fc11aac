//! DMA memory of the commands that do I/O through a [`Registry`] (bdevs, perf, serve,
//! soak): `--hugepages` and `--dma-region-size`, offered on those subcommands only.

use anyhow::{Context, Result};
use clap::parser::{ArgMatches, ValueSource};
use vireo_bdev::Registry;
use vireo_virtio::{DmaConfig, DmaMemory};

use crate::units::parse_size;

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

// The options of a subcommand that allocates DMA memory (flattened into its
// arguments).
#[derive(clap::Args, Debug, Clone)]
pub struct DmaArgs {
    /// DMA memory in huge pages (MFD_HUGETLB): `auto` (the default) when the machine
    /// has them reserved (/proc/sys/vm/nr_hugepages), normal pages otherwise; `on`
    /// (plain `--hugepages`) requires them; `off` never. Back-ends built on DPDK (SPDK's
    /// vhost) register guest memory in 2 MiB units and are only safe with huge pages.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "on"
    )]
    hugepages: HugePages,
    /// Size of the first DMA memory region (suffixes k, m, g): rings, request slots,
    /// bounce buffers. More regions are added as needed (`vireo perf` adds one sized to
    /// its I/O buffers, queue depth x I/O size per job).
    #[arg(long, default_value = "4m", value_parser = parse_size)]
    dma_region_size: usize,
}

// The same options before the subcommand (`vireo --hugepages=off perf`), where they
// were global until they moved to the subcommands that use them: still accepted
// there, hidden from the help.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LegacyDmaArgs {
    #[arg(
        long = "hugepages",
        hide = true,
        value_enum,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "on"
    )]
    hugepages: Option<HugePages>,
    #[arg(long = "dma-region-size", hide = true, value_parser = parse_size)]
    dma_region_size: Option<usize>,
}

impl DmaArgs {
    /// The DMA memory settings: what the subcommand's line (`given`, its matches) set,
    /// else what came before the subcommand, else the defaults.
    pub fn config(&self, given: &ArgMatches, before: &LegacyDmaArgs) -> DmaConfig {
        let on_line = |id: &str| given.value_source(id) == Some(ValueSource::CommandLine);
        let hugepages = match before.hugepages {
            Some(h) if !on_line("hugepages") => h,
            _ => self.hugepages,
        };
        let region = match before.dma_region_size {
            Some(r) if !on_line("dma_region_size") => r,
            _ => self.dma_region_size,
        };
        config(hugepages, region)
    }
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
