//! A unix-socket connect with a deadline.
//!
//! `UnixStream::connect` blocks for as long as the listener's queue is full: a server
//! that stopped accepting (frozen, serving one front-end and deaf to the next, or with
//! a backlog of 0) would hang the caller for ever. Here the connect is non-blocking and
//! retried until the deadline; the stream it returns is blocking again.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a connect to a full listen queue is tried again (a unix socket's
/// non-blocking connect fails at once with EAGAIN instead of waiting in the queue).
const RETRY: Duration = Duration::from_millis(10);

/// Connect to the unix stream socket at `path`, giving up after `timeout` with an
/// error of kind [`io::ErrorKind::TimedOut`] (the listen queue stayed full: the server
/// is not accepting). Other failures are the OS's (`NotFound`: no socket file,
/// `ConnectionRefused`: nobody listens).
pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a usable unix socket path (1 to {} bytes, no NUL)",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created and owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    loop {
        // SAFETY: `addr` is an initialised sockaddr_un and its size is passed with it.
        let rc = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        let left = deadline.saturating_duration_since(Instant::now());
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EISCONN) => break,
            // The listen queue is full.
            Some(libc::EAGAIN) => {
                if left.is_zero() {
                    return Err(timed_out(path, timeout));
                }
                std::thread::sleep(RETRY.min(left));
            }
            // Not what unix sockets do today, but what a non-blocking connect may say.
            Some(libc::EINPROGRESS | libc::EALREADY) => {
                wait_connected(&sock, left).map_err(|e| {
                    if e.kind() == io::ErrorKind::TimedOut {
                        timed_out(path, timeout)
                    } else {
                        e
                    }
                })?;
                break;
            }
            _ => return Err(e),
        }
    }
    let stream = UnixStream::from(sock);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

fn timed_out(path: &Path, timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "{} did not accept the connection within {}",
            path.display(),
            secs(timeout)
        ),
    )
}

/// `d` in seconds, as people write it ("10 s", "0.5 s").
pub fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// Wait for a connect in progress to finish within `left`.
fn wait_connected(sock: &OwnedFd, left: Duration) -> io::Result<()> {
    let deadline = Instant::now() + left;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_ERROR writes one c_int to `err`, whose size is in `len`.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut err as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        return match err {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn connects_and_gives_up_on_a_full_listen_queue_in_time() {
        let dir = tempfile_dir();
        let p = dir.join("s.sock");
        let l = UnixListener::bind(&p).unwrap();
        // SAFETY: listen(2) on a socket this test owns; it only lowers the backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let mut a = connect_unix(&p, Duration::from_secs(5)).unwrap();
        // The stream is blocking, like UnixStream::connect's.
        let (mut s, _) = l.accept().unwrap();
        a.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        // Nobody accepts any more: the queue (backlog 0) takes one connection, then
        // the next connect waits for room until its deadline.
        let mut queued = Vec::new();
        let t0 = Instant::now();
        let e = loop {
            match connect_unix(&p, Duration::from_millis(300)) {
                Ok(s) => queued.push(s),
                Err(e) => break e,
            }
            assert!(queued.len() < 8, "the queue does not fill");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(
            e.to_string()
                .contains("did not accept the connection within 0.3 s"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        drop(l);
        let e = connect_unix(&p, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        let e = connect_unix(&dir.join("none"), Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let long = dir.join("x".repeat(200));
        let e = connect_unix(&long, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let d = std::env::temp_dir().join(format!("vireo-unix-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
