//! One client connection: startup, SCRAM authentication, then forwarding between the client
//! and pooled server connections (the primary, or a replica for reads).
//!
//! Forwarding works on whole frames. Client frames stay in the read buffer where they arrived
//! (its first `held` bytes, checked whole by [`FrontendDecoder::frame_len`]) and are copied
//! from there to a server a unit at a time: a unit ends with a Query, FunctionCall,
//! Sync or Flush. A client without a server connection gets one for its next unit: in
//! transaction mode on the auto listener the unit's statements are classified
//! ([`crate::router`]) and a unit that only reads goes to a replica; everything else goes to
//! the primary.
//!
//! For every message sent to a server the session queues what it expects back ([`Entry`]):
//! the answer to a client message is forwarded, the answer to a message the proxy added
//! itself (a Parse before a Bind, see [`crate::prepared`]) is dropped, and a message the proxy
//! answers itself (a Parse the server already has, a Close) gets its answer when its turn
//! comes. After an error in an extended-protocol batch the server skips to the Sync, and so
//! does the queue, undoing the bookkeeping of the skipped messages.
//!
//! In transaction mode a server connection goes back to the pool when the server has
//! answered everything, no extended-protocol batch is open and the status is idle. Before a
//! primary connection on which the client wrote goes back, the proxy reads the primary's WAL
//! position (`pg_current_wal_lsn()`) for read-your-writes: the client's later reads go only to
//! replicas that have replayed it.
//!
//! Both directions are pumped at once with bounded buffers, so a server that writes while the
//! client is still sending (a large COPY, a pipelining client) cannot deadlock the session.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{AuthType, ClientTlsMode, LoadBalance, NoReplica, PoolMode, ProxyConfig, ReadYourWrites};
use crate::pool::{Cap, NoSlot, Pool, PoolKey, PoolTarget, Pools, Sizes, Slot};
use crate::prepared::{self, StmtDef};
use crate::protocol::{
    sqlstate, AuthExpect, Authentication, BackendMessage, ErrorFields, FieldDescription, Frame, FrontendDecoder,
    FrontendMessage, Limits, ProtocolVersion, Severity, StartupMessage, StartupPacket, Text, TransactionStatus,
};
use crate::router::{choose_replica, Class, Classifier, LagLimit, RouteCommand, RouteMode};
use crate::scram::{self, Binding, ClientCredential, ScramSecret, ServerExchange};
use crate::server::{ConnectError, Dial, ServerAuth, ServerConn, ServerRole, ServerTls};
use crate::stats::{ClientInfo, Gate};
use crate::tls::{Stream, Tls};
use crate::topology::{Replica, Topology};
use crate::userlist::Userlist;
use crate::userlist::{AuthCache, UserEntry};

/// Stop reading from one side while this many bytes wait to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
/// A read buffer with less room than this gets more before the next read.
const MIN_ROOM: usize = 2048;
/// Bound on the startup and authentication exchange.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on the proxy's own cleanup statements (ROLLBACK, DISCARD ALL).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a replica that could not be reached gets no reads.
const REPLICA_BAN: Duration = Duration::from_secs(5);
/// A read-your-writes floor no replica reaches: the client's last write position is unknown.
const UNKNOWN_LSN: u64 = crate::ryw::UNKNOWN;
/// Statement texts whose classification is cached.
const CLASS_CACHE_SIZE: usize = 16 * 1024;

use crate::server::CancelTarget;
use crate::tracked::{Tracked, TRACKED, UNREPORTED};

/// The server connection a client holds: (`host:port`, backend pid).
pub type ServerOf = (String, i32);

/// A client's cancel key secret, where its cancel requests go now, and a lock a forwarded
/// cancel holds (shared) until postgres has taken it, which releasing the server connection
/// takes (exclusive) first: a late cancel never reaches the next client of that connection.
/// The lock is made when the first cancel request for the client is forwarded and dropped
/// when the client's server connection is detached with none in flight: idle clients keep
/// none (64 bytes each otherwise).
///
/// Kept in the client's [`ClientInfo`], so that attaching and detaching a server connection
/// (twice per transaction) locks only the client's own slot, not a map of every client.
#[derive(Debug, Default)]
pub struct CancelSlot {
    secret: [u8; 4],
    state: Mutex<CancelState>,
}

/// Where the client's cancel requests go now, and the lock a forwarded one holds.
type CancelState = (Option<Arc<CancelTarget>>, Option<Arc<tokio::sync::RwLock<()>>>);

impl CancelSlot {
    pub fn new(secret: [u8; 4]) -> CancelSlot {
        CancelSlot { secret, state: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The server connection the client holds now.
    pub fn target(&self) -> Option<Arc<CancelTarget>> {
        self.lock().0.clone()
    }

    fn set(&self, target: Option<Arc<CancelTarget>>) {
        self.lock().0 = target;
    }

    /// Clears the target without waiting: `Ok(the target)` when done, for the server
    /// connection to take back; else `Err(the lock to wait for)` (exclusively) because a
    /// cancel request is on its way.
    fn try_detach(&self) -> Result<Option<Arc<CancelTarget>>, Arc<tokio::sync::RwLock<()>>> {
        let mut state = self.lock();
        let target = state.0.take();
        // Read guards are only taken under this lock, so a free lock stays free here.
        match &state.1 {
            Some(gate) if gate.try_write().is_err() => Err(gate.clone()),
            _ => {
                state.1 = None;
                Ok(target)
            }
        }
    }

    /// Clears the target, then waits until no cancel request forwarded to it is still on
    /// its way to postgres. The target, when there was no waiting.
    async fn detach(&self) -> Option<Arc<CancelTarget>> {
        match self.try_detach() {
            Ok(target) => target,
            Err(gate) => {
                drop(gate.write().await);
                None
            }
        }
    }
}

/// State shared by every session.
///
/// `repr(C)`, aligned to a cache line, with what every transaction reads first: the reload
/// count, the drain flag, the pause gate's count, the in-flight counter's address and the
/// kick counts share one cache line (56 bytes) instead of spreading over the struct, where
/// each was a line to fetch per transaction (docs/proxy.md, "Hot-path cost").
#[derive(Debug)]
#[repr(C, align(64))]
pub struct Shared {
    /// Bumped by every reload, so that a session re-reads `config` only when it changed.
    config_version: AtomicU64,
    /// [`Shared::draining`], read by every turn of every session's forwarding loop: an
    /// atomic load rather than the watch's lock.
    draining_now: std::sync::atomic::AtomicBool,
    /// New transactions wait here before they take a server connection: closed by the admin
    /// console's PAUSE (and reusable for a planned switchover), see [`Gate`].
    pub hold: Gate,
    /// Units past the gate that may use the primary (zero-error switchover).
    pub inflight: Arc<crate::switchover::Inflight>,
    /// Wakes sessions for a new topology (busy ones) and for the shutdown (all).
    pub kick: crate::kick::Kicker,
    /// The configuration in force; a reload replaces it ([`Shared::config`]).
    config: RwLock<Arc<ProxyConfig>>,
    /// Who may log in; a reload replaces it.
    userlist: RwLock<Arc<Userlist>>,
    /// The pools.
    pub pools: Pools,
    /// The cluster's primary and replicas.
    pub topology: watch::Receiver<Topology>,
    /// Statement classification, cached; replaced when `primary_functions` change.
    classifier: RwLock<Arc<Classifier>>,
    /// True once the proxy is shutting down: idle clients are closed between transactions.
    draining: watch::Sender<bool>,
    /// Logged-in clients by BackendKeyData pid, for `SHOW CLIENTS`.
    clients: Mutex<HashMap<i32, Arc<ClientInfo>>>,
    /// When the proxy started.
    pub started: Instant,
    /// The admin console's state (reload source, client limit, PAUSE).
    pub admin: crate::admin::AdminState,
    next_pid: AtomicI32,
    /// Replicas that failed recently, until when.
    bans: Mutex<HashMap<String, Instant>>,
    /// Replay LSNs read from replicas (`pg_last_wal_replay_lsn()`), with the newest term when
    /// they were read: fresher than the agents' reports.
    replayed: Mutex<HashMap<String, (u64, u64)>>,
    /// Round-robin position.
    next_replica: AtomicUsize,
    /// TLS to clients and servers: loaded at start ([`Shared::with_tls`]) and again by every
    /// reload ([`Shared::replace_tls`]); new connections use the newest.
    tls: RwLock<Arc<Tls>>,
    /// `auth_query` answers.
    pub auth_cache: AuthCache,
    /// Each database's volatile functions, as last read ([`crate::functions`]).
    volatile: Mutex<HashMap<String, crate::functions::Volatile>>,
    /// Databases `DISABLE`d on the admin console: new logins to them are refused.
    pub disabled: crate::stats::Databases,
    /// Notified by `KILL`, for clients held by `PAUSE` (the kick wakes the others).
    kills: tokio::sync::Notify,
    /// The other proxies of the cluster (`host:port`, from their DCS records), to pass a
    /// cancel request on to when none of this proxy's clients has its key, and when they were
    /// read ([`crate::switchover::peers_now`]).
    peers: Mutex<crate::switchover::Peers>,
    /// Where the other proxies are read from: the DCS and this proxy's own id (set by
    /// [`crate::switchover::run`]).
    pub peer_source: std::sync::OnceLock<(pgkeel_dcs::cluster::ClusterStore, String)>,
}

// The kick counts are the first 16 bytes of `Kicker`: they must end within the first line.
const _: () = assert!(std::mem::offset_of!(Shared, kick) + 16 <= 64, "keep Shared's hot fields in one cache line");

impl Shared {
    /// Shared state for a proxy.
    pub fn new(config: ProxyConfig, userlist: Userlist, topology: watch::Receiver<Topology>) -> Shared {
        let start = scram::random_bytes(2).map(|b| i32::from(u16::from_be_bytes([b[0], b[1]]))).unwrap_or(1);
        let classifier = Classifier::new(&config.primary_functions, CLASS_CACHE_SIZE);
        Shared {
            volatile: Mutex::default(),
            disabled: Default::default(),
            kills: Default::default(),
            config_version: AtomicU64::new(0),
            draining_now: Default::default(),
            hold: Gate::default(),
            inflight: Arc::default(),
            kick: Default::default(),
            config: RwLock::new(Arc::new(config)),
            userlist: RwLock::new(Arc::new(userlist)),
            pools: Pools::default(),
            topology,
            classifier: RwLock::new(Arc::new(classifier)),
            draining: watch::channel(false).0,
            clients: Mutex::new(HashMap::new()),
            started: Instant::now(),
            admin: Default::default(),
            next_pid: AtomicI32::new(start.max(1)),
            bans: Mutex::new(HashMap::new()),
            replayed: Mutex::new(HashMap::new()),
            next_replica: AtomicUsize::new(0),
            tls: RwLock::new(Arc::new(Tls::disabled())),
            auth_cache: AuthCache::default(),
            peers: Mutex::default(),
            peer_source: std::sync::OnceLock::new(),
        }
    }

    /// The other proxies' addresses, just read from the DCS by the registration loop.
    pub fn set_peers(&self, addresses: Vec<String>) {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner).addresses = addresses;
    }

    /// The other proxies' addresses, just read from the DCS for a cancel request: the next
    /// cancel requests for a short while use them as they are (see
    /// [`crate::switchover::peers_now`]).
    pub fn set_peers_for_cancel(&self, addresses: Vec<String>) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers.addresses = addresses;
        peers.reread_at = Some(Instant::now());
    }

    /// The other proxies a cancel request for none of this proxy's clients goes to, as last
    /// read.
    pub fn peers(&self) -> crate::switchover::Peers {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<ProxyConfig> {
        self.config.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The userlist in force.
    pub fn userlist(&self) -> Arc<Userlist> {
        self.userlist.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn classifier(&self) -> Arc<Classifier> {
        self.classifier.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Puts a reloaded configuration and userlist in force (the caller decided which keys may
    /// change live): new pool sizes apply to every pool, a changed `primary_functions` gets a
    /// new classifier. Clients and their server connections are kept.
    pub fn replace(&self, config: ProxyConfig, userlist: Userlist) {
        let old = self.config();
        if old.primary_functions != config.primary_functions || old.replica_functions != config.replica_functions {
            self.new_classifier(&config);
        }
        // Every pool's sizes and caps, from whichever keys changed (a pool whose sizes did
        // not is left as it is).
        self.pools.resize(|database, user| crate::pool::Sizes::of(&config, database, user));
        *self.userlist.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(userlist);
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        self.config_version.fetch_add(1, Ordering::AcqRel);
    }

    /// Puts a database's volatile functions in force (a new classifier when they changed).
    pub fn set_volatile(&self, database: &str, list: crate::functions::Volatile) {
        {
            let mut v = self.volatile.lock().unwrap_or_else(PoisonError::into_inner);
            if v.get(database) == Some(&list) {
                return;
            }
            v.insert(database.to_string(), list);
        }
        self.new_classifier(&self.config());
    }

    /// A classifier (with an empty cache) for `config`'s function lists and the volatile
    /// functions of every database: one list for all of them, so a function volatile in one
    /// database sends its calls to the primary in all (a safe mistake).
    fn new_classifier(&self, config: &ProxyConfig) {
        let functions = {
            let v = self.volatile.lock().unwrap_or_else(PoisonError::into_inner);
            let all: std::collections::BTreeSet<&(String, String)> = v.values().flatten().collect();
            crate::functions::primary_only(&config.primary_functions, &config.replica_functions, all)
        };
        let c = Classifier::new(&functions, CLASS_CACHE_SIZE);
        *self.classifier.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(c);
    }

    /// Starts the drain: idle clients are closed, the others after their transaction.
    pub fn start_draining(&self) {
        self.draining_now.store(true, Ordering::Release);
        self.draining.send_replace(true);
        self.kick.everyone();
    }

    /// `KILL`: ends every client of `database` at once (each gets `FATAL 57P01`), including
    /// those waiting for a server connection or held by `PAUSE`, and closes the server
    /// connections of its pools (the idle ones now, the others as their clients end).
    /// Returns (clients, idle server connections closed now). New logins are still let in
    /// (`DISABLE` keeps them out); the admin console's `KILL` also pauses the database first.
    pub fn kill(&self, database: &str) -> (usize, usize) {
        let mut clients = 0;
        for (c, _) in self.clients() {
            if c.pool.key.database == database {
                c.killed.store(true, Ordering::Release);
                clients += 1;
            }
        }
        let mut servers = 0;
        for p in self.pools.of_database(Some(database)) {
            servers += p.reconnect();
            p.kill_waiters();
        }
        self.kick.everyone();
        self.kills.notify_waiters();
        (clients, servers)
    }

    /// Whether the proxy is shutting down.
    pub fn draining(&self) -> bool {
        self.draining_now.load(Ordering::Acquire)
    }

    /// Turns true when the proxy starts shutting down.
    pub fn draining_rx(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// The logged-in clients, with the server connection each holds now.
    pub fn clients(&self) -> Vec<(Arc<ClientInfo>, Option<ServerOf>)> {
        let clients: Vec<Arc<ClientInfo>> =
            self.clients.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        let mut rows: Vec<_> = clients
            .into_iter()
            .map(|c| {
                let server = c.cancel.target().map(|t| (t.address.clone(), t.pid));
                (c, server)
            })
            .collect();
        rows.sort_by_key(|r| r.0.pid);
        rows
    }

    /// The same, with TLS material loaded by [`Tls::load`].
    pub fn with_tls(self, tls: Tls) -> Shared {
        self.replace_tls(tls);
        self
    }

    /// Puts freshly loaded TLS material in force (a reload: rotated certificates, changed
    /// `[tls]` keys). Connections already open keep what they negotiated.
    pub fn replace_tls(&self, tls: Tls) {
        *self.tls.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tls);
    }

    /// The TLS material in force.
    pub fn tls(&self) -> Arc<Tls> {
        self.tls.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// How the proxy connects to servers (cancel requests, other proxies).
    fn server_tls(&self) -> ServerTls {
        self.tls().towards_servers(None)
    }

    /// How the proxy opens a server connection to log in as `user` now: the configuration
    /// and the TLS in force, with `user`'s certificate (`[users.NAME] server_cert`) if it has
    /// one.
    pub fn dial(&self, user: &str) -> Dial {
        Dial::of(&self.config(), self.tls().towards_servers(Some(user)))
    }

    /// Registers a logged-in client under a fresh BackendKeyData pid (and a random secret):
    /// `info` makes its [`ClientInfo`] from them.
    fn register(&self, info: impl Fn(i32, [u8; 4]) -> ClientInfo) -> Arc<ClientInfo> {
        let mut secret = [0u8; 4];
        if let Ok(b) = scram::random_bytes(4) {
            secret.copy_from_slice(&b);
        }
        let mut map = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let pid = self.next_pid.fetch_add(1, Ordering::Relaxed).max(1);
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(pid) {
                return e.insert(Arc::new(info(pid, secret))).clone();
            }
        }
    }

    fn unregister(&self, pid: i32) {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner).remove(&pid);
    }

    /// Where a cancel request for client `pid` goes, with the shared lock to hold while
    /// forwarding it: `Err` when no client of this proxy has that key (pid and secret);
    /// `Ok(None)` for an idle client, or a server connection being released right now (its
    /// query is over).
    fn cancel_target(&self, pid: i32, secret: &[u8]) -> Result<Option<CancelTo>, NotOurs> {
        let client = self.clients.lock().unwrap_or_else(PoisonError::into_inner).get(&pid).cloned().ok_or(NotOurs)?;
        let slot = &client.cancel;
        if slot.secret.as_slice() != secret {
            return Err(NotOurs);
        }
        let mut state = slot.lock();
        let Some(target) = state.0.clone() else { return Ok(None) };
        let guard = state.1.get_or_insert_with(Default::default).clone().try_read_owned().ok();
        Ok(guard.map(|g| (target, g)))
    }

    fn ban(&self, replica: &str) {
        self.bans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(replica.to_string(), Instant::now() + REPLICA_BAN);
    }

    fn learn_replayed(&self, replica: &str, term: u64, lsn: u64) {
        let mut map = self.replayed.lock().unwrap_or_else(PoisonError::into_inner);
        let e = map.entry(replica.to_string()).or_insert((term, lsn));
        if e.0 != term || e.1 < lsn {
            *e = (term, lsn);
        }
    }
}

/// A cancel request's server connection, with the lock that keeps it attached while the
/// request is passed on.
type CancelTo = (Arc<CancelTarget>, tokio::sync::OwnedRwLockReadGuard<()>);

/// No client of this proxy has a cancel request's key.
#[derive(Debug)]
struct NotOurs;

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

/// A client message whose answer the session waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
}

impl Kind {
    /// Whether a server message with `tag` completes the answer.
    fn done_by(self, tag: u8) -> bool {
        match self {
            Kind::Parse => tag == b'1',
            Kind::Bind => tag == b'2',
            Kind::Close => tag == b'3',
            Kind::Describe => tag == b'T' || tag == b'n',
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Sync | Kind::Query | Kind::FunctionCall => tag == b'Z',
        }
    }

    /// Answered by ReadyForQuery; an error inside does not skip anything.
    fn ends_with_ready(self) -> bool {
        matches!(self, Kind::Sync | Kind::Query | Kind::FunctionCall)
    }
}

/// What comes back for one message sent (or not sent) to the server.
#[derive(Debug)]
enum Expect {
    /// The answer to a client message: forwarded.
    Client(Kind),
    /// The answer to a message the proxy added: dropped (an error is forwarded).
    Injected(Kind),
    /// The proxy's own answer to a client message, sent when its turn comes. (Boxed, as
    /// `Entry::undo`: rare, and every entry is moved through the queue.)
    Synthetic(Box<Bytes>),
    /// An error the proxy raises for a client message, sent when its turn comes; the rest of
    /// the batch is skipped as after a server error.
    SyntheticError(Box<Bytes>),
    /// The proxy's `pg_current_wal_lsn()` query: its row is read, nothing is forwarded.
    Lsn,
}

/// Bookkeeping to revert when the server skips a message (an error earlier in the batch) or
/// fails it.
#[derive(Debug)]
enum Undo {
    None,
    /// A Parse registered a client name and/or a server statement.
    Parse {
        client: Option<Bytes>,
        server: Option<String>,
    },
    /// A client Close removed a client name.
    Close {
        client: Bytes,
        def: Arc<StmtDef>,
    },
    /// The proxy closed a server statement to make room.
    Evict(Arc<StmtDef>),
}

/// One message the server owes an answer to. Kept small (16 bytes of `Expect`, a pointer):
/// every message of every transaction is pushed and popped, and the bookkeeping to revert is
/// rare (named prepared statements).
#[derive(Debug)]
pub(crate) struct Entry {
    expect: Expect,
    /// `None` for `Undo::None`.
    undo: Option<Box<Undo>>,
}

const _: () = assert!(std::mem::size_of::<Entry>() <= 24, "queue entries are moved per message: keep them small");

/// What a server owes, in order. The oldest entry is kept inline, in the session: a
/// transaction mostly owes one answer at a time (its Query's, or its unit's Sync's), and a
/// queue on the heap cost a cache line to fetch (the connection's, cold) each time one was
/// pushed and looked at. The others, of a pipeline or a batch, follow in `rest`.
#[derive(Debug)]
struct Owed {
    /// `None` only when `rest` is empty too.
    head: Option<Entry>,
    rest: VecDeque<Entry>,
}

impl Owed {
    fn front(&self) -> Option<&Entry> {
        self.head.as_ref()
    }

    fn push_back(&mut self, e: Entry) {
        if self.head.is_none() {
            self.head = Some(e);
        } else {
            self.rest.push_back(e);
        }
    }

    fn pop_front(&mut self) -> Option<Entry> {
        let e = self.head.take()?;
        self.head = self.rest.pop_front();
        Some(e)
    }

    fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.rest.len()
    }

    fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.head.iter().chain(self.rest.iter())
    }

    fn clear(&mut self) {
        self.head = None;
        self.rest.clear();
    }
}

/// The longest queue of what a server owes that an idle connection keeps for its next
/// attachment (longer: a client sent a large batch once).
const QUEUE_KEEP: usize = 64;

/// A server connection attached to a client. `repr(C)`, what every transaction touches
/// first, as [`Session`].
#[repr(C)]
struct Attached {
    /// Boxed, so that taking it from the pool and giving it back moves a pointer.
    conn: Box<ServerConn>,
    /// Its pool slot, which knows the pool it goes back to.
    slot: Slot,
    /// What the server still owes, in order.
    queue: Owed,
    /// Bytes waiting to be written to the server.
    out: BytesMut,
    /// A transaction-mode primary connection counts as in flight for a switchover.
    unit: Option<crate::switchover::Unit>,
    /// An extended-protocol batch was started and its Sync not sent yet.
    open_batch: bool,
    /// The last transaction status the server reported.
    status: TransactionStatus,
    /// A statement classified as a write was sent (read-your-writes).
    wrote: bool,
    /// The server sent an error between two of the client's transactions (a backend ending:
    /// shutdown, crash, postmaster gone): not the client's to see, and the connection is
    /// never given to anyone again. (Beside the other flags: in their padding.)
    ending: bool,
    /// The WAL position read by the proxy's LSN query, once it is answered.
    lsn: Option<u64>,
    /// With `read_your_writes = "user"`: the write whose commit was forwarded, pending in the
    /// pool's [`crate::ryw::UserFloor`] until the LSN query answers (dropped: lost).
    pending: Option<crate::ryw::Pending>,
}

// `Attached` opens `Session`: a larger one moves every hot field of the session onto other
// cache lines (a flag added after `pending` instead of beside the others cost 8 bytes).
const _: () = assert!(std::mem::size_of::<Attached>() <= 168, "keep Attached within 168 bytes");

impl Attached {
    fn new(mut conn: Box<ServerConn>, slot: Slot) -> Attached {
        slot.pool().track(&mut conn);
        let mut out = std::mem::take(&mut conn.spare_out);
        if out.capacity() == 0 {
            out.reserve(8192);
        }
        let queue = Owed { head: None, rest: std::mem::take(&mut conn.spare_queue) };
        Attached {
            conn,
            slot,
            queue,
            open_batch: false,
            status: TransactionStatus::Idle,
            out,
            wrote: false,
            lsn: None,
            unit: None,
            pending: None,
            ending: false,
        }
    }

    /// Whether the server has answered everything and no transaction is open.
    fn clean(&self) -> bool {
        self.queue.is_empty() && !self.open_batch && self.status == TransactionStatus::Idle && self.out.is_empty()
    }

    /// Whether the proxy's LSN query is in flight (it is sent on a clean connection, and no
    /// client message follows it until it is answered, so it is the only entry).
    fn fetching_lsn(&self) -> bool {
        matches!(self.queue.front().map(|e| &e.expect), Some(Expect::Lsn))
    }

    /// A primary connection of a term older than `newest`: nothing more may be written to it.
    fn fenced(&self, newest: u64) -> bool {
        self.conn.role == ServerRole::Primary && self.conn.term < newest
    }

    fn push(&mut self, expect: Expect, undo: Undo) {
        let undo = match undo {
            Undo::None => None,
            undo => Some(Box::new(undo)),
        };
        self.queue.push_back(Entry { expect, undo });
    }

    /// [`Attached::push`] with nothing to revert (most messages).
    fn push_plain(&mut self, expect: Expect) {
        self.queue.push_back(Entry { expect, undo: None });
    }

    /// Back to its pool (the caller checked it is clean), with its (empty) write buffer and
    /// queue, which the next attachment reuses.
    fn into_pool(mut self) {
        self.out.clear();
        self.conn.spare_out = std::mem::take(&mut self.out);
        // The queue is empty (the connection is clean); one that grew large (a long pipeline
        // once) is not kept. Swapped: the connection's spare is the unallocated queue
        // `Attached::new` left there, which an assignment would drop first.
        if self.queue.rest.capacity() <= QUEUE_KEEP {
            std::mem::swap(&mut self.conn.spare_queue, &mut self.queue.rest);
        }
        self.slot.put_back(self.conn);
    }
}

/// Reverts the bookkeeping of messages the server skipped or failed, newest first.
fn undo_all(entries: Vec<Entry>, att: &mut Attached, statements: &mut HashMap<Bytes, Arc<StmtDef>>) {
    for e in entries.into_iter().rev() {
        let Some(undo) = e.undo else { continue };
        match *undo {
            Undo::None => {}
            Undo::Parse { client, server } => {
                if let Some(name) = server {
                    att.conn.statements.remove(&name);
                }
                if let Some(k) = client {
                    statements.remove(&k);
                }
            }
            Undo::Close { client, def } => {
                statements.entry(client).or_insert(def);
            }
            Undo::Evict(def) => {
                if att.conn.statements.get(&def.server_name).is_none() {
                    att.conn.statements.insert(def);
                }
            }
        }
    }
}

/// After an error in an extended-protocol batch (the failed entry already taken off):
/// drops what the server skips, up to the batch's Sync. `true` when the Sync has not been
/// sent yet, so the client's messages must be dropped until it comes.
fn skip_batch(failed: Entry, att: &mut Attached, statements: &mut HashMap<Bytes, Arc<StmtDef>>) -> bool {
    let mut skipped = vec![failed];
    let mut sync_queued = false;
    while let Some(e) = att.queue.front() {
        if matches!(e.expect, Expect::Client(k) if k.ends_with_ready()) || matches!(e.expect, Expect::Lsn) {
            sync_queued = true;
            break;
        }
        if let Some(e) = att.queue.pop_front() {
            skipped.push(e);
        }
    }
    undo_all(skipped, att, statements);
    !sync_queued
}

/// A whole client frame (type byte, length, body), borrowed from where it was read.
#[derive(Clone, Copy)]
struct Msg<'a>(&'a [u8]);

impl<'a> Msg<'a> {
    /// The frame at the start of `buf`, if all of it is there. Only used on bytes whose
    /// frame lengths were checked (`held`).
    fn first(buf: &'a [u8]) -> Option<Msg<'a>> {
        let len = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?);
        buf.get(..usize::try_from(len).ok()?.checked_add(1)?).map(Msg)
    }

    fn tag(self) -> u8 {
        self.0.first().copied().unwrap_or(0)
    }

    fn body_slice(self) -> &'a [u8] {
        self.0.get(5..).unwrap_or_default()
    }

    fn as_bytes(self) -> &'a [u8] {
        self.0
    }

    fn len(self) -> usize {
        self.0.len()
    }
}

/// The classification of a Query or Parse frame's text, or of a Bind/Describe's statement.
fn query_text(frame: Msg<'_>) -> Option<&[u8]> {
    let body = frame.body_slice();
    match frame.tag() {
        b'Q' => Some(until_nul(body).unwrap_or(body)),
        b'P' => {
            let name = until_nul(body)?;
            let rest = &body[name.len() + 1..];
            Some(until_nul(rest).unwrap_or(rest))
        }
        _ => None,
    }
}

/// The C string at the start of `b` (without its NUL), if it has one. `CStr`'s search reads
/// a word at a time: this runs on every query the proxy routes.
fn until_nul(b: &[u8]) -> Option<&[u8]> {
    std::ffi::CStr::from_bytes_until_nul(b).ok().map(std::ffi::CStr::to_bytes)
}

/// The name of the statement a Parse prepares.
fn parse_name(frame: Msg<'_>) -> Option<&[u8]> {
    until_nul(frame.body_slice())
}

/// Why a route command in the extended protocol was refused.
const ROUTE_UNIT_ALONE: &str = "SET, RESET and SHOW pgkeel.route through the extended protocol must be an unnamed \
                                statement in a unit of its own (Parse, Bind, Describe, Execute, Sync); send it \
                                that way, or as a simple query";

/// The RowDescription of `SHOW pgkeel.route`.
fn route_row_description() -> BackendMessage {
    BackendMessage::RowDescription(vec![FieldDescription {
        name: Text::from_static(crate::router::ROUTE_SETTING),
        table_oid: 0,
        column_id: 0,
        type_oid: 25,
        type_size: -1,
        type_modifier: -1,
        format: 0,
    }])
}

/// "0/16B3748" → 0x16B3748.
fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Why a read that may run on a replica runs on the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnPrimary {
    /// No replica is known to have replayed the client's (or its user's) last write.
    ReadYourWrites,
    /// No replica is eligible (none streaming within `max_replica_lag`, weighted above 0 and
    /// reachable).
    NoReplica,
}

/// With `read_your_writes = "user"`: a ReadyForQuery with `status` is about to reach the
/// client. After a write outside a transaction that is its commit, after which any connection
/// of the user may read: pending in the pool's floor ([`crate::ryw`]) before it is written.
fn note_commit(att: &mut Attached, pool: Option<&Arc<Pool>>, status: TransactionStatus) {
    if att.wrote && att.pending.is_none() && status == TransactionStatus::Idle {
        att.pending = pool.map(|p| p.ryw.begin());
    }
}

/// Runs `work` (an attempt to reach `primary`) until it ends, or until the topology `topo_rx`
/// watches names another primary or none (`None` then: the attempt is dropped).
async fn until_replaced<T>(
    work: impl std::future::Future<Output = T>,
    primary: &crate::topology::Primary,
    topo_rx: &mut watch::Receiver<Topology>,
) -> Option<T> {
    let replaced = async {
        loop {
            if topo_rx.changed().await.is_err() {
                // The watch's sender is gone (the proxy is stopping): the attempt decides.
                std::future::pending::<()>().await;
            }
            if topo_rx.borrow_and_update().primary.as_ref() != Some(primary) {
                return;
            }
        }
    };
    tokio::select! {
        r = work => Some(r),
        () = replaced => None,
    }
}

/// What a client whose server connection `att` is given up loses, for the end of its error
/// message. Something it sent and was not answered yet (a COMMIT, or a statement outside a
/// transaction block) may have committed on that server, or may not: "the transaction is
/// lost, retry" would invite a second copy of a write that went through.
fn lost_work(att: Option<&Attached>) -> &'static str {
    let Some(att) = att else { return "reconnect" };
    if att.queue.iter().any(|e| matches!(e.expect, Expect::Client(_))) {
        "whether what it sent last committed there is unknown: reconnect, and check before you retry"
    } else if att.status != TransactionStatus::Idle || att.open_batch {
        "the open transaction is lost, reconnect and retry"
    } else {
        "no transaction was open, reconnect"
    }
}

/// The proxy's `pg_current_wal_lsn()` query failed on `server`. Each transaction on the
/// primary tries again while it fails (e.g. the function revoked from the role), so this is
/// logged about once a minute.
fn lsn_query_failed(server: &ServerConn) {
    static WARNED_AT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let last = WARNED_AT.load(Ordering::Relaxed);
    if (last == 0 || now >= last + 60)
        && WARNED_AT.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        tracing::warn!(?server, "pg_current_wal_lsn() failed: the client's reads (with read_your_writes = \"user\", its user's) go to the primary until it works; can its role execute the function?");
    }
}

/// The LSN in the first column of a row (the proxy's `pg_current_wal_lsn()` query).
fn row_lsn(values: &[Option<Bytes>]) -> Option<u64> {
    values.first()?.as_deref().and_then(|b| std::str::from_utf8(b).ok()).and_then(parse_lsn)
}

/// Runs one client connection to its end.
///
/// `admitted`: a `max_client_conn` slot, `None` when none was free (the client is refused
/// after its startup packet); `live` counts running sessions for a graceful shutdown.
///
/// The session is built before the future and moved into it as the one capture it uses in
/// place: the arguments of an async fn (or a capture rebound with `let`) would stay in the
/// future next to the session built from them, in every idle client.
pub fn run(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    admitted: Option<crate::stats::Admitted>,
    live: Arc<()>,
    mode: RouteMode,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let stream = Stream::Plain(stream);
    let mut s = Session {
        // The version first: a reload between the two reads then leaves an older version
        // with the newer configuration (read again at the first turn), never the reverse,
        // which would keep the older configuration until the next reload.
        cfg_version: shared.config_version.load(Ordering::Acquire),
        cfg: shared.config(),
        newest_term: 0,
        multi: false,
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
        desired: Tracked::default(),
        told: Tracked::default(),
        attached: None,
        mode,
        listener_mode: mode,
        held: 0,
        skip_to_sync: false,
        pool_mode: PoolMode::Transaction,
        statements: HashMap::new(),
        unnamed_class: Class::Write,
        ryw_floor: 0,
        info: None,
        slots: (admitted, live),
    };
    if let Stream::Plain(tcp) = &s.stream {
        crate::tls::tune(tcp, &s.cfg.tcp);
    }
    async move {
        // The forwarding is awaited here rather than inside `serve`: one async state machine
        // less between the task and the session's wait, whose states each transaction's two
        // polls read (each a cache line to fetch, docs/proxy.md, "Hot-path cost"). Only a
        // flag crosses that await: a result held across it would be part of every session's
        // future.
        let forward = match Box::pin(s.serve(s.slots.0.is_some())).await {
            Ok(forward) => forward,
            Err(fail) => {
                s.closing(&fail);
                false
            }
        };
        if forward {
            if let Err(fail) = s.forward().await {
                s.closing(&fail);
            }
        }
        s.finish().await;
    }
}

/// `repr(C)`, with what a transaction touches first and what only logins, routing commands,
/// prepared statements and `SHOW CLIENTS` touch last: the default layout, ordered by
/// alignment, spread the hot fields over more cache lines (docs/proxy.md, "Hot-path cost").
#[repr(C)]
struct Session {
    /// Not boxed: an idle client keeps its ~140 bytes (~0.3 MB for 2,000 idle clients), where
    /// a box cost a `malloc` and a `free` per transaction (~150 instructions of ~7,400).
    attached: Option<Attached>,
    rbuf: BytesMut,
    /// Bytes waiting to be written to the client.
    wbuf: BytesMut,
    stream: Stream,
    shared: Arc<Shared>,
    /// The configuration in force as of this turn of the forwarding loop (see
    /// [`Session::refresh`]): the hot path reads it many times per transaction.
    cfg: Arc<ProxyConfig>,
    cfg_version: u64,
    /// The newest term seen, as of [`Session::refresh`]: taken from the watch only when it
    /// changed, not under its lock on every check.
    newest_term: u64,
    /// The client's primary pool.
    pool: Option<Arc<Pool>>,
    /// Shared with the pool's other clients when it is the same ([`Pool::share_auth`]): it is
    /// large, and an idle client should cost little.
    server_auth: Option<Arc<ServerAuth>>,
    /// Tracked settings the client asked for (startup packet, then its own SETs), by
    /// canonical name.
    desired: Tracked,
    /// What `SHOW CLIENTS` shows about this client, once it is logged in.
    info: Option<Arc<ClientInfo>>,
    /// Client frames read and not yet handed to a server: the first `held` bytes of `rbuf`,
    /// whole frames whose lengths were checked (see [`Session::held_frames`]). Kept in place,
    /// a frame costs no split of the buffer, no queue entry and no reference count.
    held: usize,
    decoder: FrontendDecoder,
    /// The cluster has more than one member (reads can go to replicas), as of this turn.
    multi: bool,
    /// How the client's units are routed now (`SET pgkeel.route`).
    mode: RouteMode,
    /// Drop client messages until the next Sync (after an error in an extended batch).
    skip_to_sync: bool,
    /// The pool mode of the client's pools (`pool_mode`, or its database's or user's), set at
    /// login.
    pool_mode: PoolMode,
    /// The class of the last unnamed statement parsed.
    unnamed_class: Class,
    // Touched off the common transaction's path.
    peer: SocketAddr,
    user: String,
    database: String,
    /// The ParameterStatus values the client was told, of the tracked settings.
    told: Tracked,
    /// The client's named prepared statements, by the client's name (transaction mode).
    statements: HashMap<Bytes, Arc<StmtDef>>,
    /// Read-your-writes: the primary's WAL position after the client's last write.
    ryw_floor: u64,
    /// The client's `max_client_conn` slot and the count of live sessions, released when
    /// the session ends (see [`run`]).
    slots: (Option<crate::stats::Admitted>, Arc<()>),
    /// The listener's routing (`RESET pgkeel.route`).
    listener_mode: RouteMode,
}

/// What the TLS handshake with a client told about it (nothing without TLS).
#[derive(Default)]
struct ClientTls {
    /// The channel binding data of the certificate the client got ([`Tls::endpoint`]).
    endpoint: Option<Arc<[u8]>>,
    /// The common name of the certificate the client presented, or why it cannot be read;
    /// `None` when it presented none.
    cert: Option<Result<String, &'static str>>,
}

/// What [`Session::route_now`] found.
enum Now {
    Attached(Attached),
    /// Only a free slot in the client's pool is missing: wait for one
    /// ([`Session::attach_queued`]).
    Queue,
    /// Take the full path ([`Session::route`]), with the pool slot already held, if any: a
    /// client that waited for it keeps its turn.
    Slow(Option<(Slot, Instant)>),
}

enum Event {
    ClientRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    ServerRead(std::io::Result<usize>),
    ServerWrote(std::io::Result<usize>),
    Topology,
}

/// What woke a quiet client ([`Session::poll_quiet`]).
enum Quiet {
    /// The idle client sent something, now in its read buffer.
    Read,
    /// The client sent more while its quick transaction runs (not read yet).
    More,
    /// The client is gone.
    Left,
    /// The server of the quick transaction: bytes read into its buffer, or the end.
    Server(std::io::Result<usize>),
    /// A kick: the topology changed, or the proxy shuts down.
    Kick,
}

/// How a quick transaction started ([`Session::quick_start`]).
enum Start {
    /// Its unit is sent: the server's answer is awaited in [`Session::poll_quiet`].
    Sent,
    /// Every slot of the client's pool is in use: wait for one ([`Session::attach_queued`]),
    /// then send the unit ([`Session::quick_send`]).
    Queue,
    /// The forwarding loop ([`Session::busy`]) takes over from here.
    Loop,
}

/// A quick transaction's unit ([`Session::quick_unit`]): its length, its Execute count and
/// what ends it.
type QuickUnit = (usize, u64, Kind);

/// Where a quick transaction is after a server read ([`Session::quick_answer`]).
enum Answer {
    /// Done: the connection is released and the client idle.
    Idle,
    /// More of the answer is to come.
    Wait,
    /// The forwarding loop carries on from here.
    Loop,
}

/// How [`Session::pump_client`] stopped.
enum Pumped {
    /// Every held frame it could hand on is handed on.
    Done,
    /// The server's buffer reached the high-water mark with frames still held.
    Full,
    /// The client said goodbye (Terminate).
    Terminate,
}

/// What to do with the next held client frame.
enum Step {
    /// Hand it to the attached server.
    Dispatch(Option<Class>),
    /// Wait for the server (or more client bytes).
    Wait,
    /// Release the attached server connection first, then route again.
    Reroute,
}

impl Session {
    /// The session ends with `fail`: logged, and told to the client (sent by
    /// [`Session::finish`]).
    fn closing(&mut self, fail: &Fail) {
        tracing::info!(client = %self.peer, user = %self.user, database = %self.database, error = %fail.message, "closing client connection");
        fail.encode(&mut self.wbuf);
    }

    /// Whether `KILL` on the admin console ended the clients of this one's database.
    fn killed(&self) -> bool {
        self.info.as_ref().is_some_and(|i| i.killed.load(Ordering::Acquire))
    }

    /// Why the session must end now, if it must: `KILL`, or `client_idle_timeout` while it is
    /// still idle (a client that started a transaction since is kept, and the mark cleared).
    fn must_close(&self) -> Option<Fail> {
        let info = self.info.as_ref()?;
        if info.killed.load(Ordering::Acquire) {
            return Some(self.kill_fail());
        }
        if info.idle_expired.load(Ordering::Acquire) {
            if self.attached.is_none() && self.rbuf.is_empty() && self.held == 0 {
                let after = self.cfg.client_idle_timeout.map(pgkeel_config::format_duration).unwrap_or_default();
                return Some(Fail::new(
                    sqlstate::IDLE_SESSION_TIMEOUT,
                    format!("terminating connection: the client was idle longer than client_idle_timeout ({after})"),
                ));
            }
            info.idle_expired.store(false, Ordering::Relaxed);
        }
        None
    }

    /// The client sent something ([`Session::must_close`]): one store when a check cleared
    /// the mark, none otherwise.
    fn mark_active(&self) {
        if let Some(i) = &self.info {
            if !i.active.load(Ordering::Relaxed) {
                i.active.store(true, Ordering::Relaxed);
            }
        }
    }

    /// What a killed client ([`Session::killed`]) is told.
    fn kill_fail(&self) -> Fail {
        Fail::new(
            sqlstate::ADMIN_SHUTDOWN,
            format!("terminating connection: KILL {} on the proxy's admin console", self.database),
        )
    }

    /// Everything before the forwarding: the login, then either the admin console (served
    /// here) or the welcome. `Ok(true)`: forward the client's traffic ([`Session::forward`]).
    /// Awaited boxed ([`run`]): a spawned future is as large as its largest state, and each
    /// idle client would otherwise keep room for the TLS handshake, SCRAM, their timers and a
    /// server login (docs/benchmarks.md, "Proxy").
    async fn serve(&mut self, admitted: bool) -> Result<bool, Fail> {
        if !self.login(admitted).await? {
            return Ok(false);
        }
        if self.shared.disabled.contains(&self.database) {
            return Err(Fail::new(
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "database {:?} is not currently accepting connections through the proxy: it was disabled \
                     with DISABLE on the admin console (ENABLE {} there lets clients in again)",
                    self.database, self.database
                ),
            ));
        }
        if self.database == crate::admin::ADMIN_DATABASE {
            return crate::admin::serve(
                &self.shared,
                &mut self.stream,
                &mut self.rbuf,
                &mut self.wbuf,
                &self.user,
                self.peer,
            )
            .await
            .map(|()| false)
            .map_err(|(sqlstate, message)| Fail::new(sqlstate, message));
        }
        self.welcome().await?;
        Ok(true)
    }

    /// The startup packet and the client's authentication, each within [`LOGIN_TIMEOUT`].
    /// `false`: the connection was a cancel request, served.
    async fn login(&mut self, admitted: bool) -> Result<bool, Fail> {
        let startup = match tokio::time::timeout(LOGIN_TIMEOUT, self.startup()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, "the client did not finish its startup in 15s"))
            }
        };
        let Some((startup, client_tls)) = startup else { return Ok(false) };
        if !admitted {
            return Err(Fail::new(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "too many client connections to the proxy (max_client_conn = {})",
                    self.shared.config().max_client_conn
                ),
            ));
        }
        match tokio::time::timeout(LOGIN_TIMEOUT, self.authenticate(&startup, client_tls)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Fail::new(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    "the client did not finish authentication in 15s",
                ))
            }
        }
        Ok(true)
    }

    /// Reads the startup packet, answering SSLRequest and GSSENCRequest with 'N' and serving
    /// a CancelRequest. `None` when the connection was a cancel request; else the startup
    /// packet and what the TLS handshake, if any, told ([`ClientTls`]).
    async fn startup(&mut self) -> Result<Option<(StartupMessage, ClientTls)>, Fail> {
        let limits = Limits::default();
        let mut client_tls = ClientTls::default();
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
                    let ssl = matches!(packet, StartupPacket::SslRequest);
                    if !self.rbuf.is_empty() {
                        return Err(Fail::new(
                            sqlstate::PROTOCOL_VIOLATION,
                            format!(
                                "the client sent data after {} before reading the answer",
                                if ssl { "SSLRequest" } else { "GSSENCRequest" }
                            ),
                        ));
                    }
                    if self.stream.is_tls() {
                        return Err(Fail::new(
                            sqlstate::PROTOCOL_VIOLATION,
                            "encryption request on a connection that is already encrypted",
                        ));
                    }
                    // The acceptor and its certificate's binding data from one snapshot: a
                    // reload in between must not pair them wrong.
                    let tls = self.shared.tls();
                    let acceptor = if ssl { tls.acceptor.clone() } else { None };
                    let Some(acceptor) = acceptor else {
                        if self.stream.send(b"N").await.is_err() {
                            return Ok(None);
                        }
                        continue;
                    };
                    if self.stream.send(b"S").await.is_err() {
                        return Ok(None);
                    }
                    let Some(tcp) = self.stream.take_plain() else { return Ok(None) };
                    match acceptor.accept(tcp).await {
                        Ok(conn) => {
                            // Signed by a CA of `client_ca`, or the handshake would have failed.
                            let cert = conn.get_ref().1.peer_certificates().and_then(|c| c.first());
                            client_tls = ClientTls {
                                endpoint: tls.endpoint.clone(),
                                cert: cert.map(|c| crate::tls::subject_common_name(c)),
                            };
                            self.stream = Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(conn)));
                        }
                        Err(e) => {
                            // Nothing can be said to the client: the channel is neither
                            // plaintext nor TLS any more.
                            tracing::info!(client = %self.peer, error = %e, "TLS handshake with a client failed");
                            return Ok(None);
                        }
                    }
                }
                StartupPacket::CancelRequest(ref c) | StartupPacket::ForwardedCancel(ref c) => {
                    match self.shared.cancel_target(c.pid, &c.secret_key) {
                        Ok(Some((t, _in_flight))) => {
                            let passed_on = matches!(packet, StartupPacket::ForwardedCancel(_));
                            tracing::info!(client_pid = c.pid, server = %t.address, server_pid = t.pid, passed_on, tls = self.stream.is_tls(), "forwarding a cancel request");
                            if let Err(e) = crate::server::send_cancel(&t, &self.shared.server_tls()).await {
                                tracing::warn!(server = %t.address, error = %e, "cannot forward a cancel request");
                            }
                        }
                        Ok(None) => {}
                        // Perhaps a client of another proxy (behind one load balancer, a
                        // cancel's new connection may reach any of them): passed on to each,
                        // once; a passed-on request is never passed on again.
                        // The other proxies are read from the DCS again (unless another such
                        // request did in the last 200 ms), so one started since the last
                        // registration round (every ttl / 4) gets it too.
                        Err(NotOurs) if matches!(packet, StartupPacket::CancelRequest(_)) => {
                            let (shared, c) = (self.shared.clone(), c.clone());
                            tokio::spawn(async move {
                                let tls = shared.server_tls();
                                for peer in crate::switchover::peers_now(&shared).await {
                                    let (c, tls) = (c.clone(), tls.clone());
                                    tokio::spawn(async move {
                                        if let Err(e) = crate::server::pass_cancel_on(&peer, &c, &tls).await {
                                            tracing::info!(proxy = %peer, error = %e, "cannot pass a cancel request on to another proxy");
                                        }
                                    });
                                }
                            });
                        }
                        Err(NotOurs) => tracing::debug!(
                            client_pid = c.pid,
                            "a cancel request passed on by another proxy is not for a client here"
                        ),
                    }
                    return Ok(None);
                }
                StartupPacket::Startup(_) if self.shared.tls().client_mode.requires_tls() && !self.stream.is_tls() => {
                    return Err(Fail::new(
                        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                        format!(
                            "the proxy requires TLS (client_tls = \"{}\"): connect with sslmode=require or \
                             sslmode=verify-full",
                            self.shared.tls().client_mode.as_str()
                        ),
                    ));
                }
                StartupPacket::Startup(m) => return Ok(Some((m, client_tls))),
            }
        }
    }

    /// The client's certificate, where `client_tls` or `auth_type = "cert"` asks for one: it
    /// must have presented one (signed by `client_ca`, which the handshake checked), and with
    /// `verify-full` or `cert` its common name must be the user name. The messages are
    /// postgres' where it has one.
    fn check_certificate(&self, cert: Option<&Result<String, &'static str>>) -> Result<(), Fail> {
        let mode = self.shared.tls().client_mode;
        let cert_auth = self.shared.config().auth_type == AuthType::Cert;
        if !mode.verifies_client() && !cert_auth {
            return Ok(());
        }
        let fail = |message: String| Err(Fail::new(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, message));
        let Some(cn) = cert else {
            return fail(format!(
                "connection requires a valid client certificate (client_tls = \"{}\"{}): connect with sslcert and \
                 sslkey, a certificate signed by the CA of the proxy's client_ca",
                mode.as_str(),
                if cert_auth { ", auth_type = \"cert\"" } else { "" }
            ));
        };
        if mode != ClientTlsMode::VerifyFull && !cert_auth {
            return Ok(());
        }
        let what = if cert_auth {
            "certificate authentication"
        } else {
            "certificate validation (client_tls = \"verify-full\")"
        };
        match cn {
            Ok(cn) if *cn == self.user => Ok(()),
            Ok(cn) => fail(format!(
                "{what} failed for user {:?}: the certificate's common name is {cn:?}, not the user name",
                self.user
            )),
            Err(why) => fail(format!("{what} failed for user {:?}: the certificate cannot be used: {why}", self.user)),
        }
    }

    /// Authenticates the client against the userlist (SCRAM-SHA-256 or MD5) or by its
    /// certificate (`auth_type = "cert"`), then sets up the server credentials for this user.
    async fn authenticate(&mut self, startup: &StartupMessage, client_tls: ClientTls) -> Result<(), Fail> {
        let ClientTls { endpoint, cert } = client_tls;
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
                    Some(canon) => {
                        self.desired.set(canon, v);
                    }
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

        self.check_certificate(cert.as_ref())?;

        // Unknown users go through the same exchange against a random secret, so the answer
        // does not tell whether the user exists.
        let mut entry = self.shared.userlist().get(&self.user).cloned();
        if entry.is_none() && self.database != crate::admin::ADMIN_DATABASE {
            entry = self.auth_query_lookup().await?;
        }
        if self.shared.config().auth_type == AuthType::Cert {
            // The certificate was the proof. Servers get what the userlist (or auth_query)
            // has that they can take: a plaintext password or an MD5 hash; a SCRAM secret
            // cannot log in, as no client proof gave its key here.
            BackendMessage::Authentication(Authentication::Ok).encode(&mut self.wbuf);
            let (password, md5) = match entry {
                Some(e) => (e.password.clone(), e.md5.clone().filter(|_| e.password.is_none())),
                None => (None, None),
            };
            self.logged_in(ServerAuth {
                user: self.user.clone(),
                scram: password.clone().map(ClientCredential::Password),
                password,
                md5,
            });
            return Ok(());
        }
        // MD5 where it can be checked: against an MD5 hash, and with auth_type = "md5" against
        // a plaintext password (and for unknown users, who must not be told apart).
        let md5 = self.shared.config().auth_type == AuthType::Md5;
        match &entry {
            Some(e) if e.md5.is_some() || (md5 && e.password.is_some()) => {
                return self.authenticate_md5(Some(e.clone())).await
            }
            None if md5 => return self.authenticate_md5(None).await,
            _ => {}
        }
        let secret = match &entry {
            Some(e) => e.secret.clone(),
            None => ScramSecret::from_password(
                &scram::new_nonce().unwrap_or_default(),
                &scram::random_bytes(16).unwrap_or_default(),
                scram::DEFAULT_ITERATIONS,
            ),
        };
        // SCRAM-SHA-256-PLUS first where it is offered (over TLS), as postgres lists them.
        let mechanisms = match endpoint {
            Some(_) => vec![scram::MECHANISM_PLUS.into(), scram::MECHANISM.into()],
            None => vec![scram::MECHANISM.into()],
        };
        BackendMessage::Authentication(Authentication::Sasl { mechanisms }).encode(&mut self.wbuf);
        self.flush().await?;
        let user = self.user.clone();
        let failed =
            move || Fail::new(sqlstate::INVALID_PASSWORD, format!("password authentication failed for user {user:?}"));
        self.decoder.auth = AuthExpect::SaslInitial;
        let FrontendMessage::SaslInitialResponse { mechanism, data } = self.read_client_message().await? else {
            return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, "expected SASLInitialResponse"));
        };
        let binding = match (mechanism.as_str(), &endpoint) {
            (scram::MECHANISM, None) => Binding::NotOffered,
            (scram::MECHANISM, Some(_)) => Binding::Declined,
            (scram::MECHANISM_PLUS, Some(data)) => Binding::Chosen(data.to_vec()),
            _ => {
                let offered = if endpoint.is_some() {
                    format!("{} and {}", scram::MECHANISM_PLUS, scram::MECHANISM)
                } else {
                    format!("{} (SCRAM-SHA-256-PLUS only over TLS)", scram::MECHANISM)
                };
                return Err(Fail::new(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("SASL mechanism {mechanism:?} is not offered; the proxy offers {offered}"),
                ));
            }
        };
        let first = data.unwrap_or_default();
        let mut exchange =
            ServerExchange::new(secret, binding).map_err(|e| Fail::new(sqlstate::INTERNAL_ERROR, e.to_string()))?;
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
        self.logged_in(ServerAuth {
            user: self.user.clone(),
            scram: Some(match &entry.password {
                Some(p) => ClientCredential::Password(p.clone()),
                None => ClientCredential::Keys { client_key, secret: entry.secret.clone() },
            }),
            password: entry.password.clone(),
            md5: None,
        });
        Ok(())
    }

    /// The client's pool and server login, once it is authenticated.
    fn logged_in(&mut self, auth: ServerAuth) {
        if self.database == crate::admin::ADMIN_DATABASE {
            self.server_auth = Some(Arc::new(auth));
            return;
        }
        let key = PoolKey { database: self.database.clone(), user: self.user.clone(), target: PoolTarget::Primary };
        let cfg = self.shared.config();
        self.pool_mode = cfg.pool_mode_for(&self.database, &self.user);
        let pool = self.shared.pools.get(key, Sizes::of(&cfg, &self.database, &self.user));
        self.server_auth = Some(pool.share_auth(auth));
        pool.share_settings(&mut self.desired);
        self.pool = Some(pool);
    }

    /// MD5 against `entry`'s hash (from `auth_query`), or against its plaintext password with
    /// `auth_type = "md5"`; `None`: an unknown user, refused after the same exchange. The
    /// proxy logs in to servers with the password when it has it, else with the hash.
    async fn authenticate_md5(&mut self, entry: Option<crate::userlist::UserEntry>) -> Result<(), Fail> {
        let hash = match &entry {
            Some(crate::userlist::UserEntry { md5: Some(hash), .. }) => hash.clone(),
            Some(crate::userlist::UserEntry { password: Some(p), .. }) => scram::md5_hash(&self.user, p),
            // Checked all the same, against a hash nobody knows.
            _ => scram::md5_hash(&self.user, &scram::new_nonce().unwrap_or_default()),
        };
        let random = scram::random_bytes(4).map_err(|e| Fail::new(sqlstate::INTERNAL_ERROR, e.to_string()))?;
        let salt = [random[0], random[1], random[2], random[3]];
        let request = Authentication::Md5Password { salt };
        self.decoder.auth = AuthExpect::after(&request);
        BackendMessage::Authentication(request).encode(&mut self.wbuf);
        self.flush().await?;
        let FrontendMessage::Password(answer) = self.read_client_message().await? else {
            return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, "expected a PasswordMessage"));
        };
        self.decoder.auth = AuthExpect::None;
        let right = scram::md5_verify(&hash, &salt, answer.as_bytes());
        let Some(entry) = entry.filter(|_| right) else {
            return Err(Fail::new(
                sqlstate::INVALID_PASSWORD,
                format!("password authentication failed for user {:?}", self.user),
            ));
        };
        BackendMessage::Authentication(Authentication::Ok).encode(&mut self.wbuf);
        // Without the password, a server that asks for SCRAM gets a clear error (see
        // server.rs).
        let scram = entry.password.clone().map(ClientCredential::Password);
        self.logged_in(ServerAuth {
            user: self.user.clone(),
            md5: entry.password.is_none().then_some(hash),
            password: entry.password,
            scram,
        });
        Ok(())
    }

    /// `auth_query` for a user missing from the userlist: run on the primary as `auth_user`,
    /// cached by (database, user). Errors are not cached.
    async fn auth_query_lookup(&self) -> Result<Option<crate::userlist::UserEntry>, Fail> {
        let cfg = self.shared.config();
        let Some(aq) = cfg.auth_query.clone() else { return Ok(None) };
        if let Some(hit) = self.shared.auth_cache.get(&self.database, &self.user) {
            return Ok(hit);
        }
        let userlist = self.shared.userlist();
        let Some(password) = userlist.get(&aq.user).and_then(|e| e.password.clone()) else {
            return Err(Fail::new(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!(
                    "auth_query cannot run: auth_user {:?} is not in the userlist with a plaintext password",
                    aq.user
                ),
            ));
        };
        let primary = self.shared.topology.borrow().primary.clone().ok_or_else(|| {
            Fail::new(sqlstate::CANNOT_CONNECT_NOW, "auth_query: there is no primary to look the user up on; retry")
        })?;
        let auth = ServerAuth {
            user: aq.user.clone(),
            password: Some(password.clone()),
            scram: Some(ClientCredential::Password(password)),
            md5: None,
        };
        let dial = self.shared.dial(&auth.user);
        let mut conn = match ServerConn::connect(&primary, cfg.dbname_for(&self.database), &auth, &dial).await {
            Ok(c) => c,
            Err(ConnectError::Refused(fields)) => {
                return Err(Fail {
                    sqlstate: sqlstate::CONNECTION_FAILURE,
                    message: describe(&fields),
                    fields: Some(fields),
                })
            }
            Err(e) => {
                return Err(Fail::new(
                    sqlstate::CANNOT_CONNECT_NOW,
                    format!("auth_query: cannot connect to the primary as {:?}: {e}", aq.user),
                ))
            }
        };
        let sql = aq.query.replace("$1", &quote_literal(&self.user));
        let rows = conn.simple_query(&sql).await.map_err(|e| {
            Fail::new(sqlstate::CANNOT_CONNECT_NOW, format!("auth_query failed on {}: {e}", primary.name))
        })?;
        let entry = match rows.first() {
            None => None,
            Some(row) => UserEntry::from_stored(row.get(1).and_then(|v| v.as_deref())).map_err(|e| {
                Fail::new(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    format!("auth_query returned an unusable password for {:?}: {e}", self.user),
                )
            })?,
        };
        tracing::debug!(user = %self.user, database = %self.database, found = entry.is_some(), "auth_query");
        self.shared.auth_cache.put(&self.database, &self.user, entry.clone());
        Ok(entry)
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

    /// ParameterStatus at login: the pool's login parameters (`welcome`), with the attached
    /// connection's and the client's own settings over them, in name order. Remembers what the
    /// client was told of the tracked settings: `told` (the pool's, which shares the pool's
    /// values) with any differences.
    fn tell_parameters(&mut self, welcome: &[(String, Arc<str>)], mut told: Tracked) {
        let mut params: BTreeMap<&str, &str> = welcome.iter().map(|(k, v)| (k.as_str(), &**v)).collect();
        if let Some(att) = &self.attached {
            params.extend(att.conn.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        for (k, v) in self.desired.iter().filter(|(k, _)| !UNREPORTED.contains(k)) {
            params.insert(k, v);
        }
        for (name, value) in &params {
            BackendMessage::ParameterStatus { name: Text::lossy(name), value: Text::lossy(value) }
                .encode(&mut self.wbuf);
            if let Some(canon) = Tracked::canonical(name) {
                told.set(canon, value);
            }
        }
        told.shrink_to_fit();
        self.told = told;
    }

    /// ParameterStatus, BackendKeyData and ReadyForQuery. The server parameters come from the
    /// pool's first connection (one is opened now if the pool has none yet); in session mode
    /// the client's server connection is attached here (a replica on the replica listener).
    async fn welcome(&mut self) -> Result<(), Fail> {
        let pool = self.pool.clone().ok_or_else(|| Fail::new(sqlstate::INTERNAL_ERROR, "no pool"))?;
        let session_mode = self.pool_mode == PoolMode::Session;
        if session_mode || pool.welcome().is_none() {
            self.flush().await?;
            let class = if self.mode == RouteMode::Replica { Class::Read } else { Class::Write };
            let att = self.route(class, None).await?;
            self.attached = Some(att);
        }
        match pool.welcome() {
            Some(w) => self.tell_parameters(&w.params, w.told.clone()),
            None => self.tell_parameters(&[], Tracked::default()),
        }
        let info = self.shared.register(|pid, secret| ClientInfo {
            pid,
            pool: pool.clone(),
            peer: self.peer,
            listener: self.listener_mode.as_str(),
            connected: SystemTime::now(),
            waiting: Default::default(),
            cancel: CancelSlot::new(secret),
            killed: Default::default(),
            // A client that just logged in counts as active until the next check.
            active: AtomicBool::new(true),
            idle_expired: Default::default(),
        });
        let (pid, secret) = (info.pid, info.cancel.secret);
        self.info = Some(info);
        if let Some(att) = &mut self.attached {
            let target = att.conn.lend_cancel_target();
            self.set_cancel(target);
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
        let r = self.stream.send(&self.wbuf).await;
        self.wbuf.clear();
        r.map_err(|e| Fail::new(sqlstate::CONNECTION_FAILURE, format!("write to the client: {e}")))
    }

    // --- Routing ------------------------------------------------------------------------

    /// Where the client's cancel requests go from now on (the server connection it holds).
    fn set_cancel(&self, target: Option<Arc<CancelTarget>>) {
        if let Some(info) = &self.info {
            info.cancel.set(target);
        }
    }

    /// Whether units are routed by their class: the auto mode, in transaction mode, on a
    /// cluster with more than one member (a single node has nowhere else to send reads).
    fn splitting(&self) -> bool {
        self.mode == RouteMode::Auto && self.pool_mode == PoolMode::Transaction && self.multi
    }

    /// Whether statements are classified: when [`Session::splitting`], and on the primary
    /// listener with `read_your_writes = "user"`, where a write raises the floor the same
    /// user's reads through the auto listener respect.
    fn classifying(&self) -> bool {
        self.splitting()
            || (self.mode == RouteMode::Primary
                && self.cfg.read_your_writes == ReadYourWrites::User
                && self.tracks_writes())
    }

    /// Takes a reloaded configuration and the cluster's size, when they changed; once per
    /// turn of the forwarding loop.
    fn refresh(&mut self, topo_rx: &mut watch::Receiver<Topology>) {
        let version = self.shared.config_version.load(Ordering::Acquire);
        if version != self.cfg_version {
            self.cfg = self.shared.config();
            self.cfg_version = version;
        }
        self.refresh_topology(topo_rx);
    }

    /// The topology part of [`Session::refresh`]: the cluster's size and the newest term.
    fn refresh_topology(&mut self, topo_rx: &mut watch::Receiver<Topology>) {
        if topo_rx.has_changed().unwrap_or(false) {
            let topo = topo_rx.borrow_and_update();
            self.multi = topo.members > 1;
            self.newest_term = topo.newest_term;
        }
    }

    /// Whether a write's WAL position is read after its transaction (read-your-writes): in
    /// transaction mode, on a cluster with replicas.
    fn tracks_writes(&self) -> bool {
        self.cfg.read_your_writes.on() && self.multi && self.pool_mode == PoolMode::Transaction
    }

    /// The floor a read respects now: the client's own, or with `read_your_writes = "user"`
    /// that combined with its database and user's ([`crate::ryw::UserFloor`]).
    fn ryw_floor_now(&self) -> u64 {
        match self.user_floor() {
            Some(floor) => floor.with(self.ryw_floor),
            None => self.ryw_floor,
        }
    }

    /// Whether named prepared statements are renamed and tracked.
    fn translating(&self) -> bool {
        self.pool_mode == PoolMode::Transaction && self.cfg.max_prepared_statements > 0
    }

    fn classify(&self, text: &[u8]) -> Class {
        self.shared.classifier().classify(text)
    }

    /// The class of the client's statement `name` (the unnamed one when empty).
    fn named_class(&self, name: &[u8], unnamed: Class) -> Class {
        if name.is_empty() {
            return unnamed;
        }
        match self.statements.get(name) {
            Some(def) => *def.class.get_or_init(|| self.classify(def.query.as_bytes())),
            None => Class::Neutral,
        }
    }

    /// The class of what one client frame runs or prepares, if it is about a statement.
    fn frame_class(&self, frame: Msg<'_>, unnamed: Class) -> Option<Class> {
        let body = frame.body_slice();
        match frame.tag() {
            b'Q' | b'P' => Some(query_text(frame).map_or(Class::Write, |t| self.classify(t))),
            b'B' => prepared::bind_statement(body).map(|n| self.named_class(n, unnamed)),
            b'D' => match prepared::target_and_name(body) {
                Some((b'S', n)) => Some(self.named_class(n, unnamed)),
                _ => None,
            },
            b'F' => Some(Class::Write),
            _ => None,
        }
    }

    /// The class of the unit at the front of `held` once it is complete (`None`: wait for
    /// the rest). A unit too large to hold without its end goes to the primary.
    fn held_unit(&self) -> Option<Class> {
        if self.held == 0 {
            return None;
        }
        if !self.splitting() {
            return Some(Class::Write);
        }
        let mut class = Class::Neutral;
        let mut unnamed = self.unnamed_class;
        for f in self.held_frames() {
            match f.tag() {
                b'Q' => return Some(class.max(self.frame_class(f, unnamed).unwrap_or(Class::Write))),
                b'P' => {
                    let c = self.frame_class(f, unnamed).unwrap_or(Class::Write);
                    if parse_name(f).is_some_and(|n| n.is_empty()) {
                        unnamed = c;
                    }
                    class = class.max(c);
                }
                b'B' | b'D' => class = class.max(self.frame_class(f, unnamed).unwrap_or(Class::Neutral)),
                b'E' | b'C' => {}
                b'S' | b'H' => return Some(class),
                // FunctionCall, stray COPY messages, anything else: the primary.
                _ => return Some(Class::Write),
            }
        }
        (self.held >= HIGH_WATER).then_some(Class::Write)
    }

    /// A server connection for a unit of `class`: a replica for reads (in the auto mode; for
    /// everything in the replica mode) when one is eligible, else the primary.
    ///
    /// `slot`: a slot of the client's primary pool it already holds ([`Now::Slow`]) and since
    /// when it waited for it; given up if new transactions are held meanwhile.
    async fn route(&mut self, class: Class, slot: Option<(Slot, Instant)>) -> Result<Attached, Fail> {
        let started = slot.as_ref().map_or_else(Instant::now, |(_, since)| *since);
        let mut slot = slot.map(|(p, _)| p);
        if self.shared.hold.holds(&self.database) {
            slot = None;
        }
        self.hold().await?;
        // Counted before the gate is checked again, so a switchover's drain sees this unit or
        // this unit sees the closed gate.
        let unit = loop {
            let unit = self.shared.inflight.enter();
            if !self.shared.hold.holds(&self.database) {
                break unit;
            }
            drop(unit);
            self.hold().await?;
        };
        let wants_replica = self.wants_replica(class);
        let mut att = None;
        if wants_replica {
            match self.attach_replica().await? {
                Ok(a) => att = Some(a),
                Err(why) => {
                    if why == OnPrimary::NoReplica
                        && self.shared.config().no_replica == NoReplica::Error
                        && self.eligible_replicas(0).is_empty()
                    {
                        return Err(Fail::new(
                            sqlstate::CANNOT_CONNECT_NOW,
                            "no replica is eligible for reads (none streaming within max_replica_lag), and \
                             no_replica = \"error\"",
                        ));
                    }
                    if let Some(pool) = &self.pool {
                        let counter = match why {
                            OnPrimary::ReadYourWrites => &pool.stats.reads_for_writes,
                            OnPrimary::NoReplica => &pool.stats.reads_without_replica,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let mut att = match att {
            Some(a) => a,
            None => self.attach_primary(slot).await?,
        };
        if att.conn.role == ServerRole::Primary && self.pool_mode == PoolMode::Transaction {
            att.unit = Some(unit);
        }
        att.slot.pool().stats.observe_wait(started.elapsed());
        Ok(att)
    }

    /// Whether a unit of `class` goes to a replica when one is eligible: as the client's
    /// routing mode says; in the auto mode, reads, once the volatile functions of the
    /// client's database are known ([`crate::functions`]).
    fn wants_replica(&self, class: Class) -> bool {
        match self.mode {
            RouteMode::Primary => false,
            RouteMode::Replica => true,
            RouteMode::Auto => class == Class::Read && self.pool.as_ref().is_some_and(|p| p.functions_known()),
        }
    }

    /// [`Session::route`]'s common case, without waiting (and without allocating its future):
    /// new transactions are not held, the unit goes to the primary, a pool slot and an idle
    /// connection to the current primary are free, and the client's settings are in force on
    /// that connection. Otherwise [`Now::Queue`] when only a pool slot is missing, else
    /// [`Now::Slow`]: take the full path (in the slot taken, if one was).
    ///
    /// `queued`: a slot the client already waited for ([`Session::queue`]) and since when.
    fn route_now(&mut self, class: Class, queued: Option<(Slot, Instant)>) -> Now {
        let wants_replica = self.wants_replica(class);
        if wants_replica || self.shared.hold.is_closed() || self.shared.draining() || self.server_auth.is_none() {
            return Now::Slow(None);
        }
        let Some(pool) = self.pool.as_ref() else { return Now::Slow(None) };
        // As in `route`: counted before the gate is checked again.
        let unit = self.shared.inflight.enter();
        if self.shared.hold.is_closed() {
            return Now::Slow(None);
        }
        // Since when the client waited for the slot; `None`: it did not (no clock read).
        // Without waiting, the slot and the idle connection are taken under one lock.
        let min_term = self.idle_primary_term();
        let (slot, since, conn) = match queued {
            Some((slot, since)) => (slot, Some(since), min_term.and_then(|t| pool.take_idle(t))),
            None => match pool.try_slot_idle(min_term) {
                Some((p, conn)) => (p, None, conn),
                None => return Now::Queue,
            },
        };
        let Some(mut conn) = conn else {
            return Now::Slow(Some((slot, since.unwrap_or_else(Instant::now))));
        };
        if !self.desired.matched_by(&mut conn.params) {
            // Settings to replay first: the full path does that, in the slot held.
            pool.put_idle(conn);
            return Now::Slow(Some((slot, since.unwrap_or_else(Instant::now))));
        }
        let mut att = Attached::new(conn, slot);
        self.set_cancel(att.conn.lend_cancel_target());
        if self.pool_mode == PoolMode::Transaction {
            att.unit = Some(unit);
        }
        att.slot.pool().stats.observe_wait(since.map_or(Duration::ZERO, |s| s.elapsed()));
        Now::Attached(att)
    }

    /// A server connection for the next unit, of `class`: [`Session::route_now`], after a
    /// wait in the pool's queue when only a slot is missing, else the full path
    /// ([`Session::route`]).
    async fn attach(&mut self, class: Class) -> Result<Attached, Fail> {
        match self.route_now(class, None) {
            Now::Attached(att) => Ok(att),
            Now::Queue => self.attach_queued(class).await,
            // Boxed, as the release: their futures (timeouts, server queries) would otherwise
            // be part of every session's future, idle or not.
            Now::Slow(slot) => Box::pin(self.route(class, slot)).await,
        }
    }

    /// [`Session::attach`] once [`Session::route_now`] found every slot of the client's pool
    /// in use: waits for one ([`Session::queue`]), then routes in it.
    async fn attach_queued(&mut self, class: Class) -> Result<Attached, Fail> {
        let pool = self.pool.clone().ok_or_else(|| Fail::new(sqlstate::INTERNAL_ERROR, "no pool"))?;
        let queued = self.queue(&pool).await?;
        match self.route_now(class, Some(queued)) {
            Now::Attached(att) => Ok(att),
            // Something changed while it waited (a new primary, a pause, ...), or the client's
            // settings must be replayed first.
            Now::Slow(slot) => Box::pin(self.route(class, slot)).await,
            Now::Queue => Box::pin(self.route(class, None)).await,
        }
    }

    /// [`Session::route_now`]'s case when every server connection of the pool is in use
    /// (with more clients than `pool_size`, most transactions): waits in the pool's queue
    /// ([`Session::slot`]) without the full path's other steps, and says since when.
    async fn queue(&mut self, pool: &Arc<Pool>) -> Result<(Slot, Instant), Fail> {
        let since = Instant::now();
        Ok((self.slot(pool, since).await?, since))
    }

    /// Waits while the client's new transactions are held (`PAUSE`, `PAUSE db`, a switchover,
    /// see [`Gate`]), at most `query_wait_timeout`; refuses new transactions while the proxy
    /// shuts down.
    async fn hold(&mut self) -> Result<(), Fail> {
        if self.shared.hold.holds(&self.database) {
            self.flush().await?;
            let timeout = self.shared.config().query_wait_timeout;
            self.set_waiting(true);
            let mut drain = self.shared.draining.subscribe();
            let held = tokio::time::timeout(timeout, async {
                loop {
                    // Made before the look: a `KILL` after the look wakes it.
                    let kill = self.shared.kills.notified();
                    if self.killed() {
                        break;
                    }
                    tokio::select! {
                        _ = self.shared.hold.wait_released(&self.database) => break,
                        _ = drain.wait_for(|d| *d) => break,
                        _ = kill => {}
                    }
                }
            })
            .await;
            self.set_waiting(false);
            if self.killed() {
                return Err(self.kill_fail());
            }
            if held.is_err() {
                let why = if self.shared.admin.is_paused() {
                    "the proxy is paused (PAUSE on the admin console) and was not resumed".to_string()
                } else if !self.shared.hold.holds_everyone() {
                    format!(
                        "database {:?} is paused (PAUSE or KILL {db} on the admin console) and was not resumed \
                         (RESUME {db})",
                        self.database,
                        db = self.database
                    )
                } else {
                    "new transactions are held while a planned switchover changes the primary, and it did not \
                     finish"
                        .to_string()
                };
                return Err(Fail::new(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!("{why} within query_wait_timeout ({})", pgkeel_config::format_duration(timeout)),
                ));
            }
        }
        if self.shared.draining() {
            return Err(Fail::new(sqlstate::ADMIN_SHUTDOWN, "the proxy is shutting down; reconnect"));
        }
        Ok(())
    }

    /// The replicas that may serve reads now: streaming (per the topology), within
    /// `max_replica_lag`, weight above 0, not failed recently; each with whether it is known
    /// to have replayed `floor` (the client's last write, [`Session::ryw_floor_now`]).
    fn eligible_replicas(&self, floor: u64) -> Vec<(Replica, bool)> {
        let cfg = &self.cfg;
        let limit = LagLimit { bytes: cfg.max_replica_lag, time: cfg.max_replica_lag_time };
        let now = Instant::now();
        let topo = self.shared.topology.borrow();
        if topo.replicas.is_empty() {
            return Vec::new();
        }
        let bans = self.shared.bans.lock().unwrap_or_else(PoisonError::into_inner);
        let replayed = self.shared.replayed.lock().unwrap_or_else(PoisonError::into_inner);
        topo.replicas
            .iter()
            .filter(|r| limit.allows(r))
            .filter(|r| cfg.weights.get(&r.name).is_none_or(|w| *w > 0))
            .filter(|r| bans.get(&r.name).is_none_or(|until| *until <= now))
            .map(|r| {
                let learned = replayed.get(&r.name).filter(|(t, _)| *t == topo.newest_term).map(|(_, l)| *l);
                let known = r.replayed_lsn.unwrap_or(0).max(learned.unwrap_or(0));
                (r.clone(), known >= floor)
            })
            .collect()
    }

    /// An eligible replica ([`Session::eligible_replicas`]), chosen by `load_balance`
    /// ([`choose_replica`]); preferably one known to have replayed `floor` (`true`), else any
    /// (to be asked).
    fn pick_replica(&self, floor: u64) -> Option<(Replica, bool)> {
        if floor == UNKNOWN_LSN {
            return None;
        }
        let cfg = &self.cfg;
        let candidates = self.eligible_replicas(floor);
        let caught_up: Vec<&(Replica, bool)> = candidates.iter().filter(|c| c.1).collect();
        let pool: Vec<&(Replica, bool)> = if caught_up.is_empty() { candidates.iter().collect() } else { caught_up };
        let turn = match cfg.load_balance {
            LoadBalance::RoundRobin | LoadBalance::Weighted => self.shared.next_replica.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let random = match cfg.load_balance {
            LoadBalance::Random => {
                scram::random_bytes(8).unwrap_or_default().iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
            }
            _ => 0,
        };
        let in_use = |i: usize| {
            self.shared.pools.in_use(&PoolKey {
                database: self.database.clone(),
                user: self.user.clone(),
                target: PoolTarget::Replica(pool[i].0.name.clone()),
            })
        };
        let weight = |i: usize| cfg.weights.get(&pool[i].0.name).copied().unwrap_or(1);
        let i = choose_replica(cfg.load_balance, pool.len(), turn, random, in_use, weight)?;
        pool.get(i).map(|c| (*c).clone())
    }

    /// Attaches a replica for a read, when one is eligible. With read-your-writes and no
    /// replica known to have replayed the client's last write, the chosen one is asked
    /// (`pg_last_wal_replay_lsn()`, one round trip); if it is behind, `None` (the primary).
    async fn attach_replica(&mut self) -> Result<Result<Attached, OnPrimary>, Fail> {
        let floor = self.ryw_floor_now();
        let Some((replica, caught_up)) = self.pick_replica(floor) else {
            return Ok(Err(if floor == UNKNOWN_LSN { OnPrimary::ReadYourWrites } else { OnPrimary::NoReplica }));
        };
        let mut att = match self.attach_replica_conn(&replica).await? {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(replica = %replica.name, address = %replica.address, error = %e,
                    "cannot use the replica; reads go elsewhere for {}s", REPLICA_BAN.as_secs());
                self.shared.ban(&replica.name);
                return Ok(Err(OnPrimary::NoReplica));
            }
        };
        if caught_up {
            return Ok(Ok(att));
        }
        let term = self.shared.topology.borrow().newest_term;
        match att.conn.simple_query("select pg_last_wal_replay_lsn()::text").await {
            Ok(rows) => {
                let lsn = rows.first().and_then(|r| r.first()).and_then(|v| v.as_deref()).and_then(parse_lsn);
                if let Some(l) = lsn {
                    self.shared.learn_replayed(&replica.name, term, l);
                }
                if lsn.is_some_and(|l| l >= floor) {
                    return Ok(Ok(att));
                }
                tracing::debug!(replica = %replica.name, ?lsn, floor, "replica behind the client's last write; reading on the primary");
                self.put_back(att).await;
                Ok(Err(OnPrimary::ReadYourWrites))
            }
            Err(e) => {
                tracing::warn!(replica = %replica.name, error = %e, "cannot read the replica's replay position");
                self.shared.ban(&replica.name);
                Ok(Err(OnPrimary::NoReplica))
            }
        }
    }

    /// Gives a clean attached connection back to its pool.
    async fn put_back(&mut self, mut att: Attached) {
        if let Some(info) = &self.info {
            if let Some(target) = info.cancel.detach().await {
                att.conn.return_cancel_target(target);
            }
        }
        att.into_pool();
    }

    /// Shows the client as waiting (`SHOW CLIENTS`, `cl_waiting`) or not: for a pool slot, for
    /// room under a cap, or while its transactions are held.
    fn set_waiting(&self, waiting: bool) {
        if let Some(i) = &self.info {
            i.waiting.store(waiting, Ordering::Relaxed);
        }
    }

    /// Waits for a slot in `pool` (at most `query_wait_timeout` from `since`).
    async fn slot(&self, pool: &Arc<Pool>, since: Instant) -> Result<Slot, Fail> {
        // Usually a slot is free: take it without queueing.
        if let Some(p) = pool.try_slot() {
            return Ok(p);
        }
        // The turn's configuration (see `Session::refresh`), not a fresh copy under the lock.
        let cfg = &self.cfg;
        self.set_waiting(true);
        let slot = pool.slot(since, cfg.query_wait_timeout).await;
        self.set_waiting(false);
        match slot {
            Ok(p) => Ok(p),
            Err(NoSlot::Killed) => Err(self.kill_fail()),
            Err(NoSlot::TimedOut) => {
                let (in_use, idle, size) = pool.counts();
                let server = match &pool.key.target {
                    PoolTarget::Primary => String::new(),
                    PoolTarget::Replica(name) => format!(" on the replica {name}"),
                };
                let reserve = match cfg.reserve_pool_size_for(&self.database) {
                    0 => String::new(),
                    r => format!(" and reserve_pool_size ({r})"),
                };
                Err(Fail::new(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!(
                        "no server connection for database {:?} user {:?}{server} became free within \
                         query_wait_timeout ({}): all {size} of pool_size{reserve} are in use ({in_use} busy, {idle} \
                         idle); raise pool_size or shorten the transactions that hold them",
                        self.database,
                        self.user,
                        pgkeel_config::format_duration(cfg.query_wait_timeout)
                    ),
                ))
            }
        }
    }

    /// The right to open a server connection for `pool` under `max_db_connections` and
    /// `max_user_connections` ([`Pool::permit`]), waiting at most `query_wait_timeout`.
    async fn permit(&self, pool: &Pool, cfg: &ProxyConfig) -> Result<crate::pool::Permit, Fail> {
        let deadline = Instant::now() + cfg.query_wait_timeout;
        self.set_waiting(true);
        let permit = pool.permit(&self.shared.pools, deadline).await;
        self.set_waiting(false);
        permit.map_err(|cap: Arc<Cap>| {
            let (open, _) = cap.counts();
            Fail::new(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "no server connection for database {:?} user {:?} could be opened within query_wait_timeout \
                     ({}): {} is reached ({open} open, all in use); raise it or shorten the transactions that \
                     hold them",
                    self.database,
                    self.user,
                    pgkeel_config::format_duration(cfg.query_wait_timeout),
                    cap.describe()
                ),
            )
        })
    }

    /// A connection to `replica` from its pool, or a new one. The inner `Err` says why the
    /// replica cannot be used (then the read goes elsewhere); the outer one ends the session.
    async fn attach_replica_conn(&mut self, replica: &Replica) -> Result<Result<Attached, String>, Fail> {
        if self.server_auth.is_none() {
            return Err(Fail::new(sqlstate::INTERNAL_ERROR, "not logged in"));
        }
        let key = PoolKey {
            database: self.database.clone(),
            user: self.user.clone(),
            target: PoolTarget::Replica(replica.name.clone()),
        };
        let pool = self.shared.pools.get(key, Sizes::of(&self.shared.config(), &self.database, &self.user));
        let slot = self.slot(&pool, Instant::now()).await?;
        let mut conn = match pool.take_idle(0) {
            Some(c) => c,
            None => {
                let cfg = self.shared.config();
                let auth =
                    self.server_auth.as_deref().ok_or_else(|| Fail::new(sqlstate::INTERNAL_ERROR, "not logged in"))?;
                // A replica's cap reached: the read goes elsewhere rather than waiting (after
                // the replica's idle connections of other pools were closed to make room).
                let permit = match pool.permit(&self.shared.pools, Instant::now()).await {
                    Ok(p) => p,
                    Err(cap) => return Ok(Err(format!("{} is reached", cap.describe()))),
                };
                let database = cfg.dbname_for(&self.database);
                match Box::pin(ServerConn::connect_replica(replica, database, auth, &self.shared.dial(&auth.user)))
                    .await
                {
                    Ok(mut c) => {
                        c.permit = permit;
                        tracing::debug!(server = ?c, database = %self.database, user = %self.user, "opened a replica connection");
                        if let Some(p) = &self.pool {
                            p.set_welcome(&c);
                        }
                        Box::new(c)
                    }
                    Err(ConnectError::Refused(fields)) => {
                        return Err(Fail {
                            sqlstate: sqlstate::CONNECTION_FAILURE,
                            message: describe(&fields),
                            fields: Some(fields),
                        })
                    }
                    Err(e) => return Ok(Err(e.to_string())),
                }
            }
        };
        if let Err(crate::server::QueryError::Broken(e) | crate::server::QueryError::Failed(e)) =
            self.sync_params(&mut conn).await
        {
            return Ok(Err(format!("cannot apply the session settings: {e}")));
        }
        let mut att = Attached::new(conn, slot);
        self.set_cancel(att.conn.lend_cancel_target());
        Ok(Ok(att))
    }

    /// An idle connection of `pool` to the current primary, if there is one (usually): taken
    /// without copying the topology.
    fn idle_primary_conn(&self, pool: &Pool) -> Option<Box<ServerConn>> {
        pool.take_idle(self.idle_primary_term()?)
    }

    /// The oldest term an idle primary connection may have been opened under to be reused;
    /// `None` while no primary is known.
    fn idle_primary_term(&self) -> Option<u64> {
        self.shared.topology.borrow().reusable_term()
    }

    /// Takes a primary connection for this client: waits for a pool slot (at most
    /// `query_wait_timeout`), then for a running primary (at most `failover_hold_timeout`),
    /// then replays the client's settings on it.
    /// `slot`: a pool slot the client already holds.
    async fn attach_primary(&mut self, slot: Option<Slot>) -> Result<Attached, Fail> {
        let pool = self.pool.clone().ok_or_else(|| Fail::new(sqlstate::INTERNAL_ERROR, "no pool"))?;
        if self.server_auth.is_none() {
            return Err(Fail::new(sqlstate::INTERNAL_ERROR, "not logged in"));
        }
        let waited = Instant::now();
        let slot = match slot {
            Some(p) => p,
            None => self.slot(&pool, waited).await?,
        };
        let mut conn = match self.idle_primary_conn(&pool) {
            Some(c) => c,
            None => Box::pin(self.connect_primary(&pool)).await?,
        };
        // Nothing of the client's was sent yet: a connection found broken here (its server
        // went away since it was pooled) is replaced, within the hold for a primary.
        let mut broken = 0;
        loop {
            match self.sync_params(&mut conn).await {
                Ok(()) => break,
                Err(crate::server::QueryError::Broken(e)) if broken < 3 => {
                    broken += 1;
                    tracing::info!(server = ?conn, error = %e, "a pooled server connection broke before the client used it: taking another");
                    drop(conn);
                    conn = Box::pin(self.connect_primary(&pool)).await?;
                }
                Err(crate::server::QueryError::Broken(e) | crate::server::QueryError::Failed(e)) => {
                    return Err(Fail::new(
                        sqlstate::CONNECTION_FAILURE,
                        format!("cannot apply the session settings: {e}"),
                    ))
                }
            }
        }
        let mut att = Attached::new(conn, slot);
        self.set_cancel(att.conn.lend_cancel_target());
        let waited = waited.elapsed();
        if waited > Duration::from_millis(500) {
            tracing::info!(client = %self.peer, waited_ms = waited.as_millis() as u64, server = ?att.conn, "attached after a wait");
        }
        Ok(att)
    }

    /// A primary connection once no idle one was at hand: an idle one or a new one, waiting
    /// for a running primary (at most `failover_hold_timeout`).
    async fn connect_primary(&self, pool: &Pool) -> Result<Box<ServerConn>, Fail> {
        let auth = self.server_auth.as_ref().ok_or_else(|| Fail::new(sqlstate::INTERNAL_ERROR, "not logged in"))?;
        let cfg = self.shared.config();
        let hold_until = Instant::now() + cfg.failover_hold_timeout;
        let mut topo_rx = self.shared.topology.clone();
        let mut last_error: Option<String> = None;
        let conn = loop {
            let topo = topo_rx.borrow_and_update().clone();
            if let (Some(primary), Some(term)) = (&topo.primary, topo.reusable_term()) {
                if let Some(c) = pool.take_idle(term) {
                    break c;
                }
                let permit = self.permit(pool, &cfg).await?;
                let database = cfg.dbname_for(&self.database);
                let dial = self.shared.dial(&auth.user);
                let connect = Box::pin(ServerConn::connect(primary, database, auth, &dial));
                // A primary cut off by a partition answers nothing: the attempt would last
                // `server_connect_timeout` after the DCS named another (the client's pause).
                let Some(connected) = until_replaced(connect, primary, &mut topo_rx).await else {
                    last_error =
                        Some(format!("{} stopped being the primary while the proxy connected to it", primary.name));
                    continue;
                };
                match connected {
                    Ok(mut c) if c.term >= topo_rx.borrow().newest_term => {
                        c.permit = permit;
                        tracing::debug!(server = ?c, database = %self.database, user = %self.user, "opened a server connection");
                        pool.set_welcome(&c);
                        break Box::new(c);
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
        Ok(conn)
    }

    /// Replays the client's tracked settings that differ on this server connection, in one
    /// round trip, and tells the client the values the server normalised them to.
    async fn sync_params(&mut self, conn: &mut ServerConn) -> Result<(), crate::server::QueryError> {
        let changes: Vec<(&'static str, String)> =
            self.desired.differing(&conn.params).map(|(k, v)| (k, v.to_string())).collect();
        if changes.is_empty() {
            return Ok(());
        }
        let calls: Vec<String> = changes
            .iter()
            .map(|(k, v)| format!("pg_catalog.set_config({}, {}, false)", quote_literal(k), quote_literal(v)))
            .collect();
        conn.query(&format!("SELECT {}", calls.join(", "))).await?;
        for (k, v) in &changes {
            if UNREPORTED.contains(k) || !conn.params.contains_key(*k) {
                conn.params.insert(k.to_string(), v.clone());
            }
            let normalised = conn.params.get(*k).cloned().unwrap_or_else(|| v.clone());
            self.desired.set(k, &normalised);
            if !UNREPORTED.contains(k) && self.told.set(k, &normalised) {
                BackendMessage::ParameterStatus { name: Text::lossy(k), value: Text::lossy(&normalised) }
                    .encode(&mut self.wbuf);
            }
        }
        Ok(())
    }

    /// Gives the attached server connection back: to the pool when it is clean (after
    /// ROLLBACK in a transaction and DISCARD ALL in session mode), else it is closed.
    async fn release(&mut self) {
        let Some(mut att) = self.attached.take() else { return };
        if let Some(info) = &self.info {
            if let Some(target) = info.cancel.detach().await {
                att.conn.return_cancel_target(target);
            }
        }
        let newest = self.shared.topology.borrow().newest_term;
        if att.fenced(newest) {
            tracing::info!(server = ?att.conn, newest_term = newest, "closing a server connection of an older term");
            return;
        }
        if self.killed() {
            // Closed, not cleaned: the server rolls back whatever the client left open. A
            // query still running is cancelled first: postgres would not notice the closed
            // socket before the query ends.
            tracing::debug!(server = ?att.conn, "closing the server connection of a killed client");
            if let Some(target) = att.conn.lend_cancel_target().filter(|_| !att.queue.is_empty()) {
                let tls = self.shared.server_tls();
                tokio::spawn(async move {
                    if let Err(e) = crate::server::send_cancel(&target, &tls).await {
                        tracing::warn!(error = %e, "could not cancel the query of a killed client");
                    }
                });
            }
            return;
        }
        // The client left while the proxy's LSN query was in flight: finish it.
        if !att.queue.is_empty() && att.queue.iter().all(|e| matches!(e.expect, Expect::Lsn)) && !att.open_batch {
            let n = att.queue.len();
            let drained = tokio::time::timeout(CLEANUP_TIMEOUT, async {
                att.conn.stream.send(&att.out).await.map_err(|e| e.to_string())?;
                let mut left = n;
                while left > 0 {
                    match att.conn.read_message().await? {
                        BackendMessage::ReadyForQuery(s) => {
                            att.status = s;
                            left -= 1;
                        }
                        BackendMessage::DataRow(values) => {
                            att.lsn = row_lsn(&values);
                        }
                        BackendMessage::ErrorResponse(_) => lsn_query_failed(&att.conn),
                        _ => {}
                    }
                }
                Ok::<(), String>(())
            })
            .await;
            if !matches!(drained, Ok(Ok(()))) {
                tracing::debug!(server = ?att.conn, "the proxy's LSN query did not finish; closing the server connection");
                return;
            }
            // The client is gone; its user's other connections may still read its write.
            if let Some(pending) = att.pending.take() {
                pending.resolve(att.lsn.take());
            }
            att.out.clear();
            att.queue.clear();
        }
        if !att.queue.is_empty() || att.open_batch || !att.out.is_empty() || !att.conn.rbuf.is_empty() {
            tracing::debug!(server = ?att.conn, "closing a server connection left mid-exchange");
            return;
        }
        if att.ending {
            tracing::debug!(server = ?att.conn, "closing a server connection whose backend is ending");
            return;
        }
        let session_mode = self.pool_mode == PoolMode::Session;
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
                            att.conn.params.remove(k);
                        }
                        att.conn.statements.clear();
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
        att.into_pool();
    }

    /// Forwards between the client and server connections until the client leaves or an
    /// error ends the session.
    ///
    /// An idle client waits here, in a small future; the forwarding itself ([`Session::busy`])
    /// is boxed for as long as the client has work. A spawned future is as large as its
    /// largest state, so each idle client would otherwise keep room for the forwarding state
    /// too (docs/benchmarks.md, "Proxy": 2,000 idle clients). The common short transaction
    /// runs here too, without the loop and its box ([`Session::quick_start`]), waiting where
    /// an idle client waits ([`Session::poll_quiet`]).
    async fn forward(&mut self) -> Result<(), Fail> {
        let mut topo_rx = self.shared.topology.clone();
        // Read by the first turn (`Session::refresh`).
        topo_rx.mark_changed();
        let mut kick = self.shared.kick.listen();
        // The forwarding loop runs next (first, for what the client sent with its login).
        let mut to_loop = true;
        loop {
            if std::mem::take(&mut to_loop) {
                kick.set_busy(&self.shared.kick, true);
                if !Box::pin(self.busy(&mut topo_rx, &mut kick)).await? {
                    return Ok(());
                }
                kick.set_busy(&self.shared.kick, false);
            }
            // Quiet: idle (no server attached, nothing buffered either way), or a quick
            // transaction waits for its server. TLS clients stay in the loop.
            if !matches!(self.stream, Stream::Plain(_)) {
                to_loop = true;
                continue;
            }
            match self.attached.as_mut() {
                // The client keeps no buffers until its socket is readable (16 KiB per idle
                // client otherwise).
                None => spares::give_kit(spares::Kit {
                    rbuf: std::mem::take(&mut self.rbuf),
                    wbuf: std::mem::take(&mut self.wbuf),
                }),
                Some(att) => room_to_read(&mut att.conn.rbuf),
            }
            match std::future::poll_fn(|cx| self.poll_quiet(&mut kick, cx)).await {
                Quiet::Left => return Ok(()),
                Quiet::Read => {
                    self.mark_active();
                    // Busy: a topology change wakes it from here on.
                    kick.set_busy(&self.shared.kick, true);
                    let mut start = self.quick_start(&mut topo_rx)?;
                    if matches!(start, Start::Queue) {
                        // Boxed: the wait would otherwise be part of every session's future,
                        // idle or not.
                        let att = Box::pin(self.attach_queued(Class::Write)).await?;
                        start = match self.quick_unit() {
                            Some(unit) => self.quick_send(att, unit, &mut topo_rx)?,
                            // Not reached: what is held did not change. The loop sends it.
                            None => {
                                self.attached = Some(att);
                                Start::Loop
                            }
                        };
                    }
                    to_loop = !matches!(start, Start::Sent);
                }
                // The loop reads it.
                Quiet::More => to_loop = true,
                Quiet::Server(Ok(n)) if n > 0 => match self.quick_answer(&mut topo_rx)? {
                    Answer::Idle => kick.set_busy(&self.shared.kick, false),
                    Answer::Wait => {}
                    Answer::Loop => to_loop = true,
                },
                // The server connection failed: the loop reads that again and says so.
                Quiet::Server(_) => to_loop = true,
                Quiet::Kick => {
                    if let Some(fail) = self.must_close() {
                        return Err(fail);
                    }
                    // A new primary: nothing more goes to one of an older term, as in the
                    // loop. Then the loop, which also closes an idle client when the proxy
                    // shuts down.
                    self.refresh_topology(&mut topo_rx);
                    let newest = self.newest_term;
                    if self.attached.as_ref().is_some_and(|a| a.fenced(newest)) {
                        return Err(self.term_changed(newest));
                    }
                    if let Some(fail) = self.replica_left(&topo_rx) {
                        return Err(fail);
                    }
                    to_loop = true;
                }
            }
        }
    }

    /// Whether the client is idle on a plain socket: no server attached and nothing buffered
    /// either way ([`Session::forward`] waits for it then).
    fn idle_plain(&self) -> bool {
        self.attached.is_none()
            && self.wbuf.is_empty()
            && self.rbuf.is_empty()
            && matches!(self.stream, Stream::Plain(_))
    }

    /// What a quiet client ([`Session::forward`]) waits for: the answer of the server while a
    /// quick transaction runs ([`Session::quick_start`]), the client's socket, the kick. An
    /// idle client's socket is read here once it is readable, into the buffers it takes back
    /// for that.
    fn poll_quiet(
        &mut self,
        kick: &mut crate::kick::Listener,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Quiet> {
        let Session { attached, stream, rbuf, wbuf, shared, .. } = self;
        // Not reached (`forward` waits here for plain sockets only): the loop takes the others.
        let Stream::Plain(client) = &*stream else { return std::task::Poll::Ready(Quiet::More) };
        // The server first, as in `wait_event`.
        if let Some(att) = attached.as_mut() {
            if let std::task::Poll::Ready(r) = att.conn.stream.poll_read_bytes(cx, &mut att.conn.rbuf) {
                return std::task::Poll::Ready(Quiet::Server(r));
            }
        }
        // `poll_read_ready` keeps the waker in the socket's own slot, where `readable()` would
        // queue and unqueue a waiter under the socket's lock.
        match client.poll_read_ready(cx) {
            std::task::Poll::Ready(Err(_)) => return std::task::Poll::Ready(Quiet::Left),
            // More from the client while its transaction runs: the forwarding loop reads it.
            std::task::Poll::Ready(Ok(())) if attached.is_some() => return std::task::Poll::Ready(Quiet::More),
            std::task::Poll::Ready(Ok(())) => {
                let kit = spares::take_kit();
                (*rbuf, *wbuf) = (kit.rbuf, kit.wbuf);
                // Through `poll_read_bytes` rather than `try_read_buf`: a read that leaves room
                // in the buffer drained the socket, and `poll_read_bytes` then clears the
                // socket's readiness, where `try_read_buf` keeps it and the next wait would
                // spend a `recv` on EAGAIN (one per transaction, seen with `strace -c`).
                match stream.poll_read_bytes(cx, rbuf) {
                    std::task::Poll::Ready(Ok(0)) | std::task::Poll::Ready(Err(_)) => {
                        return std::task::Poll::Ready(Quiet::Left)
                    }
                    std::task::Poll::Ready(Ok(_)) => return std::task::Poll::Ready(Quiet::Read),
                    // Not readable after all (and the waker is registered): idle again.
                    std::task::Poll::Pending => {
                        spares::give_kit(spares::Kit { rbuf: std::mem::take(rbuf), wbuf: std::mem::take(wbuf) })
                    }
                }
            }
            std::task::Poll::Pending => {}
        }
        kick.poll_kicked(&shared.kick, cx).map(|()| Quiet::Kick)
    }

    /// Starts the unit an idle client just sent ([`Quiet::Read`]) as a quick transaction
    /// ([`Start`]).
    ///
    /// Quick: the client sent one whole unit (a simple Query, or a plain extended-protocol
    /// unit up to its Sync, see [`Session::front_unit`]) and nothing after it, on a plain
    /// socket, in transaction mode, not split, and a pool slot and an idle connection to the
    /// current primary are at hand ([`Session::route_now`]). The loop would do the same for
    /// it, in turns that each read the configuration and the topology, look at the held frames,
    /// both buffers and the release, and wait on the client, the server and the kick at once,
    /// in a future boxed per transaction: most of the proxy's own cost of a short transaction
    /// (docs/benchmarks.md, "Proxy").
    fn quick_start(&mut self, topo_rx: &mut watch::Receiver<Topology>) -> Result<Start, Fail> {
        // No server is attached and nothing is buffered for the client here: it was idle on
        // a plain socket.
        self.refresh(topo_rx);
        if self.skip_to_sync
            || self.pool_mode != PoolMode::Transaction
            || self.classifying()
            || self.shared.draining()
            || self.killed()
        {
            return Ok(Start::Loop);
        }
        self.read_held()?;
        let Some(unit) = self.quick_unit() else { return Ok(Start::Loop) };
        Ok(match self.route_now(Class::Write, None) {
            Now::Attached(att) => self.quick_send(att, unit, topo_rx)?,
            Now::Queue => Start::Queue,
            // Anything else is the loop's, which routes again (a slot taken here is given back:
            // to a client waiting for one, if any, which waited longer).
            Now::Slow(_) => Start::Loop,
        })
    }

    /// Sends the quick transaction's unit ([`Session::quick_unit`], all that is held) to `att`.
    fn quick_send(
        &mut self,
        att: Attached,
        (n, executes, kind): QuickUnit,
        topo_rx: &mut watch::Receiver<Topology>,
    ) -> Result<Start, Fail> {
        // The newest term, as the loop reads it before it writes: nothing goes to a primary of
        // an older term.
        self.refresh_topology(topo_rx);
        let newest = self.newest_term;
        let fenced = att.fenced(newest);
        self.attached = Some(att);
        if fenced {
            return Err(self.term_changed(newest));
        }
        // Sent from the client's buffer: the connection's write buffer is touched only for
        // what the socket does not take, which the loop writes.
        self.dispatch_unit(n, executes, None, kind, true);
        self.write_now();
        Ok(if self.attached.as_ref().is_some_and(|a| a.out.is_empty()) { Start::Sent } else { Start::Loop })
    }

    /// The server answered some of a quick transaction ([`Session::quick_start`]): forwards it
    /// and, once the transaction is over, releases the connection as [`Session::settle`] would.
    fn quick_answer(&mut self, topo_rx: &mut watch::Receiver<Topology>) -> Result<Answer, Fail> {
        let full = self.pump_server()?;
        // The newest term, for the release.
        self.refresh_topology(topo_rx);
        let Some(att) = self.attached.as_ref() else { return Ok(Answer::Loop) };
        if att.clean() {
            // The read-your-writes query, or a cancel request on its way: the loop's.
            let ryw = self.wants_lsn(att).is_some();
            return Ok(if !ryw && self.release_now() && self.idle_plain() { Answer::Idle } else { Answer::Loop });
        }
        // The client's socket is full, or it has more to read: the loop's.
        Ok(if full || !self.wbuf.is_empty() { Answer::Loop } else { Answer::Wait })
    }

    /// The unit [`Session::quick_start`] takes: all the client sent, as `(length, Execute count,
    /// what ends it)`.
    fn quick_unit(&self) -> Option<QuickUnit> {
        if self.held == 0 || self.held != self.rbuf.len() {
            return None;
        }
        let front = self.held_front()?;
        let (n, executes, kind) = match front.tag() {
            // Not a route command (`SET pgkeel.route`), which the proxy answers itself.
            b'Q' if !crate::router::may_be_route_command(front.body_slice()) => (front.len(), 1, Kind::Query),
            b'P' | b'B' => {
                let (n, executes) = self.front_unit()?;
                (n, executes, Kind::Sync)
            }
            _ => return None,
        };
        (n == self.held).then_some((n, executes, kind))
    }

    /// The forwarding loop. `Ok(true)`: the client went idle ([`Session::idle_plain`]);
    /// `Ok(false)`: it left. An idle client's socket is read where it waits
    /// ([`Session::poll_quiet`]), so the loop is entered with what it read, if anything.
    async fn busy(
        &mut self,
        topo_rx: &mut watch::Receiver<Topology>,
        kick: &mut crate::kick::Listener,
    ) -> Result<bool, Fail> {
        loop {
            self.refresh(topo_rx);
            // Shutting down: a client between transactions (or, in session mode, outside one)
            // is closed; one inside a transaction finishes it first.
            if self.shared.draining()
                && self
                    .attached
                    .as_ref()
                    .is_none_or(|a| self.pool_mode == PoolMode::Session && a.clean() && self.held == 0)
            {
                return Err(Fail::new(sqlstate::ADMIN_SHUTDOWN, "the proxy is shutting down; reconnect"));
            }
            if let Some(fail) = self.must_close() {
                return Err(fail);
            }
            self.read_held()?;
            let out_full = match self.pump_client().await? {
                // Terminate: the client is leaving; the server connection stays open for the pool.
                Pumped::Terminate => return Ok(false),
                Pumped::Full => true,
                Pumped::Done => false,
            };
            let wbuf_full = self.pump_server()?;
            // The newest term, for the release and the fencing below (the client's turn may
            // have waited for a server connection since the top of the loop).
            self.refresh_topology(topo_rx);
            if self.settle().await {
                continue;
            }
            // Fencing: nothing more goes to a primary of an older term than the newest seen.
            if let Some(att) = self.attached.as_ref().filter(|a| !a.out.is_empty()) {
                let newest = self.newest_term;
                if att.fenced(newest) && !self.abandon_lsn_fetch() {
                    return Err(self.term_changed(newest));
                }
            }
            self.write_now();
            // Frames held back while the other side's buffer was full, which `write_now` just
            // emptied: handed on now, as no socket event may come for them (the peer may have
            // sent all it had, and waits for them to be answered).
            if (out_full && self.attached.as_ref().is_some_and(|a| a.out.len() < HIGH_WATER))
                || (wbuf_full && self.wbuf.len() < HIGH_WATER)
            {
                continue;
            }
            if self.idle_plain() {
                return Ok(true);
            }
            if let Some(e) = self.wait_event(kick).await {
                match e {
                    Event::ClientRead(Ok(0))
                    | Event::ClientRead(Err(_))
                    | Event::ClientWrote(Ok(0))
                    | Event::ClientWrote(Err(_)) => {
                        // The client is gone (or cannot be written to).
                        return Ok(false);
                    }
                    Event::ClientRead(Ok(_)) => self.mark_active(),
                    Event::ClientWrote(Ok(n)) => self.wbuf.advance(n),
                    Event::ServerRead(Ok(0))
                    | Event::ServerRead(Err(_))
                    | Event::ServerWrote(Ok(0))
                    | Event::ServerWrote(Err(_)) => {
                        if self.abandon_lsn_fetch() {
                            continue;
                        }
                        let att = self.attached.take();
                        let lost = lost_work(att.as_ref());
                        let what = att
                            .map(|a| {
                                let role =
                                    if a.conn.role == ServerRole::Primary { "the primary" } else { "the replica" };
                                format!("{role} {} ({})", a.conn.member, a.conn.address)
                            })
                            .unwrap_or_default();
                        return Err(Fail::new(
                            sqlstate::CONNECTION_FAILURE,
                            format!("lost the connection to {what}; {lost}"),
                        ));
                    }
                    Event::ServerRead(Ok(_)) => {}
                    Event::ServerWrote(Ok(n)) => {
                        if let Some(att) = self.attached.as_mut() {
                            att.out.advance(n);
                        }
                    }
                    Event::Topology => {
                        self.refresh_topology(topo_rx);
                        let newest = self.newest_term;
                        if self.attached.as_ref().is_some_and(|a| a.fenced(newest)) && !self.abandon_lsn_fetch() {
                            return Err(self.term_changed(newest));
                        }
                        if let Some(fail) = self.replica_left(topo_rx) {
                            return Err(fail);
                        }
                    }
                }
            }
        }
    }

    /// Counts the whole client frames in the read buffer into `held`, up to the high-water
    /// mark, checking each one's length.
    fn read_held(&mut self) -> Result<(), Fail> {
        while self.held < HIGH_WATER {
            let rest = self.rbuf.get(self.held..).unwrap_or_default();
            match self.decoder.frame_len(rest) {
                Ok(Some(n)) => self.held += n,
                Ok(None) => break,
                Err(e) => return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, e.to_string())),
            }
        }
        Ok(())
    }

    /// The held client frames, oldest first.
    fn held_frames(&self) -> impl Iterator<Item = Msg<'_>> {
        let mut rest = self.rbuf.get(..self.held).unwrap_or_default();
        std::iter::from_fn(move || {
            let f = Msg::first(rest)?;
            rest = &rest[f.len()..];
            Some(f)
        })
    }

    /// The oldest held client frame.
    fn held_front(&self) -> Option<Msg<'_>> {
        self.held_frames().next()
    }

    /// Drops the oldest held client frame (handed on, answered or skipped).
    fn pop_held(&mut self) {
        if let Some(n) = self.held_front().map(Msg::len) {
            self.rbuf.advance(n);
            self.held -= n;
        }
    }

    /// The transaction status a reply of the proxy's own ends with (ReadyForQuery), when
    /// nothing sent to the attached server is still unanswered: idle without one.
    fn settled_status(&self) -> Option<TransactionStatus> {
        match &self.attached {
            None => Some(TransactionStatus::Idle),
            Some(a) if a.queue.is_empty() && !a.open_batch => Some(a.status),
            Some(_) => None,
        }
    }

    /// Hands held client frames to a server, attaching one for the next unit when needed.
    async fn pump_client(&mut self) -> Result<Pumped, Fail> {
        // The front frame was found not to be a route command (it stays in front while a
        // server is attached for it).
        let mut front_checked = false;
        let mut full = false;
        while let Some(front) = self.held_front() {
            let tag = front.tag();
            if tag == b'X' {
                return Ok(Pumped::Terminate);
            }
            if self.skip_to_sync && tag != b'S' {
                self.pop_held();
                front_checked = false;
                continue;
            }
            // The statement's end is looked for only when its start may be a route command.
            if tag == b'Q' && !front_checked && crate::router::may_be_route_command(front.body_slice()) {
                if let Some(cmd) = query_text(front).and_then(crate::router::route_command) {
                    // Answer after what was sent before.
                    let Some(status) = self.settled_status() else { break };
                    self.pop_held();
                    self.route_reply(cmd, status);
                    continue;
                }
            }
            // The same commands through the extended protocol (JDBC and Npgsql send everything
            // that way): a unit of their own is answered by the proxy, anything else refused.
            if tag == b'P' && !front_checked {
                if let Some(cmd) = query_text(front).and_then(crate::router::route_command) {
                    if let Some(att) = self.attached.as_mut().filter(|a| a.open_batch) {
                        // Inside a batch the server has started: an error in its place, and the
                        // rest of the batch skipped up to its Sync, as postgres does.
                        proxy_error(att, &mut self.skip_to_sync, sqlstate::FEATURE_NOT_SUPPORTED, ROUTE_UNIT_ALONE);
                        self.pop_held();
                        continue;
                    }
                    // Answer after what was sent before.
                    let Some(status) = self.settled_status() else { break };
                    let Some(n) = self.route_unit(cmd, status) else { break };
                    self.rbuf.advance(n);
                    self.held -= n;
                    continue;
                }
            }
            front_checked = true;
            if self.attached.is_none() {
                let Some(class) = self.held_unit() else { break };
                self.flush().await?;
                self.attached = Some(self.attach(class).await?);
                continue;
            }
            match self.step() {
                Step::Wait => {
                    full = self.attached.as_ref().is_some_and(|a| a.out.len() >= HIGH_WATER);
                    break;
                }
                Step::Reroute => Box::pin(self.release()).await,
                Step::Dispatch(class) => {
                    if let Some((n, executes)) = self.plain_unit() {
                        self.dispatch_unit(n, executes, class, Kind::Sync, false);
                    } else {
                        // Copied to the server from where it was read: the buffer is lent
                        // out for the call (taking it leaves an unallocated one in its place).
                        let rbuf = std::mem::take(&mut self.rbuf);
                        if let Some(f) = Msg::first(rbuf.get(..self.held).unwrap_or_default()) {
                            self.dispatch(f, class);
                        }
                        self.rbuf = rbuf;
                        self.pop_held();
                    }
                    front_checked = false;
                }
            }
        }
        let Session { attached, statements, wbuf, skip_to_sync, .. } = self;
        if let Some(att) = attached.as_mut() {
            drain_synthetic(att, statements, wbuf, skip_to_sync);
        }
        Ok(if full { Pumped::Full } else { Pumped::Done })
    }

    /// What to do with the next held frame while a server is attached.
    fn step(&self) -> Step {
        let (Some(att), Some(front)) = (self.attached.as_ref(), self.held_front()) else { return Step::Wait };
        if att.fetching_lsn() || att.out.len() >= HIGH_WATER {
            return Step::Wait;
        }
        if !self.splitting() {
            return Step::Dispatch(self.classifying().then(|| self.frame_class(front, self.unnamed_class)).flatten());
        }
        let class = self.frame_class(front, self.unnamed_class);
        if att.conn.role == ServerRole::Replica && !att.open_batch && class.is_some() {
            // A new unit while a replica is attached: it stays there only if it reads.
            match self.held_unit() {
                None => return Step::Wait,
                Some(Class::Begin | Class::Write) if att.status == TransactionStatus::Idle => {
                    return if att.queue.is_empty() { Step::Reroute } else { Step::Wait };
                }
                // Inside a transaction on the replica (BEGIN READ ONLY): the server refuses
                // writes itself.
                _ => {}
            }
        }
        Step::Dispatch(class)
    }

    /// The length and the Execute count of the extended-protocol unit at the front of `held`
    /// when it can go to the
    /// attached server as it is, in one piece: Parse, Bind, Describe and Execute messages
    /// that name no statement the proxy translates, then their Sync, all held, with no batch
    /// open before them. Everything the server answers to such a unit goes to the client and
    /// ends with the Sync's ReadyForQuery (after an error too: the server skips to the Sync),
    /// so one queue entry, the Sync's, tracks the whole unit. It is what pgbench's `extended`
    /// mode sends, and JDBC and psycopg for a statement not prepared yet (tokio-postgres
    /// names its statements, which the proxy translates in transaction mode), and it costs
    /// one copy and one entry instead of one of each per message.
    fn plain_unit(&self) -> Option<(usize, u64)> {
        let att = self.attached.as_ref()?;
        if att.open_batch {
            return None;
        }
        let (n, executes) = self.front_unit()?;
        (att.out.len() + n <= HIGH_WATER).then_some((n, executes))
    }

    /// [`Session::plain_unit`]'s frames, whatever is attached: the length and the Execute
    /// count of the plain extended-protocol unit at the front of `held`, if there is one.
    fn front_unit(&self) -> Option<(usize, u64)> {
        let translate = self.translating();
        let held = self.rbuf.get(..self.held)?;
        let (mut at, mut executes) = (0, 0);
        while let Some(f) = held.get(at..).and_then(Msg::first) {
            let body = f.body_slice();
            // Each first as the unnamed statement (and portal) looks, which is what they mostly
            // are: a Parse whose name ends at once, a Bind of two empty names, a Describe of
            // nothing but an empty name.
            let plain = match f.tag() {
                // Not what may be a route command, which the proxy answers or refuses
                // (`pump_client`, message by message): a statement that starts with SET, SHOW or
                // RESET.
                b'P' if crate::router::may_be_route_command(
                    body.get(parse_name(f).map_or(0, |n| n.len() + 1)..).unwrap_or_default(),
                ) =>
                {
                    false
                }
                b'P' => body.first() == Some(&0) || parse_name(f).is_some_and(|n| n.is_empty() || !translate),
                b'B' => {
                    body.starts_with(&[0, 0])
                        || prepared::bind_statement(body).is_some_and(|n| n.is_empty() || !translate)
                }
                b'D' => {
                    matches!(body, [b'P' | b'S', 0])
                        || prepared::target_and_name(body).is_some_and(|(t, n)| t == b'P' || n.is_empty() || !translate)
                }
                b'E' => {
                    executes += 1;
                    true
                }
                b'S' => return (at > 0).then_some((at + f.len(), executes)),
                _ => false,
            };
            if !plain {
                return None;
            }
            at += f.len();
        }
        None
    }

    /// Sends the unit of the first `n` held bytes, with `executes` Execute messages (see
    /// [`Session::plain_unit`]), with the bookkeeping [`Session::dispatch`] does for each of
    /// its messages; `class` is its first message's. `kind`: what ends it, a Sync or (one
    /// simple Query, from [`Session::quick_start`]) the Query itself. `send`: the caller
    /// checked the fencing, so the unit may go to the server socket at once, straight from the
    /// client's buffer, when nothing is queued for the server before it.
    fn dispatch_unit(&mut self, n: usize, executes: u64, class: Option<Class>, kind: Kind, send: bool) {
        let mut unnamed = self.unnamed_class;
        let mut write = class == Some(Class::Write);
        // Messages have classes only when classifying (`step`): then, as each one's would be.
        if self.classifying() {
            let mut rest = self.rbuf.get(..n).unwrap_or_default();
            let mut first = true;
            while let Some(f) = Msg::first(rest) {
                rest = &rest[f.len()..];
                let class = if std::mem::take(&mut first) { class } else { self.frame_class(f, unnamed) };
                if let (b'P', Some(c)) = (f.tag(), class) {
                    if parse_name(f).is_some_and(<[u8]>::is_empty) {
                        unnamed = c;
                    }
                }
                write |= class == Some(Class::Write);
            }
        }
        let Session { attached, rbuf, held, unnamed_class, skip_to_sync, .. } = self;
        let Some(att) = attached.as_mut() else { return };
        if write && att.conn.role == ServerRole::Primary {
            att.wrote = true;
        }
        if executes > 0 {
            att.slot.pool().stats.queries.fetch_add(executes, Ordering::Relaxed);
        }
        if send && att.out.is_empty() {
            send_or_keep(&att.conn.stream, &mut att.out, &rbuf[..n]);
        } else {
            att.out.extend_from_slice(&rbuf[..n]);
        }
        att.push_plain(Expect::Client(kind));
        *unnamed_class = unnamed;
        *skip_to_sync = false;
        rbuf.advance(n);
        *held -= n;
    }

    /// Sends one client frame to the attached server, translating prepared statement names
    /// in transaction mode, and queues what comes back for it.
    fn dispatch(&mut self, frame: Msg<'_>, class: Option<Class>) {
        let translate = self.translating();
        let max = self.cfg.max_prepared_statements as usize;
        let Session { attached, statements, unnamed_class, skip_to_sync, .. } = self;
        let Some(att) = attached.as_mut() else { return };
        if class == Some(Class::Write) && att.conn.role == ServerRole::Primary {
            att.wrote = true;
        }
        if matches!(frame.tag(), b'Q' | b'E') {
            att.slot.pool().stats.queries.fetch_add(1, Ordering::Relaxed);
        }
        let body = frame.body_slice();
        let forward = |att: &mut Attached, kind: Option<Kind>| {
            att.out.extend_from_slice(frame.as_bytes());
            if let Some(k) = kind {
                att.push_plain(Expect::Client(k));
            }
        };
        match frame.tag() {
            b'P' => {
                att.open_batch = true;
                let name = parse_name(frame);
                match name {
                    Some(n) if !n.is_empty() && translate => {
                        if statements.contains_key(n) {
                            let msg = format!("prepared statement \"{}\" already exists", String::from_utf8_lossy(n));
                            proxy_error(att, skip_to_sync, sqlstate::DUPLICATE_PREPARED_STATEMENT, &msg);
                            return;
                        }
                        let n = Bytes::copy_from_slice(n);
                        let parsed =
                            FrontendMessage::parse(&Frame::copy_from_slice(frame.as_bytes()), AuthExpect::None);
                        let Ok(FrontendMessage::Parse(p)) = parsed else {
                            // Malformed: the server says what is wrong.
                            forward(att, Some(Kind::Parse));
                            return;
                        };
                        let def = Arc::new(StmtDef::new(p.query, p.param_types));
                        if let Some(c) = class {
                            let _ = def.class.set(c);
                        }
                        statements.insert(n.clone(), def.clone());
                        if att.conn.statements.has(&def) {
                            let mut b = BytesMut::new();
                            BackendMessage::ParseComplete.encode(&mut b);
                            att.push(
                                Expect::Synthetic(Box::new(b.freeze())),
                                Undo::Parse { client: Some(n), server: None },
                            );
                        } else {
                            make_room(att, &def, max);
                            def.encode_parse(&mut att.out);
                            att.conn.statements.insert(def.clone());
                            let undo = Undo::Parse { client: Some(n), server: Some(def.server_name.clone()) };
                            att.push(Expect::Client(Kind::Parse), undo);
                        }
                    }
                    _ => {
                        if let (Some(n), Some(c)) = (&name, class) {
                            if n.is_empty() {
                                *unnamed_class = c;
                            }
                        }
                        forward(att, Some(Kind::Parse));
                    }
                }
            }
            b'B' => {
                att.open_batch = true;
                if let Some(name) = prepared::bind_statement(body).filter(|n| translate && !n.is_empty()) {
                    let Some(def) = statements.get(name).cloned() else {
                        let msg = format!("prepared statement \"{}\" does not exist", String::from_utf8_lossy(name));
                        proxy_error(att, skip_to_sync, sqlstate::INVALID_SQL_STATEMENT_NAME, &msg);
                        return;
                    };
                    ensure_prepared(att, &def, max);
                    if prepared::rewrite_bind(body, &def.server_name, &mut att.out) {
                        att.push_plain(Expect::Client(Kind::Bind));
                        return;
                    }
                }
                forward(att, Some(Kind::Bind));
            }
            b'D' | b'C' => {
                att.open_batch = true;
                let is_close = frame.tag() == b'C';
                let kind = if is_close { Kind::Close } else { Kind::Describe };
                if let Some((b'S', name)) = prepared::target_and_name(body).filter(|(_, n)| translate && !n.is_empty())
                {
                    if is_close {
                        // The statement stays on the server for the next client.
                        let k = prepared::key(name);
                        let undo = match statements.remove(&k) {
                            Some(def) => Undo::Close { client: k, def },
                            None => Undo::None,
                        };
                        let mut b = BytesMut::new();
                        BackendMessage::CloseComplete.encode(&mut b);
                        att.push(Expect::Synthetic(Box::new(b.freeze())), undo);
                        return;
                    }
                    let Some(def) = statements.get(name).cloned() else {
                        let msg = format!("prepared statement \"{}\" does not exist", String::from_utf8_lossy(name));
                        proxy_error(att, skip_to_sync, sqlstate::INVALID_SQL_STATEMENT_NAME, &msg);
                        return;
                    };
                    ensure_prepared(att, &def, max);
                    prepared::encode_describe(&def.server_name, &mut att.out);
                    att.push_plain(Expect::Client(kind));
                    return;
                }
                forward(att, Some(kind));
            }
            b'E' => {
                att.open_batch = true;
                forward(att, Some(Kind::Execute));
            }
            b'S' => {
                *skip_to_sync = false;
                att.open_batch = false;
                forward(att, Some(Kind::Sync));
            }
            b'Q' => forward(att, Some(Kind::Query)),
            b'F' => forward(att, Some(Kind::FunctionCall)),
            // Flush, COPY data: nothing comes back for them.
            _ => forward(att, None),
        }
    }

    /// Reads whole server frames and handles them (see [`Session::on_server_frame`]), in
    /// place: forwarded ones are written to the client from the server's buffer when nothing
    /// else waits for the client, and copied once, into the client's buffer, otherwise.
    /// `true` when it stopped at the client's high-water mark.
    fn pump_server(&mut self) -> Result<bool, Fail> {
        let decoder = crate::protocol::BackendDecoder::default();
        let translate = self.attached.is_some() && self.translating();
        let share = self.cfg.read_your_writes == ReadYourWrites::User && self.tracks_writes();
        let Some(att) = self.attached.as_mut() else { return Ok(false) };
        let one_unit = att.queue.len() == 1
            && matches!(att.queue.front().map(|e| &e.expect), Some(Expect::Client(k)) if k.ends_with_ready());
        if one_unit && self.wbuf.is_empty() {
            if let Some(status) = whole_answer(&att.conn.rbuf, translate, decoder.limits.max_message_len) {
                // What the loop below would do with it, message by message: forward
                // everything, end the entry at the ReadyForQuery.
                if share {
                    note_commit(att, self.pool.as_ref(), status);
                }
                send_or_keep(&self.stream, &mut self.wbuf, &att.conn.rbuf);
                att.conn.rbuf.clear();
                att.queue.pop_front();
                att.status = status;
                return Ok(false);
            }
        }
        let mut rbuf = std::mem::take(&mut att.conn.rbuf);
        let mut at = 0;
        let mut pass = None;
        let mut full = false;
        while self.attached.is_some() {
            if self.wbuf.len() + pass.as_ref().map_or(0, Range::len) >= HIGH_WATER {
                full = true;
                break;
            }
            match decoder.frame_len(&rbuf[at..]) {
                Ok(Some(n)) => {
                    if self.attached.as_ref().is_some_and(|a| passes_through(a, rbuf[at])) {
                        pass_on(&mut self.wbuf, &rbuf, at..at + n, &mut pass);
                    } else {
                        self.on_server_frame(&rbuf, at..at + n, &mut pass, translate, share);
                    }
                    at += n;
                }
                Ok(None) => break,
                Err(e) => {
                    copy_pass(&mut self.wbuf, &rbuf, &mut pass);
                    let member = self.attached.take().map(|a| a.conn.member.clone()).unwrap_or_default();
                    let msg = format!("protocol error from the server {member}: {e}");
                    return Err(Fail::new(sqlstate::PROTOCOL_VIOLATION, msg));
                }
            }
        }
        if let Some(r) = pass {
            // Straight from the server's buffer.
            send_or_keep(&self.stream, &mut self.wbuf, &rbuf[r]);
        }
        rbuf.advance(at);
        if let Some(att) = self.attached.as_mut() {
            att.conn.rbuf = rbuf;
        }
        Ok(full)
    }

    /// One whole server message, `rbuf[range]`: forwarded or dropped as the queue says, with
    /// the bookkeeping. Forwarded messages go to the client as they are: while nothing else
    /// is waiting for the client, they are only noted in `pass` (a range of `rbuf`, written
    /// from there by [`Session::pump_server`]), and copied otherwise (see [`pass_on`]).
    /// `translate`: statement names are translated; `share`: commits are noted in the user's
    /// read-your-writes floor ([`note_commit`]).
    fn on_server_frame(
        &mut self,
        rbuf: &[u8],
        range: Range<usize>,
        pass: &mut Option<Range<usize>>,
        translate: bool,
        share: bool,
    ) {
        let Session { attached, statements, wbuf, desired, told, skip_to_sync, ryw_floor, pool, pool_mode, .. } = self;
        let Some(att) = attached.as_mut() else { return };
        let frame = &rbuf[range.clone()];
        let tag = frame[0];
        let body = &frame[5..];
        if tag == b'S' {
            if let Ok(BackendMessage::ParameterStatus { name, value }) =
                BackendMessage::parse(&Frame::copy_from_slice(frame))
            {
                let (name, value) = (name.to_string_lossy().into_owned(), value.to_string_lossy().into_owned());
                if let Some(canon) = Tracked::canonical(&name) {
                    desired.set(canon, &value);
                    told.set(canon, &value);
                }
                att.conn.params.insert(name, value);
            }
            pass_on(wbuf, rbuf, range, pass);
            return;
        }
        let status = match body.first() {
            Some(b'T') => TransactionStatus::InTransaction,
            Some(b'E') => TransactionStatus::Failed,
            _ => TransactionStatus::Idle,
        };
        /// What the frame answers.
        enum Head {
            Lsn,
            Answer { to_client: bool, kind: Kind },
            Nothing,
        }
        let head = match att.queue.front().map(|e| &e.expect) {
            Some(Expect::Lsn) => Head::Lsn,
            Some(Expect::Client(k)) => Head::Answer { to_client: true, kind: *k },
            Some(Expect::Injected(k)) => Head::Answer { to_client: false, kind: *k },
            // Synthetic entries were sent already (drain_synthetic).
            Some(Expect::Synthetic(_) | Expect::SyntheticError(_)) | None => Head::Nothing,
        };
        match head {
            // The proxy's own LSN query: read the row, forward nothing.
            Head::Lsn => match tag {
                b'D' => {
                    if let Ok(BackendMessage::DataRow(values)) = BackendMessage::parse(&Frame::copy_from_slice(frame)) {
                        att.lsn = row_lsn(&values);
                    }
                }
                b'E' => lsn_query_failed(&att.conn),
                b'Z' => {
                    att.queue.pop_front();
                    att.status = status;
                    let lsn = att.lsn.take();
                    *ryw_floor = match lsn {
                        Some(l) if *ryw_floor != UNKNOWN_LSN => (*ryw_floor).max(l),
                        Some(l) => l,
                        None => UNKNOWN_LSN,
                    };
                    if let Some(pending) = att.pending.take() {
                        pending.resolve(lsn);
                    }
                }
                _ => {}
            },
            Head::Answer { to_client, kind } => {
                if to_client || matches!(tag, b'E' | b'N' | b'A') {
                    pass_on(wbuf, rbuf, range, pass);
                }
                if tag == b'E' {
                    att.slot.pool().stats.errors.fetch_add(1, Ordering::Relaxed);
                }
                if tag == b'Z' && share {
                    note_commit(att, pool.as_ref(), status);
                }
                if translate && tag == b'C' && to_client && drops_statements(body) {
                    att.conn.statements.clear();
                    statements.clear();
                }
                if tag == b'E' && !kind.ends_with_ready() {
                    if let Some(failed) = att.queue.pop_front() {
                        if skip_batch(failed, att, statements) {
                            *skip_to_sync = true;
                        }
                    }
                } else if kind.done_by(tag) {
                    att.queue.pop_front();
                    if tag == b'Z' {
                        att.status = status;
                    }
                } else if tag == b'Z' {
                    // Out of step (should not happen): ReadyForQuery ends everything up to
                    // the next entry it answers.
                    let mut skipped = Vec::new();
                    while let Some(e) = att.queue.pop_front() {
                        let ready = matches!(e.expect, Expect::Client(k) | Expect::Injected(k) if k.ends_with_ready());
                        skipped.push(e);
                        if ready {
                            break;
                        }
                    }
                    undo_all(skipped, att, statements);
                    att.status = status;
                }
            }
            // An error between the client's transactions in transaction mode: the backend is
            // ending (a FATAL, then the end of the stream), typically as its postmaster died
            // or shut down, just after it answered the client. The client's session goes on
            // on another connection: told, it would take the error for the answer to its next
            // statement (and a client such as pgbench ends there) while that statement runs.
            // Inside the client's transaction (`idle_in_transaction_session_timeout`), and
            // in session mode, where the backend is the client's, it is the client's to see.
            Head::Nothing
                if tag == b'E'
                    && *pool_mode == PoolMode::Transaction
                    && att.status == TransactionStatus::Idle
                    && !att.open_batch =>
            {
                let error = BackendMessage::parse(&Frame::copy_from_slice(frame))
                    .ok()
                    .and_then(|m| match m {
                        BackendMessage::ErrorResponse(fields) => Some(describe(&fields)),
                        _ => None,
                    })
                    .unwrap_or_default();
                tracing::info!(server = ?att.conn, %error, "the server sent an error between transactions; the connection is closed, the client carries on");
                att.ending = true;
            }
            // Nothing expected: a notification or a notice between transactions.
            Head::Nothing => {
                pass_on(wbuf, rbuf, range, pass);
                if tag == b'Z' {
                    att.status = status;
                }
            }
        }
        if synthetic_next(att) {
            // The proxy's own answers come after what was forwarded.
            copy_pass(wbuf, rbuf, pass);
            drain_synthetic_slow(att, statements, wbuf, skip_to_sync);
        }
    }

    /// In transaction mode, gives a clean server connection back; first, when the client
    /// wrote on the primary (or its floor is unknown, [`Session::wants_lsn`]), reads the
    /// primary's WAL position for read-your-writes. `true` when the connection was released.
    async fn settle(&mut self) -> bool {
        if !self.attached.as_ref().is_some_and(|a| a.clean()) {
            return false;
        }
        if self.pool_mode == PoolMode::Session {
            return false;
        }
        if self.attached.as_ref().is_some_and(|a| a.ending) {
            // No position to read from a backend that is ending: the client's reads go to the
            // primary until it is known again (as when the LSN query is lost).
            if self.attached.as_ref().and_then(|a| self.wants_lsn(a)).is_some() {
                self.ryw_floor = UNKNOWN_LSN;
            }
            Box::pin(self.release()).await;
            return true;
        }
        let Some(recover) = self.attached.as_ref().and_then(|a| self.wants_lsn(a)) else {
            if !self.release_now() {
                Box::pin(self.release()).await;
            }
            return true;
        };
        let shared_lost = recover && self.user_floor().is_some_and(|f| f.lost());
        let Some(att) = self.attached.as_mut() else { return false };
        if shared_lost {
            // A ticket after the loss: the position read now covers the lost write.
            att.pending = self.pool.as_ref().map(|p| p.ryw.begin());
        }
        att.wrote = false;
        FrontendMessage::Query(Text::from_static("select pg_current_wal_lsn()::text")).encode(&mut att.out);
        att.push_plain(Expect::Lsn);
        false
    }

    /// Whether the proxy's LSN query follows the attached connection's transaction (in
    /// transaction mode, on a cluster with replicas): `Some(false)` after a write
    /// (read-your-writes), `Some(true)` on the primary while the client's floor, or its
    /// user's, is unknown (a write's position was lost, e.g. in a failover): the primary's
    /// position now covers whatever was written before, so the reads can go back to replicas.
    fn wants_lsn(&self, att: &Attached) -> Option<bool> {
        if !self.tracks_writes() {
            return None;
        }
        if att.wrote {
            return Some(false);
        }
        let lost = att.conn.role == ServerRole::Primary
            && (self.ryw_floor == UNKNOWN_LSN || self.user_floor().is_some_and(|f| f.lost()));
        lost.then_some(true)
    }

    /// The floor of the client's database and user, with `read_your_writes = "user"`.
    fn user_floor(&self) -> Option<&crate::ryw::UserFloor> {
        (self.cfg.read_your_writes == ReadYourWrites::User).then_some(())?;
        self.pool.as_deref().map(|p| &*p.ryw)
    }

    /// [`Session::release`] of a clean transaction-mode connection when it needs no waiting
    /// (no cleanup query, no cancel request in flight): `false` when the full release is needed.
    fn release_now(&mut self) -> bool {
        let Some(att) = self.attached.as_ref() else { return true };
        // `newest_term` is as of this turn's refresh (the caller's, in the forwarding loop).
        if !att.clean() || !att.conn.rbuf.is_empty() || att.fenced(self.newest_term) || att.ending {
            return false;
        }
        let target = match &self.info {
            Some(info) => match info.cancel.try_detach() {
                Ok(target) => target,
                Err(_) => return false,
            },
            None => None,
        };
        if let Some(mut att) = self.attached.take() {
            if let Some(target) = target {
                att.conn.return_cancel_target(target);
            }
            att.into_pool();
        }
        true
    }

    /// When the server connection fails (or is fenced) while only the proxy's LSN query is in
    /// flight, the client lost nothing: drop the connection quietly. The client's last write
    /// position is unknown then, so its reads go to the primary until its next write. `false`
    /// when something of the client's was in flight.
    fn abandon_lsn_fetch(&mut self) -> bool {
        if !self.attached.as_ref().is_some_and(|a| a.fetching_lsn() && a.queue.len() == 1 && !a.open_batch) {
            return false;
        }
        if let Some(att) = self.attached.take() {
            tracing::info!(server = ?att.conn, "lost the server connection during the read-your-writes query; this client reads on the primary until its next write");
        }
        self.set_cancel(None);
        self.ryw_floor = UNKNOWN_LSN;
        true
    }

    /// Answers an extended-protocol unit whose Parse carries `cmd` (a `SET`/`RESET`/`SHOW
    /// pgkeel.route`, see [`Session::pump_client`]) itself, as postgres would answer the
    /// statement, when the unit is whole: its bytes, `None` while its Sync is not held yet. A
    /// named statement, or any message but Bind, Describe, Execute and Flush before the Sync,
    /// gets an error instead (the statement would otherwise reach postgres later, where
    /// `pgkeel.route` means nothing).
    fn route_unit(&mut self, cmd: RouteCommand, status: TransactionStatus) -> Option<usize> {
        // Each message's tag, and whether a Describe is of the statement; the unit's length;
        // whether it is an unnamed statement into the unnamed portal; whether its Sync is held.
        let (mut tags, mut n, mut alone, mut whole) = (Vec::new(), 0, true, false);
        for f in self.held_frames() {
            let body = f.body_slice();
            alone &= match f.tag() {
                b'P' => tags.is_empty() && body.first() == Some(&0),
                b'B' => body.starts_with(&[0, 0]),
                b'D' => matches!(body, [b'S' | b'P', 0]),
                b'E' | b'H' | b'S' => true,
                _ => false,
            };
            tags.push((f.tag(), body.first() == Some(&b'S')));
            n += f.len();
            if f.tag() == b'S' {
                whole = true;
                break;
            }
        }
        if !whole {
            if self.held < HIGH_WATER {
                return None;
            }
            // No Sync within the high-water mark: refuse what is held, and skip to the Sync
            // (a server answers it).
            self.skip_to_sync = true;
            self.route_unit_refused(None);
            return Some(self.held);
        }
        if !alone {
            self.route_unit_refused(Some(status));
            return Some(n);
        }
        let show = matches!(cmd, RouteCommand::Show);
        let mut failed = false;
        for (tag, statement) in tags {
            match tag {
                _ if failed && tag != b'S' => {}
                b'P' => BackendMessage::ParseComplete.encode(&mut self.wbuf),
                b'B' => BackendMessage::BindComplete.encode(&mut self.wbuf),
                b'D' => {
                    if statement {
                        BackendMessage::ParameterDescription(Vec::new()).encode(&mut self.wbuf);
                    }
                    if show {
                        route_row_description().encode(&mut self.wbuf);
                    } else {
                        BackendMessage::NoData.encode(&mut self.wbuf);
                    }
                }
                b'E' => failed = !self.route_execute(cmd.clone()),
                b'S' => BackendMessage::ReadyForQuery(status).encode(&mut self.wbuf),
                _ => {}
            }
        }
        Some(n)
    }

    /// The error for a route command in an extended-protocol unit it does not have to itself,
    /// and the unit's ReadyForQuery with `status` (`None`: a server answers the Sync).
    fn route_unit_refused(&mut self, status: Option<TransactionStatus>) {
        BackendMessage::error(Severity::Error, sqlstate::FEATURE_NOT_SUPPORTED, ROUTE_UNIT_ALONE)
            .encode(&mut self.wbuf);
        if let Some(status) = status {
            BackendMessage::ReadyForQuery(status).encode(&mut self.wbuf);
        }
    }

    /// Runs a route command: its result rows and CommandComplete, or its error; `false` for
    /// an error.
    fn route_execute(&mut self, cmd: RouteCommand) -> bool {
        let tag = match cmd {
            RouteCommand::Set(m) => {
                self.mode = m;
                "SET"
            }
            RouteCommand::Reset => {
                self.mode = self.listener_mode;
                "RESET"
            }
            RouteCommand::Show => {
                BackendMessage::DataRow(vec![Some(Bytes::from_static(self.mode.as_str().as_bytes()))])
                    .encode(&mut self.wbuf);
                "SHOW"
            }
            RouteCommand::Invalid(msg) => {
                BackendMessage::error(Severity::Error, sqlstate::INVALID_PARAMETER_VALUE, &msg).encode(&mut self.wbuf);
                return false;
            }
        };
        tracing::debug!(client = %self.peer, route = self.mode.as_str(), "pgkeel.route");
        BackendMessage::CommandComplete { tag: Text::from_static(tag) }.encode(&mut self.wbuf);
        true
    }

    /// Answers a `SET`/`RESET`/`SHOW pgkeel.route` itself.
    fn route_reply(&mut self, cmd: RouteCommand, status: TransactionStatus) {
        if matches!(cmd, RouteCommand::Show) {
            route_row_description().encode(&mut self.wbuf);
        }
        self.route_execute(cmd);
        BackendMessage::ReadyForQuery(status).encode(&mut self.wbuf);
    }

    /// Drops the attached replica connection, with the client's read or read-only transaction
    /// in flight on it, when the replica has left the cluster (its member record expired: its
    /// machine is down or cut off). A replica cut off answers nothing and resets nothing, so
    /// without this the client waits for TCP keepalive (`tcp_keepidle`, 2 minutes with the
    /// defaults) to tell; a replica whose record is there but that is briefly not eligible
    /// (re-following a new primary) keeps its sessions.
    fn replica_left(&mut self, topo_rx: &watch::Receiver<Topology>) -> Option<Fail> {
        let att = self.attached.as_ref().filter(|a| a.conn.role == ServerRole::Replica && !a.clean())?;
        if topo_rx.borrow().has_member(&att.conn.member) {
            return None;
        }
        let att = self.attached.take()?;
        let lost = if att.queue.iter().any(|e| matches!(e.expect, Expect::Client(_))) {
            "what it sent is unanswered (a replica writes nothing): reconnect and retry"
        } else {
            "the open transaction is lost, reconnect and retry"
        };
        tracing::info!(replica = %att.conn.member, address = %att.conn.address, "a session's replica left the cluster; ending the session");
        Some(Fail::new(
            sqlstate::CONNECTION_FAILURE,
            format!(
                "the replica {} ({}) left the cluster (its agent stopped publishing: its machine is down or cut off) while this session used it; {lost}",
                att.conn.member, att.conn.address
            ),
        ))
    }

    /// Drops the attached server connection of an older term and says why.
    fn term_changed(&mut self, newest: u64) -> Fail {
        let att = self.attached.take();
        let lost = lost_work(att.as_ref());
        let (term, member) = att.map(|a| (a.conn.term, a.conn.member)).unwrap_or_default();
        Fail::new(
            sqlstate::CONNECTION_FAILURE,
            format!("the primary changed (term {term} -> {newest}) while this session used {member}; {lost}"),
        )
    }

    /// Writes what is buffered for the client and for the server now, as far as the sockets
    /// take it without waiting (plain TCP; TLS streams go through [`pump`]). A transaction then
    /// needs no extra round through [`Session::wait_event`] per write. An error is left for
    /// `pump` to report: the next write attempt fails the same way.
    fn write_now(&mut self) {
        if !self.wbuf.is_empty() {
            if let Stream::Plain(tcp) = &self.stream {
                if let Ok(n) = crate::tls::try_send(tcp, &self.wbuf) {
                    self.wbuf.advance(n);
                }
            }
        }
        if let Some(att) = self.attached.as_mut().filter(|a| !a.out.is_empty()) {
            if let Stream::Plain(tcp) = &att.conn.stream {
                if let Ok(n) = crate::tls::try_send(tcp, &att.out) {
                    att.out.advance(n);
                }
            }
        }
    }

    /// Waits for the next I/O event. `None` when there was nothing to wait for (never in
    /// practice: the client can always be read or written).
    async fn wait_event(&mut self, kick: &mut crate::kick::Listener) -> Option<Event> {
        let drained = self.shared.draining();
        let read_client = self.held < HIGH_WATER;
        let write_client = !self.wbuf.is_empty();
        room_to_read(&mut self.rbuf);
        let client = pump(&mut self.stream, &mut self.rbuf, &self.wbuf, read_client, write_client);
        match self.attached.as_mut() {
            None => {
                if !read_client && !write_client && drained {
                    return None;
                }
                tokio::select! {
                    biased;
                    (read, r) = client => Some(if read { Event::ClientRead(r) } else { Event::ClientWrote(r) }),
                    _ = kick.kicked(&self.shared.kick) => Some(Event::Topology),
                }
            }
            Some(att) => {
                let read_server = self.wbuf.len() < HIGH_WATER;
                let write_server = !att.out.is_empty();
                room_to_read(&mut att.conn.rbuf);
                let server = pump(&mut att.conn.stream, &mut att.conn.rbuf, &att.out, read_server, write_server);
                // In this order, no random pick: the server first, as a client waits for its
                // reply far more often than it sends while one is coming. Neither side can
                // starve the other: reading stops at HIGH_WATER, and writing empties a buffer.
                tokio::select! {
                    biased;
                    (read, r) = server => Some(if read { Event::ServerRead(r) } else { Event::ServerWrote(r) }),
                    (read, r) = client => Some(if read { Event::ClientRead(r) } else { Event::ClientWrote(r) }),
                    _ = kick.kicked(&self.shared.kick) => Some(Event::Topology),
                }
            }
        }
    }

    /// End of the session: give the server connection back (or close it), say goodbye.
    async fn finish(&mut self) {
        Box::pin(self.release()).await;
        if let Some(info) = &self.info {
            self.shared.unregister(info.pid);
        }
        if !self.wbuf.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.stream.write_all(&self.wbuf)).await;
        }
        let _ = self.stream.shutdown().await;
    }
}

/// Allocations a busy client needs and an idle one gives up, kept per runtime thread for the
/// next client that has work: a busy client goes idle between every two transactions, and
/// taking one from here is cheaper than allocating (and faulting in) a fresh one. Few are
/// kept, so idle clients still cost none of them (docs/benchmarks.md, "Proxy").
mod spares {
    use std::cell::RefCell;

    use bytes::BytesMut;

    /// Kept per runtime thread: enough for 32 clients between two transactions at
    /// the same moment. With 16, `pgbench -S -c 32` allocated (and freed) an 8 KiB buffer
    /// every 3-4 transactions, as more clients than that went idle at once (counted with a
    /// `perf probe` on malloc). More would cost memory whenever many clients are idle
    /// (16 KiB per kit: 512 KiB at most), which is when nobody needs them.
    const KEEP: usize = 32;
    /// The size of a new client buffer.
    const SIZE: usize = 8192;

    thread_local! {
        static KITS: RefCell<Vec<Kit>> = const { RefCell::new(Vec::new()) };
    }

    /// What a client needs while busy: its read and write buffers, given up and taken back
    /// together (once per transaction).
    pub struct Kit {
        pub rbuf: BytesMut,
        pub wbuf: BytesMut,
    }

    fn keep<T>(list: &'static std::thread::LocalKey<RefCell<Vec<T>>>, v: T) {
        list.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push(v);
            }
        });
    }

    /// A client buffer worth keeping, emptied: not unallocated, not very large (the
    /// taker's `reserve` gets a partly used one back to full size).
    fn buffer(mut buf: BytesMut) -> BytesMut {
        if buf.capacity() == 0 || buf.capacity() > 4 * SIZE {
            return BytesMut::new();
        }
        buf.clear();
        buf
    }

    /// Keeps a client's kit for reuse if there is room.
    pub fn give_kit(kit: Kit) {
        if kit.rbuf.capacity() == 0 && kit.wbuf.capacity() == 0 {
            return;
        }
        keep(&KITS, Kit { rbuf: buffer(kit.rbuf), wbuf: buffer(kit.wbuf) });
    }

    /// A kept kit, or new buffers.
    pub fn take_kit() -> Kit {
        let mut kit =
            KITS.with(|s| s.borrow_mut().pop()).unwrap_or_else(|| Kit { rbuf: BytesMut::new(), wbuf: BytesMut::new() });
        for b in [&mut kit.rbuf, &mut kit.wbuf] {
            if b.capacity() == 0 {
                *b = BytesMut::with_capacity(SIZE);
            }
        }
        kit
    }
}

/// Waits until `stream` can take some of `out` (when `write`) or gave bytes into `rbuf`
/// (when `read`): `(true, result)` for a read, `(false, result)` for a write. One future
/// polls both directions of one stream, which works for TLS streams as for sockets. Writes
/// come first, so output drains before more input is taken; with nothing to write, data TLS
/// still buffers is flushed.
async fn pump(
    stream: &mut Stream,
    rbuf: &mut BytesMut,
    out: &[u8],
    read: bool,
    write: bool,
) -> (bool, std::io::Result<usize>) {
    std::future::poll_fn(|cx| {
        if write {
            if let std::task::Poll::Ready(r) = stream.poll_write_bytes(cx, out) {
                return std::task::Poll::Ready((false, r));
            }
        } else if let std::task::Poll::Ready(Err(e)) = stream.poll_flush_bytes(cx) {
            return std::task::Poll::Ready((false, Err(e)));
        }
        if read {
            if let std::task::Poll::Ready(r) = stream.poll_read_bytes(cx, rbuf) {
                return std::task::Poll::Ready((true, r));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Room in `buf` for the next read: 8 KiB when it has less than [`MIN_ROOM`]. Not on every
/// read: `reserve` of a buffer that was ever split (a server connection's, by its login)
/// reads the reference count of its shared allocation, a cache line seldom at hand.
#[inline]
fn room_to_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_ROOM {
        buf.reserve(8192);
    }
}

/// Sends the proxy's own answers that have reached the head of the queue.
#[inline]
fn drain_synthetic(
    att: &mut Attached,
    statements: &mut HashMap<Bytes, Arc<StmtDef>>,
    wbuf: &mut BytesMut,
    skip_to_sync: &mut bool,
) {
    if synthetic_next(att) {
        drain_synthetic_slow(att, statements, wbuf, skip_to_sync);
    }
}

/// Whether a server message with `tag` only goes on to the client, as
/// [`Session::on_server_frame`] would forward it with nothing to note: a DataRow, or a
/// RowDescription that does not answer a Describe, for a client's message. Checked for every
/// server message: most of a result is these.
#[inline]
fn passes_through(att: &Attached, tag: u8) -> bool {
    match att.queue.front().map(|e| &e.expect) {
        Some(Expect::Client(kind)) => tag == b'D' || (tag == b'T' && *kind != Kind::Describe),
        _ => false,
    }
}

/// The common answer to a unit that ends with ReadyForQuery (a simple Query, or an
/// extended-protocol unit up to its Sync), whole in `rbuf`: whole messages, each one that
/// [`Session::on_server_frame`] would only forward (rows, their description, completions,
/// ParseComplete, BindComplete, NoData, EmptyQueryResponse, PortalSuspended), and a
/// ReadyForQuery last, the only one. Its transaction status; `None` for anything else
/// (a ParameterStatus, an error or notice, COPY, a length the decoder would refuse, a
/// `DISCARD ALL` or `DEALLOCATE ALL` while statement names are translated, more than one
/// answer), which [`Session::pump_server`] handles message by message.
fn whole_answer(rbuf: &[u8], translate: bool, max_len: usize) -> Option<TransactionStatus> {
    let mut rest = rbuf;
    while let [tag, a, b, c, d, ..] = *rest {
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len < 4 || len > max_len || len >= rest.len() {
            return None;
        }
        let (frame, after) = rest.split_at(len + 1);
        let body = &frame[5..];
        match tag {
            b'Z' if after.is_empty() => {
                return match body {
                    [b'I'] => Some(TransactionStatus::Idle),
                    [b'T'] => Some(TransactionStatus::InTransaction),
                    [b'E'] => Some(TransactionStatus::Failed),
                    _ => None,
                }
            }
            b'C' if translate && drops_statements(body) => return None,
            b'T' | b'D' | b'C' | b'1' | b'2' | b'n' | b'I' | b's' => {}
            _ => return None,
        }
        rest = after;
    }
    None
}

/// Whether a CommandComplete's `body` says the server dropped every prepared statement
/// (`DISCARD ALL`, `DEALLOCATE ALL`): translated statement names are forgotten then.
fn drops_statements(body: &[u8]) -> bool {
    body.starts_with(b"DISCARD ALL\0") || body.starts_with(b"DEALLOCATE ALL\0")
}

/// Whether one of the proxy's own answers is next in the queue. Checked inline for every
/// server reply and client frame handled: there is seldom one to send.
#[inline]
fn synthetic_next(att: &Attached) -> bool {
    matches!(att.queue.front().map(|e| &e.expect), Some(Expect::Synthetic(_) | Expect::SyntheticError(_)))
}

/// Forwards the server message `rbuf[range]` to the client: while nothing else waits for the
/// client, by extending `pass`, the run of forwarded messages in `rbuf` written from there
/// (no copy); otherwise `pass` and the message are copied into `wbuf`, in order.
#[inline]
fn pass_on(wbuf: &mut BytesMut, rbuf: &[u8], range: Range<usize>, pass: &mut Option<Range<usize>>) {
    match pass {
        Some(r) if r.end == range.start => r.end = range.end,
        None if wbuf.is_empty() => *pass = Some(range),
        _ => {
            copy_pass(wbuf, rbuf, pass);
            wbuf.extend_from_slice(&rbuf[range]);
        }
    }
}

/// Writes `data` (nothing else waiting for that peer: `wbuf`, its write buffer, is empty) to
/// the peer's plain socket as far as it takes it now, and copies the rest into `wbuf`. TLS
/// streams are written by [`pump`], so all of it is copied for them; a write error is left for
/// the next write to report.
fn send_or_keep(stream: &Stream, wbuf: &mut BytesMut, data: &[u8]) {
    let sent = match stream {
        Stream::Plain(tcp) => crate::tls::try_send(tcp, data).unwrap_or(0),
        _ => 0,
    };
    wbuf.extend_from_slice(&data[sent..]);
}

/// Copies the run of forwarded messages `pass` (a range of `rbuf`) into `wbuf` and clears it:
/// what comes next for the client goes after it.
fn copy_pass(wbuf: &mut BytesMut, rbuf: &[u8], pass: &mut Option<Range<usize>>) {
    if let Some(r) = pass.take() {
        wbuf.extend_from_slice(&rbuf[r]);
    }
}

#[inline(never)]
fn drain_synthetic_slow(
    att: &mut Attached,
    statements: &mut HashMap<Bytes, Arc<StmtDef>>,
    wbuf: &mut BytesMut,
    skip_to_sync: &mut bool,
) {
    loop {
        let error = match att.queue.front().map(|e| &e.expect) {
            Some(Expect::Synthetic(b)) => {
                wbuf.extend_from_slice(b);
                false
            }
            Some(Expect::SyntheticError(b)) => {
                wbuf.extend_from_slice(b);
                true
            }
            _ => return,
        };
        let Some(e) = att.queue.pop_front() else { return };
        if error && skip_batch(e, att, statements) {
            *skip_to_sync = true;
        }
    }
}

/// Fails a client message with an ERROR the proxy raises itself; the rest of the batch is
/// dropped until its Sync, as the server does after an error.
fn proxy_error(att: &mut Attached, skip_to_sync: &mut bool, code: &str, message: &str) {
    let mut b = BytesMut::new();
    BackendMessage::error(Severity::Error, code, message).encode(&mut b);
    att.push_plain(Expect::SyntheticError(Box::new(b.freeze())));
    *skip_to_sync = true;
}

/// Closes server statements to make room for `keep`: one of another text under the same
/// name (a hash collision), then the least recently used ones beyond `max`.
fn make_room(att: &mut Attached, keep: &StmtDef, max: usize) {
    if let Some(old) = att.conn.statements.remove(&keep.server_name) {
        prepared::encode_close(&old.server_name, &mut att.out);
        att.push(Expect::Injected(Kind::Close), Undo::Evict(old));
    }
    while att.conn.statements.len() >= max.max(1) {
        let Some(victim) = att.conn.statements.victim(&keep.server_name) else { break };
        att.conn.statements.remove(&victim.server_name);
        prepared::encode_close(&victim.server_name, &mut att.out);
        att.push(Expect::Injected(Kind::Close), Undo::Evict(victim));
    }
}

/// Prepares `def` on the attached server if it lacks it (the answer is dropped).
fn ensure_prepared(att: &mut Attached, def: &Arc<StmtDef>, max: usize) {
    if att.conn.statements.has(def) {
        return;
    }
    make_room(att, def, max);
    def.encode_parse(&mut att.out);
    att.conn.statements.insert(def.clone());
    att.push(Expect::Injected(Kind::Parse), Undo::Parse { client: None, server: Some(def.server_name.clone()) });
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
    use super::*;

    /// An idle client costs its session's future (plus its socket), so the future must stay
    /// small: the login, the forwarding loop and rarely taken paths (routing, release) are
    /// boxed when they are awaited. 920 bytes in a debug build on 2026-11-21.
    #[tokio::test]
    async fn a_session_future_stays_small() {
        let config = crate::config::check(
            "cluster = \"c\"\nlisten = \"127.0.0.1:1\"\n[dcs]\nkind = \"local\"\npath = \"/nonexistent\"\n[auth]\nuserlist = \"u.txt\"\n",
            std::path::Path::new("/"),
        )
        .expect("config");
        let (_tx, rx) = watch::channel(Topology::default());
        let shared = Arc::new(Shared::new(config, crate::userlist::Userlist::parse("").expect("userlist"), rx));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let fut = run(shared, stream, peer, None, Arc::new(()), RouteMode::Auto);
        let size = std::mem::size_of_val(&fut);
        eprintln!(
            "session future: {size} bytes (Session {} bytes, Attached {} bytes)",
            std::mem::size_of::<Session>(),
            std::mem::size_of::<Attached>()
        );
        assert!(size <= 1024, "the session future grew to {size} bytes");
    }

    /// A protocol message: `tag`, its length, `body`.
    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut b = vec![tag];
        b.extend_from_slice(&u32::try_from(body.len() + 4).expect("small").to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn query_text_is_the_statement_up_to_its_nul() {
        let text = |tag, body: &[u8]| {
            let b = frame(tag, body);
            assert_eq!(FrontendDecoder::new(Limits::default()).frame_len(&b).expect("valid"), Some(b.len()));
            let f = Msg::first(&b).expect("whole");
            assert_eq!((f.tag(), f.body_slice(), f.len()), (tag, body, b.len()));
            query_text(f).map(<[u8]>::to_vec)
        };
        assert_eq!(text(b'Q', b"select 1\0"), Some(b"select 1".to_vec()));
        // Postgres rejects what follows a NUL; it is not part of the statement.
        assert_eq!(text(b'Q', b"select 1\0delete from t\0"), Some(b"select 1".to_vec()));
        assert_eq!(text(b'Q', b"select 1"), Some(b"select 1".to_vec()), "no NUL: the whole body");
        assert_eq!(text(b'Q', b"\0"), Some(Vec::new()));
        assert_eq!(text(b'P', b"s1\0select $1\0\0\0"), Some(b"select $1".to_vec()));
        assert_eq!(text(b'P', b"\0select 2\0\0\0"), Some(b"select 2".to_vec()), "the unnamed statement");
        assert_eq!(text(b'P', b"no name end"), None);
        assert_eq!(text(b'S', b""), None);
    }

    #[test]
    fn a_whole_answer_is_forwarded_in_one_piece_only_when_nothing_in_it_needs_a_look() {
        let answer = |frames: &[(u8, &[u8])]| frames.iter().flat_map(|(t, b)| frame(*t, b)).collect::<Vec<u8>>();
        let whole = |frames: &[(u8, &[u8])], translate| whole_answer(&answer(frames), translate, 1 << 30);
        let row: &[(u8, &[u8])] = &[(b'T', b"\0\x01a\0..."), (b'D', b"\0\x01\0\0\0\x011"), (b'C', b"SELECT 1\0")];
        let with = |more: &[(u8, &'static [u8])]| [row, more].concat();
        assert_eq!(whole(&with(&[(b'Z', b"I")]), false), Some(TransactionStatus::Idle));
        assert_eq!(whole(&with(&[(b'Z', b"T")]), false), Some(TransactionStatus::InTransaction));
        assert_eq!(whole(&with(&[(b'Z', b"E")]), false), Some(TransactionStatus::Failed));
        let extended = [(b'1', &b""[..]), (b'2', b""), (b'n', b""), (b'C', b"SELECT 0\0"), (b'Z', b"I")];
        assert_eq!(whole(&extended, false), Some(TransactionStatus::Idle), "an extended-protocol unit");
        assert_eq!(whole(&[(b'I', b""), (b'Z', b"I")], false), Some(TransactionStatus::Idle), "an empty query");

        // Not whole, or not the end of the answer: message by message.
        let done = answer(&with(&[(b'Z', b"I")]));
        assert_eq!(whole_answer(&done[..done.len() - 1], false, 1 << 30), None, "the ReadyForQuery not all read");
        assert_eq!(whole_answer(&done[..3], false, 1 << 30), None);
        assert_eq!(whole_answer(b"", false, 1 << 30), None);
        assert_eq!(whole(&with(&[]), false), None, "no ReadyForQuery yet");
        assert_eq!(whole(&with(&[(b'Z', b"I"), (b'A', b"\0\0\0\x01c\0\0")]), false), None, "something after it");
        assert_eq!(whole(&with(&[(b'Z', b"I"), (b'Z', b"I")]), false), None, "two answers");
        assert_eq!(whole(&with(&[(b'Z', b"X")]), false), None, "an unknown status");
        assert_eq!(whole(&with(&[(b'Z', b"")]), false), None);
        // What the bookkeeping looks at.
        for tag in [b'S', b'E', b'N', b'A', b'G', b'H', b'd', b'c', b'3', b't', b'V', b'K'] {
            assert_eq!(whole(&[(tag, b"x\0"), (b'Z', b"I")], false), None, "tag {}", tag as char);
        }
        assert_eq!(whole(&[(b'C', b"DISCARD ALL\0"), (b'Z', b"I")], true), None, "translated names are dropped");
        assert_eq!(whole(&[(b'C', b"DEALLOCATE ALL\0"), (b'Z', b"I")], true), None);
        assert_eq!(whole(&[(b'C', b"DISCARD ALL\0"), (b'Z', b"I")], false), Some(TransactionStatus::Idle));
        // Lengths the decoder refuses.
        let mut bad = done.clone();
        bad[1..5].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(whole_answer(&bad, false, 1 << 30), None, "a length below 4");
        assert_eq!(whole_answer(&done, false, 8), None, "longer than the limit");
    }

    /// Held frames are read in place: a cut-off or inconsistent frame is never sliced past its
    /// end (nothing panics), and whole frames are found one after the other.
    #[test]
    fn held_frames_are_cut_at_their_lengths() {
        let two = [b"Q\0\0\0\x06a\0".as_slice(), b"S\0\0\0\x04"].concat();
        let first = Msg::first(&two).expect("whole");
        assert_eq!((first.tag(), first.body_slice(), first.len()), (b'Q', b"a\0".as_slice(), 7));
        let second = Msg::first(&two[first.len()..]).expect("whole");
        assert_eq!((second.tag(), second.body_slice(), second.len()), (b'S', b"".as_slice(), 5));
        for cut in 0..two.len() {
            assert!(Msg::first(&two[..cut]).is_none_or(|f| f.len() <= cut), "{cut}");
        }
        assert!(Msg::first(b"Q\xff\xff\xff\xffabc").is_none(), "a length past the end");
        assert!(Msg::first(b"").is_none());
        // A length below 4 (refused by the decoder before it is held) still stays in bounds.
        assert_eq!(Msg::first(b"Q\0\0\0\0rest").map(|f| (f.len(), f.body_slice().len())), Some((1, 0)));
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("ISO, MDY"), "'ISO, MDY'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b'"), r"E'a\\b'''");
    }
}
