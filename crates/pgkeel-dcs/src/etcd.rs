//! The etcd v3 store: [`EtcdStore`], a [`Dcs`] backed by an etcd cluster (3.4 or newer), for
//! pgkeel clusters that span machines.
//!
//! This module owns the whole client. It speaks etcd's JSON gRPC gateway (`POST /v3/...`) over
//! plain HTTP/1.1 rather than gRPC, which keeps tonic and prost out of the dependency tree:
//! keys and values travel base64-encoded and int64 fields come back as JSON strings. Every
//! call opens its own TCP connection; an agent makes a handful of calls per loop, so a pool
//! would save little and add a failure mode (a reused connection the server closed).
//!
//! How the [`Dcs`] operations map onto etcd:
//!
//! - revisions are etcd's store-wide revisions, taken from each response header;
//! - a TTL becomes a lease granted just before the write (whole seconds, rounded up, and never
//!   below etcd's minimum, 2 s with default election settings) and attached by the same
//!   request that writes the key. Each write gets its own lease; the one the key had before is
//!   revoked in the background after a successful rewrite or delete, so a key rewritten every
//!   loop does not leave a trail of leases behind (an unused lease expires on its own anyway);
//! - `create` is a txn comparing `create_revision == 0`, `compare_and_set` one comparing
//!   `mod_revision == expected` (and `create_revision > 0`, because etcd compares an absent key
//!   as revision 0), `delete` with an expected revision likewise;
//! - `ttl_left` comes from `/v3/lease/timetolive`, which counts in whole seconds; it is rounded
//!   up so it never understates the time left. `list` leaves it `None` (one more request per
//!   key), see [`TtlPrecision::ttl_left_in_list`];
//! - `watch` reads the key, and if it is as the caller knows it, opens `/v3/watch` from the
//!   next revision, so no change between the read and the watch can be missed, and reads the
//!   streamed events as they arrive. Expiry of a lease shows up as a DELETE event.
//!
//! Several endpoints: calls go to the member that answered last. A member that cannot be
//! connected to is skipped at once. A read that times out or gets an "unavailable" answer is
//! retried on the next member; a write is not, because it may have been applied, and a
//! repeated `create` would then report a lost race the caller actually won. The write reports
//! the error instead, and the next call starts at the next member.
//!
//! Every request carries gRPC metadata `hasleader=true`, so a member cut off from its cluster
//! answers "no leader" at once instead of serving stale reads or holding writes until they
//! time out; a watch on such a member is cancelled and re-opened elsewhere.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::{Dcs, DcsError, DcsResult, KeyValue, TtlPrecision};

/// etcd's shortest lease with default election settings: leases are at least
/// 1.5 × `--election-timeout` (1 s by default), rounded up to whole seconds.
const ETCD_MIN_TTL: Duration = Duration::from_secs(2);
/// How late etcd may remove an expired key: its lessor looks for expired leases every 500 ms,
/// then commits the revocation through raft. Measured at 0.4 s on an idle machine.
const ETCD_EXPIRY_DELAY: Duration = Duration::from_secs(1);
/// etcd refuses leases longer than this (`MaxLeaseTTL`).
const ETCD_MAX_TTL_SECS: u64 = 9_000_000_000;
/// Pause before a broken watch stream is opened again, so a member that drops watches at once
/// cannot make the watch spin.
const WATCH_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How often `get` re-reads a key whose lease vanished between reading the key and reading
/// the lease (the key was rewritten or expired in between).
const GET_ATTEMPTS: usize = 3;

/// A [`Dcs`] backed by an etcd v3 cluster, reached through its JSON gateway. See the
/// [module documentation](self) for the design.
///
/// Cloning is cheap; clones share the endpoint list and the choice of member.
#[derive(Debug, Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

/// What one [`EtcdStore`] and its background lease revocations share.
#[derive(Debug)]
struct Inner {
    endpoints: Vec<Endpoint>,
    /// Index of the endpoint to try first: the last one that answered.
    preferred: AtomicUsize,
    /// Deadline of one attempt on one endpoint.
    request_timeout: Duration,
    /// Whether the operator was already told that etcd raised a TTL to its minimum.
    warned_min_ttl: AtomicBool,
}

/// One etcd client URL.
#[derive(Debug, Clone)]
struct Endpoint {
    /// As configured, without a trailing `/`: `http://10.0.0.1:2379`.
    url: String,
    /// `host:port` to connect to and to send as `Host`.
    authority: String,
}

/// Status of the etcd member that answered, from `/v3/maintenance/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdStatus {
    /// Client URL of the member that answered.
    pub endpoint: String,
    /// That member's id.
    pub member_id: u64,
    /// The id of the member it knows as raft leader; 0 when it knows none.
    pub leader: u64,
    /// etcd version, e.g. `3.4.23`.
    pub version: String,
    /// The store's current revision.
    pub revision: u64,
}

/// Why one attempt on one endpoint failed.
#[derive(Debug)]
enum Failure {
    /// The request never reached etcd (no connection, or a member without a leader refused
    /// it before proposing anything): safe to send to another member.
    NotSent(String),
    /// The request may have reached etcd and been applied.
    MaybeSent(String),
    /// No answer within the request timeout.
    Timeout,
    /// etcd answered with a gRPC error.
    Etcd { code: i64, message: String },
    /// The answer is not what etcd sends.
    Corrupt(String),
}

/// gRPC status codes etcd uses for errors we treat specially.
mod code {
    pub const DEADLINE_EXCEEDED: i64 = 4;
    pub const PERMISSION_DENIED: i64 = 7;
    pub const RESOURCE_EXHAUSTED: i64 = 8;
    pub const UNAVAILABLE: i64 = 14;
    pub const DATA_LOSS: i64 = 15;
    pub const UNAUTHENTICATED: i64 = 16;
}

impl Failure {
    /// Whether the member itself failed (as opposed to refusing this one request), so the
    /// next call should start at another member.
    fn member_failed(&self) -> bool {
        match self {
            Failure::NotSent(_) | Failure::MaybeSent(_) | Failure::Timeout => true,
            Failure::Etcd { code, .. } => *code == code::UNAVAILABLE || *code == code::DEADLINE_EXCEEDED,
            Failure::Corrupt(_) => false,
        }
    }

    /// Whether the same request may be sent to another member.
    fn retryable(&self, idempotent: bool) -> bool {
        match self {
            Failure::NotSent(_) => true,
            _ => idempotent && self.member_failed(),
        }
    }

    /// The error callers see for this failure on `endpoint`.
    fn into_error(self, endpoint: &str, path: &str, timeout: Duration) -> DcsError {
        match self {
            Failure::NotSent(m) | Failure::MaybeSent(m) => DcsError::Unavailable(format!("etcd {endpoint}{path}: {m}")),
            Failure::Timeout => DcsError::Timeout(timeout),
            Failure::Corrupt(m) => DcsError::Corrupt(format!("etcd {endpoint}{path}: {m}")),
            Failure::Etcd { code, message } => {
                let text = format!("etcd {endpoint}{path}: {message} (gRPC code {code})");
                match code {
                    code::UNAUTHENTICATED | code::PERMISSION_DENIED => DcsError::Misconfigured(format!(
                        "{text}; etcd has authentication enabled, which pgkeel does not support yet"
                    )),
                    code::DATA_LOSS => DcsError::Corrupt(text),
                    code::RESOURCE_EXHAUSTED => DcsError::Unavailable(format!(
                        "{text}; if the database is full, compact and defragment etcd and disarm its NOSPACE alarm"
                    )),
                    _ => DcsError::Unavailable(text),
                }
            }
        }
    }

    /// Short text for a list of per-endpoint failures.
    fn describe(&self, timeout: Duration) -> String {
        match self {
            Failure::NotSent(m) | Failure::MaybeSent(m) | Failure::Corrupt(m) => m.clone(),
            Failure::Timeout => format!("no answer within {timeout:?}"),
            Failure::Etcd { code, message } => format!("{message} (gRPC code {code})"),
        }
    }
}

/// Aborts a spawned connection task when dropped, which closes its socket: a call that times
/// out or a watch that returns must not leave a connection behind.
struct ConnTask(tokio::task::JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Parse one client URL: `http://host:port`, optionally with a trailing `/`.
fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let trimmed = url.trim_end_matches('/');
    if trimmed.starts_with("https://") {
        return Err("https is not supported yet (TLS to etcd arrives with a later release); use an http:// URL".into());
    }
    let Some(authority) = trimmed.strip_prefix("http://") else {
        return Err("not an http:// URL; expected e.g. http://10.0.0.1:2379".into());
    };
    if authority.contains(['/', '?', '#', '@']) || authority.contains(char::is_whitespace) {
        return Err("expected http://host:port without a path, e.g. http://10.0.0.1:2379".into());
    }
    let port = match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !port.contains(']') => port,
        _ => return Err("missing :port; etcd's client port is usually 2379, e.g. http://10.0.0.1:2379".into()),
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(Endpoint { url: trimmed.to_string(), authority: authority.to_string() }),
        _ => Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(field: &str, text: &str) -> DcsResult<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| DcsError::Corrupt(format!("etcd sent a {field} that is not base64 ({e}): {text:?}")))
}

/// An int64 field: a JSON string (how the gateway writes int64) or a number. Proto3 leaves out
/// fields that are zero, so a missing field is 0.
fn int(v: &Value, field: &str) -> DcsResult<i64> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => {
            s.parse().map_err(|_| DcsError::Corrupt(format!("etcd sent {field} = {s:?}, which is not an integer")))
        }
        Some(Value::Number(n)) => {
            n.as_i64().ok_or_else(|| DcsError::Corrupt(format!("etcd sent {field} = {n}, which is not an int64")))
        }
        Some(other) => Err(DcsError::Corrupt(format!("etcd sent {field} = {other}, which is not an integer"))),
    }
}

/// A non-negative integer field: revisions and counts (int64) or member ids (uint64).
fn uint(v: &Value, field: &str) -> DcsResult<u64> {
    let bad = |shown: &dyn std::fmt::Display| {
        DcsError::Corrupt(format!("etcd sent {field} = {shown}, which is not a non-negative integer"))
    };
    match v.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s.parse().map_err(|_| bad(&format!("{s:?}"))),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| bad(n)),
        Some(other) => Err(bad(other)),
    }
}

fn boolean(v: &Value, field: &str) -> bool {
    v.get(field).and_then(Value::as_bool).unwrap_or(false)
}

/// `header.revision` of a response: the store's revision after the request.
fn header_revision(resp: &Value) -> DcsResult<u64> {
    match resp.get("header") {
        Some(h) => uint(h, "revision"),
        None => Err(DcsError::Corrupt(format!("etcd sent a response without a header: {resp}"))),
    }
}

/// One `mvccpb.KeyValue` and the lease attached to it (0: none).
fn decode_kv(kv: &Value) -> DcsResult<(KeyValue, i64)> {
    let key_b64 = kv.get("key").and_then(Value::as_str).unwrap_or_default();
    let key = String::from_utf8(unb64("key", key_b64)?)
        .map_err(|e| DcsError::Corrupt(format!("etcd sent a key that is not UTF-8: {:?}", e.as_bytes())))?;
    let value = unb64("value", kv.get("value").and_then(Value::as_str).unwrap_or_default())?;
    let create_revision = uint(kv, "create_revision")?;
    let mod_revision = uint(kv, "mod_revision")?;
    let lease = int(kv, "lease")?;
    Ok((KeyValue { key, value, create_revision, mod_revision, ttl_left: None }, lease))
}

/// The `kvs` of a range response.
fn decode_kvs(resp: &Value) -> DcsResult<Vec<(KeyValue, i64)>> {
    match resp.get("kvs") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(kvs)) => kvs.iter().map(decode_kv).collect(),
        Some(other) => Err(DcsError::Corrupt(format!("etcd sent kvs that are not a list: {other}"))),
    }
}

/// The lease the key had before a put (`prev_kv`) or a delete of one key (`prev_kvs`); 0 for
/// none or no previous key.
fn prev_lease(resp: &Value) -> DcsResult<i64> {
    let prev = resp.get("prev_kv").or_else(|| resp.get("prev_kvs").and_then(|kvs| kvs.get(0)));
    match prev {
        Some(kv) if kv.is_object() => int(kv, "lease"),
        _ => Ok(0),
    }
}

/// The end of the key range holding every key that starts with `prefix` (etcd's convention:
/// the prefix with its last byte below 0xff incremented; `\0` means "to the end").
fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A TTL as etcd lease seconds: rounded up, at least 1, at most etcd's maximum.
fn lease_secs(ttl: Duration) -> u64 {
    let secs = ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0));
    secs.clamp(1, ETCD_MAX_TTL_SECS)
}

impl Inner {
    /// Send one request to one endpoint and start reading the answer. Connecting must finish by
    /// `deadline`, or the request counts as not sent; the answer's head must arrive by
    /// `deadline` too. The returned task guard keeps the connection open while the body is read.
    async fn send(
        &self,
        endpoint: &Endpoint,
        path: &str,
        body: &Value,
        deadline: Instant,
    ) -> Result<(StatusCode, Incoming, ConnTask), Failure> {
        let connect = tokio::net::TcpStream::connect(&endpoint.authority);
        let stream = match tokio::time::timeout_at(deadline, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(Failure::NotSent(format!("cannot connect: {e}"))),
            Err(_) => return Err(Failure::NotSent(format!("cannot connect within {:?}", self.request_timeout))),
        };
        // Requests are small and answered at once; Nagle would only add latency.
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::NotSent(format!("HTTP handshake failed: {e}")))?;
        let task = ConnTask(tokio::spawn(async move {
            // The connection ends when the call drops it; its error, if any, shows up in the
            // request or the body read.
            let _ = conn.await;
        }));
        let request = Request::post(path)
            .header(hyper::header::HOST, &endpoint.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, concat!("pgkeel/", env!("CARGO_PKG_VERSION")))
            // The gateway passes Grpc-Metadata-* headers on as gRPC metadata: require a leader.
            .header("grpc-metadata-hasleader", "true")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| Failure::NotSent(format!("cannot build the request: {e}")))?;
        let response = match tokio::time::timeout_at(deadline, sender.send_request(request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(Failure::MaybeSent(format!("request failed: {e}"))),
            Err(_) => return Err(Failure::Timeout),
        };
        Ok((response.status(), response.into_body(), task))
    }

    /// One unary call on one endpoint: the whole answer, parsed.
    async fn call_once(&self, endpoint: &Endpoint, path: &str, body: &Value) -> Result<Value, Failure> {
        let deadline = Instant::now() + self.request_timeout;
        let (status, body, _task) = self.send(endpoint, path, body, deadline).await?;
        let bytes = match tokio::time::timeout_at(deadline, body.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) => return Err(Failure::MaybeSent(format!("reading the answer failed: {e}"))),
            Err(_) => return Err(Failure::Timeout),
        };
        parse_answer(status, &bytes)
    }

    /// One unary call, on the preferred endpoint first and then, when the failure allows it
    /// (see [`Failure::retryable`]), on the others in turn.
    async fn call(&self, path: &str, body: Value, idempotent: bool) -> DcsResult<Value> {
        self.call_indexed(path, body, idempotent).await.map(|(_, v)| v)
    }

    /// [`Inner::call`], also returning the index of the endpoint that answered.
    async fn call_indexed(&self, path: &str, body: Value, idempotent: bool) -> DcsResult<(usize, Value)> {
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let endpoint = &self.endpoints[idx];
            match self.call_once(endpoint, path, &body).await {
                Ok(v) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok((idx, v));
                }
                Err(f) => {
                    if f.member_failed() {
                        // The next call starts at the next member, unless another call has
                        // already moved on.
                        let _ =
                            self.preferred.compare_exchange(idx, (idx + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
                    }
                    if !f.retryable(idempotent) {
                        return Err(f.into_error(&endpoint.url, path, self.request_timeout));
                    }
                    tracing::debug!(endpoint = %endpoint.url, path, failure = %f.describe(self.request_timeout), "etcd call failed");
                    failures.push((idx, f));
                }
            }
        }
        Err(self.all_failed(path, failures))
    }

    /// The error for a call that failed on every endpoint: a timeout if every endpoint timed
    /// out, else "unavailable" with what each endpoint said.
    fn all_failed(&self, path: &str, failures: Vec<(usize, Failure)>) -> DcsError {
        if failures.iter().all(|(_, f)| matches!(f, Failure::Timeout)) {
            return DcsError::Timeout(self.request_timeout);
        }
        let what: Vec<String> = failures
            .iter()
            .map(|(idx, f)| format!("{}: {}", self.endpoints[*idx].url, f.describe(self.request_timeout)))
            .collect();
        DcsError::Unavailable(format!("no etcd endpoint answered {path}: {}", what.join("; ")))
    }

    async fn grant(&self, ttl: Duration) -> DcsResult<i64> {
        let secs = lease_secs(ttl);
        let resp = self.call("/v3/lease/grant", json!({ "TTL": secs.to_string() }), true).await?;
        if let Some(e) = resp.get("error").and_then(Value::as_str).filter(|e| !e.is_empty()) {
            return Err(DcsError::Unavailable(format!("etcd refused a lease of {secs} s: {e}")));
        }
        let id = int(&resp, "ID")?;
        if id == 0 {
            return Err(DcsError::Corrupt(format!("etcd granted a lease without an ID: {resp}")));
        }
        let granted = uint(&resp, "TTL")?;
        if granted > secs && secs >= ETCD_MIN_TTL.as_secs() && !self.warned_min_ttl.swap(true, Ordering::Relaxed) {
            // Only worth telling when the TTL asked for is one pgkeel's config allows (ttl >= 2 s):
            // the etcd cluster runs with a longer election timeout than the default.
            tracing::warn!(
                asked = secs,
                granted,
                "etcd raised a lease TTL to its minimum (1.5 × its election timeout); leader keys live longer than the configured ttl"
            );
        }
        Ok(id)
    }

    /// Revoke a lease a rewritten or deleted key no longer uses, without making the caller wait;
    /// if it fails the lease simply expires.
    fn revoke_in_background(self: &Arc<Self>, lease: i64) {
        if lease == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let inner = self.clone();
        runtime.spawn(async move {
            if let Err(e) = inner.call("/v3/lease/revoke", json!({ "ID": lease.to_string() }), true).await {
                tracing::debug!(lease, error = %e, "could not revoke an unused etcd lease; it will expire");
            }
        });
    }

    /// Time left on `lease`, rounded up to whole seconds (etcd counts in truncated seconds),
    /// or `None` when the lease no longer exists.
    async fn time_to_live(&self, lease: i64) -> DcsResult<Option<Duration>> {
        let resp = self.call("/v3/lease/timetolive", json!({ "ID": lease.to_string() }), true).await?;
        let ttl = int(&resp, "TTL")?;
        if ttl < 0 {
            return Ok(None);
        }
        let granted = int(&resp, "grantedTTL")?;
        let left = (ttl + 1).min(granted.max(1));
        Ok(Some(Duration::from_secs(u64::try_from(left).unwrap_or(1))))
    }

    /// Read one key: the store revision of the read, the key (without `ttl_left`) and its lease.
    async fn range_one(&self, key: &str) -> DcsResult<(u64, Option<(KeyValue, i64)>)> {
        let resp = self.call("/v3/kv/range", json!({ "key": b64(key.as_bytes()) }), true).await?;
        let revision = header_revision(&resp)?;
        Ok((revision, decode_kvs(&resp)?.into_iter().next()))
    }

    async fn get(&self, key: &str) -> DcsResult<Option<KeyValue>> {
        let mut last = None;
        for _ in 0..GET_ATTEMPTS {
            let (_, found) = self.range_one(key).await?;
            let Some((mut kv, lease)) = found else { return Ok(None) };
            if lease == 0 {
                return Ok(Some(kv));
            }
            if let Some(left) = self.time_to_live(lease).await? {
                kv.ttl_left = Some(left);
                return Ok(Some(kv));
            }
            // The lease is gone: the key expired or was rewritten since the read. Read again.
            last = Some(kv);
        }
        // Still attached to a vanished lease: etcd is removing the key right now.
        Ok(last.map(|kv| KeyValue { ttl_left: Some(Duration::ZERO), ..kv }))
    }

    /// A lease for a write with `ttl`, or 0 for none.
    async fn lease_for(&self, ttl: Option<Duration>) -> DcsResult<i64> {
        match ttl {
            Some(ttl) => self.grant(ttl).await,
            None => Ok(0),
        }
    }

    /// Run a txn whose success branch is `op` (a `request_put` or `request_delete_range`).
    /// Returns whether it succeeded, the revision after it and the response of `op`.
    async fn txn(&self, compare: Value, op: Value) -> DcsResult<(bool, u64, Value)> {
        let resp = self.call("/v3/kv/txn", json!({ "compare": compare, "success": [op] }), false).await?;
        let revision = header_revision(&resp)?;
        let succeeded = boolean(&resp, "succeeded");
        let first = resp.get("responses").and_then(|r| r.get(0)).cloned().unwrap_or(Value::Null);
        Ok((succeeded, revision, first))
    }

    /// A `request_put` for a txn.
    fn put_op(key: &str, value: &[u8], lease: i64) -> Value {
        let mut put = json!({ "key": b64(key.as_bytes()), "value": b64(value), "prev_kv": true });
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        json!({ "request_put": put })
    }

    /// A conditional put: `compare` must hold. On success the key's previous lease is revoked,
    /// on failure the one granted for this write.
    async fn put_if(
        self: &Arc<Self>,
        compare: Value,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> DcsResult<Option<u64>> {
        let lease = self.lease_for(ttl).await?;
        let (succeeded, revision, op) = self.txn(compare, Self::put_op(key, value, lease)).await?;
        if succeeded {
            let prev = prev_lease(op.get("response_put").unwrap_or(&Value::Null))?;
            if prev != lease {
                self.revoke_in_background(prev);
            }
            Ok(Some(revision))
        } else {
            self.revoke_in_background(lease);
            Ok(None)
        }
    }

    /// The status of the first member that answers.
    async fn status(&self) -> DcsResult<EtcdStatus> {
        let (idx, resp) = self.call_indexed("/v3/maintenance/status", json!({}), true).await?;
        let header = resp.get("header").cloned().unwrap_or(Value::Null);
        Ok(EtcdStatus {
            endpoint: self.endpoints[idx].url.clone(),
            member_id: uint(&header, "member_id")?,
            leader: uint(&resp, "leader")?,
            version: resp.get("version").and_then(Value::as_str).unwrap_or_default().to_string(),
            revision: uint(&header, "revision")?,
        })
    }

    /// Wait on one endpoint for an event on `key` from `start_revision` on, until `deadline`.
    async fn watch_once(
        &self,
        endpoint: &Endpoint,
        key: &str,
        start_revision: u64,
        deadline: Instant,
    ) -> Result<WatchEnd, Failure> {
        let body =
            json!({ "create_request": { "key": b64(key.as_bytes()), "start_revision": start_revision.to_string() } });
        let head_deadline = deadline.min(Instant::now() + self.request_timeout);
        let (status, mut body, _task) = match self.send(endpoint, "/v3/watch", &body, head_deadline).await {
            Err(Failure::Timeout) if Instant::now() >= deadline => return Ok(WatchEnd::Deadline),
            other => other?,
        };
        if status != StatusCode::OK {
            let bytes = match tokio::time::timeout_at(head_deadline, body.collect()).await {
                Ok(Ok(c)) => c.to_bytes(),
                _ => Bytes::new(),
            };
            return Err(parse_answer(status, &bytes)
                .err()
                .unwrap_or_else(|| Failure::Corrupt(format!("watch answered HTTP {status}"))));
        }
        // The gateway streams one JSON object per message (newline-delimited). Read frames as
        // they come and handle every complete object; keep an incomplete tail for the next frame.
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Ok(WatchEnd::Deadline),
                Ok(None) => return Err(Failure::MaybeSent("the watch stream ended".into())),
                Ok(Some(Err(e))) => return Err(Failure::MaybeSent(format!("the watch stream broke: {e}"))),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            buf.extend_from_slice(&data);
            let mut messages = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            for message in messages.by_ref() {
                match message {
                    Ok(message) => {
                        if let Some(end) = watch_message(&message)? {
                            return Ok(end);
                        }
                    }
                    Err(e) if e.is_eof() => break,
                    Err(e) => return Err(Failure::Corrupt(format!("the watch stream is not JSON: {e}"))),
                }
            }
            let consumed = messages.byte_offset();
            buf.drain(..consumed);
        }
    }

    async fn watch(&self, key: &str, known: Option<u64>, timeout: Duration) -> DcsResult<Option<KeyValue>> {
        let deadline = Instant::now() + timeout;
        let (revision, found) = self.range_one(key).await?;
        if found.as_ref().map(|(kv, _)| kv.mod_revision) != known {
            return self.get(key).await;
        }
        // Watching from the revision after the read catches every change since the read, even
        // one made before the watch was set up.
        let start_revision = revision + 1;
        let n = self.endpoints.len();
        let mut idx = self.preferred.load(Ordering::Relaxed) % n;
        while Instant::now() < deadline {
            let endpoint = &self.endpoints[idx];
            match self.watch_once(endpoint, key, start_revision, deadline).await {
                Ok(WatchEnd::Event) | Ok(WatchEnd::Cancelled) | Ok(WatchEnd::Deadline) => break,
                Err(f) => {
                    // The member died, lost its leader or dropped the stream. Events from
                    // `start_revision` on are still there (unless compacted, which cancels the
                    // watch), so watching again elsewhere misses nothing.
                    tracing::debug!(endpoint = %endpoint.url, failure = %f.describe(self.request_timeout), "etcd watch failed; trying the next member");
                    if !f.member_failed() {
                        return Err(f.into_error(&endpoint.url, "/v3/watch", self.request_timeout));
                    }
                    let _ = self.preferred.compare_exchange(idx, (idx + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
                    idx = (idx + 1) % n;
                    let pause_until = (Instant::now() + WATCH_RETRY_PAUSE).min(deadline);
                    tokio::time::sleep_until(pause_until).await;
                }
            }
        }
        self.get(key).await
    }
}

/// How a watch stream ended.
enum WatchEnd {
    /// An event on the key arrived.
    Event,
    /// etcd cancelled the watch (e.g. its start revision was compacted): re-read the key.
    Cancelled,
    /// The caller's timeout passed.
    Deadline,
}

/// Handle one streamed watch message: `Some` when the watch is over.
fn watch_message(message: &Value) -> Result<Option<WatchEnd>, Failure> {
    if let Some(error) = message.get("error") {
        let text = error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_string);
        return Err(Failure::MaybeSent(format!("the watch stream reported an error: {text}")));
    }
    let Some(result) = message.get("result") else {
        return Err(Failure::Corrupt(format!("unexpected watch message: {message}")));
    };
    if boolean(result, "canceled") {
        return Ok(Some(WatchEnd::Cancelled));
    }
    match result.get("events") {
        Some(Value::Array(events)) if !events.is_empty() => Ok(Some(WatchEnd::Event)),
        // The "created" confirmation and progress notifications carry no events.
        _ => Ok(None),
    }
}

/// Turn an HTTP answer into the response object or the error etcd reported.
fn parse_answer(status: StatusCode, bytes: &[u8]) -> Result<Value, Failure> {
    let parsed: Result<Value, _> = serde_json::from_slice(bytes);
    if status == StatusCode::OK {
        return parsed.map_err(|e| {
            Failure::Corrupt(format!(
                "answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))
        });
    }
    // gRPC errors come as {"error": ..., "code": N, "message": ...}.
    if let Ok(v) = parsed {
        if let Some(code) = v.get("code").and_then(Value::as_i64) {
            let message = v.get("message").or_else(|| v.get("error")).and_then(Value::as_str).unwrap_or("").to_string();
            // A member without a leader refuses requests before proposing them (because of
            // `hasleader`): another member may well take them.
            if code == code::UNAVAILABLE && message.contains("no leader") {
                return Err(Failure::NotSent(message));
            }
            return Err(Failure::Etcd { code, message });
        }
    }
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).trim().to_string();
    // Not an etcd answer (wrong port, a proxy, or an etcd older than 3.4 without /v3): the
    // request was not executed, so another endpoint may take it.
    Err(Failure::NotSent(format!("HTTP {status} {text:?}; is this the client URL of an etcd 3.4 or newer?")))
}

impl EtcdStore {
    /// A client of the etcd cluster at `endpoints` (client URLs, `http://host:port`). Checks
    /// that one of them answers (`/v3/maintenance/status`); the error names every endpoint
    /// tried and what it said. `request_timeout` bounds each attempt on one endpoint; a read
    /// may try every endpoint in turn.
    pub async fn connect(endpoints: Vec<String>, request_timeout: Duration) -> DcsResult<EtcdStore> {
        if endpoints.is_empty() {
            return Err(DcsError::Misconfigured(
                "no etcd endpoints given; list the client URLs of the etcd members, e.g. http://10.0.0.1:2379".into(),
            ));
        }
        let parsed = endpoints
            .iter()
            .map(|url| {
                parse_endpoint(url).map_err(|why| DcsError::Misconfigured(format!("etcd endpoint {url:?}: {why}")))
            })
            .collect::<DcsResult<Vec<_>>>()?;
        let store = EtcdStore {
            inner: Arc::new(Inner {
                endpoints: parsed,
                preferred: AtomicUsize::new(0),
                request_timeout,
                warned_min_ttl: AtomicBool::new(false),
            }),
        };
        match store.inner.status().await {
            Ok(_) => Ok(store),
            Err(DcsError::Timeout(t)) => Err(DcsError::Unavailable(format!(
                "cannot reach etcd at {}: no answer within {t:?}",
                endpoints.join(", ")
            ))),
            Err(DcsError::Unavailable(why)) => {
                Err(DcsError::Unavailable(format!("cannot reach etcd at {}: {why}", endpoints.join(", "))))
            }
            Err(other) => Err(other),
        }
    }

    /// The status of the member that answers (the preferred one, else the next).
    pub async fn status(&self) -> DcsResult<EtcdStatus> {
        self.inner.status().await
    }

    /// The client URLs this store uses, in the order given.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.endpoints.iter().map(|e| e.url.clone()).collect()
    }
}

#[async_trait::async_trait]
impl Dcs for EtcdStore {
    async fn get(&self, key: &str) -> DcsResult<Option<KeyValue>> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> DcsResult<Vec<KeyValue>> {
        // etcd needs a non-empty key; "\0" to "\0" is every key.
        let (key, range_end) = if prefix.is_empty() {
            (vec![0], vec![0])
        } else {
            (prefix.as_bytes().to_vec(), prefix_range_end(prefix.as_bytes()))
        };
        let resp =
            self.inner.call("/v3/kv/range", json!({ "key": b64(&key), "range_end": b64(&range_end) }), true).await?;
        // etcd returns a range sorted by key, which is what `list` promises.
        Ok(decode_kvs(&resp)?.into_iter().map(|(kv, _)| kv).collect())
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> DcsResult<u64> {
        let lease = self.inner.lease_for(ttl).await?;
        let mut body = json!({ "key": b64(key.as_bytes()), "value": b64(value), "prev_kv": true });
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        let resp = self.inner.call("/v3/kv/put", body, false).await?;
        let revision = header_revision(&resp)?;
        let prev = prev_lease(&resp)?;
        if prev != lease {
            self.inner.revoke_in_background(prev);
        }
        Ok(revision)
    }

    async fn create(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> DcsResult<Option<u64>> {
        let compare =
            json!([{ "key": b64(key.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": "0" }]);
        self.inner.put_if(compare, key, value, ttl).await
    }

    async fn compare_and_set(
        &self,
        key: &str,
        value: &[u8],
        expected: u64,
        ttl: Option<Duration>,
    ) -> DcsResult<Option<u64>> {
        self.inner.put_if(exists_at(key, expected), key, value, ttl).await
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> DcsResult<bool> {
        let request = json!({ "key": b64(key.as_bytes()), "prev_kv": true });
        let (deleted, resp) = match expected {
            None => {
                let resp = self.inner.call("/v3/kv/deleterange", request, false).await?;
                (uint(&resp, "deleted")? > 0, resp)
            }
            Some(rev) => {
                let (succeeded, _, op) =
                    self.inner.txn(exists_at(key, rev), json!({ "request_delete_range": request })).await?;
                let resp = op.get("response_delete_range").cloned().unwrap_or(Value::Null);
                (succeeded && uint(&resp, "deleted")? > 0, resp)
            }
        };
        if deleted {
            self.inner.revoke_in_background(prev_lease(&resp)?);
        }
        Ok(deleted)
    }

    async fn watch(&self, key: &str, known: Option<u64>, timeout: Duration) -> DcsResult<Option<KeyValue>> {
        self.inner.watch(key, known, timeout).await
    }

    fn describe(&self) -> String {
        format!("etcd:{}", self.endpoints().join(","))
    }

    fn ttl_precision(&self) -> TtlPrecision {
        TtlPrecision {
            min_ttl: ETCD_MIN_TTL,
            granularity: Duration::from_secs(1),
            expiry_delay: ETCD_EXPIRY_DELAY,
            ttl_left_in_list: false,
        }
    }
}

/// Txn comparisons "`key` exists with `mod_revision == revision`". The second one is needed
/// because etcd compares an absent key as if all its revisions were 0.
fn exists_at(key: &str, revision: u64) -> Value {
    let k = b64(key.as_bytes());
    json!([
        { "key": k, "target": "MOD", "result": "EQUAL", "mod_revision": revision.to_string() },
        { "key": k, "target": "CREATE", "result": "GREATER", "create_revision": "0" },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_parsed() {
        let e = parse_endpoint("http://10.0.0.1:2379/").unwrap();
        assert_eq!((e.url.as_str(), e.authority.as_str()), ("http://10.0.0.1:2379", "10.0.0.1:2379"));
        assert_eq!(parse_endpoint("http://[::1]:2379").unwrap().authority, "[::1]:2379");
        assert_eq!(parse_endpoint("http://etcd-1.example.com:2379").unwrap().authority, "etcd-1.example.com:2379");
        for (bad, why) in [
            ("https://10.0.0.1:2379", "https is not supported yet"),
            ("10.0.0.1:2379", "not an http:// URL"),
            ("http://10.0.0.1", "missing :port"),
            ("http://[::1]", "missing :port"),
            ("http://:2379", "missing :port"),
            ("http://10.0.0.1:0", "port \"0\""),
            ("http://10.0.0.1:99999", "port \"99999\""),
            ("http://10.0.0.1:2379/v3", "without a path"),
        ] {
            let err = parse_endpoint(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn prefix_ranges() {
        assert_eq!(prefix_range_end(b"/a/"), b"/a0");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"\xff\xff"), [0]);
    }

    #[test]
    fn lease_seconds_round_up() {
        assert_eq!(lease_secs(Duration::ZERO), 1);
        assert_eq!(lease_secs(Duration::from_millis(1)), 1);
        assert_eq!(lease_secs(Duration::from_secs(2)), 2);
        assert_eq!(lease_secs(Duration::from_millis(2001)), 3);
        assert_eq!(lease_secs(Duration::MAX), ETCD_MAX_TTL_SECS);
    }

    #[test]
    fn int64_fields() {
        let v = json!({ "a": "12", "b": 7, "c": "x", "d": "-1", "id": "13906361470156041989" });
        assert_eq!(uint(&v, "id").unwrap(), 13_906_361_470_156_041_989, "member ids are uint64");
        assert_eq!(int(&v, "a").unwrap(), 12);
        assert_eq!(int(&v, "b").unwrap(), 7);
        assert_eq!(int(&v, "missing").unwrap(), 0, "proto3 leaves zero fields out");
        assert!(matches!(int(&v, "c"), Err(DcsError::Corrupt(_))));
        assert!(matches!(uint(&v, "d"), Err(DcsError::Corrupt(_))));
    }

    #[test]
    fn key_values_are_decoded() {
        let kv = json!({ "key": b64(b"/k"), "value": b64(&[0, 255]), "create_revision": "3", "mod_revision": "5", "lease": "42" });
        let (kv, lease) = decode_kv(&kv).unwrap();
        assert_eq!(
            (kv.key.as_str(), kv.value.as_slice(), kv.create_revision, kv.mod_revision, lease),
            ("/k", [0u8, 255].as_slice(), 3, 5, 42)
        );
        // An empty value is left out of the JSON.
        let (kv, lease) =
            decode_kv(&json!({ "key": b64(b"/e"), "create_revision": "1", "mod_revision": "1" })).unwrap();
        assert_eq!((kv.value.len(), lease), (0, 0));
        assert!(matches!(decode_kv(&json!({ "key": "%%%" })), Err(DcsError::Corrupt(_))));
        assert!(matches!(decode_kv(&json!({ "key": b64(&[0xff]) })), Err(DcsError::Corrupt(_))));
    }

    #[test]
    fn answers_are_classified() {
        assert!(parse_answer(StatusCode::OK, b"{\"header\":{}}").is_ok());
        assert!(matches!(parse_answer(StatusCode::OK, b"{oops"), Err(Failure::Corrupt(_))));
        let no_leader = br#"{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}"#;
        assert!(matches!(parse_answer(StatusCode::SERVICE_UNAVAILABLE, no_leader), Err(Failure::NotSent(_))));
        let lease = br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        assert!(matches!(parse_answer(StatusCode::NOT_FOUND, lease), Err(Failure::Etcd { code: 5, .. })));
        match parse_answer(StatusCode::NOT_FOUND, b"Not Found") {
            Err(Failure::NotSent(m)) => assert!(m.contains("etcd 3.4 or newer"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_rules() {
        assert!(Failure::NotSent(String::new()).retryable(false));
        assert!(!Failure::Timeout.retryable(false), "a write that timed out may have been applied");
        assert!(Failure::Timeout.retryable(true));
        assert!(!Failure::MaybeSent(String::new()).retryable(false));
        let unavailable = Failure::Etcd { code: code::UNAVAILABLE, message: "etcdserver: leader changed".into() };
        assert!(unavailable.retryable(true) && !unavailable.retryable(false));
        assert!(!Failure::Etcd { code: 5, message: String::new() }.retryable(true));
        let auth = Failure::Etcd { code: code::UNAUTHENTICATED, message: "etcdserver: user name is empty".into() };
        assert!(matches!(
            auth.into_error("http://e:2379", "/v3/kv/range", Duration::from_secs(1)),
            DcsError::Misconfigured(_)
        ));
    }

    #[test]
    fn watch_messages() {
        let created = json!({ "result": { "header": {}, "created": true } });
        assert!(watch_message(&created).unwrap().is_none());
        let event = json!({ "result": { "header": {}, "events": [{ "type": "DELETE", "kv": {} }] } });
        assert!(matches!(watch_message(&event).unwrap(), Some(WatchEnd::Event)));
        let cancelled = json!({ "result": { "header": {}, "canceled": true, "compact_revision": "9" } });
        assert!(matches!(watch_message(&cancelled).unwrap(), Some(WatchEnd::Cancelled)));
        let error = json!({ "error": { "grpc_code": 14, "message": "etcdserver: no leader" } });
        assert!(matches!(watch_message(&error), Err(Failure::MaybeSent(_))));
    }
}
