//! The checks every I/O passes before it reaches a device.

use crate::bdev::Bdev;
use crate::error::IoError;
use crate::io::{IoOp, IoRequest};

/// Whether `req` can go to `bdev`: supported, in range, with a buffer of its length.
///
/// Every I/O passes here, so the answer comes from branches only ([`acceptable`], inlined
/// into submit); the error, with its text, is built out of line ([`explain`]) for the
/// rare request that fails.
#[inline]
pub(crate) fn validate(bdev: &Bdev, req: &IoRequest) -> Result<(), IoError> {
    if acceptable(bdev, req) {
        Ok(())
    } else {
        Err(explain(bdev, req))
    }
}

/// The checks of [`validate`], as a yes or no.
#[inline]
pub(super) fn acceptable(bdev: &Bdev, req: &IoRequest) -> bool {
    let info = &bdev.info;
    let ops = &info.ops;
    let supported = ops.supports(req.op);
    if bdev.is_removed()
        || !supported
        || (info.read_only && req.op != IoOp::Read && req.op != IoOp::Flush)
    {
        return false;
    }
    if req.op == IoOp::Flush {
        return true;
    }
    match req.offset_blocks.checked_add(req.num_blocks) {
        Some(end) if req.num_blocks != 0 && end <= bdev.num_blocks() => {}
        _ => return false,
    }
    if !req.op.has_data() {
        return true;
    }
    let want = req.num_blocks as u128 * info.block_size as u128;
    if req.iov.is_empty() {
        matches!(&req.buf, Some(b) if b.len() as u128 == want)
    } else {
        req.buf.is_none() && req.iov.iter().map(|b| b.len() as u128).sum::<u128>() == want
    }
}

/// Why [`acceptable`] refused `req`: the first check it fails, in words.
#[cold]
#[inline(never)]
fn explain(bdev: &Bdev, req: &IoRequest) -> IoError {
    match check(bdev, req) {
        Err(error) => error,
        // The two functions disagree: a bug here, but the request is still refused.
        Ok(()) => IoError::InvalidRequest(format!(
            "{} at block {} of {} blocks was refused by a check that cannot say why",
            req.op.name(),
            req.offset_blocks,
            req.num_blocks
        )),
    }
}

/// The checks of [`validate`], each with its error.
pub(super) fn check(bdev: &Bdev, req: &IoRequest) -> Result<(), IoError> {
    let info = &bdev.info;
    let ops = &info.ops;
    if bdev.is_removed() {
        return Err(IoError::Removed(info.name.clone()));
    }
    let num_blocks = bdev.num_blocks();
    let supported = ops.supports(req.op);
    if info.read_only && req.op != IoOp::Read && req.op != IoOp::Flush {
        return Err(IoError::ReadOnly(info.name.clone()));
    }
    if !supported {
        return Err(IoError::Unsupported {
            op: req.op.name(),
            bdev: info.name.clone(),
        });
    }
    if req.op == IoOp::Flush {
        return Ok(());
    }
    if req.num_blocks == 0 {
        return Err(IoError::InvalidRequest(format!(
            "{} of zero blocks",
            req.op.name()
        )));
    }
    let end = req.offset_blocks.checked_add(req.num_blocks);
    match end {
        Some(end) if end <= num_blocks => {}
        _ => {
            return Err(IoError::OutOfRange {
                offset: req.offset_blocks,
                end: end.unwrap_or(u64::MAX),
                num_blocks,
            })
        }
    }
    if !req.op.has_data() {
        return Ok(());
    }
    let want = req.num_blocks as u128 * info.block_size as u128;
    if !req.iov.is_empty() {
        let have: u128 = req.iov.iter().map(|b| b.len() as u128).sum();
        if req.buf.is_some() || have != want {
            return Err(IoError::InvalidBuffer(format!(
                "vectored {} of {} blocks needs {} bytes in its segments and no `buf`; the {} segments have {}",
                req.op.name(),
                req.num_blocks,
                want,
                req.iov.len(),
                have
            )));
        }
        return Ok(());
    }
    match &req.buf {
        Some(b) if b.len() as u128 == want => Ok(()),
        Some(b) => Err(IoError::InvalidBuffer(format!(
            "{} of {} blocks needs {} bytes, the buffer has {}",
            req.op.name(),
            req.num_blocks,
            want,
            b.len()
        ))),
        None => Err(IoError::InvalidBuffer(format!(
            "{} without a buffer",
            req.op.name()
        ))),
    }
}
