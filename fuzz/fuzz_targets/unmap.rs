//! UNMAP parameter list: parse never panics and encode(parse(x)) parses back
//! equal; the initiator's list writer, driven by the same bytes, either
//! refuses a descriptor or writes a list that parses to what was pushed, and
//! `fill` splits a range within the limits it is given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_scsi::unmap::{unmap_list_len, UnmapLimits, UnmapListWriter};
use vireo_scsi::{UnmapDescriptor, UnmapParameterList};

fuzz_target!(|data: &[u8]| {
    if let Ok(list) = UnmapParameterList::parse(data) {
        let bytes = list.encode().expect("parsed list must encode");
        assert_eq!(UnmapParameterList::parse(&bytes).expect("re-parse"), list);
    }

    // Writer: first byte sizes the buffer, then (lba, blocks) pairs of 12 bytes.
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let mut buf = vec![0u8; unmap_list_len(usize::from(size) * 17)];
    let Ok(mut w) = UnmapListWriter::new(&mut buf) else {
        return;
    };
    let mut pushed = Vec::new();
    for c in rest.chunks_exact(12) {
        let lba = u64::from_be_bytes(c[..8].try_into().unwrap());
        // Spread block counts over and past the 32-bit limit.
        let blocks = u64::from(u32::from_be_bytes(c[8..].try_into().unwrap())) << (c[8] & 1);
        let room = w.remaining();
        match w.push(lba, blocks) {
            Ok(()) => pushed.push(UnmapDescriptor {
                lba,
                blocks: u32::try_from(blocks).expect("writer accepted > u32"),
            }),
            Err(_) => assert!(
                blocks > u64::from(u32::MAX) || lba.checked_add(blocks).is_none() || room == 0
            ),
        }
    }
    let len = usize::from(w.finish());
    assert_eq!(len, unmap_list_len(pushed.len()));
    let parsed = UnmapParameterList::parse(&buf[..len]).expect("writer output parses");
    assert_eq!(parsed.descriptors, pushed);

    // fill: one command's worth of a range, within limits taken from the input.
    let Some(c) = rest.first_chunk::<20>() else {
        return;
    };
    let lba = u64::from_be_bytes(c[..8].try_into().unwrap());
    let blocks = u64::from_be_bytes(c[8..16].try_into().unwrap());
    let limits = UnmapLimits {
        max_blocks: u64::from(u16::from_be_bytes([c[16], c[17]])) << (c[18] & 63),
        max_descriptors: usize::from(c[19]),
    };
    let mut buf = vec![0u8; unmap_list_len(usize::from(size))];
    let Ok(mut w) = UnmapListWriter::new(&mut buf) else {
        return;
    };
    match w.fill(lba, blocks, &limits) {
        Ok(done) => {
            assert!(done <= blocks);
            assert!(done <= limits.max_blocks);
            assert_eq!(w.blocks(), done);
            assert!(w.len() <= limits.max_descriptors);
            let len = usize::from(w.finish());
            let list = UnmapParameterList::parse(&buf[..len]).expect("fill output parses");
            assert_eq!(list.total_blocks(), done);
            let mut next = lba;
            for d in &list.descriptors {
                assert_eq!(d.lba, next);
                assert!(d.blocks > 0);
                next += u64::from(d.blocks);
            }
        }
        Err(_) => assert!(lba.checked_add(blocks).is_none()),
    }
});
