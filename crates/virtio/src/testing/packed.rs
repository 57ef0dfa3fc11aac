//! The device side of one packed virtqueue, written from virtio 1.2 section 2.8 for the
//! tests. It shares no code with the driver side (`crate::ring::packed`): its own flag
//! values, its own reading of the ring, its own wrap counters; every driver rule the
//! spec states for a packed ring is checked on what the driver wrote, and a violation
//! is reported as a driver bug.
//!
//! [`FakeDevice`](super::FakeDevice) serves packed rings with it, and the packed ring's
//! unit tests drive it directly (as the split ring's drive rust-vmm's `virtio-queue`).

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use crate::features::transport as tf;
use crate::ring::RingLayout;

// Values from virtio 1.2 2.8 (defined here again, on purpose: see the module doc).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;
const RING_EVENT_FLAGS_ENABLE: u16 = 0x0;
const RING_EVENT_FLAGS_DISABLE: u16 = 0x1;
const RING_EVENT_FLAGS_DESC: u16 = 0x2;
const PVIRTQ_DESC_SIZE: u64 = 16;

/// One buffer the driver made available, as the device read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceChain {
    /// The Buffer ID (of the last descriptor of the list).
    pub id: u16,
    /// Device-readable elements: (device address, length).
    pub readable: Vec<(u64, u32)>,
    /// Device-writable elements: (device address, length).
    pub writable: Vec<(u64, u32)>,
    /// Ring entries the buffer took (1 for an indirect one).
    pub entries: u16,
    /// It was an indirect descriptor.
    pub indirect: bool,
}

/// What the device asks of the driver in the Device Event Suppression structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickMe {
    /// `RING_EVENT_FLAGS_ENABLE`: notify on every available buffer.
    Always,
    /// `RING_EVENT_FLAGS_DISABLE`: do not notify.
    Never,
    /// `RING_EVENT_FLAGS_DESC`: notify when the descriptor at `offset` in the lap with
    /// wrap counter `wrap` is made available.
    At {
        /// Ring entry.
        offset: u16,
        /// Wrap counter of the lap.
        wrap: bool,
    },
    /// `RING_EVENT_FLAGS_DESC` at the next entry the device reads (what a device with
    /// event index does after emptying the ring).
    AtNext,
}

/// The device side of one packed ring at the virtual addresses of a [`RingLayout`]
/// (descriptor ring, driver area, device area).
#[derive(Debug)]
pub struct PackedDeviceRing {
    size: u16,
    ring: u64,
    driver_area: u64,
    device_area: u64,
    event_idx: bool,
    indirect_ok: bool,
    /// The next entry the device reads, and the wrap counter the driver writes there.
    next_read: u16,
    driver_wrap: bool,
    /// The next entry a used descriptor goes in, and the Device Ring Wrap Counter.
    next_write: u16,
    device_wrap: bool,
    /// Buffer IDs the device holds, with the ring entries each took.
    held: HashMap<u16, u16>,
}

/// A 16-bit field at `addr` of a ring mapped in this process.
fn at16(addr: u64) -> &'static AtomicU16 {
    // SAFETY: callers pass addresses inside a ring whose layout the transport checked
    // (inside the DMA memory, which stays mapped while the queue is served), 2-byte
    // aligned; driver and device share it, hence an atomic.
    unsafe { &*(addr as *const AtomicU16) }
}

/// Read 16 bytes of a descriptor at `addr` (checked by the caller to lie in the memory):
/// (addr, len, id, flags).
fn read_pvirtq_desc(addr: u64) -> (u64, u32, u16, u16) {
    let mut b = [0u8; 16];
    // SAFETY: the caller checked that `[addr, addr+16)` lies in mapped DMA memory; any
    // bytes are a descriptor.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, b.as_mut_ptr(), 16) };
    let le16 = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    (
        u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
        u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
        le16(12),
        le16(14),
    )
}

impl PackedDeviceRing {
    /// The device side of the packed ring at `layout` with the negotiated `features`.
    /// The ring areas must have been checked to lie in mapped memory.
    pub fn new(layout: &RingLayout, features: u64) -> PackedDeviceRing {
        PackedDeviceRing {
            size: layout.size,
            ring: layout.desc_va,
            driver_area: layout.avail_va,
            device_area: layout.used_va,
            event_idx: features & tf::RING_EVENT_IDX != 0,
            indirect_ok: features & tf::RING_INDIRECT_DESC != 0,
            // Both wrap counters start at 1 (virtio 1.2 2.8.1).
            next_read: 0,
            driver_wrap: true,
            next_write: 0,
            device_wrap: true,
            held: HashMap::new(),
        }
    }

    fn entry(&self, i: u16) -> u64 {
        self.ring + PVIRTQ_DESC_SIZE * i as u64
    }

    /// Whether `flags` mark a descriptor the driver made available in the lap whose
    /// driver wrap counter is `wrap` (AVAIL matches it, USED does not).
    fn is_avail(flags: u16, wrap: bool) -> bool {
        (flags & F_AVAIL != 0) == wrap && (flags & F_USED != 0) != wrap
    }

    /// Buffers the device took and has not used.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The ring entries buffer `id` took, if the device holds it.
    pub fn entries_of(&self, id: u16) -> Option<u16> {
        self.held.get(&id).copied()
    }

    /// The next available buffer, if the driver made one available; the device then
    /// holds it. `translate(addr, len)` maps a device address range to a virtual
    /// address (`None`: outside the memory). `Some(Err)` names a driver bug.
    pub fn take(
        &mut self,
        translate: impl Fn(u64, u64) -> Option<u64>,
    ) -> Option<Result<DeviceChain, String>> {
        let first = self.next_read;
        let flags = u16::from_le(at16(self.entry(first) + 14).load(Ordering::Acquire));
        if !Self::is_avail(flags, self.driver_wrap) {
            return None;
        }
        Some(self.read_list(first, translate))
    }

    fn read_list(
        &mut self,
        first: u16,
        translate: impl Fn(u64, u64) -> Option<u64>,
    ) -> Result<DeviceChain, String> {
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        let mut element = |addr: u64, len: u32, write: bool| -> Result<(), String> {
            if translate(addr, len as u64).is_none() {
                return Err(format!(
                    "an element at {addr:#x} ({len} bytes) outside the DMA memory"
                ));
            }
            if write {
                writable.push((addr, len));
            } else if !writable.is_empty() {
                return Err("a device-readable element after a device-writable one".into());
            } else {
                readable.push((addr, len));
            }
            Ok(())
        };
        let (mut pos, mut wrap) = (first, self.driver_wrap);
        let mut entries: u16 = 0;
        let (id, indirect) = loop {
            if entries >= self.size {
                return Err(format!(
                    "a descriptor list longer than the queue size {}",
                    self.size
                ));
            }
            let (addr, len, id, flags) = read_pvirtq_desc(self.entry(pos));
            if !Self::is_avail(flags, wrap) {
                // 2.8.6: all flags, AVAIL and USED included, set in every descriptor of
                // the list; and the list is complete when its first one is available.
                return Err(format!(
                    "entry {pos} continues a list but is not available (flags {flags:#x}, driver wrap counter {wrap})"
                ));
            }
            entries += 1;
            (pos, wrap) = if pos + 1 == self.size {
                (0, !wrap)
            } else {
                (pos + 1, wrap)
            };
            if flags & F_INDIRECT != 0 {
                if !self.indirect_ok {
                    return Err("an indirect descriptor without VIRTIO_F_INDIRECT_DESC".into());
                }
                if entries > 1 || flags & F_NEXT != 0 {
                    return Err("an indirect descriptor in a list linked by NEXT".into());
                }
                if len == 0 || !(len as u64).is_multiple_of(PVIRTQ_DESC_SIZE) {
                    return Err(format!(
                        "an indirect table of {len} bytes (not a non-zero multiple of 16)"
                    ));
                }
                let table = translate(addr, len as u64).ok_or_else(|| {
                    format!(
                        "the indirect table at {addr:#x} ({len} bytes) lies outside the DMA memory"
                    )
                })?;
                for k in 0..len as u64 / PVIRTQ_DESC_SIZE {
                    let (a, l, _, f) = read_pvirtq_desc(table + PVIRTQ_DESC_SIZE * k);
                    if f & !F_WRITE != 0 {
                        return Err(format!(
                            "indirect table entry {k} has flags {f:#x}: only VIRTQ_DESC_F_WRITE is valid there"
                        ));
                    }
                    element(a, l, f & F_WRITE != 0)?;
                }
                break (id, true);
            }
            element(addr, len, flags & F_WRITE != 0)?;
            if flags & F_NEXT == 0 {
                // The Buffer ID of a list is in its last descriptor.
                break (id, false);
            }
        };
        if self.held.insert(id, entries).is_some() {
            return Err(format!(
                "buffer id {id} made available again while the device holds it"
            ));
        }
        self.next_read = pos;
        self.driver_wrap = wrap;
        Ok(DeviceChain {
            id,
            readable,
            writable,
            entries,
            indirect,
        })
    }

    /// Mark buffer `id` used with `written` bytes: one used descriptor at the device's
    /// write position (Buffer ID, length, `VIRTQ_DESC_F_WRITE` when `written > 0`,
    /// AVAIL and USED equal to the Device Ring Wrap Counter), then skip the entries the
    /// buffer took. Returns whether the driver asked for a used buffer notification.
    ///
    /// # Panics
    /// If the device does not hold `id` (use [`put_used_raw`](Self::put_used_raw) to
    /// lie).
    pub fn put_used(&mut self, id: u16, written: u32) -> bool {
        let entries = self
            .held
            .remove(&id)
            .unwrap_or_else(|| panic!("the device does not hold buffer id {id}"));
        self.write_used(id, written, written > 0, entries)
    }

    /// A used descriptor of any id, length and WRITE flag, skipping `skip` entries
    /// after it (a device that lies). Returns whether the driver asked for a
    /// notification.
    pub fn put_used_raw(&mut self, id: u16, len: u32, write: bool, skip: u16) -> bool {
        self.held.remove(&id);
        self.write_used(id, len, write, skip)
    }

    fn write_used(&mut self, id: u16, len: u32, write: bool, skip: u16) -> bool {
        let at = self.entry(self.next_write);
        let mut b = [0u8; 12];
        b[8..12].copy_from_slice(&len.to_le_bytes());
        // SAFETY: the entry lies in the ring (`next_write < size`), mapped; the driver
        // does not write it while it is not used. Address (unused) and length.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), at as *mut u8, 12) };
        at16(at + 12).store(id.to_le(), Ordering::Relaxed);
        let mut flags = if self.device_wrap {
            F_AVAIL | F_USED
        } else {
            0
        };
        if write {
            flags |= F_WRITE;
        }
        // The descriptor's other fields before its flags (2.8.21: a write barrier).
        at16(at + 14).store(flags.to_le(), Ordering::Release);
        let (old, old_wrap) = (self.next_write, self.device_wrap);
        let mut next = self.next_write as u32 + skip.max(1) as u32;
        while next >= self.size as u32 {
            next -= self.size as u32;
            self.device_wrap = !self.device_wrap;
        }
        self.next_write = next as u16;
        // Notification suppression read after the used descriptor is visible.
        fence(Ordering::SeqCst);
        let off_wrap = u16::from_le(at16(self.driver_area).load(Ordering::Relaxed));
        let flags = u16::from_le(at16(self.driver_area + 2).load(Ordering::Relaxed)) & 3;
        match flags {
            RING_EVENT_FLAGS_ENABLE => true,
            RING_EVENT_FLAGS_DISABLE => false,
            RING_EVENT_FLAGS_DESC if self.event_idx => {
                // The event descriptor counts as used if it lies among the entries this
                // used descriptor covered (its own and the skipped ones), in the lap its
                // wrap counter names.
                let (off, wrap) = (off_wrap & 0x7fff, off_wrap & 0x8000 != 0);
                let lin = |pos: u16, w: bool| {
                    pos as u32 + if w == old_wrap { 0 } else { self.size as u32 }
                };
                let (start, event) = (lin(old, old_wrap), lin(off, wrap));
                event >= start && event < start + skip.max(1) as u32
            }
            // DESC without event index, or the reserved value: the driver broke the
            // protocol; a device may notify anyway.
            _ => true,
        }
    }

    /// Write the Device Event Suppression structure.
    pub fn kick_me(&mut self, mode: KickMe) {
        let (off_wrap, flags) = match mode {
            KickMe::Always => (0, RING_EVENT_FLAGS_ENABLE),
            KickMe::Never => (0, RING_EVENT_FLAGS_DISABLE),
            KickMe::At { offset, wrap } => {
                (offset | (u16::from(wrap) << 15), RING_EVENT_FLAGS_DESC)
            }
            KickMe::AtNext => (
                self.next_read | (u16::from(self.driver_wrap) << 15),
                RING_EVENT_FLAGS_DESC,
            ),
        };
        at16(self.device_area).store(off_wrap.to_le(), Ordering::Relaxed);
        at16(self.device_area + 2).store(flags.to_le(), Ordering::Release);
        // Suppression state written before the device looks at the ring again.
        fence(Ordering::SeqCst);
    }

    /// The next entry the device reads and the driver's wrap counter there.
    pub fn read_position(&self) -> (u16, bool) {
        (self.next_read, self.driver_wrap)
    }

    /// The next entry a used descriptor goes in and the device's wrap counter.
    pub fn write_position(&self) -> (u16, bool) {
        (self.next_write, self.device_wrap)
    }
}
