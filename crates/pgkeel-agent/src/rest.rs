//! The REST API, Patroni-compatible where Patroni has the endpoint, so existing HAProxy
//! checks work unchanged.
//!
//! - Health (GET/HEAD/OPTIONS, 200 or 503, no auth): `/`, `/primary`, `/read-write`, `/replica`
//!   (`?lag=`, `?replication_state=streaming`), `/read-only`, `/sync`, `/async`, `/health`,
//!   `/liveness`, `/readiness`.
//! - State (GET, JSON): `/node` (also `/patroni`), `/cluster`, `/history`, `/config`; `/metrics`
//!   (Prometheus text).
//! - Actions (Basic auth): `POST /switchover`, `POST /failover`, `PATCH /config` (merge patch),
//!   `PUT /config` (replace); both config writes honour `If-Match: <version>`.
//!
//! Handlers read the loop's published [`NodeStatus`]; `/cluster`, `/history` and `/config` read
//! the DCS fresh. Actions write the DCS and wake the loop; they never touch postgres directly.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use pgkeel_config::DynamicConfig;
use pgkeel_dcs::cluster::{ClusterSnapshot, FailoverValue, Role};
use pgkeel_pg::lsn::format_lsn;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::{unix_ms, NodeRequest, NodeStatus, Shared};

type Resp = Response<Full<Bytes>>;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

pub(crate) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("REST accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
            {
                tracing::debug!("REST connection ended: {e}");
            }
        });
    }
}

fn respond(status: StatusCode, body: Value) -> Resp {
    let mut text = serde_json::to_vec_pretty(&body).expect("JSON values serialize");
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("static response parts are valid")
}

fn error(status: StatusCode, msg: impl Into<String>) -> Resp {
    respond(status, json!({ "error": msg.into() }))
}

/// A request that cannot be served: the status and the reason given to the client.
struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError(status, msg.into())
    }
}

impl From<ApiError> for Resp {
    fn from(e: ApiError) -> Resp {
        let mut r = error(e.0, e.1);
        if e.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert("www-authenticate", hyper::header::HeaderValue::from_static("Basic realm=\"pgkeel\""));
        }
        r
    }
}

fn query_params(q: Option<&str>) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or_else(|| format!("query parameter {k:?} is not valid percent-encoding"))?;
        out.insert(k.to_string(), v);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_string();
    let path = if path.is_empty() { "/".to_string() } else { path };
    let params = match query_params(req.uri().query()) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let is_health = matches!(
        path.as_str(),
        "/" | "/primary"
            | "/master"
            | "/leader"
            | "/read-write"
            | "/replica"
            | "/read-only"
            | "/sync"
            | "/synchronous"
            | "/async"
            | "/asynchronous"
            | "/health"
            | "/liveness"
            | "/readiness"
    );
    if is_health {
        if !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
            return error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} answers GET, HEAD and OPTIONS"));
        }
        let mut resp = match health(&shared, &path, &params) {
            Ok(r) => r,
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        };
        if method != Method::GET {
            *resp.body_mut() = Full::new(Bytes::new());
        }
        return resp;
    }
    match (method, path.as_str()) {
        (Method::GET, "/node" | "/patroni") => respond(StatusCode::OK, node_json(&shared.status())),
        (Method::GET, "/cluster") => cluster(&shared).await,
        (Method::GET, "/history") => history(&shared).await,
        (Method::GET, "/routing") => routing(&shared).await,
        (Method::GET, "/config") => get_config(&shared).await,
        (Method::GET, "/metrics") => metrics(&shared).await,
        (Method::POST, "/switchover") => action(&shared, req, Kind::Switchover).await,
        (Method::POST, "/failover") => action(&shared, req, Kind::Failover).await,
        (Method::POST, "/restart") => node_request(&shared, req, NodeRequest::Restart).await,
        (Method::POST, "/failsafe") => failsafe(&shared, req).await,
        (Method::POST, "/reinitialize") => node_request(&shared, req, NodeRequest::Reinitialize).await,
        (Method::POST, "/reload") => reload(&shared, req).await,
        (Method::PATCH, "/config") => write_config(&shared, req, false).await,
        (Method::PUT, "/config") => write_config(&shared, req, true).await,
        (_, "/node" | "/patroni" | "/cluster" | "/history" | "/routing" | "/metrics") => {
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} answers GET"))
        }
        (_, "/switchover" | "/failover" | "/restart" | "/reinitialize" | "/failsafe" | "/reload") => {
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} answers POST"))
        }
        (_, "/config") => error(StatusCode::METHOD_NOT_ALLOWED, "/config answers GET, PATCH and PUT"),
        _ => error(StatusCode::NOT_FOUND, format!("no endpoint {path}; see docs/rest-api.md")),
    }
}

fn node_json(st: &NodeStatus) -> Value {
    let mut v = serde_json::to_value(st).expect("status serializes");
    for k in ["lsn", "received_lsn", "replayed_lsn"] {
        if let Some(n) = v[k].as_u64() {
            v[format!("{k}_text")] = json!(format_lsn(n));
        }
    }
    v
}

fn health(shared: &Shared, path: &str, params: &HashMap<String, String>) -> Result<Resp, String> {
    let st = shared.status();
    let d = shared.dynamic();
    let running = st.state == "running";
    let is_primary = running && st.role == Role::Primary && st.holds_lease;
    let lag_limit = match params.get("lag") {
        Some(v) => Some(pgkeel_config::parse_bytes(v).map_err(|e| format!("bad lag parameter: {e}"))?),
        None => None,
    };
    let want_streaming = match params.get("replication_state").map(String::as_str) {
        None => false,
        Some("streaming") => true,
        Some(other) => return Err(format!("bad replication_state {other:?}: only \"streaming\" is supported")),
    };
    let replica_ok = |limit: Option<u64>| {
        running
            && st.role == Role::Replica
            && (!want_streaming || st.streaming)
            && limit.is_none_or(|l| st.lag_bytes.is_some_and(|lag| lag <= l))
    };
    let ok = match path {
        "/" | "/primary" | "/master" | "/leader" | "/read-write" => is_primary,
        "/replica" => replica_ok(lag_limit),
        "/sync" | "/synchronous" => replica_ok(lag_limit) && st.sync_standby,
        "/async" | "/asynchronous" => replica_ok(lag_limit) && !st.sync_standby,
        "/read-only" => is_primary || replica_ok(lag_limit),
        "/health" => running,
        "/liveness" => {
            let limit = if st.role == Role::Primary { d.ttl } else { d.ttl * 2 };
            d.pause || unix_ms().saturating_sub(st.last_loop_ms) <= limit.as_millis() as u64
        }
        "/readiness" => is_primary || replica_ok(Some(lag_limit.unwrap_or(d.maximum_lag_on_failover))),
        _ => false,
    };
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok(respond(code, node_json(&st)))
}

async fn load(shared: &Shared) -> Result<ClusterSnapshot, ApiError> {
    let timeout = shared.dynamic().retry_timeout;
    match tokio::time::timeout(timeout, shared.store.load()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("cannot read the DCS: {e}"))),
        Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the DCS did not answer within retry_timeout")),
    }
}

fn cluster_json(shared: &Shared, s: &ClusterSnapshot) -> Value {
    let last = s.status.as_ref().map(|x| x.last_lsn);
    let paused = s.config.as_ref().and_then(|c| c.value["pause"].as_bool()).unwrap_or(false);
    let members: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            let m = &m.value;
            let leader = s.leader_name() == Some(m.name.as_str());
            let lag = match (m.role, last, m.replayed_lsn.or(m.lsn)) {
                (Role::Replica, Some(last), Some(mine)) => json!(last.saturating_sub(mine)),
                _ => Value::Null,
            };
            json!({
                "name": m.name,
                "role": if leader && m.role == Role::Primary { "leader" } else { m.role.as_str() },
                "state": if m.role == Role::Replica && m.streaming { "streaming" } else { m.state.as_str() },
                "host": m.pg_address,
                "api_url": m.api_url,
                "timeline": m.timeline,
                "lsn": m.lsn.map(format_lsn),
                "lag": lag,
                "term": m.term,
                "following": m.following,
                "tags": m.tags,
                "pending_restart": m.pending_restart,
            })
        })
        .collect();
    json!({
        "cluster": shared.config().cluster,
        "leader": s.leader_name(),
        "term": s.leader.as_ref().map(|l| l.value.term),
        "paused": paused,
        "members": members,
        "failover": s.failover.as_ref().map(|f| &f.value),
        "sync": s.sync.as_ref().map(|x| &x.value),
        "backup": s.backup.as_ref().map(|x| &x.value),
        "last_archived_ms": s.status.as_ref().and_then(|x| x.last_archived_ms),
        "last_leader_lsn": last.map(format_lsn),
    })
}

async fn cluster(shared: &Shared) -> Resp {
    match load(shared).await {
        Ok(s) => respond(StatusCode::OK, cluster_json(shared, &s)),
        Err(e) => e.into(),
    }
}

/// What a proxy routes by ([`pgkeel_dcs::cluster::RoutingView`]), read from the DCS now: a
/// proxy that cannot reach the DCS follows the cluster through this.
async fn routing(shared: &Shared) -> Resp {
    match load(shared).await {
        Ok(s) => {
            let view = s.routing_view(&shared.config().cluster);
            respond(StatusCode::OK, serde_json::to_value(view).expect("the routing view serializes"))
        }
        Err(e) => e.into(),
    }
}

async fn history(shared: &Shared) -> Resp {
    match load(shared).await {
        Ok(s) => {
            let rows: Vec<Value> = s
                .history
                .iter()
                .map(|h| {
                    json!({
                        "term": h.term, "timeline": h.timeline, "time_ms": h.time_ms, "reason": h.reason,
                        "old_primary": h.old_primary, "new_primary": h.new_primary,
                        "old_primary_lsn": h.old_primary_lsn.map(format_lsn), "lsn": format_lsn(h.lsn),
                        "lost_bytes": h.old_primary_lsn.map(|o| o.saturating_sub(h.lsn)),
                    })
                })
                .collect();
            respond(StatusCode::OK, Value::Array(rows))
        }
        Err(e) => e.into(),
    }
}

async fn get_config(shared: &Shared) -> Resp {
    match load(shared).await {
        Ok(s) => match s.config {
            Some(c) => respond(StatusCode::OK, json!({ "version": c.revision, "config": c.value })),
            None => {
                error(StatusCode::BAD_GATEWAY, "no cluster config in the DCS yet (the cluster is not bootstrapped)")
            }
        },
        Err(e) => e.into(),
    }
}

fn check_auth(shared: &Shared, req: &Request<Incoming>) -> Result<(), ApiError> {
    let rest = &shared.config().rest;
    let Some(want) = &rest.password else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "actions are disabled: set rest.password in this node's node.toml",
        ));
    };
    let got = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok());
    match got {
        Some(pair) if pair == format!("{}:{}", rest.username, want) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong user name or password")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this action needs HTTP Basic authentication (rest.username / rest.password)",
        )),
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"),
            ))
        }
    };
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("request body is not valid JSON: {e}")))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Switchover,
    Failover,
}

fn string_field(body: &Value, key: &str) -> Result<Option<String>, ApiError> {
    match &body[key] {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, format!("{key:?} must be a member name (string), got {other}")))
        }
    }
}

async fn action(shared: &Shared, req: Request<Incoming>, kind: Kind) -> Resp {
    if let Err(e) = check_auth(shared, &req) {
        return e.into();
    }
    let body = match read_json(req).await {
        Ok(b) => b,
        Err(e) => return e.into(),
    };
    let Some(obj) = body.as_object() else {
        return error(StatusCode::BAD_REQUEST, "request body must be a JSON object");
    };
    if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "leader" | "candidate" | "scheduled_at")) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown field {k:?}: expected \"leader\" and/or \"candidate\""),
        );
    }
    if !body["scheduled_at"].is_null() {
        return error(StatusCode::BAD_REQUEST, "scheduled switchovers are not supported yet: omit scheduled_at");
    }
    let (leader, candidate) = match (string_field(&body, "leader"), string_field(&body, "candidate")) {
        (Ok(l), Ok(c)) => (l, c),
        (Err(e), _) | (_, Err(e)) => return e.into(),
    };
    if kind == Kind::Failover && candidate.is_none() {
        return error(StatusCode::BAD_REQUEST, "failover requires \"candidate\"");
    }
    let snap = match load(shared).await {
        Ok(s) => s,
        Err(e) => return e.into(),
    };
    let current = snap.leader_name().map(String::from);
    if kind == Kind::Switchover {
        let Some(cur) = &current else {
            return error(StatusCode::PRECONDITION_FAILED, "no leader: use failover --to NODE instead of switchover");
        };
        if leader.as_ref().is_some_and(|l| l != cur) {
            return error(StatusCode::PRECONDITION_FAILED, format!("leader name does not match: the leader is {cur}"));
        }
    }
    if let Some(c) = &candidate {
        if current.as_ref() == Some(c) {
            return error(StatusCode::PRECONDITION_FAILED, format!("{c} is already the leader"));
        }
        match snap.member(c) {
            None => {
                return error(
                    StatusCode::PRECONDITION_FAILED,
                    format!("candidate {c} is not a live member of the cluster"),
                )
            }
            Some(m) if !(m.role == Role::Replica && m.state == "running") => {
                return error(
                    StatusCode::PRECONDITION_FAILED,
                    format!("candidate {c} is not a running replica (it is {} / {})", m.role.as_str(), m.state),
                )
            }
            Some(_) => {}
        }
    } else if !snap
        .members
        .iter()
        .any(|m| Some(&m.value.name) != current.as_ref() && m.value.role == Role::Replica && m.value.state == "running")
    {
        return error(StatusCode::PRECONDITION_FAILED, "no running replica to switch over to");
    }
    let d = shared.dynamic();
    let paused = snap.config.as_ref().and_then(|c| c.value["pause"].as_bool()).unwrap_or(d.pause);
    if paused && candidate.is_none() {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "the cluster is paused, so nobody would race for the key: name the candidate (--to NODE)",
        );
    }
    let request = FailoverValue {
        kind: if kind == Kind::Switchover { "switchover" } else { "failover" }.into(),
        leader: current.clone(),
        candidate: candidate.clone(),
        requested_at_ms: unix_ms(),
    };
    let wait = (d.ttl * 4).max(Duration::from_secs(30));
    if let Err(e) = shared.store.set_failover(&request, wait).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, format!("cannot write the request to the DCS: {e}"));
    }
    shared.wake.notify_one();
    tracing::info!(?candidate, "{} requested", request.kind);
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(s) = shared.store.load().await else { continue };
        let Some(l) = &s.leader else { continue };
        let done = l.value.holder != current.clone().unwrap_or_default()
            && candidate.as_ref().is_none_or(|c| *c == l.value.holder)
            && s.member(&l.value.holder).is_some_and(|m| m.role == Role::Primary && m.state == "running");
        if done {
            let verb = if kind == Kind::Switchover { "switched over" } else { "failed over" };
            return respond(
                StatusCode::OK,
                json!({ "message": format!("Successfully {verb} to \"{}\"", l.value.holder), "leader": l.value.holder, "term": l.value.term }),
            );
        }
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{} did not complete within {wait:?}; see pgkeel list and the agents' logs", request.kind),
    )
}

/// `POST /reload`: read node.toml again (as SIGHUP does). 200 with the keys applied and those
/// waiting for a restart; 400 with the problem when the file does not pass the check.
async fn reload(shared: &Shared, req: Request<Incoming>) -> Resp {
    if let Err(e) = check_auth(shared, &req) {
        return e.into();
    }
    let result = shared.reload().await;
    let message = crate::report_reload(&result, "POST /reload");
    match result {
        Ok(r) => respond(
            StatusCode::OK,
            json!({ "message": message, "applied": r.applied, "need_restart": r.need_restart, "bootstrap": r.bootstrap }),
        ),
        Err(_) => error(StatusCode::BAD_REQUEST, message),
    }
}

/// `POST /restart` (`{"restart_pending": true}` restarts only when a parameter change waits
/// for it; `{"role": "primary"|"replica"}` only in that role) and `POST /reinitialize`: the
/// loop carries them out; the answer comes when postgres runs again (a new postmaster).
async fn node_request(shared: &Shared, req: Request<Incoming>, request: NodeRequest) -> Resp {
    if let Err(e) = check_auth(shared, &req) {
        return e.into();
    }
    let body = match read_json(req).await {
        Ok(b) => b,
        Err(e) => return e.into(),
    };
    let allowed: &[&str] = match request {
        NodeRequest::Restart => &["restart_pending", "role"],
        NodeRequest::Reinitialize => &["force"],
    };
    match body.as_object() {
        None => return error(StatusCode::BAD_REQUEST, "request body must be a JSON object"),
        Some(o) => {
            if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
                return error(StatusCode::BAD_REQUEST, format!("unknown field {k:?}: expected one of {allowed:?}"));
            }
        }
    }
    let st = shared.status();
    match request {
        NodeRequest::Restart => {
            if body["restart_pending"] == true && st.pending_restart.is_empty() {
                return error(
                    StatusCode::PRECONDITION_FAILED,
                    "restart conditions are not satisfied: no restart is pending",
                );
            }
            match &body["role"] {
                Value::Null => {}
                Value::String(r) if r == "primary" || r == "replica" => {
                    if st.role.as_str() != r {
                        return error(
                            StatusCode::PRECONDITION_FAILED,
                            format!("restart conditions are not satisfied: this member is not a {r}"),
                        );
                    }
                }
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("\"role\" must be \"primary\" or \"replica\", got {other}"),
                    )
                }
            }
            if st.state != "running" {
                return error(StatusCode::SERVICE_UNAVAILABLE, format!("postgres is not running here ({})", st.state));
            }
        }
        NodeRequest::Reinitialize => {
            if st.holds_lease || st.role == Role::Primary {
                return error(
                    StatusCode::PRECONDITION_FAILED,
                    "this member is the leader: switch over first, then reinitialize it",
                );
            }
            if st.leader.is_none() {
                return error(StatusCode::SERVICE_UNAVAILABLE, "no leader to clone from");
            }
        }
    }
    let before = st.postmaster_start;
    *shared.request.lock().expect("request lock poisoned") = Some(request);
    shared.wake.notify_one();
    let bound = Duration::from_secs(if request == NodeRequest::Restart { 90 } else { 600 });
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let st = shared.status();
        if st.state == "running" && st.postmaster_start.is_some() && st.postmaster_start != before {
            let what = if request == NodeRequest::Restart { "restarted" } else { "reinitialized" };
            return respond(StatusCode::OK, json!({ "message": format!("{} {what}", st.name), "role": st.role }));
        }
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{request:?} did not complete within {bound:?}; see the agent's log"),
    )
}

/// `POST /failsafe {"leader": NAME, "term": N}`: a primary that cannot reach the DCS asks
/// this member to confirm it. Confirming promises not to race for a ttl; refused (409) when
/// this member holds or is taking the leader key itself.
async fn failsafe(shared: &Shared, req: Request<Incoming>) -> Resp {
    if let Err(e) = check_auth(shared, &req) {
        return e.into();
    }
    let body = match read_json(req).await {
        Ok(b) => b,
        Err(e) => return e.into(),
    };
    let Some(leader) = body["leader"].as_str().map(String::from) else {
        return error(StatusCode::BAD_REQUEST, "failsafe requires \"leader\" (the primary asking)");
    };
    let ttl = shared.dynamic().ttl;
    let st = shared.status();
    let mut fs = shared.failsafe.lock().expect("failsafe lock poisoned");
    if fs.racing || (st.role == Role::Primary && st.state == "running") {
        return error(
            StatusCode::CONFLICT,
            format!("{} holds or is taking the leader key: not confirming {leader}", st.name),
        );
    }
    fs.confirmed_until = Some(Instant::now() + ttl);
    drop(fs);
    tracing::info!(%leader, term = body["term"].as_u64(), "confirmed a failsafe primary: not racing for a ttl");
    respond(StatusCode::OK, json!({ "confirmed": leader, "by": st.name }))
}

/// JSON merge patch (RFC 7386): `null` removes a key.
fn merge(target: &mut Value, patch: &Value) {
    if let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else if v.is_object() && t.get(k).is_some_and(Value::is_object) {
                merge(t.get_mut(k).expect("checked above"), v);
            } else {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The version a client read (`If-Match: 42` or `If-Match: "42"`), if it sent one.
fn if_match(req: &Request<Incoming>) -> Result<Option<u64>, ApiError> {
    let Some(h) = req.headers().get("if-match") else { return Ok(None) };
    h.to_str()
        .ok()
        .map(|v| v.trim().trim_matches('"'))
        .and_then(|v| v.parse().ok())
        .map(Some)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "If-Match must be the config version, e.g. If-Match: 42"))
}

/// `PATCH /config` (JSON merge patch) and `PUT /config` (whole replacement). Both validate
/// the result, honour `If-Match: <version>` and write with compare-and-set, so a concurrent
/// change is a 409, never a lost update.
async fn write_config(shared: &Shared, req: Request<Incoming>, replace: bool) -> Resp {
    if let Err(e) = check_auth(shared, &req) {
        return e.into();
    }
    let expected = match if_match(&req) {
        Ok(v) => v,
        Err(e) => return e.into(),
    };
    let body = match read_json(req).await {
        Ok(b) => b,
        Err(e) => return e.into(),
    };
    if !body.is_object() {
        let what = if replace { "the whole cluster config" } else { "a merge patch of the cluster config" };
        return error(StatusCode::BAD_REQUEST, format!("request body must be a JSON object ({what})"));
    }
    let snap = match load(shared).await {
        Ok(s) => s,
        Err(e) => return e.into(),
    };
    let Some(cur) = snap.config else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no cluster config in the DCS yet (the cluster is not bootstrapped)",
        );
    };
    if let Some(v) = expected.filter(|v| *v != cur.revision) {
        return error(
            StatusCode::CONFLICT,
            format!(
                "the config changed since version {v} (it is now version {}); read it again and retry",
                cur.revision
            ),
        );
    }
    let merged = if replace {
        body
    } else {
        let mut m = cur.value.clone();
        merge(&mut m, &body);
        m
    };
    let parsed = match DynamicConfig::from_json(&merged) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match shared.store.write_config(&parsed.to_json(), Some(cur.revision)).await {
        Ok(Some(rev)) => {
            shared.wake.notify_one();
            respond(StatusCode::OK, json!({ "version": rev, "config": parsed.to_json() }))
        }
        Ok(None) => error(StatusCode::CONFLICT, "the config changed concurrently; read it again and retry"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("cannot write the DCS: {e}")),
    }
}

async fn metrics(shared: &Shared) -> Resp {
    use std::fmt::Write;
    let st = shared.status();
    let snap =
        tokio::time::timeout(shared.dynamic().retry_timeout, shared.store.load()).await.ok().and_then(Result::ok);
    let mut m = String::new();
    let node = &st.name;
    let cluster = &st.cluster;
    let lbl = format!("cluster=\"{cluster}\",node=\"{node}\"");
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{lbl}}} {value}");
    };
    gauge("pgkeel_up", "1 when postgres runs.", u8::from(st.state == "running").to_string());
    gauge(
        "pgkeel_primary",
        "1 when this node is the primary holding the lease.",
        u8::from(st.role == Role::Primary && st.holds_lease).to_string(),
    );
    gauge(
        "pgkeel_replica",
        "1 when this node runs as a replica.",
        u8::from(st.role == Role::Replica && st.state == "running").to_string(),
    );
    gauge("pgkeel_term", "Term this node runs under or follows.", st.term.to_string());
    gauge("pgkeel_timeline", "Postgres timeline.", st.timeline.unwrap_or(0).to_string());
    gauge(
        "pgkeel_lsn_bytes",
        "Current (primary) or received/replayed (replica) WAL position.",
        st.lsn.unwrap_or(0).to_string(),
    );
    gauge(
        "pgkeel_replica_lag_bytes",
        "Bytes this replica is behind the leader's last reported position.",
        st.lag_bytes.unwrap_or(0).to_string(),
    );
    gauge(
        "pgkeel_lease_seconds_left",
        "Seconds left on this node's leader lease (0 when not leader).",
        format!("{:.3}", st.lease_left_ms.unwrap_or(0) as f64 / 1000.0),
    );
    gauge("pgkeel_paused", "1 when the cluster is paused.", u8::from(st.paused).to_string());
    gauge("pgkeel_dcs_up", "1 when the last DCS read succeeded.", u8::from(st.dcs_ok).to_string());
    gauge(
        "pgkeel_dcs_latency_seconds",
        "Duration of the last DCS read.",
        format!("{:.6}", shared.counters.dcs_latency_us.load(Ordering::Relaxed) as f64 / 1e6),
    );
    gauge(
        "pgkeel_pending_restart",
        "1 when a parameter change waits for a restart.",
        u8::from(!st.pending_restart.is_empty()).to_string(),
    );
    let last_loop_age = unix_ms().saturating_sub(st.last_loop_ms) as f64 / 1000.0;
    gauge("pgkeel_loop_age_seconds", "Seconds since the HA loop last finished.", format!("{last_loop_age:.3}"));
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{lbl}}} {value}");
    };
    counter("pgkeel_loops_total", "HA loops run by this agent.", shared.counters.loops.load(Ordering::Relaxed));
    counter(
        "pgkeel_promotions_total",
        "Promotions done by this agent.",
        shared.counters.promotions.load(Ordering::Relaxed),
    );
    counter(
        "pgkeel_demotions_total",
        "Demotions done by this agent.",
        shared.counters.demotions.load(Ordering::Relaxed),
    );
    counter("pgkeel_dcs_errors_total", "Failed DCS reads.", shared.counters.dcs_errors.load(Ordering::Relaxed));
    if let Some(s) = &snap {
        let now = unix_ms();
        let mut cluster_gauge = |name: &str, help: &str, value: String| {
            let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{cluster=\"{cluster}\"}} {value}");
        };
        if let Some(ms) = s.status.as_ref().and_then(|x| x.last_archived_ms) {
            cluster_gauge(
                "pgkeel_wal_last_archived_age_seconds",
                "Seconds since the primary last archived a WAL file.",
                format!("{:.3}", now.saturating_sub(ms) as f64 / 1000.0),
            );
        }
        if let Some(b) = &s.backup {
            if let Some((_, ms)) = &b.value.last_ok {
                cluster_gauge(
                    "pgkeel_backup_last_success_age_seconds",
                    "Seconds since the last successful scheduled backup ended.",
                    format!("{:.3}", now.saturating_sub(*ms) as f64 / 1000.0),
                );
            }
            if let Some(ok) = b.value.ok {
                cluster_gauge(
                    "pgkeel_backup_last_run_ok",
                    "1 when the last scheduled backup succeeded.",
                    u8::from(ok).to_string(),
                );
            }
        }
        let failovers = s.history.iter().filter(|h| h.reason != "bootstrap").count();
        let _ = writeln!(
            m,
            "# HELP pgkeel_cluster_failovers_total Promotions recorded in the cluster history (failovers and switchovers).\n# TYPE pgkeel_cluster_failovers_total counter\npgkeel_cluster_failovers_total{{cluster=\"{cluster}\"}} {failovers}"
        );
    }
    if !st.replication.is_empty() {
        let _ = writeln!(m, "# HELP pgkeel_replication_lag_bytes Bytes each connected replica has not replayed yet (primary's view).\n# TYPE pgkeel_replication_lag_bytes gauge");
        let cur = st.lsn.unwrap_or(0);
        for r in &st.replication {
            let lag = cur.saturating_sub(r.replay_lsn.unwrap_or(0));
            let _ = writeln!(
                m,
                "pgkeel_replication_lag_bytes{{{lbl},replica=\"{}\",state=\"{}\"}} {lag}",
                r.application_name, r.state
            );
        }
    }
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(m)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch() {
        let mut v = json!({"ttl": 4, "pause": false, "postgresql": {"parameters": {"a": "1", "b": "2"}}});
        merge(&mut v, &json!({"pause": true, "postgresql": {"parameters": {"a": null, "c": "3"}}}));
        assert_eq!(v, json!({"ttl": 4, "pause": true, "postgresql": {"parameters": {"b": "2", "c": "3"}}}));
    }

    #[test]
    fn query_decoding() {
        let p = query_params(Some("lag=10MB&replication_state=streaming&x=a%20b")).unwrap();
        assert_eq!(p["lag"], "10MB");
        assert_eq!(p["x"], "a b");
        assert!(query_params(Some("lag=%zz")).is_err());
    }
}
