//! TLS on both sides of the proxy (rustls with the ring provider).
//!
//! - To clients: an SSLRequest is answered `S` when `[tls] cert` and `key` are set and
//!   `client_tls` is not `disable`, and the connection is upgraded before the startup packet
//!   (PostgreSQL's negotiation; direct TLS is refused by the codec). `client_tls = "require"`
//!   refuses a plaintext startup with `FATAL 28000`. `verify-ca` and `verify-full` also ask
//!   the client for a certificate signed by `client_ca` (one signed by another CA fails the
//!   handshake; a missing one is refused after it, with a message), and `verify-full`, like
//!   `[auth] auth_type = "cert"`, wants its common name to be the user name
//!   ([`subject_common_name`], checked by the session).
//! - To servers: `server_tls` decides whether an SSLRequest is sent before the startup packet
//!   and what an `N` answer means: `prefer` goes on in plaintext, `require` and `verify-full`
//!   fail. `require` encrypts without checking the certificate (as libpq's `sslmode=require`);
//!   `verify-full` checks it against `server_ca` and the host name (or IP address) of the
//!   member's address.
//!
//! [`Stream`] is what sessions and server connections read and write: a plain TCP socket or
//! a TLS stream over one. The plaintext path costs one `match` per poll.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::DigitallySignedStruct;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ClientTlsMode, ProxyConfig, ServerTlsMode};

/// A connection's byte stream: plain TCP, or TLS over TCP (either side).
pub enum Stream {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS (boxed: the TLS state is large and the plaintext path should stay small).
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// Taken away (during the TLS upgrade, or after a failed one): reads see EOF, writes fail.
    Closed,
}

/// At most this much is read from a plain socket at once ([`poll_read_plain`]).
const READ_CHUNK: usize = 16 * 1024;

/// Reads a plain socket into the spare capacity of `buf` (some of it), as tokio's
/// `poll_read` does, for less: with tokio's `try_io` straight away when the socket is known
/// readable, waiting (`poll_read_ready`) only when it is not. As `poll_read`, a read that
/// returns less than asked clears the socket's readiness (the socket is drained, and epoll
/// will report new data): the next read then waits instead of spending a `recv` on EAGAIN.
/// Uses a unit of tokio's cooperative budget per read, as `poll_read` does, so a session
/// whose sockets always have data still yields to others now and then.
fn poll_read_plain(tcp: &TcpStream, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
    let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
    let want = (buf.capacity() - buf.len()).min(READ_CHUNK);
    loop {
        let mut drained = None;
        let read = tcp.try_io(tokio::io::Interest::READABLE, || {
            let n = recv_spare(tcp, buf, want)?;
            if n < want {
                // Short: report WouldBlock to `try_io` so that it clears the readiness
                // (under the readiness tick it read before this `recv`, so an event that
                // came meanwhile is kept), and hand `n` over here.
                drained = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match (read, drained) {
            (_, Some(n)) | (Ok(n), None) => n,
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {
                // Not readable (as far as tokio knows, or the `recv` said EAGAIN): wait.
                match tcp.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            (Err(e), None) if e.kind() == io::ErrorKind::Interrupted => continue,
            (Err(e), None) => {
                coop.made_progress();
                return Poll::Ready(Err(e));
            }
        };
        coop.made_progress();
        return Poll::Ready(Ok(n));
    }
}

/// One `recv` of at most `want` bytes into the spare capacity of `buf` (which has that
/// much), appended to it: the byte count.
///
/// rustix makes the system call itself. The C library's `recv` and `send` are cancellation
/// points, and in a process with more than one thread (tokio's blocking threads, which run the
/// local DCS store's writes) each call switches the thread's cancellation type on and
/// off around the system call: about 60 instructions of the proxy's own per call, four calls
/// per transaction (docs/benchmarks.md, "Proxy").
fn recv_spare(tcp: &TcpStream, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let want = want.min(spare.len());
    let ((filled, _), _) = rustix::net::recv(tcp, &mut spare[..want], rustix::net::RecvFlags::empty())?;
    let n = filled.len();
    // SAFETY: `recv` initialised the first `n` bytes of the spare capacity (`filled`), and
    // `n <= want <= spare.len()`, so the new length stays within the capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Sets `TCP_NODELAY` and the keepalive and user timeout of `options` on a client or server
/// socket. Failures are logged, not fatal: the connection works without them.
pub fn tune(tcp: &TcpStream, options: &crate::config::TcpOptions) {
    let sock = socket2::SockRef::from(tcp);
    let _ = sock.set_tcp_nodelay(true);
    if options.keepalive {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(options.keepidle)
            .with_interval(options.keepintvl)
            .with_retries(options.keepcnt);
        if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "cannot set TCP keepalive");
        }
    }
    if let Some(t) = options.user_timeout {
        if let Err(e) = sock.set_tcp_user_timeout(Some(t)) {
            tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
        }
    }
}

/// Writes some of `data` to a plain socket without waiting (as tokio's `try_write`): the
/// byte count, `WouldBlock` when the socket takes nothing now. See [`recv_spare`] for why
/// rustix.
pub fn try_send(tcp: &TcpStream, data: &[u8]) -> io::Result<usize> {
    tcp.try_io(tokio::io::Interest::WRITABLE, || Ok(rustix::net::send(tcp, data, rustix::net::SendFlags::NOSIGNAL)?))
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_tls() { "Stream::Tls" } else { "Stream::Plain" })
    }
}

impl Stream {
    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Reads into the spare capacity of `buf` (which must have some).
    pub fn poll_read_bytes(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        if let Stream::Plain(tcp) = self {
            return poll_read_plain(tcp, cx, buf);
        }
        // `read_buf` keeps no state between polls, so a fresh future per poll is the same
        // as polling one future.
        let fut = self.read_buf(buf);
        tokio::pin!(fut);
        std::future::Future::poll(fut, cx)
    }

    /// Flushes what TLS still buffers (nothing to do for a plain socket).
    pub fn poll_flush_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_flush(cx)
    }

    /// Writes some of `buf`.
    pub fn poll_write_bytes(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write(cx, buf)
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(s.get_ref().0),
            Stream::Closed => None,
        }
    }

    /// The channel binding data ([`endpoint_hash`]) of the certificate the server presented
    /// on this TLS connection; `None` in plaintext, as a TLS server, or for a certificate
    /// without them.
    pub fn peer_endpoint(&self) -> Option<Vec<u8>> {
        let Stream::Tls(tls) = self else { return None };
        let tokio_rustls::TlsStream::Client(c) = &**tls else { return None };
        endpoint_hash(c.get_ref().1.peer_certificates()?.first()?)
    }

    /// Whether the socket has nothing to read (no data, no EOF) right now: an idle pooled
    /// connection. Peeks at the TCP socket without consuming anything, and only when tokio saw
    /// it readable since the read that drained it (a pooled connection's last read usually
    /// did): no system call then, and no waker stored under the socket's lock (`poll_peek`
    /// stores one), once per transaction.
    pub fn looks_idle(&self) -> bool {
        let Some(tcp) = self.tcp() else { return false };
        let peeked = tcp.try_io(tokio::io::Interest::READABLE, || {
            let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            socket2::SockRef::from(tcp).peek(&mut probe)
        });
        matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// The plain TCP stream, leaving [`Stream::Closed`]; `None` (and the stream unchanged)
    /// when it is already TLS.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Stream::Closed) {
            Stream::Plain(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }

    /// Writes all of `data` (for handshake answers before the session loop).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data).await?;
        self.flush().await
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Closed => false,
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the connection was closed")
}

/// The proxy's TLS material, loaded once at start.
#[derive(Clone)]
pub struct Tls {
    /// What clients may or must do.
    pub client_mode: ClientTlsMode,
    /// Present when clients are offered TLS.
    pub acceptor: Option<TlsAcceptor>,
    /// The `tls-server-end-point` channel binding data of the acceptor's certificate
    /// ([`endpoint_hash`]): SCRAM-SHA-256-PLUS is offered to TLS clients when present.
    pub endpoint: Option<Arc<[u8]>>,
    /// What the proxy does towards servers.
    pub server_mode: ServerTlsMode,
    /// Present unless `server_tls = "disable"`.
    pub connector: Option<TlsConnector>,
    /// The connectors of users with a certificate of their own towards postgres
    /// (`[users.NAME] server_cert`), by user name.
    pub user_connectors: std::collections::HashMap<String, TlsConnector>,
    /// A digest of what the server side was made of: `server_tls`, and the names and bytes of
    /// `server_ca`, `server_crl`, `server_cert` and `server_key` and of the users' own
    /// certificates. A reload that changes it replaces the server connections
    /// ([`crate::admin::reload`]).
    pub server_source: [u8; 32],
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_tls", &self.client_mode.as_str())
            .field("server_tls", &self.server_mode.as_str())
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Loads the certificate, key and CA files the configuration names. Errors name the key,
    /// the file and the problem.
    pub fn load(config: &ProxyConfig) -> Result<Tls, String> {
        let t = &config.tls;
        let (acceptor, endpoint) = match (&t.cert, &t.key) {
            (Some(cert), Some(key)) if t.client_tls != ClientTlsMode::Disable => {
                // Set exactly when client_tls asks for certificates (`config::check`).
                let (acceptor, endpoint) = acceptor(cert, key, t.client_ca.as_deref(), t.client_crl.as_deref())?;
                if endpoint.is_none() {
                    tracing::info!(cert = %cert.display(), "the certificate's signature algorithm has no single hash function (RSA or ECDSA with SHA-1 or SHA-2 have): clients get no channel binding (SCRAM-SHA-256-PLUS)");
                }
                (Some(acceptor), endpoint.map(Arc::from))
            }
            _ => (None, None),
        };
        let (ca, crl) = (t.server_ca.as_deref(), t.server_crl.as_deref());
        let default_connector = match t.server_tls {
            ServerTlsMode::Disable => None,
            mode => {
                let identity = t.server_cert.as_deref().zip(t.server_key.as_deref()).map(|(c, k)| ("tls", c, k));
                Some(connector(mode, ca, crl, identity)?)
            }
        };
        // Set only with TLS towards servers (`config::check`).
        let mut user_connectors = std::collections::HashMap::new();
        for (user, (cert, key)) in user_certificates(config) {
            let section = format!("users.{user}");
            user_connectors.insert(user.clone(), connector(t.server_tls, ca, crl, Some((&section, cert, key)))?);
        }
        Ok(Tls {
            client_mode: t.client_tls,
            acceptor,
            endpoint,
            server_mode: t.server_tls,
            connector: default_connector,
            user_connectors,
            server_source: server_source(config),
        })
    }

    /// TLS towards servers: the mode and the connector, with `user`'s own certificate
    /// (`[users.NAME] server_cert`) when it has one.
    pub fn towards_servers(&self, user: Option<&str>) -> crate::server::ServerTls {
        let own = user.and_then(|u| self.user_connectors.get(u));
        crate::server::ServerTls { mode: self.server_mode, connector: own.or(self.connector.as_ref()).cloned() }
    }

    /// No TLS on either side.
    pub fn disabled() -> Tls {
        Tls {
            client_mode: ClientTlsMode::Disable,
            acceptor: None,
            endpoint: None,
            server_mode: ServerTlsMode::Disable,
            connector: None,
            user_connectors: Default::default(),
            server_source: [0; 32],
        }
    }
}

fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    read_pem_list(key, path, "certificate", "CERTIFICATE")
}

/// Every PEM object of type `T` in the file the key `key` (`tls.cert`, ...) names (`noun` and
/// `label` name the type in errors: `certificate`, `-----BEGIN CERTIFICATE-----`); at least
/// one.
fn read_pem_list<T: PemObject>(key: &str, path: &Path, noun: &str, label: &str) -> Result<Vec<T>, String> {
    let items: Vec<T> = T::pem_file_iter(path)
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{key}: {} is not a PEM {noun} file: {e}", path.display()))?;
    if items.is_empty() {
        return Err(format!("{key}: {} has no PEM {noun} (-----BEGIN {label}-----)", path.display()));
    }
    Ok(items)
}

/// The private key of the PEM file the key `name` (`tls.key`, `users.NAME.server_key`) names.
fn read_key(name: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!("{name}: cannot read a PEM private key (PKCS#8, PKCS#1 or SEC1) from {}: {e}", path.display())
    })
}

/// The error for a certificate and a key (each its key path and file) rustls cannot use
/// together.
fn unusable_pair((cert_key, cert): (&str, &Path), (key_key, key): (&str, &Path), e: rustls::Error) -> String {
    format!("{cert_key} / {key_key}: {} and {} do not make a usable pair: {e}", cert.display(), key.display())
}

/// [`Tls::server_source`] of the configuration (the files were just read by [`connector`]; one
/// that cannot be read now counts as empty).
fn server_source(config: &ProxyConfig) -> [u8; 32] {
    use sha2::Digest as _;
    use std::os::unix::ffi::OsStrExt as _;
    fn feed(digest: &mut sha2::Sha256, bytes: &[u8]) {
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(bytes);
    }
    fn feed_file(digest: &mut sha2::Sha256, path: Option<&Path>) {
        feed(digest, path.map_or(&[][..], |p| p.as_os_str().as_bytes()));
        feed(digest, &path.and_then(|p| std::fs::read(p).ok()).unwrap_or_default());
    }
    let t = &config.tls;
    let mut digest = sha2::Sha256::new();
    feed(&mut digest, t.server_tls.as_str().as_bytes());
    for path in [&t.server_ca, &t.server_crl, &t.server_cert, &t.server_key] {
        feed_file(&mut digest, path.as_deref());
    }
    for (user, (cert, key)) in user_certificates(config) {
        feed(&mut digest, user.as_bytes());
        feed_file(&mut digest, Some(cert));
        feed_file(&mut digest, Some(key));
    }
    digest.finalize().into()
}

/// The users with a certificate of their own towards postgres, and its PEM files.
fn user_certificates(config: &ProxyConfig) -> impl Iterator<Item = (&String, (&Path, &Path))> {
    config.users.iter().filter_map(|(user, u)| u.server_cert.as_ref().map(|(c, k)| (user, (c.as_path(), k.as_path()))))
}

/// The CA certificates of the PEM file the key `key` (`tls.server_ca`, ...) names, as trust
/// roots.
fn read_roots(key: &str, path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(key, path)? {
        roots.add(c).map_err(|e| format!("{key}: {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The certificate revocation lists of the PEM file the key `key` (`tls.client_crl`,
/// `tls.server_crl`) names.
fn read_crls(key: &str, path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    read_pem_list(key, path, "revocation list", "X509 CRL")
}

/// A TLS acceptor for clients with the certificate chain and key in PEM files, and the
/// channel binding data of the certificate ([`endpoint_hash`]). With `client_ca`, clients are
/// asked for a certificate: one they present must be signed by a CA of that file, or the
/// handshake fails; one they do not present is the session's to refuse, with an error the
/// client can read (as postgres does with `clientcert` in pg_hba.conf). With `client_crl`, a
/// certificate in one of its revocation lists fails the handshake (as postgres'
/// `ssl_crl_file`); a certificate of a CA that has no list there is taken.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    client_crl: Option<&Path>,
) -> Result<(TlsAcceptor, Option<Vec<u8>>), String> {
    let certs = read_certs("tls.cert", cert)?;
    let endpoint = endpoint_hash(&certs[0]);
    let key_der = read_key("tls.key", key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = read_roots("tls.client_ca", ca)?;
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated();
            if let Some(crl) = client_crl {
                verifier = verifier.with_crls(read_crls("tls.client_crl", crl)?).allow_unknown_revocation_status();
            }
            let verifier = verifier.build().map_err(|e| match client_crl {
                Some(crl) => format!("tls.client_ca / tls.client_crl: {} and {}: {e}", ca.display(), crl.display()),
                None => format!("tls.client_ca: {}: {e}", ca.display()),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config =
        builder.with_single_cert(certs, key_der).map_err(|e| unusable_pair(("tls.cert", cert), ("tls.key", key), e))?;
    Ok((TlsAcceptor::from(Arc::new(config)), endpoint))
}

/// The `tls-server-end-point` channel binding data of a DER certificate (RFC 5929), as
/// PostgreSQL computes it: the certificate's hash with the hash function of its signature
/// algorithm, SHA-256 where that is MD5 or SHA-1. `None` for a signature without one such
/// function (Ed25519, RSA-PSS, anything unknown): no channel binding then.
pub fn endpoint_hash(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest as _;
    // 1.2.840.113549.1.1.x (PKCS #1) and 1.2.840.10045.4.x (ECDSA), DER-encoded.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let oid = signature_algorithm(cert)?;
    let bits = if let Some(rest) = oid.strip_prefix(RSA) {
        match rest {
            // md5WithRSAEncryption, sha1WithRSAEncryption, sha256WithRSAEncryption
            [4] | [5] | [11] => 256,
            [12] => 384,
            [13] => 512,
            _ => return None,
        }
    } else if let Some(rest) = oid.strip_prefix(ECDSA) {
        match rest {
            // ecdsa-with-SHA1, ecdsa-with-SHA256
            [1] | [3, 2] => 256,
            [3, 3] => 384,
            [3, 4] => 512,
            _ => return None,
        }
    } else {
        return None;
    };
    Some(match bits {
        256 => sha2::Sha256::digest(cert).to_vec(),
        384 => sha2::Sha384::digest(cert).to_vec(),
        _ => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// The OID of a DER certificate's `signatureAlgorithm` (Certificate ::= SEQUENCE {
/// tbsCertificate, signatureAlgorithm AlgorithmIdentifier, signatureValue }).
fn signature_algorithm(cert: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = der_tagged(cert, 0x30)?;
    let (_tbs, rest) = der_tagged(certificate, 0x30)?;
    let (algorithm, _) = der_tagged(rest, 0x30)?;
    Some(der_tagged(algorithm, 0x06)?.0)
}

/// The common name (CN) of a DER certificate's subject, as postgres takes it for `cert`
/// authentication and `clientcert=verify-full`: the first CN. The error says what is wrong
/// with the certificate.
pub fn subject_common_name(cert: &[u8]) -> Result<String, &'static str> {
    const UNREADABLE: &str = "its subject cannot be read";
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    // serialNumber, signature, issuer, validity, subject, ... }, ... }
    let next = |der, tag| der_tagged(der, tag).ok_or(UNREADABLE);
    let (certificate, _) = next(cert, 0x30)?;
    let (mut tbs, _) = next(certificate, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = next(tbs, 0xa0)?.1;
    }
    // serialNumber, signature, issuer, validity.
    for tag in [0x02, 0x30, 0x30, 0x30] {
        tbs = next(tbs, tag)?.1;
    }
    let (mut name, _) = next(tbs, 0x30)?;
    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OBJECT IDENTIFIER, value }
    while !name.is_empty() {
        let (mut set, rest) = next(name, 0x31)?;
        name = rest;
        while !set.is_empty() {
            let (attribute, rest) = next(set, 0x30)?;
            set = rest;
            let (oid, value) = next(attribute, 0x06)?;
            // 2.5.4.3: commonName.
            if oid != [0x55, 0x04, 0x03] {
                continue;
            }
            let (tag, text, _) = der_element(value).ok_or(UNREADABLE)?;
            let cn = match tag {
                // UTF8String, PrintableString, IA5String.
                0x0c | 0x13 | 0x16 => {
                    String::from_utf8(text.to_vec()).map_err(|_| "its common name is not valid UTF-8")?
                }
                // TeletexString, read as Latin-1 (as OpenSSL does).
                0x14 => text.iter().map(|&b| char::from(b)).collect(),
                // BMPString: UTF-16, big-endian.
                0x1e if text.len() % 2 == 0 => {
                    let units = text.chunks_exact(2).map(|u| u16::from_be_bytes([u[0], u[1]]));
                    char::decode_utf16(units)
                        .collect::<Result<_, _>>()
                        .map_err(|_| "its common name is not valid UTF-16")?
                }
                _ => return Err("its common name is of a string type the proxy does not read"),
            };
            if cn.contains('\0') {
                return Err("its common name contains a NUL character");
            }
            return Ok(cn);
        }
    }
    Err("it has no common name (CN)")
}

/// [`der_element`] when its tag is `tag`: its contents and what follows it.
fn der_tagged(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, contents, rest) = der_element(der)?;
    (t == tag).then_some((contents, rest))
}

/// The DER element at the start of `der`: its tag, its contents and what follows it.
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |len, &b| (len << 8) | usize::from(b)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A TLS connector for servers: `verify-full` checks the chain against `ca` and the name,
/// and with `crl` (`server_crl`) that no certificate of the chain is in one of its revocation
/// lists (a CA without a list there is taken, as with `client_crl`); `prefer` and `require`
/// check only the handshake signatures. With `identity` (the section, `tls` or `users.NAME`,
/// and the PEM files of its `server_cert` and `server_key`), the proxy presents that
/// certificate when a server asks for one.
pub fn connector(
    mode: ServerTlsMode,
    ca: Option<&Path>,
    crl: Option<&Path>,
    identity: Option<(&str, &Path, &Path)>,
) -> Result<TlsConnector, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = if mode == ServerTlsMode::VerifyFull {
        let ca = ca.ok_or("tls.server_tls = \"verify-full\" needs tls.server_ca, the PEM file of the CA that signed the servers' certificates")?;
        let mut verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(read_roots("tls.server_ca", ca)?),
            provider(),
        );
        if let Some(crl) = crl {
            verifier = verifier.with_crls(read_crls("tls.server_crl", crl)?).allow_unknown_revocation_status();
        }
        let verifier = verifier.build().map_err(|e| match crl {
            Some(crl) => format!("tls.server_ca / tls.server_crl: {} and {}: {e}", ca.display(), crl.display()),
            None => format!("tls.server_ca: {}: {e}", ca.display()),
        })?;
        builder.with_webpki_verifier(verifier)
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoCertCheck(provider())))
    };
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((section, cert, key)) => {
            let (cert_key, key_key) = (format!("{section}.server_cert"), format!("{section}.server_key"));
            let (certs, key_der) = (read_certs(&cert_key, cert)?, read_key(&key_key, key)?);
            builder
                .with_client_auth_cert(certs, key_der)
                .map_err(|e| unusable_pair((&cert_key, cert), (&key_key, key), e))?
        }
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `sslmode=require`: encryption without checking who the server is. The handshake
/// signatures are still verified.
#[derive(Debug)]
struct NoCertCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The server name to check for `host:port` (a DNS name or an IP address).
pub fn server_name(address: &str) -> Result<ServerName<'static>, String> {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} is not a host name for TLS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::Interest;
    use tokio::net::TcpListener;

    async fn pair() -> (Stream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Stream::Plain(server), client)
    }

    async fn read(stream: &mut Stream, buf: &mut BytesMut) -> usize {
        buf.reserve(8192);
        std::future::poll_fn(|cx| stream.poll_read_bytes(cx, buf)).await.unwrap()
    }

    /// Whether tokio still counts the socket readable: `try_io` runs its closure only then.
    fn marked_readable(stream: &Stream) -> bool {
        let mut ran = false;
        let _ = stream.tcp().unwrap().try_io(Interest::READABLE, || {
            ran = true;
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
        ran
    }

    #[tokio::test]
    async fn plain_reads_clear_readiness_after_a_short_read() {
        let (mut stream, mut peer) = pair().await;
        let mut buf = BytesMut::new();
        peer.write_all(b"abc").await.unwrap();
        assert_eq!(read(&mut stream, &mut buf).await, 3);
        assert_eq!(&buf[..], b"abc");
        // Drained: the next read waits for epoll instead of trying a recv.
        assert!(!marked_readable(&stream), "a short read leaves the socket marked readable");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        buf.reserve(8192);
        assert!(stream.poll_read_bytes(&mut cx, &mut buf).is_pending());

        // More than the buffer has room for: full reads keep the readiness, the last short one
        // clears it, and nothing is lost.
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                peer.write_all(&big).await.unwrap();
                peer.shutdown().await.unwrap();
                peer
            })
        };
        buf.clear();
        loop {
            let n = read(&mut stream, &mut buf).await;
            assert!(n <= READ_CHUNK);
            if n == 0 {
                break;
            }
        }
        assert_eq!(buf.len(), big.len());
        assert_eq!(&buf[..], &big[..]);
        // EOF stays readable (it is sticky): another read returns 0 at once.
        assert_eq!(read(&mut stream, &mut buf).await, 0);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn try_send_writes_what_the_socket_takes_and_reports_a_full_one() {
        let (stream, mut peer) = pair().await;
        let tcp = stream.tcp().unwrap();
        assert_eq!(try_send(tcp, b"hello").unwrap(), 5);
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");

        // Nobody reads: the socket fills up, then takes nothing and says so.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        let full = (0..1024)
            .find_map(|_| match try_send(tcp, &chunk) {
                Ok(n) => {
                    sent += n;
                    None
                }
                Err(e) => Some(e),
            })
            .expect("an unread socket fills up (64 MiB went in)");
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock);
        // Everything it said it took arrives.
        let mut received = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while received < sent {
            received += peer.read(&mut buf).await.unwrap();
        }
        assert_eq!(received, sent);

        // A peer that is gone: an error, not a signal.
        drop(peer);
        let mut failed = None;
        for _ in 0..100 {
            tcp.writable().await.unwrap();
            if let Err(e) = try_send(tcp, b"x") {
                if e.kind() != io::ErrorKind::WouldBlock {
                    failed = Some(e);
                    break;
                }
            }
        }
        let e = failed.expect("sending to a closed peer fails");
        assert!(
            matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset),
            "unexpected error: {e}"
        );
    }

    #[tokio::test]
    async fn an_idle_socket_looks_idle_until_bytes_or_the_end_arrive() {
        let (mut stream, mut peer) = pair().await;
        assert!(stream.looks_idle(), "a fresh socket with nothing sent");
        peer.write_all(b"x").await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(read(&mut stream, &mut buf).await, 1);
        assert!(stream.looks_idle(), "after its bytes were read");

        peer.write_all(b"late").await.unwrap();
        stream.tcp().unwrap().readable().await.unwrap();
        assert!(!stream.looks_idle(), "bytes nobody asked for");
        assert!(!stream.looks_idle(), "peeking consumed nothing");
        buf.clear();
        assert_eq!(read(&mut stream, &mut buf).await, 4);
        assert!(stream.looks_idle());

        drop(peer);
        stream.tcp().unwrap().readable().await.unwrap();
        assert!(!stream.looks_idle(), "the peer closed the connection");
    }

    /// Made with `openssl req -x509 -newkey rsa:1024 -sha512` (and `-sha1`); the expected
    /// data are `openssl x509 -noout -fingerprint -sha512` (and `-sha256`) of them.
    const RSA_SHA512_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIICADCCAWmgAwIBAgIUP+Dq8GMisbItjrHJH4jT18Uhkx0wDQYJKoZIhvcNAQEN\nBQAwETEPMA0GA1UEAwwGcnNhNTEyMCAXDTI2MTEyNDEzMzIxNloYDzIxMjYxMDMx\nMTMzMjE2WjARMQ8wDQYDVQQDDAZyc2E1MTIwgZ8wDQYJKoZIhvcNAQEBBQADgY0A\nMIGJAoGBAPOmqqxGhHMRH9sYKejrVmW3TSX3rBOXgenmMUhjnw2myw0JBDKuJq+y\n5aYidUaP0PzrgB3AmMjF6pJ+NQ/xPcAQFpQ1BmJLNfflbxG5WgYntgIfkcdhb914\n0xKmJgZoXY3Pb9+SoS1J9VWms6vy/S4Z/Jxbifj8vCWdWe3RvfS9AgMBAAGjUzBR\nMB0GA1UdDgQWBBRS8E4WBlVFLKKKvtVw+NsdMeEYhjAfBgNVHSMEGDAWgBRS8E4W\nBlVFLKKKvtVw+NsdMeEYhjAPBgNVHRMBAf8EBTADAQH/MA0GCSqGSIb3DQEBDQUA\nA4GBAMv5Pj9S+wgCz5JZ1D1FV6Bv54W0IUp9/3yY6LoAkW+VtY3de3QyCydNrj5f\nb/j+txRLcFXKUUBE+PPuK1pRS7ji5y+NXzhOpqhppZjs2IGubN7YNFctEcP5GwTU\nCw+/CeIXGC/WhMpN7ywlXjm7dR8wZ9AtlK610Cr8XNQGTYaN\n-----END CERTIFICATE-----";
    const RSA_SHA512_FINGERPRINT_SHA512: &str = "bd131951f149fdcce208bf0338da827f34cadb47ded0065de42140c8d95821d81f11dfe935f2b24c3b385d26c400c0596a09a5315625f6c7fa59bb692e375bb2";
    const RSA_SHA1_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB/DCCAWWgAwIBAgIULxmXrmrphpI2iaG8mMKVrt/PRlAwDQYJKoZIhvcNAQEF\nBQAwDzENMAsGA1UEAwwEcnNhMTAgFw0yNjExMjQxMzMyMTZaGA8yMTI2MTAzMTEz\nMzIxNlowDzENMAsGA1UEAwwEcnNhMTCBnzANBgkqhkiG9w0BAQEFAAOBjQAwgYkC\ngYEA86aqrEaEcxEf2xgp6OtWZbdNJfesE5eB6eYxSGOfDabLDQkEMq4mr7LlpiJ1\nRo/Q/OuAHcCYyMXqkn41D/E9wBAWlDUGYks19+VvEblaBie2Ah+Rx2Fv3XjTEqYm\nBmhdjc9v35KhLUn1Vaazq/L9Lhn8nFuJ+Py8JZ1Z7dG99L0CAwEAAaNTMFEwHQYD\nVR0OBBYEFFLwThYGVUUsooq+1XD42x0x4RiGMB8GA1UdIwQYMBaAFFLwThYGVUUs\nooq+1XD42x0x4RiGMA8GA1UdEwEB/wQFMAMBAf8wDQYJKoZIhvcNAQEFBQADgYEA\nu9WahyeAnYOWULVrEUVAUeFDbSkxSia2kj3zrnknbQ17Z7/WlHsTbZ/BCQ02kSKu\nLXvYuiC4TlpVOTghIZV2Vdf9PhjiCBd+LalKlqqftnRYkpMm8KrluhVKWGsseLqM\n4Cz/WnjqdwbcGr8lgxfwWtnL4SmbOCkI60F7E4LAtRQ=\n-----END CERTIFICATE-----";
    const RSA_SHA1_FINGERPRINT_SHA256: &str = "0edb3145a3520fbc63638327082441ef2d28402d182860b4068572dbc6f06cf3";

    fn der_of(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate").to_vec()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_revocation_list_file_that_cannot_be_used_is_named_with_the_problem() {
        let dir = std::env::temp_dir().join(format!("pgkeel-crl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let cases = [
            (dir.join("missing.crl"), "cannot read"),
            (file("cert.pem", RSA_SHA1_CERT), "has no PEM revocation list (-----BEGIN X509 CRL-----)"),
            (
                file("bad.crl", "-----BEGIN X509 CRL-----\n!!!!\n-----END X509 CRL-----\n"),
                "is not a PEM revocation list",
            ),
        ];
        for (path, says) in cases {
            let e = read_crls("tls.client_crl", &path).unwrap_err();
            assert!(
                e.starts_with("tls.client_crl: ") && e.contains(&path.display().to_string()) && e.contains(says),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn channel_binding_data_use_the_signature_hash_as_postgres_does() {
        use sha2::Digest as _;
        // RSA with SHA-512: SHA-512; with SHA-1: SHA-256 (RFC 5929).
        let rsa512 = endpoint_hash(&der_of(RSA_SHA512_CERT)).expect("RSA with SHA-512");
        assert_eq!(hex(&rsa512), RSA_SHA512_FINGERPRINT_SHA512);
        let rsa1 = endpoint_hash(&der_of(RSA_SHA1_CERT)).expect("RSA with SHA-1");
        assert_eq!(hex(&rsa1), RSA_SHA1_FINGERPRINT_SHA256);
        // ECDSA as `pgkeel up` makes them (P-256 with SHA-256), and P-384 with SHA-384.
        for (alg, len) in [(&rcgen::PKCS_ECDSA_P256_SHA256, 32), (&rcgen::PKCS_ECDSA_P384_SHA384, 48)] {
            let key = rcgen::KeyPair::generate_for(alg).expect("key");
            let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
            let data = endpoint_hash(cert.der()).expect("ECDSA");
            assert_eq!(data.len(), len);
            let want = if len == 32 {
                sha2::Sha256::digest(cert.der()).to_vec()
            } else {
                sha2::Sha384::digest(cert.der()).to_vec()
            };
            assert_eq!(data, want);
        }
        // Ed25519 signs without a separate hash: no binding.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(endpoint_hash(cert.der()), None);
        // Not a certificate, or cut short: none, and no panic.
        let der = der_of(RSA_SHA1_CERT);
        for cut in [0, 1, 2, 4, 10, der.len() / 2, der.len() - 1] {
            assert_eq!(endpoint_hash(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(endpoint_hash(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(endpoint_hash(b"not DER"), None);
    }

    /// A certificate whose subject has an organization, then `cn` if any.
    fn cert_with_cn(cn: Option<rcgen::DnValue>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "pgkeel tests");
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_common_name_is_read_from_the_subject_in_each_string_type() {
        use rcgen::string::{BmpString, PrintableString, TeletexString};
        use rcgen::DnValue;
        for (value, want) in [
            (DnValue::Utf8String("alice".into()), "alice"),
            (DnValue::Utf8String("Zoë_app".into()), "Zoë_app"),
            (DnValue::PrintableString(PrintableString::try_from("bob").unwrap()), "bob"),
            (DnValue::BmpString(BmpString::try_from("Ωmega").unwrap()), "Ωmega"),
            (DnValue::TeletexString(TeletexString::try_from("carol").unwrap()), "carol"),
        ] {
            assert_eq!(subject_common_name(&cert_with_cn(Some(value.clone()))), Ok(want.to_string()), "{value:?}");
        }
        assert_eq!(subject_common_name(&cert_with_cn(None)), Err("it has no common name (CN)"));
        assert_eq!(
            subject_common_name(&cert_with_cn(Some(DnValue::Utf8String("a\0b".into())))),
            Err("its common name contains a NUL character")
        );
        // One made by openssl (CN rsa1).
        assert_eq!(subject_common_name(&der_of(RSA_SHA1_CERT)), Ok("rsa1".to_string()));
        // Cut short anywhere, or not a certificate: an error, and no panic.
        let good = cert_with_cn(Some(DnValue::Utf8String("alice".into())));
        for cut in 0..good.len() {
            assert!(subject_common_name(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(subject_common_name(b"not DER").is_err());
        assert!(subject_common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
