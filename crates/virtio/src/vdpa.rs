//! vhost-vdpa transport: a vDPA device (a SmartNIC or DPU's virtio function, or a
//! software one such as a VDUSE device) bound to the kernel's `vhost_vdpa` driver, as
//! `/dev/vhost-vdpa-N`. The control plane is the vhost ioctls plus the vDPA ones
//! (device ID, status, configuration space); DMA memory is mapped into the device's
//! address space with IOTLB messages; the rings are ours, kicked and signalled through
//! eventfds.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_kern::vhost_binding as b;
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::features::transport as tf;
use crate::memory::{DmaMemory, DmaRegionInfo, RegionListener};
use crate::notify::Notifier;
use crate::ring::RingLayout;
use crate::transport::Transport;
use crate::vhost_kernel::{setup_vring, VhostFd, Vring};

// Device status bits (virtio 1.2 section 2.1).
const S_ACKNOWLEDGE: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;
const S_NEEDS_RESET: u8 = 0x40;
const S_FAILED: u8 = 0x80;

/// vhost backend feature bits (`VHOST_BACKEND_F_*`, bit numbers).
const BF_IOTLB_MSG_V2: u64 = 1 << b::VHOST_BACKEND_F_IOTLB_MSG_V2;
const BF_IOTLB_BATCH: u64 = 1 << b::VHOST_BACKEND_F_IOTLB_BATCH;
const BF_SUSPEND: u64 = 1 << b::VHOST_BACKEND_F_SUSPEND;
const BF_RESUME: u64 = 1 << 5;

/// Name of a virtio device ID, for messages.
fn device_name(id: u32) -> String {
    match id {
        1 => "virtio-net".into(),
        2 => "virtio-blk".into(),
        3 => "virtio-console".into(),
        8 => "virtio-scsi".into(),
        26 => "virtio-fs".into(),
        n => format!("virtio device ID {n}"),
    }
}

/// Maps the DMA memory into the device's address space (`VHOST_IOTLB_UPDATE`, and
/// `VHOST_IOTLB_INVALIDATE` when a region goes).
struct Iotlb {
    fd: Arc<VhostFd>,
    batch: bool,
    range: (u64, u64),
    mapped: Mutex<Vec<DmaRegionInfo>>,
}

impl Iotlb {
    fn map(&self, regions: &[DmaRegionInfo]) -> Result<()> {
        for r in regions {
            let last = r.iova.checked_add(r.len.saturating_sub(1));
            if r.iova < self.range.0 || last.is_none_or(|l| l > self.range.1) {
                return Err(Error::RegionRejected(format!(
                    "{}: DMA region {:#x}+{:#x} lies outside the device's IOVA range {:#x}..={:#x}",
                    self.fd.path().display(),
                    r.iova,
                    r.len,
                    self.range.0,
                    self.range.1
                )));
            }
        }
        let io = |what: &str, e: std::io::Error| {
            let hint = match e.raw_os_error() {
                Some(libc::ENOMEM) => " (the device pins the memory it maps: raise the locked-memory limit, ulimit -l)",
                Some(libc::EINVAL) => " (software vDPA devices such as VDUSE map only shared file-backed memory)",
                _ => "",
            };
            Error::io(
                format!("{} IOTLB {what}{hint}", self.fd.path().display()),
                e,
            )
        };
        if self.batch {
            self.fd
                .iotlb(b::VHOST_IOTLB_BATCH_BEGIN, 0, 0, 0)
                .map_err(|e| io("BATCH_BEGIN", e))?;
        }
        let mut r = Ok(());
        for region in regions {
            if let Err(e) = self
                .fd
                .iotlb(b::VHOST_IOTLB_UPDATE, region.iova, region.len, region.va)
            {
                r = Err(io("UPDATE", e));
                break;
            }
        }
        if self.batch {
            // The device applies the batch at its end.
            let end = self
                .fd
                .iotlb(b::VHOST_IOTLB_BATCH_END, 0, 0, 0)
                .map_err(|e| io("BATCH_END", e));
            r = r.and(end);
        }
        r
    }
}

impl RegionListener for Iotlb {
    fn region_added(&self, region: &DmaRegionInfo) -> Result<()> {
        self.map(std::slice::from_ref(region))?;
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(*region);
        Ok(())
    }

    fn region_removed(&self, region: &DmaRegionInfo) {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = mapped.iter().position(|r| r.index == region.index) {
            mapped.remove(pos);
            let _ = self
                .fd
                .iotlb(b::VHOST_IOTLB_INVALIDATE, region.iova, region.len, 0);
        }
    }
}

/// A vDPA device through `/dev/vhost-vdpa-N`.
pub struct VdpaTransport {
    fd: Arc<VhostFd>,
    mem: Arc<DmaMemory>,
    device_id: u32,
    offered: u64,
    backend: u64,
    vqs: Option<u32>,
    vring_num: u16,
    config_size: Option<u32>,
    vrings: Vec<Option<Vring>>,
    iotlb: Option<Arc<Iotlb>>,
    started: bool,
    broken: Arc<AtomicBool>,
}

impl std::fmt::Debug for VdpaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VdpaTransport")
            .field("path", &self.fd.path())
            .field("device_id", &self.device_id)
            .finish()
    }
}

impl VdpaTransport {
    /// Open the vhost-vdpa device at `path`, check that it is the virtio device
    /// `want_id` (2 virtio-blk, 8 virtio-scsi), reset it and read what it offers.
    pub fn open(path: &Path, mem: Arc<DmaMemory>, want_id: u32) -> Result<VdpaTransport> {
        let fd = VhostFd::open(path, "vhost-vdpa device", "vhost_vdpa")?;
        fd.set_owner()?;
        let device_id = fd.vdpa_device_id()?;
        if device_id != want_id {
            return Err(crate::vhost_kernel::refused(format!(
                "{} is a {} device, not {}",
                path.display(),
                device_name(device_id),
                device_name(want_id)
            )));
        }
        let offered_backend = fd.get_backend_features()?.unwrap_or(0);
        if offered_backend & BF_IOTLB_MSG_V2 == 0 {
            return Err(crate::vhost_kernel::refused(format!(
                "{} does not offer VHOST_BACKEND_F_IOTLB_MSG_V2 (backend features {offered_backend:#x}); vireo needs a kernel of 5.7 or later",
                path.display()
            )));
        }
        let backend = offered_backend & (BF_IOTLB_MSG_V2 | BF_IOTLB_BATCH | BF_SUSPEND | BF_RESUME);
        fd.set_backend_features(backend)?;
        let t = VdpaTransport {
            vqs: fd.vdpa_vqs_count()?,
            vring_num: fd.vdpa_vring_num()?,
            config_size: fd.vdpa_config_size()?,
            offered: 0,
            fd: Arc::new(fd),
            mem,
            device_id,
            backend,
            vrings: Vec::new(),
            iotlb: None,
            started: false,
            broken: Arc::new(AtomicBool::new(false)),
        };
        let mut t = t;
        t.reset()?;
        t.fd.vdpa_set_status(S_ACKNOWLEDGE)?;
        t.fd.vdpa_set_status(S_ACKNOWLEDGE | S_DRIVER)?;
        t.offered = t.fd.get_features()?;
        Ok(t)
    }

    /// The virtio device ID.
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The vhost backend features both sides use (`VHOST_BACKEND_F_*`).
    pub fn backend_features(&self) -> u64 {
        self.backend
    }

    fn reset(&self) -> Result<()> {
        self.fd.vdpa_set_status(0)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let s = self.fd.vdpa_status()?;
            if s == 0 {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Device(format!(
                    "{}: device status is {s:#x} a second after reset (it must read 0)",
                    self.describe()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn fail(&self) {
        if let Ok(s) = self.fd.vdpa_status() {
            let _ = self.fd.vdpa_set_status(s | S_FAILED);
        }
    }
}

impl Transport for VdpaTransport {
    fn describe(&self) -> String {
        format!(
            "vhost-vdpa {} device {}",
            device_name(self.device_id),
            self.fd.path().display()
        )
    }

    fn device_features(&mut self) -> Result<u64> {
        // ACCESS_PLATFORM is the transport's: addresses always go through the IOTLB.
        Ok(self.offered & !tf::ACCESS_PLATFORM)
    }

    fn set_driver_features(&mut self, features: u64) -> Result<()> {
        let ack = (features & self.offered) | (self.offered & tf::ACCESS_PLATFORM);
        self.fd.set_features(ack)?;
        self.fd
            .vdpa_set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)?;
        if self.fd.vdpa_status()? & S_FEATURES_OK == 0 {
            self.fail();
            return Err(Error::Features(format!(
                "{} refused features {ack:#x} (FEATURES_OK did not stick)",
                self.describe()
            )));
        }
        let range = self.fd.vdpa_iova_range()?.unwrap_or((0, u64::MAX));
        let iotlb = Arc::new(Iotlb {
            fd: self.fd.clone(),
            batch: self.backend & BF_IOTLB_BATCH != 0,
            range,
            mapped: Mutex::new(Vec::new()),
        });
        let weak: std::sync::Weak<dyn RegionListener> =
            Arc::downgrade(&(iotlb.clone() as Arc<dyn RegionListener>));
        let initial = self.mem.add_listener(weak);
        iotlb.map(&initial)?;
        *iotlb.mapped.lock().unwrap_or_else(|e| e.into_inner()) = initial.to_vec();
        self.iotlb = Some(iotlb);
        Ok(())
    }

    fn max_queues(&mut self) -> Result<Option<u16>> {
        Ok(self.vqs.map(|n| n.min(u16::MAX as u32) as u16))
    }

    fn max_queue_size(&mut self, _index: u16) -> Result<Option<u16>> {
        Ok(Some(self.vring_num))
    }

    fn has_config(&self) -> bool {
        true
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<()> {
        // Fields past the device's configuration space are absent: read what is there
        // and leave the rest zero (their features are not offered).
        let have = match self.config_size {
            Some(size) => (size.saturating_sub(offset) as usize).min(buf.len()),
            None => buf.len(),
        };
        buf[have..].fill(0);
        if have > 0 {
            self.fd.vdpa_get_config(offset, &mut buf[..have])?;
        }
        Ok(())
    }

    fn setup_queue(&mut self, index: u16, layout: &RingLayout) -> Result<Notifier> {
        if let Some(n) = self.vqs {
            if index as u32 >= n {
                return Err(Error::InvalidQueue(format!(
                    "queue {index} does not exist: {} has {n} queues",
                    self.describe()
                )));
            }
        }
        if layout.size > self.vring_num {
            return Err(Error::QueueSizeRefused {
                index,
                size: layout.size,
                cause: format!("{} takes at most {}", self.describe(), self.vring_num),
            });
        }
        // A packed ring's state carries the wrap counters in bit 15 of each half
        // (available in the low half, used in the high half), both starting at 1.
        let base = if layout.packed { 0x8000_8000 } else { 0 };
        let v = setup_vring(
            &self.fd,
            index,
            layout.size,
            (layout.desc_iova, layout.avail_iova, layout.used_iova),
            base,
        )?;
        let kick = v.kick.clone();
        let i = index as usize;
        if self.vrings.len() <= i {
            self.vrings.resize_with(i + 1, || None);
        }
        self.vrings[i] = Some(v);
        Ok(Notifier::EventFd(kick))
    }

    fn start(&mut self) -> Result<()> {
        for i in 0..self.vrings.len() {
            if self.vrings[i].is_some() {
                self.fd.vdpa_set_vring_enable(i as u16, true)?;
            }
        }
        self.fd
            .vdpa_set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)?;
        let s = self.fd.vdpa_status()?;
        if s & S_DRIVER_OK == 0 || s & (S_NEEDS_RESET | S_FAILED) != 0 {
            return Err(Error::Device(format!(
                "{}: device status {s:#x} after DRIVER_OK",
                self.describe()
            )));
        }
        self.started = true;
        Ok(())
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.started {
            self.started = false;
            if self.backend & BF_SUSPEND != 0 {
                // The device finishes what it has in flight and stops.
                let _ = self.fd.vdpa_suspend(true);
            }
            let _ = self.reset();
        }
        self.vrings.clear();
        Ok(())
    }

    fn memory(&self) -> &Arc<DmaMemory> {
        &self.mem
    }

    fn broken_flag(&self) -> Arc<AtomicBool> {
        self.broken.clone()
    }

    fn completion_signal(&self, index: u16) -> Option<Arc<EventFd>> {
        self.vrings
            .get(index as usize)?
            .as_ref()
            .map(|v| v.call.clone())
    }

    fn abort(&self) {
        self.broken.store(true, Ordering::Release);
        // A reset stops the device from touching the rings.
        let _ = self.fd.vdpa_set_status(0);
    }
}

impl Drop for VdpaTransport {
    fn drop(&mut self) {
        let _ = Transport::shutdown(self);
        let _ = self.fd.vdpa_set_status(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Addressing, DmaConfig};

    fn mem() -> Arc<DmaMemory> {
        DmaMemory::new(DmaConfig {
            initial_region_size: 1 << 20,
            hugetlb: false,
            hugetlb_fallback: false,
            max_total_size: 8 << 20,
            addressing: Addressing::Virtual,
        })
        .unwrap()
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = VdpaTransport::open(Path::new("/nonexistent/vhost-vdpa-0"), mem(), 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vhost_vdpa") && e.contains("vdpa dev add"),
            "{e}"
        );
        let e = VdpaTransport::open(Path::new("/dev/null"), mem(), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a vhost-vdpa device"), "{e}");
    }
}
