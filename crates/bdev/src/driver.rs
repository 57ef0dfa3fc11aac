//! The seam between the generic I/O channel and a device driver (virtio-blk,
//! virtio-scsi): a channel splits each I/O into [`Child`] requests, hands them to its
//! [`ChannelDriver`] and gets [`ChildDone`] records back. SPDK's split vocabulary: a
//! *parent* is the caller's I/O, its *children* are the device requests it became.

use std::sync::Arc;

use vireo_virtio::Segment;

use crate::error::{BdevError, IoError};
use crate::io::IoOp;

/// One request as the device sees it, after splitting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Child {
    /// Parent I/O slot in the channel.
    pub parent: u32,
    /// Operation.
    pub op: IoOp,
    /// First block.
    pub lba: u64,
    /// Blocks (0 for flush).
    pub blocks: u64,
    /// Device address of the data (read/write); with `sg`, the offset of the data in
    /// that list.
    pub addr: u64,
    /// Data bytes (read/write).
    pub len: u32,
    /// A vectored I/O's data, used in place: the caller's segments, in device
    /// addresses; this request carries bytes `[addr, addr+len)` of them. `None`: the
    /// data is one extent at `addr`.
    pub sg: Option<Arc<[Segment]>>,
    /// Write-zeroes: keep the blocks allocated ([`IoRequest::no_unmap`]).
    ///
    /// [`IoRequest::no_unmap`]: crate::IoRequest::no_unmap
    pub no_unmap: bool,
}

impl Child {
    /// A placeholder (an empty slot's record).
    pub const EMPTY: Child = Child {
        parent: 0,
        no_unmap: false,
        op: IoOp::Read,
        lba: 0,
        blocks: 0,
        addr: 0,
        len: 0,
        sg: None,
    };
}

impl Child {
    /// The request's data as device segments of at most `max_bytes` each (a long
    /// extent, or a long caller segment, becomes several), in order.
    pub fn data_segments(&self, max_bytes: u64, mut push: impl FnMut(Segment)) {
        let max_bytes = max_bytes.max(1);
        let mut piece = |mut addr: u64, mut left: u64| {
            while left > 0 {
                let n = left.min(max_bytes);
                push(Segment {
                    addr,
                    len: n as u32,
                });
                addr += n;
                left -= n;
            }
        };
        let Some(sg) = &self.sg else {
            piece(self.addr, self.len as u64);
            return;
        };
        // Bytes [addr, addr+len) of the list.
        let (mut skip, mut left) = (self.addr, self.len as u64);
        for s in sg.iter() {
            if left == 0 {
                break;
            }
            let l = s.len as u64;
            if skip >= l {
                skip -= l;
                continue;
            }
            let n = (l - skip).min(left);
            piece(s.addr + skip, n);
            skip = 0;
            left -= n;
        }
    }
}

/// A finished device request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChildDone {
    /// Parent I/O slot.
    pub parent: u32,
    /// Outcome. The error is boxed: a success is then 16 bytes in all, which moves
    /// from the driver to the channel in registers, not through a stack copy.
    pub result: Result<(), Box<IoError>>,
}

impl ChildDone {
    /// The outcome of one request of parent `parent`.
    #[inline]
    pub fn new(parent: u32, result: Result<(), IoError>) -> ChildDone {
        ChildDone {
            parent,
            result: result.map_err(Box::new),
        }
    }
}

/// The device-specific part of a channel: a request queue used by one thread.
pub(crate) trait ChannelDriver {
    /// Put a request on the ring (the driver keeps its own copy); `false` when the ring
    /// is full, and the caller keeps it to queue again later. Nothing is visible to the
    /// device until [`publish`](ChannelDriver::publish).
    ///
    /// By reference: the caller has just built the request, and reading its fields one
    /// by one where they are needed is cheap, where a by-value move read it back in wide
    /// words the narrow stores that built it cannot forward to (a stall per request).
    fn queue(&mut self, child: &Child) -> bool;
    /// Make queued requests visible; notify the device if it asks for it.
    fn publish(&mut self);
    /// Reap completions into `out`; returns how many. A broken device completes
    /// every in-flight request with an error.
    fn poll(&mut self, out: &mut Vec<ChildDone>) -> usize;
    /// Ask the device to signal the next completion on an eventfd: returns the fd and
    /// whether completions are already pending. `None`: the transport only polls.
    fn arm(&mut self) -> Option<(std::os::fd::RawFd, bool)> {
        None
    }
    /// Back to polling after [`arm`](ChannelDriver::arm).
    fn disarm(&mut self) {}
    /// The eventfd [`arm`](ChannelDriver::arm) would return, without arming.
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Ask the device to abort request `parent`'s commands (SCSI: ABORT TASK), waiting
    /// at most `timeout` for each answer. The device then gives them back (aborted).
    fn abort(&mut self, _parent: u32, _timeout: std::time::Duration) -> Result<(), IoError> {
        Err(IoError::Unsupported {
            op: "abort",
            bdev: String::new(),
        })
    }
    /// Reset the controller behind this channel's connection (see
    /// [`BdevDriver::reset_controller`]); nothing if that connection is already gone.
    fn reset_controller(&mut self) -> Result<(), IoError> {
        Err(IoError::Unsupported {
            op: "controller reset",
            bdev: String::new(),
        })
    }
}

/// A device driver's handle to the bdev's device.
pub(crate) trait BdevDriver: Send + Sync {
    /// Take a request queue for a new channel.
    fn open_channel(&self) -> Result<Box<dyn ChannelDriver>, BdevError>;

    /// Take a request queue that no other channel shares, for a channel that may move
    /// between threads.
    fn open_exclusive_channel(&self) -> Result<Box<dyn ChannelDriver + Send>, BdevError>;

    /// Reset the device behind the bdev (SCSI: LOGICAL UNIT RESET). Waits at most
    /// `timeout`.
    fn reset(&self, _timeout: std::time::Duration) -> Result<(), IoError> {
        Err(IoError::Unsupported {
            op: "reset",
            bdev: String::new(),
        })
    }

    /// Reset the controller behind the bdev, the last step for a device that stopped
    /// answering (vhost-user: drop the connection and reconnect; needs
    /// `reconnect_timeout`). Requests outstanding on it fail with [`IoError::Aborted`].
    fn reset_controller(&self) -> Result<(), IoError> {
        Err(IoError::Unsupported {
            op: "controller reset",
            bdev: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr, len }
    }

    fn segments(c: &Child, max: u64) -> Vec<(u64, u32)> {
        let mut v = Vec::new();
        c.data_segments(max, |s| v.push((s.addr, s.len)));
        v
    }

    #[test]
    fn one_extent_is_cut_at_the_segment_limit() {
        let c = Child {
            addr: 0x1000,
            len: 10_000,
            ..Child::EMPTY
        };
        assert_eq!(
            segments(&c, 4096),
            vec![(0x1000, 4096), (0x2000, 4096), (0x3000, 1808)]
        );
    }

    #[test]
    fn a_request_takes_its_byte_range_of_the_callers_segments() {
        let sg: Arc<[Segment]> = Arc::from(vec![
            seg(0x10_000, 1024),
            seg(0x20_000, 512),
            seg(0x30_000, 10_000),
        ]);
        // Bytes 1536.. 1536+4096 of the list: inside the third segment.
        let c = Child {
            addr: 1536,
            len: 4096,
            sg: Some(sg.clone()),
            ..Child::EMPTY
        };
        assert_eq!(segments(&c, 1 << 20), vec![(0x30_000, 4096)]);
        // Bytes 512..2560: the tail of the first, all of the second, the third's head.
        let c = Child {
            addr: 512,
            len: 2048,
            sg: Some(sg.clone()),
            ..Child::EMPTY
        };
        assert_eq!(
            segments(&c, 1 << 20),
            vec![(0x10_200, 512), (0x20_000, 512), (0x30_000, 1024)]
        );
        // A long caller segment is cut at the limit too.
        let c = Child {
            addr: 1536,
            len: 10_000,
            sg: Some(sg),
            ..Child::EMPTY
        };
        assert_eq!(
            segments(&c, 4096),
            vec![(0x30_000, 4096), (0x31_000, 4096), (0x32_000, 1808)]
        );
    }
}
