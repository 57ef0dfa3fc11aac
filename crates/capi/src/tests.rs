//! The C API called as C calls it, against in-process vhost-user devices (vireo's test
//! target, blk and scsi): states, properties, errors, verified I/O in both wait modes.
//! The C test programs (`tests/c/`) and fio check the same from C.

use std::ffi::CString;
use std::ptr::null_mut;
use std::time::Duration;

use vireo_target::{
    spawn_blk_target, spawn_scsi_target, Backing, BlkTargetConfig, LunConfig, ScsiTargetConfig,
};

use super::*;

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn msg() -> String {
    // SAFETY: the message is a NUL-terminated string owned by this thread.
    unsafe { CStr::from_ptr(blkio_get_error_msg()) }
        .to_string_lossy()
        .into_owned()
}

struct B(*mut blkio);

impl B {
    fn create(driver: &str, path: &std::path::Path) -> B {
        let mut b = null_mut();
        // SAFETY: a valid driver string and out-pointer.
        let r = unsafe { blkio_create(c(driver).as_ptr(), &mut b) };
        assert_eq!(r, 0, "{}", msg());
        let p = c(path.to_str().unwrap());
        // SAFETY: `b` is live; valid strings.
        let r = unsafe { blkio_set_str(b, c("path").as_ptr(), p.as_ptr()) };
        assert_eq!(r, 0, "{}", msg());
        B(b)
    }
    fn int(&self, name: &str) -> Result<i32, i32> {
        let mut v = 0;
        // SAFETY: live instance, valid string and out-pointer.
        match unsafe { blkio_get_int(self.0, c(name).as_ptr(), &mut v) } {
            0 => Ok(v),
            e => Err(e),
        }
    }
    fn u64(&self, name: &str) -> Result<u64, i32> {
        let mut v = 0;
        // SAFETY: as `int`.
        match unsafe { blkio_get_uint64(self.0, c(name).as_ptr(), &mut v) } {
            0 => Ok(v),
            e => Err(e),
        }
    }
    fn set_int(&self, name: &str, v: i32) -> i32 {
        // SAFETY: live instance, valid string.
        unsafe { blkio_set_int(self.0, c(name).as_ptr(), v) }
    }
    fn connect(&self) {
        // SAFETY: live instance.
        assert_eq!(unsafe { blkio_connect(self.0) }, 0, "{}", msg());
    }
    fn start(&self) {
        // SAFETY: live instance.
        assert_eq!(unsafe { blkio_start(self.0) }, 0, "{}", msg());
    }
}

impl Drop for B {
    fn drop(&mut self) {
        // SAFETY: `self.0` is live or null.
        unsafe { blkio_destroy(&mut self.0) };
        assert!(self.0.is_null());
    }
}

/// Run `n` completions' worth of do_io, spinning (poll queue) or sleeping on the
/// completion fd (regular queue with the fd enabled).
fn reap(q: *mut blkioq, n: usize, fd_mode: bool) -> Vec<blkio_completion> {
    let mut out = Vec::new();
    let mut buf = [blkio_completion {
        user_data: null_mut(),
        error_msg: std::ptr::null(),
        ret: 0,
        reserved_: [0; 12],
    }; 16];
    while out.len() < n {
        let got = if fd_mode {
            // SAFETY: live queue; `buf` holds 16 entries.
            let r = unsafe { blkioq_do_io(q, buf.as_mut_ptr(), 0, 16, null_mut()) };
            if r == 0 {
                // SAFETY: live queue.
                let fd = unsafe { blkioq_get_completion_fd(q) };
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let r = unsafe { libc::poll(&mut p, 1, 10_000) };
                assert!(r == 1, "completion fd silent");
                let mut v = 0u64;
                // SAFETY: 8 bytes into a u64.
                unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
            }
            r
        } else {
            // SAFETY: as above.
            unsafe { blkioq_do_io(q, buf.as_mut_ptr(), 1, 16, null_mut()) }
        };
        assert!(got >= 0, "do_io: {got} {}", msg());
        out.extend_from_slice(&buf[..got as usize]);
    }
    out
}

/// A single-queue blk target on `size` bytes of RAM: its directory (keep it), socket and
/// handle.
fn blk_target(
    size: u64,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    vireo_target::TargetHandle,
) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let t = spawn_blk_target(
        &sock,
        BlkTargetConfig {
            backend: Backing::Ram { size_bytes: size },
            ..Default::default()
        },
    )
    .unwrap();
    (dir, sock, t)
}

/// `blkio_alloc_mem_region` of `len` bytes on `b`, which must succeed.
fn alloc_region(b: &B, len: usize) -> blkio_mem_region {
    let mut region = blkio_mem_region {
        addr: null_mut(),
        len: 0,
        iova: 0,
        fd_offset: 0,
        fd: -1,
        flags: 0,
    };
    // SAFETY: live instance, writable region.
    let r = unsafe { blkio_alloc_mem_region(b.0, &mut region, len) };
    assert_eq!(r, 0, "{}", msg());
    region
}

fn exercise(b: &B, q: *mut blkioq, fd_mode: bool) {
    let bs = b.int("request-alignment").unwrap() as usize;
    let region = alloc_region(b, 1 << 20);
    // SAFETY: as above.
    let r = unsafe { blkio_map_mem_region(b.0, &region) };
    assert_eq!(r, 0, "{}", msg());
    // SAFETY: the region is 1 MiB of our memory.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, 1 << 20) };
    if fd_mode {
        // SAFETY: live queue.
        unsafe { blkioq_set_completion_fd_enabled(q, true) };
    }
    // 16 writes in flight, some FUA, each with its own pattern and user_data.
    for i in 0..16usize {
        mem[i * 4096..(i + 1) * 4096].fill(i as u8 + 1);
        let flags = if i % 3 == 0 { BLKIO_REQ_FUA } else { 0 };
        // SAFETY: the buffer lies in the mapped region and outlives the request.
        unsafe {
            blkioq_write(
                q,
                (i * 4096) as u64,
                mem[i * 4096..].as_ptr().cast(),
                4096,
                (100 + i) as *mut c_void,
                flags,
            )
        };
    }
    let done = reap(q, 16, fd_mode);
    let mut ids: Vec<usize> = done.iter().map(|d| d.user_data as usize).collect();
    ids.sort();
    assert_eq!(ids, (100..116).collect::<Vec<_>>());
    assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
    // SAFETY: live queue.
    unsafe { blkioq_flush(q, 7 as *mut c_void, 0) };
    assert_eq!(reap(q, 1, fd_mode)[0].ret, 0);
    // Read back into the second half, vectored: three segments, one outside the region
    // (bounced).
    let mut outside = vec![0u8; 4096];
    let iov = [
        libc::iovec {
            iov_base: mem[512 * 1024..].as_mut_ptr().cast(),
            iov_len: 4096,
        },
        libc::iovec {
            iov_base: outside.as_mut_ptr().cast(),
            iov_len: 4096,
        },
        libc::iovec {
            iov_base: mem[600 * 1024..].as_mut_ptr().cast(),
            iov_len: 8192,
        },
    ];
    // SAFETY: the segments outlive the request.
    unsafe { blkioq_readv(q, 4096, iov.as_ptr(), 3, 9 as *mut c_void, 0) };
    let d = reap(q, 1, fd_mode);
    assert_eq!((d[0].user_data as usize, d[0].ret), (9, 0));
    assert!(mem[512 * 1024..512 * 1024 + 4096].iter().all(|&x| x == 2));
    assert!(outside.iter().all(|&x| x == 3));
    assert!(mem[600 * 1024..600 * 1024 + 4096].iter().all(|&x| x == 4));
    assert!(mem[600 * 1024 + 4096..600 * 1024 + 8192]
        .iter()
        .all(|&x| x == 5));
    // Write zeroes, then read zeros.
    // SAFETY: live queue.
    unsafe {
        blkioq_write_zeroes(
            q,
            0,
            8192,
            std::ptr::dangling_mut::<c_void>(),
            BLKIO_REQ_NO_UNMAP,
        )
    };
    assert_eq!(reap(q, 1, fd_mode)[0].ret, 0);
    // SAFETY: the buffer is in the region.
    unsafe {
        blkioq_read(
            q,
            0,
            mem[256 * 1024..].as_mut_ptr().cast(),
            8192,
            2 as *mut c_void,
            0,
        )
    };
    assert_eq!(reap(q, 1, fd_mode)[0].ret, 0);
    assert!(mem[256 * 1024..256 * 1024 + 8192].iter().all(|&x| x == 0));
    // Misaligned: the request fails, the call does not.
    // SAFETY: live queue; the buffer is in the region.
    unsafe {
        blkioq_read(
            q,
            (bs / 2) as u64,
            mem.as_mut_ptr().cast(),
            bs,
            3 as *mut c_void,
            0,
        )
    };
    assert_eq!(reap(q, 1, fd_mode)[0].ret, -libc::EINVAL);
    // FUA on a read is not a thing.
    // SAFETY: as above.
    unsafe {
        blkioq_read(
            q,
            0,
            mem.as_mut_ptr().cast(),
            bs,
            4 as *mut c_void,
            BLKIO_REQ_FUA,
        )
    };
    assert_eq!(reap(q, 1, fd_mode)[0].ret, -libc::EINVAL);
    // Zoned requests: -ENOTSUP.
    // SAFETY: live queue.
    unsafe { blkioq_reset_zone(q, 0, 5 as *mut c_void, 0) };
    assert_eq!(reap(q, 1, fd_mode)[0].ret, -libc::ENOTSUP);
    // Nothing outstanding: asking for a completion is an error, a timeout is ETIME.
    // SAFETY: live queue; no completions are written on failure.
    let r = unsafe { blkioq_do_io(q, null_mut(), 1, 0, null_mut()) };
    assert_eq!(r, -libc::EINVAL);
    // SAFETY: as above.
    unsafe { blkioq_unmap_then_free(b, &region) };
}

/// Unmap and free a region.
///
/// # Safety
/// `region` came from `blkio_alloc_mem_region` of `b`, with no I/O in flight on it.
unsafe fn blkioq_unmap_then_free(b: &B, region: &blkio_mem_region) {
    // SAFETY: the function's contract.
    unsafe {
        blkio_unmap_mem_region(b.0, region);
        blkio_free_mem_region(b.0, region);
    }
}

#[test]
fn blk_over_vhost_user_in_both_wait_modes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let t = spawn_blk_target(
        &sock,
        BlkTargetConfig {
            backend: Backing::Ram {
                size_bytes: 64 << 20,
            },
            num_queues: 2,
            ..Default::default()
        },
    )
    .unwrap();
    for fd_mode in [false, true] {
        let b = B::create("virtio-blk-vhost-user", &sock);
        // Before connect: device properties are not there yet.
        assert_eq!(b.u64("capacity"), Err(-libc::ENODEV));
        assert_eq!(b.set_int("num-queues", 1), -libc::ENODEV);
        b.connect();
        assert_eq!(b.u64("capacity"), Ok(64 << 20));
        assert_eq!(b.int("max-queues"), Ok(2));
        assert_eq!(b.int("request-alignment"), Ok(512));
        assert_eq!(b.u64("mem-region-alignment"), Ok(4096));
        assert_eq!(b.int("nonexistent"), Err(-libc::ENOENT));
        assert_eq!(
            b.u64("max-queues"),
            Err(-libc::ENOTTY),
            "an int read as uint64"
        );
        assert!(!msg().is_empty());
        assert_eq!(
            b.set_int("num-queues", 3),
            -libc::EINVAL,
            "more than max-queues"
        );
        if fd_mode {
            assert_eq!(b.set_int("num-queues", 1), 0);
        } else {
            assert_eq!(b.set_int("num-queues", 0), 0);
            assert_eq!(b.set_int("num-poll-queues", 1), 0);
        }
        b.start();
        assert_eq!(b.set_int("num-queues", 1), -libc::EBUSY, "after start");
        // SAFETY: live instance.
        let q = unsafe {
            if fd_mode {
                blkio_get_queue(b.0, 0)
            } else {
                blkio_get_poll_queue(b.0, 0)
            }
        };
        assert!(!q.is_null());
        // SAFETY: live instance.
        assert!(unsafe { blkio_get_queue(b.0, 5) }.is_null());
        // SAFETY: live queue.
        let fd = unsafe { blkioq_get_completion_fd(q) };
        assert_eq!(
            fd >= 0,
            fd_mode,
            "an fd on regular queues, -1 on poll queues"
        );
        exercise(&b, q, fd_mode);
    }
    t.stop();
}

#[test]
fn scsi_lun_by_target_and_lun() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("scsi.sock");
    let t = spawn_scsi_target(
        &sock,
        ScsiTargetConfig::grid(1, 2, |_, lun| LunConfig {
            backend: Backing::Ram {
                size_bytes: (32 + 16 * lun as u64) << 20,
            },
            ..LunConfig::default()
        }),
    )
    .unwrap();
    let b = B::create("virtio-scsi-vhost-user", &sock);
    assert_eq!(b.set_int("lun", 1), 0);
    b.connect();
    assert_eq!(b.u64("capacity"), Ok(48 << 20), "LUN 1, not LUN 0");
    assert_eq!(b.set_int("lun", 0), -libc::EBUSY, "after connect");
    b.start();
    // SAFETY: live instance.
    let q = unsafe { blkio_get_queue(b.0, 0) };
    assert!(!q.is_null());
    exercise(&b, q, true);
    drop(b);
    // A LUN that is not there: connect fails and says which there are.
    let b = B::create("virtio-scsi-vhost-user", &sock);
    assert_eq!(b.set_int("target", 3), 0);
    // SAFETY: live instance.
    assert_eq!(unsafe { blkio_connect(b.0) }, -libc::ENOENT);
    assert!(msg().contains("0/0"), "{}", msg());
    drop(b);
    t.stop();
}

#[test]
fn bad_calls_return_errors_not_crashes() {
    let mut b = null_mut();
    // SAFETY: valid strings and out-pointers, null pointers where the test says.
    unsafe {
        assert_eq!(blkio_create(c("io_uring").as_ptr(), &mut b), -libc::ENOENT);
        assert!(b.is_null());
        assert_eq!(blkio_create(std::ptr::null(), &mut b), -libc::EINVAL);
        assert_eq!(blkio_connect(null_mut()), -libc::EINVAL);
        assert_eq!(blkio_create(c("virtio-blk-vhost-user").as_ptr(), &mut b), 0);
        // No path.
        assert_eq!(blkio_connect(b), -libc::EINVAL);
        assert!(msg().contains("path"), "{}", msg());
        assert_eq!(blkio_start(b), -libc::EBUSY);
        let mut s: *mut c_char = null_mut();
        assert_eq!(blkio_get_str(b, c("driver").as_ptr(), &mut s), 0);
        assert_eq!(CStr::from_ptr(s).to_str().unwrap(), "virtio-blk-vhost-user");
        libc::free(s.cast());
        assert_eq!(
            blkio_set_str(b, c("read-only").as_ptr(), c("maybe").as_ptr()),
            -libc::EINVAL
        );
        assert_eq!(
            blkio_set_str(b, c("read-only").as_ptr(), c("true").as_ptr()),
            0
        );
        assert_eq!(blkio_set_bool(b, c("driver").as_ptr(), true), -libc::EACCES);
        assert_eq!(blkio_set_int(b, c("read-only").as_ptr(), 1), -libc::ENOTTY);
        assert_eq!(
            blkio_set_str(b, c("driver").as_ptr(), c("x").as_ptr()),
            -libc::EACCES
        );
        assert_eq!(
            blkio_set_int(b, c("lun").as_ptr(), 1),
            -libc::ENOENT,
            "not a blk property"
        );
        assert_eq!(blkio_add_queue(b), -libc::ENOTSUP);
        assert!(blkio_get_queue(b, 0).is_null());
        blkioq_read(null_mut(), 0, null_mut(), 0, null_mut(), 0);
        blkio_destroy(&mut b);
        assert!(b.is_null());
        blkio_destroy(&mut b);
        blkio_destroy(null_mut());
    }
}

/// The layouts C sees (tests/c/abi.c checks the same from C).
#[test]
fn struct_layouts_are_libblkios() {
    use std::mem::{offset_of, size_of};
    assert_eq!(size_of::<blkio_mem_region>(), 40);
    assert_eq!(offset_of!(blkio_mem_region, len), 8);
    assert_eq!(offset_of!(blkio_mem_region, iova), 16);
    assert_eq!(offset_of!(blkio_mem_region, fd_offset), 24);
    assert_eq!(offset_of!(blkio_mem_region, fd), 32);
    assert_eq!(offset_of!(blkio_mem_region, flags), 36);
    assert_eq!(size_of::<blkio_completion>(), 32);
    assert_eq!(offset_of!(blkio_completion, error_msg), 8);
    assert_eq!(offset_of!(blkio_completion, ret), 16);
    assert_eq!(size_of::<blkio_zone>(), 64);
}

/// `len` bytes mapped at an address the kernel picks: shared from a memfd (`Some(fd)`)
/// or private anonymous memory (`None`).
fn caller_mapping(len: usize, shared: bool) -> (*mut u8, Option<std::os::fd::OwnedFd>) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let fd = shared.then(|| {
        // SAFETY: a NUL-terminated name; memfd_create has no other memory effects.
        let raw = unsafe { libc::memfd_create(c"capi-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: resizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
        fd
    });
    let (flags, raw) = match &fd {
        Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a new mapping at an address the kernel picks; no existing memory changes.
    let p = unsafe {
        libc::mmap(
            null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            raw,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    (p.cast(), fd)
}

/// Caller memory mapped with `blkio_map_mem_region` is shared with the device (used in
/// place): with its fd, and with fd -1 when it is a shared file mapping (vireo finds
/// the file); private memory is accepted and bounced. Unmapping withdraws it.
#[test]
fn mapped_caller_memory_is_shared_with_the_device() {
    use std::os::fd::AsRawFd;
    let (_dir, sock, t) = blk_target(16 << 20);
    let b = B::create("virtio-blk-vhost-user", &sock);
    b.connect();
    b.set_int("num-queues", 0);
    b.set_int("num-poll-queues", 1);
    b.start();
    // SAFETY: live instance.
    let q = unsafe { blkio_get_poll_queue(b.0, 0) };
    // SAFETY: the instance is live (tests reach into it).
    let mem = unsafe { &*b.0 }.bdev().unwrap().memory().clone();
    let shared_now = |addr: *mut u8| mem.regions().iter().any(|r| r.contains(addr as u64, 4096));
    let len = 1 << 20;
    let cases: [(&str, bool, bool); 3] = [
        ("memfd with its fd", true, true),
        ("memfd with fd -1", true, false),
        ("private memory", false, false),
    ];
    for (i, (what, shared, give_fd)) in cases.into_iter().enumerate() {
        let (p, fd) = caller_mapping(len, shared);
        let region = blkio_mem_region {
            addr: p.cast(),
            len,
            iova: 0,
            fd_offset: 0,
            fd: if give_fd {
                fd.as_ref().unwrap().as_raw_fd()
            } else {
                -1
            },
            flags: 0,
        };
        // SAFETY: the region describes our live mapping.
        let r = unsafe { blkio_map_mem_region(b.0, &region) };
        assert_eq!(r, 0, "{what}: {}", msg());
        assert_eq!(shared_now(p), shared, "{what}: shared with the device");
        // SAFETY: as above: mapping it twice is refused.
        let r = unsafe { blkio_map_mem_region(b.0, &region) };
        assert_eq!(r, -libc::EINVAL, "{what}: mapped twice");
        // SAFETY: the mapping is `len` bytes and ours.
        let buf = unsafe { std::slice::from_raw_parts_mut(p, len) };
        buf[..4096].fill(0x40 + i as u8);
        // SAFETY: the buffers live in the mapping until the completions.
        unsafe { blkioq_write(q, 0, buf.as_ptr().cast(), 4096, null_mut(), 0) };
        assert_eq!(reap(q, 1, false)[0].ret, 0, "{what}");
        // SAFETY: as above.
        unsafe { blkioq_read(q, 0, buf[8192..].as_mut_ptr().cast(), 4096, null_mut(), 0) };
        assert_eq!(reap(q, 1, false)[0].ret, 0, "{what}");
        assert!(
            buf[8192..12288].iter().all(|&x| x == 0x40 + i as u8),
            "{what}"
        );
        // SAFETY: no I/O is in flight on the region.
        unsafe { blkio_unmap_mem_region(b.0, &region) };
        assert!(!shared_now(p), "{what}: withdrawn");
    }
    drop(b);
    t.stop();
}

/// fio's libblkio engine connects to read the capacity, destroys the instance, then
/// connects again for the job: the second connect reuses the first's connection (parked
/// for a moment), so back-ends that serve one connection in their life work too. A
/// started instance's connection is closed at destroy, not parked.
#[test]
fn an_unstarted_instance_leaves_its_connection_to_the_next() {
    let (_dir, sock, t) = blk_target(8 << 20);
    let a = B::create("virtio-blk-vhost-user", &sock);
    a.connect();
    assert_eq!(a.u64("capacity"), Ok(8 << 20));
    drop(a);
    let b = B::create("virtio-blk-vhost-user", &sock);
    b.connect();
    assert_eq!(
        t.stats().connections,
        1,
        "the second instance reused the connection"
    );
    b.start();
    // SAFETY: live instance.
    let q = unsafe { blkio_get_queue(b.0, 0) };
    let mut buf = vec![0u8; 512];
    // SAFETY: `buf` outlives the request.
    unsafe { blkioq_read(q, 0, buf.as_mut_ptr().cast(), 512, null_mut(), 0) };
    assert_eq!(reap(q, 1, false)[0].ret, 0);
    drop(b);
    let c = B::create("virtio-blk-vhost-user", &sock);
    c.connect();
    assert_eq!(
        t.stats().connections,
        2,
        "a started instance's connection is not reused"
    );
    drop(c);
    t.stop();
}

/// fio's eventfd mode: the completion fd switched to blocking mode, a blocking read
/// while requests are in flight, then do_io without waiting. The library never blocks on
/// the fd itself (it reads it only when a signal is there).
#[test]
fn a_blocking_completion_fd_is_the_callers_to_wait_on() {
    let (_dir, sock, t) = blk_target(8 << 20);
    let (tx, rx) = std::sync::mpsc::channel();
    let s = sock.clone();
    std::thread::spawn(move || {
        let b = B::create("virtio-blk-vhost-user", &s);
        b.connect();
        b.start();
        // SAFETY: live instance.
        let q = unsafe { blkio_get_queue(b.0, 0) };
        // SAFETY: live queue; fcntl on its fd.
        let fd = unsafe {
            blkioq_set_completion_fd_enabled(q, true);
            let fd = blkioq_get_completion_fd(q);
            let fl = libc::fcntl(fd, libc::F_GETFL);
            assert_eq!(
                fl & libc::O_NONBLOCK,
                libc::O_NONBLOCK,
                "non-blocking at first"
            );
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
            fd
        };
        let mut bufs = vec![vec![0u8; 4096]; 8];
        let mut done = 0;
        for round in 0..16 {
            for (i, b) in bufs.iter_mut().enumerate() {
                // SAFETY: the buffers outlive the requests.
                unsafe {
                    blkioq_read(
                        q,
                        (i * 4096) as u64,
                        b.as_mut_ptr().cast(),
                        4096,
                        null_mut(),
                        0,
                    )
                };
            }
            let mut c = [blkio_completion {
                user_data: null_mut(),
                error_msg: std::ptr::null(),
                ret: 0,
                reserved_: [0; 12],
            }; 8];
            // SAFETY: live queue, 8 entries.
            let mut n = unsafe { blkioq_do_io(q, c.as_mut_ptr(), 0, 8, null_mut()) };
            while n < 8 {
                let mut v = 0u64;
                // SAFETY: a blocking 8-byte read of the eventfd, as fio does.
                let r = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
                assert_eq!(r, 8, "round {round}");
                // SAFETY: as above.
                let m =
                    unsafe { blkioq_do_io(q, c[n as usize..].as_mut_ptr(), 0, 8 - n, null_mut()) };
                assert!(m >= 0, "{}", msg());
                n += m;
            }
            done += n;
        }
        tx.send(done).unwrap();
    });
    let done = rx.recv_timeout(std::time::Duration::from_secs(60)).expect(
        "the eventfd round trips finished (a hang here is the library blocking on the caller's fd)",
    );
    assert_eq!(done, 128);
    t.stop();
}

/// A region allocated between connect and start (libblkio allows it) stays valid when
/// start brings the controller up again with its final queues and queue size: the same
/// DMA memory goes on (it used to be refused with -EBUSY). Here start does come up
/// again (queue size 64, not the connect's 128).
#[test]
fn a_region_allocated_before_start_survives_the_start() {
    let (_dir, sock, t) = blk_target(16 << 20);
    let b = B::create("virtio-blk-vhost-user", &sock);
    b.connect();
    let region = alloc_region(&b, 1 << 20);
    b.set_int("queue-size", 64);
    b.start();
    // SAFETY: as above.
    let r = unsafe { blkio_map_mem_region(b.0, &region) };
    assert_eq!(r, 0, "{}", msg());
    // SAFETY: live instance.
    let q = unsafe { blkio_get_queue(b.0, 0) };
    // SAFETY: the region is 1 MiB of ours.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr.cast::<u8>(), region.len) };
    buf[..4096].fill(0x5a);
    // SAFETY: the buffers live in the region until the completions.
    unsafe { blkioq_write(q, 4096, buf.as_ptr().cast(), 4096, null_mut(), 0) };
    assert_eq!(reap(q, 1, false)[0].ret, 0);
    // SAFETY: as above.
    unsafe {
        blkioq_read(
            q,
            4096,
            buf[65536..].as_mut_ptr().cast(),
            4096,
            null_mut(),
            0,
        )
    };
    assert_eq!(reap(q, 1, false)[0].ret, 0);
    assert!(buf[65536..65536 + 4096].iter().all(|&x| x == 0x5a));
    drop(b);
    t.stop();
}

/// `blkioq_do_io` without a timeout returns when the back-end hangs up with a request
/// in flight (it slept on the completion eventfd for ever: nothing signals it when the
/// connection goes), and the completion fd of an event-driven caller becomes readable
/// then too (arming found no fd to ask for and signalled nothing).
#[test]
fn a_back_end_that_hangs_up_wakes_do_io_and_the_completion_fd() {
    for fd_mode in [false, true] {
        let (_dir, sock, t) = blk_target(16 << 20);
        let b = B::create("virtio-blk-vhost-user", &sock);
        b.connect();
        b.start();
        // SAFETY: live instance.
        let q = unsafe { blkio_get_queue(b.0, 0) } as usize;
        // The read is taken and never completed: the connection drops with it in flight.
        t.faults().disconnect_after(0);
        let mut buf = vec![0u8; 4096];
        let (tx, rx) = std::sync::mpsc::channel();
        let p = buf.as_mut_ptr() as usize;
        std::thread::spawn(move || {
            let q = q as *mut blkioq;
            // SAFETY: the queue lives until the test drops the instance, after this
            // thread answered; `buf` lives as long.
            unsafe { blkioq_read(q, 0, p as *mut c_void, 4096, null_mut(), 0) };
            let mut c = [blkio_completion {
                user_data: null_mut(),
                error_msg: std::ptr::null(),
                ret: 0,
                reserved_: [0; 12],
            }];
            let r = if fd_mode {
                // SAFETY: live queue.
                let fd = unsafe { blkioq_get_completion_fd(q) };
                // SAFETY: live queue; arms the fd for the read.
                unsafe { blkioq_do_io(q, c.as_mut_ptr(), 0, 1, null_mut()) };
                let mut v = 0u64;
                // SAFETY: a blocking read of 8 bytes from the completion eventfd: it
                // must be signalled.
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let ready = unsafe { libc::poll(&mut pfd, 1, 20_000) };
                assert_eq!(ready, 1, "the completion fd was never signalled");
                // SAFETY: as above.
                unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
                // SAFETY: live queue.
                unsafe { blkioq_do_io(q, c.as_mut_ptr(), 1, 1, null_mut()) }
            } else {
                // SAFETY: live queue; no timeout.
                unsafe { blkioq_do_io(q, c.as_mut_ptr(), 1, 1, null_mut()) }
            };
            let _ = tx.send((r, c[0].ret));
        });
        let (r, ret) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("fd_mode {fd_mode}: do_io never returned"));
        assert_eq!(r, 1, "fd_mode {fd_mode}");
        assert!(ret < 0, "fd_mode {fd_mode}: the read failed ({ret})");
        drop(b);
        drop(buf);
        t.stop();
    }
}
