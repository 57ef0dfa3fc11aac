//! TLS for NBD (`NBD_OPT_STARTTLS`) with rustls: x509 credentials from a directory laid
//! out as QEMU's `tls-creds-x509` reads it (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`). As with QEMU's default (`verify-peer=on`), clients must present a
//! certificate signed by the CA.

use std::io::{IoSlice, Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::Sock;

/// Plaintext rustls may hold for a connection before writes report "would block".
const TLS_BUFFER: usize = 256 << 10;

/// `--nbd-tls`: whether clients must start TLS.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Every client must start TLS before anything else.
    Require,
    /// Clients may start TLS or go on in plain text.
    Allow,
}

/// The server's TLS settings.
#[derive(Clone)]
pub struct Tls {
    pub(super) config: Arc<ServerConfig>,
    pub(super) mode: TlsMode,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

fn read_pem(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let p = dir.join(name);
    std::fs::read(&p).with_context(|| {
        format!(
            "cannot read {} (--nbd-tls-creds DIR holds ca-cert.pem, server-cert.pem and server-key.pem, as QEMU's tls-creds-x509)",
            p.display()
        )
    })
}

impl Tls {
    /// Load the credentials in `dir`.
    pub fn load(dir: &Path, mode: TlsMode) -> Result<Tls> {
        // ring, not aws-lc-rs: it builds without a C toolchain's cmake and nasm. Its
        // provider is deprecated only for lacking post-quantum key exchange, which NBD
        // clients (GnuTLS in QEMU, libnbd) do not need to interoperate.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = read_pem(dir, "ca-cert.pem")?;
        let mut roots = RootCertStore::empty();
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&ca) {
            let c = c.with_context(|| format!("{}/ca-cert.pem: bad PEM", dir.display()))?;
            roots.add(c).with_context(|| {
                format!("{}/ca-cert.pem: not a usable CA certificate", dir.display())
            })?;
            n += 1;
        }
        if n == 0 {
            bail!("{}/ca-cert.pem holds no certificate", dir.display());
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read_pem(dir, "server-cert.pem")?)
                .collect::<std::result::Result<_, _>>()
                .with_context(|| format!("{}/server-cert.pem: bad PEM", dir.display()))?;
        if chain.is_empty() {
            bail!("{}/server-cert.pem holds no certificate", dir.display());
        }
        let key = PrivateKeyDer::from_pem_slice(&read_pem(dir, "server-key.pem")?)
            .with_context(|| format!("{}/server-key.pem: no private key", dir.display()))?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .context("cannot verify clients with ca-cert.pem")?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .with_context(|| {
                format!(
                    "{}: server-cert.pem and server-key.pem do not make a usable pair",
                    dir.display()
                )
            })?;
        Ok(Tls {
            config: Arc::new(config),
            mode,
        })
    }

    /// A server connection for one client.
    pub(super) fn connection(&self) -> Result<ServerConnection> {
        let mut c = ServerConnection::new(self.config.clone()).context("TLS session")?;
        c.set_buffer_limit(Some(TLS_BUFFER));
        Ok(c)
    }
}

/// A client connection of an I/O thread (non-blocking): plain or TLS.
pub(super) enum Stream {
    Plain(Sock),
    Tls(Sock, Box<ServerConnection>),
}

fn would_block() -> std::io::Error {
    std::io::ErrorKind::WouldBlock.into()
}

impl Stream {
    pub fn sock(&self) -> &Sock {
        match self {
            Stream::Plain(s) | Stream::Tls(s, _) => s,
        }
    }

    /// Read plaintext; `Ok(0)` is the end of the stream, WouldBlock as a socket's.
    pub fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s, c) => loop {
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if c.read_tls(s)? == 0 {
                    return Ok(0);
                }
                if let Err(e) = c.process_new_packets() {
                    // Tell the peer why, as far as the socket takes it.
                    let _ = c.write_tls(s);
                    return Err(std::io::Error::other(e));
                }
                // Records the session answers itself (key updates, alerts).
                Self::push(s, c)?;
            },
        }
    }

    /// Write TLS records rustls holds, as far as the socket takes them.
    fn push(s: &mut Sock, c: &mut ServerConnection) -> std::io::Result<()> {
        while c.wants_write() {
            match c.write_tls(s) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Write plaintext; WouldBlock when nothing could be taken.
    pub fn write_vectored(&mut self, iov: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(iov),
            Stream::Tls(s, c) => {
                Self::push(s, c)?;
                let n = c.writer().write_vectored(iov)?;
                Self::push(s, c)?;
                if n == 0 && iov.iter().any(|x| !x.is_empty()) {
                    return Err(would_block());
                }
                Ok(n)
            }
        }
    }

    /// Encrypted bytes wait for the socket.
    pub fn pending_output(&mut self) -> std::io::Result<bool> {
        match self {
            Stream::Plain(_) => Ok(false),
            Stream::Tls(s, c) => {
                Self::push(s, c)?;
                Ok(c.wants_write())
            }
        }
    }
}
