//! Errors of the virtio core.

use std::io;

/// Errors from DMA memory, virtqueues and transports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// memfd_create failed.
    #[error("cannot create DMA memory region of {size} bytes (memfd_create{hint}): {source}")]
    MemfdCreate {
        /// Requested size.
        size: usize,
        /// Extra hint (hugetlb).
        hint: &'static str,
        /// OS error.
        source: io::Error,
    },
    /// ftruncate of the memfd failed.
    #[error("cannot size DMA memory region to {size} bytes: {source} (with hugepages, reserve enough: /proc/sys/vm/nr_hugepages)")]
    MemfdSize {
        /// Requested size.
        size: usize,
        /// OS error.
        source: io::Error,
    },
    /// mmap of a region failed.
    #[error("cannot map DMA memory region of {size} bytes: {source}{hint}")]
    Mmap {
        /// Requested size.
        size: usize,
        /// Extra hint (hugetlb).
        hint: &'static str,
        /// OS error.
        source: io::Error,
    },
    /// The allocator could not satisfy a request and may not grow.
    #[error("DMA memory exhausted: cannot allocate {size} bytes (limit {limit} bytes; raise the memory limit)")]
    OutOfMemory {
        /// Requested size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// Physical addresses (for a device without an IOMMU) are not available.
    #[error("physical DMA addressing: {0}")]
    Physical(String),
    /// A request was malformed (zero or huge size, bad alignment).
    #[error("invalid DMA allocation: {0}")]
    InvalidAllocation(String),
    /// A listener (transport) refused a new region.
    #[error("transport refused new DMA region: {0}")]
    RegionRejected(String),
    /// Memory a caller wants to share cannot be shared as given.
    #[error("cannot share the memory region: {0}")]
    ExternalRegion(String),
    /// Bad virtqueue parameters.
    #[error("invalid virtqueue: {0}")]
    InvalidQueue(String),
    /// The device did something the spec forbids.
    #[error("device error: {0} (the controller is marked failed; detach and re-attach it)")]
    Device(String),
    /// The back-end refused a queue size (vhost-user has no way to ask for the largest).
    #[error("the back-end refused {size} descriptors for queue {index}: {cause}")]
    QueueSizeRefused {
        /// Queue index.
        index: u16,
        /// Size asked for.
        size: u16,
        /// What the back-end said.
        cause: String,
    },
    /// Feature negotiation failed.
    #[error("feature negotiation failed: {0}")]
    Features(String),
    /// The back-end's listen queue stayed full until the deadline: it does not accept
    /// connections (frozen, or serving another front-end and deaf to the next).
    #[error("the back-end at {} did not accept the connection within {}: its listen queue is full; it may be serving another front-end (qemu-storage-daemon and vhost-device-scsi accept one front-end at a time), or it is frozen", path.display(), crate::unix::secs(*timeout))]
    NotAccepting {
        /// The socket.
        path: std::path::PathBuf,
        /// How long vireo waited.
        timeout: std::time::Duration,
    },
    /// Transport-level failure (socket, protocol).
    #[error("{context}: {source}")]
    Transport {
        /// What we were doing.
        context: String,
        /// Underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An I/O error of an eventfd or similar.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// OS error.
        source: io::Error,
    },
}

/// Result alias of the virtio core.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wrap an error of a transport with context.
    pub fn transport<E: std::error::Error + Send + Sync + 'static>(
        context: impl Into<String>,
        source: E,
    ) -> Self {
        Error::Transport {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// Wrap an OS error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
