//! Server connections per (database, user).
//!
//! A pool holds at most `pool_size` server connections. A client takes a permit from the
//! pool's semaphore (FIFO, so waiting clients are served in order) before it takes an idle
//! connection or opens a new one, and the connection goes back to the idle list before the
//! permit is released. So idle + in use never exceeds `pool_size`, and a client that cannot
//! get a permit within `query_wait_timeout` gets an error instead of waiting forever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::OwnedSemaphorePermit;

use crate::server::{ServerAuth, ServerConn, ServerRole};
use crate::stats::{Limit, PoolStats};
use crate::tracked::Tracked as TrackedSettings;
use crate::weak_list::WeakList;

/// A pool's login parameters: what the server reported when the pool's first connection
/// logged in, told to each client at its login. Shared, values included, by every client of
/// the pool.
#[derive(Debug)]
pub(crate) struct Welcome {
    /// (name, value), sorted by name.
    pub params: Vec<(String, Arc<str>)>,
    /// The tracked settings among them, sharing the values.
    pub told: TrackedSettings,
}
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
    /// `pool_size` permits; changed by a reload ([`Pool::resize`]).
    limit: Limit,
    /// Boxed although in a `Vec`: a connection moves between the pool and a client once per
    /// transaction, and a box moves as a pointer.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    /// Counters for the admin console and `/metrics`.
    pub stats: PoolStats,
    /// The pool's server connections that were ever attached to a client, for `SHOW SERVERS`
    /// (see [`Pool::track`]); entries of closed connections are dropped now and then.
    attached: Mutex<WeakList<Live>>,
    /// The ParameterStatus values of the first server connection opened, sent to clients at
    /// login (server_version, server_encoding, ...).
    welcome: Mutex<Option<Arc<Welcome>>>,
    /// The server login of the pool's last client (see [`Pool::share_auth`]).
    auth: Mutex<Option<Arc<ServerAuth>>>,
}

impl Pool {
    /// An empty pool of `size` connections.
    pub fn new(key: PoolKey, size: u32) -> Pool {
        Pool {
            key,
            limit: Limit::new(size),
            idle: Mutex::new(Vec::new()),
            stats: PoolStats::default(),
            attached: Mutex::default(),
            welcome: Mutex::new(None),
            auth: Mutex::new(None),
        }
    }

    /// A permit if one is free right now, without waiting (see [`Pool::permit`]).
    pub fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.limit.try_acquire()
    }

    /// Waits for the right to use one server connection. A client that has to wait is
    /// counted in [`PoolStats::waiters`] meanwhile.
    pub async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.limit.acquire(|| self.stats.waiting()).await
    }

    /// Changes the pool's size (a reload changed `pool_size`). Growing takes effect at once;
    /// shrinking retires free permits now and busy ones as they come back, and closes idle
    /// connections beyond the new size. Clients keep the connections they hold.
    pub fn resize(&self, size: u32) {
        let old = self.limit.size();
        self.limit.resize(size);
        if size < old {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() > size as usize {
                let extra = idle.len() - size as usize;
                idle.drain(..extra);
            }
        }
    }

    /// Records `conn` as attached to a client until the returned guard is dropped. The
    /// connection's row is made and listed once; attaching and detaching it (twice per
    /// transaction) only flips a flag.
    pub fn track(&self, conn: &mut ServerConn) -> Tracked {
        let live = match &conn.live {
            Some(l) => l.clone(),
            None => {
                let l = Arc::new(Live { row: ServerRow::of(conn, "active"), attached: AtomicBool::new(false) });
                self.attached.lock().unwrap_or_else(PoisonError::into_inner).push(&l);
                conn.live = Some(l.clone());
                l
            }
        };
        live.attached.store(true, Ordering::Relaxed);
        Tracked { live }
    }

    /// Every server connection of the pool, attached ones first.
    pub fn servers(&self) -> Vec<ServerRow> {
        let mut rows: Vec<ServerRow> = self
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live()
            .filter(|l| l.attached.load(Ordering::Relaxed))
            .map(|l| l.row.clone())
            .collect();
        rows.extend(self.idle.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|c| ServerRow::of(c, "idle")));
        rows
    }

    /// The current size.
    pub fn size(&self) -> u32 {
        self.limit.size()
    }

    /// An idle connection opened under `term` or newer that still looks healthy; older or
    /// broken ones are closed on the way.
    pub fn take_idle(&self, min_term: u64) -> Option<Box<ServerConn>> {
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
    pub fn put_back(&self, conn: Box<ServerConn>, permit: OwnedSemaphorePermit) {
        self.put_idle(conn);
        drop(permit);
    }

    /// Returns a clean connection to the pool; its permit stays with the caller.
    pub fn put_idle(&self, conn: Box<ServerConn>) {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
    }

    /// Closes idle connections opened under a term older than `term`; returns how many.
    pub fn close_older_than(&self, term: u64) -> usize {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let before = idle.len();
        idle.retain(|c| c.term >= term);
        before - idle.len()
    }

    /// The login parameters, once a server connection was opened.
    pub(crate) fn welcome(&self) -> Option<Arc<Welcome>> {
        self.welcome.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Records the login parameters from a fresh connection, if none are recorded yet.
    pub fn set_welcome(&self, conn: &ServerConn) {
        let mut w = self.welcome.lock().unwrap_or_else(PoisonError::into_inner);
        if w.is_none() {
            let mut params: Vec<(String, Arc<str>)> =
                conn.params.iter().map(|(k, v)| (k.clone(), Arc::from(v.as_str()))).collect();
            params.sort();
            let mut told = TrackedSettings::default();
            for (k, v) in &params {
                if let Some(canon) = TrackedSettings::canonical(k) {
                    told.set_shared(canon, v, Some(v));
                }
            }
            told.shrink_to_fit();
            *w = Some(Arc::new(Welcome { params, told }));
        }
    }

    /// `auth` as an `Arc` shared with the pool's other clients that logged in with the same
    /// credentials (nearly all of them): one copy per pool, not per idle client.
    pub fn share_auth(&self, auth: ServerAuth) -> Arc<ServerAuth> {
        let mut kept = self.auth.lock().unwrap_or_else(PoisonError::into_inner);
        match kept.as_ref() {
            Some(k) if k.same_as(&auth) => k.clone(),
            _ => kept.insert(Arc::new(auth)).clone(),
        }
    }

    /// (in use, idle, size) for logs.
    pub fn counts(&self) -> (usize, usize, u32) {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).len();
        (self.limit.in_use(), idle, self.size())
    }
}

/// A server connection, for `SHOW SERVERS`.
#[derive(Debug, Clone)]
pub struct ServerRow {
    /// `host:port`.
    pub address: String,
    /// The member's name.
    pub member: String,
    /// `primary` or `replica`.
    pub role: &'static str,
    /// The term it was opened under.
    pub term: u64,
    /// The backend's process id.
    pub pid: Option<i32>,
    /// `active` (attached to a client) or `idle`.
    pub state: &'static str,
    /// When it was opened.
    pub opened: Instant,
}

impl ServerRow {
    fn of(conn: &ServerConn, state: &'static str) -> ServerRow {
        ServerRow {
            address: conn.address.clone(),
            member: conn.member.clone(),
            role: if conn.role == ServerRole::Primary { "primary" } else { "replica" },
            term: conn.term,
            pid: conn.key.as_ref().map(|k| k.0),
            state,
            opened: conn.opened,
        }
    }
}

/// A server connection's `SHOW SERVERS` row while it is attached to a client (kept by the
/// connection, listed by its pool).
#[derive(Debug)]
pub struct Live {
    row: ServerRow,
    attached: AtomicBool,
}

/// An attached server connection's mark in its pool; cleared when dropped.
#[derive(Debug)]
pub struct Tracked {
    live: Arc<Live>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.live.attached.store(false, Ordering::Relaxed);
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

    /// Every pool.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<Arc<Pool>> =
            self.pools.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        v.sort_by(|a, b| {
            let k = |p: &Pool| {
                let t = match &p.key.target {
                    PoolTarget::Primary => String::new(),
                    PoolTarget::Replica(r) => r.clone(),
                };
                (p.key.database.clone(), p.key.user.clone(), t)
            };
            k(a).cmp(&k(b))
        });
        v
    }

    /// Applies a new `pool_size` to every pool.
    pub fn resize(&self, size: u32) {
        for p in self.all() {
            p.resize(size);
        }
    }

    /// Server connections attached to clients, over every pool.
    pub fn busy(&self) -> usize {
        self.all().iter().map(|p| p.counts().0).sum()
    }

    /// Closes idle connections older than `term` in every pool; returns how many.
    pub fn close_older_than(&self, term: u64) -> usize {
        let pools: Vec<Arc<Pool>> =
            self.pools.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        pools.iter().map(|p| p.close_older_than(term)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scram::ClientCredential;
    use crate::server::ServerTls;

    #[test]
    fn clients_with_the_same_login_share_one_server_auth() {
        let pool = Pool::new(PoolKey { database: "db".into(), user: "app".into(), target: PoolTarget::Primary }, 2);
        let auth = |password: &str| ServerAuth {
            user: "app".into(),
            password: Some(password.into()),
            scram: ClientCredential::Password(password.into()),
            md5: None,
            tls: ServerTls::disabled(),
        };
        let a = pool.share_auth(auth("one"));
        let b = pool.share_auth(auth("one"));
        assert!(Arc::ptr_eq(&a, &b), "the same login is shared");
        // A changed password (a reloaded userlist) gets its own, which later clients share.
        let c = pool.share_auth(auth("two"));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.password.as_deref(), Some("two"));
        assert!(Arc::ptr_eq(&c, &pool.share_auth(auth("two"))));
        // Clients that logged in before keep theirs.
        assert_eq!(a.password.as_deref(), Some("one"));
    }
}
