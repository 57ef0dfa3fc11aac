//! MODE SENSE(6)/(10) header and parameter data: parse never panics;
//! encode(parse(x)) parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_scsi::{ModeHeader, ModeParameters};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = ModeHeader::parse6(data) {
        let b = h.encode6().expect("parsed 6-byte header must encode");
        assert_eq!(ModeHeader::parse6(&b).expect("re-parse"), h);
    }
    if let Ok(h) = ModeHeader::parse10(data) {
        assert_eq!(ModeHeader::parse10(&h.encode10()).expect("re-parse"), h);
    }
    if let Ok(m) = ModeParameters::parse6(data) {
        let _ = m.caching();
        let b = m.encode6().expect("parsed MODE SENSE(6) data must encode");
        assert_eq!(ModeParameters::parse6(&b).expect("re-parse"), m);
    }
    if let Ok(m) = ModeParameters::parse10(data) {
        let _ = m.caching();
        let b = m
            .encode10()
            .expect("parsed MODE SENSE(10) data must encode");
        assert_eq!(ModeParameters::parse10(&b).expect("re-parse"), m);
    }
});
