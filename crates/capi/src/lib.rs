//! vireo's libblkio: the C API of libblkio 1.5 (`include/blkio.h`) over vireo's bdevs,
//! so that fio's libblkio engine, QEMU's `blkio` block driver, nbdkit's blkio plugin and
//! C programs drive virtio-blk *and* virtio-scsi devices (vhost-user, VFIO or uio PCI)
//! through vireo unchanged. Built as `libblkio.so.1` (`scripts/install-libblkio.sh`).
//!
//! Layout: [`error`] (errno and the per-thread message), [`instance`] (`struct blkio`:
//! drivers, properties, states, memory regions), [`queue`] (`struct blkioq`: requests
//! and `blkioq_do_io`); this file is the `extern "C"` boundary, which checks pointers,
//! catches panics and turns failures into negative errno values. docs/capi.md has the
//! drivers and properties.

#![allow(non_camel_case_types)]

pub mod error;
pub mod instance;
pub mod queue;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::fd::BorrowedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use vireo_bdev::IoOp;

use error::{invalid, set_message, Fail, Res};
use instance::{Blkio, Driver, State, Value};
use queue::{Queue, QueueBox, Wait};
/// `BLKIO_REQ_FUA`.
pub const BLKIO_REQ_FUA: u32 = queue::REQ_FUA;
/// `BLKIO_REQ_NO_UNMAP`.
pub const BLKIO_REQ_NO_UNMAP: u32 = queue::REQ_NO_UNMAP;
/// `BLKIO_REQ_NO_FALLBACK`.
pub const BLKIO_REQ_NO_FALLBACK: u32 = queue::REQ_NO_FALLBACK;

/// `struct blkio`.
pub type blkio = Blkio;
/// `struct blkioq`.
pub type blkioq = Queue;

/// `struct blkio_mem_region`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blkio_mem_region {
    pub addr: *mut c_void,
    pub len: usize,
    pub iova: u64,
    pub fd_offset: i64,
    pub fd: c_int,
    pub flags: u32,
}

/// `struct blkio_completion`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blkio_completion {
    pub user_data: *mut c_void,
    pub error_msg: *const c_char,
    pub ret: c_int,
    pub reserved_: [u8; 12],
}

/// Run a call: its failure becomes a negative errno and this thread's message; a panic
/// (a bug) becomes -EIO instead of unwinding into C.
fn call(f: impl FnOnce() -> Res<c_int>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(Fail { errno, msg })) => {
            set_message(&msg);
            -errno
        }
        Err(_) => {
            set_message("internal error in vireo's libblkio (a bug: please report it)");
            -libc::EIO
        }
    }
}

/// A call that returns nothing: panics are contained, failures only logged.
fn call_void(f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        set_message("internal error in vireo's libblkio (a bug: please report it)");
    }
}

/// # Safety
/// `b` is null or a pointer `blkio_create` returned and `blkio_destroy` did not free.
unsafe fn instance<'a>(b: *mut blkio) -> Res<&'a mut Blkio> {
    // SAFETY: the caller's contract.
    unsafe { b.as_mut() }.ok_or_else(|| invalid("the struct blkio pointer is NULL"))
}

/// A shared view, for calls that only read (properties): a thread may read them while
/// others use the instance's queues.
///
/// # Safety
/// As [`instance`].
unsafe fn instance_ref<'a>(b: *const blkio) -> Res<&'a Blkio> {
    // SAFETY: the caller's contract.
    unsafe { b.as_ref() }.ok_or_else(|| invalid("the struct blkio pointer is NULL"))
}

/// # Safety
/// `s` is null or a NUL-terminated string.
unsafe fn text<'a>(s: *const c_char, what: &str) -> Res<&'a str> {
    if s.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: the caller's contract.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// The calling thread's message for its last failed call.
#[no_mangle]
pub extern "C" fn blkio_get_error_msg() -> *const c_char {
    error::message_ptr()
}

/// # Safety
/// `driver` is a string; `bp` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn blkio_create(driver: *const c_char, bp: *mut *mut blkio) -> c_int {
    call(|| {
        if bp.is_null() {
            return Err(invalid("bp is NULL"));
        }
        // SAFETY: the caller's contract.
        let name = unsafe { text(driver, "driver") }?;
        let d = Driver::from_name(name).ok_or_else(|| {
            Fail::new(
                libc::ENOENT,
                format!("unknown driver {name:?} (vireo has {})", Driver::ALL),
            )
        })?;
        let b = Box::into_raw(Box::new(Blkio::new(d)));
        // SAFETY: `bp` is writable (checked non-null; the caller's contract).
        unsafe { *bp = b };
        Ok(0)
    })
}

/// # Safety
/// `b` as [`instance`] says.
#[no_mangle]
pub unsafe extern "C" fn blkio_connect(b: *mut blkio) -> c_int {
    // SAFETY: the caller's contract.
    call(|| unsafe { instance(b) }?.connect().map(|()| 0))
}

/// # Safety
/// `b` as [`instance`] says.
#[no_mangle]
pub unsafe extern "C" fn blkio_start(b: *mut blkio) -> c_int {
    // SAFETY: the caller's contract.
    call(|| unsafe { instance(b) }?.start().map(|()| 0))
}

/// # Safety
/// `bp` is null or points to null or to a live instance, which this frees.
#[no_mangle]
pub unsafe extern "C" fn blkio_destroy(bp: *mut *mut blkio) {
    call_void(|| {
        if bp.is_null() {
            return;
        }
        // SAFETY: the caller's contract: `*bp` is null or from blkio_create.
        let b = unsafe { std::ptr::replace(bp, std::ptr::null_mut()) };
        if !b.is_null() {
            // SAFETY: `b` came from Box::into_raw in blkio_create and is freed once.
            drop(unsafe { Box::from_raw(b) });
        }
    })
}

fn get(b: *mut blkio, name: *const c_char) -> Res<Value> {
    // SAFETY: the public functions' contracts (they are the only callers).
    let (b, name) = unsafe { (instance_ref(b)?, text(name, "name")?) };
    b.get(name)
}

fn set(b: *mut blkio, name: *const c_char, v: Value) -> Res<c_int> {
    // SAFETY: the public functions' contracts (they are the only callers).
    let (b, name) = unsafe { (instance(b)?, text(name, "name")?) };
    b.set(name, v).map(|()| 0)
}

fn mismatch(name: *const c_char, want: &str, v: &Value) -> Fail {
    // SAFETY: `name` was read successfully by `get` just before.
    let n = unsafe { text(name, "name") }.unwrap_or("?");
    Fail::new(
        libc::ENOTTY,
        format!("property {n:?} is a {}, not a {want}", v.type_name()),
    )
}

/// Write through an out-pointer the caller gave.
fn put<T>(p: *mut T, v: T) -> Res<c_int> {
    if p.is_null() {
        return Err(invalid("value is NULL"));
    }
    // SAFETY: non-null, and the caller's contract makes it writable.
    unsafe { p.write(v) };
    Ok(0)
}

/// Read property `name` of type `want` into `value`.
fn get_typed<T>(
    b: *mut blkio,
    name: *const c_char,
    value: *mut T,
    want: &str,
    typed: impl FnOnce(&Value) -> Option<T>,
) -> c_int {
    call(|| {
        let v = get(b, name)?;
        match typed(&v) {
            Some(t) => put(value, t),
            None => Err(mismatch(name, want, &v)),
        }
    })
}

/// # Safety
/// `b` as [`instance`] says; `name` a string; `value` writable.
#[no_mangle]
pub unsafe extern "C" fn blkio_get_bool(
    b: *mut blkio,
    name: *const c_char,
    value: *mut bool,
) -> c_int {
    get_typed(b, name, value, "bool", |v| match v {
        Value::Bool(x) => Some(*x),
        _ => None,
    })
}

/// # Safety
/// As [`blkio_get_bool`].
#[no_mangle]
pub unsafe extern "C" fn blkio_get_int(
    b: *mut blkio,
    name: *const c_char,
    value: *mut c_int,
) -> c_int {
    get_typed(b, name, value, "int", |v| match v {
        Value::Int(x) => Some(*x),
        _ => None,
    })
}

/// # Safety
/// As [`blkio_get_bool`].
#[no_mangle]
pub unsafe extern "C" fn blkio_get_uint64(
    b: *mut blkio,
    name: *const c_char,
    value: *mut u64,
) -> c_int {
    get_typed(b, name, value, "uint64", |v| match v {
        Value::U64(x) => Some(*x),
        _ => None,
    })
}

/// # Safety
/// As [`blkio_get_bool`]; `*value` gets a string the caller frees with free(3).
#[no_mangle]
pub unsafe extern "C" fn blkio_get_str(
    b: *mut blkio,
    name: *const c_char,
    value: *mut *mut c_char,
) -> c_int {
    call(|| {
        let v = get(b, name)?;
        let c = CString::new(v.to_text()).map_err(|_| invalid("the value holds a NUL"))?;
        // SAFETY: strdup copies a NUL-terminated string into malloc'd memory (free(3)).
        let dup = unsafe { libc::strdup(c.as_ptr()) };
        if dup.is_null() {
            return Err(Fail::new(libc::ENOMEM, "out of memory"));
        }
        put(value, dup)
    })
}

/// # Safety
/// `b` as [`instance`] says; `name` a string.
#[no_mangle]
pub unsafe extern "C" fn blkio_set_bool(b: *mut blkio, name: *const c_char, value: bool) -> c_int {
    call(|| set(b, name, Value::Bool(value)))
}

/// # Safety
/// As [`blkio_set_bool`].
#[no_mangle]
pub unsafe extern "C" fn blkio_set_int(b: *mut blkio, name: *const c_char, value: c_int) -> c_int {
    call(|| set(b, name, Value::Int(value)))
}

/// # Safety
/// As [`blkio_set_bool`].
#[no_mangle]
pub unsafe extern "C" fn blkio_set_uint64(b: *mut blkio, name: *const c_char, value: u64) -> c_int {
    call(|| {
        // A uint64 for an int property is a type mismatch (libblkio), except through str.
        set(b, name, Value::U64(value))
    })
}

/// # Safety
/// As [`blkio_set_bool`]; `value` a string, converted to the property's type.
#[no_mangle]
pub unsafe extern "C" fn blkio_set_str(
    b: *mut blkio,
    name: *const c_char,
    value: *const c_char,
) -> c_int {
    call(|| {
        // SAFETY: the caller's contract.
        let s = unsafe { text(value, "value") }?;
        let current = get(b, name);
        let v = match current {
            Ok(Value::Bool(_)) => Value::Bool(match s {
                "true" | "1" | "on" | "yes" => true,
                "false" | "0" | "off" | "no" => false,
                _ => return Err(invalid(format!("{s:?} is not a bool (true or false)"))),
            }),
            Ok(Value::Int(_)) => Value::Int(
                s.trim()
                    .parse()
                    .map_err(|_| invalid(format!("{s:?} is not an int")))?,
            ),
            Ok(Value::U64(_)) => Value::U64(
                s.trim()
                    .parse()
                    .map_err(|_| invalid(format!("{s:?} is not a uint64")))?,
            ),
            // Str properties, and properties not readable yet: as a string.
            _ => Value::Str(s.to_string()),
        };
        set(b, name, v)
    })
}

/// # Safety
/// `b` as [`instance`] says; `region` writable.
#[no_mangle]
pub unsafe extern "C" fn blkio_alloc_mem_region(
    b: *mut blkio,
    region: *mut blkio_mem_region,
    len: usize,
) -> c_int {
    call(|| {
        // SAFETY: the caller's contract.
        let b = unsafe { instance(b) }?;
        if region.is_null() {
            return Err(invalid("region is NULL"));
        }
        let (addr, len, fd, fd_offset) = b.alloc_mem_region(len)?;
        put(
            region,
            blkio_mem_region {
                addr: addr as *mut c_void,
                len: len as usize,
                iova: 0,
                fd_offset: fd_offset as i64,
                fd,
                flags: 0,
            },
        )
    })
}

/// Read a region the caller passed.
///
/// # Safety
/// `region` is null or readable.
unsafe fn region_of(region: *const blkio_mem_region) -> Res<blkio_mem_region> {
    // SAFETY: the caller's contract.
    unsafe { region.as_ref() }
        .copied()
        .ok_or_else(|| invalid("region is NULL"))
}

/// # Safety
/// `b` as [`instance`] says; `region` readable.
#[no_mangle]
pub unsafe extern "C" fn blkio_free_mem_region(b: *mut blkio, region: *const blkio_mem_region) {
    call_void(|| {
        // SAFETY: the caller's contract.
        if let (Ok(b), Ok(r)) = unsafe { (instance(b), region_of(region)) } {
            b.free_mem_region(r.addr as u64, r.len as u64);
        }
    })
}

/// # Safety
/// `b` as [`instance`] says; `region` readable, describing memory mapped for as long as
/// the region stays mapped.
#[no_mangle]
pub unsafe extern "C" fn blkio_map_mem_region(
    b: *mut blkio,
    region: *const blkio_mem_region,
) -> c_int {
    call(|| {
        // SAFETY: the caller's contract.
        let (b, r) = unsafe { (instance(b)?, region_of(region)?) };
        if r.iova != 0 || r.flags != 0 {
            return Err(invalid(
                "\"iova\" and \"flags\" of a memory region are reserved: set them to 0",
            ));
        }
        if r.fd_offset < 0 {
            return Err(invalid("\"fd_offset\" is negative"));
        }
        let fd = if r.fd >= 0 {
            // SAFETY: the caller's descriptor, open for the duration of this call (the
            // library keeps a duplicate).
            Some(unsafe { BorrowedFd::borrow_raw(r.fd) })
        } else {
            None
        };
        b.map_mem_region(r.addr as u64, r.len as u64, fd, r.fd_offset as u64)
            .map(|()| 0)
    })
}

/// # Safety
/// `b` as [`instance`] says; `region` readable.
#[no_mangle]
pub unsafe extern "C" fn blkio_unmap_mem_region(b: *mut blkio, region: *const blkio_mem_region) {
    call_void(|| {
        // SAFETY: the caller's contract.
        if let (Ok(b), Ok(r)) = unsafe { (instance(b), region_of(region)) } {
            b.unmap_mem_region(r.addr as u64, r.len as u64);
        }
    })
}

fn queue_ptr(list: &[Option<QueueBox>], index: c_int) -> *mut blkioq {
    usize::try_from(index)
        .ok()
        .and_then(|i| list.get(i))
        .and_then(|q| q.as_ref())
        .map_or(std::ptr::null_mut(), QueueBox::as_ptr)
}

/// # Safety
/// `b` as [`instance`] says.
#[no_mangle]
pub unsafe extern "C" fn blkio_get_queue(b: *mut blkio, index: c_int) -> *mut blkioq {
    // SAFETY: the caller's contract.
    match unsafe { instance(b) } {
        Ok(b) if b.state == State::Started => queue_ptr(&b.queues, index),
        _ => std::ptr::null_mut(),
    }
}

/// # Safety
/// `b` as [`instance`] says.
#[no_mangle]
pub unsafe extern "C" fn blkio_get_poll_queue(b: *mut blkio, index: c_int) -> *mut blkioq {
    // SAFETY: the caller's contract.
    match unsafe { instance(b) } {
        Ok(b) if b.state == State::Started => queue_ptr(&b.poll_queues, index),
        _ => std::ptr::null_mut(),
    }
}

/// # Safety
/// `b` as [`instance`] says.
#[no_mangle]
pub unsafe extern "C" fn blkio_add_queue(b: *mut blkio) -> c_int {
    call(|| {
        // SAFETY: the caller's contract.
        unsafe { instance(b) }?;
        Err(Fail::new(libc::ENOTSUP, "adding queues after blkio_start is not supported (\"can-add-queues\" is false): set \"num-queues\" before starting"))
    })
}

/// # Safety
/// `b` as [`instance`] says.
#[no_mangle]
pub unsafe extern "C" fn blkio_add_poll_queue(b: *mut blkio) -> c_int {
    call(|| {
        // SAFETY: the caller's contract.
        unsafe { instance(b) }?;
        Err(Fail::new(libc::ENOTSUP, "adding poll queues after blkio_start is not supported (\"can-add-queues\" is false): set \"num-poll-queues\" before starting"))
    })
}

fn remove(list: &mut [Option<QueueBox>], index: c_int, what: &str) -> Res<c_int> {
    let slot = usize::try_from(index).ok().and_then(|i| list.get_mut(i));
    match slot {
        Some(q @ Some(_)) => {
            *q = None;
            Ok(0)
        }
        _ => Err(Fail::new(
            libc::ENOENT,
            format!("there is no {what} {index}"),
        )),
    }
}

/// # Safety
/// `b` as [`instance`] says; the queue's pointer is invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn blkio_remove_queue(b: *mut blkio, index: c_int) -> c_int {
    // SAFETY: the caller's contract.
    call(|| remove(&mut unsafe { instance(b) }?.queues, index, "queue"))
}

/// # Safety
/// As [`blkio_remove_queue`].
#[no_mangle]
pub unsafe extern "C" fn blkio_remove_poll_queue(b: *mut blkio, index: c_int) -> c_int {
    call(|| {
        // SAFETY: the caller's contract.
        let b = unsafe { instance(b) }?;
        remove(&mut b.poll_queues, index, "poll queue")
    })
}

/// Queue request `user_data` with `f`. A request is never lost: should `f` panic (a
/// bug), the request completes with -EIO. A null queue only sets the message.
fn with_request(q: *mut blkioq, user_data: *mut c_void, f: impl FnOnce(&mut Queue)) {
    call_void(|| {
        // SAFETY: as in `with_queue`.
        match unsafe { q.as_mut() } {
            Some(q) => {
                if catch_unwind(AssertUnwindSafe(|| f(&mut *q))).is_err() {
                    set_message("internal error in vireo's libblkio (a bug: please report it)");
                    q.fail_now(user_data as usize, libc::EIO);
                }
            }
            None => set_message("the struct blkioq pointer is NULL"),
        }
    })
}

/// Run `f` on the queue; a null queue only sets the message.
fn with_queue(q: *mut blkioq, f: impl FnOnce(&mut Queue)) {
    call_void(|| {
        // SAFETY: the public functions' contract: null or a live queue of a started
        // instance, used by one thread at a time.
        match unsafe { q.as_mut() } {
            Some(q) => f(q),
            None => set_message("the struct blkioq pointer is NULL"),
        }
    })
}

/// # Safety
/// `q` a live queue; `buf` writable for `len` bytes until the request completes.
#[no_mangle]
pub unsafe extern "C" fn blkioq_read(
    q: *mut blkioq,
    start: u64,
    buf: *mut c_void,
    len: usize,
    user_data: *mut c_void,
    flags: u32,
) {
    // SAFETY: the caller's contract.
    with_request(q, user_data, |q| unsafe {
        q.rw(false, start, buf.cast(), len, user_data as usize, flags)
    })
}

/// # Safety
/// `q` a live queue; `buf` readable for `len` bytes until the request completes.
#[no_mangle]
pub unsafe extern "C" fn blkioq_write(
    q: *mut blkioq,
    start: u64,
    buf: *const c_void,
    len: usize,
    user_data: *mut c_void,
    flags: u32,
) {
    // SAFETY: the caller's contract; a write only reads the buffer.
    with_request(q, user_data, |q| unsafe {
        q.rw(true, start, buf as *mut u8, len, user_data as usize, flags)
    })
}

/// # Safety
/// `q` a live queue; `iovec` holds `iovcnt` entries valid until the request completes.
#[no_mangle]
pub unsafe extern "C" fn blkioq_readv(
    q: *mut blkioq,
    start: u64,
    iovec: *const libc::iovec,
    iovcnt: c_int,
    user_data: *mut c_void,
    flags: u32,
) {
    // SAFETY: the caller's contract.
    with_request(q, user_data, |q| unsafe {
        q.rwv(false, start, iovec, iovcnt, user_data as usize, flags)
    })
}

/// # Safety
/// As [`blkioq_readv`].
#[no_mangle]
pub unsafe extern "C" fn blkioq_writev(
    q: *mut blkioq,
    start: u64,
    iovec: *mut libc::iovec,
    iovcnt: c_int,
    user_data: *mut c_void,
    flags: u32,
) {
    // SAFETY: the caller's contract.
    with_request(q, user_data, |q| unsafe {
        q.rwv(true, start, iovec, iovcnt, user_data as usize, flags)
    })
}

/// # Safety
/// `q` a live queue.
#[no_mangle]
pub unsafe extern "C" fn blkioq_write_zeroes(
    q: *mut blkioq,
    start: u64,
    len: u64,
    user_data: *mut c_void,
    flags: u32,
) {
    with_request(q, user_data, |q| {
        q.no_data(IoOp::WriteZeroes, start, len, user_data as usize, flags)
    })
}

/// # Safety
/// `q` a live queue.
#[no_mangle]
pub unsafe extern "C" fn blkioq_discard(
    q: *mut blkioq,
    start: u64,
    len: u64,
    user_data: *mut c_void,
    flags: u32,
) {
    with_request(q, user_data, |q| {
        q.no_data(IoOp::Unmap, start, len, user_data as usize, flags)
    })
}

/// # Safety
/// `q` a live queue.
#[no_mangle]
pub unsafe extern "C" fn blkioq_flush(q: *mut blkioq, user_data: *mut c_void, flags: u32) {
    with_request(q, user_data, |q| q.flush(user_data as usize, flags))
}

/// `struct blkio_zone` (zoned storage; no vireo device is zoned).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct blkio_zone {
    pub start: u64,
    pub len: u64,
    pub capacity: u64,
    pub write_pointer: u64,
    pub zone_type: u8,
    pub zone_state: u8,
    pub reset: u8,
    pub reserved_: [u8; 29],
}

/// # Safety
/// `q` a live queue.
#[no_mangle]
pub unsafe extern "C" fn blkioq_report_zones(
    q: *mut blkioq,
    _offset: u64,
    _zones: *mut blkio_zone,
    _nr_zones: u32,
    user_data: *mut c_void,
    _flags: u32,
) {
    with_request(q, user_data, |q| q.unsupported(user_data as usize))
}

macro_rules! zone_op {
    ($($name:ident),*) => {$(
        /// Zoned storage: completes with -ENOTSUP.
        ///
        /// # Safety
        /// `q` a live queue.
        #[no_mangle]
        pub unsafe extern "C" fn $name(q: *mut blkioq, _offset: u64, user_data: *mut c_void, _flags: u32) {
            with_request(q, user_data, |q| q.unsupported(user_data as usize))
        }
    )*};
}
zone_op!(
    blkioq_close_zone,
    blkioq_finish_zone,
    blkioq_open_zone,
    blkioq_reset_zone
);

macro_rules! zone_all_op {
    ($($name:ident),*) => {$(
        /// Zoned storage: completes with -ENOTSUP.
        ///
        /// # Safety
        /// `q` a live queue.
        #[no_mangle]
        pub unsafe extern "C" fn $name(q: *mut blkioq, user_data: *mut c_void, _flags: u32) {
            with_request(q, user_data, |q| q.unsupported(user_data as usize))
        }
    )*};
}
zone_all_op!(
    blkioq_close_all_zones,
    blkioq_finish_all_zones,
    blkioq_open_all_zones,
    blkioq_reset_all_zones
);

fn do_io(
    q: *mut blkioq,
    completions: *mut blkio_completion,
    min: c_int,
    max: c_int,
    timeout: *mut libc::timespec,
    wait: Wait<'_>,
) -> c_int {
    call(|| {
        // SAFETY: the public functions' contract: null or a live queue.
        let q =
            unsafe { q.as_mut() }.ok_or_else(|| invalid("the struct blkioq pointer is NULL"))?;
        if min < 0 || max < 0 {
            return Err(invalid(format!(
                "min_completions {min} and max_completions {max} must not be negative"
            )));
        }
        if max > 0 && completions.is_null() {
            return Err(invalid("completions is NULL with max_completions above 0"));
        }
        // SAFETY: null or the caller's timespec.
        let ts = unsafe { timeout.as_mut() };
        let mut left = match &ts {
            Some(t) if t.tv_sec < 0 || !(0..1_000_000_000).contains(&t.tv_nsec) => {
                return Err(invalid("timeout is not a valid timespec"));
            }
            Some(t) => Some(Duration::new(t.tv_sec as u64, t.tv_nsec as u32)),
            None => None,
        };
        let r = q.do_io(min as usize, max as usize, left.as_mut(), wait, |i, d| {
            // SAFETY: `i < max` and the caller's array holds `max` entries.
            unsafe {
                completions.add(i).write(blkio_completion {
                    user_data: d.user_data as *mut c_void,
                    error_msg: std::ptr::null(),
                    ret: d.ret,
                    reserved_: [0; 12],
                })
            };
        });
        if let (Some(t), Some(l)) = (ts, left) {
            t.tv_sec = l.as_secs() as libc::time_t;
            t.tv_nsec = l.subsec_nanos() as libc::c_long;
        }
        r.map(|n| n as c_int)
    })
}

/// # Safety
/// `q` a live queue; `completions` writable for `max_completions` entries; `timeout`
/// null or a valid timespec.
#[no_mangle]
pub unsafe extern "C" fn blkioq_do_io(
    q: *mut blkioq,
    completions: *mut blkio_completion,
    min_completions: c_int,
    max_completions: c_int,
    timeout: *mut libc::timespec,
) -> c_int {
    do_io(
        q,
        completions,
        min_completions,
        max_completions,
        timeout,
        Wait::Plain,
    )
}

/// # Safety
/// As [`blkioq_do_io`]; `sig` null or a valid signal set.
#[no_mangle]
pub unsafe extern "C" fn blkioq_do_io_interruptible(
    q: *mut blkioq,
    completions: *mut blkio_completion,
    min_completions: c_int,
    max_completions: c_int,
    timeout: *mut libc::timespec,
    sig: *const libc::sigset_t,
) -> c_int {
    // SAFETY: the caller's contract.
    let sig = unsafe { sig.as_ref() };
    do_io(
        q,
        completions,
        min_completions,
        max_completions,
        timeout,
        Wait::Interruptible(sig),
    )
}

/// # Safety
/// `q` a live queue.
#[no_mangle]
pub unsafe extern "C" fn blkioq_get_completion_fd(q: *mut blkioq) -> c_int {
    // SAFETY: the caller's contract.
    match unsafe { q.as_ref() } {
        Some(q) => q.completion_fd(),
        None => -1,
    }
}

/// # Safety
/// `q` a live queue.
#[no_mangle]
pub unsafe extern "C" fn blkioq_set_completion_fd_enabled(q: *mut blkioq, enable: bool) {
    with_queue(q, |q| q.set_completion_fd_enabled(enable))
}

#[cfg(test)]
mod tests;
