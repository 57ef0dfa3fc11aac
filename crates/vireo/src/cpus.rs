//! CPU sets: the CPUs this process may run on, SPDK-style CPU masks and lists
//! (`0x3`, `0-3,6`, `[0,2]`), and pinning a thread (`vireo perf -m`, `ublk_create_target`'s
//! `cpumask`).

use anyhow::{bail, Context, Result};

/// The CPUs this process may run on (its inherited affinity, as `taskset` sets it).
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot read this process's CPU affinity (sched_getaffinity)");
        }
        set
    };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads bit `i` < CPU_SETSIZE of the set filled above.
    let cpus: Vec<usize> = (0..max)
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect();
    if cpus.is_empty() {
        bail!("this process may run on no CPU at all (empty affinity)");
    }
    Ok(cpus)
}

/// `0-3,6` style list of CPUs.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Parse `flag`'s value (`0x3`, `0,1`, `0-3`, `[0,2]`) into cores this process may run on
/// (`allowed`), each named once. Every number is checked against `allowed` before a
/// range is expanded: a huge one is an error, not a huge allocation.
pub fn parse_cores(flag: &str, arg: &str, allowed: &[usize]) -> Result<Vec<usize>> {
    let s = arg.trim().trim_start_matches('[').trim_end_matches(']');
    let check = |c: u128| -> Result<usize> {
        match usize::try_from(c) {
            Ok(c) if allowed.contains(&c) => Ok(c),
            _ => bail!(
                "{flag} {arg}: CPU {c} is not one this process may run on (allowed: {}); \
                 pick CPUs from that set or change the affinity (taskset)",
                cpu_list(allowed)
            ),
        }
    };
    let number = |n: &str, part: &str| -> Result<u128> {
        n.trim().parse::<u64>().map(u128::from).with_context(|| {
            format!("{flag} {arg}: invalid core {part:?} (a CPU number, a range like 0-3 or a mask like 0x3)")
        })
    };
    let mut cores = Vec::new();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let mask = u128::from_str_radix(hex, 16)
            .with_context(|| format!("{flag} {arg}: invalid core mask {s:?} (at most 128 bits)"))?;
        for i in 0..128 {
            if mask & (1u128 << i) != 0 {
                cores.push(check(i)?);
            }
        }
    } else {
        for part in s.split(',').filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let (a, b) = (number(a, part)?, number(b, part)?);
                if a > b {
                    bail!(
                        "{flag} {arg}: invalid core range {part:?} (the first CPU is above the last)"
                    );
                }
                // Both ends first: the range is then no longer than the allowed set.
                check(b)?;
                for c in a..=b {
                    cores.push(check(c)?);
                }
            } else {
                cores.push(check(number(part, part)?)?);
            }
        }
    }
    if cores.is_empty() {
        bail!("{flag} {arg}: no cores in {s:?}");
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(c) = cores.iter().find(|&&c| !seen.insert(c)) {
        bail!("{flag} {arg}: CPU {c} is named twice (one thread runs on each core named)");
    }
    Ok(cores)
}

/// Pin the calling thread to `core`.
pub fn pin_to(core: usize) -> std::io::Result<()> {
    if core >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET writes bit `core` < CPU_SETSIZE (checked
    // above) within it; sched_setaffinity reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
