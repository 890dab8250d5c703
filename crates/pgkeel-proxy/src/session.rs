//! One client connection: startup, SCRAM authentication, then forwarding between the client
//! and a pooled server connection.
//!
//! Forwarding works on whole frames ([`crate::protocol::Frame`]) and never re-encodes them.
//! The session looks at few message types:
//!
//! - client Query, FunctionCall and Sync: each is answered by exactly one ReadyForQuery, so
//!   the session counts them (`pending`) to know when the server has answered everything;
//! - client Parse, Bind, Describe, Execute, Close: an extended-protocol batch is open until its
//!   Sync; the server connection cannot change hands in the middle of one;
//! - server ReadyForQuery: in transaction mode, the connection goes back to the pool when the
//!   status is idle, nothing is pending and no batch is open;
//! - server ParameterStatus: what the client set (application_name, DateStyle...) is
//!   remembered and replayed on the next server connection.
//!
//! Both directions are pumped at once with bounded buffers, so a server that writes while the
//! client is still sending (a large COPY, a pipelining client) cannot deadlock the session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::config::{PoolMode, ProxyConfig};
use crate::pool::{Pool, PoolKey, Pools};
use crate::protocol::{
    sqlstate, AuthExpect, Authentication, BackendDecoder, BackendMessage, ErrorFields, Frame, FrontendDecoder,
    FrontendMessage, Limits, ProtocolVersion, Severity, StartupMessage, StartupPacket, Text, TransactionStatus,
};
use crate::scram::{self, ClientCredential, ScramSecret, ServerExchange};
use crate::server::{ConnectError, ServerAuth, ServerConn};
use crate::topology::Topology;
use crate::userlist::Userlist;

/// Stop reading from one side while this many bytes wait to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
/// Bound on the startup and authentication exchange.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on the proxy's own cleanup statements (ROLLBACK, DISCARD ALL).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Session settings the proxy replays on each server connection a client uses, with their
/// canonical spelling. Others in a startup packet are refused: they would silently apply to
/// one server connection only.
const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "extra_float_digits",
    "search_path",
    "standard_conforming_strings",
];

/// Tracked settings the server does not report with ParameterStatus (before PostgreSQL 18
/// for search_path): after DISCARD ALL their value is unknown.
const UNREPORTED: &[&str] = &["extra_float_digits", "search_path"];

/// Where a cancel request for a client goes: the server connection serving it now.
#[derive(Debug, Clone)]
struct CancelTarget {
    address: String,
    pid: i32,
    secret: Bytes,
}

/// A client's cancel key secret, and where its cancel requests go now.
type CancelEntry = ([u8; 4], Option<CancelTarget>);

/// State shared by every session.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: ProxyConfig,
    /// Who may log in.
    pub userlist: Userlist,
    /// The pools.
    pub pools: Pools,
    /// The cluster's primary.
    pub topology: watch::Receiver<Topology>,
    cancel: Mutex<HashMap<i32, CancelEntry>>,
    next_pid: AtomicI32,
}

impl Shared {
    /// Shared state for a proxy.
    pub fn new(config: ProxyConfig, userlist: Userlist, topology: watch::Receiver<Topology>) -> Shared {
        let start = scram::random_bytes(2).map(|b| i32::from(u16::from_be_bytes([b[0], b[1]]))).unwrap_or(1);
        Shared {
            config,
            userlist,
            pools: Pools::default(),
            topology,
            cancel: Mutex::new(HashMap::new()),
            next_pid: AtomicI32::new(start.max(1)),
        }
    }

    fn register(&self) -> (i32, [u8; 4]) {
        let mut secret = [0u8; 4];
        if let Ok(b) = scram::random_bytes(4) {
            secret.copy_from_slice(&b);
        }
        let mut map = self.cancel.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let pid = self.next_pid.fetch_add(1, Ordering::Relaxed).max(1);
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(pid) {
                e.insert((secret, None));
                return (pid, secret);
            }
        }
    }

    fn set_cancel_target(&self, pid: i32, target: Option<CancelTarget>) {
        if let Some(e) = self.cancel.lock().unwrap_or_else(PoisonError::into_inner).get_mut(&pid) {
            e.1 = target;
        }
    }

    fn unregister(&self, pid: i32) {
        self.cancel.lock().unwrap_or_else(PoisonError::into_inner).remove(&pid);
    }

    fn cancel_target(&self, pid: i32, secret: &[u8]) -> Option<CancelTarget> {
        let map = self.cancel.lock().unwrap_or_else(PoisonError::into_inner);
        let (s, target) = map.get(&pid)?;
        (s.as_slice() == secret).then(|| target.clone()).flatten()
    }
}

/// An error the proxy reports to a client before closing its connection.
#[derive(Debug)]
struct Fail {
    sqlstate: &'static str,
    message: String,
    /// A server's own ErrorResponse, forwarded as is.
    fields: Option<ErrorFields>,
}

impl Fail {
    fn new(sqlstate: &'static str, message: impl Into<String>) -> Fail {
        Fail { sqlstate, message: message.into(), fields: None }
    }

    fn encode(&self, out: &mut BytesMut) {
        match &self.fields {
            Some(f) => BackendMessage::ErrorResponse(f.clone()).encode(out),
            None => BackendMessage::error(Severity::Fatal, self.sqlstate, &self.message).encode(out),
        }
    }
}

/// A server connection attached to a client.
struct Attached {
    conn: ServerConn,
    permit: OwnedSemaphorePermit,
    /// ReadyForQuery messages still to come (one per Query, FunctionCall and Sync sent).
    pending: usize,
    /// An extended-protocol batch was started and its Sync not sent yet.
    open_batch: bool,
    /// The last transaction status the server reported.
    status: TransactionStatus,
    /// Bytes waiting to be written to the server.
    out: BytesMut,
}

impl Attached {
    /// Whether the server has answered everything and no transaction is open.
    fn clean(&self) -> bool {
        self.pending == 0 && !self.open_batch && self.status == TransactionStatus::Idle && self.out.is_empty()
    }
}

/// Runs one client connection to its end.
pub async fn run(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, admitted: Option<OwnedSemaphorePermit>) {
    let _ = stream.set_nodelay(true);
    let mut s = Session {
        shared,
        stream,
        peer,
        rbuf: BytesMut::with_capacity(8192),
        wbuf: BytesMut::with_capacity(8192),
        decoder: FrontendDecoder::new(Limits::default()),
        user: String::new(),
        database: String::new(),
        pool: None,
        server_auth: None,
        desired: Vec::new(),
        told: HashMap::new(),
        key: None,
        attached: None,
    };
    let result = s.serve(admitted.is_some()).await;
    if let Err(fail) = &result {
        tracing::info!(client = %peer, user = %s.user, database = %s.database, error = %fail.message, "closing client connection");
        let mut out = BytesMut::new();
        fail.encode(&mut out);
        s.wbuf.extend_from_slice(&out);
    }
    s.finish().await;
    drop(admitted);
}

struct Session {
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    rbuf: BytesMut,
    /// Bytes waiting to be written to the client.
    wbuf: BytesMut,
    decoder: FrontendDecoder,
    user: String,
    database: String,
    pool: Option<Arc<Pool>>,
    server_auth: Option<ServerAuth>,
    /// Tracked settings the client asked for (startup packet, then its own SETs), by
    /// canonical name.
    desired: Vec<(String, String)>,
    /// The ParameterStatus values the client was told.
    told: HashMap<String, String>,
    /// The BackendKeyData the client got.
    key: Option<(i32, [u8; 4])>,
    attached: Option<Attached>,
}

enum Event {
    ClientRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    ServerRead(std::io::Result<usize>),
    ServerWrote(std::io::Result<usize>),
    Topology,
}

impl Session {
    async fn serve(&mut self, admitted: bool) -> Result<(), Fail> {
        let startup = match tokio::time::timeout(LOGIN_TIMEOUT, self.startup()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, "the client did not finish its startup in 15s"))
            }
        };
        let Some(startup) = startup else { return Ok(()) };
        if !admitted {
            return Err(Fail::new(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "too many client connections to the proxy (max_client_conn = {})",
                    self.shared.config.max_client_conn
                ),
            ));
        }
        match tokio::time::timeout(LOGIN_TIMEOUT, self.authenticate(&startup)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Fail::new(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    "the client did not finish authentication in 15s",
                ))
            }
        }
        self.welcome().await?;
        self.forward().await
    }

    /// Reads the startup packet, answering SSLRequest and GSSENCRequest with 'N' and serving
    /// a CancelRequest. `None` when the connection was a cancel request.
    async fn startup(&mut self) -> Result<Option<StartupMessage>, Fail> {
        let limits = Limits::default();
        loop {
            let packet = loop {
                match StartupPacket::decode(&mut self.rbuf, &limits) {
                    Ok(Some(p)) => break p,
                    Ok(None) => {}
                    Err(e) => {
                        return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, e.to_string()));
                    }
                }
                self.rbuf.reserve(1024);
                match self.stream.read_buf(&mut self.rbuf).await {
                    Ok(0) if self.rbuf.is_empty() => return Ok(None),
                    Ok(0) => {
                        return Err(Fail::new(
                            sqlstate::PROTOCOL_VIOLATION,
                            "the client closed the connection mid-packet",
                        ))
                    }
                    Ok(_) => {}
                    Err(_) => return Ok(None),
                }
            };
            match packet {
                StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                    if !self.rbuf.is_empty() {
                        return Err(Fail::new(
                            sqlstate::PROTOCOL_VIOLATION,
                            "the client sent data after SSLRequest before reading the answer",
                        ));
                    }
                    let _ = self.stream.write_all(b"N").await;
                }
                StartupPacket::CancelRequest(c) => {
                    if let Some(t) = self.shared.cancel_target(c.pid, &c.secret_key) {
                        tracing::info!(client_pid = c.pid, server = %t.address, server_pid = t.pid, "forwarding a cancel request");
                        if let Err(e) = crate::server::send_cancel(&t.address, t.pid, t.secret).await {
                            tracing::warn!(server = %t.address, error = %e, "cannot forward a cancel request");
                        }
                    }
                    return Ok(None);
                }
                StartupPacket::Startup(m) => return Ok(Some(m)),
            }
        }
    }

    /// SCRAM-SHA-256 against the userlist, then the server credentials for this user.
    async fn authenticate(&mut self, startup: &StartupMessage) -> Result<(), Fail> {
        let Some(user) = startup.user().filter(|u| !u.is_empty()) else {
            return Err(Fail::new(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet",
            ));
        };
        self.user = user.to_string();
        self.database = startup.database().unwrap_or(user).to_string();
        let mut unrecognized = Vec::new();
        for (k, v) in &startup.params {
            match k.as_str() {
                "user" | "database" => {}
                "options" if v.trim().is_empty() => {}
                "options" => {
                    return Err(Fail::new(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!(
                            "startup option \"options\" ({v:?}) is not supported through the proxy: it would apply \
                             to one pooled server connection only; unset PGOPTIONS and run SET inside the transaction, \
                             or set it per role with ALTER ROLE ... SET"
                        ),
                    ))
                }
                "replication" => {
                    return Err(Fail::new(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "replication connections are not supported through the proxy; connect to the primary directly",
                    ))
                }
                k if k.starts_with("_pq_.") => unrecognized.push(Text::lossy(k)),
                k => match TRACKED.iter().find(|t| t.eq_ignore_ascii_case(k)) {
                    Some(canon) => self.set_desired(canon, v),
                    None => {
                        return Err(Fail::new(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            format!(
                                "unsupported startup parameter {k:?}: through the proxy only {} can be given at \
                                 connection time; remove it, or set it with SET inside each transaction",
                                TRACKED.join(", ")
                            ),
                        ))
                    }
                },
            }
        }
        if startup.version != ProtocolVersion::V3_0 || !unrecognized.is_empty() {
            BackendMessage::NegotiateProtocolVersion { newest_minor: 0, unrecognized_options: unrecognized }
                .encode(&mut self.wbuf);
        }

        // Unknown users go through the same exchange against a random secret, so the answer
        // does not tell whether the user exists.
        let entry = self.shared.userlist.get(&self.user).cloned();
        let secret = match &entry {
            Some(e) => e.secret.clone(),
            None => ScramSecret::from_password(
                &scram::new_nonce().unwrap_or_default(),
                &scram::random_bytes(16).unwrap_or_default(),
                scram::DEFAULT_ITERATIONS,
            ),
        };
        BackendMessage::Authentication(Authentication::Sasl { mechanisms: vec![scram::MECHANISM.into()] })
            .encode(&mut self.wbuf);
        self.flush().await?;
        let user = self.user.clone();
        let failed =
            move || Fail::new(sqlstate::INVALID_PASSWORD, format!("password authentication failed for user {user:?}"));
        self.decoder.auth = AuthExpect::SaslInitial;
        let mut exchange =
            ServerExchange::new(secret).map_err(|e| Fail::new(sqlstate::INTERNAL_ERROR, e.to_string()))?;
        let first = match self.read_client_message().await? {
            FrontendMessage::SaslInitialResponse { mechanism, data } if mechanism == scram::MECHANISM => {
                data.unwrap_or_default()
            }
            FrontendMessage::SaslInitialResponse { mechanism, .. } => {
                return Err(Fail::new(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("SASL mechanism {mechanism:?} is not offered; the proxy supports {}", scram::MECHANISM),
                ))
            }
            _ => return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, "expected SASLInitialResponse")),
        };
        let server_first = exchange.client_first(&first).map_err(|e| self.scram_fail(e))?;
        BackendMessage::Authentication(Authentication::SaslContinue(Bytes::from(server_first))).encode(&mut self.wbuf);
        self.flush().await?;
        self.decoder.auth = AuthExpect::SaslContinue;
        let FrontendMessage::SaslResponse(fin) = self.read_client_message().await? else {
            return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, "expected SASLResponse"));
        };
        self.decoder.auth = AuthExpect::None;
        let (server_final, client_key) = match exchange.client_final(&fin) {
            Ok(r) => r,
            Err(scram::ScramError::WrongPassword) => return Err(failed()),
            Err(e) => return Err(self.scram_fail(e)),
        };
        let Some(entry) = entry else { return Err(failed()) };
        BackendMessage::Authentication(Authentication::SaslFinal(Bytes::from(server_final))).encode(&mut self.wbuf);
        BackendMessage::Authentication(Authentication::Ok).encode(&mut self.wbuf);
        self.server_auth = Some(ServerAuth {
            user: self.user.clone(),
            scram: match &entry.password {
                Some(p) => ClientCredential::Password(p.clone()),
                None => ClientCredential::Keys { client_key, secret: entry.secret.clone() },
            },
            password: entry.password.clone(),
        });
        let key = PoolKey { database: self.database.clone(), user: self.user.clone() };
        self.pool = Some(self.shared.pools.get(key, self.shared.config.pool_size));
        Ok(())
    }

    fn scram_fail(&self, e: scram::ScramError) -> Fail {
        match e {
            scram::ScramError::Unsupported(m) => Fail::new(sqlstate::FEATURE_NOT_SUPPORTED, m),
            scram::ScramError::WrongPassword => Fail::new(
                sqlstate::INVALID_PASSWORD,
                format!("password authentication failed for user {:?}", self.user),
            ),
            other => Fail::new(sqlstate::PROTOCOL_VIOLATION, other.to_string()),
        }
    }

    fn set_desired(&mut self, name: &str, value: &str) {
        match self.desired.iter_mut().find(|(k, _)| k == name) {
            Some(e) => e.1 = value.to_string(),
            None => self.desired.push((name.to_string(), value.to_string())),
        }
    }

    /// ParameterStatus, BackendKeyData and ReadyForQuery. The server parameters come from the
    /// pool's first connection (one is opened now if the pool has none yet); in session mode
    /// the client's server connection is attached here.
    async fn welcome(&mut self) -> Result<(), Fail> {
        let pool = self.pool.clone().ok_or_else(|| Fail::new(sqlstate::INTERNAL_ERROR, "no pool"))?;
        let session_mode = self.shared.config.pool_mode == PoolMode::Session;
        if session_mode || pool.welcome().is_none() {
            self.flush().await?;
            let att = self.attach().await?;
            self.attached = Some(att);
        }
        let mut params: HashMap<String, String> = pool.welcome().unwrap_or_default().into_iter().collect();
        if let Some(att) = &self.attached {
            params.extend(att.conn.params.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        for (k, v) in &self.desired {
            if !UNREPORTED.contains(&k.as_str()) {
                params.insert(k.clone(), v.clone());
            }
        }
        let mut names: Vec<&String> = params.keys().collect();
        names.sort();
        for name in names {
            let value = &params[name];
            BackendMessage::ParameterStatus { name: Text::lossy(name), value: Text::lossy(value) }
                .encode(&mut self.wbuf);
        }
        self.told = params;
        let (pid, secret) = self.shared.register();
        self.key = Some((pid, secret));
        if let Some(att) = &self.attached {
            self.shared.set_cancel_target(pid, cancel_target(&att.conn));
        }
        BackendMessage::BackendKeyData { pid, secret_key: Bytes::copy_from_slice(&secret) }.encode(&mut self.wbuf);
        BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut self.wbuf);
        if !session_mode {
            self.release().await;
        }
        self.flush().await
    }

    /// Reads one client message (during authentication).
    async fn read_client_message(&mut self) -> Result<FrontendMessage, Fail> {
        loop {
            match self.decoder.decode(&mut self.rbuf) {
                Ok(Some(FrontendMessage::Terminate)) => {
                    return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, "the client ended the connection during login"))
                }
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, e.to_string())),
            }
            self.rbuf.reserve(1024);
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => {
                    return Err(Fail::new(
                        sqlstate::PROTOCOL_VIOLATION,
                        "the client closed the connection during login",
                    ))
                }
                Ok(_) => {}
            }
        }
    }

    /// Writes everything buffered for the client.
    async fn flush(&mut self) -> Result<(), Fail> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        r.map_err(|e| Fail::new(sqlstate::CONNECTION_FAILURE, format!("write to the client: {e}")))
    }

    /// Takes a server connection for this client: waits for a pool slot (at most
    /// `query_wait_timeout`), then for a running primary (at most `failover_hold_timeout`),
    /// then replays the client's settings on it.
    async fn attach(&mut self) -> Result<Attached, Fail> {
        let pool = self.pool.clone().ok_or_else(|| Fail::new(sqlstate::INTERNAL_ERROR, "no pool"))?;
        let auth = self.server_auth.clone().ok_or_else(|| Fail::new(sqlstate::INTERNAL_ERROR, "not logged in"))?;
        let cfg = &self.shared.config;
        let waited = Instant::now();
        let permit = match tokio::time::timeout(cfg.query_wait_timeout, pool.permit()).await {
            Ok(Some(p)) => p,
            Ok(None) => return Err(Fail::new(sqlstate::ADMIN_SHUTDOWN, "the proxy is shutting down")),
            Err(_) => {
                let (in_use, idle, size) = pool.counts();
                return Err(Fail::new(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!(
                        "no server connection for database {:?} user {:?} became free within query_wait_timeout \
                         ({}): all {size} of pool_size are in use ({in_use} busy, {idle} idle); raise pool_size or \
                         shorten the transactions that hold them",
                        self.database,
                        self.user,
                        pgkeel_config::format_duration(cfg.query_wait_timeout)
                    ),
                ));
            }
        };
        let hold_until = Instant::now() + cfg.failover_hold_timeout;
        let mut topo_rx = self.shared.topology.clone();
        let mut last_error: Option<String> = None;
        let conn = loop {
            let topo = topo_rx.borrow_and_update().clone();
            if let Some(primary) = &topo.primary {
                if let Some(c) = pool.take_idle(topo.newest_term.max(primary.term)) {
                    break c;
                }
                match ServerConn::connect(primary, &self.database, &auth, cfg.server_connect_timeout).await {
                    Ok(c) if c.term >= topo_rx.borrow().newest_term => {
                        tracing::debug!(server = ?c, database = %self.database, user = %self.user, "opened a server connection");
                        pool.set_welcome(&c);
                        break c;
                    }
                    Ok(c) => {
                        last_error = Some(format!("{} runs under term {}, and a newer term exists", c.member, c.term))
                    }
                    Err(ConnectError::Refused(fields)) => {
                        return Err(Fail {
                            sqlstate: sqlstate::CONNECTION_FAILURE,
                            message: describe(&fields),
                            fields: Some(fields),
                        })
                    }
                    Err(ConnectError::Config(m)) => return Err(Fail::new(sqlstate::UNABLE_TO_CONNECT, m)),
                    Err(ConnectError::Retry(m)) => {
                        if last_error.as_deref() != Some(m.as_str()) {
                            tracing::info!(error = %m, "waiting for the primary");
                        }
                        last_error = Some(m)
                    }
                }
            } else {
                last_error = topo.why_none.clone().or_else(|| Some("no primary is known".into()));
            }
            let now = Instant::now();
            if now >= hold_until {
                return Err(Fail::new(
                    sqlstate::CONNECTION_FAILURE,
                    format!(
                        "no running primary within failover_hold_timeout ({}): {}",
                        pgkeel_config::format_duration(cfg.failover_hold_timeout),
                        last_error.unwrap_or_default()
                    ),
                ));
            }
            let nap = (hold_until - now).min(Duration::from_millis(100));
            tokio::select! {
                _ = topo_rx.changed() => {}
                _ = tokio::time::sleep(nap) => {}
            }
        };
        let mut att = Attached {
            conn,
            permit,
            pending: 0,
            open_batch: false,
            status: TransactionStatus::Idle,
            out: BytesMut::with_capacity(8192),
        };
        if let Err(e) = self.sync_params(&mut att).await {
            return Err(Fail::new(sqlstate::CONNECTION_FAILURE, format!("cannot apply the session settings: {e}")));
        }
        if let Some((pid, _)) = self.key {
            self.shared.set_cancel_target(pid, cancel_target(&att.conn));
        }
        let waited = waited.elapsed();
        if waited > Duration::from_millis(500) {
            tracing::info!(client = %self.peer, waited_ms = waited.as_millis() as u64, server = ?att.conn, "attached after a wait");
        }
        Ok(att)
    }

    /// Replays the client's tracked settings that differ on this server connection, in one
    /// round trip, and tells the client the values the server normalised them to.
    async fn sync_params(&mut self, att: &mut Attached) -> Result<(), String> {
        let changes: Vec<(String, String)> =
            self.desired.iter().filter(|(k, v)| att.conn.params.get(k) != Some(v)).cloned().collect();
        if changes.is_empty() {
            return Ok(());
        }
        let calls: Vec<String> = changes
            .iter()
            .map(|(k, v)| format!("pg_catalog.set_config({}, {}, false)", quote_literal(k), quote_literal(v)))
            .collect();
        att.conn.simple_query(&format!("SELECT {}", calls.join(", "))).await?;
        for (k, v) in &changes {
            if UNREPORTED.contains(&k.as_str()) || !att.conn.params.contains_key(k) {
                att.conn.params.insert(k.clone(), v.clone());
            }
            let normalised = att.conn.params.get(k).cloned().unwrap_or_else(|| v.clone());
            self.set_desired(k, &normalised);
            if !UNREPORTED.contains(&k.as_str()) && self.told.get(k) != Some(&normalised) {
                BackendMessage::ParameterStatus { name: Text::lossy(k), value: Text::lossy(&normalised) }
                    .encode(&mut self.wbuf);
                self.told.insert(k.clone(), normalised);
            }
        }
        Ok(())
    }

    /// Gives the attached server connection back: to the pool when it is clean (after
    /// ROLLBACK in a transaction and DISCARD ALL in session mode), else it is closed.
    async fn release(&mut self) {
        let Some(mut att) = self.attached.take() else { return };
        if let Some((pid, _)) = self.key {
            self.shared.set_cancel_target(pid, None);
        }
        let newest = self.shared.topology.borrow().newest_term;
        if att.conn.term < newest {
            tracing::info!(server = ?att.conn, newest_term = newest, "closing a server connection of an older term");
            return;
        }
        if att.pending > 0 || att.open_batch || !att.out.is_empty() || !att.conn.rbuf.is_empty() {
            tracing::debug!(server = ?att.conn, "closing a server connection left mid-exchange");
            return;
        }
        let session_mode = self.shared.config.pool_mode == PoolMode::Session;
        let cleanup = match (att.status, session_mode) {
            (TransactionStatus::Idle, false) => None,
            (TransactionStatus::Idle, true) => Some("DISCARD ALL"),
            (_, false) => Some("ROLLBACK"),
            (_, true) => Some("ROLLBACK; DISCARD ALL"),
        };
        if let Some(sql) = cleanup {
            match tokio::time::timeout(CLEANUP_TIMEOUT, att.conn.simple_query(sql)).await {
                Ok(Ok(_)) => {
                    if session_mode {
                        for k in UNREPORTED {
                            att.conn.params.remove(*k);
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::info!(server = ?att.conn, error = %e, "{sql} failed; closing the server connection");
                    return;
                }
                Err(_) => {
                    tracing::info!(server = ?att.conn, "{sql} timed out; closing the server connection");
                    return;
                }
            }
        }
        if let Some(pool) = &self.pool {
            pool.put_back(att.conn, att.permit);
        }
    }

    /// The forwarding loop, until the client leaves or an error ends the session.
    async fn forward(&mut self) -> Result<(), Fail> {
        let session_mode = self.shared.config.pool_mode == PoolMode::Session;
        let server_decoder = BackendDecoder::default();
        let mut topo_rx = self.shared.topology.clone();
        topo_rx.mark_unchanged();
        loop {
            // Client frames first: they may need a server attached.
            while let Some(frame) = self.next_client_frame()? {
                if frame.tag() == b'X' {
                    // The client is leaving; the server connection stays open for the pool.
                    return Ok(());
                }
                if self.attached.is_none() {
                    self.flush().await?;
                    let att = self.attach().await?;
                    self.attached = Some(att);
                }
                if let Some(att) = self.attached.as_mut() {
                    match frame.tag() {
                        b'Q' | b'F' => att.pending += 1,
                        b'S' => {
                            att.pending += 1;
                            att.open_batch = false;
                        }
                        b'P' | b'B' | b'D' | b'E' | b'C' => att.open_batch = true,
                        _ => {}
                    }
                    att.out.extend_from_slice(frame.as_bytes());
                }
                if self.attached.as_ref().is_some_and(|a| a.out.len() >= HIGH_WATER) {
                    break;
                }
            }
            // Server frames.
            let mut release = false;
            if let Some(att) = self.attached.as_mut() {
                loop {
                    let frame = match server_decoder.decode_frame(&mut att.conn.rbuf) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            let msg = format!("protocol error from the server {}: {e}", att.conn.member);
                            self.attached = None;
                            return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, msg));
                        }
                    };
                    match frame.tag() {
                        b'Z' => {
                            att.pending = att.pending.saturating_sub(1);
                            att.status = match frame.body().first() {
                                Some(b'T') => TransactionStatus::InTransaction,
                                Some(b'E') => TransactionStatus::Failed,
                                _ => TransactionStatus::Idle,
                            };
                            self.wbuf.extend_from_slice(frame.as_bytes());
                            if !session_mode && att.clean() {
                                release = true;
                                break;
                            }
                        }
                        b'S' => {
                            if let Ok(BackendMessage::ParameterStatus { name, value }) = BackendMessage::parse(&frame) {
                                let (name, value) =
                                    (name.to_string_lossy().into_owned(), value.to_string_lossy().into_owned());
                                if let Some(canon) = TRACKED.iter().find(|t| **t == name) {
                                    match self.desired.iter_mut().find(|(k, _)| k == canon) {
                                        Some(e) => e.1 = value.clone(),
                                        None => self.desired.push((canon.to_string(), value.clone())),
                                    }
                                }
                                att.conn.params.insert(name.clone(), value.clone());
                                self.told.insert(name, value);
                            }
                            self.wbuf.extend_from_slice(frame.as_bytes());
                        }
                        _ => self.wbuf.extend_from_slice(frame.as_bytes()),
                    }
                    if self.wbuf.len() >= HIGH_WATER {
                        break;
                    }
                }
            }
            if release {
                self.release().await;
            }
            // Fencing: nothing more goes to a server of an older term than the newest seen.
            if let Some(att) = self.attached.as_ref().filter(|a| !a.out.is_empty()) {
                let newest = self.shared.topology.borrow().newest_term;
                if att.conn.term < newest {
                    return Err(self.term_changed(newest));
                }
            }
            if let Some(e) = self.wait_event(&mut topo_rx).await {
                match e {
                    Event::ClientRead(Ok(0))
                    | Event::ClientRead(Err(_))
                    | Event::ClientWrote(Ok(0))
                    | Event::ClientWrote(Err(_)) => {
                        // The client is gone (or cannot be written to).
                        return Ok(());
                    }
                    Event::ClientRead(Ok(_)) => {}
                    Event::ClientWrote(Ok(n)) => self.wbuf.advance(n),
                    Event::ServerRead(Ok(0))
                    | Event::ServerRead(Err(_))
                    | Event::ServerWrote(Ok(0))
                    | Event::ServerWrote(Err(_)) => {
                        let att = self.attached.take();
                        let what = att.map(|a| format!("{} ({})", a.conn.member, a.conn.address)).unwrap_or_default();
                        return Err(Fail::new(
                            sqlstate::CONNECTION_FAILURE,
                            format!("lost the connection to the primary {what}; the transaction is lost, reconnect and retry"),
                        ));
                    }
                    Event::ServerRead(Ok(_)) => {}
                    Event::ServerWrote(Ok(n)) => {
                        if let Some(att) = self.attached.as_mut() {
                            att.out.advance(n);
                        }
                    }
                    Event::Topology => {
                        let newest = topo_rx.borrow_and_update().newest_term;
                        if self.attached.as_ref().is_some_and(|a| a.conn.term < newest) {
                            return Err(self.term_changed(newest));
                        }
                    }
                }
            }
        }
    }

    /// Drops the attached server connection of an older term and says why.
    fn term_changed(&mut self, newest: u64) -> Fail {
        let (term, member) = self.attached.take().map(|a| (a.conn.term, a.conn.member)).unwrap_or_default();
        Fail::new(
            sqlstate::CONNECTION_FAILURE,
            format!(
                "the primary changed (term {term} -> {newest}) while this session used {member}; the transaction is \
                 lost, reconnect and retry"
            ),
        )
    }

    fn next_client_frame(&mut self) -> Result<Option<Frame>, Fail> {
        self.decoder.decode_frame(&mut self.rbuf).map_err(|e| Fail::new(sqlstate::PROTOCOL_VIOLATION, e.to_string()))
    }

    /// Waits for the next I/O event. `None` when there was nothing to wait for (never in
    /// practice: the client can always be read or written).
    async fn wait_event(&mut self, topo_rx: &mut watch::Receiver<Topology>) -> Option<Event> {
        let read_client = self.attached.as_ref().is_none_or(|a| a.out.len() < HIGH_WATER);
        let write_client = !self.wbuf.is_empty();
        self.rbuf.reserve(8192);
        let (mut cr, mut cw) = self.stream.split();
        match self.attached.as_mut() {
            None => {
                tokio::select! {
                    r = cr.read_buf(&mut self.rbuf), if read_client => Some(Event::ClientRead(r)),
                    r = cw.write(&self.wbuf), if write_client => Some(Event::ClientWrote(r)),
                    else => None,
                }
            }
            Some(att) => {
                let read_server = self.wbuf.len() < HIGH_WATER;
                let write_server = !att.out.is_empty();
                att.conn.rbuf.reserve(8192);
                let (mut sr, mut sw) = att.conn.stream.split();
                tokio::select! {
                    r = cr.read_buf(&mut self.rbuf), if read_client => Some(Event::ClientRead(r)),
                    r = cw.write(&self.wbuf), if write_client => Some(Event::ClientWrote(r)),
                    r = sr.read_buf(&mut att.conn.rbuf), if read_server => Some(Event::ServerRead(r)),
                    r = sw.write(&att.out), if write_server => Some(Event::ServerWrote(r)),
                    _ = topo_rx.changed() => Some(Event::Topology),
                }
            }
        }
    }

    /// End of the session: give the server connection back (or close it), say goodbye.
    async fn finish(&mut self) {
        self.release().await;
        if let Some((pid, _)) = self.key {
            self.shared.unregister(pid);
        }
        if !self.wbuf.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.stream.write_all(&self.wbuf)).await;
        }
        let _ = self.stream.shutdown().await;
    }
}

fn cancel_target(conn: &ServerConn) -> Option<CancelTarget> {
    conn.key.as_ref().map(|(pid, secret)| CancelTarget {
        address: conn.address.clone(),
        pid: *pid,
        secret: secret.clone(),
    })
}

fn describe(e: &ErrorFields) -> String {
    e.message().map(|m| m.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A SQL string literal: single quotes doubled, and the `E''` form when there is a
/// backslash, so the result is right whatever `standard_conforming_strings` says.
fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

#[cfg(test)]
mod tests {
    use super::quote_literal;

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("ISO, MDY"), "'ISO, MDY'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b'"), r"E'a\\b'''");
    }
}
