//! What a virtio-scsi device writes: the command response (with sense), events and the
//! configuration space. Parsing and evaluation never panic, and every outcome is
//! consistent with the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_bdev::scsi::wire::{evaluate, Event, Outcome, Resp, ScsiConfig};

fuzz_target!(|data: &[u8]| {
    let _ = ScsiConfig::parse(data);
    if let Some(e) = Event::parse(data) {
        let _ = e.address();
    }
    let Some(r) = Resp::parse(data) else {
        assert!(data.len() < 12);
        return;
    };
    assert!(r.sense.len() <= data.len() - 12);
    for (len, short_ok) in [(0u32, false), (4096, false), (4096, true), (u32::MAX, true)] {
        match evaluate(&r, len, short_ok) {
            Outcome::Done { transferred } => {
                assert_eq!(r.response, 0);
                assert!(transferred <= len);
                assert!(short_ok || transferred == len);
            }
            Outcome::Check(_) => assert_eq!(r.status, 2),
            Outcome::Retry(_) | Outcome::Fail(_) => {}
        }
    }
});
