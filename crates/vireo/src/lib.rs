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

pub mod config;
pub mod ini;
pub mod nbd;
pub mod rpc;
pub mod socket;
pub mod ublk;
pub mod units;
