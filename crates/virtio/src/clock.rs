//! A cheap monotonic clock for the I/O path.
//!
//! Latency statistics need a timestamp at submit and at completion of every I/O; a
//! `clock_gettime` (even through the vDSO) costs tens of nanoseconds each, a large share
//! of a polled I/O. On x86_64 with an invariant TSC (constant rate, never stopped) the
//! clock is the TSC, read with `rdtsc` (a few nanoseconds), converted to nanoseconds
//! with a factor calibrated once against the OS clock. Elsewhere it is
//! [`std::time::Instant`].

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How ticks turn into nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Calibration {
    /// The TSC is used.
    tsc: bool,
    /// Nanoseconds per tick, as a 32.32 fixed-point factor.
    ns_per_tick_q32: u64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn calibration() -> Calibration {
    static CAL: OnceLock<Calibration> = OnceLock::new();
    *CAL.get_or_init(|| {
        if !invariant_tsc() {
            return Calibration {
                tsc: false,
                ns_per_tick_q32: 1 << 32,
            };
        }
        // Count ticks over 20 ms of wall time (spinning, so no sleep granularity). Each
        // end is the tightest of a few (TSC, OS clock, TSC) readings, so a preemption
        // between two readings cannot skew the factor.
        let pair = || {
            let mut best = (u64::MAX, 0u64, Instant::now());
            for _ in 0..16 {
                let a = rdtsc();
                let t = Instant::now();
                let b = rdtsc();
                let width = b.wrapping_sub(a);
                if width < best.0 {
                    best = (width, a + width / 2, t);
                }
            }
            (best.1, best.2)
        };
        let (c0, t0) = pair();
        while t0.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let (c1, t1) = pair();
        let ns = t1.duration_since(t0).as_nanos() as u64;
        let ticks = c1.wrapping_sub(c0).max(1);
        Calibration {
            tsc: true,
            ns_per_tick_q32: ((ns as u128) << 32).div_euclid(ticks as u128) as u64,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn invariant_tsc() -> bool {
    use std::arch::x86_64::__cpuid;
    // CPUID 8000_0007h EDX bit 8: invariant TSC (Intel SDM vol. 3, 17.17.1; AMD APM).
    let max_ext = __cpuid(0x8000_0000).eax;
    max_ext >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn invariant_tsc() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn rdtsc() -> u64 {
    // SAFETY: rdtsc reads the time-stamp counter; it has no memory effects and exists on
    // every x86_64 CPU.
    unsafe { std::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn rdtsc() -> u64 {
    0
}

/// Make sure the clock is calibrated (otherwise the first conversion calibrates it,
/// spinning for 20 ms). Call it once before the I/O path starts.
pub fn init() {
    let _ = epoch();
    let _ = calibration();
}

/// The current time in ticks (TSC or nanoseconds since an epoch).
#[inline]
pub fn ticks() -> u64 {
    if calibration().tsc {
        rdtsc()
    } else {
        epoch().elapsed().as_nanos() as u64
    }
}

/// Nanoseconds in `ticks` ticks (a difference of two [`ticks`] readings).
#[inline]
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let c = calibration();
    ((ticks as u128 * c.ns_per_tick_q32 as u128) >> 32).min(u64::MAX as u128) as u64
}

/// Ticks in `ns` nanoseconds (for deadlines).
pub fn ns_to_ticks(ns: u64) -> u64 {
    let c = calibration();
    (((ns as u128) << 32) / c.ns_per_tick_q32.max(1) as u128).min(u64::MAX as u128) as u64
}

/// Whether the TSC is the clock.
pub fn uses_tsc() -> bool {
    calibration().tsc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_measure_wall_time() {
        init();
        let t0 = ticks();
        let w0 = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let ns = ticks_to_ns(ticks() - t0);
        let wall = w0.elapsed().as_nanos() as u64;
        // Within 5% of the OS clock (calibration spans 20 ms).
        let diff = ns.abs_diff(wall);
        assert!(diff * 20 < wall, "clock says {ns} ns, OS clock {wall} ns");
    }

    #[test]
    fn conversions_round_trip() {
        let t = ns_to_ticks(1_000_000_000);
        let ns = ticks_to_ns(t);
        assert!(ns.abs_diff(1_000_000_000) < 1000, "{ns}");
    }

    #[test]
    fn ticks_are_monotonic() {
        let mut last = ticks();
        for _ in 0..10_000 {
            let t = ticks();
            assert!(t >= last);
            last = t;
        }
    }
}
