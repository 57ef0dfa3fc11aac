//! REPORT LUNS data: parse never panics; encode(parse(x)) parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_scsi::{Lun, ReportLuns};

fuzz_target!(|data: &[u8]| {
    let _ = ReportLuns::needed_len(data);
    let Ok(r) = ReportLuns::parse(data) else {
        return;
    };
    for lun in &r.luns {
        let _ = (lun.address(), lun.is_single_level(), lun.is_well_known());
        if let Some(n) = lun.number() {
            // A numbered LUN re-encodes to a LUN with the same number.
            let again = Lun::from_number(n).expect("numbered LUN fits");
            assert_eq!(again.number(), Some(n));
        }
    }
    let bytes = r.encode().expect("parsed REPORT LUNS data must encode");
    assert_eq!(ReportLuns::parse(&bytes).expect("re-parse"), r);
});
