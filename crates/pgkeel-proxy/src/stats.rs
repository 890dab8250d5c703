//! What the admin console and `/metrics` report, kept cheap for the hot path: per-pool
//! counters are atomics, a client waiting for a server connection is recorded only when it
//! actually has to wait, and the admission [`Gate`] is a watch channel.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// Upper bounds (seconds) of the wait-time histogram buckets; `+Inf` is implied.
pub const WAIT_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0];

/// Counters of one pool. Every field is updated with one relaxed atomic add.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Server connections handed to clients: one per transaction in transaction mode, one
    /// per client in session mode.
    pub transactions: AtomicU64,
    /// Queries sent: simple-protocol Query and extended-protocol Execute messages.
    pub queries: AtomicU64,
    /// ErrorResponses the servers of this pool sent to clients.
    pub errors: AtomicU64,
    /// Reads that could have run on a replica and ran on the primary (this primary pool's),
    /// because no replica was known to have replayed the client's last write.
    pub reads_for_writes: AtomicU64,
    /// The same, because no replica was eligible.
    pub reads_without_replica: AtomicU64,
    /// Total time clients waited for a server connection of this pool, in microseconds.
    pub wait_us: AtomicU64,
    /// Wait-time histogram: `wait_buckets[i]` counts waits of at most `WAIT_BUCKETS[i]`
    /// seconds (not cumulative); the last one counts the longer waits.
    pub wait_buckets: [AtomicU64; WAIT_BUCKETS.len() + 1],
}

impl PoolStats {
    /// Records one wait for a server connection (the time from needing one to having one).
    pub fn observe_wait(&self, waited: Duration) {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.wait_us.fetch_add(waited.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
        let secs = waited.as_secs_f64();
        let i = WAIT_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(WAIT_BUCKETS.len());
        self.wait_buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            transactions: get(&self.transactions),
            queries: get(&self.queries),
            errors: get(&self.errors),
            reads_for_writes: get(&self.reads_for_writes),
            reads_without_replica: get(&self.reads_without_replica),
            wait_us: get(&self.wait_us),
            wait_buckets: std::array::from_fn(|i| get(&self.wait_buckets[i])),
        }
    }
}

/// A plain copy of [`PoolStats`]' counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSnapshot {
    /// See [`PoolStats::transactions`].
    pub transactions: u64,
    /// See [`PoolStats::queries`].
    pub queries: u64,
    /// See [`PoolStats::errors`].
    pub errors: u64,
    /// See [`PoolStats::reads_for_writes`].
    pub reads_for_writes: u64,
    /// See [`PoolStats::reads_without_replica`].
    pub reads_without_replica: u64,
    /// See [`PoolStats::wait_us`].
    pub wait_us: u64,
    /// See [`PoolStats::wait_buckets`].
    pub wait_buckets: [u64; WAIT_BUCKETS.len() + 1],
}

/// Whether new transactions may take a server connection.
///
/// Sessions call [`Gate::wait_open`] before they take a server connection for a new
/// transaction (not while they hold one), so closing the gate holds new transactions and
/// lets the ones in flight finish. The admin console's `PAUSE`/`RESUME` close and open
/// `Shared::hold`; a planned switchover can close the same gate while the primary changes.
/// The gate counts closers: it is open when every `close` was matched by an `open`, so a
/// `PAUSE` and a switchover can overlap. `PAUSE db` closes it for one database's clients
/// ([`Gate::pause_database`]).
///
/// `repr(C)`: the count every transaction reads comes first (see `session::Shared`).
#[derive(Debug)]
#[repr(C)]
pub struct Gate {
    /// The same count as `closed`, set under the watch's lock: [`Gate::is_closed`] is asked by
    /// every transaction and reads it without taking the lock.
    closed_now: AtomicU32,
    /// Closes for everyone (`PAUSE`, a switchover), among `closed`.
    everyone: AtomicU32,
    /// Closes for everyone plus paused databases.
    closed: watch::Sender<u32>,
    /// Databases paused alone (`PAUSE db`), each counted once in `closed`. Boxed: the gate
    /// sits in `Shared`'s first cache line.
    databases: Box<Databases>,
}

/// A set of database names the admin console changes (paused, disabled) and sessions look up.
#[derive(Debug, Default)]
pub struct Databases(std::sync::Mutex<std::collections::BTreeSet<String>>);

impl Databases {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds `name`; `false` when it was in already.
    pub fn insert(&self, name: &str) -> bool {
        self.lock().insert(name.to_string())
    }

    /// Removes `name`; `false` when it was not in.
    pub fn remove(&self, name: &str) -> bool {
        self.lock().remove(name)
    }

    /// Whether `name` is in.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains(name)
    }

    /// The names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            closed: watch::channel(0).0,
            closed_now: AtomicU32::new(0),
            everyone: AtomicU32::new(0),
            databases: Default::default(),
        }
    }
}

impl Gate {
    /// Changes the count under the watch's lock, mirrors it in `closed_now` and wakes the
    /// waiters.
    fn count(&self, change: impl FnOnce(&mut u32)) {
        self.closed.send_modify(|n| {
            change(n);
            self.closed_now.store(*n, Ordering::SeqCst);
        });
    }

    /// Holds new transactions until the matching [`Gate::open`].
    pub fn close(&self) {
        self.count(|n| {
            self.everyone.fetch_add(1, Ordering::SeqCst);
            *n += 1;
        });
    }

    /// Undoes one [`Gate::close`]; `false` when the gate was open already.
    pub fn open(&self) -> bool {
        let mut was_closed = false;
        self.count(|n| {
            was_closed = self.everyone.load(Ordering::SeqCst) > 0;
            if was_closed {
                self.everyone.fetch_sub(1, Ordering::SeqCst);
                *n -= 1;
            }
        });
        was_closed
    }

    /// Holds the new transactions of `database`'s clients until [`Gate::resume_database`];
    /// `false` when it was paused already.
    pub fn pause_database(&self, database: &str) -> bool {
        // The set changes before the count: a waiter woken by the count sees the new set.
        if !self.databases.insert(database) {
            return false;
        }
        self.count(|n| *n += 1);
        true
    }

    /// Undoes [`Gate::pause_database`]; `false` when it was not paused.
    pub fn resume_database(&self, database: &str) -> bool {
        if !self.databases.remove(database) {
            return false;
        }
        self.count(|n| *n = n.saturating_sub(1));
        true
    }

    /// The databases paused alone, sorted.
    pub fn paused_databases(&self) -> Vec<String> {
        self.databases.names()
    }

    /// Whether anything is held now (everyone's or some database's transactions): one load,
    /// asked by every transaction; [`Gate::holds`] tells whose.
    pub fn is_closed(&self) -> bool {
        // SeqCst, as the store: a session counts itself in flight, then asks; a switchover
        // closes, then counts (switchover.rs). One of the two sees the other.
        self.closed_now.load(Ordering::SeqCst) > 0
    }

    /// Whether every database's new transactions are held (`PAUSE`, a switchover).
    pub fn holds_everyone(&self) -> bool {
        self.everyone.load(Ordering::SeqCst) > 0
    }

    /// Whether the new transactions of `database`'s clients are held now.
    pub fn holds(&self, database: &str) -> bool {
        self.is_closed() && (self.holds_everyone() || self.databases.contains(database))
    }

    /// Returns at once when `database`'s transactions are not held, else when they no longer
    /// are. Cancel-safe: wrap it in a timeout.
    pub async fn wait_released(&self, database: &str) {
        if !self.holds(database) {
            return;
        }
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|_| !self.holds(database)).await;
    }
}

/// A resizable count of client connections (`max_client_conn`), changed by a reload. Never
/// waited on: a client over the limit is refused at once. (A pool's server connections have
/// slots of their own, [`crate::pool::Slot`].)
#[derive(Debug)]
pub struct Limit {
    counts: Arc<LimitCounts>,
}

#[derive(Debug)]
struct LimitCounts {
    size: AtomicU32,
    /// Admitted now; above `size` after a shrink, until enough clients leave.
    held: AtomicU32,
}

/// One admission of a [`Limit`]; given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    counts: Arc<LimitCounts>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.counts.held.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limit {
    /// A limit of `size`.
    pub fn new(size: u32) -> Limit {
        Limit { counts: Arc::new(LimitCounts { size: AtomicU32::new(size), held: AtomicU32::new(0) }) }
    }

    /// An admission if the limit is not reached.
    pub fn try_acquire(&self) -> Option<Admitted> {
        let size = self.counts.size.load(Ordering::Acquire);
        self.counts.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| (h < size).then_some(h + 1)).ok()?;
        Some(Admitted { counts: self.counts.clone() })
    }

    /// Changes the limit. Growing takes effect at once; after shrinking below the number
    /// admitted, admissions resume once enough have been given back.
    pub fn resize(&self, size: u32) {
        self.counts.size.store(size, Ordering::Release);
    }
}

/// One client connection, for `SHOW CLIENTS`.
#[derive(Debug)]
pub struct ClientInfo {
    /// The process id the client got in BackendKeyData.
    pub pid: i32,
    /// The client's pool: its database and role name (`pool.key`), without copies of the
    /// names in every client.
    pub pool: std::sync::Arc<crate::pool::Pool>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The listener's routing (`auto`, `primary`, `replica`).
    pub listener: &'static str,
    /// When it logged in.
    pub connected: SystemTime,
    /// Waiting for a server connection now.
    pub waiting: AtomicBool,
    /// Its BackendKeyData secret and where its cancel requests go.
    pub cancel: crate::session::CancelSlot,
    /// `KILL` of its database on the admin console: the session ends at its next turn.
    pub killed: AtomicBool,
    /// Sent something since the last `client_idle_timeout` check.
    pub active: AtomicBool,
    /// Idle through a whole `client_idle_timeout`: the session ends at its next turn if it
    /// is still idle.
    pub idle_expired: AtomicBool,
}

/// Seconds since the Unix epoch, for tables.
pub fn unix_time(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_land_in_their_bucket() {
        let s = PoolStats::default();
        s.observe_wait(Duration::from_micros(500));
        s.observe_wait(Duration::from_millis(3));
        s.observe_wait(Duration::from_secs(60));
        let snap = s.snapshot();
        assert_eq!(snap.transactions, 3);
        assert_eq!(snap.wait_buckets[0], 1);
        assert_eq!(snap.wait_buckets[1], 1);
        assert_eq!(snap.wait_buckets[WAIT_BUCKETS.len()], 1);
        assert_eq!(snap.wait_us, 500 + 3000 + 60_000_000);
    }

    #[test]
    fn a_limit_shrinks_as_permits_come_back() {
        let l = Limit::new(2);
        let a = l.try_acquire().expect("1");
        let b = l.try_acquire().expect("2");
        assert!(l.try_acquire().is_none());
        l.resize(1);
        drop(a);
        assert!(l.try_acquire().is_none(), "the permit that came back was retired");
        drop(b);
        let c = l.try_acquire().expect("one again");
        assert!(l.try_acquire().is_none());
        l.resize(3);
        assert!(l.try_acquire().is_some() && l.try_acquire().is_some());
        drop(c);
    }

    #[tokio::test]
    async fn the_gate_counts_closers() {
        let g = std::sync::Arc::new(Gate::default());
        g.wait_released("db").await;
        g.close();
        g.close();
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.wait_released("db").await });
        assert!(g.open());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "still closed by the second closer");
        assert!(g.open());
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("opened").expect("joined");
        assert!(!g.open(), "already open");
        assert!(!g.is_closed());
    }

    #[tokio::test]
    async fn a_paused_database_holds_its_clients_only() {
        let g = std::sync::Arc::new(Gate::default());
        assert!(g.pause_database("a"));
        assert!(!g.pause_database("a"), "paused already");
        assert!(g.is_closed() && g.holds("a") && !g.holds("b") && !g.holds_everyone());
        g.wait_released("b").await;
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.wait_released("a").await });
        // A PAUSE for everyone on top: resuming the database alone does not release it.
        g.close();
        assert!(g.holds("b"));
        assert!(g.resume_database("a"));
        assert!(!g.resume_database("a"), "not paused any more");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "still held by the PAUSE for everyone");
        assert!(g.open());
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("released").expect("joined");
        assert!(!g.is_closed() && !g.holds("a"));
        assert_eq!(g.paused_databases(), Vec::<String>::new());
        assert!(!g.open(), "a database's pause is not an open's to undo");
    }
}
