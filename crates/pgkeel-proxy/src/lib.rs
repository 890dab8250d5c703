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
//! - [`run`], the listeners.
//!
//! Not built yet: TLS, the admin console and metrics (see `docs/proxy.md`).

#![warn(missing_docs)]

pub mod config;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod router;
pub mod scram;
pub mod server;
mod session;
pub mod topology;
pub mod userlist;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{watch, Semaphore};

/// The `bytes` crate, whose `Bytes` and `BytesMut` the codec's API uses.
pub use bytes;
pub use config::{PoolMode, ProxyConfig};
pub use userlist::Userlist;

/// Runs the proxy until `shutdown` turns true: opens the DCS, starts the topology watch,
/// binds the listener and serves clients. The userlist must have been loaded (and so
/// checked) by the caller.
pub async fn run(config: ProxyConfig, userlist: Userlist, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    // Phase 1: everything that can fail on bad config, before binding.
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
    tracing::info!(
        cluster = %config.cluster, dcs = %dcs.describe(), pool_mode = config.pool_mode.as_str(),
        pool_size = config.pool_size, users = userlist.len(), load_balance = config.load_balance.as_str(),
        max_replica_lag = config.max_replica_lag, "proxy listening"
    );
    // Phase 3: serve.
    let (tx, rx) = watch::channel(topology::Topology::default());
    let watcher = tokio::spawn(topology::watch(store, tx, shutdown.clone()));
    let clients = Arc::new(Semaphore::new(config.max_client_conn as usize));
    let shared = Arc::new(session::Shared::new(config, userlist, rx.clone()));
    let closer = tokio::spawn(close_old_terms(shared.clone(), rx));
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|(listener, mode)| tokio::spawn(accept(listener, mode, shared.clone(), clients.clone())))
        .collect();
    loop {
        if shutdown.changed().await.is_err() || *shutdown.borrow() {
            break;
        }
    }
    for a in &acceptors {
        a.abort();
    }
    tracing::info!("proxy stopping: no new clients");
    closer.abort();
    let _ = watcher.await;
    Ok(())
}

/// Accepts clients on one listener until aborted.
async fn accept(
    listener: tokio::net::TcpListener,
    mode: router::RouteMode,
    shared: Arc<session::Shared>,
    clients: Arc<Semaphore>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let admitted = clients.clone().try_acquire_owned().ok();
                tokio::spawn(session::run(shared.clone(), stream, peer, admitted, mode));
            }
            Err(e) => {
                // Out of file descriptors and the like: keep serving the clients we have.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Closes idle server connections of older terms as soon as a newer term is seen.
async fn close_old_terms(shared: Arc<session::Shared>, mut rx: watch::Receiver<topology::Topology>) {
    let mut last = 0;
    while rx.changed().await.is_ok() {
        let newest = rx.borrow_and_update().newest_term;
        if newest > last {
            let closed = shared.pools.close_older_than(newest);
            if closed > 0 {
                tracing::info!(term = newest, closed, "closed idle server connections of older terms");
            }
            last = newest;
        }
    }
}
