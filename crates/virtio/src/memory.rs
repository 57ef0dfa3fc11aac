//! DMA memory: shared regions that every transport can address.
//!
//! A [`DmaMemory`] owns a set of memfd-backed regions (optionally hugetlbfs-backed with
//! `MFD_HUGETLB`), hands out aligned [`DmaBuf`] buffers from them and grows by adding
//! regions when it runs out. Transports register as [`RegionListener`]s so every region
//! is shared with the device (vhost-user `SET_MEM_TABLE` / `ADD_MEM_REG`, VFIO DMA map)
//! before a buffer in it is handed out.
//!
//! Device addresses (IOVAs) are identical to the process's virtual addresses: a region
//! is registered with `guest_phys_addr == userspace_addr`, so translation is a bounds
//! check, not an offset computation. Regions are never removed while the memory lives,
//! so a [`Translator`]'s cached snapshot can only miss, never be wrong.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::error::{Error, Result};

const PAGE_SIZE: usize = 4096;
const HUGE_PAGE_SIZE: usize = 2 << 20;
/// Largest region the memory adds at once when growing.
const MAX_REGION_SIZE: usize = 1 << 30;

/// How DMA memory is backed and how large it may grow.
#[derive(Debug, Clone)]
pub struct DmaConfig {
    /// Size of the first region in bytes; later regions double up to 1 GiB.
    pub initial_region_size: usize,
    /// Back regions with huge pages (`MFD_HUGETLB`); needs reserved hugepages.
    pub hugetlb: bool,
    /// Upper bound of all regions together, in bytes.
    pub max_total_size: usize,
}

impl Default for DmaConfig {
    fn default() -> Self {
        DmaConfig {
            initial_region_size: 64 << 20,
            hugetlb: false,
            max_total_size: 64 << 30,
        }
    }
}

/// What a transport needs to know of one region to share it with a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRegionInfo {
    /// Index of the region within its memory (stable for the memory's life).
    pub index: u32,
    /// Start virtual address in this process.
    pub va: u64,
    /// Device address of the first byte (equal to `va`).
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// File descriptor backing the region (valid as long as the memory lives).
    pub fd: RawFd,
    /// Offset of the region in the file.
    pub fd_offset: u64,
}

impl DmaRegionInfo {
    /// Whether `[va, va+len)` lies inside this region.
    #[inline]
    pub fn contains(&self, va: u64, len: u64) -> bool {
        va >= self.va && len <= self.len && va - self.va <= self.len - len
    }
}

/// A party (a transport) that must learn of every region before it is used.
pub trait RegionListener: Send + Sync {
    /// A region was added. An error rolls the addition back.
    fn region_added(&self, region: &DmaRegionInfo) -> Result<()>;
    /// A region that was announced is going away (rollback of a failed addition).
    fn region_removed(&self, region: &DmaRegionInfo);
}

struct Region {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    /// Free extents `(offset, len)` sorted by offset, coalesced.
    free: Vec<(usize, usize)>,
}

// SAFETY: the region's mapping is plain shared memory owned by this struct; the raw
// pointer is only dereferenced through DmaBuf, which owns disjoint extents.
unsafe impl Send for Region {}

impl Region {
    fn create(len: usize, hugetlb: bool, index: usize) -> Result<Region> {
        let name = format!("vireo-dma-{index}\0");
        let mut flags = libc::MFD_CLOEXEC;
        if hugetlb {
            flags |= libc::MFD_HUGETLB;
        }
        // SAFETY: `name` is NUL-terminated and outlives the call; memfd_create has no other
        // memory effects.
        let raw = unsafe { libc::memfd_create(name.as_ptr().cast(), flags) };
        if raw < 0 {
            return Err(Error::MemfdCreate {
                size: len,
                hint: if hugetlb { ", MFD_HUGETLB" } else { "" },
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(fd);
        file.set_len(len as u64)
            .map_err(|source| Error::MemfdSize { size: len, source })?;
        let fd = OwnedFd::from(file);
        // SAFETY: mapping a fresh shared file mapping of `len` bytes at an address the kernel
        // chooses; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Mmap {
                size: len,
                hint: if hugetlb {
                    " (huge pages: reserve enough in /proc/sys/vm/nr_hugepages, or drop --hugepages)"
                } else {
                    ""
                },
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| Error::Mmap {
            size: len,
            hint: "",
            source: std::io::Error::other("mmap returned NULL"),
        })?;
        Ok(Region {
            fd,
            ptr,
            len,
            free: vec![(0, len)],
        })
    }

    fn info(&self, index: u32) -> DmaRegionInfo {
        let va = self.ptr.as_ptr() as u64;
        DmaRegionInfo {
            index,
            va,
            iova: va,
            len: self.len as u64,
            fd: self.fd.as_raw_fd(),
            fd_offset: 0,
        }
    }

    /// First-fit allocation of `size` bytes aligned to `align` (a power of two).
    fn alloc(&mut self, size: usize, align: usize) -> Option<usize> {
        for i in 0..self.free.len() {
            let (off, len) = self.free[i];
            let start = (off + align - 1) & !(align - 1);
            let pad = start - off;
            if pad > len || len - pad < size {
                continue;
            }
            let tail = len - pad - size;
            match (pad, tail) {
                (0, 0) => {
                    self.free.remove(i);
                }
                (0, _) => self.free[i] = (start + size, tail),
                (_, 0) => self.free[i] = (off, pad),
                (_, _) => {
                    self.free[i] = (off, pad);
                    self.free.insert(i + 1, (start + size, tail));
                }
            }
            return Some(start);
        }
        None
    }

    fn release(&mut self, off: usize, size: usize) {
        let pos = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(pos, (off, size));
        // Coalesce with the next, then the previous extent.
        if pos + 1 < self.free.len() && off + size == self.free[pos + 1].0 {
            self.free[pos].1 += self.free[pos + 1].1;
            self.free.remove(pos + 1);
        }
        if pos > 0 && self.free[pos - 1].0 + self.free[pos - 1].1 == off {
            self.free[pos - 1].1 += self.free[pos].1;
            self.free.remove(pos);
        }
    }

    fn free_bytes(&self) -> usize {
        self.free.iter().map(|&(_, l)| l).sum()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping this region created; every DmaBuf holds an
        // Arc to the memory, so no buffer can outlive it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

struct State {
    regions: Vec<Region>,
    listeners: Vec<Weak<dyn RegionListener>>,
    snapshot: Arc<[DmaRegionInfo]>,
}

/// A growable set of shared DMA regions with an allocator for aligned buffers.
pub struct DmaMemory {
    config: DmaConfig,
    state: Mutex<State>,
    generation: AtomicU64,
}

impl std::fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMemory")
            .field("config", &self.config)
            .field("regions", &self.regions().len())
            .finish()
    }
}

impl DmaMemory {
    /// Create memory with its first region.
    pub fn new(config: DmaConfig) -> Result<Arc<DmaMemory>> {
        let unit = if config.hugetlb {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        if config.initial_region_size == 0 || config.initial_region_size > config.max_total_size {
            return Err(Error::InvalidAllocation(format!(
                "initial region size {} must be non-zero and at most the limit {}",
                config.initial_region_size, config.max_total_size
            )));
        }
        let size = round_up(config.initial_region_size, unit);
        let first = Region::create(size, config.hugetlb, 0)?;
        let snapshot: Arc<[DmaRegionInfo]> = Arc::from(vec![first.info(0)]);
        Ok(Arc::new(DmaMemory {
            config,
            state: Mutex::new(State {
                regions: vec![first],
                listeners: Vec::new(),
                snapshot,
            }),
            generation: AtomicU64::new(1),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the free lists consistent (every mutation
        // is a single Vec operation), so poisoning is safe to ignore.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current regions.
    pub fn regions(&self) -> Arc<[DmaRegionInfo]> {
        self.lock().snapshot.clone()
    }

    /// Register a listener and return the regions it must register now. Later regions are
    /// announced through the listener before any buffer in them is handed out.
    pub fn add_listener(&self, listener: Weak<dyn RegionListener>) -> Arc<[DmaRegionInfo]> {
        let mut st = self.lock();
        st.listeners.retain(|l| l.strong_count() > 0);
        st.listeners.push(listener);
        st.snapshot.clone()
    }

    /// A translator that caches the region list of this memory.
    pub fn translator(self: &Arc<Self>) -> Translator {
        Translator {
            mem: self.clone(),
            generation: self.generation.load(Ordering::Acquire),
            regions: self.regions(),
        }
    }

    /// Bytes free in all regions.
    pub fn free_bytes(&self) -> usize {
        self.lock().regions.iter().map(Region::free_bytes).sum()
    }

    /// Allocate `size` bytes aligned to `align` (a power of two, at most 2 MiB). The
    /// buffer is zero-initialised on first use of the memory only; contents of reused
    /// buffers are unspecified.
    pub fn alloc(self: &Arc<Self>, size: usize, align: usize) -> Result<DmaBuf> {
        if size == 0 || !align.is_power_of_two() || align > HUGE_PAGE_SIZE {
            return Err(Error::InvalidAllocation(format!(
                "size {size} must be non-zero and alignment {align} a power of two up to 2 MiB"
            )));
        }
        if size > self.config.max_total_size {
            return Err(Error::OutOfMemory {
                size,
                limit: self.config.max_total_size,
            });
        }
        let mut st = self.lock();
        for (i, r) in st.regions.iter_mut().enumerate() {
            if let Some(off) = r.alloc(size, align) {
                return Ok(self.make_buf(r, i, off, size));
            }
        }
        // Grow: a new region at least double the last one, big enough for the request.
        let unit = if self.config.hugetlb {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        let total: usize = st.regions.iter().map(|r| r.len).sum();
        let last = st.regions.last().map(|r| r.len).unwrap_or(0);
        let want = round_up(size + align, unit).max((last * 2).min(MAX_REGION_SIZE));
        let room = self.config.max_total_size.saturating_sub(total);
        let len = want.min(round_down(room, unit));
        if len < size + align {
            return Err(Error::OutOfMemory {
                size,
                limit: self.config.max_total_size,
            });
        }
        let index = st.regions.len();
        let mut region = Region::create(len, self.config.hugetlb, index)?;
        let info = region.info(index as u32);
        let listeners: Vec<Arc<dyn RegionListener>> =
            st.listeners.iter().filter_map(Weak::upgrade).collect();
        for (n, l) in listeners.iter().enumerate() {
            if let Err(e) = l.region_added(&info) {
                for done in &listeners[..n] {
                    done.region_removed(&info);
                }
                return Err(Error::RegionRejected(e.to_string()));
            }
        }
        let off = region
            .alloc(size, align)
            .ok_or_else(|| Error::InvalidAllocation("new region too small".into()))?;
        let buf = self.make_buf(&region, index, off, size);
        st.regions.push(region);
        let mut snap: Vec<DmaRegionInfo> = st.snapshot.to_vec();
        snap.push(info);
        st.snapshot = Arc::from(snap);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(buf)
    }

    fn make_buf(self: &Arc<Self>, r: &Region, index: usize, off: usize, size: usize) -> DmaBuf {
        // SAFETY: `off + size <= r.len` (the allocator only returns extents inside the
        // region), so the pointer stays inside the mapping.
        let ptr = unsafe { NonNull::new_unchecked(r.ptr.as_ptr().add(off)) };
        DmaBuf {
            mem: self.clone(),
            region: index as u32,
            offset: off,
            len: size,
            ptr,
            retired: AtomicBool::new(false),
        }
    }

    fn release(&self, region: u32, off: usize, len: usize) {
        let mut st = self.lock();
        if let Some(r) = st.regions.get_mut(region as usize) {
            r.release(off, len);
        }
    }
}

fn round_up(v: usize, unit: usize) -> usize {
    v.div_ceil(unit) * unit
}

fn round_down(v: usize, unit: usize) -> usize {
    v / unit * unit
}

/// An owned, aligned buffer in DMA memory. Freed when dropped.
pub struct DmaBuf {
    mem: Arc<DmaMemory>,
    region: u32,
    offset: usize,
    len: usize,
    ptr: NonNull<u8>,
    /// The device may still use the extent: never hand it out again.
    retired: AtomicBool,
}

// SAFETY: a DmaBuf exclusively owns its extent of shared memory, like a Box<[u8]>.
unsafe impl Send for DmaBuf {}
// SAFETY: shared references only allow reads through `as_slice`.
unsafe impl Sync for DmaBuf {}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf")
            .field("addr", &self.addr())
            .field("len", &self.len)
            .finish()
    }
}

impl DmaBuf {
    /// A device may still read or write this buffer (a request it was given never
    /// completed): its extent is never freed or handed out again, whoever drops it.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: allocations are non-zero).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Virtual address of the first byte.
    #[inline]
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Device address of the first byte.
    #[inline]
    pub fn iova(&self) -> u64 {
        self.addr()
    }

    /// Raw pointer to the first byte, for code that shares the buffer with a device.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The memory this buffer belongs to.
    pub fn memory(&self) -> &Arc<DmaMemory> {
        &self.mem
    }

    /// The bytes of the buffer.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the extent is inside a live mapping (the Arc keeps the memory alive) and
        // owned by this buffer; a device may write it concurrently only while an I/O is in
        // flight, during which the I/O layer owns the buffer, not the caller.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes of the buffer, mutable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        if !self.retired.load(Ordering::Relaxed) {
            self.mem.release(self.region, self.offset, self.len);
        }
    }
}

/// Per-thread cache of a memory's regions for lock-free address checks.
pub struct Translator {
    mem: Arc<DmaMemory>,
    generation: u64,
    regions: Arc<[DmaRegionInfo]>,
}

impl Translator {
    /// Device address of `[va, va+len)` if it lies entirely in one region.
    #[inline]
    pub fn translate(&mut self, va: u64, len: u64) -> Option<u64> {
        if let Some(r) = self.regions.iter().find(|r| r.contains(va, len)) {
            return Some(r.iova + (va - r.va));
        }
        let gen = self.mem.generation.load(Ordering::Acquire);
        if gen == self.generation {
            return None;
        }
        self.generation = gen;
        self.regions = self.mem.regions();
        self.regions
            .iter()
            .find(|r| r.contains(va, len))
            .map(|r| r.iova + (va - r.va))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Arc<DmaMemory> {
        DmaMemory::new(DmaConfig {
            initial_region_size: 1 << 20,
            hugetlb: false,
            max_total_size: 8 << 20,
        })
        .unwrap()
    }

    #[test]
    fn alloc_aligned_and_translatable() {
        let mem = small();
        let a = mem.alloc(100, 64).unwrap();
        let b = mem.alloc(4096, 4096).unwrap();
        assert_eq!(a.addr() % 64, 0);
        assert_eq!(b.addr() % 4096, 0);
        let mut t = mem.translator();
        assert_eq!(t.translate(b.addr(), 4096), Some(b.addr()));
        assert_eq!(t.translate(b.addr() + 1, 4096 + (1 << 20)), None);
        let heap = [0u8; 16];
        assert_eq!(t.translate(heap.as_ptr() as u64, 16), None);
    }

    #[test]
    fn a_retired_buffer_is_never_handed_out_again() {
        let mem = small();
        let before = mem.free_bytes();
        let a = mem.alloc(65536, 4096).unwrap();
        let addr = a.addr();
        a.retire();
        drop(a);
        assert_eq!(mem.free_bytes(), before - 65536);
        let b = mem.alloc(65536, 4096).unwrap();
        assert_ne!(b.addr(), addr);
    }

    #[test]
    fn free_coalesces_and_reuses() {
        let mem = small();
        let before = mem.free_bytes();
        let bufs: Vec<DmaBuf> = (0..16).map(|_| mem.alloc(65536, 4096).unwrap()).collect();
        assert_eq!(mem.free_bytes(), before - 16 * 65536);
        drop(bufs);
        assert_eq!(mem.free_bytes(), before);
        // The whole region is one extent again.
        let big = mem.alloc(1 << 20, 4096).unwrap();
        assert_eq!(big.len(), 1 << 20);
    }

    #[test]
    fn grows_and_announces_regions() {
        struct Count(Mutex<Vec<DmaRegionInfo>>);
        impl RegionListener for Count {
            fn region_added(&self, r: &DmaRegionInfo) -> Result<()> {
                self.0.lock().unwrap().push(*r);
                Ok(())
            }
            fn region_removed(&self, _: &DmaRegionInfo) {}
        }
        let mem = small();
        let l: Arc<dyn RegionListener> = Arc::new(Count(Mutex::new(Vec::new())));
        let initial = mem.add_listener(Arc::downgrade(&l));
        assert_eq!(initial.len(), 1);
        let mut t = mem.translator();
        let a = mem.alloc(1 << 20, 4096).unwrap();
        let b = mem.alloc(1 << 20, 4096).unwrap();
        assert_eq!(mem.regions().len(), 2);
        assert!(t.translate(a.addr(), 4096).is_some());
        assert!(t.translate(b.addr(), 4096).is_some());
        let err = mem.alloc(16 << 20, 4096).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    }

    #[test]
    fn rejected_region_is_rolled_back() {
        struct No;
        impl RegionListener for No {
            fn region_added(&self, _: &DmaRegionInfo) -> Result<()> {
                Err(Error::RegionRejected("slots full".into()))
            }
            fn region_removed(&self, _: &DmaRegionInfo) {}
        }
        let mem = small();
        let l: Arc<dyn RegionListener> = Arc::new(No);
        mem.add_listener(Arc::downgrade(&l));
        let _a = mem.alloc(1 << 20, 4096).unwrap();
        assert!(matches!(
            mem.alloc(4096, 4096),
            Err(Error::RegionRejected(_))
        ));
        assert_eq!(mem.regions().len(), 1);
    }

    #[test]
    fn bad_requests_are_errors() {
        let mem = small();
        assert!(mem.alloc(0, 8).is_err());
        assert!(mem.alloc(8, 3).is_err());
        assert!(mem.alloc(1 << 40, 8).is_err());
    }
}
