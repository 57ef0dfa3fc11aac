//! Inflight I/O tracking (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) for split
//! rings: a buffer shared with the front-end (which keeps it across reconnections and
//! treats it as opaque) where the back-end marks every request it took from the
//! available ring until its used entry is published. A new back-end process that gets
//! the buffer back (`SET_INFLIGHT_FD`) serves those requests again before anything
//! new, so a crash loses none of them.
//!
//! Layout, per queue (the same as QEMU's libvhost-user): a 16-byte header (features
//! u64, version u16, desc_num u16, last_batch_head u16, used_idx u16) and one 16-byte
//! state per descriptor (inflight u8, padding, next u16, counter u64).
//! Publishing a completion is: `last_batch_head` = head, the used entry and index,
//! `used_idx` = the new index, then the descriptor's inflight byte cleared. A crash
//! between the used index and the clear is recognised by `used_idx` differing from the
//! used ring's index, and repaired.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU64, Ordering};

const HEADER: usize = 16;
const DESC: usize = 16;
/// Offsets in the queue header.
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;
const VERSION: usize = 8;

/// Bytes of one queue's region, 64-byte aligned.
pub(crate) fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * queue_size as usize).div_ceil(64) * 64
}

/// A mapped inflight buffer.
pub(crate) struct Inflight {
    base: *mut u8,
    len: usize,
    num_queues: u16,
    queue_size: u16,
    counter: AtomicU64,
    _file: File,
}

// SAFETY: the mapping is plain shared memory; every access goes through volatile reads
// and writes of in-bounds offsets; each queue's part is used by its one queue thread.
unsafe impl Send for Inflight {}
// SAFETY: as above.
unsafe impl Sync for Inflight {}

impl std::fmt::Debug for Inflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflight")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl Inflight {
    /// A new zeroed buffer for `num_queues` queues of `queue_size`: (buffer, file, size).
    pub(crate) fn create(num_queues: u16, queue_size: u16) -> std::io::Result<(Inflight, File)> {
        if num_queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(std::io::Error::other(format!(
                "cannot track {num_queues} queues of {queue_size} descriptors"
            )));
        }
        let len = queue_region_size(queue_size) * num_queues as usize;
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"vireo-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        let theirs = file.try_clone()?;
        let me = Inflight::map(file, 0, len, num_queues, queue_size)?;
        for q in 0..num_queues {
            let h = me.queue_base(q);
            me.write16(h + VERSION, 1);
            me.write16(h + DESC_NUM, queue_size);
        }
        Ok((me, theirs))
    }

    /// Map a buffer the front-end hands back.
    pub(crate) fn map(
        file: File,
        offset: u64,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> std::io::Result<Inflight> {
        let need = queue_region_size(queue_size).saturating_mul(num_queues as usize);
        if num_queues == 0 || queue_size == 0 || len < need || need == 0 {
            return Err(std::io::Error::other(format!(
                "inflight buffer of {len} bytes cannot hold {num_queues} queues of {queue_size}"
            )));
        }
        let real = file.metadata()?.len();
        if offset.checked_add(len as u64).is_none_or(|end| end > real) {
            return Err(std::io::Error::other(format!(
                "inflight buffer {offset}+{len} lies beyond its file ({real} bytes)"
            )));
        }
        // SAFETY: a fresh shared mapping of `len` bytes of `file` at `offset`, checked to
        // lie inside the file; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let me = Inflight {
            base: p.cast(),
            len,
            num_queues,
            queue_size,
            counter: AtomicU64::new(0),
            _file: file,
        };
        // Go on counting after the largest counter in the buffer.
        let mut max = 0;
        for q in 0..num_queues {
            for d in 0..queue_size {
                max = max.max(me.read64(me.desc(q, d) + 8));
            }
        }
        me.counter.store(max, Ordering::Relaxed);
        Ok(me)
    }

    fn queue_base(&self, q: u16) -> usize {
        queue_region_size(self.queue_size) * q as usize
    }

    fn desc(&self, q: u16, d: u16) -> usize {
        self.queue_base(q) + HEADER + DESC * d as usize
    }

    fn ok(&self, q: u16, d: u16) -> bool {
        q < self.num_queues && d < self.queue_size
    }

    fn read8(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: in bounds (checked), shared memory read as a plain byte.
        unsafe { std::ptr::read_volatile(self.base.add(off)) }
    }

    fn write8(&self, off: usize, v: u8) {
        assert!(off < self.len);
        // SAFETY: in bounds (checked).
        unsafe { std::ptr::write_volatile(self.base.add(off), v) }
    }

    fn read16(&self, off: usize) -> u16 {
        assert!(off + 2 <= self.len && off.is_multiple_of(2));
        // SAFETY: in bounds and aligned (checked; the mapping is page aligned).
        u16::from_le(unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u16>()) })
    }

    fn write16(&self, off: usize, v: u16) {
        assert!(off + 2 <= self.len && off.is_multiple_of(2));
        // SAFETY: in bounds and aligned (checked).
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u16>(), v.to_le()) }
    }

    fn read64(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len && off.is_multiple_of(8));
        // SAFETY: in bounds and aligned (checked).
        u64::from_le(unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u64>()) })
    }

    fn write64(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len && off.is_multiple_of(8));
        // SAFETY: in bounds and aligned (checked).
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u64>(), v.to_le()) }
    }

    /// Queue `q` took the chain at `head` from the available ring.
    pub(crate) fn begin(&self, q: u16, head: u16) {
        if !self.ok(q, head) {
            return;
        }
        let d = self.desc(q, head);
        let c = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        self.write64(d + 8, c);
        self.write8(d, 1);
        fence(Ordering::SeqCst);
    }

    /// Before publishing `head`'s used entry.
    pub(crate) fn before_used(&self, q: u16, head: u16) {
        if !self.ok(q, head) {
            return;
        }
        self.write16(self.queue_base(q) + LAST_BATCH_HEAD, head);
        fence(Ordering::SeqCst);
    }

    /// After publishing `head`'s used entry; `used_idx` is the used ring's new index.
    pub(crate) fn after_used(&self, q: u16, head: u16, used_idx: u16) {
        if !self.ok(q, head) {
            return;
        }
        fence(Ordering::SeqCst);
        self.write16(self.queue_base(q) + USED_IDX, used_idx);
        fence(Ordering::SeqCst);
        self.write8(self.desc(q, head), 0);
        fence(Ordering::SeqCst);
    }

    /// Queue `q` starts on a connection whose used ring index is `ring_used_idx`: repair
    /// a completion published but not cleared, and return the heads still in flight,
    /// oldest first.
    pub(crate) fn resume(&self, q: u16, ring_used_idx: u16) -> Vec<u16> {
        if q >= self.num_queues {
            return Vec::new();
        }
        let h = self.queue_base(q);
        if self.read16(h + USED_IDX) != ring_used_idx {
            let last = self.read16(h + LAST_BATCH_HEAD);
            if last < self.queue_size {
                self.write8(self.desc(q, last), 0);
            }
            self.write16(h + USED_IDX, ring_used_idx);
        }
        let mut v: Vec<(u64, u16)> = (0..self.queue_size)
            .filter(|&d| self.read8(self.desc(q, d)) == 1)
            .map(|d| (self.read64(self.desc(q, d) + 8), d))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, d)| d).collect()
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_new_mapping_and_come_back_oldest_first() {
        let (a, file) = Inflight::create(2, 8).unwrap();
        a.begin(1, 5);
        a.begin(1, 2);
        a.begin(0, 7);
        a.before_used(0, 7);
        a.after_used(0, 7, 1);
        let len = queue_region_size(8) * 2;
        let b = Inflight::map(file, 0, len, 2, 8).unwrap();
        assert_eq!(b.resume(1, 0), vec![5, 2]);
        assert_eq!(b.resume(0, 1), Vec::<u16>::new());
        // New marks count on after the old ones.
        b.begin(1, 3);
        assert_eq!(b.resume(1, 0), vec![5, 2, 3]);
    }

    #[test]
    fn a_completion_published_but_not_cleared_is_repaired() {
        let (a, _f) = Inflight::create(1, 4).unwrap();
        a.begin(0, 1);
        a.before_used(0, 1);
        // Crash here: the used ring says 1, the buffer still 0 and desc 1 in flight.
        assert_eq!(a.resume(0, 1), Vec::<u16>::new());
        a.begin(0, 2);
        assert_eq!(a.resume(0, 1), vec![2]);
    }

    #[test]
    fn hostile_sizes_are_refused() {
        let (_, f) = Inflight::create(1, 4).unwrap();
        assert!(Inflight::map(f.try_clone().unwrap(), 0, 16, 1, 4).is_err());
        assert!(Inflight::map(f.try_clone().unwrap(), 1 << 20, 80, 1, 4).is_err());
        assert!(Inflight::map(f, 0, 80, 0, 4).is_err());
    }
}
