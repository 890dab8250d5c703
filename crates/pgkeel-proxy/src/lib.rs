//! The pgkeel proxy: a PostgreSQL wire-protocol proxy that pools connections and follows the
//! primary of a pgkeel cluster (see `docs/proxy.md`).
//!
//! - [`protocol`], the wire-protocol codec, with no I/O;
//! - [`config`], `proxy.toml`;
//! - [`userlist`] and [`scram`], client authentication (SCRAM-SHA-256) and server logins;
//! - [`topology`], the primary, from a DCS watch;
//! - [`pool`], server connections per (database, user);
//! - [`server`], one server connection;
//! - `session`, one client connection (startup, authentication, forwarding);
//! - [`run`], the listener.
//!
//! Not built yet: read/write splitting, TLS, prepared statements in transaction mode, the
//! admin console and metrics (see `docs/proxy.md`).

#![warn(missing_docs)]

pub mod config;
pub mod pool;
pub mod protocol;
pub mod scram;
pub mod server;
mod session;
pub mod topology;
pub mod userlist;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{watch, Semaphore};

pub use config::{PoolMode, ProxyConfig};
pub use userlist::Userlist;

/// Runs the proxy until `shutdown` turns true: opens the DCS, starts the topology watch,
/// binds the listener and serves clients. The userlist must have been loaded (and so
/// checked) by the caller.
pub async fn run(config: ProxyConfig, userlist: Userlist, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    // Phase 1: everything that can fail on bad config, before binding.
    let dcs = topology::open_dcs(&config.dcs).await?;
    let store = pgkeel_dcs::cluster::ClusterStore::new(dcs.clone(), &config.cluster);
    // Phase 2: bind.
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("bind the proxy listener on {} (listen)", config.listen))?;
    tracing::info!(
        listen = %config.listen, cluster = %config.cluster, dcs = %dcs.describe(), pool_mode = config.pool_mode.as_str(),
        pool_size = config.pool_size, users = userlist.len(), "proxy listening"
    );
    // Phase 3: serve.
    let (tx, rx) = watch::channel(topology::Topology::default());
    let watcher = tokio::spawn(topology::watch(store, tx, shutdown.clone()));
    let clients = Arc::new(Semaphore::new(config.max_client_conn as usize));
    let shared = Arc::new(session::Shared::new(config, userlist, rx.clone()));
    let closer = tokio::spawn(close_old_terms(shared.clone(), rx));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let admitted = clients.clone().try_acquire_owned().ok();
                    tokio::spawn(session::run(shared.clone(), stream, peer, admitted));
                }
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the clients we have.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    tracing::info!("proxy stopping: no new clients");
    closer.abort();
    let _ = watcher.await;
    Ok(())
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
