//! Real peers that CI cannot install, for vireo's tests and benchmarks.
//!
//! [`spdk`]: SPDK's polled vhost target (the target SPDK's own virtio initiator was
//! written against) and SPDK's `bdevperf` (that initiator). Nothing here builds SPDK:
//! point `SPDK_DIR` (or `VIREO_SPDK_DIR`) at an SPDK v25.09 build with vhost and
//! virtio enabled; tests and benches that need it report themselves as skipped, loudly,
//! when it is absent.

pub mod spdk;
