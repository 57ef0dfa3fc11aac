//! Sense data, fixed and descriptor: parse never panics; encoding in the same
//! format parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_scsi::Sense;

fuzz_target!(|data: &[u8]| {
    let Ok(sense) = Sense::parse(data) else {
        return;
    };
    let format = Sense::format_of(data).expect("parsed sense has a format");
    let _ = (
        sense.to_string(),
        sense.field_pointer(),
        sense.is_unit_attention(),
    );
    let bytes = sense.encode(format);
    assert_eq!(Sense::format_of(&bytes), Ok(format));
    assert_eq!(Sense::parse(&bytes).expect("re-parse"), sense);
});
