//! Bounce buffers: DMA memory for data the device cannot address in place (a heap
//! buffer, a vectored request), pooled by size class so the I/O path reuses them.

use std::sync::Arc;

use vireo_virtio::{DmaBuf, DmaMemory};

use crate::error::IoError;
use crate::io::IoBuf;

/// Buffers kept per size class; more are freed.
const KEPT_PER_CLASS: usize = 256;

/// Bounce buffers by size class (powers of two from 4 KiB).
#[derive(Default)]
pub(crate) struct BouncePool {
    classes: Vec<Vec<DmaBuf>>,
}

/// The size class of `len` bytes: 0 for up to 4 KiB, then one per power of two.
pub(crate) fn size_class(len: usize) -> usize {
    (len.max(4096).next_power_of_two().trailing_zeros() - 12) as usize
}

impl BouncePool {
    /// A buffer of at least `len` bytes: a pooled one, or a new one from `mem`.
    pub(crate) fn take(&mut self, mem: &Arc<DmaMemory>, len: usize) -> Result<DmaBuf, IoError> {
        let class = size_class(len);
        if let Some(b) = self.classes.get_mut(class).and_then(Vec::pop) {
            return Ok(b);
        }
        mem.alloc(4096usize << class, 4096)
            .map_err(|e| IoError::NoMemory(e.to_string()))
    }

    /// Give `b` back for reuse (freed when its class is full).
    pub(crate) fn give(&mut self, b: DmaBuf) {
        let class = size_class(b.len());
        if self.classes.len() <= class {
            self.classes.resize_with(class + 1, Vec::new);
        }
        if self.classes[class].len() < KEPT_PER_CLASS {
            self.classes[class].push(b);
        }
    }

    /// Buffers pooled now (for tests).
    #[cfg(test)]
    pub(crate) fn pooled(&self) -> usize {
        self.classes.iter().map(Vec::len).sum()
    }
}

/// Copy the segments of a vectored write into `b`, one after the other.
pub(crate) fn gather(b: &mut DmaBuf, segs: &[IoBuf]) {
    let mut at = 0;
    for seg in segs {
        let n = seg.len();
        b.as_mut_slice()[at..at + n].copy_from_slice(seg.as_slice());
        at += n;
    }
}

/// Copy what a read left in `b` to the caller's buffer and segments.
pub(crate) fn scatter(b: &DmaBuf, buf: Option<&mut IoBuf>, iov: &mut [IoBuf]) {
    if let Some(buf) = buf {
        let n = buf.len();
        buf.as_mut_slice().copy_from_slice(&b.as_slice()[..n]);
    }
    let mut at = 0;
    for seg in iov.iter_mut() {
        let n = seg.len();
        seg.as_mut_slice()
            .copy_from_slice(&b.as_slice()[at..at + n]);
        at += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_are_powers_of_two_from_4k() {
        assert_eq!(size_class(0), 0);
        assert_eq!(size_class(1), 0);
        assert_eq!(size_class(4096), 0);
        assert_eq!(size_class(4097), 1);
        assert_eq!(size_class(8192), 1);
        assert_eq!(size_class(1 << 20), 8);
    }
}
