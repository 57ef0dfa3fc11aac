//! DMA memory: shared regions that every transport can address.
//!
//! A [`DmaMemory`] owns a set of memfd-backed regions (optionally hugetlbfs-backed with
//! `MFD_HUGETLB`), hands out aligned [`DmaBuf`] buffers from them and grows by adding
//! regions when it runs out. Transports register as [`RegionListener`]s so every region
//! is shared with the device (vhost-user `SET_MEM_TABLE` / `ADD_MEM_REG`, VFIO DMA map)
//! before a buffer in it is handed out.
//!
//! How a device addresses the memory is the memory's [`Addressing`]:
//! - [`Addressing::Virtual`] (vhost-user): device addresses (IOVAs) are the process's
//!   virtual addresses, a region is registered with `guest_phys_addr == userspace_addr`.
//! - [`Addressing::Linear`] (VFIO with an IOMMU): each region gets a window of a compact
//!   IOVA space starting at `base`, so the addresses fit IOMMUs narrower than the
//!   process's 47-bit address space (QEMU's vIOMMU has 39 bits).
//! - [`Addressing::Physical`] (uio_pci_generic, VFIO no-IOMMU): the device sees physical
//!   addresses. Regions are hugetlb-backed (a huge page never moves and is physically
//!   contiguous), their physical addresses come from `/proc/self/pagemap`, and a region
//!   is split into *runs* of physically contiguous pages.
//!
//! Every region (every run of a physical region) is linear in device addresses, so
//! translation stays a bounds check plus an offset, and no buffer is ever handed out
//! across a run boundary: a buffer from this memory is always one contiguous device
//! extent, whatever the addressing. The memory's own regions are never removed while it
//! lives; memory a caller shares ([`DmaMemory::add_external`], the C API's mapped memory
//! regions) can be withdrawn, and a [`Translator`] re-reads the region list whenever it
//! changed (one atomic load per translation).

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
/// First region of [`DmaConfig::default`]: two huge pages, room for the rings, request
/// slots and bounce buffers of a few queues; buffers beyond that come in further regions
/// (see [`DmaMemory::reserve`]).
pub const DEFAULT_INITIAL_REGION_SIZE: usize = 4 << 20;
/// First index of external regions (the memory's own regions count up from 0).
pub const EXTERNAL_INDEX_BASE: u32 = 1 << 24;

/// A caller's memory shared with the devices: its runs as announced, and its file.
struct External {
    va: u64,
    len: u64,
    infos: Vec<DmaRegionInfo>,
    /// A duplicate of the caller's descriptor (the caller may close its own).
    _fd: Option<OwnedFd>,
}

/// How a device addresses DMA memory (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Addressing {
    /// Device addresses are virtual addresses (vhost-user).
    #[default]
    Virtual,
    /// A compact IOVA space from `base` (VFIO type-1 IOMMU mappings).
    Linear {
        /// Device address of the first region.
        base: u64,
    },
    /// Physical addresses (no IOMMU): hugetlb-backed, pinned, split at discontinuities.
    Physical,
}

/// How DMA memory is backed and how large it may grow.
#[derive(Debug, Clone)]
pub struct DmaConfig {
    /// Size of the first region in bytes; later regions double up to 1 GiB.
    pub initial_region_size: usize,
    /// Back regions with huge pages (`MFD_HUGETLB`); needs reserved hugepages.
    pub hugetlb: bool,
    /// With `hugetlb`: a region that cannot get huge pages (none reserved, all in use,
    /// a size that is not whole huge pages) uses normal pages instead of failing. Not
    /// with [`Addressing::Physical`], which needs huge pages.
    pub hugetlb_fallback: bool,
    /// Upper bound of all regions together, in bytes.
    pub max_total_size: usize,
    /// How the device addresses the memory. [`Addressing::Physical`] implies `hugetlb`.
    pub addressing: Addressing,
}

impl Default for DmaConfig {
    fn default() -> Self {
        DmaConfig {
            initial_region_size: DEFAULT_INITIAL_REGION_SIZE,
            hugetlb: false,
            hugetlb_fallback: false,
            max_total_size: 64 << 30,
            addressing: Addressing::Virtual,
        }
    }
}

/// What a transport needs to know of one region to share it with a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRegionInfo {
    /// Index of the region within its memory (stable for the memory's life). Runs of one
    /// physically addressed region share the index.
    pub index: u32,
    /// Start virtual address in this process.
    pub va: u64,
    /// Device address of the first byte (`va` itself with [`Addressing::Virtual`]).
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

/// A device-linear piece of a region.
#[derive(Debug, Clone, Copy)]
struct Run {
    off: usize,
    len: usize,
    iova: u64,
}

struct Region {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    /// Device-linear runs, sorted, covering the region.
    runs: Vec<Run>,
    /// Free extents `(offset, len)` sorted by offset, coalesced within runs.
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
            runs: vec![Run {
                off: 0,
                len,
                iova: ptr.as_ptr() as u64,
            }],
            free: vec![(0, len)],
        })
    }

    /// Give the region its device addresses: one run at `iova`, or runs of physically
    /// contiguous pages read from `/proc/self/pagemap`.
    fn set_addressing(&mut self, addressing: Addressing, linear_iova: u64) -> Result<()> {
        self.runs = match addressing {
            Addressing::Virtual => return Ok(()),
            Addressing::Linear { .. } => vec![Run {
                off: 0,
                len: self.len,
                iova: linear_iova,
            }],
            Addressing::Physical => physical_runs(self.ptr.as_ptr() as u64, self.len)?,
        };
        self.free = self.runs.iter().map(|r| (r.off, r.len)).collect();
        Ok(())
    }

    fn infos(&self, index: u32) -> impl Iterator<Item = DmaRegionInfo> + '_ {
        let base = self.ptr.as_ptr() as u64;
        self.runs.iter().map(move |r| DmaRegionInfo {
            index,
            va: base + r.off as u64,
            iova: r.iova,
            len: r.len as u64,
            fd: self.fd.as_raw_fd(),
            fd_offset: r.off as u64,
        })
    }

    /// Device address of byte `off`.
    fn iova_of(&self, off: usize) -> u64 {
        let i = self
            .runs
            .partition_point(|r| r.off <= off)
            .saturating_sub(1);
        let r = &self.runs[i];
        r.iova + (off - r.off) as u64
    }

    /// Whether `off` starts a run (so free extents must not merge across it).
    fn is_run_boundary(&self, off: usize) -> bool {
        off != 0 && self.runs.binary_search_by_key(&off, |r| r.off).is_ok()
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
        // Coalesce with the next, then the previous extent (never across a run boundary:
        // the device addresses there are not contiguous).
        if pos + 1 < self.free.len()
            && off + size == self.free[pos + 1].0
            && !self.is_run_boundary(off + size)
        {
            self.free[pos].1 += self.free[pos + 1].1;
            self.free.remove(pos + 1);
        }
        if pos > 0
            && self.free[pos - 1].0 + self.free[pos - 1].1 == off
            && !self.is_run_boundary(off)
        {
            self.free[pos - 1].1 += self.free[pos].1;
            self.free.remove(pos);
        }
    }

    fn free_bytes(&self) -> usize {
        self.free.iter().map(|&(_, l)| l).sum()
    }

    /// Give the whole pages (of `unit` bytes) of the free extents back to the system;
    /// returns the bytes punched out.
    fn trim(&self, unit: usize) -> usize {
        let mut n = 0;
        for &(off, len) in &self.free {
            let start = round_up(off, unit);
            let end = round_down(off + len, unit);
            if end <= start {
                continue;
            }
            // SAFETY: fallocate on the region's own memfd, within its length; the range
            // is free (no DmaBuf covers it), so nothing in this process or the device
            // uses its contents, which read as zeros afterwards.
            let r = unsafe {
                libc::fallocate(
                    self.fd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start as libc::off_t,
                    (end - start) as libc::off_t,
                )
            };
            if r == 0 {
                n += end - start;
            }
        }
        n
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
    /// Memory a caller owns and shared with the devices ([`DmaMemory::add_external`]).
    external: Vec<External>,
    /// Index of the next external region (indices of external regions start at
    /// [`EXTERNAL_INDEX_BASE`], apart from the memory's own).
    next_external: u32,
    /// Next free device address of [`Addressing::Linear`].
    next_iova: u64,
    /// Device address windows (start, length) of external regions that were withdrawn,
    /// for the next ones: a caller that maps and unmaps regions for ever stays within
    /// the IOMMU's address width.
    free_iova: Vec<(u64, u64)>,
    listeners: Vec<Weak<dyn RegionListener>>,
    snapshot: Arc<[DmaRegionInfo]>,
}

/// A growable set of shared DMA regions with an allocator for aligned buffers.
pub struct DmaMemory {
    config: DmaConfig,
    state: Mutex<State>,
    /// Held while a new region is made and announced (one at a time, in index order),
    /// and by [`add_listener`](Self::add_listener) so that no listener misses one. The
    /// announcement is device I/O (vhost-user ADD_MEM_REG, bounded by the back-end's
    /// reply deadline): `state` is not held across it, so allocations from the
    /// existing regions and releases of every controller go on meanwhile.
    grow: Mutex<()>,
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
    pub fn new(mut config: DmaConfig) -> Result<Arc<DmaMemory>> {
        if config.addressing == Addressing::Physical {
            config.hugetlb = true;
        }
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
        let mut next_iova = match config.addressing {
            Addressing::Linear { base } => base,
            _ => 0,
        };
        let first = Region::create_addressed(size, &config, 0, &mut next_iova)?;
        let snapshot: Arc<[DmaRegionInfo]> = first.infos(0).collect();
        Ok(Arc::new(DmaMemory {
            config,
            state: Mutex::new(State {
                regions: vec![first],
                external: Vec::new(),
                next_external: EXTERNAL_INDEX_BASE,
                next_iova,
                free_iova: Vec::new(),
                listeners: Vec::new(),
                snapshot,
            }),
            grow: Mutex::new(()),
            generation: AtomicU64::new(1),
        }))
    }

    /// The configuration the memory was created with.
    pub fn config(&self) -> &DmaConfig {
        &self.config
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
        // A region being announced is either in the snapshot or announced to this
        // listener too.
        let _grow = self.grow.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Share `len` bytes of the caller's memory at `addr` with every device of this
    /// memory, so that buffers in it are used in place (no bounce copy). `fd` is the file
    /// backing the memory at `fd_offset` (vhost-user devices map it; it is duplicated,
    /// the caller may close its own); without one, only devices that reach memory by
    /// virtual address through an IOMMU (VFIO) can use it. With physical addressing
    /// (no IOMMU) nothing is shared: the memory is not pinned, buffers in it are bounced.
    ///
    /// `addr` and `len` must be page multiples, and the range must not overlap memory
    /// already shared. The caller keeps the memory mapped until
    /// [`remove_external`](Self::remove_external) (or until this memory is dropped) and
    /// has no I/O in flight on it then.
    pub fn add_external(
        &self,
        addr: u64,
        len: u64,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
        fd_offset: u64,
    ) -> Result<()> {
        let bad = |m: String| Err(Error::ExternalRegion(m));
        if len == 0
            || !addr.is_multiple_of(PAGE_SIZE as u64)
            || !len.is_multiple_of(PAGE_SIZE as u64)
        {
            return bad(format!(
                "address {addr:#x} and length {len} must be non-zero multiples of {PAGE_SIZE}"
            ));
        }
        let Some(end) = addr.checked_add(len) else {
            return bad(format!("{addr:#x} + {len} overflows"));
        };
        if fd.is_none() && self.config.addressing == Addressing::Virtual {
            return bad("this device maps shared memory through a file descriptor (vhost-user): give the region's fd (memfd_create, or a file mapped MAP_SHARED)".into());
        }
        let fd = match fd {
            Some(f) => Some(f.try_clone_to_owned().map_err(|e| {
                Error::ExternalRegion(format!("cannot duplicate the region's descriptor: {e}"))
            })?),
            None => None,
        };
        let _grow = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        let st = self.lock();
        let overlaps = |va: u64, l: u64| va < end && addr < va + l;
        if st
            .regions
            .iter()
            .any(|r| overlaps(r.ptr.as_ptr() as u64, r.len as u64))
            || st.external.iter().any(|x| overlaps(x.va, x.len))
        {
            return bad(format!(
                "[{addr:#x}, {end:#x}) overlaps memory already shared"
            ));
        }
        let index = st.next_external;
        let window = round_up(len as usize, HUGE_PAGE_SIZE) as u64;
        // A withdrawn region's window that fits (first fit), else fresh space.
        let reuse = match self.config.addressing {
            Addressing::Linear { .. } => st.free_iova.iter().position(|&(_, l)| l >= window),
            _ => None,
        };
        let iova = match self.config.addressing {
            Addressing::Virtual => Some(addr),
            Addressing::Linear { .. } => Some(match reuse {
                Some(i) => st.free_iova[i].0,
                None => st.next_iova,
            }),
            Addressing::Physical => None,
        };
        let infos: Vec<DmaRegionInfo> = iova
            .map(|iova| DmaRegionInfo {
                index,
                va: addr,
                iova,
                len,
                fd: fd.as_ref().map_or(-1, |f| f.as_raw_fd()),
                fd_offset,
            })
            .into_iter()
            .collect();
        let listeners: Vec<Arc<dyn RegionListener>> =
            st.listeners.iter().filter_map(Weak::upgrade).collect();
        drop(st);
        let mut announced: Vec<(&Arc<dyn RegionListener>, &DmaRegionInfo)> = Vec::new();
        for l in &listeners {
            for info in &infos {
                if let Err(e) = l.region_added(info) {
                    for (done, i) in announced {
                        done.region_removed(i);
                    }
                    return Err(Error::RegionRejected(e.to_string()));
                }
                announced.push((l, info));
            }
        }
        let mut st = self.lock();
        st.next_external += 1;
        if let Addressing::Linear { .. } = self.config.addressing {
            match reuse {
                Some(i) => {
                    let (start, l) = st.free_iova[i];
                    if l > window {
                        st.free_iova[i] = (start + window, l - window);
                    } else {
                        st.free_iova.remove(i);
                    }
                }
                None => st.next_iova += window,
            }
        }
        let mut snap: Vec<DmaRegionInfo> = st.snapshot.to_vec();
        snap.extend(infos.iter().copied());
        st.snapshot = Arc::from(snap);
        st.external.push(External {
            va: addr,
            len,
            infos,
            _fd: fd,
        });
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Stop sharing the caller's memory added as `[addr, addr+len)`; returns whether
    /// there was such a region (exactly those bounds). No I/O may be in flight on it.
    pub fn remove_external(&self, addr: u64, len: u64) -> bool {
        let _grow = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        let Some(pos) = st
            .external
            .iter()
            .position(|x| x.va == addr && x.len == len)
        else {
            return false;
        };
        let gone = st.external.remove(pos);
        if let Addressing::Linear { .. } = self.config.addressing {
            for i in &gone.infos {
                let window = round_up(i.len as usize, HUGE_PAGE_SIZE) as u64;
                st.free_iova.push((i.iova, window));
            }
        }
        let snap: Vec<DmaRegionInfo> = st
            .snapshot
            .iter()
            .filter(|r| !gone.infos.iter().any(|g| g.index == r.index))
            .copied()
            .collect();
        st.snapshot = Arc::from(snap);
        self.generation.fetch_add(1, Ordering::Release);
        let listeners: Vec<Arc<dyn RegionListener>> =
            st.listeners.iter().filter_map(Weak::upgrade).collect();
        drop(st);
        for l in &listeners {
            for info in &gone.infos {
                l.region_removed(info);
            }
        }
        true
    }

    /// Give the pages of free buffers back to the system (a burst of large I/O leaves
    /// the regions grown; they stay mapped, and pages come back as they are used
    /// again). Returns the bytes given back. Only memory the device addresses by
    /// virtual address (vhost-user, which maps the same files) is trimmed: pages that
    /// are pinned for a device (VFIO, physical addresses) must stay where they are.
    pub fn trim(&self) -> usize {
        if self.config.addressing != Addressing::Virtual {
            return 0;
        }
        let unit = if self.config.hugetlb {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        self.lock().regions.iter().map(|r| r.trim(unit)).sum()
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
        if let Some(buf) = self.alloc_existing(size, align) {
            return Ok(buf);
        }
        let _grow = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have grown the memory meanwhile.
        if let Some(buf) = self.alloc_existing(size, align) {
            return Ok(buf);
        }
        let (index, off) = self.grow(size, align, true)?;
        let st = self.lock();
        Ok(self.make_buf(&st.regions[index], index, off, size))
    }

    /// Make sure `bytes` of buffers to come fit without growing the memory piece by
    /// piece: when less than `bytes` is free in all regions together, add one region of
    /// at least `bytes` (announced to the devices once). For a program that knows its
    /// work before it allocates (`vireo perf`: queue depth x I/O size per job), so the
    /// memory is sized to it instead of a large first region held by every process.
    /// Errors as [`alloc`](Self::alloc) when the memory may not grow that much or a
    /// device refuses the region.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Result<()> {
        if bytes == 0 || self.free_bytes() >= bytes {
            return Ok(());
        }
        if bytes > self.config.max_total_size {
            return Err(Error::OutOfMemory {
                size: bytes,
                limit: self.config.max_total_size,
            });
        }
        let _grow = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        if self.free_bytes() >= bytes {
            return Ok(());
        }
        self.grow(bytes, 1, false)?;
        Ok(())
    }

    /// Add a region with room for `size` bytes at `align` (at least double the last
    /// region, at most 1 GiB unless the request needs more), announce it, and (`take`)
    /// allocate that extent in it: (region index, offset; 0 without `take`). The caller
    /// holds `grow`.
    fn grow(self: &Arc<Self>, size: usize, align: usize, take: bool) -> Result<(usize, usize)> {
        let st = self.lock();
        // Grow: a new region at least double the last one, big enough for the request.
        let unit = if self.config.hugetlb {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        let total: usize = st.regions.iter().map(|r| r.len).sum();
        let last = st.regions.last().map(|r| r.len).unwrap_or(0);
        // A region starts on a page: an alignment up to that costs no room, a larger one
        // may cost up to `align` (a hugetlb region that fell back to normal pages is
        // only page-aligned).
        let need = if align <= PAGE_SIZE {
            size
        } else {
            size + align
        };
        let want = round_up(need, unit).max((last * 2).min(MAX_REGION_SIZE));
        let room = self.config.max_total_size.saturating_sub(total);
        let len = want.min(round_down(room, unit));
        if len < need {
            return Err(Error::OutOfMemory {
                size,
                limit: self.config.max_total_size,
            });
        }
        let index = st.regions.len();
        let mut next_iova = st.next_iova;
        let listeners: Vec<Arc<dyn RegionListener>> =
            st.listeners.iter().filter_map(Weak::upgrade).collect();
        // Only growers (one at a time, under `grow`) push regions or move next_iova.
        drop(st);
        let mut region = Region::create_addressed(len, &self.config, index, &mut next_iova)?;
        let off = if take {
            region.alloc(size, align).ok_or_else(|| {
                Error::InvalidAllocation(format!(
                    "no physically contiguous extent of {size} bytes in a new region of {len} bytes; allocate smaller buffers"
                ))
            })?
        } else {
            0
        };
        let infos: Vec<DmaRegionInfo> = region.infos(index as u32).collect();
        let mut announced: Vec<(&Arc<dyn RegionListener>, &DmaRegionInfo)> = Vec::new();
        for l in &listeners {
            for info in &infos {
                if let Err(e) = l.region_added(info) {
                    for (done, i) in announced {
                        done.region_removed(i);
                    }
                    return Err(Error::RegionRejected(e.to_string()));
                }
                announced.push((l, info));
            }
        }
        let mut st = self.lock();
        st.next_iova = next_iova;
        st.regions.push(region);
        let mut snap: Vec<DmaRegionInfo> = st.snapshot.to_vec();
        snap.extend(infos);
        st.snapshot = Arc::from(snap);
        self.generation.fetch_add(1, Ordering::Release);
        Ok((index, off))
    }

    /// A buffer from the regions there are, if one has room.
    fn alloc_existing(self: &Arc<Self>, size: usize, align: usize) -> Option<DmaBuf> {
        let mut st = self.lock();
        for (i, r) in st.regions.iter_mut().enumerate() {
            if let Some(off) = r.alloc(size, align) {
                return Some(self.make_buf(r, i, off, size));
            }
        }
        None
    }

    fn make_buf(self: &Arc<Self>, r: &Region, index: usize, off: usize, size: usize) -> DmaBuf {
        // SAFETY: `off + size <= r.len` (the allocator only returns extents inside the
        // region), so the pointer stays inside the mapping.
        let ptr = unsafe { NonNull::new_unchecked(r.ptr.as_ptr().add(off)) };
        DmaBuf {
            mem: self.clone(),
            region: index as u32,
            retired: AtomicBool::new(false),
            _niche: Niche::Zero,
            len: size,
            ptr,
            iova: r.iova_of(off),
        }
    }

    /// Free the extent of `len` bytes at address `addr` in region `region`.
    fn release(&self, region: u32, addr: usize, len: usize) {
        let mut st = self.lock();
        if let Some(r) = st.regions.get_mut(region as usize) {
            let base = r.ptr.as_ptr() as usize;
            if let Some(off) = addr.checked_sub(base).filter(|o| o + len <= r.len) {
                r.release(off, len);
            }
        }
    }
}

impl Region {
    /// Create region `index` of `len` bytes with device addresses per `config`;
    /// [`Addressing::Linear`] windows are taken from `next_iova` (2 MiB aligned).
    fn create_addressed(
        len: usize,
        config: &DmaConfig,
        index: usize,
        next_iova: &mut u64,
    ) -> Result<Region> {
        let first = Region::create(len, config.hugetlb, index);
        let first = match first {
            Err(e)
                if config.hugetlb
                    && config.hugetlb_fallback
                    && config.addressing != Addressing::Physical =>
            {
                tracing::info!("DMA region {index} ({len} bytes) without huge pages: {e}");
                Region::create(len, false, index)
            }
            r => r,
        };
        let mut r = first.map_err(|e| {
            if config.addressing != Addressing::Physical {
                return e;
            }
            let cause = match &e {
                Error::MemfdCreate { source, .. }
                | Error::MemfdSize { source, .. }
                | Error::Mmap { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            Error::Physical(format!(
                "cannot get {} MiB of huge pages ({cause}). Without an IOMMU the device needs physical addresses, which vireo takes from huge pages: reserve them (echo 512 > /proc/sys/vm/nr_hugepages: 1 GiB of 2 MiB pages), or bind the function to vfio-pci with an IOMMU",
                len >> 20
            ))
        })?;
        r.set_addressing(config.addressing, *next_iova)?;
        if let Addressing::Linear { .. } = config.addressing {
            *next_iova += round_up(len, HUGE_PAGE_SIZE) as u64;
        }
        Ok(r)
    }
}

/// Runs of physically contiguous pages of the mapping `[va, va+len)` (populated,
/// hugetlb-backed), from `/proc/self/pagemap`.
fn physical_runs(va: u64, len: usize) -> Result<Vec<Run>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open("/proc/self/pagemap")
        .map_err(|e| Error::Physical(format!("cannot open /proc/self/pagemap: {e}")))?;
    let mut runs: Vec<Run> = Vec::new();
    let mut off = 0usize;
    while off < len {
        let page = (va + off as u64) / PAGE_SIZE as u64;
        let mut entry = [0u8; 8];
        f.seek(SeekFrom::Start(page * 8))
            .and_then(|_| f.read_exact(&mut entry))
            .map_err(|e| Error::Physical(format!("cannot read /proc/self/pagemap: {e}")))?;
        let phys = pagemap_phys(u64::from_le_bytes(entry)).ok_or_else(|| {
            Error::Physical(
                "/proc/self/pagemap shows no page frame numbers: physical addresses need root (CAP_SYS_ADMIN)".into(),
            )
        })?;
        match runs.last_mut() {
            Some(r) if r.iova + r.len as u64 == phys => r.len += HUGE_PAGE_SIZE,
            _ => runs.push(Run {
                off,
                len: HUGE_PAGE_SIZE,
                iova: phys,
            }),
        }
        off += HUGE_PAGE_SIZE;
    }
    Ok(runs)
}

/// Physical address of the page a pagemap entry describes, if present with a frame number.
fn pagemap_phys(entry: u64) -> Option<u64> {
    let present = entry & (1 << 63) != 0;
    let pfn = entry & ((1 << 55) - 1);
    (present && pfn != 0).then_some(pfn * PAGE_SIZE as u64)
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
    /// The device may still use the extent: never hand it out again.
    retired: AtomicBool,
    /// Spare values for the layouts of enums and options around a buffer, which then
    /// need no tag of their own (`Option<IoBuf>` in a completion: the I/O path moves
    /// completions, and at 128 bytes or less a move is a few stores, not a memcpy call).
    _niche: Niche,
    len: usize,
    /// First byte; its offset in the region is `ptr - region start`.
    ptr: NonNull<u8>,
    /// Device address of the first byte (the extent is device-contiguous).
    iova: u64,
}

/// A byte with one valid value (see `DmaBuf::_niche`).
#[repr(u8)]
enum Niche {
    Zero = 0,
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
        self.iova
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
            self.mem
                .release(self.region, self.ptr.as_ptr() as usize, self.len);
        }
    }
}

/// A caller's buffer, for the length of one I/O: memory vireo does not own (the C
/// API's request buffers). Used in place when it lies in memory shared with the device
/// ([`DmaMemory::add_external`], or a [`DmaBuf`]'s region), else bounced.
#[derive(Debug)]
pub struct ForeignBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the creator of a ForeignBuf promised exclusive access to its bytes until the
// buffer is dropped (see `ForeignBuf::new`), like a `&'static mut [u8]` it hands over.
unsafe impl Send for ForeignBuf {}
// SAFETY: shared references only read through `as_slice`.
unsafe impl Sync for ForeignBuf {}

impl ForeignBuf {
    /// A buffer over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes, and nothing else may
    /// access them, until the returned buffer is dropped (for an I/O: until its
    /// completion hands the buffer back).
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> ForeignBuf {
        ForeignBuf { ptr, len }
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no bytes.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Virtual address of the first byte.
    #[inline]
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `new`'s contract: valid and exclusively ours for `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_slice`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
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
        // External regions can go away: the cached list is used only while it is current.
        let gen = self.mem.generation.load(Ordering::Acquire);
        if gen != self.generation {
            self.generation = gen;
            self.regions = self.mem.regions();
        }
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
            hugetlb_fallback: false,
            max_total_size: 8 << 20,
            addressing: Addressing::Virtual,
        })
        .unwrap()
    }

    /// A listener that records what it was told.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(bool, DmaRegionInfo)>>);

    impl RegionListener for Recorder {
        fn region_added(&self, region: &DmaRegionInfo) -> Result<()> {
            self.0.lock().unwrap().push((true, *region));
            Ok(())
        }
        fn region_removed(&self, region: &DmaRegionInfo) {
            self.0.lock().unwrap().push((false, *region));
        }
    }

    /// Caller memory: a memfd of `len` bytes mapped shared.
    /// Memory of 8 MiB at most, addressed by IOVA windows from 4 GiB (as behind an
    /// IOMMU), with a first region of 1 MiB.
    fn linear_memory() -> Arc<DmaMemory> {
        DmaMemory::new(DmaConfig {
            initial_region_size: 1 << 20,
            hugetlb: false,
            hugetlb_fallback: false,
            max_total_size: 8 << 20,
            addressing: Addressing::Linear { base: 1 << 32 },
        })
        .unwrap()
    }

    fn caller_memory(len: usize) -> (OwnedFd, u64) {
        let r = Region::create(len, false, 99).unwrap();
        // Keep the mapping: the region's Drop would unmap it.
        let r = std::mem::ManuallyDrop::new(r);
        (r.fd.try_clone().unwrap(), r.ptr.as_ptr() as u64)
    }

    #[test]
    fn external_memory_is_announced_translated_and_withdrawn() {
        use std::os::fd::AsFd;
        let mem = small();
        let rec = Arc::new(Recorder::default());
        let listener: Arc<dyn RegionListener> = rec.clone();
        mem.add_listener(Arc::downgrade(&listener));
        let mut t = mem.translator();
        let (fd, va) = caller_memory(1 << 20);
        assert_eq!(t.translate(va + 4096, 512), None);
        mem.add_external(va, 1 << 20, Some(fd.as_fd()), 0).unwrap();
        // Virtual addressing: the device address is the address.
        assert_eq!(t.translate(va + 4096, 512), Some(va + 4096));
        // Not across its end.
        assert_eq!(t.translate(va + (1 << 20) - 256, 512), None);
        // Overlaps are refused, as is memory that is not page-aligned.
        assert!(mem
            .add_external(va + 4096, 4096, Some(fd.as_fd()), 4096)
            .is_err());
        assert!(mem
            .add_external(va + (1 << 20) + 1, 4096, Some(fd.as_fd()), 0)
            .is_err());
        // vhost-user needs the file.
        assert!(mem.add_external(va + (2 << 20), 4096, None, 0).is_err());
        assert!(
            !mem.remove_external(va, 4096),
            "only the bounds it was added with"
        );
        assert!(mem.remove_external(va, 1 << 20));
        assert_eq!(
            t.translate(va + 4096, 512),
            None,
            "a withdrawn region no longer translates"
        );
        let seen = rec.0.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert!(seen[0].0 && !seen[1].0);
        assert_eq!(
            (seen[0].1.va, seen[0].1.len, seen[0].1.fd_offset),
            (va, 1 << 20, 0)
        );
        assert!(seen[0].1.index >= EXTERNAL_INDEX_BASE);
        assert_eq!(seen[0].1, seen[1].1);
    }

    /// Pages a region's file has allocated.
    fn allocated(mem: &DmaMemory) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let st = mem.lock();
        st.regions
            .iter()
            .map(|r| {
                let f = std::fs::File::from(r.fd.try_clone().unwrap());
                f.metadata().unwrap().blocks() * 512
            })
            .sum()
    }

    /// Trimming gives the pages of free extents back (they read as zeros when used
    /// again) and leaves those of live buffers alone; memory pinned for a device
    /// (linear or physical addressing) is never trimmed.
    #[test]
    fn trim_gives_free_pages_back_and_keeps_live_ones() {
        let mem = small();
        let mut keep = mem.alloc(64 << 10, 4096).unwrap();
        keep.as_mut_slice().fill(0x5a);
        let mut big = mem.alloc(512 << 10, 4096).unwrap();
        big.as_mut_slice().fill(0xa5);
        let before = allocated(&mem);
        drop(big);
        let n = mem.trim();
        assert!(n >= 512 << 10, "trimmed {n} bytes");
        assert!(allocated(&mem) + (512 << 10) <= before);
        assert!(
            keep.as_slice().iter().all(|&b| b == 0x5a),
            "a live buffer kept"
        );
        let again = mem.alloc(512 << 10, 4096).unwrap();
        assert!(
            again.as_slice().iter().all(|&b| b == 0),
            "trimmed pages read as zeros"
        );
        let linear = linear_memory();
        drop(linear.alloc(4096, 4096).unwrap());
        assert_eq!(linear.trim(), 0);
    }

    #[test]
    fn linear_addressing_gives_each_region_a_window_from_the_base() {
        let mem = linear_memory();
        let a = mem.alloc(4096, 4096).unwrap();
        assert_eq!(a.iova(), 1 << 32);
        let b = mem.alloc(1 << 20, 4096).unwrap();
        // The second region starts at the next 2 MiB boundary of the IOVA space.
        assert_eq!(b.iova(), (1 << 32) + (2 << 20));
        let mut t = mem.translator();
        assert_eq!(t.translate(a.addr() + 8, 16), Some(a.iova() + 8));
        assert_eq!(t.translate(b.addr(), 1 << 20), Some(b.iova()));
        let regions = mem.regions();
        assert!(regions
            .iter()
            .all(|r| r.iova >= 1 << 32 && r.iova < (1 << 32) + (8 << 20)));
    }

    /// A caller that maps and unmaps regions for ever stays within the IOMMU's address
    /// width: a withdrawn region's window is given to the next one that fits (the
    /// windows only grew, and past 2^39 every map failed).
    #[test]
    fn withdrawn_external_windows_are_reused() {
        use std::os::fd::AsFd;
        let mem = linear_memory();
        let (fd, va) = caller_memory(4 << 20);
        let iova_of = |mem: &Arc<DmaMemory>, va: u64| mem.translator().translate(va, 4096);
        mem.add_external(va, 1 << 20, Some(fd.as_fd()), 0).unwrap();
        let first = iova_of(&mem, va).unwrap();
        let mut highest = first;
        for _ in 0..600 {
            assert!(mem.remove_external(va, 1 << 20));
            mem.add_external(va, 1 << 20, Some(fd.as_fd()), 0).unwrap();
            highest = highest.max(iova_of(&mem, va).unwrap());
        }
        assert_eq!(
            highest, first,
            "the window is reused, not a new one each time"
        );
        // A smaller region takes part of a larger withdrawn window; a larger one new space.
        assert!(mem.remove_external(va, 1 << 20));
        mem.add_external(va, 4096, Some(fd.as_fd()), 0).unwrap();
        assert_eq!(iova_of(&mem, va), Some(first));
        mem.add_external(va + (2 << 20), 2 << 20, Some(fd.as_fd()), 2 << 20)
            .unwrap();
        assert!(iova_of(&mem, va + (2 << 20)).unwrap() > first);
    }

    #[test]
    fn buffers_never_cross_a_physical_discontinuity() {
        // A region whose second half is not contiguous with its first in device space.
        let mut r = Region::create(1 << 20, false, 0).unwrap();
        r.runs = vec![
            Run {
                off: 0,
                len: 512 << 10,
                iova: 0x4000_0000,
            },
            Run {
                off: 512 << 10,
                len: 512 << 10,
                iova: 0x1000_0000,
            },
        ];
        r.free = r.runs.iter().map(|x| (x.off, x.len)).collect();
        // Too big for either run, though the region has room.
        assert_eq!(r.alloc(600 << 10, 4096), None);
        let a = r.alloc(300 << 10, 4096).unwrap();
        let b = r.alloc(300 << 10, 4096).unwrap();
        assert_eq!(a, 0);
        assert_eq!(b, 512 << 10, "the second buffer starts in the second run");
        assert_eq!(r.iova_of(b + 8), 0x1000_0008);
        assert_eq!(r.iova_of(a + 4096), 0x4000_1000);
        // Freed extents coalesce within each run only.
        r.release(a, 300 << 10);
        r.release(b, 300 << 10);
        assert_eq!(r.free, vec![(0, 512 << 10), (512 << 10, 512 << 10)]);
        assert_eq!(r.alloc(600 << 10, 4096), None);
        let infos: Vec<_> = r.infos(3).collect();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[1].fd_offset, 512 << 10);
        assert_eq!(infos[1].iova, 0x1000_0000);
        assert_eq!(infos[1].va, r.ptr.as_ptr() as u64 + (512 << 10));
    }

    #[test]
    fn pagemap_entries_are_decoded() {
        assert_eq!(pagemap_phys(0), None, "not present");
        assert_eq!(
            pagemap_phys(1 << 63),
            None,
            "present without a frame number (no CAP_SYS_ADMIN)"
        );
        assert_eq!(pagemap_phys((1 << 63) | 0x1234), Some(0x1234 << 12));
        assert_eq!(
            pagemap_phys((1 << 63) | (1 << 61) | 0x10),
            Some(0x10000),
            "flags above bit 54 are not the frame"
        );
    }

    /// Physical addressing needs root and reserved huge pages: where they exist (CI's
    /// guest tests reserve them), the runs must describe the pages the kernel gave.
    #[test]
    fn physical_addressing_reads_pagemap_or_says_what_to_reserve() {
        let r = DmaMemory::new(DmaConfig {
            initial_region_size: 4 << 20,
            hugetlb: false,
            hugetlb_fallback: false,
            max_total_size: 64 << 20,
            addressing: Addressing::Physical,
        });
        match r {
            Ok(mem) => {
                let b = mem.alloc(8192, 4096).unwrap();
                assert_ne!(b.iova(), b.addr());
                assert_eq!(b.iova() % 4096, 0);
            }
            Err(e) => {
                let m = e.to_string();
                assert!(
                    m.contains("nr_hugepages") || m.contains("CAP_SYS_ADMIN"),
                    "the error says what to do: {m}"
                );
            }
        }
    }

    #[test]
    fn huge_pages_fall_back_to_normal_pages_only_when_asked() {
        let cfg = |fallback| DmaConfig {
            initial_region_size: 3 << 20,
            hugetlb: true,
            hugetlb_fallback: fallback,
            max_total_size: 16 << 20,
            addressing: Addressing::Virtual,
        };
        // With the fallback it works whether or not the machine has huge pages.
        let mem = DmaMemory::new(cfg(true)).expect("normal pages instead");
        let b = mem.alloc(4096, 4096).unwrap();
        assert!(mem.translator().translate(b.addr(), 4096).is_some());
        // Without, it needs them.
        let free = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if free == 0 {
            assert!(DmaMemory::new(cfg(false)).is_err());
        }
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
    fn reserve_adds_one_region_sized_to_the_work_and_only_when_needed() {
        let mem = DmaMemory::new(DmaConfig {
            initial_region_size: 1 << 20,
            max_total_size: 64 << 20,
            ..DmaConfig::default()
        })
        .unwrap();
        // What the first region has free is enough: nothing grows.
        mem.reserve(256 << 10).unwrap();
        assert_eq!(mem.regions().len(), 1);
        // 24 buffers of 512 KiB: one region of at least 12 MiB, announced once, and
        // every buffer then fits without another.
        mem.reserve(24 * (512 << 10)).unwrap();
        assert_eq!(mem.regions().len(), 2);
        assert!(mem.regions()[1].len >= 12 << 20);
        let bufs: Vec<DmaBuf> = (0..24)
            .map(|_| mem.alloc(512 << 10, 4096).unwrap())
            .collect();
        assert_eq!(mem.regions().len(), 2, "no growth after the reservation");
        drop(bufs);
        // Beyond what the memory may hold: the error of an allocation that big.
        assert!(matches!(
            mem.reserve(128 << 20),
            Err(Error::OutOfMemory { .. })
        ));
        assert!(mem.reserve(0).is_ok());
    }

    /// A listener that takes long to register a region (a frozen vhost-user back-end
    /// takes the reply deadline) holds up neither allocations from the regions there
    /// are nor releases: only the growth waits for it.
    #[test]
    fn a_slow_announcement_holds_up_neither_allocations_nor_releases() {
        use std::sync::atomic::AtomicBool;
        use std::time::{Duration, Instant};
        struct Slow {
            entered: AtomicBool,
            go: Mutex<std::sync::mpsc::Receiver<()>>,
        }
        impl RegionListener for Slow {
            fn region_added(&self, _: &DmaRegionInfo) -> Result<()> {
                self.entered.store(true, Ordering::Release);
                let _ = self.go.lock().unwrap().recv_timeout(Duration::from_secs(5));
                Ok(())
            }
            fn region_removed(&self, _: &DmaRegionInfo) {}
        }
        let mem = small();
        let (tx, rx) = std::sync::mpsc::channel();
        let slow = Arc::new(Slow {
            entered: AtomicBool::new(false),
            go: Mutex::new(rx),
        });
        let l: Arc<dyn RegionListener> = slow.clone();
        mem.add_listener(Arc::downgrade(&l));
        let a = mem.alloc(512 << 10, 4096).unwrap();
        let grower = {
            let mem = mem.clone();
            std::thread::spawn(move || mem.alloc(1 << 20, 4096).map(|b| b.len()))
        };
        let t0 = Instant::now();
        while !slow.entered.load(Ordering::Acquire) {
            assert!(t0.elapsed() < Duration::from_secs(5), "no growth");
            std::thread::sleep(Duration::from_millis(1));
        }
        let t0 = Instant::now();
        drop(a);
        let b = mem.alloc(4096, 4096).unwrap();
        let took = t0.elapsed();
        tx.send(()).unwrap();
        assert!(
            took < Duration::from_secs(2),
            "a release and an allocation waited {took:?} for the announcement"
        );
        assert_eq!(grower.join().unwrap().unwrap(), 1 << 20);
        assert_eq!(mem.regions().len(), 2);
        drop(b);
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
