//! Standard INQUIRY data: parse never panics; encode(parse(x)) parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_scsi::StandardInquiry;

fuzz_target!(|data: &[u8]| {
    let Ok(inq) = StandardInquiry::parse(data) else {
        return;
    };
    let bytes = inq.encode().expect("parsed INQUIRY data must encode");
    assert_eq!(StandardInquiry::parse(&bytes).expect("re-parse"), inq);
});
