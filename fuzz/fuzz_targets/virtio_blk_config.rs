//! The virtio-blk configuration space as a device reports it: parsing never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_bdev::BlkConfig;

fuzz_target!(|data: &[u8]| {
    match BlkConfig::parse(data) {
        Some(c) => {
            assert!(data.len() >= 60);
            assert_eq!(c.capacity.to_le_bytes(), data[..8]);
        }
        None => assert!(data.len() < 60),
    }
});
