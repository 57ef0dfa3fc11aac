//! Splitting: one I/O becomes device requests ([`Child`]) within the device's limits.

use std::sync::Arc;

use vireo_virtio::Segment;

use crate::bdev::Limits;
use crate::driver::Child;
use crate::io::IoOp;

/// The device requests of one I/O, in LBA order. A flush is one request of no blocks.
#[derive(Debug, Clone)]
pub(crate) struct Split {
    parent: u32,
    op: IoOp,
    lba: u64,
    left: u64,
    addr: u64,
    per_child: u64,
    block_size: u64,
    flush_done: bool,
    /// The data in place, as segments (`addr` is then an offset in them).
    sg: Option<Arc<[Segment]>>,
    no_unmap: bool,
}

/// The largest request of `op` the device takes, in blocks (at least 1).
#[inline(always)]
pub(crate) fn blocks_per_request(op: IoOp, limits: &Limits) -> u64 {
    match op {
        IoOp::Read | IoOp::Write => limits.max_rw_blocks,
        IoOp::Unmap => limits.max_unmap_blocks,
        IoOp::WriteZeroes => limits.max_write_zeroes_blocks,
        IoOp::Flush => 0,
    }
    .max(1)
}

/// Split I/O `parent` (`op` of `blocks` at `lba`, data at device address `addr`, or at
/// offset `addr` of the segments `sg`) into requests within `limits`.
#[inline(always)]
pub(crate) fn split(
    parent: u32,
    op: IoOp,
    lba: u64,
    blocks: u64,
    (addr, sg): (u64, Option<Arc<[Segment]>>),
    block_size: u32,
    limits: &Limits,
) -> Split {
    Split {
        parent,
        op,
        lba,
        left: blocks,
        addr,
        per_child: blocks_per_request(op, limits),
        block_size: block_size as u64,
        flush_done: false,
        sg,
        no_unmap: false,
    }
}

impl Split {
    /// Children that keep the blocks allocated (write-zeroes with `no_unmap`).
    #[inline(always)]
    pub(crate) fn no_unmap(mut self, on: bool) -> Self {
        self.no_unmap = on;
        self
    }
}

impl Iterator for Split {
    type Item = Child;

    #[inline(always)]
    fn next(&mut self) -> Option<Child> {
        if self.op == IoOp::Flush {
            if self.flush_done {
                return None;
            }
            self.flush_done = true;
            return Some(Child {
                parent: self.parent,
                op: IoOp::Flush,
                lba: 0,
                blocks: 0,
                addr: 0,
                len: 0,
                sg: None,
                no_unmap: false,
            });
        }
        if self.left == 0 {
            return None;
        }
        let n = self.left.min(self.per_child);
        let data = self.op.has_data();
        let child = Child {
            parent: self.parent,
            op: self.op,
            lba: self.lba,
            blocks: n,
            addr: if data { self.addr } else { 0 },
            len: if data {
                (n * self.block_size) as u32
            } else {
                0
            },
            sg: if data { self.sg.clone() } else { None },
            no_unmap: self.no_unmap,
        };
        self.lba += n;
        self.left -= n;
        if data {
            self.addr += n * self.block_size;
        }
        Some(child)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_rw_blocks: 8,
            max_unmap_blocks: 100,
            max_write_zeroes_blocks: 0,
            ..Limits::default()
        }
    }

    #[test]
    fn a_read_within_the_limit_is_one_request() {
        let c: Vec<Child> = split(3, IoOp::Read, 10, 8, (0x1000, None), 512, &limits()).collect();
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].parent, c[0].lba, c[0].blocks, c[0].addr, c[0].len),
            (3, 10, 8, 0x1000, 4096)
        );
    }

    #[test]
    fn a_long_write_is_split_at_max_rw_blocks_with_addresses_following() {
        let c: Vec<Child> =
            split(1, IoOp::Write, 5, 20, (0x10000, None), 4096, &limits()).collect();
        let got: Vec<(u64, u64, u64, u32)> =
            c.iter().map(|c| (c.lba, c.blocks, c.addr, c.len)).collect();
        assert_eq!(
            got,
            vec![
                (5, 8, 0x10000, 32768),
                (13, 8, 0x18000, 32768),
                (21, 4, 0x20000, 16384)
            ]
        );
    }

    #[test]
    fn a_vectored_io_in_place_gives_each_request_its_offset_in_the_segments() {
        let sg: Arc<[Segment]> = Arc::from(vec![Segment {
            addr: 0x9000,
            len: 81920,
        }]);
        let c: Vec<Child> = split(
            1,
            IoOp::Write,
            5,
            20,
            (0, Some(sg.clone())),
            4096,
            &limits(),
        )
        .collect();
        let got: Vec<(u64, u64, u32)> = c.iter().map(|c| (c.lba, c.addr, c.len)).collect();
        assert_eq!(
            got,
            vec![(5, 0, 32768), (13, 32768, 32768), (21, 65536, 16384)]
        );
        assert!(c
            .iter()
            .all(|c| c.sg.as_ref().is_some_and(|s| Arc::ptr_eq(s, &sg))));
    }

    #[test]
    fn unmap_uses_its_own_limit_and_carries_no_data() {
        let c: Vec<Child> = split(0, IoOp::Unmap, 0, 250, (0xdead, None), 512, &limits()).collect();
        assert_eq!(
            c.iter().map(|c| c.blocks).collect::<Vec<_>>(),
            vec![100, 100, 50]
        );
        assert!(c.iter().all(|c| c.addr == 0 && c.len == 0));
    }

    #[test]
    fn a_zero_limit_means_one_block_per_request() {
        let c: Vec<Child> = split(0, IoOp::WriteZeroes, 7, 3, (0, None), 512, &limits()).collect();
        assert_eq!(c.iter().map(|c| c.lba).collect::<Vec<_>>(), vec![7, 8, 9]);
    }

    #[test]
    fn a_flush_is_one_request_of_no_blocks() {
        let c: Vec<Child> = split(9, IoOp::Flush, 0, 0, (0, None), 512, &limits()).collect();
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].op, c[0].blocks, c[0].parent), (IoOp::Flush, 0, 9));
    }
}
