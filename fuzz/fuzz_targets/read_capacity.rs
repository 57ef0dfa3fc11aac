//! READ CAPACITY(10)/(16) data: parse never panics; encode(parse(x)) parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_scsi::{ReadCapacity10, ReadCapacity16};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = ReadCapacity10::parse(data) {
        let _ = (c.needs_16(), c.block_count());
        assert_eq!(ReadCapacity10::parse(&c.encode()).expect("re-parse"), c);
    }
    if let Ok(c) = ReadCapacity16::parse(data) {
        assert!(c.block_len != 0);
        let _ = (c.capacity_bytes(), c.physical_block_len());
        assert_eq!(c.block_count(), c.last_lba + 1);
        assert_eq!(ReadCapacity16::parse(&c.encode()).expect("re-parse"), c);
    }
});
