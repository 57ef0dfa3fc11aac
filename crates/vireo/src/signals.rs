//! SIGINT / SIGTERM: the first asks the running command to stop (finish what is in
//! flight, report, clean up); a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

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
