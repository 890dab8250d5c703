//! Server connections per (database, user).
//!
//! A pool holds at most `pool_size` server connections. A client takes one of the pool's
//! slots ([`Slot`]) before it takes an idle connection or opens a new one, and the connection
//! goes back to the idle list before the slot is given up. So idle + in use never exceeds
//! `pool_size`.
//!
//! With more clients than `pool_size` (most transactions then wait), the slots are handed
//! over directly: a slot given up goes to the client that has waited longest, under the one
//! lock that also guards the idle list, and a newcomer never takes it first. A client that
//! gets no slot within `query_wait_timeout` gets an error instead of waiting forever. The
//! waits need no timer each: one watchdog task per pool sleeps until the earliest deadline
//! of the clients waiting (see [`Pool::slot`]).
//!
//! Above the pools, `max_db_connections` and `max_user_connections` cap the connections of
//! one database (over its users' pools) and of one user (over its databases' pools) on one
//! server ([`Cap`]). Every pooled connection holds a [`Permit`] under both caps of its pool
//! while it is open. A pool that needs a new connection when a cap is reached closes an idle
//! connection of another pool under it, or else waits until a connection under it closes, and
//! meanwhile those pools close connections coming back instead of keeping them idle
//! ([`Pool::permit`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::server::{ServerAuth, ServerConn, ServerRole};
use crate::stats::PoolStats;
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
    /// The slots, the clients waiting for one and the idle connections, under one lock.
    state: Mutex<State>,
    /// Wakes the watchdog ([`Pool::slot`]) when a client starts waiting with the earliest
    /// deadline, or when the pool is dropped.
    watchdog: Arc<tokio::sync::Notify>,
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
    /// The distinct settings its clients logged in with (see [`Pool::share_settings`]).
    settings: Mutex<Vec<crate::tracked::Tracked>>,
    /// The volatile functions of the pool's database have been read
    /// ([`crate::functions`]): until then its reads go to the primary.
    functions_known: std::sync::atomic::AtomicBool,
    /// `max_db_connections` and `max_user_connections` of its database and user on its
    /// server (see [`Pool::permit`]); none for a pool made outside [`Pools`].
    caps: Vec<Arc<Cap>>,
    /// A `min_pool_size` fill runs (see [`Pool::start_filling`]).
    filling: std::sync::atomic::AtomicBool,
    /// The read-your-writes floor of its database and user, with `read_your_writes = "user"`
    /// (used in the primary's pool).
    pub ryw: Arc<crate::ryw::UserFloor>,
}

/// How many distinct lists of login settings a pool shares among its clients.
const SHARED_SETTINGS: usize = 16;

impl Pool {
    /// An empty pool of `size` connections.
    pub fn new(key: PoolKey, size: u32) -> Pool {
        Pool {
            key,
            state: Mutex::new(State {
                size,
                held: 0,
                idle: Vec::new(),
                waiters: VecDeque::new(),
                watchdog: Watchdog::None,
                close_opened_before: None,
                low_water: 0,
                squeeze: 0,
                reserve: 0,
                reserve_timeout: Duration::ZERO,
            }),
            watchdog: Arc::default(),
            stats: PoolStats::default(),
            attached: Mutex::default(),
            welcome: Mutex::new(None),
            auth: Mutex::new(None),
            settings: Mutex::default(),
            functions_known: Default::default(),
            caps: Vec::new(),
            filling: Default::default(),
            ryw: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot if one is free right now, without waiting (see [`Pool::slot`]).
    pub fn try_slot(self: &Arc<Self>) -> Option<Slot> {
        self.lock().take_free().then(|| Slot::new(self))
    }

    /// [`Pool::try_slot`], and with the slot an idle connection opened under `min_term` or
    /// newer ([`Pool::take_idle`]; none when `min_term` is `None`), under one lock.
    pub fn try_slot_idle(self: &Arc<Self>, min_term: Option<u64>) -> Option<(Slot, Option<Box<ServerConn>>)> {
        let mut s = self.lock();
        if !s.take_free() {
            return None;
        }
        let conn = min_term.and_then(|t| s.take_idle(t));
        drop(s);
        Some((Slot::new(self), conn))
    }

    /// Waits for a slot, at most until `since + timeout`; `since` is when the client started
    /// to need one (`SHOW POOLS` reports the longest current wait). Waiting clients are
    /// served in order. Cancel-safe: a client that stops waiting leaves the queue, and a slot
    /// handed to it meanwhile goes to the next one.
    pub async fn slot(self: &Arc<Self>, since: Instant, timeout: Duration) -> Result<Slot, NoSlot> {
        let waiter = {
            let mut s = self.lock();
            if s.take_free() {
                return Ok(Slot::new(self));
            }
            let deadline = since.checked_add(timeout).unwrap_or(since + Duration::from_secs(86_400 * 365));
            let waiter = Arc::new(Waiter { since, deadline, state: Mutex::new(Wait::Queued(None)) });
            // The watchdog also hands out reserve slots, after reserve_pool_timeout.
            let due = s.reserve_due(&waiter).map_or(deadline, |r| r.min(deadline));
            s.waiters.push_back(waiter.clone());
            match s.watchdog {
                Watchdog::None => {
                    s.watchdog = Watchdog::At(due);
                    tokio::spawn(watchdog(Arc::downgrade(self), self.watchdog.clone()));
                }
                Watchdog::At(at) if at <= due => {}
                // It sleeps until a later deadline, or until a client waits: wake it.
                Watchdog::At(_) | Watchdog::Idle => {
                    s.watchdog = Watchdog::At(due);
                    self.watchdog.notify_one();
                }
            }
            waiter
        };
        WaitSlot { pool: self, waiter, done: false }.await
    }

    /// Gives a slot up: to the client that has waited longest, if any. `conn`: a clean
    /// connection going back to the idle list first, under the same lock.
    ///
    /// A slot above `pool_size` (a reserve slot, or one a shrink retired) goes on only to a
    /// client that waited `reserve_pool_timeout`, within `reserve_pool_size`; otherwise it
    /// retires, and its connection is closed, so that the pool comes back to its size.
    fn release(self: &Arc<Self>, conn: Option<Box<ServerConn>>) {
        let mut s = self.lock();
        if s.held > s.size && !(s.held <= s.size + s.reserve && s.overdue(Instant::now())) {
            s.held -= 1;
            drop(s);
            if let Some(c) = conn {
                tracing::debug!(server = ?c, "closing a server connection above pool_size (reserve_pool_size or a smaller pool_size)");
            }
            return;
        }
        s.keep(conn);
        if let Some(w) = s.next_waiter() {
            drop(s);
            // The slot (s.held unchanged) is the waiter's now.
            if let Some(waker) = w {
                waker.wake();
            }
            return;
        }
        s.held -= 1;
    }

    /// Hands reserve slots to the clients that waited `reserve_pool_timeout` (oldest first,
    /// within `reserve_pool_size`), times out the clients whose deadline passed; when to look
    /// again: the earliest deadline or reserve time of the others.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut wake = Vec::new();
        let mut s = self.lock();
        let mut reserved = 0;
        while s.reserve_wanted(now) {
            let Some(w) = s.next_waiter() else { break };
            s.held += 1;
            reserved += 1;
            wake.extend(w);
        }
        if reserved > 0 {
            let (in_use, size) = (s.held - s.size.min(s.held), s.reserve);
            tracing::info!(
                database = %self.key.database,
                user = %self.key.user,
                target = ?self.key.target,
                reserve_in_use = in_use,
                reserve_pool_size = size,
                "clients waited longer than reserve_pool_timeout for a full pool: it opens reserve connections"
            );
        }
        s.waiters.retain(|w| {
            if w.deadline > now {
                return true;
            }
            let mut state = w.lock();
            if let Wait::Queued(waker) = &mut *state {
                wake.extend(waker.take());
            }
            *state = Wait::TimedOut;
            false
        });
        let next = s.waiters.iter().map(|w| s.reserve_due(w).map_or(w.deadline, |r| r.min(w.deadline))).min();
        s.watchdog = next.map_or(Watchdog::Idle, Watchdog::At);
        drop(s);
        for w in wake {
            w.wake();
        }
        next
    }

    /// (clients waiting for a slot, the longest current wait).
    pub fn waiters(&self) -> (usize, Duration) {
        let s = self.lock();
        let longest = s.waiters.front().map_or(Duration::ZERO, |w| w.since.elapsed());
        (s.waiters.len(), longest)
    }

    /// Changes the pool's size (a reload changed `pool_size` or the reserve). Growing takes
    /// effect at once (waiting clients get the new slots); shrinking retires free slots now and
    /// busy ones as they come back, and closes idle connections beyond the new size. Clients
    /// keep the connections they hold.
    pub fn resize(&self, sizes: Sizes) {
        let mut wake = Vec::new();
        let mut s = self.lock();
        let size = sizes.pool;
        if (s.reserve, s.reserve_timeout) != (sizes.reserve, sizes.reserve_timeout) {
            (s.reserve, s.reserve_timeout) = (sizes.reserve, sizes.reserve_timeout);
            // It looks again at the reserve.
            self.watchdog.notify_one();
        }
        s.size = size;
        while s.held < s.size {
            match s.next_waiter() {
                Some(w) => {
                    s.held += 1;
                    wake.extend(w);
                }
                None => break,
            }
        }
        if s.idle.len() > size as usize {
            let extra = s.idle.len() - size as usize;
            s.idle.drain(..extra);
            s.low_water = s.low_water.min(s.idle.len());
        }
        drop(s);
        for w in wake {
            w.wake();
        }
    }

    /// Lists `conn` for `SHOW SERVERS` as a connection attached to a client, once: after
    /// that, it counts as attached whenever it is not in the idle list ([`Pool::servers`]),
    /// so attaching and detaching it (twice per transaction) costs nothing here.
    pub fn track(&self, conn: &mut ServerConn) {
        if conn.live.is_none() {
            let l = Arc::new(Live { row: ServerRow::of(conn, "active") });
            self.attached.lock().unwrap_or_else(PoisonError::into_inner).push(&l);
            conn.live = Some(l);
        }
    }

    /// Every server connection of the pool, attached ones first.
    pub fn servers(&self) -> Vec<ServerRow> {
        // Under the pool's lock, which every move to or from the idle list takes: a listed
        // connection is attached exactly when it is not idle.
        let s = self.lock();
        let idle: Vec<*const Live> = s.idle.iter().filter_map(|c| c.live.as_ref().map(Arc::as_ptr)).collect();
        let mut rows: Vec<ServerRow> = self
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live()
            .filter(|l| !idle.contains(&Arc::as_ptr(l)))
            .map(|l| ServerRow {
                close_needed: s
                    .close_opened_before
                    .is_some_and(|mark| crate::server::serial_before(l.row.serial, mark)),
                ..l.row.clone()
            })
            .collect();
        // An idle connection opened before the mark was closed when the mark was set, or when
        // it came back.
        rows.extend(s.idle.iter().map(|c| ServerRow::of(c, "idle")));
        rows
    }

    /// How many of the pool's connections are to be closed once their clients are done with
    /// them (`WAIT_CLOSE` waits for none).
    pub fn close_needed(&self) -> usize {
        self.servers().iter().filter(|r| r.close_needed).count()
    }

    /// An idle connection opened under `term` or newer that still looks healthy; older or
    /// broken ones are closed on the way.
    pub fn take_idle(&self, min_term: u64) -> Option<Box<ServerConn>> {
        self.lock().take_idle(min_term)
    }

    /// Returns a clean connection to the pool; its slot stays with the caller.
    pub fn put_idle(&self, conn: Box<ServerConn>) {
        self.lock().keep(Some(conn));
    }

    /// `RECONNECT` on the admin console: closes the idle connections now and the others as
    /// they come back, so that every transaction from now on runs on a connection opened
    /// after this call. Returns how many idle connections it closed.
    pub fn reconnect(&self) -> usize {
        let mut s = self.lock();
        s.close_opened_before = Some(crate::server::opened_mark());
        s.low_water = 0;
        std::mem::take(&mut s.idle).len()
    }

    /// `KILL` on the admin console: every client waiting for a slot now stops waiting
    /// ([`NoSlot::Killed`]). Returns how many there were.
    pub fn kill_waiters(&self) -> usize {
        let mut wake = Vec::new();
        let mut s = self.lock();
        let n = s.waiters.len();
        for w in s.waiters.drain(..) {
            let mut state = w.lock();
            if let Wait::Queued(waker) = &mut *state {
                wake.extend(waker.take());
            }
            *state = Wait::Killed;
        }
        // The watchdog finds no one when it wakes.
        drop(s);
        for w in wake {
            w.wake();
        }
        n
    }

    /// Closes idle connections opened under a term older than `term`; returns how many.
    pub fn close_older_than(&self, term: u64) -> usize {
        let mut s = self.lock();
        let before = s.idle.len();
        s.idle.retain(|c| c.term >= term);
        s.low_water = s.low_water.min(s.idle.len());
        before - s.idle.len()
    }

    /// `server_idle_timeout`: closes the idle connections nobody took since the last call
    /// (the bottom of the idle list, which is taken from its end), returns how many. Called
    /// once per timeout, so a connection goes after once to twice the timeout unused, and
    /// taking one costs no clock read. It keeps `min` (`min_pool_size`) connections open.
    pub fn close_unused(&self, min: u32) -> usize {
        let mut s = self.lock();
        let open = s.idle.len() + s.held as usize;
        let unused = s.low_water.min(s.idle.len()).min(open.saturating_sub(min.min(s.size) as usize));
        s.idle.drain(..unused);
        s.low_water = s.idle.len();
        unused
    }

    /// `server_lifetime`: connections opened before `mark` are closed, the idle ones now and
    /// the others when they come back (as after `RECONNECT`). Returns how many idle ones it
    /// closed.
    pub fn retire_opened_before(&self, mark: u32) -> usize {
        let mut s = self.lock();
        // The later of this mark and a RECONNECT's.
        if !s.close_opened_before.is_some_and(|m| crate::server::serial_before(mark, m)) {
            s.close_opened_before = Some(mark);
        }
        let before = s.idle.len();
        s.idle.retain(|c| !c.opened_before(mark));
        s.low_water = s.low_water.min(s.idle.len());
        before - s.idle.len()
    }

    /// The right to open one more server connection under the pool's caps
    /// (`max_db_connections`, `max_user_connections`), to keep in the connection
    /// ([`crate::server::ServerConn::permit`]): at once while both caps have room; else after
    /// closing an idle connection of another pool under the full cap; else as soon as a
    /// connection under it closes. While it waits, the pools under the full cap close
    /// connections coming back instead of keeping them idle. `Err`: the full cap, at
    /// `deadline`. Cancel-safe.
    pub async fn permit(&self, pools: &Pools, deadline: Instant) -> Result<Permit, Arc<Cap>> {
        let mut squeezed = Squeezed(Vec::new());
        loop {
            // Registered before the look, so that a connection closed after it wakes us.
            let mut freed: Vec<_> = self.caps.iter().map(|c| Box::pin(c.freed.notified())).collect();
            for f in &mut freed {
                f.as_mut().enable();
            }
            let full = match self.try_permit() {
                Ok(p) => return Ok(p),
                Err(full) => full,
            };
            if pools.close_idle_under(&full) {
                continue;
            }
            if squeezed.0.is_empty() {
                squeezed.0 = pools.under(&full);
                for p in &squeezed.0 {
                    p.lock().squeeze += 1;
                }
            }
            let any_freed = std::future::poll_fn(|cx| {
                if freed.iter_mut().any(|f| f.as_mut().poll(cx).is_ready()) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            });
            tokio::select! {
                _ = any_freed => {}
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => return Err(full),
            }
        }
    }

    /// How many connections the pool lacks to have `min` (`min_pool_size`, at most
    /// `pool_size`) open, counting those its clients hold or are opening.
    pub fn missing(&self, min: u32) -> usize {
        self.lock().missing(min)
    }

    /// Adds a connection opened for `min_pool_size` to the idle list, if the pool still lacks
    /// one; whether it did (else the connection is closed).
    pub fn add_idle(&self, conn: Box<ServerConn>, min: u32) -> bool {
        let mut s = self.lock();
        if s.missing(min) == 0 {
            return false;
        }
        let before = s.idle.len();
        s.keep(Some(conn));
        s.idle.len() > before
    }

    /// Marks a `min_pool_size` fill of the pool as running; `false` when one already is.
    pub fn start_filling(&self) -> bool {
        !self.filling.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// The fill started by [`Pool::start_filling`] ended.
    pub fn stop_filling(&self) {
        self.filling.store(false, std::sync::atomic::Ordering::Release);
    }

    /// [`Pool::permit`] without waiting: `Err` names the cap that is full. The caps are
    /// locked together (always the database's first), so that a look that finds one full
    /// takes nothing from the others.
    pub fn try_permit(&self) -> Result<Permit, Arc<Cap>> {
        let mut counts: Vec<_> = self.caps.iter().map(|c| c.lock()).collect();
        if let Some(i) = counts.iter().position(|c| c.1 != 0 && c.0 >= c.1) {
            return Err(self.caps[i].clone());
        }
        for c in &mut counts {
            c.0 += 1;
        }
        drop(counts);
        Ok(Permit { caps: self.caps.clone() })
    }

    /// Closes the least recently used idle connection, if there is one.
    fn close_one_idle(&self) -> bool {
        let mut s = self.lock();
        if s.idle.is_empty() {
            return false;
        }
        let c = s.idle.remove(0);
        s.low_water = s.low_water.saturating_sub(1);
        drop(s);
        tracing::debug!(server = ?c, "closing an idle server connection to make room under max_db_connections or max_user_connections");
        true
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

    /// The server login of the pool's last client, if one logged in.
    pub fn auth(&self) -> Option<Arc<ServerAuth>> {
        self.auth.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether the volatile functions of the pool's database have been read, so that its
    /// reads may go to replicas.
    pub fn functions_known(&self) -> bool {
        self.functions_known.load(std::sync::atomic::Ordering::Acquire)
    }

    /// See [`Pool::functions_known`].
    pub fn set_functions_known(&self) {
        self.functions_known.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Makes `settings` (a client's, at login) share the list of the pool's clients that
    /// logged in with the same ones (nearly all of them): a server connection that matched
    /// one client's then matches the others' by pointer (`Tracked::matched_by`).
    pub fn share_settings(&self, settings: &mut crate::tracked::Tracked) {
        settings.share(&mut self.settings.lock().unwrap_or_else(PoisonError::into_inner), SHARED_SETTINGS);
    }

    /// (in use, idle, size) for logs.
    pub fn counts(&self) -> (usize, usize, u32) {
        let s = self.lock();
        (s.held as usize, s.idle.len(), s.size)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Its watchdog ends.
        self.watchdog.notify_one();
    }
}

/// What a pool's watchdog ([`Pool::slot`]) does now.
#[derive(Debug, Clone, Copy)]
enum Watchdog {
    /// Not started: no client has waited yet.
    None,
    /// Waits for a client to wait.
    Idle,
    /// Sleeps until then.
    At(Instant),
}

/// A pool's slots, waiting clients and idle connections.
#[derive(Debug)]
struct State {
    /// `pool_size`; changed by a reload ([`Pool::resize`]).
    size: u32,
    /// `reserve_pool_size`: slots beyond `size` for clients that waited `reserve_timeout`.
    reserve: u32,
    /// `reserve_pool_timeout`.
    reserve_timeout: Duration,
    /// Slots held by clients. Above `size` after a shrink, until enough come back.
    held: u32,
    /// Boxed although in a `Vec`: a connection moves between the pool and a client once per
    /// transaction, and a box moves as a pointer.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<ServerConn>>,
    /// The clients waiting for a slot, in order.
    waiters: VecDeque<Arc<Waiter>>,
    /// What the watchdog does.
    watchdog: Watchdog,
    /// Connections opened before this mark are closed when they come back (`RECONNECT`,
    /// `KILL`, `server_lifetime`; see [`crate::server::opened_mark`]).
    close_opened_before: Option<u32>,
    /// The fewest idle connections since the last [`Pool::close_unused`]: the ones below it
    /// in `idle` (taken from the end) were not used since.
    low_water: usize,
    /// Clients of other pools (or of this one) waiting for room under a cap of this pool
    /// ([`Pool::permit`]): while above 0, connections coming back are closed, not kept.
    squeeze: u32,
}

impl State {
    /// Puts a connection coming back into the idle list, unless `RECONNECT`, `KILL` or
    /// `server_lifetime` said to close it.
    fn keep(&mut self, conn: Option<Box<ServerConn>>) {
        let Some(conn) = conn else { return };
        if self.squeeze > 0 {
            tracing::debug!(server = ?conn, "closing a server connection coming back: a client waits for room under max_db_connections or max_user_connections");
            return;
        }
        if self.close_opened_before.is_some_and(|mark| conn.opened_before(mark)) {
            tracing::debug!(server = ?conn, "closing a server connection opened before RECONNECT, KILL or its server_lifetime");
            return;
        }
        self.idle.push(conn);
    }

    /// [`Pool::take_idle`] under the pool's lock.
    ///
    /// An idle connection with something to read (an error, the end of the stream) was most
    /// likely closed by its server, and its server's other connections likely were too, or
    /// are about to be: a postmaster that died or shut down, crashed, or restarted ends every
    /// backend, and each one says so when it gets to it, milliseconds apart. Then every
    /// connection opened before it is closed, the idle ones now and the others when they come
    /// back (as `RECONNECT`), rather than one client after another getting its statement
    /// answered by a dying backend. Except when what it has to read is postgres's
    /// `idle_session_timeout` (57P05): that backend ended alone.
    fn take_idle(&mut self, min_term: u64) -> Option<Box<ServerConn>> {
        while let Some(mut c) = self.idle.pop() {
            if c.term < min_term {
                tracing::debug!(server = ?c, "closing an idle server connection of an older term");
                continue;
            }
            if c.looks_idle() {
                self.low_water = self.low_water.min(self.idle.len());
                return Some(c);
            }
            if c.ended_by_idle_session_timeout() {
                tracing::debug!(server = ?c, "closing an idle server connection its server ended by idle_session_timeout");
                continue;
            }
            let mark = crate::server::opened_mark();
            if !self.close_opened_before.is_some_and(|m| crate::server::serial_before(mark, m)) {
                self.close_opened_before = Some(mark);
            }
            let closed = self.idle.len();
            self.idle.clear();
            tracing::info!(
                server = ?c, closed,
                "an idle server connection has something to read (the server closed it?): closing the other connections opened before it too"
            );
        }
        self.low_water = 0;
        None
    }

    /// [`Pool::missing`] under the pool's lock.
    fn missing(&self, min: u32) -> usize {
        (min.min(self.size) as usize).saturating_sub(self.idle.len() + self.held as usize)
    }

    /// When `w` may get a reserve slot; `None`: the pool has no reserve.
    fn reserve_due(&self, w: &Waiter) -> Option<Instant> {
        (self.reserve > 0).then(|| w.since + self.reserve_timeout)
    }

    /// The client that waited longest waited long enough for a reserve slot.
    fn overdue(&self, now: Instant) -> bool {
        self.waiters.front().and_then(|w| self.reserve_due(w)).is_some_and(|due| due <= now)
    }

    /// A reserve slot is free, and a client waited long enough for it.
    fn reserve_wanted(&self, now: Instant) -> bool {
        self.held < self.size + self.reserve && self.overdue(now)
    }

    /// Takes a free slot, if there is one.
    fn take_free(&mut self) -> bool {
        let free = self.held < self.size;
        self.held += u32::from(free);
        free
    }

    /// Hands a slot to the client that has waited longest: `Some` (its waker, if it has
    /// polled yet) when there was one. The caller accounts for the slot.
    fn next_waiter(&mut self) -> Option<Option<Waker>> {
        let w = self.waiters.pop_front()?;
        let mut state = w.lock();
        let waker = match &mut *state {
            Wait::Queued(waker) => waker.take(),
            // Only queued waiters are in the list.
            _ => None,
        };
        *state = Wait::Granted;
        Some(waker)
    }
}

/// One client waiting for a slot.
#[derive(Debug)]
struct Waiter {
    since: Instant,
    deadline: Instant,
    state: Mutex<Wait>,
}

impl Waiter {
    fn lock(&self) -> MutexGuard<'_, Wait> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
enum Wait {
    /// In the pool's queue, with the waker to call.
    Queued(Option<Waker>),
    /// Handed a slot (out of the queue).
    Granted,
    /// Its deadline passed (out of the queue).
    TimedOut,
    /// `KILL` of its database (out of the queue).
    Killed,
}

/// Why [`Pool::slot`] gave no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// No slot of the pool became free within the time allowed.
    TimedOut,
    /// The client's database was killed on the admin console while it waited.
    Killed,
}

/// The right to use one of a pool's server connections; given up when dropped.
#[derive(Debug)]
pub struct Slot {
    pool: Arc<Pool>,
    /// The connection [`Slot::put_back`] returns with the slot.
    back: Option<Box<ServerConn>>,
}

impl Slot {
    fn new(pool: &Arc<Pool>) -> Slot {
        Slot { pool: pool.clone(), back: None }
    }

    /// The pool it is a slot of.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Returns a clean connection to the pool, then gives the slot up (to the client that
    /// has waited longest, if any), under one lock of the pool.
    pub fn put_back(mut self, conn: Box<ServerConn>) {
        self.back = Some(conn);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.release(self.back.take());
    }
}

/// [`Pool::slot`]'s wait.
struct WaitSlot<'a> {
    pool: &'a Arc<Pool>,
    waiter: Arc<Waiter>,
    done: bool,
}

impl Future for WaitSlot<'_> {
    type Output = Result<Slot, NoSlot>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = match &mut *self.waiter.lock() {
            Wait::Queued(waker) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            Wait::Granted => Ok(Slot::new(self.pool)),
            Wait::TimedOut => Err(NoSlot::TimedOut),
            Wait::Killed => Err(NoSlot::Killed),
        };
        self.done = true;
        Poll::Ready(out)
    }
}

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut s = self.pool.lock();
        let granted = matches!(*self.waiter.lock(), Wait::Granted);
        if granted {
            // Handed a slot it will not use: the next client's.
            drop(s);
            self.pool.release(None);
        } else if let Some(i) = s.waiters.iter().position(|w| Arc::ptr_eq(w, &self.waiter)) {
            s.waiters.remove(i);
        }
    }
}

/// Times out a pool's waiting clients ([`Pool::slot`]): sleeps until the earliest deadline
/// among them, or until a client starts waiting with an earlier one. Ends with the pool.
async fn watchdog(pool: Weak<Pool>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let Some(next) = pool.upgrade().map(|p| p.expire(Instant::now())) else { return };
        // A notification sent since `expire` looked is kept for `notified`.
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// What a [`Cap`] counts: the connections of a database or of a user, on one server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CapKey {
    Database(String, PoolTarget),
    User(String, PoolTarget),
}

/// `max_db_connections` or `max_user_connections` of one database or user on one server:
/// how many pooled connections under it are open (or being opened), and the cap.
#[derive(Debug)]
pub struct Cap {
    key: CapKey,
    /// (open, the cap; 0: none). Counted with no cap too, so that one set by a reload starts
    /// from the truth. Locked only when a connection opens or closes.
    count: Mutex<(u32, u32)>,
    /// Woken when a connection under it closes or the cap is raised.
    freed: tokio::sync::Notify,
}

impl Cap {
    fn new(key: CapKey, max: u32) -> Cap {
        Cap { key, count: Mutex::new((0, max)), freed: tokio::sync::Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, (u32, u32)> {
        self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn give_back(&self) {
        let mut c = self.lock();
        c.0 = c.0.saturating_sub(1);
        drop(c);
        self.freed.notify_waiters();
    }

    fn set_max(&self, max: u32) {
        let mut c = self.lock();
        let raised = c.1 != 0 && (max == 0 || max > c.1);
        c.1 = max;
        drop(c);
        if raised {
            self.freed.notify_waiters();
        }
    }

    /// (connections open under it, the cap; 0: none).
    pub fn counts(&self) -> (u32, u32) {
        *self.lock()
    }

    /// The cap, for an error message: `max_db_connections (5) of database "app" on the
    /// primary`.
    pub fn describe(&self) -> String {
        let (setting, what, name, target) = match &self.key {
            CapKey::Database(d, t) => ("max_db_connections", "database", d, t),
            CapKey::User(u, t) => ("max_user_connections", "user", u, t),
        };
        let on = match target {
            PoolTarget::Primary => "the primary".to_string(),
            PoolTarget::Replica(r) => format!("the replica {r}"),
        };
        format!("{setting} ({}) of {what} {name:?} on {on}", self.counts().1)
    }
}

/// A server connection's place under its pool's caps ([`Pool::permit`]), given back when the
/// connection closes (is dropped).
#[derive(Debug, Default)]
pub struct Permit {
    caps: Vec<Arc<Cap>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        for c in &self.caps {
            c.give_back();
        }
    }
}

/// The pools told to close connections coming back while a client waits in
/// [`Pool::permit`]; told to stop when it stops waiting.
struct Squeezed(Vec<Arc<Pool>>);

impl Drop for Squeezed {
    fn drop(&mut self) {
        for p in &self.0 {
            let mut s = p.lock();
            s.squeeze = s.squeeze.saturating_sub(1);
        }
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
    /// Its number in the order the process opened connections ([`ServerConn::opened_before`]).
    serial: u32,
    /// Whether it is to be closed when its client is done with it (`RECONNECT`, `KILL`,
    /// `server_lifetime`); set by [`Pool::servers`].
    pub close_needed: bool,
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
            serial: conn.serial(),
            close_needed: false,
        }
    }
}

/// A server connection's `SHOW SERVERS` row while it is attached to a client (kept by the
/// connection, listed by its pool).
#[derive(Debug)]
pub struct Live {
    row: ServerRow,
}

/// Every pool, created on first use, and the caps over them.
#[derive(Debug, Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    caps: Mutex<HashMap<CapKey, Arc<Cap>>>,
}

/// What a new pool is made with, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// `pool_size`.
    pub pool: u32,
    /// `max_db_connections`.
    pub db: u32,
    /// `max_user_connections`.
    pub user: u32,
    /// `reserve_pool_size`.
    pub reserve: u32,
    /// `reserve_pool_timeout`.
    pub reserve_timeout: Duration,
}

impl Sizes {
    /// The sizes `cfg` sets for the pools of `database` and `user` (see
    /// [`crate::config::DatabaseSettings`]).
    pub fn of(cfg: &crate::config::ProxyConfig, database: &str, user: &str) -> Sizes {
        Sizes {
            pool: cfg.pool_size_for(database, user),
            db: cfg.max_db_connections_for(database),
            user: cfg.max_user_connections_for(user),
            reserve: cfg.reserve_pool_size_for(database),
            reserve_timeout: cfg.reserve_pool_timeout,
        }
    }
}

impl Pools {
    /// The pool for `key`, created with `sizes` if new.
    pub fn get(&self, key: PoolKey, sizes: Sizes) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = pools.get(&key) {
            return p.clone();
        }
        let mut pool = Pool::new(key.clone(), sizes.pool);
        let s = pool.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        (s.reserve, s.reserve_timeout) = (sizes.reserve, sizes.reserve_timeout);
        let mut caps = self.caps.lock().unwrap_or_else(PoisonError::into_inner);
        for (k, max) in [
            (CapKey::Database(key.database.clone(), key.target.clone()), sizes.db),
            (CapKey::User(key.user.clone(), key.target.clone()), sizes.user),
        ] {
            pool.caps.push(caps.entry(k.clone()).or_insert_with(|| Arc::new(Cap::new(k, max))).clone());
        }
        drop(caps);
        pools.entry(key).or_insert(Arc::new(pool)).clone()
    }

    /// Applies reloaded sizes to every pool and cap: `sizes(database, user)`; a database's
    /// cap is its `db` (for any user), a user's its `user` (for any database).
    pub fn resize(&self, sizes: impl Fn(&str, &str) -> Sizes) {
        for p in self.all() {
            p.resize(sizes(&p.key.database, &p.key.user));
        }
        for c in self.caps.lock().unwrap_or_else(PoisonError::into_inner).values() {
            c.set_max(match &c.key {
                CapKey::Database(d, _) => sizes(d, "").db,
                CapKey::User(u, _) => sizes("", u).user,
            });
        }
    }

    /// The pools under `cap`.
    fn under(&self, cap: &Arc<Cap>) -> Vec<Arc<Pool>> {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools.values().filter(|p| p.caps.iter().any(|c| Arc::ptr_eq(c, cap))).cloned().collect()
    }

    /// Closes one idle connection under `cap` (of the pool with the most idle ones); whether
    /// there was one.
    fn close_idle_under(&self, cap: &Arc<Cap>) -> bool {
        let mut pools = self.under(cap);
        pools.sort_by_key(|p| std::cmp::Reverse(p.counts().1));
        pools.iter().any(|p| p.close_one_idle())
    }

    /// The pooled connections of `database` open (or being opened), over its servers.
    pub fn database_connections(&self, database: &str) -> u32 {
        let caps = self.caps.lock().unwrap_or_else(PoisonError::into_inner);
        caps.values().filter(|c| matches!(&c.key, CapKey::Database(d, _) if d == database)).map(|c| c.counts().0).sum()
    }

    /// The pool for `key`, if it exists.
    pub fn existing(&self, key: &PoolKey) -> Option<Arc<Pool>> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    }

    /// Server connections in use in the pool `key` (0 when it does not exist yet).
    pub fn in_use(&self, key: &PoolKey) -> usize {
        self.existing(key).map_or(0, |p| p.counts().0)
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

    /// The pools of `database` (every pool for `None`), as [`Pools::all`].
    pub fn of_database(&self, database: Option<&str>) -> Vec<Arc<Pool>> {
        let mut v = self.all();
        v.retain(|p| database.is_none_or(|d| p.key.database == d));
        v
    }

    /// Server connections attached to clients, over the pools of `database` (every pool for
    /// `None`).
    pub fn busy(&self, database: Option<&str>) -> usize {
        self.of_database(database).iter().map(|p| p.counts().0).sum()
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

    fn pool(size: u32) -> Arc<Pool> {
        Arc::new(Pool::new(PoolKey { database: "db".into(), user: "app".into(), target: PoolTarget::Primary }, size))
    }

    type Waiting<'a> = Pin<Box<dyn Future<Output = Result<Slot, NoSlot>> + 'a>>;

    fn wait(pool: &Arc<Pool>) -> Waiting<'_> {
        Box::pin(pool.slot(Instant::now(), Duration::from_secs(60)))
    }

    /// Polls once: the slot if it was handed over.
    fn poll(f: &mut Waiting<'_>) -> Option<Slot> {
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => Some(r.expect("no timeout here")),
            Poll::Pending => None,
        }
    }

    /// The only slot of `p` taken, and `N` clients queued for it, in order.
    fn one_held<const N: usize>(p: &Arc<Pool>) -> (Slot, [Waiting<'_>; N]) {
        let a = p.try_slot().expect("a free slot");
        let mut w: [Waiting<'_>; N] = std::array::from_fn(|_| wait(p));
        for f in &mut w {
            assert!(poll(f).is_none());
        }
        (a, w)
    }

    #[tokio::test]
    async fn waiting_clients_get_slots_in_order_and_newcomers_do_not_jump_the_queue() {
        let p = pool(1);
        let (a, [mut w1, mut w2, mut w3]) = one_held(&p);
        assert_eq!(p.waiters().0, 3);
        drop(a);
        assert!(p.try_slot().is_none(), "the slot given up went to the first waiter, not to a newcomer");
        assert!(poll(&mut w3).is_none() && poll(&mut w2).is_none());
        let s1 = poll(&mut w1).expect("the longest waiter got it");
        assert_eq!(p.waiters().0, 2);
        assert_eq!(p.counts().0, 1, "one slot held all along");
        drop(s1);
        assert!(poll(&mut w3).is_none());
        let s2 = poll(&mut w2).expect("then the second");
        drop(s2);
        let s3 = poll(&mut w3).expect("then the third");
        drop(s3);
        assert_eq!(p.counts().0, 0);
        assert_eq!(p.waiters(), (0, Duration::ZERO));
    }

    #[tokio::test]
    async fn a_client_that_stops_waiting_passes_its_slot_on() {
        let p = pool(1);
        let (a, [w1, w2, mut w3]) = one_held(&p);
        // The second leaves the queue (its client disconnected).
        drop(w2);
        assert_eq!(p.waiters().0, 2);
        drop(a);
        // The first was handed the slot but left before it looked: the third gets it.
        drop(w1);
        let s3 = poll(&mut w3).expect("the slot was passed on");
        assert_eq!(p.counts().0, 1);
        drop(s3);
        assert_eq!(p.counts().0, 0);
    }

    #[tokio::test]
    async fn a_wait_ends_with_an_error_at_its_deadline_even_behind_a_longer_one() {
        let p = pool(1);
        let (a, [mut long]) = one_held(&p);
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), p.slot(started, Duration::from_millis(50))).await;
        assert!(matches!(r, Ok(Err(NoSlot::TimedOut))), "the short wait timed out on its own: {r:?}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50), "not before its deadline: {took:?}");
        assert_eq!(p.waiters().0, 1, "the timed-out client left the queue");
        drop(a);
        assert!(poll(&mut long).is_some(), "the longer wait still gets the slot");
    }

    #[tokio::test]
    async fn resizing_hands_new_slots_to_waiters_and_retires_returned_ones() {
        let p = pool(1);
        let (a, [mut w1]) = one_held(&p);
        p.resize(sized(2));
        let b = poll(&mut w1).expect("growing served the waiter");
        assert_eq!(p.counts(), (2, 0, 2));
        p.resize(sized(1));
        let mut w2 = wait(&p);
        assert!(poll(&mut w2).is_none());
        drop(a);
        assert!(poll(&mut w2).is_none(), "a slot coming back above the new size is retired");
        assert_eq!(p.counts(), (1, 0, 1));
        drop(b);
        assert!(poll(&mut w2).is_some(), "the next one goes to the waiter");
    }

    #[tokio::test]
    async fn a_kill_ends_every_wait_and_later_clients_wait_as_usual() {
        let p = pool(1);
        let (a, [mut w1, mut w2]) = one_held(&p);
        assert_eq!(p.kill_waiters(), 2);
        for w in [&mut w1, &mut w2] {
            let r = w.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            assert!(matches!(r, Poll::Ready(Err(NoSlot::Killed))), "{r:?}");
        }
        assert_eq!(p.waiters().0, 0);
        drop((w1, w2));
        // A client that comes after the kill waits for the slot and gets it.
        let mut w3 = wait(&p);
        assert!(poll(&mut w3).is_none());
        drop(a);
        assert!(poll(&mut w3).is_some());
        assert_eq!(p.kill_waiters(), 0);
    }

    #[test]
    fn clients_with_the_same_login_share_one_server_auth() {
        let pool = Pool::new(PoolKey { database: "db".into(), user: "app".into(), target: PoolTarget::Primary }, 2);
        let auth = |password: &str| ServerAuth {
            user: "app".into(),
            password: Some(password.into()),
            scram: Some(ClientCredential::Password(password.into())),
            md5: None,
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

    fn sized(pool: u32) -> Sizes {
        Sizes { pool, db: 0, user: 0, reserve: 0, reserve_timeout: Duration::ZERO }
    }

    fn key(database: &str, user: &str) -> PoolKey {
        PoolKey { database: database.into(), user: user.into(), target: PoolTarget::Primary }
    }

    #[tokio::test]
    async fn a_database_cap_spans_its_users_pools_and_a_closed_connection_makes_room() {
        let pools = Pools::default();
        let sizes = Sizes { db: 2, ..sized(10) };
        let (a, b) = (pools.get(key("db", "a"), sizes), pools.get(key("db", "b"), sizes));
        let other = pools.get(key("other", "b"), sizes);
        let soon = || Instant::now() + Duration::from_secs(5);
        let p1 = a.permit(&pools, soon()).await.expect("room");
        let p2 = a.permit(&pools, soon()).await.expect("room");
        assert_eq!(pools.database_connections("db"), 2);
        // Another database, and another server of the same database, are not under it.
        let _o = other.permit(&pools, soon()).await.expect("another database's cap");
        let replica = pools.get(PoolKey { target: PoolTarget::Replica("n2".into()), ..key("db", "a") }, sizes);
        let _r = replica.permit(&pools, soon()).await.expect("another server's cap");
        // b's pool has slots, but the database has no room: it waits, and its wait tells
        // the pools under the cap to close connections coming back.
        let mut waiting = Box::pin(b.permit(&pools, soon()));
        assert!(futures_poll(&mut waiting).is_none());
        assert_eq!((a.lock().squeeze, b.lock().squeeze, other.lock().squeeze), (1, 1, 0));
        drop(p1);
        let p3 = waiting.await.expect("the room a closed connection left");
        assert_eq!((a.lock().squeeze, b.lock().squeeze), (0, 0), "told to stop when the wait ended");
        // Two on the primary, one on the replica.
        assert_eq!(pools.database_connections("db"), 3);
        // At its deadline the wait ends with the cap that was full, named in full.
        let err = b.permit(&pools, Instant::now() + Duration::from_millis(100)).await.expect_err("no room");
        assert_eq!(err.describe(), "max_db_connections (2) of database \"db\" on the primary");
        assert_eq!(a.lock().squeeze, 0);
        drop((p2, p3));
        assert_eq!(pools.database_connections("db"), 1);
    }

    #[tokio::test]
    async fn a_user_cap_raised_or_lifted_by_a_reload_lets_waiting_pools_open() {
        let pools = Pools::default();
        let sizes = Sizes { user: 1, ..sized(10) };
        let (x, y) = (pools.get(key("x", "app"), sizes), pools.get(key("y", "app"), sizes));
        let soon = || Instant::now() + Duration::from_secs(5);
        let _held = x.permit(&pools, soon()).await.expect("room");
        let mut waiting = Box::pin(y.permit(&pools, soon()));
        assert!(futures_poll(&mut waiting).is_none());
        pools.resize(|_, _| Sizes { user: 0, ..sizes });
        let _second = waiting.await.expect("no cap any more");
        // Counted without a cap too: a cap set again starts from the connections open.
        pools.resize(|_, _| Sizes { user: 2, ..sizes });
        let err = x.permit(&pools, Instant::now() + Duration::from_millis(100)).await.expect_err("full");
        assert_eq!(err.describe(), "max_user_connections (2) of user \"app\" on the primary");
        // A pool made outside `Pools` has no caps.
        let alone = pool(1);
        drop(alone.permit(&pools, Instant::now()).await.expect("no caps"));
    }

    /// Polls once.
    fn futures_poll<T>(f: &mut Pin<Box<impl Future<Output = T>>>) -> Option<T> {
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn reserve_slots_go_to_clients_that_waited_reserve_pool_timeout_and_retire_after() {
        let p = pool(1);
        p.resize(Sizes { reserve: 1, reserve_timeout: Duration::from_millis(50), ..sized(1) });
        let held = p.try_slot().expect("a free slot");
        let started = Instant::now();
        let w1 = p.slot(Instant::now(), Duration::from_secs(30)).await.expect("a reserve slot");
        assert!(started.elapsed() >= Duration::from_millis(50), "not before reserve_pool_timeout");
        assert_eq!(p.counts().0, 2, "one slot beyond pool_size");
        // The reserve is in use: the next client waits for a slot given back.
        let mut w2 = Box::pin(p.slot(Instant::now(), Duration::from_secs(30)));
        assert!(futures_poll(&mut w2).is_none());
        // A slot given back above pool_size goes on to a client that waited long enough...
        wait_until(|| p.lock().overdue(Instant::now())).await;
        drop(w1);
        let w2 = w2.await.expect("the reserve slot handed over");
        assert_eq!(p.counts().0, 2);
        // ...and retires when nobody did: the pool is back to pool_size.
        drop(w2);
        assert_eq!(p.counts().0, 1);
        assert!(p.try_slot().is_none(), "the retired slot is not free to newcomers");
        // With no reserve, a waiting client gets nothing before its deadline.
        p.resize(sized(1));
        let e = p.slot(Instant::now(), Duration::from_millis(150)).await.expect_err("no reserve");
        assert_eq!(e, NoSlot::TimedOut);
        drop(held);
    }

    async fn wait_until(f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "condition not met within 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
