//! One connection from the proxy to a postgres server: open and log in, check that the server
//! is the primary under the expected term, run the proxy's own statements (SET, ROLLBACK,
//! DISCARD ALL). Forwarding itself reads and writes [`ServerConn::stream`] and
//! [`ServerConn::rbuf`] directly (see `session.rs`).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::ServerTlsMode;
use crate::prepared::ServerStatements;
use crate::protocol::{
    sqlstate, Authentication, BackendDecoder, BackendMessage, ErrorFields, FrontendMessage, StartupMessage,
    StartupPacket, Text, TransactionStatus,
};
use crate::scram::{self, ClientCredential, ClientExchange};
use crate::tls::Stream;
use crate::topology::{Primary, Replica};
use tokio_rustls::TlsConnector;

/// What a server connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerRole {
    /// The primary, under a term (fenced).
    Primary,
    /// A replica (in recovery), for reads.
    Replica,
}

/// How the proxy logs in to servers as one user.
#[derive(Debug, Clone)]
pub struct ServerAuth {
    /// Role name.
    pub user: String,
    /// The plaintext password, when known (needed for MD5 and cleartext).
    pub password: Option<String>,
    /// What SCRAM uses: the password, or a client's recovered `ClientKey`; `None` when the
    /// proxy has neither (an MD5 hash only, or `auth_type = "cert"` without a password).
    pub scram: Option<ClientCredential>,
    /// An MD5 hash (`md5...`) from `auth_query`: answers MD5 requests without the password.
    pub md5: Option<String>,
}

impl ServerAuth {
    /// The same credentials.
    pub fn same_as(&self, other: &ServerAuth) -> bool {
        let same_scram = match (&self.scram, &other.scram) {
            (Some(ClientCredential::Password(a)), Some(ClientCredential::Password(b))) => a == b,
            (
                Some(ClientCredential::Keys { client_key: a, secret: sa }),
                Some(ClientCredential::Keys { client_key: b, secret: sb }),
            ) => a == b && sa == sb,
            (None, None) => true,
            _ => false,
        };
        same_scram && self.user == other.user && self.password == other.password && self.md5 == other.md5
    }
}

/// TLS towards servers: the mode and, unless it is `disable`, the connector.
#[derive(Clone)]
pub struct ServerTls {
    /// `server_tls`.
    pub mode: ServerTlsMode,
    /// Set unless the mode is `disable`.
    pub connector: Option<TlsConnector>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.mode.as_str())
    }
}

impl ServerTls {
    /// Plaintext.
    pub fn disabled() -> ServerTls {
        ServerTls { mode: ServerTlsMode::Disable, connector: None }
    }
}

/// What answers a connection [`negotiate_tls`] opens: the errors say how to fix each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// A cluster member's postgres.
    Postgres,
    /// Another proxy (a cancel request passed on).
    Proxy,
}

/// Sends SSLRequest and upgrades to TLS when the server answers `S`. `prefer` goes on in
/// plaintext after `N`; `require` and `verify-full` fail.
async fn negotiate_tls(
    mut tcp: TcpStream,
    tls: &ServerTls,
    address: &str,
    at: &str,
    peer: Peer,
) -> Result<Stream, ConnectError> {
    let Some(connector) = &tls.connector else { return Ok(Stream::Plain(tcp)) };
    let io =
        |e: std::io::Error| ConnectError::Retry(format!("lost the connection to {at} during the TLS request: {e}"));
    let mut out = BytesMut::new();
    StartupPacket::SslRequest.encode(&mut out);
    tcp.write_all(&out).await.map_err(io)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io)?;
    match answer[0] {
        b'S' => {
            let name = crate::tls::server_name(address).map_err(ConnectError::Config)?;
            let s = connector.connect(name, tcp).await.map_err(|e| {
                let msg = format!(
                    "TLS handshake with {at} failed (server_tls = \"{}\"): {e}{}",
                    tls.mode.as_str(),
                    certificate_hint(&e)
                );
                if e.kind() == std::io::ErrorKind::InvalidData {
                    // A certificate problem: retrying will not help.
                    ConnectError::Config(msg)
                } else {
                    ConnectError::Retry(msg)
                }
            })?;
            Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(s))))
        }
        b'N' if tls.mode == ServerTlsMode::Prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(ConnectError::Config(match peer {
            Peer::Postgres => format!(
                "{at} does not offer TLS (ssl = off), but server_tls = \"{}\"; turn ssl on in postgres or set \
                 server_tls = \"prefer\"",
                tls.mode.as_str()
            ),
            Peer::Proxy => format!(
                "{at} does not offer TLS (no [tls] cert and key), but server_tls = \"{}\"; give that proxy a \
                 certificate signed by server_ca, or set server_tls = \"prefer\"",
                tls.mode.as_str()
            ),
        })),
        other => Err(ConnectError::Retry(format!(
            "{at} answered the TLS request with {:?} instead of S or N: is it {}?",
            other as char,
            if peer == Peer::Postgres { "a PostgreSQL server" } else { "a pgkeel proxy" }
        ))),
    }
}

/// What an operator can do about a certificate `verify-full` refused, after the rustls error
/// that names the problem.
fn certificate_hint(e: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(C::Revoked)) => {
            " (a revocation list of tls.server_crl lists the server's certificate: give the server a new one)"
        }
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer)) => {
            " (the certificate is not signed by a CA of tls.server_ca)"
        }
        Some(rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
            " (the certificate does not name the member's host or address: add it to the certificate's subject \
             alternative names)"
        }
        Some(rustls::Error::InvalidCertificate(C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. })) => {
            " (a revocation list of tls.server_crl is past its next update: fetch a new one)"
        }
        _ => "",
    }
}

/// Why a server connection could not be opened.
#[derive(Debug)]
pub enum ConnectError {
    /// Worth retrying while the failover hold lasts: the server is unreachable, starting,
    /// not (yet) the primary, or under an older term.
    Retry(String),
    /// The server refused the login (wrong password, unknown database, ...): retrying will
    /// not help, and the client gets this error.
    Refused(ErrorFields),
    /// The proxy cannot log in (unsupported authentication method, secret mismatch).
    Config(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Retry(s) | ConnectError::Config(s) => f.write_str(s),
            ConnectError::Refused(e) => write!(
                f,
                "{} ({})",
                e.message().map(|m| m.to_string()).unwrap_or_default(),
                e.code().map(|c| c.to_string()).unwrap_or_default()
            ),
        }
    }
}

/// Why [`ServerConn::query`] failed.
#[derive(Debug)]
pub enum QueryError {
    /// The server answered with an error and is ready for the next query.
    Failed(String),
    /// The connection broke (closed, unreadable, a protocol error): it is of no more use.
    Broken(String),
}

/// A server connection, logged in and idle.
///
/// `repr(C)`: what a transaction touches (the fencing check, the socket, the buffers, the
/// cancel target, the settings it was last matched with) comes first, in as few cache lines as
/// the fields allow; what logins, prepared statements and `SHOW SERVERS` touch comes last.
#[repr(C)]
pub struct ServerConn {
    /// The term the server runs under (`pgkeel.term` when the connection was opened).
    pub term: u64,
    /// Primary or replica.
    pub role: ServerRole,
    /// Its place in the order connections were opened in (see [`ServerConn::opened_before`]);
    /// in the padding after `role`.
    serial: u32,
    /// The socket (plain or TLS).
    pub stream: Stream,
    /// Bytes read from the server and not yet consumed.
    pub rbuf: BytesMut,
    /// The write buffer of the client attached to it, kept between attachments so that a
    /// transaction does not allocate one (see `session::Attached`).
    pub spare_out: BytesMut,
    /// The (empty) heap part of the queue of what it owes (see `session::Owed`), kept between
    /// attachments likewise.
    pub(crate) spare_queue: std::collections::VecDeque<crate::session::Entry>,
    /// Its `SHOW SERVERS` row while attached, built once (see [`crate::pool::Pool::track`]).
    pub(crate) live: Option<std::sync::Arc<crate::pool::Live>>,
    /// Where cancel requests for it go, built once (see [`ServerConn::lend_cancel_target`]);
    /// `None` while lent to the client that holds the connection.
    cancel: Option<std::sync::Arc<CancelTarget>>,
    /// The address of the target lent out, to know it when it comes back (compared, never
    /// dereferenced).
    cancel_lent: usize,
    /// Run-time parameters as the server reported them (ParameterStatus), plus the ones the
    /// proxy set itself that the server does not report.
    pub params: crate::tracked::Params,
    /// The server's cancel key: pid and secret.
    pub key: Option<(i32, Bytes)>,
    /// The member's name.
    pub member: String,
    /// `host:port`.
    pub address: String,
    /// When the connection was opened.
    pub opened: Instant,
    /// The protocol-level prepared statements it has (see [`crate::prepared`]).
    pub statements: ServerStatements,
    decoder: BackendDecoder,
    /// Its place under `max_db_connections` and `max_user_connections`, given back when it
    /// closes (none for a connection outside the pools).
    pub permit: crate::pool::Permit,
}

/// Where a cancel request for a client goes: the server connection serving it now.
#[derive(Debug)]
pub struct CancelTarget {
    /// `host:port`.
    pub address: String,
    /// The backend pid.
    pub pid: i32,
    /// The cancel key secret.
    pub secret: Bytes,
    /// The connection uses TLS, so the cancel request (which carries the key) does too.
    pub tls: bool,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("member", &self.member)
            .field("address", &self.address)
            .field("term", &self.term)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// SQLSTATEs that mean "try again shortly": the server is starting, shutting down, in
/// recovery, or full.
fn retryable_sqlstate(code: &str) -> bool {
    matches!(code, "57P03" | "57P01" | "57P02" | "53300" | "08006" | "08001")
}

fn describe(e: &ErrorFields) -> String {
    let msg = e.message().map(|m| m.to_string()).unwrap_or_default();
    match e.code() {
        Some(c) => format!("{msg} (SQLSTATE {c})"),
        None => msg,
    }
}

/// How server connections are opened: the bound on the TCP connect plus login, and the
/// socket options and TLS.
#[derive(Debug, Clone)]
pub struct Dial {
    /// `server_connect_timeout`.
    pub timeout: Duration,
    /// `tcp_*`.
    pub tcp: crate::config::TcpOptions,
    /// TLS to the server, as in force when the connection is opened (`[tls] server_tls`, and
    /// the certificate for the user it logs in as).
    pub tls: ServerTls,
}

impl Dial {
    /// As `config` says, with `tls`.
    pub fn of(config: &crate::config::ProxyConfig, tls: ServerTls) -> Dial {
        Dial { timeout: config.server_connect_timeout, tcp: config.tcp, tls }
    }
}

impl ServerConn {
    /// Opens a connection to `primary` as `auth.user` on `database`, as `dial` says.
    pub async fn connect(
        primary: &Primary,
        database: &str,
        auth: &ServerAuth,
        dial: &Dial,
    ) -> Result<ServerConn, ConnectError> {
        let timeout = dial.timeout;
        let login =
            ServerConn::connect_inner(&primary.name, &primary.address, Some(primary.term), database, auth, dial);
        match tokio::time::timeout(timeout, login).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Retry(format!(
                "connecting to {} ({}) took longer than server_connect_timeout ({timeout:?})",
                primary.name, primary.address
            ))),
        }
    }

    /// Opens a connection to `replica` as `auth.user` on `database`, as [`ServerConn::connect`].
    /// The server must be in recovery.
    pub async fn connect_replica(
        replica: &Replica,
        database: &str,
        auth: &ServerAuth,
        dial: &Dial,
    ) -> Result<ServerConn, ConnectError> {
        let timeout = dial.timeout;
        let login = ServerConn::connect_inner(&replica.name, &replica.address, None, database, auth, dial);
        match tokio::time::timeout(timeout, login).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Retry(format!(
                "connecting to the replica {} ({}) took longer than server_connect_timeout ({timeout:?})",
                replica.name, replica.address
            ))),
        }
    }

    /// Logs in to `name` at `address`; `term` is the leader's term for a primary, `None` for
    /// a replica.
    async fn connect_inner(
        name: &str,
        address: &str,
        term: Option<u64>,
        database: &str,
        auth: &ServerAuth,
        dial: &Dial,
    ) -> Result<ServerConn, ConnectError> {
        let at = format!("{name} ({address})");
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| ConnectError::Retry(format!("cannot connect to {at}: {e}")))?;
        crate::tls::tune(&stream, &dial.tcp);
        let stream = negotiate_tls(stream, &dial.tls, address, &at, Peer::Postgres).await?;
        let mut conn = ServerConn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            params: Default::default(),
            key: None,
            term: 0,
            member: name.to_string(),
            address: address.to_string(),
            opened: Instant::now(),
            serial: OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            role: if term.is_some() { ServerRole::Primary } else { ServerRole::Replica },
            statements: ServerStatements::default(),
            decoder: BackendDecoder::default(),
            spare_out: BytesMut::new(),
            spare_queue: std::collections::VecDeque::new(),
            live: None,
            cancel: None,
            cancel_lent: 0,
            permit: Default::default(),
        };
        let io = |e: std::io::Error| ConnectError::Retry(format!("lost the connection to {at} during login: {e}"));
        let mut out = BytesMut::new();
        StartupPacket::Startup(StartupMessage::new([("user", auth.user.as_str()), ("database", database)]))
            .encode(&mut out);
        conn.stream.send(&out).await.map_err(io)?;
        let mut scram: Option<ClientExchange> = None;
        loop {
            let msg = conn.read_message().await.map_err(|e| ConnectError::Retry(format!("{at}: {e}")))?;
            let reply = match msg {
                BackendMessage::Authentication(a) => match a {
                    Authentication::Ok => None,
                    Authentication::CleartextPassword => {
                        let pw = auth.password.as_deref().ok_or_else(|| no_plaintext(&at, auth, "password"))?;
                        Some(FrontendMessage::Password(Text::lossy(pw)))
                    }
                    Authentication::Md5Password { salt } => {
                        let answer = match (&auth.password, &auth.md5) {
                            (Some(pw), _) => scram::md5_password(&auth.user, pw, &salt),
                            (None, Some(hash)) => scram::md5_response(hash, &salt),
                            (None, None) => return Err(no_plaintext(&at, auth, "md5")),
                        };
                        Some(FrontendMessage::Password(Text::lossy(&answer)))
                    }
                    Authentication::Sasl { .. } if auth.md5.is_some() => {
                        return Err(ConnectError::Config(format!(
                            "{at} asks for SCRAM for {:?}, whose password is stored as an MD5 hash: the proxy can only \
                             log in with MD5 for this user; set its password again with password_encryption = \
                             'scram-sha-256', or use md5 in pg_hba.conf",
                            auth.user
                        )))
                    }
                    Authentication::Sasl { mechanisms } => {
                        if !mechanisms.iter().any(|m| m == scram::MECHANISM) {
                            return Err(ConnectError::Config(format!(
                                "{at} offers SASL mechanisms {mechanisms:?} but not {}",
                                scram::MECHANISM
                            )));
                        }
                        let credential = auth.scram.clone().ok_or_else(|| no_plaintext(&at, auth, "SCRAM-SHA-256"))?;
                        let mut ex =
                            ClientExchange::new(credential).map_err(|e| ConnectError::Config(e.to_string()))?;
                        // Bound to the TLS channel where postgres offers it and the certificate
                        // has binding data: a relay in between, even one whose certificate
                        // `server_tls = "require"` would take, then cannot log in as the proxy.
                        let binding = mechanisms
                            .iter()
                            .any(|m| m == scram::MECHANISM_PLUS)
                            .then(|| conn.stream.peer_endpoint())
                            .flatten();
                        let mechanism = if binding.is_some() { scram::MECHANISM_PLUS } else { scram::MECHANISM };
                        if let Some(data) = binding {
                            ex = ex.bound_to(data);
                        }
                        tracing::debug!(server = %at, mechanism, "logging in with SCRAM");
                        let first = ex.client_first();
                        scram = Some(ex);
                        Some(FrontendMessage::SaslInitialResponse {
                            mechanism: mechanism.into(),
                            data: Some(Bytes::from(first)),
                        })
                    }
                    Authentication::SaslContinue(data) => {
                        let ex = scram.as_mut().ok_or_else(|| unexpected(&at, "SASLContinue before SASL"))?;
                        let fin = ex.server_first(&data).map_err(|e| match e {
                            scram::ScramError::SecretMismatch(s) => {
                                ConnectError::Config(format!("cannot log in to {at} as {:?}: {s}", auth.user))
                            }
                            other => unexpected(&at, &other.to_string()),
                        })?;
                        Some(FrontendMessage::SaslResponse(Bytes::from(fin)))
                    }
                    Authentication::SaslFinal(data) => {
                        let ex = scram.as_ref().ok_or_else(|| unexpected(&at, "SASLFinal before SASL"))?;
                        ex.server_final(&data)
                            .map_err(|e| ConnectError::Config(format!("{at} failed SCRAM server verification: {e}")))?;
                        None
                    }
                    other => {
                        return Err(ConnectError::Config(format!(
                            "{at} asks for an authentication method the proxy does not support ({other:?}); \
                             use scram-sha-256, md5 or password in pg_hba.conf"
                        )))
                    }
                },
                BackendMessage::ErrorResponse(e) => {
                    let code = e.code().map(|c| c.to_string()).unwrap_or_default();
                    return Err(if retryable_sqlstate(&code) {
                        ConnectError::Retry(format!("{at} refused the login: {}", describe(&e)))
                    } else {
                        ConnectError::Refused(e)
                    });
                }
                BackendMessage::ParameterStatus { name, value } => {
                    conn.params.insert(name.to_string_lossy().into_owned(), value.to_string_lossy().into_owned());
                    None
                }
                BackendMessage::BackendKeyData { pid, secret_key } => {
                    conn.key = Some((pid, secret_key));
                    conn.cancel = None;
                    None
                }
                BackendMessage::ReadyForQuery(_) => break,
                BackendMessage::NoticeResponse(_) | BackendMessage::NegotiateProtocolVersion { .. } => None,
                other => return Err(unexpected(&at, &format!("{:?} during login", other.tag() as char))),
            };
            if let Some(reply) = reply {
                out.clear();
                reply.encode(&mut out);
                conn.stream.send(&out).await.map_err(io)?;
            }
        }
        // Fencing: the server itself says it is a primary, and under which term.
        let rows = conn
            .simple_query("select pg_is_in_recovery()::text, coalesce(current_setting('pgkeel.term', true), '')")
            .await
            .map_err(|e| ConnectError::Retry(format!("{at}: {e}")))?;
        let row = rows.first().ok_or_else(|| unexpected(&at, "the term check returned no row"))?;
        let (recovery, server_term) = (row.first().and_then(|v| v.as_deref()), row.get(1).and_then(|v| v.as_deref()));
        let server_term: u64 = server_term.and_then(|t| t.parse().ok()).unwrap_or(0);
        let Some(leader_term) = term else {
            if recovery != Some("true") {
                return Err(ConnectError::Retry(format!("{at} is not in recovery: it is no replica (promoted?)")));
            }
            conn.term = server_term;
            return Ok(conn);
        };
        if recovery != Some("false") {
            return Err(ConnectError::Retry(format!("{at} is in recovery (not promoted yet)")));
        }
        if server_term < leader_term {
            return Err(ConnectError::Retry(format!(
                "{at} runs under term {server_term}, older than the leader's term {leader_term}; waiting for it to catch up"
            )));
        }
        conn.term = server_term;
        Ok(conn)
    }

    /// Reads one whole message.
    pub async fn read_message(&mut self) -> Result<BackendMessage, String> {
        loop {
            match self.decoder.decode(&mut self.rbuf) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(format!("protocol error from the server: {e}")),
            }
            self.rbuf.reserve(8192);
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read from the server: {e}")),
            }
        }
    }

    /// Runs one simple query and returns its rows (as text), tracking ParameterStatus.
    /// An ErrorResponse is returned as `Err` after the server is ready again.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        self.query(sql).await.map_err(|e| match e {
            QueryError::Failed(m) | QueryError::Broken(m) => m,
        })
    }

    /// [`ServerConn::simple_query`], telling an error the server answered (the connection
    /// still usable) from a connection that broke.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, QueryError> {
        let mut out = BytesMut::new();
        FrontendMessage::Query(Text::lossy(sql)).encode(&mut out);
        self.stream.send(&out).await.map_err(|e| QueryError::Broken(format!("write to the server: {e}")))?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await.map_err(QueryError::Broken)? {
                BackendMessage::DataRow(values) => {
                    rows.push(values.into_iter().map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned())).collect())
                }
                BackendMessage::ErrorResponse(e) => error = Some(describe(&e)),
                BackendMessage::ParameterStatus { name, value } => {
                    self.params.insert(name.to_string_lossy().into_owned(), value.to_string_lossy().into_owned());
                }
                BackendMessage::ReadyForQuery(status) => {
                    if let Some(e) = error {
                        return Err(QueryError::Failed(e));
                    }
                    if status != TransactionStatus::Idle {
                        return Err(QueryError::Failed(format!(
                            "the server is in transaction state {:?} after {sql:?}",
                            status
                        )));
                    }
                    return Ok(rows);
                }
                _ => {}
            }
        }
    }

    /// Where cancel requests for this connection go (`None` before BackendKeyData), for the
    /// client attaching it. Moved out, not shared, and taken back when the client detaches
    /// ([`ServerConn::return_cancel_target`]): attaching and detaching (twice per
    /// transaction) then touch no reference count, whose cache line is seldom at hand.
    pub fn lend_cancel_target(&mut self) -> Option<std::sync::Arc<CancelTarget>> {
        let (pid, secret) = self.key.as_ref()?;
        // The key is set once, during login (which clears `cancel`), so a target made after
        // it stays right for the connection's life.
        let c = match self.cancel.take() {
            Some(c) => c,
            None => std::sync::Arc::new(CancelTarget {
                address: self.address.clone(),
                pid: *pid,
                secret: secret.clone(),
                tls: self.stream.is_tls(),
            }),
        };
        self.cancel_lent = std::sync::Arc::as_ptr(&c) as usize;
        Some(c)
    }

    /// Takes back the target [`ServerConn::lend_cancel_target`] lent; another one is dropped
    /// (the next attachment makes a new one).
    pub fn return_cancel_target(&mut self, target: std::sync::Arc<CancelTarget>) {
        if self.cancel.is_none() && std::sync::Arc::as_ptr(&target) as usize == self.cancel_lent {
            self.cancel = Some(target);
        }
    }

    /// Whether the connection still looks usable: no unread bytes and no EOF pending.
    pub fn looks_idle(&self) -> bool {
        self.rbuf.is_empty() && self.stream.looks_idle()
    }

    /// Whether its server ended it alone: an idle connection (one that does not
    /// [`ServerConn::looks_idle`]) whose backend sent `57P05`, postgres's
    /// `idle_session_timeout`, which says nothing about the server's other connections. Reads
    /// what is there without waiting (through TLS too): the connection is closed either way.
    pub fn ended_by_idle_session_timeout(&mut self) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        self.rbuf.reserve(1024);
        let _ = self.stream.poll_read_bytes(&mut cx, &mut self.rbuf);
        crate::protocol::error_code(&self.rbuf)
            .is_some_and(|c| c == *crate::protocol::sqlstate::IDLE_SESSION_TIMEOUT.as_bytes())
    }

    /// Whether it was opened before `mark` ([`opened_mark`]). Wraps around safely: a
    /// connection is compared with marks taken within 2^31 openings of it.
    pub fn opened_before(&self, mark: u32) -> bool {
        serial_before(self.serial, mark)
    }

    /// The connection's number in the order the process opened them.
    pub(crate) fn serial(&self) -> u32 {
        self.serial
    }
}

/// Whether the connection numbered `serial` was opened before `mark`, across a wrap of the
/// counter.
pub(crate) fn serial_before(serial: u32, mark: u32) -> bool {
    (mark.wrapping_sub(serial) as i32) > 0
}

// `serial` sits in the padding between `role` and `stream`: the first line stays as it was.
const _: () = assert!(std::mem::offset_of!(ServerConn, stream) == 16, "keep ServerConn's serial in the padding");

/// Counts the server connections opened by the process ([`ServerConn::opened_before`]).
static OPENED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A mark that every server connection opened so far is [`ServerConn::opened_before`], and
/// none opened later.
pub fn opened_mark() -> u32 {
    OPENED.load(std::sync::atomic::Ordering::Relaxed)
}

/// A server asked for a password the proxy does not have for `auth.user`.
fn no_plaintext(at: &str, auth: &ServerAuth, method: &str) -> ConnectError {
    let user = &auth.user;
    ConnectError::Config(match (&auth.scram, &auth.md5) {
        (Some(ClientCredential::Keys { .. }), _) => format!(
            "{at} asks for {method} authentication for {user:?}, which needs the plaintext password, but the \
             userlist has only a SCRAM secret for this user; put the plaintext password in the userlist or use \
             scram-sha-256 in pg_hba.conf"
        ),
        (_, Some(_)) => format!(
            "{at} asks for {method} authentication for {user:?}, which needs the plaintext password, but the proxy \
             has only an MD5 hash for this user; put the plaintext password in the userlist or use md5 in \
             pg_hba.conf"
        ),
        _ => format!(
            "{at} asks for {method} authentication for {user:?}, and the proxy has no password for this user \
             (auth_type = \"cert\" checks none); put the user's plaintext password in the userlist, or let \
             pg_hba.conf trust the proxy's connections for this user (e.g. cert or trust)"
        ),
    })
}

fn unexpected(at: &str, what: &str) -> ConnectError {
    ConnectError::Retry(format!("{at}: unexpected answer during login: {what}"))
}

/// Sends a CancelRequest for `target`'s backend (best effort). Over TLS (negotiated with
/// `tls`, the `server_tls` in force) when the connection it cancels uses TLS, so the cancel key
/// never crosses the network in plaintext where the session itself does not. Gives up after
/// [`CANCEL_TIMEOUT`].
pub async fn send_cancel(target: &CancelTarget, tls: &ServerTls) -> Result<(), String> {
    in_time(async {
        let at = format!("the server {}", target.address);
        let tcp = TcpStream::connect(&target.address).await.map_err(|e| format!("cannot connect to {at}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let stream = if target.tls {
            negotiate_tls(tcp, tls, &target.address, &at, Peer::Postgres).await.map_err(|e| e.to_string())?
        } else {
            Stream::Plain(tcp)
        };
        let request = crate::protocol::CancelRequest { pid: target.pid, secret_key: target.secret.clone() };
        deliver(stream, StartupPacket::CancelRequest(request), &at).await
    })
    .await
}

/// How long forwarding one cancel request may take (connect, TLS, send).
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Passes a client's cancel request on to the proxy at `peer` (`host:port`), as a
/// [`StartupPacket::ForwardedCancel`], which it applies to its own clients only. The
/// connection goes out as server connections do, with `tls` (the `server_tls` in force, its
/// mode and CA): so under `pgkeel up`, whose proxies' certificates come from the cluster's CA,
/// the key crosses the network over verified TLS. Gives up after [`CANCEL_TIMEOUT`].
pub async fn pass_cancel_on(
    peer: &str,
    request: &crate::protocol::CancelRequest,
    tls: &ServerTls,
) -> Result<(), String> {
    in_time(async {
        let at = format!("the proxy {peer}");
        let tcp = TcpStream::connect(peer).await.map_err(|e| format!("cannot connect to {at}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let stream = negotiate_tls(tcp, tls, peer, &at, Peer::Proxy).await.map_err(|e| e.to_string())?;
        deliver(stream, StartupPacket::ForwardedCancel(request.clone()), &at).await
    })
    .await
}

/// `f`, given up after [`CANCEL_TIMEOUT`].
async fn in_time(f: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(CANCEL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CANCEL_TIMEOUT:?}")))
}

/// Sends a cancel request (`packet`) to `at` on `stream`, then waits until `at` closes the
/// connection, which it does once it has read the request: so it was read before this returns.
async fn deliver(mut stream: Stream, packet: StartupPacket, at: &str) -> Result<(), String> {
    let mut out = BytesMut::new();
    packet.encode(&mut out);
    stream.send(&out).await.map_err(|e| format!("cannot send the cancel request to {at}: {e}"))?;
    let mut sink = BytesMut::with_capacity(64);
    let _ = std::future::poll_fn(|cx| stream.poll_read_bytes(cx, &mut sink)).await;
    Ok(())
}

/// SQLSTATE of "the server connection is gone".
pub const LOST: &str = sqlstate::CONNECTION_FAILURE;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::net::TcpListener;

    #[test]
    fn connections_are_ordered_by_opening_across_the_counters_wrap() {
        assert!(serial_before(5, 6) && !serial_before(6, 6) && !serial_before(7, 6));
        assert!(!serial_before(0, 0), "no connection is before the first mark");
        // Near the wrap: u32::MAX was opened before 2 (the counter went on past 0).
        assert!(serial_before(u32::MAX, 2) && !serial_before(2, u32::MAX));
        assert!(serial_before(u32::MAX - 10, u32::MAX));
    }

    /// A server that accepts one connection, upgrades it to TLS when asked (with `acceptor`),
    /// and returns the first 16 bytes after that and whether they came over TLS.
    async fn one_cancel(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) -> (bool, [u8; 16]) {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let mut first = [0u8; 8];
        tcp.read_exact(&mut first).await.expect("first 8 bytes");
        let mut request = [0u8; 16];
        if first == [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f] {
            tcp.write_all(b"S").await.expect("answer S");
            let mut tls = acceptor.accept(tcp).await.expect("TLS handshake");
            tls.read_exact(&mut request).await.expect("cancel request over TLS");
            (true, request)
        } else {
            request[..8].copy_from_slice(&first);
            tcp.read_exact(&mut request[8..]).await.expect("rest of the cancel request");
            (false, request)
        }
    }

    /// What [`one_cancel`] on a fresh port got from `send(its address)`.
    async fn received<F: std::future::Future<Output = Result<(), String>>>(
        acceptor: &tokio_rustls::TlsAcceptor,
        send: impl FnOnce(String) -> F,
    ) -> (bool, [u8; 16]) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let server = tokio::spawn(one_cancel(listener, acceptor.clone()));
        send(address).await.expect("sent");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the request arrived in time")
            .expect("server task")
    }

    #[tokio::test]
    async fn cancel_requests_use_tls_when_the_connection_does() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let tls = ServerTls {
            mode: ServerTlsMode::Require,
            connector: Some(crate::tls::connector(ServerTlsMode::Require, None, None, None).expect("connector")),
        };
        let want = {
            let mut b = BytesMut::new();
            StartupPacket::CancelRequest(crate::protocol::CancelRequest {
                pid: 4242,
                secret_key: Bytes::from_static(&[1, 2, 3, 4]),
            })
            .encode(&mut b);
            b
        };
        for over_tls in [true, false] {
            let tls = &tls;
            let (used_tls, request) = received(&acceptor, |address| async move {
                let target =
                    CancelTarget { address, pid: 4242, secret: Bytes::from_static(&[1, 2, 3, 4]), tls: over_tls };
                send_cancel(&target, tls).await
            })
            .await;
            assert_eq!(used_tls, over_tls, "TLS exactly when the cancelled connection uses it");
            assert_eq!(&request[..], &want[..], "the cancel request, key included");
        }
        // Passed on to another proxy: over TLS as `server_tls` says, as a forwarded cancel.
        let request = crate::protocol::CancelRequest { pid: 4242, secret_key: Bytes::from_static(&[1, 2, 3, 4]) };
        let want = {
            let mut b = BytesMut::new();
            StartupPacket::ForwardedCancel(request.clone()).encode(&mut b);
            b
        };
        for (tls, over_tls) in [(tls.clone(), true), (ServerTls::disabled(), false)] {
            let (used_tls, got) = received(&acceptor, |address| {
                let (request, tls) = (&request, &tls);
                async move { pass_cancel_on(&address, request, tls).await }
            })
            .await;
            assert_eq!(used_tls, over_tls, "TLS exactly when server_tls asks for it ({tls:?})");
            assert_eq!(&got[..], &want[..], "the forwarded cancel request, key included");
        }
    }

    #[tokio::test]
    async fn a_peer_proxy_without_tls_gets_no_passed_on_cancel_and_the_error_says_why() {
        // A proxy without a certificate answers the TLS request with N.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; 8];
            s.read_exact(&mut request).await.expect("the TLS request");
            s.write_all(b"N").await.expect("answer N");
            // Whatever comes next, if anything.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            rest
        });
        let tls = ServerTls {
            mode: ServerTlsMode::Require,
            connector: Some(crate::tls::connector(ServerTlsMode::Require, None, None, None).expect("connector")),
        };
        let request = crate::protocol::CancelRequest { pid: 7, secret_key: Bytes::from_static(&[9, 9, 9, 9]) };
        let err = pass_cancel_on(&address, &request, &tls).await.expect_err("no TLS, and server_tls requires it");
        assert!(
            err.contains(&format!("the proxy {address}")) && err.contains("give that proxy a certificate"),
            "{err}"
        );
        assert!(!err.contains("postgres"), "worded for a proxy, not for postgres: {err}");
        assert!(peer.await.expect("peer").is_empty(), "the key never went out in plaintext");
    }

    #[tokio::test]
    async fn a_cancel_to_a_server_that_is_gone_is_an_error_naming_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        drop(listener);
        let target = CancelTarget { address: address.clone(), pid: 1, secret: Bytes::from_static(&[0; 4]), tls: false };
        let err = send_cancel(&target, &ServerTls::disabled()).await.expect_err("nothing listens");
        assert!(err.contains(&address) && err.contains("cannot connect"), "{err}");
    }
}
