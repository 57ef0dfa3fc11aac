//! The shape of a descriptor chain as a device sees it: a stream of device-readable bytes
//! followed by a stream of device-writable bytes, each made of guest-memory segments. A
//! request's parts (header, data, status) are byte ranges of those streams, whatever the
//! driver's framing (virtio 1.2, 2.7.4: devices must not assume a particular layout).

/// A contiguous piece of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Why a chain cannot be a virtio request at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The spec requires every device-readable descriptor before the device-writable ones.
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// Position of the offending descriptor in the chain.
        index: usize,
    },
}

/// The readable and writable streams of one chain. Zero-length descriptors are dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainLayout {
    /// Device-readable segments, in chain order.
    pub readable: Vec<Segment>,
    /// Device-writable segments, in chain order.
    pub writable: Vec<Segment>,
}

impl ChainLayout {
    /// Builds the layout from `(address, length, device_writable)` triples in chain order.
    pub fn from_descriptors<I>(descriptors: I) -> Result<Self, ChainError>
    where
        I: IntoIterator<Item = (u64, u32, bool)>,
    {
        let mut layout = ChainLayout::default();
        let mut seen_writable = false;
        for (index, (addr, len, writable)) in descriptors.into_iter().enumerate() {
            if writable {
                seen_writable = true;
            } else if seen_writable {
                return Err(ChainError::ReadableAfterWritable { index });
            }
            if len == 0 {
                continue;
            }
            let seg = Segment {
                addr,
                len: u64::from(len),
            };
            if writable {
                layout.writable.push(seg);
            } else {
                layout.readable.push(seg);
            }
        }
        Ok(layout)
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u64 {
        total_len(&self.writable)
    }
}

/// Sum of the segment lengths.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments
        .iter()
        .fold(0u64, |acc, s| acc.saturating_add(s.len))
}

/// The segments covering bytes `skip..skip + len` of the stream `segments` (fewer bytes if the
/// stream is shorter).
pub fn slice_segments(segments: &[Segment], skip: u64, len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut skip = skip;
    let mut want = len;
    for s in segments {
        if want == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let take = (s.len - skip).min(want);
        out.push(Segment {
            addr: s.addr.saturating_add(skip),
            len: take,
        });
        want -= take;
        skip = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u64) -> Segment {
        Segment { addr, len }
    }

    #[test]
    fn layout_splits_directions() {
        let l = ChainLayout::from_descriptors([
            (0x1000, 16, false),
            (0x2000, 0, false),
            (0x3000, 512, false),
            (0x4000, 1, true),
        ])
        .unwrap();
        assert_eq!(l.readable, vec![seg(0x1000, 16), seg(0x3000, 512)]);
        assert_eq!(l.writable, vec![seg(0x4000, 1)]);
        assert_eq!(l.readable_len(), 528);
        assert_eq!(l.writable_len(), 1);
    }

    #[test]
    fn layout_rejects_readable_after_writable() {
        let e = ChainLayout::from_descriptors([
            (0x1000, 16, false),
            (0x2000, 512, true),
            (0x3000, 1, false),
        ])
        .unwrap_err();
        assert_eq!(e, ChainError::ReadableAfterWritable { index: 2 });
    }

    #[test]
    fn slicing_crosses_segments() {
        let s = [seg(0x1000, 10), seg(0x2000, 6), seg(0x3000, 100)];
        assert_eq!(
            slice_segments(&s, 0, 16),
            vec![seg(0x1000, 10), seg(0x2000, 6)]
        );
        assert_eq!(slice_segments(&s, 16, 200), vec![seg(0x3000, 100)]);
        assert_eq!(
            slice_segments(&s, 8, 10),
            vec![seg(0x1008, 2), seg(0x2000, 6), seg(0x3000, 2)]
        );
        assert_eq!(slice_segments(&s, 115, 1), vec![seg(0x3063, 1)]);
        assert!(slice_segments(&s, 116, 1).is_empty());
        assert!(slice_segments(&s, 3, 0).is_empty());
        assert_eq!(total_len(&s), 116);
    }
}
