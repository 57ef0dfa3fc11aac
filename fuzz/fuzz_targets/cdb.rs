//! CDB decoding (target side): parse never panics; the encoded command parses
//! back equal; every error yields sense data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_scsi::{Cdb, Command};

fuzz_target!(|data: &[u8]| {
    if let Ok(cdb) = Cdb::from_slice(data) {
        assert_eq!(cdb.as_bytes(), data);
    }
    match Command::parse(data) {
        Ok(cmd) => {
            let cdb = cmd.to_cdb();
            assert_eq!(cdb.opcode(), cmd.opcode());
            let _ = (cmd.name(), cmd.direction());
            assert_eq!(Command::parse(cdb.as_bytes()).expect("re-parse"), cmd);
        }
        Err(e) => {
            let sense = e.sense();
            assert!(sense.is_illegal_request());
            let _ = (e.to_string(), sense.to_fixed());
        }
    }
});
