//! The library half of `vireo`: the modules the fuzz targets (`fuzz/`) and tests reach
//! in-process, without a subprocess. The binary (`main.rs`) uses them under the same
//! names (`crate::rpc`, `crate::ini`, ...), so nothing else changes for it.
//!
//! - [`rpc`]: the JSON-RPC 2.0 server core (framing, limits, dispatch through a
//!   [`rpc::Methods`] table), the bdev and framework methods ([`rpc::bdev`]) and the
//!   `vireo rpc` client;
//! - [`nbd`]: the NBD server and its methods ([`nbd::rpc`]);
//! - [`ublk`]: the ublk server (bdevs as /dev/ublkbN) and its methods ([`ublk::rpc`]);
//! - [`config`] and [`ini`]: SPDK's JSON configuration and the legacy INI format;
//! - [`socket`] and [`units`]: leaves the others and the binary share.
//!
//! None of these names a module of the binary.

/// `println!` that returns the write's error instead of panicking: a reader that goes
/// away (`vireo perf --json | head -1`) ends the command quietly, after its clean-up,
/// instead of a panic (`main` treats a broken pipe as the end of the output).
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {{
        use ::std::io::Write as _;
        writeln!(::std::io::stdout().lock(), $($t)*).map_err($crate::OutputError)
    }};
}

/// Writing the command's output to stdout failed ([`outln!`]); a closed pipe is a quiet
/// end, anything else an error.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the output to stdout: {0}")]
pub struct OutputError(#[source] pub std::io::Error);

impl OutputError {
    /// The reader of the output went away.
    pub fn is_broken_pipe(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

pub mod config;
pub mod cpus;
pub mod ini;
pub mod nbd;
pub mod rpc;
pub mod socket;
pub mod ublk;
pub mod units;
