//! VPD pages (00h, 80h, 83h, B0h, B1h, B2h, others): parse never panics;
//! encode(parse(x)) parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_scsi::vpd::{
    BlockDeviceCharacteristics, BlockLimits, DeviceIdentification, LogicalBlockProvisioning,
    SupportedPages, UnitSerialNumber, VpdPage,
};
use vireo_scsi::Peripheral;

fuzz_target!(|data: &[u8]| {
    // The page-specific parsers must fail cleanly on any other page too.
    let _ = SupportedPages::parse(data);
    let _ = UnitSerialNumber::parse(data);
    let _ = BlockDeviceCharacteristics::parse(data);
    let _ = LogicalBlockProvisioning::parse(data);
    if let Ok(ids) = DeviceIdentification::parse(data) {
        let _ = ids.preferred().map(|d| d.to_text());
    }
    if let Ok(l) = BlockLimits::parse(data) {
        let _ = l.max_transfer();
    }

    let Ok(page) = VpdPage::parse(data) else {
        return;
    };
    let peripheral = Peripheral::from_byte(data.first().copied().unwrap_or(0));
    let bytes = page
        .encode(peripheral)
        .expect("parsed VPD page must encode");
    assert_eq!(bytes.first().copied(), Some(peripheral.to_byte()));
    assert_eq!(VpdPage::parse(&bytes).expect("re-parse"), page);
});
