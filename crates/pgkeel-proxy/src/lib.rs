//! The pgkeel proxy: a PostgreSQL wire-protocol proxy that pools connections and follows the
//! primary of a pgkeel cluster (see `docs/proxy.md`).
//!
//! - [`protocol`], the wire-protocol codec, with no I/O;
//! - [`config`], `proxy.toml`;
//! - [`userlist`] and [`scram`], client authentication (SCRAM-SHA-256) and server logins;
//! - [`topology`], the primary and the replicas, from a DCS watch;
//! - [`router`], read/write classification with PostgreSQL's grammar;
//! - [`prepared`], protocol-level prepared statements across pooled connections;
//! - [`pool`], server connections per (database, user, server);
//! - [`server`], one server connection;
//! - `session`, one client connection (startup, authentication, routing, forwarding);
//! - `sessions`, the task that runs them;
//! - [`run`], the listeners.
//!
//! - [`tls`], TLS to clients and to servers;
//! - [`admin`], the admin console (database `pgkeel`) and reloading;
//! - [`metrics`], `GET /metrics`; [`stats`], the counters both read.

#![warn(missing_docs)]

pub mod admin;
pub mod config;
mod functions;
mod kick;
pub mod metrics;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod router;
mod ryw;
pub mod scram;
pub mod server;
mod session;
mod sessions;
pub mod stats;
pub mod switchover;
pub mod tls;
pub mod topology;
mod tracked;
pub mod userlist;
mod weak_list;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::watch;

/// The `bytes` crate, whose `Bytes` and `BytesMut` the codec's API uses.
pub use bytes;
pub use config::{PoolMode, ProxyConfig};
pub use userlist::Userlist;

/// Reads and checks a `proxy.toml` and its userlist: the userlist must have users, and every
/// `admin_users` entry must be one of them. The error names the file and the fix.
pub fn load(path: &Path) -> Result<(ProxyConfig, Userlist), String> {
    let config = config::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let userlist = Userlist::load(&config.userlist).map_err(|e| format!("{}: auth.userlist: {e}", path.display()))?;
    if userlist.is_empty() {
        return Err(format!(
            "{}: the userlist {} has no users; add lines of \"user\" \"password\"",
            path.display(),
            config.userlist.display()
        ));
    }
    if let Some(u) = config.admin_users.iter().find(|u| userlist.get(u).is_none()) {
        return Err(format!(
            "{}: admin_users: {u:?} is not in the userlist {}; add a line \"{u}\" \"password\" there, or remove it \
             from admin_users",
            path.display(),
            config.userlist.display()
        ));
    }
    if let Some(aq) = &config.auth_query {
        if userlist.get(&aq.user).and_then(|e| e.password.as_ref()).is_none() {
            return Err(format!(
                "{}: auth.auth_user = {:?} must be in the userlist {} with its plaintext password (the proxy logs in \
                 as this user to run auth.query)",
                path.display(),
                aq.user,
                config.userlist.display()
            ));
        }
    }
    tls::Tls::load(&config).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((config, userlist))
}

/// How the caller steers a running proxy.
#[derive(Debug)]
pub struct Control {
    /// Turns true on SIGTERM/SIGINT: stop accepting, drain (at most `shutdown_timeout`),
    /// return.
    pub shutdown: watch::Receiver<bool>,
    /// Each change asks for a reload (SIGHUP), as the console's `RELOAD` does.
    pub reload: watch::Receiver<u64>,
    /// The `proxy.toml` that reloads re-read (none: reloading is refused).
    pub source: Option<PathBuf>,
}

/// Runs the proxy until `control.shutdown` turns true: opens the DCS, starts the topology
/// watch, binds the listeners (and `/metrics`) and serves clients; on shutdown stops
/// accepting and lets clients finish their transactions, at most `shutdown_timeout`. The
/// configuration and userlist must have been checked by the caller ([`load`]).
pub async fn run(config: ProxyConfig, userlist: Userlist, control: Control) -> anyhow::Result<()> {
    let Control { mut shutdown, mut reload, source } = control;
    // Phase 1: everything that can fail on bad config, before binding.
    let tls = tls::Tls::load(&config).map_err(anyhow::Error::msg)?;
    let dcs = topology::open_dcs(&config.dcs).await?;
    let store = pgkeel_dcs::cluster::ClusterStore::new(dcs.clone(), &config.cluster);
    // Phase 2: bind every listener.
    let mut listeners = Vec::new();
    for (address, mode) in config.listeners() {
        let key = match mode {
            router::RouteMode::Auto => "listen",
            router::RouteMode::Primary => "listen_primary",
            router::RouteMode::Replica => "listen_replica",
        };
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("bind the proxy listener on {address} ({key})"))?;
        tracing::info!(listen = %address, routing = mode.as_str(), "listening");
        listeners.push((listener, mode));
    }
    let metrics_listener = match &config.metrics_listen {
        Some(address) => {
            let l = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("bind the metrics listener on {address} (metrics_listen)"))?;
            tracing::info!(metrics_listen = %address, "serving /metrics");
            Some(l)
        }
        None => None,
    };
    tracing::info!(
        cluster = %config.cluster, dcs = %dcs.describe(), pool_mode = config.pool_mode.as_str(),
        pool_size = config.pool_size, users = userlist.len(), load_balance = config.load_balance.as_str(),
        max_replica_lag = config.max_replica_lag, max_replica_lag_time = ?config.max_replica_lag_time,
        no_replica = config.no_replica.as_str(), "proxy listening"
    );
    // Phase 3: serve.
    let (tx, rx) = watch::channel(topology::Topology::default());
    // The watch runs until the drain is over: sessions finishing a transaction still follow
    // the topology (term fencing).
    let (stop_watch, watch_stopped) = watch::channel(false);
    let switch_store = store.clone();
    let switch_stopped = watch_stopped.clone();
    let watcher = tokio::spawn(topology::watch(store, tx, watch_stopped));
    let clients = Arc::new(stats::Limit::new(config.max_client_conn));
    let shared = Arc::new(session::Shared::new(config, userlist, rx.clone()).with_tls(tls));
    if let Some(path) = source {
        let _ = shared.admin.source.set(path);
    }
    let _ = shared.admin.clients.set(clients.clone());
    let closer = tokio::spawn(follow_topology(shared.clone(), rx));
    let functions = tokio::spawn(functions::watch(shared.clone()));
    let expiry = tokio::spawn(expire_connections(shared.clone()));
    let (address, reachable) = shared.config().connect_address_or_listen();
    if !reachable {
        tracing::warn!(listen = %address, "the other proxies cannot pass cancel requests on to this one (listen is every interface and the DCS is etcd): set connect_address to this host's address");
    }
    let switchover = tokio::spawn(switchover::run(switch_store, shared.clone(), address, switch_stopped));
    let metrics = metrics_listener.map(|l| tokio::spawn(metrics::serve(l, shared.clone())));
    // Every session holds a clone: the drain waits until only this one is left.
    let live = Arc::new(());
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let (spawner, session_tasks) = sessions::Spawner::start(&shared, workers);
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|(listener, mode)| tokio::spawn(accept(listener, mode, spawner.clone(), clients.clone(), live.clone())))
        .collect();
    drop(spawner);
    reload.mark_unchanged();
    loop {
        tokio::select! {
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            _ = shared.admin.shutdown.notified() => {
                tracing::info!("SHUTDOWN on the admin console");
                break;
            }
            r = reload.changed() => {
                if r.is_err() {
                    // The caller cannot ask for reloads any more; keep serving.
                    std::future::pending::<()>().await;
                }
                let shared = shared.clone();
                // Reading files and deriving SCRAM secrets: off the async workers.
                let _ = tokio::task::spawn_blocking(move || admin::reload(&shared)).await;
            }
        }
    }
    // Drain: stop accepting, close idle clients, let transactions in flight finish.
    for a in &acceptors {
        a.abort();
    }
    for a in acceptors {
        let _ = a.await;
    }
    shared.start_draining();
    let timeout = shared.config().shutdown_timeout;
    let deadline = Instant::now() + timeout;
    let mut left = Arc::strong_count(&live) - 1;
    tracing::info!(clients = left, shutdown_timeout = %pgkeel_config::format_duration(timeout), "proxy stopping: no new clients, draining");
    while left > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = Arc::strong_count(&live) - 1;
    }
    if left > 0 {
        tracing::warn!(clients = left, "shutdown_timeout passed; closing the remaining client connections");
    } else {
        tracing::info!("every client finished; proxy stopped");
    }
    if let Some(m) = metrics {
        m.abort();
    }
    closer.abort();
    functions.abort();
    expiry.abort();
    // The sessions left after `shutdown_timeout` are dropped with their tasks.
    for t in session_tasks {
        t.abort();
    }
    let _ = stop_watch.send(true);
    let _ = watcher.await;
    let _ = switchover.await;
    Ok(())
}

/// Accepts clients on one listener until aborted.
async fn accept(
    listener: tokio::net::TcpListener,
    mode: router::RouteMode,
    spawner: sessions::Spawner,
    clients: Arc<stats::Limit>,
    live: Arc<()>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let admitted = clients.try_acquire();
                spawner.spawn(sessions::Accepted { stream, peer, admitted, live: live.clone(), mode });
            }
            Err(e) => {
                // Out of file descriptors and the like: keep serving the clients we have.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Follows the topology: wakes busy sessions on every change, and closes idle server
/// connections of older terms as soon as a newer term is seen.
async fn follow_topology(shared: Arc<session::Shared>, mut rx: watch::Receiver<topology::Topology>) {
    let mut last = 0;
    while rx.changed().await.is_ok() {
        let newest = rx.borrow_and_update().newest_term;
        // Busy sessions look at the new topology now (term fencing, replicas for reads).
        shared.kick.topology_changed();
        if newest > last {
            let closed = shared.pools.close_older_than(newest);
            if closed > 0 {
                tracing::info!(term = newest, closed, "closed idle server connections of older terms");
            }
            last = newest;
        }
    }
}

/// Closes pooled server connections by `server_idle_timeout` and `server_lifetime`, opens
/// them for `min_pool_size` ([`fill_pools`]), and closes idle clients by
/// `client_idle_timeout`, all read afresh every second (a reload changes them).
/// None costs a transaction a clock read: unused connections are told by the idle list's
/// low-water mark ([`pool::Pool::close_unused`]), old ones by the order connections were
/// opened in, sampled here over time ([`pool::Pool::retire_opened_before`]), idle clients by
/// a flag their sessions set ([`expire_idle_clients`]).
async fn expire_connections(shared: Arc<session::Shared>) {
    let mut last_unused_check = Instant::now();
    let mut last_client_check = Instant::now();
    // (when, how many server connections had been opened by then), oldest first.
    let mut opened: std::collections::VecDeque<(Instant, u32)> = Default::default();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cfg = shared.config();
        let now = Instant::now();
        if let Some(idle) = due(&mut last_unused_check, cfg.server_idle_timeout, now) {
            let closed: usize =
                shared.pools.all().iter().map(|p| p.close_unused(cfg.min_pool_size_for(&p.key.database))).sum();
            if closed > 0 {
                tracing::info!(closed, server_idle_timeout = %pgkeel_config::format_duration(idle), "closed unused server connections");
            }
        }
        if let Some(idle) = due(&mut last_client_check, cfg.client_idle_timeout, now) {
            expire_idle_clients(&shared, idle);
        }
        if cfg.any_min_pool_size() {
            fill_pools(&shared, &cfg);
        }
        let Some(life) = cfg.server_lifetime else {
            opened.clear();
            continue;
        };
        // A sample at most every 1/32 of the lifetime keeps the list short; a connection is
        // retired at most that much (or a second) after it reaches the lifetime.
        if opened.back().is_none_or(|(t, _)| now.duration_since(*t) >= life / 32) {
            opened.push_back((now, server::opened_mark()));
        }
        // The newest sample at least `life` old: every connection opened before it is older.
        let mut mark = None;
        while let Some(&(t, m)) = opened.front() {
            if now.duration_since(t) < life {
                break;
            }
            mark = Some(m);
            opened.pop_front();
        }
        if let Some(mark) = mark {
            let closed: usize = shared.pools.all().iter().map(|p| p.retire_opened_before(mark)).sum();
            if closed > 0 {
                tracing::info!(closed, server_lifetime = %pgkeel_config::format_duration(life), "closed idle server connections that reached server_lifetime");
            }
        }
    }
}

/// How long [`fill_pools`] leaves a pool alone after the server refused a connection for it.
const FILL_BACKOFF: Duration = Duration::from_secs(60);

/// `min_pool_size`: opens connections in the background for every pool with fewer than
/// `min(min_pool_size, pool_size)` open, so that load coming back after a quiet spell, or
/// after a failover closed the old primary's connections, finds them ready. A pool of the
/// primary once a client logged in to it (so that its login is known); a pool of a replica
/// once a read went there, with the login of the primary pool of the same database and user,
/// while the replica is one reads may use (running, streaming, following the leader). One fill per
/// pool at a time; a connection that a cap (`max_db_connections`, `max_user_connections`)
/// has no room for is not opened. None while the proxy shuts down, nor for a database held
/// by `PAUSE`; a refused login is tried again after [`FILL_BACKOFF`].
fn fill_pools(shared: &Arc<session::Shared>, cfg: &config::ProxyConfig) {
    if shared.draining() {
        return;
    }
    for pool in shared.pools.all() {
        let min = cfg.min_pool_size_for(&pool.key.database);
        let missing = pool.missing(min);
        if missing == 0 || shared.hold.holds(&pool.key.database) {
            continue;
        }
        // A replica pool's connections log in as the primary pool's clients did.
        let primary_pool = match &pool.key.target {
            pool::PoolTarget::Primary => None,
            pool::PoolTarget::Replica(_) => {
                let key = pool::PoolKey { target: pool::PoolTarget::Primary, ..pool.key.clone() };
                match shared.pools.existing(&key) {
                    Some(p) => Some(p),
                    None => continue,
                }
            }
        };
        let Some(auth) = primary_pool.as_ref().unwrap_or(&pool).auth() else { continue };
        if !pool.start_filling() {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let welcome = primary_pool.as_ref().unwrap_or(&pool);
            match fill_pool(&shared, &pool, welcome, &auth, missing, min).await {
                Ok(0) => {}
                Ok(opened) => {
                    tracing::debug!(database = %pool.key.database, user = %pool.key.user, target = ?pool.key.target, opened, "opened server connections for min_pool_size")
                }
                // Usually a server starting or a failover: tried again every second.
                Err(e @ server::ConnectError::Retry(_)) => {
                    tracing::debug!(database = %pool.key.database, user = %pool.key.user, target = ?pool.key.target, error = %e, "min_pool_size: cannot open a server connection yet")
                }
                // Refused (a password that no longer matches, ...): no login attempt per second
                // filling postgres's log; the pool stays marked as filling for a while.
                Err(e) => {
                    tracing::warn!(database = %pool.key.database, user = %pool.key.user, target = ?pool.key.target, error = %e, retry_in_s = FILL_BACKOFF.as_secs(), "min_pool_size: cannot open a server connection");
                    tokio::time::sleep(FILL_BACKOFF).await;
                }
            }
            pool.stop_filling();
        });
    }
}

/// [`fill_pools`] for one pool: opens up to `missing` connections, one after another, as
/// `auth`; how many it added. `welcome` is the pool whose clients see the server's
/// parameters at login (the primary pool of the same database and user).
async fn fill_pool(
    shared: &session::Shared,
    pool: &pool::Pool,
    welcome: &pool::Pool,
    auth: &server::ServerAuth,
    missing: usize,
    min: u32,
) -> Result<usize, server::ConnectError> {
    let cfg = shared.config();
    let dial = shared.dial(&auth.user);
    let database = cfg.dbname_for(&pool.key.database);
    for added in 0..missing {
        let Ok(permit) = pool.try_permit() else { return Ok(added) };
        let mut conn = match &pool.key.target {
            pool::PoolTarget::Primary => {
                let Some(primary) = shared.topology.borrow().primary.clone() else { return Ok(added) };
                let conn = server::ServerConn::connect(&primary, database, auth, &dial).await?;
                // Never one of an older term than the newest seen (term fencing, as for clients).
                if conn.term < shared.topology.borrow().newest_term {
                    return Ok(added);
                }
                conn
            }
            pool::PoolTarget::Replica(name) => {
                let replica = shared.topology.borrow().replicas.iter().find(|r| &r.name == name).cloned();
                let Some(replica) = replica else { return Ok(added) };
                server::ServerConn::connect_replica(&replica, database, auth, &dial).await?
            }
        };
        conn.permit = permit;
        welcome.set_welcome(&conn);
        if !pool.add_idle(Box::new(conn), min) {
            return Ok(added);
        }
    }
    Ok(missing)
}

/// `period` when a whole one has passed since `*last` (which then becomes `now`); `None` when
/// not, or when the check is off (then `*last` follows `now`, so turning it on by a reload
/// starts a whole period).
fn due(last: &mut Instant, period: Option<Duration>, now: Instant) -> Option<Duration> {
    match period {
        Some(p) if now.duration_since(*last) >= p => {
            *last = now;
            Some(p)
        }
        Some(_) => None,
        None => {
            *last = now;
            None
        }
    }
}

/// `client_idle_timeout`: marks the clients that sent nothing since the last check and hold
/// no server connection (so not inside a transaction, and not waiting for one), and wakes
/// the sessions; each marked one that is still idle ends itself. No clock read per
/// transaction: a session sets its `active` flag when the client sends something.
fn expire_idle_clients(shared: &session::Shared, idle: Duration) {
    use std::sync::atomic::Ordering;
    let mut expired = 0;
    for (c, server) in shared.clients() {
        let busy = server.is_some() || c.waiting.load(Ordering::Relaxed);
        if !c.active.swap(false, Ordering::AcqRel) && !busy {
            c.idle_expired.store(true, Ordering::Release);
            expired += 1;
        }
    }
    if expired > 0 {
        tracing::info!(clients = expired, client_idle_timeout = %pgkeel_config::format_duration(idle), "closing idle clients");
        shared.kick.everyone();
    }
}
