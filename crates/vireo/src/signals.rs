//! SIGINT / SIGTERM: the first asks the running command to stop (finish what is in
//! flight, report, clean up); a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
#[cfg(feature = "embedded-target")]
static USR1: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(feature = "embedded-target")]
extern "C" fn on_usr1(_: libc::c_int) {
    USR1.fetch_add(1, Ordering::SeqCst);
}

#[cfg(feature = "embedded-target")]
/// Count SIGUSR1 (`vireo target`: drop the front-end's connection, a scripted fault).
pub fn install_usr1() {
    // SAFETY: the handler only touches an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            on_usr1 as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

#[cfg(feature = "embedded-target")]
/// SIGUSR1 signals received so far.
pub fn usr1_count() -> u64 {
    USR1.load(Ordering::Relaxed)
}

extern "C" fn on_signal(sig: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe; a second signal means "now".
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Install the handler for SIGINT and SIGTERM (and ignore SIGPIPE).
pub fn install() {
    // SAFETY: the handler only touches an atomic and calls _exit, both
    // async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        // A peer that hangs up mid-write must not kill the process.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}
