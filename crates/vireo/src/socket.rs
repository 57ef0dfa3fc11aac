//! Unix sockets the servers listen on (`vireo serve`'s JSON-RPC, `--nbd unix:PATH`):
//! bound only when nobody listens there, private to the owner, removed on the way out.
//! A leaf: it names no other module of the binary.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// How long the probe of an existing socket file waits for the server to accept.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Bind `path`, replacing a stale socket file but never a live server or another file.
/// The socket is made mode 0600: whoever connects controls every controller.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        // Bounded: a live server that is not accepting (its queue full) would hang a
        // plain connect; it is still a live server.
        match vireo_virtio::unix::connect_unix(path, PROBE_TIMEOUT) {
            Ok(_) => bail!("{} is in use by a running server", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => bail!(
                "{} is in use by a running server (which does not accept connections: is it stopped?)",
                path.display()
            ),
            Err(_) => {}
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    // Whoever connects controls every controller: the owner only, whatever the umask,
    // from the first moment. The socket is bound in a directory of mode 0700 beside
    // `path`, made 0600 there, then renamed into place (a socket bound at `path` itself
    // would accept connections before its mode is changed).
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = dir.join(format!(
        ".vireo-bind-{}-{}",
        std::process::id(),
        BINDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| {
            format!(
                "cannot listen on {}: cannot create a private directory beside it",
                path.display()
            )
        })?;
    let tmp = private.join("s");
    let bound = (|| -> Result<UnixListener> {
        let l = UnixListener::bind(&tmp)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private (mode 0600)", path.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Private directories made by [`bind`] in this process (their names are unique).
static BINDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Removes the socket file on drop.
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_private_refuses_live_and_foreign_files_replaces_stale() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let l = bind(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = bind(&p).unwrap_err().to_string();
        assert!(e.contains("in use by a running server"), "{e}");
        // A socket file nobody listens on any more is replaced.
        drop(l);
        let l = bind(&p).unwrap();
        {
            let _guard = SocketFile(p.clone());
        }
        assert!(!p.exists(), "SocketFile removes the socket");
        drop(l);
        let f = dir.path().join("plain");
        std::fs::write(&f, b"x").unwrap();
        let e = bind(&f).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
    }
}
