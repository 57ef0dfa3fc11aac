//! `vireo pci` (list virtio PCI functions) and `vireo setup` (bind functions to
//! vfio-pci or uio_pci_generic and back, like SPDK's setup.sh).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vireo_virtio::pci::sysfs::sysfs_root;
use vireo_virtio::pci::{virtio_functions, Binding, PciAddress, PciFunction};

#[derive(clap::Args, Debug)]
pub struct PciArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct SetupArgs {
    /// `bind` or `unbind`.
    #[arg(value_parser = ["bind", "unbind"])]
    action: String,
    /// PCI addresses (0000:00:04.0), or `all` for every virtio-blk/scsi function.
    #[arg(required = true)]
    bdfs: Vec<String>,
    /// Driver to bind to: vfio-pci (IOMMU or no-IOMMU mode) or uio_pci_generic.
    #[arg(long, default_value = "vfio-pci")]
    driver: String,
    /// Bind even if a disk of the function is mounted or otherwise in use.
    #[arg(long)]
    force: bool,
}

fn binding_name(b: &Binding) -> String {
    match b {
        Binding::Vfio => "vfio-pci".into(),
        Binding::Uio => "uio_pci_generic".into(),
        Binding::Kernel(d) => d.clone(),
        Binding::None => "-".into(),
    }
}

/// How vireo would reach the function now.
fn usable(f: &PciFunction) -> &'static str {
    match &f.binding {
        Binding::Vfio => match f.iommu_group {
            Some(g) if Path::new(&format!("/dev/vfio/{g}")).exists() => "vfio (IOMMU)",
            Some(g) if Path::new(&format!("/dev/vfio/noiommu-{g}")).exists() => "vfio (no-IOMMU)",
            _ => "vfio (no group device)",
        },
        Binding::Uio => "uio (physical addresses)",
        Binding::Kernel(_) => "kernel (bind it to use it)",
        Binding::None => "unbound (bind it to use it)",
    }
}

/// `vireo pci [--json]`.
pub fn cmd_pci(a: PciArgs) -> Result<()> {
    let json = a.json;
    let fns = virtio_functions().context("cannot list PCI functions")?;
    if json {
        let v: Vec<serde_json::Value> = fns
            .iter()
            .map(|f| {
                serde_json::json!({
                    "traddr": f.addr.to_string(),
                    "dev_type": f.kind.map(|k| k.name()),
                    "vendor": format!("{:#06x}", f.vendor),
                    "device": format!("{:#06x}", f.device),
                    "transitional": f.transitional,
                    "driver": binding_name(&f.binding),
                    "iommu_group": f.iommu_group,
                    "access": usable(f),
                    "block_devices": block_devices(f),
                })
            })
            .collect();
        vireo::outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    if fns.is_empty() {
        vireo::outln!(
            "no virtio PCI functions (looked in {})",
            sysfs_root().display()
        )?;
        return Ok(());
    }
    vireo::outln!(
        "{:<13} {:<9} {:<7} {:<16} {:<6} ACCESS",
        "BDF",
        "TYPE",
        "DEVICE",
        "DRIVER",
        "GROUP"
    )?;
    for f in &fns {
        let mut access = usable(f).to_string();
        let disks = block_devices(f);
        if !disks.is_empty() {
            access = format!("{access}; disks {}", disks.join(","));
        }
        vireo::outln!(
            "{:<13} {:<9} {:<7} {:<16} {:<6} {}",
            f.addr.to_string(),
            f.kind.map(|k| k.name()).unwrap_or_default(),
            format!("{:04x}{}", f.device, if f.transitional { "t" } else { "" }),
            binding_name(&f.binding),
            f.iommu_group.map(|g| g.to_string()).unwrap_or("-".into()),
            access
        )?;
    }
    Ok(())
}

/// Kernel block devices (`vda`, `sdb`) that sit on the function.
fn block_devices(f: &PciFunction) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack: Vec<(PathBuf, u32)> = vec![(f.sysfs_dir(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            if name == "block" {
                if let Ok(b) = std::fs::read_dir(&p) {
                    out.extend(
                        b.flatten()
                            .map(|x| x.file_name().to_string_lossy().into_owned()),
                    );
                }
            } else if depth < 5
                && (name.starts_with("virtio")
                    || name.starts_with("host")
                    || name.starts_with("target")
                    || name.contains(':'))
                && e.file_type().map(|t| t.is_dir()).unwrap_or(false)
            {
                stack.push((p, depth + 1));
            }
        }
    }
    out.sort();
    out
}

/// Mounts, swaps and holders that use one of `disks` (or their partitions).
fn disks_in_use(disks: &[String]) -> Vec<String> {
    let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
    let mut users = mount_users(disks, &read("/proc/mounts"), &read("/proc/swaps"));
    for d in disks {
        let holders = format!("/sys/class/block/{d}/holders");
        if let Ok(rd) = std::fs::read_dir(&holders) {
            for h in rd.flatten() {
                users.push(format!(
                    "{d} is held by {}",
                    h.file_name().to_string_lossy()
                ));
            }
        }
    }
    users
}

/// Whether `dev` (`/dev/vda1`) is one of `disks` (`vda`) or a partition of one
/// (`vda1`, `nvme0n1p2`).
fn is_disk_or_partition(dev: &str, disks: &[String]) -> bool {
    disks.iter().any(|d| {
        let Some(rest) = dev
            .strip_prefix("/dev/")
            .and_then(|n| n.strip_prefix(d.as_str()))
        else {
            return false;
        };
        let digits = rest.strip_prefix('p').unwrap_or(rest);
        rest.is_empty() || (!digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()))
    })
}

/// Mounts and swaps (the text of /proc/mounts and /proc/swaps) on `disks`.
fn mount_users(disks: &[String], mounts: &str, swaps: &str) -> Vec<String> {
    let mut users = Vec::new();
    for line in mounts.lines() {
        let mut it = line.split_whitespace();
        let (Some(dev), Some(target)) = (it.next(), it.next()) else {
            continue;
        };
        if is_disk_or_partition(dev, disks) {
            users.push(format!("{dev} mounted on {target}"));
        }
    }
    for dev in swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
    {
        if is_disk_or_partition(dev, disks) {
            users.push(format!("{dev} used as swap"));
        }
    }
    users
}

fn write_sysfs(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value)
        .with_context(|| format!("cannot write {value:?} to {}", path.display()))
}

/// The kernel driver other than vfio-pci and uio_pci_generic that has the function in
/// `dir`, if any: `unbind` gives back only what vireo setup bound (a function a kernel
/// driver has, a guest's virtio-blk root disk say, is left alone whatever `all`
/// matched).
fn kernel_owner(dir: &Path) -> Option<String> {
    match current_driver(dir) {
        Some(d) if d != "vfio-pci" && d != "uio_pci_generic" => Some(d),
        _ => None,
    }
}

fn current_driver(dir: &Path) -> Option<String> {
    std::fs::read_link(dir.join("driver"))
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

fn ensure_driver(driver: &str) -> Result<()> {
    let dir = PathBuf::from("/sys/bus/pci/drivers").join(driver);
    if dir.exists() {
        return Ok(());
    }
    let module = driver.replace('-', "_");
    let _ = std::process::Command::new("modprobe").arg(&module).status();
    if dir.exists() {
        return Ok(());
    }
    bail!("the {driver} driver is not loaded and `modprobe {module}` did not load it; load the module first")
}

/// Bind `addr` to `driver` (`None`: give it back to the kernel's default driver).
fn rebind(addr: PciAddress, driver: Option<&str>, force: bool) -> Result<String> {
    let f = PciFunction::probe(addr)?;
    if f.kind.is_none() {
        bail!("{addr} is not a virtio function; vireo setup only binds virtio functions");
    }
    let dir = f.sysfs_dir();
    if driver.is_none() {
        if let Some(other) = kernel_owner(&dir) {
            return Ok(format!(
                "{addr}: bound to {other}, left alone (unbind gives back functions bound to vfio-pci or uio_pci_generic)"
            ));
        }
    }
    if let Some(d) = driver {
        if current_driver(&dir).as_deref() == Some(d) {
            return Ok(format!("{addr}: already bound to {d}"));
        }
        let disks = block_devices(&f);
        let users = disks_in_use(&disks);
        if !users.is_empty() && !force {
            bail!(
                "{addr} holds disks in use ({}); unmount them first (or pass --force to take the function anyway)",
                users.join("; ")
            );
        }
        ensure_driver(d)?;
        if d == "vfio-pci" && f.iommu_group.is_none() {
            let noiommu =
                std::fs::read_to_string("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode")
                    .map(|s| s.trim() == "Y")
                    .unwrap_or(false);
            if !noiommu {
                bail!("{addr} has no IOMMU group: there is no IOMMU. Enable VFIO's no-IOMMU mode (echo Y > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode) or bind to uio_pci_generic (--driver uio_pci_generic)");
            }
        }
    }
    write_sysfs(&dir.join("driver_override"), driver.unwrap_or("\n"))?;
    if dir.join("driver").exists() {
        write_sysfs(&dir.join("driver/unbind"), &addr.to_string())?;
    }
    // drivers_probe fails (ENODEV etc.) when no driver takes the function; the result
    // is checked below.
    let _ = std::fs::write("/sys/bus/pci/drivers_probe", addr.to_string());
    let now = current_driver(&dir);
    match (driver, &now) {
        (Some(d), Some(n)) if n == d => Ok(format!("{addr}: bound to {d}")),
        (Some(d), _) => bail!(
            "{addr}: {d} did not take the function (now {}); see dmesg",
            now.as_deref().unwrap_or("unbound")
        ),
        (None, n) => Ok(format!(
            "{addr}: given back to the kernel ({})",
            n.as_deref().unwrap_or("no driver took it")
        )),
    }
}

/// `vireo setup bind|unbind BDF... [--driver D] [--force]`; Ok(false) when a function
/// could not be (un)bound.
pub fn cmd_setup(a: SetupArgs) -> Result<bool> {
    let (action, bdfs, driver, force) = (a.action.as_str(), &a.bdfs, a.driver.as_str(), a.force);
    if !matches!(driver, "vfio-pci" | "uio_pci_generic") {
        bail!("--driver must be vfio-pci or uio_pci_generic, got {driver:?}");
    }
    let targets: Vec<PciAddress> = if bdfs.iter().any(|b| b == "all") {
        virtio_functions()?
            .into_iter()
            .filter(|f| {
                matches!(
                    f.kind,
                    Some(vireo_virtio::pci::VirtioKind::Blk | vireo_virtio::pci::VirtioKind::Scsi)
                )
            })
            .map(|f| f.addr)
            .collect()
    } else {
        bdfs.iter()
            .map(|b| b.parse::<PciAddress>())
            .collect::<Result<_, _>>()?
    };
    if targets.is_empty() {
        bail!("no functions to {action}; name them by address (vireo pci lists them) or say `all`");
    }
    let mut ok = true;
    for a in targets {
        let r = match action {
            "bind" => rebind(a, Some(driver), force),
            _ => rebind(a, None, force),
        };
        match r {
            Ok(m) => vireo::outln!("{m}")?,
            Err(e) => {
                eprintln!("vireo: {e:#}");
                ok = false;
            }
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `unbind` never takes a function from a kernel driver (it used to write the
    /// kernel driver's unbind file: `vireo setup unbind all` in a guest pulled its
    /// virtio-blk root disk); functions with vireo's drivers, or none, are given back.
    #[test]
    fn unbind_gives_back_only_what_vireo_setup_bound() {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("0000:00:04.0");
        std::fs::create_dir_all(&dev).unwrap();
        assert_eq!(kernel_owner(&dev), None, "unbound");
        for (driver, owner) in [
            ("virtio-pci", Some("virtio-pci")),
            ("nvme", Some("nvme")),
            ("vfio-pci", None),
            ("uio_pci_generic", None),
        ] {
            let d = root.path().join("drivers").join(driver);
            std::fs::create_dir_all(&d).unwrap();
            let _ = std::fs::remove_file(dev.join("driver"));
            std::os::unix::fs::symlink(&d, dev.join("driver")).unwrap();
            assert_eq!(kernel_owner(&dev).as_deref(), owner, "{driver}");
        }
    }

    #[test]
    fn partitions_count_as_uses_of_their_disk() {
        let disks = vec!["vda".to_string(), "nvme0n1".to_string()];
        let mounts = "proc /proc proc rw 0 0\n/dev/vda1 /mnt ext4 rw 0 0\n/dev/vdab /x ext4 rw 0 0\n/dev/nvme0n1p2 /data xfs rw 0 0\n/dev/vdb /y ext4 rw 0 0\n";
        let swaps = "Filename Type Size Used Priority\n/dev/vda partition 1024 0 -2\n/dev/vdapp partition 1 0 -3\n";
        assert_eq!(
            mount_users(&disks, mounts, swaps),
            vec![
                "/dev/vda1 mounted on /mnt".to_string(),
                "/dev/nvme0n1p2 mounted on /data".to_string(),
                "/dev/vda used as swap".to_string(),
            ],
            "vdab, vdb and vdapp are other devices"
        );
        assert!(mount_users(&["vdz".to_string()], mounts, swaps).is_empty());
    }
}
