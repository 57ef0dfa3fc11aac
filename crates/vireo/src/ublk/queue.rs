//! One ublk queue on one thread: its io_uring of `FETCH_REQ` / `COMMIT_AND_FETCH_REQ`
//! commands on `/dev/ublkcN`, its bdev channel, its buffers. A request is fetched,
//! submitted to the channel, completed and committed on this thread; the thread sleeps
//! in the ring, which also polls the channel's completion eventfd and a kick eventfd.
//!
//! Data: each tag's buffer is a DMA buffer of the bdev, given to the
//! kernel as the tag's address, so the kernel copies a write's data straight into
//! memory the device reads, and a read's data straight out of memory the device wrote
//! (no bounce in vireo).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use vireo_bdev::{Bdev, Completion, IoBuf, IoError, IoOp, IoRequest};
use vireo_virtio::ForeignBuf;

use super::sys::{self, IoCmd, IoDesc};

/// What a queue thread needs.
pub struct QueueSpec {
    /// The device's char device (`/dev/ublkcN`).
    pub cdev: Arc<File>,
    /// Queue id.
    pub q_id: u16,
    /// Tags.
    pub depth: u16,
    /// Bytes of each tag's buffer.
    pub max_io: usize,
    /// The bdev served.
    pub bdev: Arc<Bdev>,
    /// Set to end the thread (then `kick` is written).
    pub stop: Arc<AtomicBool>,
    /// Wakes the thread.
    pub kick: Arc<OwnedFd>,
}

/// A new eventfd for waking a queue thread.
pub fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd returned is checked and then owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wake the thread waiting on `fd`.
pub fn kick(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
}

fn drain(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// The queue's request descriptors, mapped read-only from the char device.
struct Descs {
    ptr: NonNull<IoDesc>,
    len: usize,
    depth: u16,
}

impl Descs {
    fn map(cdev: &File, q_id: u16, depth: u16) -> std::io::Result<Descs> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (depth as usize * std::mem::size_of::<IoDesc>()).div_ceil(page) * page;
        let off = sys::CMD_BUF_OFFSET + q_id as i64 * sys::MAX_CMD_BUF_BYTES;
        // SAFETY: a fresh shared read-only mapping of the driver's descriptor array;
        // the result is checked before use and unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Descs {
            ptr: NonNull::new(p as *mut IoDesc).expect("mmap returned a non-null address"),
            len,
            depth,
        })
    }

    /// The descriptor of `tag`, as the driver wrote it before completing its fetch.
    fn get(&self, tag: u16) -> IoDesc {
        assert!(tag < self.depth);
        // SAFETY: `tag` is within the mapped array (checked above); the driver wrote
        // it before completing the fetch we are handling and does not change it
        // until we commit.
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(tag as usize)) }
    }
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

const POLL_CHANNEL: u64 = 1 << 32;
const POLL_KICK: u64 = (1 << 32) + 1;
/// Spin this long after the last progress before sleeping in the ring.
const SPIN: Duration = Duration::from_micros(50);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// A fetch is with the driver.
    Fetching,
    /// A request is with the bdev; its success result.
    Busy(i32),
    /// The driver gave the tag up (device stopping).
    Gone,
}

/// The queue thread's state.
struct Queue {
    spec: QueueSpec,
    ring: IoUring,
    descs: Descs,
    /// Each tag's buffer (its address in this process).
    addrs: Vec<u64>,
    tags: Vec<Tag>,
    gone: usize,
    block_size: u64,
}

/// Set the queue up (channel, buffers, descriptors, ring, a fetch per tag), report on
/// `ready`, then serve until the driver aborts every tag or `stop` is set.
pub fn run(spec: QueueSpec, ready: std::sync::mpsc::Sender<Result<(), String>>) {
    let name = format!("{} queue {}", spec.bdev.name(), spec.q_id);
    let mut ch = match spec.bdev.open_channel() {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("{name}: cannot open a channel: {e}")));
            return;
        }
    };
    // A buffer per tag: a physically contiguous extent each where the device takes
    // physical addresses (uio), which one buffer for every tag would not get.
    let mut bufs = Vec::with_capacity(spec.depth as usize);
    for _ in 0..spec.depth {
        match spec.bdev.alloc_buf(spec.max_io) {
            Ok(b) => bufs.push(b),
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "{name}: cannot allocate {} bytes of DMA memory for each of {} tags: {e}",
                    spec.max_io, spec.depth
                )));
                return;
            }
        }
    }
    let descs = match Descs::map(&spec.cdev, spec.q_id, spec.depth) {
        Ok(d) => d,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "{name}: cannot map the request descriptors: {e}"
            )));
            return;
        }
    };
    let entries = (spec.depth as u32 + 4).next_power_of_two();
    let ring = match IoUring::builder().setup_cqsize(entries * 2).build(entries) {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(format!("{name}: cannot create an io_uring: {e}")));
            return;
        }
    };
    let mut q = Queue {
        block_size: spec.bdev.info().block_size as u64,
        tags: vec![Tag::Fetching; spec.depth as usize],
        addrs: bufs.iter().map(|b| b.as_ptr() as u64).collect(),
        spec,
        ring,
        descs,
        gone: 0,
    };
    for tag in 0..q.spec.depth {
        q.push(sys::IO_FETCH_REQ, tag, 0);
    }
    if let Err(e) = q.ring.submit() {
        let _ = ready.send(Err(format!("{name}: cannot submit the fetches: {e}")));
        return;
    }
    let _ = ready.send(Ok(()));
    drop(ready);
    q.serve(&mut ch);
    // Nothing of the bdev may still use the buffer when it is freed.
    let mut done = Vec::new();
    ch.wait(
        &mut done,
        usize::MAX,
        Duration::from_secs(5),
        vireo_bdev::WaitMode::Sleep,
    );
    if ch.in_flight() > 0 {
        tracing::warn!("{name}: I/O still with the device at exit; its buffers are leaked");
        ch.abandon();
        std::mem::forget(bufs);
    } else {
        drop(ch);
        drop(bufs);
    }
    tracing::debug!("{name}: stopped");
}

impl Queue {
    fn tag_addr(&self, tag: u16) -> u64 {
        self.addrs[tag as usize]
    }

    fn push(&mut self, op: u32, tag: u16, result: i32) {
        let cmd = IoCmd {
            q_id: self.spec.q_id,
            tag,
            result,
            addr: self.tag_addr(tag),
        };
        let e = opcode::UringCmd16::new(types::Fd(self.spec.cdev.as_raw_fd()), op)
            .cmd(cmd.bytes())
            .build()
            .user_data(tag as u64);
        self.push_entry(e);
    }

    fn push_entry(&mut self, e: io_uring::squeue::Entry) {
        loop {
            // SAFETY: the command carries no pointer the kernel reads later (the
            // tag's buffer lives until the thread ends, after the ring); poll entries
            // name fds that outlive the ring.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    fn commit(&mut self, tag: u16, result: i32) {
        self.tags[tag as usize] = Tag::Fetching;
        self.push(sys::IO_COMMIT_AND_FETCH_REQ, tag, result);
    }

    /// Start the request the driver handed `tag`.
    fn start(&mut self, ch: &mut vireo_bdev::IoChannel, tag: u16) {
        let d = self.descs.get(tag);
        let op = (d.op_flags & 0xff) as u8;
        let start = d.start_sector << 9;
        let bytes = (d.nr_sectors as u64) << 9;
        let bs = self.block_size;
        if !start.is_multiple_of(bs) || !bytes.is_multiple_of(bs) {
            return self.commit(tag, -libc::EINVAL);
        }
        let (lba, n) = (start / bs, bytes / bs);
        let req = match op {
            sys::OP_READ | sys::OP_WRITE => {
                if bytes == 0 || bytes > self.spec.max_io as u64 {
                    return self.commit(tag, -libc::EINVAL);
                }
                let ptr = NonNull::new(self.tag_addr(tag) as *mut u8).expect("tag buffer");
                // SAFETY: the tag's DMA buffer (`max_io` bytes, at least `bytes`), which outlives the
                // request; only this request uses it until it is committed.
                let buf = IoBuf::Foreign(unsafe { ForeignBuf::new(ptr, bytes as usize) });
                if op == sys::OP_READ {
                    IoRequest::read(lba, n, buf, tag as u64)
                } else {
                    IoRequest::write(lba, n, buf, tag as u64)
                }
            }
            sys::OP_FLUSH => IoRequest::no_data(IoOp::Flush, 0, 0, tag as u64),
            sys::OP_DISCARD => IoRequest::no_data(IoOp::Unmap, lba, n, tag as u64),
            sys::OP_WRITE_ZEROES => IoRequest::no_data(IoOp::WriteZeroes, lba, n, tag as u64),
            _ => return self.commit(tag, -libc::EOPNOTSUPP),
        };
        let ok = if matches!(op, sys::OP_READ | sys::OP_WRITE) {
            bytes as i32
        } else {
            0
        };
        self.tags[tag as usize] = Tag::Busy(ok);
        if let Err(r) = ch.submit(req) {
            self.commit(tag, errno(&r.error));
        }
    }

    fn complete(&mut self, c: Completion) {
        let tag = c.user_data as u16;
        let Some(Tag::Busy(ok)) = self.tags.get(tag as usize).copied() else {
            tracing::warn!("ublk: completion of tag {tag}, which has no request");
            return;
        };
        let res = match &c.result {
            Ok(()) => ok,
            Err(e) => {
                tracing::debug!("ublk: tag {tag}: {e}");
                errno(e)
            }
        };
        self.commit(tag, res);
    }

    fn serve(&mut self, ch: &mut vireo_bdev::IoChannel) {
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(self.spec.depth as usize * 2);
        let mut done: Vec<Completion> = Vec::with_capacity(self.spec.depth as usize);
        let mut last_progress = Instant::now();
        let mut chan_poll: Option<RawFd> = None;
        let mut kick_poll = false;
        let kick_fd = self.spec.kick.as_raw_fd();
        loop {
            let mut progress = false;
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (ud, res) in cqes.drain(..) {
                match ud {
                    POLL_CHANNEL => chan_poll = None,
                    POLL_KICK => {
                        kick_poll = false;
                        drain(kick_fd);
                    }
                    tag => {
                        let tag = tag as u16;
                        if tag >= self.spec.depth {
                            continue;
                        }
                        progress = true;
                        if res == sys::IO_RES_OK {
                            self.start(ch, tag);
                        } else {
                            if res != sys::IO_RES_ABORT {
                                tracing::warn!(
                                    "ublk queue {}: tag {tag}: fetch failed: {}",
                                    self.spec.q_id,
                                    std::io::Error::from_raw_os_error(-res)
                                );
                            }
                            if self.tags[tag as usize] != Tag::Gone {
                                self.tags[tag as usize] = Tag::Gone;
                                self.gone += 1;
                            }
                        }
                    }
                }
            }
            if ch.poll(&mut done) > 0 {
                progress = true;
                for c in done.drain(..) {
                    self.complete(c);
                }
            }
            if progress {
                let _ = self.ring.submit();
                last_progress = Instant::now();
            }
            if self.gone == self.spec.depth as usize && ch.in_flight() == 0 {
                return;
            }
            if self.spec.stop.load(Ordering::Acquire) {
                return;
            }
            if progress || last_progress.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            if !kick_poll {
                let e = opcode::PollAdd::new(types::Fd(kick_fd), libc::POLLIN as u32)
                    .build()
                    .user_data(POLL_KICK);
                self.push_entry(e);
                kick_poll = true;
            }
            if ch.in_flight() > 0 {
                match ch.arm() {
                    vireo_bdev::Armed::Ready => continue,
                    vireo_bdev::Armed::Fd(fd) => {
                        if chan_poll != Some(fd) {
                            let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                                .build()
                                .user_data(POLL_CHANNEL);
                            self.push_entry(e);
                            chan_poll = Some(fd);
                        }
                    }
                    // A transport that only polls (PCI without interrupts): only polling
                    // sees the device's completions, so the thread polls while the device
                    // has requests (a 50 µs nap here: 0.43x the guest kernel driver's IOPS at QD 1
                    // in the guest test's figures, polling: 0.61x).
                    vireo_bdev::Armed::NoFd => {
                        let _ = self.ring.submit();
                        std::thread::yield_now();
                        continue;
                    }
                }
            }
            let r = self.ring.submit_and_wait(1);
            match r {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::ETIME) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    tracing::error!("ublk queue {}: io_uring wait: {e}", self.spec.q_id);
                    return;
                }
            }
        }
    }
}

/// The errno a failed I/O is committed with.
fn errno(e: &IoError) -> i32 {
    match e {
        IoError::Unsupported { .. } | IoError::DeviceUnsupported => -libc::EOPNOTSUPP,
        IoError::OutOfRange { .. } | IoError::InvalidRequest(_) | IoError::InvalidBuffer(_) => {
            -libc::EINVAL
        }
        IoError::ReadOnly(_) => -libc::EROFS,
        _ => -libc::EIO,
    }
}
