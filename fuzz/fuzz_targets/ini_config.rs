//! The legacy INI configuration reader (`vireo::ini::parse`) on arbitrary text.
//!
//! Oracle: no panic; whatever it accepts converts (`ini::to_json`, as `vireo config
//! convert` prints it) to SPDK JSON that the JSON loader (`config::parse_config`, what
//! `vireo serve -c` and `vireo perf -c` read) accepts, giving back the same calls, whose
//! JSON is the same again. A file the loader takes for INI (`ini::is_ini`) is read as
//! INI, so the loader's choice is checked too: INI text it would read as JSON must be
//! refused by the INI reader or by the JSON parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo::{config, ini};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let is_ini = ini::is_ini(text);
    let Ok(calls) = ini::parse(text, "fuzz.ini") else {
        return;
    };
    let doc = ini::to_json(&calls);
    let printed = serde_json::to_string_pretty(&doc).expect("JSON prints");
    let reread: serde_json::Value = serde_json::from_str(&printed).expect("printed JSON parses");
    let back = config::parse_config(&reread).unwrap_or_else(|e| {
        panic!("the INI reader accepts this but the JSON loader refuses its JSON: {e}\n--- INI:\n{text}\n--- JSON:\n{printed}")
    });
    assert_eq!(back, calls, "INI:\n{text}\nJSON:\n{printed}");
    assert_eq!(ini::to_json(&back), doc);
    if !is_ini {
        // The loader would read this text as JSON: it must not be JSON it accepts
        // differently (an INI text without a section is empty or refused).
        assert!(
            calls.is_empty(),
            "INI calls from text the loader reads as JSON:\n{text}"
        );
    }
});
