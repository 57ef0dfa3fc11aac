//! Errors of the bdev layer.

use vireo_virtio::Error as VirtioError;

/// What kind of failure an error is, for callers that decide what to do next (retry,
/// give up on the device, fix the request) without matching messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request (or configuration) is wrong: fix it, do not retry.
    InvalidInput,
    /// The bdev or device cannot do this operation.
    Unsupported,
    /// The device reported a failure of this I/O (media error, SCSI sense, status).
    Device,
    /// The device did not answer in time.
    TimedOut,
    /// The back-end or PCI function is gone.
    Disconnected,
    /// The controller broke the protocol and was marked failed.
    ControllerFailed,
    /// No memory (DMA memory for a bounce buffer, queue slots).
    OutOfMemory,
    /// A name is unknown.
    NotFound,
    /// A name is already taken.
    AlreadyExists,
    /// Every request queue is in use.
    Busy,
    /// Anything else (transport set-up, an OS error).
    Other,
}

impl IoError {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            IoError::Unsupported { .. } | IoError::DeviceUnsupported => ErrorKind::Unsupported,
            IoError::OutOfRange { .. }
            | IoError::ReadOnly(_)
            | IoError::InvalidBuffer(_)
            | IoError::InvalidRequest(_) => ErrorKind::InvalidInput,
            IoError::Device | IoError::Sense { .. } | IoError::Scsi(_) => ErrorKind::Device,
            IoError::ControllerFailed(_) => ErrorKind::ControllerFailed,
            IoError::Disconnected | IoError::Removed(_) | IoError::ReconnectFailed(_) => {
                ErrorKind::Disconnected
            }
            IoError::Timeout(_) | IoError::Aborted(_) => ErrorKind::TimedOut,
            IoError::NoMemory(_) => ErrorKind::OutOfMemory,
        }
    }
}

impl BdevError {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BdevError::WrongDeviceType { .. } | BdevError::Config(_) => ErrorKind::InvalidInput,
            BdevError::Virtio {
                source: VirtioError::NotAccepting { .. },
                ..
            } => ErrorKind::TimedOut,
            BdevError::Virtio { .. } | BdevError::QueueSetup { .. } => ErrorKind::Other,
            BdevError::BadDevice { .. } => ErrorKind::ControllerFailed,
            BdevError::Unsatisfiable { .. }
            | BdevError::TooFewQueues { .. }
            | BdevError::QueueSizeRefused { .. } => ErrorKind::Unsupported,
            BdevError::NoFreeQueue { .. } | BdevError::ControllerBusy { .. } => ErrorKind::Busy,
            BdevError::NameTaken(_)
            | BdevError::NameHeld { .. }
            | BdevError::Attaching(_)
            | BdevError::PciFunctionInUse { .. } => ErrorKind::AlreadyExists,
            BdevError::NotFound(_) => ErrorKind::NotFound,
            BdevError::Io { source, .. } => source.kind(),
            BdevError::Failed(_) => ErrorKind::ControllerFailed,
        }
    }
}

/// Why one I/O failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The bdev does not support the operation.
    #[error("{op} is not supported by bdev {bdev}")]
    Unsupported {
        /// Operation name.
        op: &'static str,
        /// Bdev name.
        bdev: String,
    },
    /// The range lies (partly) beyond the end of the bdev.
    #[error("blocks {offset}..{end} are beyond the end of the bdev ({num_blocks} blocks)")]
    OutOfRange {
        /// First block.
        offset: u64,
        /// One past the last block.
        end: u64,
        /// Size of the bdev.
        num_blocks: u64,
    },
    /// A write to a read-only bdev.
    #[error("bdev {0} is read-only")]
    ReadOnly(String),
    /// The buffer does not match the request.
    #[error("invalid buffer: {0}")]
    InvalidBuffer(String),
    /// A zero-length or otherwise malformed request.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The device reported a media or transport error (virtio-blk `IOERR`).
    #[error("device reported an I/O error")]
    Device,
    /// The device said it does not support the request (virtio-blk `UNSUPP`).
    #[error("device does not support the request")]
    DeviceUnsupported,
    /// A SCSI command failed with CHECK CONDITION.
    #[error("SCSI check condition: sense key {key:#x}, ASC {asc:#04x}, ASCQ {ascq:#04x}")]
    Sense {
        /// Sense key.
        key: u8,
        /// Additional sense code.
        asc: u8,
        /// Additional sense code qualifier.
        ascq: u8,
    },
    /// A SCSI or virtio-scsi status that is not success.
    #[error("SCSI failure: {0}")]
    Scsi(String),
    /// The device broke the protocol; the controller is marked failed.
    #[error("controller failed: {0}")]
    ControllerFailed(String),
    /// The back-end went away.
    #[error("controller disconnected (the back-end closed the connection or the PCI function was removed)")]
    Disconnected,
    /// The device was hot-removed.
    #[error("bdev {0} was removed (the device is gone)")]
    Removed(String),
    /// The device did not answer in time.
    #[error("{0} timed out")]
    Timeout(String),
    /// No DMA memory for a bounce buffer.
    #[error("no DMA memory for a bounce buffer: {0}")]
    NoMemory(String),
    /// The back-end went away and reconnection failed (the message says why).
    #[error("{0}")]
    ReconnectFailed(String),
    /// The request was outstanding when vireo reset the controller of a device that
    /// stopped answering; the device may still hold its buffer, which is not given back.
    #[error("aborted by a controller reset: {0}")]
    Aborted(String),
}

impl BdevError {
    /// Wrap an error of queue setup (SET_VRING_* or the start of the device).
    pub fn queue_setup(name: &str, size: u16, source: VirtioError) -> BdevError {
        match source {
            VirtioError::QueueSizeRefused { size, .. } => BdevError::QueueSizeRefused {
                name: name.to_string(),
                size,
            },
            e @ (VirtioError::Transport { .. } | VirtioError::Io { .. }) => BdevError::QueueSetup {
                name: name.to_string(),
                size,
                cause: e.to_string(),
            },
            source => BdevError::Virtio {
                name: name.to_string(),
                source,
            },
        }
    }

    /// Wrap a virtio error of controller `name`.
    pub fn virtio(name: &str, source: VirtioError) -> BdevError {
        match source {
            VirtioError::QueueSizeRefused { size, .. } => BdevError::QueueSizeRefused {
                name: name.to_string(),
                size,
            },
            source => BdevError::Virtio {
                name: name.to_string(),
                source,
            },
        }
    }
}

/// Errors attaching controllers, opening channels and loading configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BdevError {
    /// The device did not behave like the `dev_type` asked for; it may be the other type
    /// (vhost-user does not tell the device type, so this is the likely explanation).
    #[error("{source} (the device does not behave like a virtio-{asked} device: if {traddr} serves a virtio-{other} device, set \"dev_type\": \"{other}\")")]
    WrongDeviceType {
        /// What failed.
        source: Box<BdevError>,
        /// The type asked for.
        asked: &'static str,
        /// The other type.
        other: &'static str,
        /// The socket or address.
        traddr: String,
    },
    /// The transport or ring failed.
    #[error("controller {name}: {source}")]
    Virtio {
        /// Controller name.
        name: String,
        /// Cause.
        source: VirtioError,
    },
    /// The device's answers make no sense.
    #[error("controller {name}: invalid device configuration: {reason}")]
    BadDevice {
        /// Controller name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The device cannot do what the configuration asks.
    #[error("controller {name}: {reason}")]
    Unsatisfiable {
        /// Controller name.
        name: String,
        /// What is missing.
        reason: String,
    },
    /// `vq_count` asks for more request queues than the device offers.
    #[error("controller {name}: vq_count={asked} request queues asked for, but the device offers {offered}{detail}")]
    TooFewQueues {
        /// Controller name.
        name: String,
        /// `vq_count`.
        asked: u16,
        /// Request queues the device offers.
        offered: u16,
        /// Where the number comes from and what to do, from ", " or "; " on.
        detail: String,
    },
    /// The back-end refused the queue size.
    #[error("controller {name}: the back-end refused queue size {size}; set a smaller vq_size (e.g. 128)")]
    QueueSizeRefused {
        /// Controller name.
        name: String,
        /// Refused size.
        size: u16,
    },
    /// The back-end failed or hung up while queues were being set up.
    #[error("controller {name}: setting up queues of {size} descriptors failed ({cause}); if the back-end limits queue sizes, set a smaller vq_size (e.g. 128)")]
    QueueSetup {
        /// Controller name.
        name: String,
        /// Queue size in use.
        size: u16,
        /// What failed.
        cause: String,
    },
    /// Every queue is taken by a channel.
    #[error(
        "bdev {bdev}: all {queues} request queues are in use by other channels (raise vq_count)"
    )]
    NoFreeQueue {
        /// Bdev name.
        bdev: String,
        /// Queues of the controller.
        queues: usize,
    },
    /// A controller cannot be detached while I/O channels are open on it.
    #[error("controller {name} still has {open} open I/O channels (close them first: disconnect the NBD clients of its bdevs, or stop their exports with nbd_stop_disk and ublk_stop_disk)")]
    ControllerBusy {
        /// Controller name.
        name: String,
        /// Channels open.
        open: u64,
    },
    /// A name is taken.
    #[error("a controller or bdev named {0} already exists")]
    NameTaken(String),
    /// The PCI function is attached (or being attached) as another controller: opening
    /// it again would reset the device under that controller's I/O.
    #[error("controller {name}: PCI function {addr} is already attached as controller {holder}; detach {holder} first")]
    PciFunctionInUse {
        /// The controller being attached.
        name: String,
        /// The function.
        addr: String,
        /// The controller that has it.
        holder: String,
    },
    /// A name the controller needs (its own, or one of its bdevs') is held by another
    /// controller: two bdevs of one name would send I/O to the wrong disk.
    #[error("controller {controller}: the name {name} is taken by {held}; controller and bdev names are unique across all controllers (a scsi controller C names its bdevs Ct<target> and Ct<target>l<lun>): attach {controller} under another name, or detach {holder} first")]
    NameHeld {
        /// The controller that needs the name.
        controller: String,
        /// The name.
        name: String,
        /// What has it ("bdev X of controller Y", "controller Y").
        held: String,
        /// The controller that has it.
        holder: String,
    },
    /// Another request is attaching a controller of this name.
    #[error("controller {0} is being attached by another request (connecting to a back-end that does not answer takes up to the control-plane deadline); try again once that attach has finished")]
    Attaching(String),
    /// Nothing of that name.
    #[error("no controller or bdev named {0}")]
    NotFound(String),
    /// A configuration file or RPC parameter is wrong.
    #[error("{0}")]
    Config(String),
    /// An I/O during bring-up failed.
    #[error("controller {name}: {what}: {source}")]
    Io {
        /// Controller name.
        name: String,
        /// What was being done.
        what: String,
        /// Cause.
        source: IoError,
    },
    /// The controller exists but is not usable.
    #[error("controller {0} has failed; detach and re-attach it")]
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_let_callers_decide_without_matching_messages() {
        assert_eq!(IoError::Disconnected.kind(), ErrorKind::Disconnected);
        assert_eq!(
            IoError::ReadOnly("b".into()).kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            IoError::Sense {
                key: 3,
                asc: 0x11,
                ascq: 0
            }
            .kind(),
            ErrorKind::Device
        );
        let e = BdevError::Io {
            name: "c".into(),
            what: "scan".into(),
            source: IoError::Timeout("INQUIRY".into()),
        };
        assert_eq!(e.kind(), ErrorKind::TimedOut);
        assert_eq!(
            BdevError::NameTaken("x".into()).kind(),
            ErrorKind::AlreadyExists
        );
    }
}
