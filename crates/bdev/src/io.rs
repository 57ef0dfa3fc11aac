//! Requests, buffers and completions of the bdev I/O path.

use vireo_virtio::DmaBuf;

use crate::error::IoError;

/// What an I/O does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Read blocks into the buffer.
    Read,
    /// Write the buffer to blocks.
    Write,
    /// Make written data durable.
    Flush,
    /// Discard (deallocate) blocks.
    Unmap,
    /// Write zeroes to blocks (the device may deallocate them).
    WriteZeroes,
}

impl IoOp {
    /// Name used in messages and statistics.
    pub fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Unmap => "unmap",
            IoOp::WriteZeroes => "write_zeroes",
        }
    }

    /// Whether the op moves data through a buffer.
    pub fn has_data(self) -> bool {
        matches!(self, IoOp::Read | IoOp::Write)
    }
}

/// A data buffer handed to the I/O path for the duration of one I/O.
#[derive(Debug)]
pub enum IoBuf {
    /// A buffer in DMA memory: used in place, no copy.
    Dma(DmaBuf),
    /// Ordinary memory: bounced through DMA memory.
    Heap(Vec<u8>),
    /// A caller's memory (the C API's buffers): used in place when it lies in memory
    /// shared with the device (`DmaMemory::add_external`), else bounced.
    Foreign(vireo_virtio::ForeignBuf),
}

impl IoBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            IoBuf::Dma(b) => b.len(),
            IoBuf::Heap(v) => v.len(),
            IoBuf::Foreign(b) => b.len(),
        }
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            IoBuf::Dma(b) => b.as_slice(),
            IoBuf::Heap(v) => v,
            IoBuf::Foreign(b) => b.as_slice(),
        }
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            IoBuf::Dma(b) => b.as_mut_slice(),
            IoBuf::Heap(v) => v,
            IoBuf::Foreign(b) => b.as_mut_slice(),
        }
    }
}

/// One I/O to submit on a channel.
#[derive(Debug)]
pub struct IoRequest {
    /// The operation.
    pub op: IoOp,
    /// First block.
    pub offset_blocks: u64,
    /// Number of blocks (0 for flush).
    pub num_blocks: u64,
    /// Data buffer for reads and writes: exactly `num_blocks * block_size` bytes.
    pub buf: Option<IoBuf>,
    /// Vectored data instead of `buf`: segments of any length that add up to
    /// `num_blocks * block_size` bytes, read into (scattered) or written from (gathered)
    /// in order. They go through one DMA bounce buffer (a copy); a single DMA `buf` is
    /// used in place.
    pub iov: Vec<IoBuf>,
    /// Returned unchanged in the completion.
    pub user_data: u64,
    /// Time limit of this I/O (default: the controller's `io_timeout`, if any). Past
    /// it the I/O completes with [`IoError::Timeout`] and
    /// *without* its buffer, which stays with the device until the device gives the
    /// request back (then it is dropped); the channel then escalates: a SCSI LUN gets
    /// a LOGICAL UNIT RESET once the request is still out after another period.
    pub timeout: Option<std::time::Duration>,
    /// Write-zeroes only: the blocks must stay allocated (libblkio's
    /// `BLKIO_REQ_NO_UNMAP`, Linux's `REQ_NOUNMAP`). By default the device may deallocate
    /// them where it says they then read back as zeros (virtio-blk
    /// `write_zeroes_may_unmap`, SCSI LBPRZ with WRITE SAME's UNMAP bit).
    pub no_unmap: bool,
}

impl IoRequest {
    /// A read of `num_blocks` blocks at `offset_blocks` into `buf`.
    pub fn read(offset_blocks: u64, num_blocks: u64, buf: IoBuf, user_data: u64) -> Self {
        IoRequest {
            op: IoOp::Read,
            offset_blocks,
            num_blocks,
            buf: Some(buf),
            iov: Vec::new(),
            user_data,
            timeout: None,
            no_unmap: false,
        }
    }

    /// A write of `buf` to `num_blocks` blocks at `offset_blocks`.
    pub fn write(offset_blocks: u64, num_blocks: u64, buf: IoBuf, user_data: u64) -> Self {
        IoRequest {
            op: IoOp::Write,
            offset_blocks,
            num_blocks,
            buf: Some(buf),
            iov: Vec::new(),
            user_data,
            timeout: None,
            no_unmap: false,
        }
    }

    /// A request without data (flush, unmap, write-zeroes).
    pub fn no_data(op: IoOp, offset_blocks: u64, num_blocks: u64, user_data: u64) -> Self {
        IoRequest {
            op,
            offset_blocks,
            num_blocks,
            buf: None,
            iov: Vec::new(),
            user_data,
            timeout: None,
            no_unmap: false,
        }
    }

    /// A vectored read of `num_blocks` blocks at `offset_blocks` into `iov`, in order.
    pub fn readv(offset_blocks: u64, num_blocks: u64, iov: Vec<IoBuf>, user_data: u64) -> Self {
        IoRequest {
            iov,
            ..IoRequest::no_data(IoOp::Read, offset_blocks, num_blocks, user_data)
        }
    }

    /// A vectored write of `iov`, in order, to `num_blocks` blocks at `offset_blocks`.
    pub fn writev(offset_blocks: u64, num_blocks: u64, iov: Vec<IoBuf>, user_data: u64) -> Self {
        IoRequest {
            iov,
            ..IoRequest::no_data(IoOp::Write, offset_blocks, num_blocks, user_data)
        }
    }

    /// The same request with the blocks kept allocated (see [`no_unmap`](Self::no_unmap)).
    pub fn with_no_unmap(mut self) -> Self {
        self.no_unmap = true;
        self
    }

    /// The same request with a time limit (see [`timeout`](Self::timeout)).
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A finished I/O.
#[derive(Debug)]
pub struct Completion {
    /// The request's `user_data`.
    pub user_data: u64,
    /// The operation.
    pub op: IoOp,
    /// Success or why it failed.
    pub result: Result<(), IoError>,
    /// The request's buffer, given back (with read data filled in).
    pub buf: Option<IoBuf>,
    /// The request's vectored buffers, given back (with read data filled in).
    pub iov: Vec<IoBuf>,
    /// Nanoseconds from submit to completion (0 for requests refused at submit).
    pub latency_ns: u64,
}

/// A request refused before it reached the device; the buffer is given back.
#[derive(Debug)]
pub struct Rejected {
    /// Why.
    pub error: IoError,
    /// The request's `user_data`.
    pub user_data: u64,
    /// The buffer.
    pub buf: Option<IoBuf>,
    /// The vectored buffers.
    pub iov: Vec<IoBuf>,
}

impl Rejected {
    /// `req` refused with `error`: its buffers go back to the caller.
    pub(crate) fn of(error: IoError, req: &mut IoRequest) -> Rejected {
        Rejected {
            error,
            user_data: req.user_data,
            buf: req.buf.take(),
            iov: std::mem::take(&mut req.iov),
        }
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Rejected {}

#[cfg(test)]
mod layout_tests {
    /// A completion is moved a few times on its way to the caller; at 128 bytes or
    /// less a move is a handful of stores, above it a call to memcpy (x86-64 baseline).
    #[test]
    fn a_completion_fits_in_128_bytes() {
        assert!(std::mem::size_of::<Option<super::IoBuf>>() <= 40);
        assert!(std::mem::size_of::<super::Completion>() <= 128);
        assert!(std::mem::size_of::<super::IoRequest>() <= 128);
    }
}
