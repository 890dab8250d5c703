//! Server connections per (database, user).
//!
//! A pool holds at most `pool_size` server connections. A client takes a permit from the
//! pool's semaphore (FIFO, so waiting clients are served in order) before it takes an idle
//! connection or opens a new one, and the connection goes back to the idle list before the
//! permit is released. So idle + in use never exceeds `pool_size`, and a client that cannot
//! get a permit within `query_wait_timeout` gets an error instead of waiting forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::server::ServerConn;

/// Which server a pool's connections go to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PoolTarget {
    /// The current primary (whichever member it is).
    Primary,
    /// The replica of this member name.
    Replica(String),
}

/// A pool's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Database name.
    pub database: String,
    /// Role name.
    pub user: String,
    /// Primary or a replica.
    pub target: PoolTarget,
}

/// One pool.
#[derive(Debug)]
pub struct Pool {
    /// Its identity.
    pub key: PoolKey,
    size: u32,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<ServerConn>>,
    /// The ParameterStatus values of the first server connection opened, sent to clients at
    /// login (server_version, server_encoding, ...).
    welcome: Mutex<Option<Vec<(String, String)>>>,
}

impl Pool {
    /// An empty pool of `size` connections.
    pub fn new(key: PoolKey, size: u32) -> Pool {
        Pool {
            key,
            size,
            permits: Arc::new(Semaphore::new(size as usize)),
            idle: Mutex::new(Vec::new()),
            welcome: Mutex::new(None),
        }
    }

    /// Waits for the right to use one server connection.
    pub async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// An idle connection opened under `term` or newer that still looks healthy; older or
    /// broken ones are closed on the way.
    pub fn take_idle(&self, min_term: u64) -> Option<ServerConn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(c) = idle.pop() {
            if c.term >= min_term && c.looks_idle() {
                return Some(c);
            }
            tracing::debug!(server = ?c, "closing a stale idle server connection");
        }
        None
    }

    /// Returns a clean connection to the pool, then releases the permit.
    pub fn put_back(&self, conn: ServerConn, permit: OwnedSemaphorePermit) {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
        drop(permit);
    }

    /// Closes idle connections opened under a term older than `term`; returns how many.
    pub fn close_older_than(&self, term: u64) -> usize {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let before = idle.len();
        idle.retain(|c| c.term >= term);
        before - idle.len()
    }

    /// The login parameters, once a server connection was opened.
    pub fn welcome(&self) -> Option<Vec<(String, String)>> {
        self.welcome.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Records the login parameters from a fresh connection, if none are recorded yet.
    pub fn set_welcome(&self, conn: &ServerConn) {
        let mut w = self.welcome.lock().unwrap_or_else(PoisonError::into_inner);
        if w.is_none() {
            let mut params: Vec<(String, String)> = conn.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            params.sort();
            *w = Some(params);
        }
    }

    /// (in use, idle, size) for logs.
    pub fn counts(&self) -> (usize, usize, u32) {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).len();
        (self.size as usize - self.permits.available_permits(), idle, self.size)
    }
}

/// Every pool, created on first use.
#[derive(Debug, Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    /// The pool for `key`, created with `size` if new.
    pub fn get(&self, key: PoolKey, size: u32) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools.entry(key.clone()).or_insert_with(|| Arc::new(Pool::new(key, size))).clone()
    }

    /// Server connections in use in the pool `key` (0 when it does not exist yet).
    pub fn in_use(&self, key: &PoolKey) -> usize {
        let pool = self.pools.lock().unwrap_or_else(PoisonError::into_inner).get(key).cloned();
        pool.map_or(0, |p| p.counts().0)
    }

    /// Closes idle connections older than `term` in every pool; returns how many.
    pub fn close_older_than(&self, term: u64) -> usize {
        let pools: Vec<Arc<Pool>> =
            self.pools.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        pools.iter().map(|p| p.close_older_than(term)).sum()
    }
}
