//! Backing stores of the target's disks: an anonymous RAM mapping or a file, both accessed
//! directly from/to guest memory slices, safe to use from several queue threads at once.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{MmapRegion, VolatileMemory, VolatileSlice};

use crate::blk_config::Backing;
use crate::TargetError;

/// Zeros used to clear memory and files in chunks.
static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

/// Where a disk's bytes live.
#[derive(Debug)]
pub(crate) enum Storage {
    /// A private anonymous mapping (`MAP_NORESERVE`): pages appear on first write.
    Ram { region: MmapRegion<()>, size: u64 },
    /// A file or block device, read and written with `pread`/`pwrite`.
    File {
        file: File,
        size: u64,
        path: PathBuf,
    },
}

fn off_t(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn to_usize(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Fills `slice` with zeros.
fn zero_slice<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) -> io::Result<()> {
    let mut done = 0;
    while done < slice.len() {
        let n = (slice.len() - done).min(ZEROS.len());
        slice
            .subslice(done, n)
            .map_err(io::Error::other)?
            .copy_from(&ZEROS[..n]);
        done += n;
    }
    Ok(())
}

impl Storage {
    /// Opens (or creates) the backing store; the capacity is a multiple of `block_size`.
    pub(crate) fn open(
        backing: &Backing,
        block_size: u32,
        read_only: bool,
    ) -> Result<Self, TargetError> {
        match backing {
            Backing::Ram { size_bytes } => {
                let size =
                    usize::try_from(*size_bytes).map_err(|_| TargetError::InvalidConfig {
                        field: "backend.size_bytes",
                        reason: format!("{size_bytes} does not fit the address space"),
                    })?;
                let region = MmapRegion::new(size).map_err(|source| TargetError::MapRam {
                    size: *size_bytes,
                    source,
                })?;
                Ok(Storage::Ram {
                    region,
                    size: *size_bytes,
                })
            }
            Backing::File { path, size_bytes } => {
                Self::open_file(path, *size_bytes, block_size, read_only)
            }
        }
    }

    fn open_file(
        path: &Path,
        size_bytes: Option<u64>,
        block_size: u32,
        read_only: bool,
    ) -> Result<Self, TargetError> {
        let create = size_bytes.is_some() && !read_only;
        // A file it creates holds the disk's data: the owner's only, whatever the umask
        // (an existing file keeps its mode).
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|source| TargetError::OpenBacking {
                path: path.to_path_buf(),
                source,
            })?;
        // Seeking to the end also gives the size of block devices, whose metadata says 0.
        let current = file
            .seek(SeekFrom::End(0))
            .map_err(|source| TargetError::OpenBacking {
                path: path.to_path_buf(),
                source,
            })?;
        let size = match size_bytes {
            Some(wanted) if current >= wanted => wanted,
            Some(wanted) if read_only => {
                return Err(TargetError::BackingTooSmall {
                    path: path.to_path_buf(),
                    size: current,
                    needed: wanted,
                })
            }
            Some(wanted) => {
                file.set_len(wanted)
                    .map_err(|source| TargetError::ResizeBacking {
                        path: path.to_path_buf(),
                        size: wanted,
                        source,
                    })?;
                wanted
            }
            None => current - current % u64::from(block_size),
        };
        if size == 0 {
            return Err(TargetError::BackingTooSmall {
                path: PathBuf::from(path),
                size: current,
                needed: u64::from(block_size),
            });
        }
        Ok(Storage::File {
            file,
            size,
            path: path.to_path_buf(),
        })
    }

    /// Changes the capacity to `size` bytes: a file is grown (sparse) or truncated; a RAM disk
    /// moves to a new mapping with the data that still fits (all-zero chunks are not copied, so
    /// untouched pages stay unallocated).
    pub(crate) fn resize(&mut self, size: u64) -> Result<(), TargetError> {
        match self {
            Storage::Ram { region, size: old } => {
                let len = usize::try_from(size).map_err(|_| TargetError::InvalidConfig {
                    field: "size_bytes",
                    reason: format!("{size} does not fit the address space"),
                })?;
                let new =
                    MmapRegion::new(len).map_err(|source| TargetError::MapRam { size, source })?;
                let keep = usize::try_from((*old).min(size)).unwrap_or(len);
                let mut buf = vec![0u8; ZEROS.len()];
                let mut done = 0usize;
                while done < keep {
                    let n = (keep - done).min(buf.len());
                    // Both ranges lie inside their mappings (`keep` is at most either size).
                    let copied = region.get_slice(done, n).and_then(|src| {
                        src.copy_to(&mut buf[..n]);
                        if buf[..n].iter().any(|&b| b != 0) {
                            new.get_slice(done, n)?.copy_from(&buf[..n]);
                        }
                        Ok(())
                    });
                    copied.map_err(|e| TargetError::MapRam {
                        size,
                        source: vm_memory::mmap::MmapRegionError::Mmap(io::Error::other(e)),
                    })?;
                    done += n;
                }
                *region = new;
                *old = size;
                Ok(())
            }
            Storage::File {
                file,
                size: old,
                path,
            } => {
                file.set_len(size)
                    .map_err(|source| TargetError::ResizeBacking {
                        path: path.clone(),
                        size,
                        source,
                    })?;
                *old = size;
                Ok(())
            }
        }
    }

    /// Capacity in bytes.
    pub(crate) fn size(&self) -> u64 {
        match self {
            Storage::Ram { size, .. } | Storage::File { size, .. } => *size,
        }
    }

    fn ram_slice(
        region: &MmapRegion<()>,
        offset: u64,
        len: usize,
    ) -> io::Result<VolatileSlice<'_, ()>> {
        region
            .get_slice(to_usize(offset)?, len)
            .map_err(io::Error::other)
    }

    /// Reads `dst.len()` bytes at `offset` into `dst`. Callers check the range.
    pub(crate) fn read_into<B: BitmapSlice>(
        &self,
        offset: u64,
        dst: &VolatileSlice<'_, B>,
    ) -> io::Result<()> {
        match self {
            Storage::Ram { region, .. } => {
                Self::ram_slice(region, offset, dst.len())?.copy_to_volatile_slice(dst.clone());
                Ok(())
            }
            Storage::File { file, .. } => pread_into(file, offset, dst),
        }
    }

    /// Writes `src` at `offset`. Callers check the range.
    pub(crate) fn write_from<B: BitmapSlice>(
        &self,
        offset: u64,
        src: &VolatileSlice<'_, B>,
    ) -> io::Result<()> {
        match self {
            Storage::Ram { region, .. } => {
                let dst = Self::ram_slice(region, offset, src.len())?;
                src.copy_to_volatile_slice(dst);
                Ok(())
            }
            Storage::File { file, .. } => pwrite_from(file, offset, src),
        }
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeros afterwards.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Storage::Ram { region, .. } => ram_zero(region, offset, len),
            Storage::File { file, .. } => {
                match fallocate(
                    file,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                ) {
                    // A discard is a hint: a file system without hole punching keeps the data.
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                    other => other,
                }
            }
        }
    }

    /// Zeroes `len` bytes at `offset`, deallocating them when `unmap` allows it.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        match self {
            Storage::Ram { region, .. } => ram_zero(region, offset, len),
            Storage::File { file, .. } => {
                let mut modes = Vec::with_capacity(2);
                if unmap {
                    modes.push(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
                }
                modes.push(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE);
                for mode in modes {
                    match fallocate(file, mode, offset, len) {
                        Ok(()) => return Ok(()),
                        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => continue,
                        Err(e) => return Err(e),
                    }
                }
                pwrite_zeros(file, offset, len)
            }
        }
    }

    /// Makes written data durable.
    pub(crate) fn flush(&self) -> io::Result<()> {
        match self {
            Storage::Ram { .. } => Ok(()),
            Storage::File { file, .. } => file.sync_data(),
        }
    }
}

/// Zeroes part of the RAM disk: whole pages are handed back to the kernel (they read as zero
/// afterwards and cost no memory), the unaligned edges are cleared by hand.
fn ram_zero(region: &MmapRegion<()>, offset: u64, len: u64) -> io::Result<()> {
    let start = to_usize(offset)?;
    let len = to_usize(len)?;
    let end = start
        .checked_add(len)
        .filter(|&end| end <= region.size())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let page = 4096usize;
    let inner_start = start.next_multiple_of(page);
    let inner_end = end - end % page;
    if inner_start < inner_end {
        zero_slice(
            &region
                .get_slice(start, inner_start - start)
                .map_err(io::Error::other)?,
        )?;
        // SAFETY: `inner_start..inner_end` lies inside the mapping owned by `region` (checked
        // against its size above) and is page aligned. MADV_DONTNEED on this private anonymous
        // mapping only replaces those pages with zero pages; every other access to the mapping
        // goes through volatile slices, so no Rust reference observes the change.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().add(inner_start).cast(),
                inner_end - inner_start,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            // Not fatal: clear the pages by hand instead.
            zero_slice(
                &region
                    .get_slice(inner_start, inner_end - inner_start)
                    .map_err(io::Error::other)?,
            )?;
        }
        zero_slice(
            &region
                .get_slice(inner_end, end - inner_end)
                .map_err(io::Error::other)?,
        )
    } else {
        zero_slice(&region.get_slice(start, len).map_err(io::Error::other)?)
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (off_t(offset)?, off_t(len)?);
    loop {
        // SAFETY: fallocate on a file descriptor we own; it touches no memory of ours.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `pread` straight into guest memory; bytes past the end of the file read as zeros.
fn pread_into<B: BitmapSlice>(
    file: &File,
    offset: u64,
    dst: &VolatileSlice<'_, B>,
) -> io::Result<()> {
    let guard = dst.ptr_guard_mut();
    let base = guard.as_ptr();
    let len = dst.len();
    let mut done = 0usize;
    while done < len {
        let pos = off_t(offset + done as u64)?;
        // SAFETY: `base..base + len` is the guest memory behind `dst`, mapped for as long as
        // `guard` lives; the kernel writes at most `len - done` bytes starting at
        // `base + done`, which stays inside that range.
        let n = unsafe { libc::pread(file.as_raw_fd(), base.add(done).cast(), len - done, pos) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // End of file (a shorter file than the disk is only possible if someone truncated
            // it behind our back): the rest reads as zeros, like a hole.
            return zero_slice(&dst.subslice(done, len - done).map_err(io::Error::other)?);
        }
        done += n as usize;
    }
    Ok(())
}

/// `pwrite` straight from guest memory.
fn pwrite_from<B: BitmapSlice>(
    file: &File,
    offset: u64,
    src: &VolatileSlice<'_, B>,
) -> io::Result<()> {
    let guard = src.ptr_guard();
    let base = guard.as_ptr();
    let len = src.len();
    let mut done = 0usize;
    while done < len {
        let pos = off_t(offset + done as u64)?;
        // SAFETY: `base..base + len` is the guest memory behind `src`, mapped for as long as
        // `guard` lives; the kernel reads at most `len - done` bytes from `base + done`.
        let n = unsafe { libc::pwrite(file.as_raw_fd(), base.add(done).cast(), len - done, pos) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += n as usize;
    }
    Ok(())
}

/// Writes `len` zero bytes at `offset` (when the file system cannot zero a range itself).
fn pwrite_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(storage: &Storage, offset: u64, data: &[u8]) {
        let mut copy = data.to_vec();
        storage
            .write_from(offset, &VolatileSlice::from(&mut copy[..]))
            .unwrap();
    }

    fn read(storage: &Storage, offset: u64, len: usize) -> Vec<u8> {
        let mut back = vec![0xeeu8; len];
        storage
            .read_into(offset, &VolatileSlice::from(&mut back[..]))
            .unwrap();
        back
    }

    fn roundtrip(storage: &Storage) {
        let data: Vec<u8> = (0..8192).map(|i| (i % 251) as u8 + 1).collect();
        write(storage, 4096, &data);
        assert_eq!(read(storage, 4096, 8192), data);

        // Zero an unaligned range crossing pages, with and without unmap.
        storage.write_zeroes(4096 + 100, 5000, false).unwrap();
        let back = read(storage, 4096, 8192);
        assert!(back[100..5100].iter().all(|&b| b == 0));
        assert_eq!(&back[..100], &data[..100]);
        assert_eq!(&back[5100..], &data[5100..]);

        write(storage, 4096, &data);
        storage.write_zeroes(4096, 8192, true).unwrap();
        assert!(read(storage, 4096, 8192).iter().all(|&b| b == 0));

        write(storage, 4096, &data);
        storage.discard(0, 16384).unwrap();
        storage.flush().unwrap();
    }

    #[test]
    fn ram_storage() {
        let s = Storage::open(
            &Backing::Ram {
                size_bytes: 1 << 20,
            },
            512,
            false,
        )
        .unwrap();
        assert_eq!(s.size(), 1 << 20);
        roundtrip(&s);
        // Discard on RAM zeroes.
        assert!(read(&s, 4096, 8192).iter().all(|&b| b == 0));
        // Out of range is an error, not a panic.
        let mut buf = [0u8; 512];
        assert!(s
            .read_into((1 << 20) - 256, &VolatileSlice::from(&mut buf[..]))
            .is_err());
        assert!(s.write_zeroes(1 << 20, 512, false).is_err());
    }

    #[test]
    fn file_storage_is_sparse_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let s = Storage::open(
            &Backing::File {
                path: path.clone(),
                size_bytes: Some(1 << 30),
            },
            4096,
            false,
        )
        .unwrap();
        assert_eq!(s.size(), 1 << 30);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
        roundtrip(&s);
        drop(s);

        // Reopen without a size: capacity is the file size.
        let s = Storage::open(
            &Backing::File {
                path: path.clone(),
                size_bytes: None,
            },
            4096,
            true,
        )
        .unwrap();
        assert_eq!(s.size(), 1 << 30);
        drop(s);

        // Read-only and too small.
        let e = Storage::open(
            &Backing::File {
                path: path.clone(),
                size_bytes: Some(2 << 30),
            },
            4096,
            true,
        )
        .unwrap_err();
        assert!(matches!(e, TargetError::BackingTooSmall { .. }), "{e}");

        let e = Storage::open(
            &Backing::File {
                path: dir.path().join("missing"),
                size_bytes: None,
            },
            512,
            false,
        )
        .unwrap_err();
        assert!(matches!(e, TargetError::OpenBacking { .. }), "{e}");
    }
}
