//! Access to a PCI function's BARs and configuration space: memory-mapped where the
//! kernel allows it (uio's sysfs resource files, VFIO regions with the MMAP flag),
//! else `pread`/`pwrite` on the VFIO device file.
//!
//! A mapped BAR of a function that disappears (hot-unplug, unbind) faults with SIGBUS.
//! Every mapping is registered with a process-wide SIGBUS handler that, for a fault
//! inside a registered BAR, replaces the mapping with anonymous memory (reads then see
//! zeros, writes go nowhere) and raises the device's `gone` flag, so the driver fails
//! its I/O instead of the process dying. Faults elsewhere go to the previous handler.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Once};

use crate::error::{Error, Result};

/// One BAR (or a window of it).
#[derive(Debug)]
pub enum Bar {
    /// Mapped into the process.
    Mapped {
        /// First byte of the mapping.
        ptr: NonNull<u8>,
        /// Length of the mapping.
        len: usize,
        /// Guard slot in the SIGBUS table.
        guard: usize,
    },
    /// Through a file at an offset (VFIO regions without MMAP).
    File {
        /// The device file.
        file: Arc<File>,
        /// Offset of the region in the file.
        offset: u64,
        /// Length of the region.
        len: u64,
    },
    /// Through `REGION_READ`/`REGION_WRITE` messages of a vfio-user server.
    Remote {
        /// The connection.
        client: Arc<super::vfio_user::VfuClient>,
        /// The region's index.
        region: u32,
        /// Length of the region.
        len: u64,
    },
}

// SAFETY: the mapping is device memory accessed only with volatile operations of the
// sizes the device supports; the pointer is never turned into a Rust reference.
unsafe impl Send for Bar {}
// SAFETY: as for Send; concurrent volatile accesses to device registers are what the
// hardware sees from any multi-threaded driver, and each access is a single load/store.
unsafe impl Sync for Bar {}

impl Bar {
    /// Map `len` bytes of `file` at `offset` (shared, read/write); a fault in the mapping
    /// raises `gone` instead of killing the process.
    pub fn map(file: &File, offset: u64, len: usize, gone: &Arc<AtomicBool>) -> Result<Bar> {
        if len == 0 {
            return Err(Error::Device("BAR of length 0".into()));
        }
        // SAFETY: a fresh shared mapping chosen by the kernel; no existing memory is
        // affected. The file is a device resource, whose pages are device registers.
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
            return Err(Error::io(
                format!("cannot map {len} bytes of a BAR"),
                std::io::Error::last_os_error(),
            ));
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| Error::Device("mmap of a BAR returned NULL".into()))?;
        let guard = guard_register(ptr.as_ptr() as usize, len, gone.clone());
        Ok(Bar::Mapped { ptr, len, guard })
    }

    /// The BAR through `pread`/`pwrite` on `file` at `offset`.
    pub fn file(file: Arc<File>, offset: u64, len: u64) -> Bar {
        Bar::File { file, offset, len }
    }

    /// Let go of the device: a mapping is replaced by anonymous memory (reads see zeros,
    /// writes go nowhere), a file-backed BAR's descriptor by /dev/null. Accesses racing
    /// with this hit one or the other, never freed memory or a reused descriptor. The
    /// kernel then sees no user of the device file left through this BAR.
    pub fn revoke(&self) {
        match self {
            Bar::Mapped { ptr, len, .. } => {
                // SAFETY: replaces exactly this BAR's mapping (owned by self) with private
                // anonymous memory of the same size at the same address; the pointer stays
                // valid for the accessors and for munmap in Drop.
                unsafe {
                    libc::mmap(
                        ptr.as_ptr().cast(),
                        *len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
            }
            Bar::File { file, .. } => revoke_file(file),
            Bar::Remote { client, .. } => client.hang_up(),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Bar::Mapped { len, .. } => *len as u64,
            Bar::File { len, .. } | Bar::Remote { len, .. } => *len,
        }
    }

    /// Whether the BAR is empty (never: empty BARs are refused).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, off: u64, size: u64) -> Result<()> {
        if !off.is_multiple_of(size) || off.checked_add(size).is_none_or(|e| e > self.len()) {
            return Err(Error::Device(format!(
                "register access of {size} bytes at {off:#x} outside the BAR of {} bytes or unaligned",
                self.len()
            )));
        }
        Ok(())
    }

    fn file_read(file: &File, at: u64, buf: &mut [u8]) -> Result<()> {
        file.read_exact_at(buf, at)
            .map_err(|e| Error::io("device register read (VFIO region)", e))
    }

    fn file_write(file: &File, at: u64, buf: &[u8]) -> Result<()> {
        file.write_all_at(buf, at)
            .map_err(|e| Error::io("device register write (VFIO region)", e))
    }
}

/// Point `file`'s descriptor at /dev/null (dup2), dropping its reference to the device
/// while every holder keeps a valid descriptor number: later reads fail (end of file),
/// writes vanish.
pub fn revoke_file(file: &File) {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        // SAFETY: dup2 between two descriptors this process owns; the target stays open
        // (now on /dev/null) and is still owned by `file`.
        unsafe { libc::dup2(null.as_raw_fd(), file.as_raw_fd()) };
    }
}

macro_rules! accessors {
    ($read:ident, $write:ident, $t:ty) => {
        impl Bar {
            /// Read a little-endian register at `off`.
            pub fn $read(&self, off: u64) -> Result<$t> {
                const N: u64 = std::mem::size_of::<$t>() as u64;
                self.check(off, N)?;
                match self {
                    Bar::Mapped { ptr, .. } => {
                        // SAFETY: `off` is aligned and `off + N <= len` (checked), so the
                        // access is inside the live mapping; device registers are read
                        // with one volatile load of the register's width.
                        let v = unsafe {
                            std::ptr::read_volatile(ptr.as_ptr().add(off as usize).cast::<$t>())
                        };
                        Ok(<$t>::from_le(v))
                    }
                    Bar::File { file, offset, .. } => {
                        let mut b = [0u8; N as usize];
                        Self::file_read(file, offset + off, &mut b)?;
                        Ok(<$t>::from_le_bytes(b))
                    }
                    Bar::Remote { client, region, .. } => {
                        let mut b = [0u8; N as usize];
                        client.region_read(*region, off, &mut b)?;
                        Ok(<$t>::from_le_bytes(b))
                    }
                }
            }

            /// Write a little-endian register at `off`.
            pub fn $write(&self, off: u64, v: $t) -> Result<()> {
                const N: u64 = std::mem::size_of::<$t>() as u64;
                self.check(off, N)?;
                match self {
                    Bar::Mapped { ptr, .. } => {
                        // SAFETY: as in the read accessor: aligned, inside the mapping, one
                        // volatile store of the register's width.
                        unsafe {
                            std::ptr::write_volatile(
                                ptr.as_ptr().add(off as usize).cast::<$t>(),
                                v.to_le(),
                            )
                        };
                        Ok(())
                    }
                    Bar::File { file, offset, .. } => {
                        Self::file_write(file, offset + off, &v.to_le_bytes())
                    }
                    Bar::Remote { client, region, .. } => {
                        client.region_write(*region, off, &v.to_le_bytes())
                    }
                }
            }
        }
    };
}

accessors!(read8, write8, u8);
accessors!(read16, write16, u16);
accessors!(read32, write32, u32);

impl Drop for Bar {
    fn drop(&mut self) {
        if let Bar::Mapped { ptr, len, guard } = self {
            guard_unregister(*guard);
            // SAFETY: the mapping was created by `map` with this pointer and length and
            // is no longer reachable (the Bar is being dropped).
            unsafe { libc::munmap(ptr.as_ptr().cast(), *len) };
        }
    }
}

// ---------- SIGBUS guard ----------

const GUARD_SLOTS: usize = 64;

struct GuardSlot {
    start: AtomicUsize,
    len: AtomicUsize,
    /// Leaked `Arc<AtomicBool>` of the device (never freed: a signal may still read it).
    gone: AtomicPtr<AtomicBool>,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: GuardSlot = GuardSlot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    gone: AtomicPtr::new(std::ptr::null_mut()),
};
static GUARDS: [GuardSlot; GUARD_SLOTS] = [EMPTY_SLOT; GUARD_SLOTS];
static INSTALL: Once = Once::new();
static mut PREVIOUS: Option<libc::sigaction> = None;

fn guard_register(start: usize, len: usize, gone: Arc<AtomicBool>) -> usize {
    INSTALL.call_once(install_handler);
    let flag = Arc::into_raw(gone) as *mut AtomicBool;
    for (i, s) in GUARDS.iter().enumerate() {
        if s.start
            .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.gone.store(flag, Ordering::Release);
            s.len.store(len, Ordering::Release);
            s.start.store(start, Ordering::Release);
            return i;
        }
    }
    tracing::warn!(
        "more than {GUARD_SLOTS} BAR mappings: a hot-unplug of the newest would not be caught"
    );
    usize::MAX
}

fn guard_unregister(i: usize) {
    if let Some(s) = GUARDS.get(i) {
        s.start.store(usize::MAX, Ordering::Release);
        s.len.store(0, Ordering::Release);
        // A handler that read the old slot may be about to map over the range: wait
        // until none runs before the caller unmaps it (and the range can be reused).
        // Handlers run on faulting threads, never on this one while it unregisters.
        while ACTIVE.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        s.start.store(0, Ordering::Release);
    }
}

/// SIGBUS handlers running now.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

fn install_handler() {
    // SAFETY: sigaction with a zeroed struct plus the fields we set is the documented
    // way to install an SA_SIGINFO handler; PREVIOUS is written once, here, before the
    // handler can run (Once), and only read afterwards.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        // Learn the previous disposition before the new handler can run.
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) == 0 {
            *std::ptr::addr_of_mut!(PREVIOUS) = Some(old);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    // Only a fault (si_code > 0: sent by the kernel for an access) can be a BAR that
    // vanished; a SIGBUS sent with kill() goes to the previous disposition.
    let slots = if code > 0 { &GUARDS[..] } else { &GUARDS[..0] };
    ACTIVE.fetch_add(1, Ordering::AcqRel);
    let handled = guard_fault(slots, addr);
    ACTIVE.fetch_sub(1, Ordering::AcqRel);
    if handled {
        return;
    }
    chain(sig, info, ctx, code);
}

/// Replace the registered BAR mapping that contains `addr`; whether one did.
fn guard_fault(slots: &[GuardSlot], addr: usize) -> bool {
    for s in slots.iter() {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        if start == 0 || start == usize::MAX || addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: replaces exactly the registered BAR mapping (which the kernel revoked)
        // with private anonymous memory, so the faulting access can be retried; mmap is a
        // plain system call, safe to make from a signal handler.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let flag = s.gone.load(Ordering::Acquire);
        if !flag.is_null() {
            // SAFETY: the flag was leaked from an Arc in guard_register and is never freed.
            unsafe { (*flag).store(true, Ordering::Release) };
        }
        if p != libc::MAP_FAILED {
            return true;
        }
    }
    false
}

/// Not ours: hand over to the previous disposition.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void, code: libc::c_int) {
    // SAFETY: PREVIOUS was set before this handler was installed and is never written
    // again; calling the previous handler (or restoring the default and returning, so
    // the fault repeats and kills the process as it would have) mirrors normal delivery.
    unsafe {
        match *std::ptr::addr_of!(PREVIOUS) {
            Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
                if old.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(old.sa_sigaction);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(old.sa_sigaction);
                    f(sig);
                }
            }
            _ => {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
                if code <= 0 {
                    // Sent, not a fault: deliver it with the default action now.
                    libc::raise(libc::SIGBUS);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A mapping of a file that shrinks under it faults with SIGBUS, as a revoked BAR
    /// does: the guard must turn that into the `gone` flag.
    #[test]
    fn a_fault_in_a_mapped_bar_raises_gone_instead_of_killing_the_process() {
        let mut f = tempfile_in_tmp();
        f.write_all(&[0x5a; 8192]).unwrap();
        let gone = Arc::new(AtomicBool::new(false));
        let bar = Bar::map(&f, 0, 8192, &gone).unwrap();
        assert_eq!(bar.read8(0).unwrap(), 0x5a);
        assert_eq!(bar.read32(4).unwrap(), 0x5a5a5a5a);
        f.set_len(0).unwrap();
        // The page is gone: this read faults.
        let v = bar.read32(4096).unwrap();
        assert!(gone.load(Ordering::Acquire));
        assert_eq!(v, 0, "reads of a vanished BAR see zeros");
        bar.write16(0, 1).unwrap();
        assert!(bar.read8(3).is_ok());
        assert!(bar.read32(8190).is_err(), "unaligned");
        assert!(bar.read16(8192).is_err(), "outside");
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!("vireo-bar-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
