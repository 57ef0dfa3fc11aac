//! Failures of C API calls: a negative errno for the caller and a message for
//! `blkio_get_error_msg()`, kept per thread.

use std::cell::RefCell;
use std::ffi::CString;

use vireo_bdev::{BdevError, ErrorKind, IoError};

/// A failed call: the errno it returns (positive here, negated at the boundary) and why.
#[derive(Debug, Clone)]
pub struct Fail {
    /// `libc::E*`.
    pub errno: i32,
    /// What went wrong and what to do.
    pub msg: String,
}

/// The result of a C API call.
pub type Res<T> = Result<T, Fail>;

impl Fail {
    /// A failure with `errno` and a message.
    pub fn new(errno: i32, msg: impl Into<String>) -> Fail {
        Fail {
            errno,
            msg: msg.into(),
        }
    }
}

/// `-EINVAL` with a message.
pub fn invalid(msg: impl Into<String>) -> Fail {
    Fail::new(libc::EINVAL, msg)
}

/// `-EBUSY`: the call or property does not fit the instance's state.
pub fn busy(msg: impl Into<String>) -> Fail {
    Fail::new(libc::EBUSY, msg)
}

thread_local! {
    static MESSAGE: RefCell<CString> = RefCell::new(CString::default());
}

/// Remember `msg` as this thread's last error message.
pub fn set_message(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    MESSAGE.with(|m| *m.borrow_mut() = c);
}

/// This thread's last message; valid until the thread's next failing call.
pub fn message_ptr() -> *const libc::c_char {
    MESSAGE.with(|m| m.borrow().as_ptr())
}

/// The errno a bdev-layer failure maps to.
pub fn errno_of_kind(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::InvalidInput => libc::EINVAL,
        ErrorKind::Unsupported => libc::ENOTSUP,
        ErrorKind::NotFound => libc::ENOENT,
        ErrorKind::AlreadyExists => libc::EEXIST,
        ErrorKind::Busy => libc::EBUSY,
        ErrorKind::TimedOut => libc::ETIMEDOUT,
        ErrorKind::OutOfMemory => libc::ENOMEM,
        ErrorKind::Disconnected => libc::ENOTCONN,
        _ => libc::EIO,
    }
}

/// The errno of a failed request, as libblkio reports them.
pub fn errno_of_io(e: &IoError) -> i32 {
    match e {
        IoError::ReadOnly(_) => libc::EBADF,
        IoError::Removed(_) => libc::ENODEV,
        IoError::Aborted(_) => libc::ECANCELED,
        IoError::Device | IoError::Sense { .. } | IoError::Scsi(_) => libc::EIO,
        e => errno_of_kind(e.kind()),
    }
}

impl From<BdevError> for Fail {
    fn from(e: BdevError) -> Fail {
        Fail::new(errno_of_kind(e.kind()), e.to_string())
    }
}
