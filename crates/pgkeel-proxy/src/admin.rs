//! The admin console: a client that logs in to the database [`ADMIN_DATABASE`] as one of
//! `admin_users` gets this console instead of a server connection. It answers the simple
//! query protocol with text columns, like PgBouncer's console: `SHOW POOLS`, `SHOW CLIENTS`,
//! `SHOW SERVERS`, `SHOW STATS`, `SHOW TOTALS`, `SHOW DATABASES`, `SHOW CONFIG`, `SHOW
//! VERSION`, `PAUSE`, `RESUME`, `RELOAD`, `SHUTDOWN`, and per database `DISABLE`, `ENABLE`, `KILL`,
//! `RECONNECT` and `WAIT_CLOSE`.
//!
//! It also owns reloading (`RELOAD`, SIGHUP): [`reload`] re-reads `proxy.toml` and the
//! userlist, puts the keys that can change live in force and logs the others as needing a
//! restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::ProxyConfig;
use crate::pool::PoolTarget;
use crate::protocol::{
    sqlstate, BackendMessage, FieldDescription, FrontendDecoder, FrontendMessage, Limits, Severity, Text,
    TransactionStatus,
};
use crate::session::Shared;
use crate::stats::{unix_time, Limit};

/// The database name that reaches the admin console.
pub const ADMIN_DATABASE: &str = "pgkeel";

/// SQLSTATE for an unknown console command.
const SYNTAX_ERROR: &str = "42601";
/// SQLSTATE for a refused admin login.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// What the console needs besides [`Shared`]: the file to reload, the client limit to resize,
/// and whether this proxy's console paused it.
#[derive(Debug, Default)]
pub struct AdminState {
    /// The `proxy.toml` that `RELOAD` and SIGHUP re-read.
    pub source: OnceLock<PathBuf>,
    /// The `max_client_conn` limit of the listeners.
    pub clients: OnceLock<Arc<Limit>>,
    /// `PAUSE` closed [`Shared::hold`] and no `RESUME` opened it yet.
    paused: AtomicBool,
    /// One reload at a time.
    reloading: Mutex<()>,
    /// `SHUTDOWN` was asked for: [`crate::run`] drains and returns, as on SIGTERM.
    pub shutdown: tokio::sync::Notify,
}

impl AdminState {
    /// Whether `PAUSE` holds new transactions now (a switchover can hold them too).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }
}

/// A console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `SHOW POOLS`.
    ShowPools,
    /// `SHOW CLIENTS`.
    ShowClients,
    /// `SHOW SERVERS`.
    ShowServers,
    /// `SHOW STATS`.
    ShowStats,
    /// `SHOW CONFIG`.
    ShowConfig,
    /// `SHOW TOTALS`.
    ShowTotals,
    /// `SHOW DATABASES`.
    ShowDatabases,
    /// `SHOW VERSION`.
    ShowVersion,
    /// `DISABLE db`: new logins to the database are refused.
    Disable(String),
    /// `ENABLE db`: undoes `DISABLE`.
    Enable(String),
    /// `KILL db`: its clients and server connections are closed now, and it is paused.
    Kill(String),
    /// `RECONNECT [db]`: server connections are replaced, each after its transaction.
    Reconnect(Option<String>),
    /// `WAIT_CLOSE [db]`: returns once the connections `RECONNECT` (or `KILL`,
    /// `server_lifetime`) marked are closed.
    WaitClose(Option<String>),
    /// `PAUSE [db]`: new transactions (of one database's clients) are held.
    Pause(Option<String>),
    /// `RESUME [db]`: undoes `PAUSE` (without a name: every pause).
    Resume(Option<String>),
    /// `RELOAD`.
    Reload,
    /// `SHUTDOWN`: the drain of SIGTERM.
    Shutdown,
}

/// The commands, for help and error messages.
pub const COMMANDS: &str = "SHOW POOLS, SHOW CLIENTS, SHOW SERVERS, SHOW STATS, SHOW TOTALS, SHOW DATABASES, \
                            SHOW CONFIG, SHOW VERSION, PAUSE [db], RESUME [db], RELOAD, DISABLE db, ENABLE db, \
                            KILL db, RECONNECT [db], WAIT_CLOSE [db], SHUTDOWN";

/// Parses one console command: case-insensitive, extra spaces and a trailing `;` allowed.
/// `Ok(None)` for an empty query.
pub fn parse(text: &str) -> Result<Option<Command>, String> {
    let text = text.trim().trim_end_matches(';').trim();
    if text.is_empty() {
        return Ok(None);
    }
    // A command with a database name: the name as written (or as a quoted identifier).
    let (verb, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let named = |make: fn(String) -> Command| database_arg(verb, rest.trim()).map(make);
    match verb.to_ascii_uppercase().as_str() {
        "DISABLE" => return named(Command::Disable).map(Some),
        "ENABLE" => return named(Command::Enable).map(Some),
        "KILL" => return named(Command::Kill).map(Some),
        "RECONNECT" if rest.trim().is_empty() => return Ok(Some(Command::Reconnect(None))),
        "RECONNECT" => return named(|d| Command::Reconnect(Some(d))).map(Some),
        "WAIT_CLOSE" if rest.trim().is_empty() => return Ok(Some(Command::WaitClose(None))),
        "WAIT_CLOSE" => return named(|d| Command::WaitClose(Some(d))).map(Some),
        "PAUSE" if !rest.trim().is_empty() => return named(|d| Command::Pause(Some(d))).map(Some),
        "RESUME" if !rest.trim().is_empty() => return named(|d| Command::Resume(Some(d))).map(Some),
        _ => {}
    }
    let words: Vec<String> = text.split_whitespace().map(str::to_ascii_uppercase).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let c = match words.as_slice() {
        ["SHOW", "POOLS"] => Command::ShowPools,
        ["SHOW", "CLIENTS"] => Command::ShowClients,
        ["SHOW", "SERVERS"] => Command::ShowServers,
        ["SHOW", "STATS"] => Command::ShowStats,
        ["SHOW", "CONFIG"] => Command::ShowConfig,
        ["SHOW", "TOTALS"] => Command::ShowTotals,
        ["SHOW", "DATABASES"] => Command::ShowDatabases,
        ["SHOW", "VERSION"] => Command::ShowVersion,
        ["PAUSE"] => Command::Pause(None),
        ["RESUME"] => Command::Resume(None),
        ["RELOAD"] => Command::Reload,
        ["SHUTDOWN"] => Command::Shutdown,
        _ => {
            let shown: String = text.chars().take(80).collect();
            return Err(format!("unknown admin console command {shown:?}; the console knows {COMMANDS}"));
        }
    };
    Ok(Some(c))
}

/// The database name after `verb`: one word as written (names are case-sensitive, as in
/// PgBouncer's console), or a double-quoted identifier (`""` for a quote in it).
fn database_arg(verb: &str, rest: &str) -> Result<String, String> {
    let verb = verb.to_ascii_uppercase();
    let usage = || format!("{verb} takes one database name, e.g. {verb} appdb (a name with spaces in double quotes)");
    if rest.is_empty() {
        return Err(usage());
    }
    let name = match rest.strip_prefix('"') {
        Some(quoted) => {
            let mut name = String::new();
            let mut chars = quoted.chars();
            loop {
                match chars.next() {
                    Some('"') if chars.as_str().starts_with('"') => {
                        chars.next();
                        name.push('"');
                    }
                    Some('"') => break,
                    Some(c) => name.push(c),
                    None => return Err(format!("{verb}: the quoted database name {rest} has no closing quote")),
                }
            }
            if !chars.as_str().trim().is_empty() {
                return Err(usage());
            }
            name
        }
        None if rest.contains(char::is_whitespace) => return Err(usage()),
        None => rest.to_string(),
    };
    if name.is_empty() {
        return Err(usage());
    }
    if name == ADMIN_DATABASE {
        return Err(format!(
            "{verb} {ADMIN_DATABASE}: the admin console's own database has no pools or clients to act on"
        ));
    }
    Ok(name)
}

/// A result set of text columns.
#[derive(Debug, Default, PartialEq)]
pub struct Table {
    /// Column names.
    pub columns: Vec<&'static str>,
    /// Rows, one value per column.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[&'static str]) -> Table {
        Table { columns: columns.to_vec(), rows: Vec::new() }
    }

    /// RowDescription, DataRows and CommandComplete `SHOW`.
    fn encode(&self, out: &mut BytesMut) {
        let fields = self
            .columns
            .iter()
            .map(|c| FieldDescription {
                name: Text::lossy(c),
                table_oid: 0,
                column_id: 0,
                type_oid: 25, // text
                type_size: -1,
                type_modifier: -1,
                format: 0,
            })
            .collect();
        BackendMessage::RowDescription(fields).encode(out);
        for row in &self.rows {
            BackendMessage::DataRow(row.iter().map(|v| Some(Bytes::copy_from_slice(v.as_bytes()))).collect())
                .encode(out);
        }
        BackendMessage::CommandComplete { tag: Text::lossy("SHOW") }.encode(out);
    }
}

fn target_name(t: &PoolTarget) -> String {
    match t {
        PoolTarget::Primary => "primary".to_string(),
        PoolTarget::Replica(name) => format!("replica:{name}"),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

/// `YYYY-MM-DD HH:MM:SS` UTC.
fn timestamp(t: SystemTime) -> String {
    pgkeel_config::format_unix_utc(unix_time(t))
}

/// `SHOW POOLS`.
pub fn show_pools(shared: &Shared) -> Table {
    let cfg = shared.config();
    let mut t = Table::new(&[
        "database",
        "user",
        "target",
        "mode",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "pool_size",
        "maxwait",
    ]);
    for p in shared.pools.all() {
        let (in_use, idle, size) = p.counts();
        let (waiting, longest) = p.waiters();
        t.rows.push(vec![
            p.key.database.clone(),
            p.key.user.clone(),
            target_name(&p.key.target),
            cfg.pool_mode_for(&p.key.database, &p.key.user).as_str().to_string(),
            in_use.to_string(),
            waiting.to_string(),
            in_use.to_string(),
            idle.to_string(),
            size.to_string(),
            secs(longest),
        ]);
    }
    t
}

/// `SHOW CLIENTS`.
pub fn show_clients(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        "pid",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "listener",
        "connect_time",
        "server",
        "server_pid",
    ]);
    for (c, server) in shared.clients() {
        let state = if server.is_some() {
            "active"
        } else if c.waiting.load(Ordering::Relaxed) {
            "waiting"
        } else {
            "idle"
        };
        t.rows.push(vec![
            c.pid.to_string(),
            c.pool.key.user.clone(),
            c.pool.key.database.clone(),
            state.to_string(),
            c.peer.ip().to_string(),
            c.peer.port().to_string(),
            c.listener.to_string(),
            timestamp(c.connected),
            server.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
            server.map(|s| s.1.to_string()).unwrap_or_default(),
        ]);
    }
    t
}

/// `SHOW SERVERS`.
pub fn show_servers(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        "database",
        "user",
        "target",
        "member",
        "address",
        "role",
        "term",
        "state",
        "pid",
        "connect_time",
        "client_pid",
        "close_needed",
    ]);
    let now = SystemTime::now();
    // Who holds each attached connection: a client's cancel target is the connection it
    // holds (read here, so attaching one records nothing more).
    let held_by: std::collections::HashMap<(String, i32), i32> =
        shared.clients().into_iter().filter_map(|(c, server)| server.map(|s| (s, c.pid))).collect();
    for p in shared.pools.all() {
        for s in p.servers() {
            let client = s
                .pid
                .filter(|_| s.state == "active")
                .and_then(|pid| held_by.get(&(s.address.clone(), pid)))
                .map(|c| c.to_string())
                .unwrap_or_default();
            t.rows.push(vec![
                p.key.database.clone(),
                p.key.user.clone(),
                target_name(&p.key.target),
                s.member,
                s.address,
                s.role.to_string(),
                s.term.to_string(),
                s.state.to_string(),
                s.pid.map(|p| p.to_string()).unwrap_or_default(),
                timestamp(now.checked_sub(s.opened.elapsed()).unwrap_or(now)),
                client,
                u8::from(s.close_needed).to_string(),
            ]);
        }
    }
    t
}

/// `SHOW STATS`.
pub fn show_stats(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        "database",
        "user",
        "target",
        "route",
        "total_xact_count",
        "total_query_count",
        "total_errors",
        "total_wait_time",
        "avg_wait_time",
    ]);
    for p in shared.pools.all() {
        let s = p.stats.snapshot();
        let route = if p.key.target == PoolTarget::Primary { "primary" } else { "replica" };
        let avg = s.wait_us.checked_div(s.transactions).unwrap_or(0);
        t.rows.push(vec![
            p.key.database.clone(),
            p.key.user.clone(),
            target_name(&p.key.target),
            route.to_string(),
            s.transactions.to_string(),
            s.queries.to_string(),
            s.errors.to_string(),
            secs(Duration::from_micros(s.wait_us)),
            secs(Duration::from_micros(avg)),
        ]);
    }
    t
}

/// `SHOW TOTALS`: `SHOW STATS` summed over every pool, and how many clients, pools and server
/// connections there are now; one `name`, `value` row each, as PgBouncer's.
pub fn show_totals(shared: &Shared) -> Table {
    let pools = shared.pools.all();
    let (mut xacts, mut queries, mut errors, mut wait_us, mut active, mut idle) = (0, 0, 0, 0, 0, 0);
    for p in &pools {
        let s = p.stats.snapshot();
        (xacts, queries, errors, wait_us) =
            (xacts + s.transactions, queries + s.queries, errors + s.errors, wait_us + s.wait_us);
        let (in_use, idle_now, _) = p.counts();
        (active, idle) = (active + in_use, idle + idle_now);
    }
    let mut t = Table::new(&["name", "value"]);
    for (name, value) in [
        ("clients", shared.clients().len().to_string()),
        ("pools", pools.len().to_string()),
        ("sv_active", active.to_string()),
        ("sv_idle", idle.to_string()),
        ("total_xact_count", xacts.to_string()),
        ("total_query_count", queries.to_string()),
        ("total_errors", errors.to_string()),
        ("total_wait_time", secs(Duration::from_micros(wait_us))),
        ("avg_wait_time", secs(Duration::from_micros(wait_us.checked_div(xacts).unwrap_or(0)))),
    ] {
        t.rows.push(vec![name.to_string(), value]);
    }
    t
}

/// `SHOW DATABASES`: one row per database with a pool, disabled or paused: its pools, clients
/// and server connections, whether it is paused (`PAUSE db`) or disabled, and its server
/// connections open against `max_db_connections` (per server; summed over them).
pub fn show_databases(shared: &Shared) -> Table {
    #[derive(Default)]
    struct Row {
        pools: usize,
        clients: usize,
        waiting: usize,
        active: usize,
        idle: usize,
    }
    let mut rows: std::collections::BTreeMap<String, Row> = Default::default();
    for p in shared.pools.all() {
        let r = rows.entry(p.key.database.clone()).or_default();
        let (in_use, idle, _) = p.counts();
        (r.pools, r.active, r.idle) = (r.pools + 1, r.active + in_use, r.idle + idle);
    }
    for (c, _) in shared.clients() {
        let r = rows.entry(c.pool.key.database.clone()).or_default();
        r.clients += 1;
        r.waiting += usize::from(c.waiting.load(Ordering::Relaxed));
    }
    let (disabled, paused) = (shared.disabled.names(), shared.hold.paused_databases());
    for d in disabled.iter().chain(&paused) {
        rows.entry(d.clone()).or_default();
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let cfg = shared.config();
    let mut t = Table::new(&[
        "database",
        "pools",
        "clients",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "paused",
        "disabled",
        "current_connections",
        "max_connections",
    ]);
    for (name, r) in rows {
        let (p, d) = (yes_no(paused.contains(&name)), yes_no(disabled.contains(&name)));
        let open = shared.pools.database_connections(&name);
        let max = cfg.max_db_connections_for(&name);
        t.rows.push(vec![
            name,
            r.pools.to_string(),
            r.clients.to_string(),
            r.waiting.to_string(),
            r.active.to_string(),
            r.idle.to_string(),
            p,
            d,
            open.to_string(),
            max.to_string(),
        ]);
    }
    t
}

/// `RECONNECT [db]`: every pool (of `database`) replaces its server connections, the idle
/// ones now and the others after their transaction. What the console says about it.
fn reconnect(shared: &Shared, database: Option<&str>) -> String {
    let pools = shared.pools.of_database(database);
    let in_use: usize = pools.iter().map(|p| p.counts().0).sum();
    let closed: usize = pools.iter().map(|p| p.reconnect()).sum();
    let which = database.map_or("every pool".to_string(), |d| format!("the pools of database {d:?}"));
    if pools.is_empty() {
        return format!("{which}: none yet; nothing to reconnect");
    }
    format!(
        "{which}: closed {closed} idle server connections; the {in_use} in use are closed when their clients' \
         transactions end, and new ones are opened as needed"
    )
}

/// Keys a reload cannot change: they are logged as needing a restart and keep their value.
pub const RESTART_KEYS: &[&str] = &[
    "cluster",
    "dcs",
    "listen",
    "listen_primary",
    "listen_replica",
    "metrics_listen",
    "connect_address",
    "pool_mode",
    "max_prepared_statements",
];

/// `[databases.NAME]` or `[users.NAME]` in one line: `reporting: pool_size=40
/// max_db_connections=60; other: pool_size=5`.
fn overrides<'a>(sections: impl Iterator<Item = (&'a String, Vec<(&'static str, Option<String>)>)>) -> String {
    let one = |(name, keys): (&String, Vec<(&str, Option<String>)>)| {
        let set: Vec<String> = keys.into_iter().filter_map(|(k, v)| v.map(|v| format!("{k}={v}"))).collect();
        format!("{name}: {}", set.join(" "))
    };
    sections.map(one).collect::<Vec<_>>().join("; ")
}

/// Every key of the configuration in force with its value, as `SHOW CONFIG` shows it.
pub fn config_rows(c: &ProxyConfig) -> Vec<(&'static str, String)> {
    let d = |d: Duration| pgkeel_config::format_duration(d);
    // A duration that 0 turns off, written as in proxy.toml.
    let or_off = |o: Option<Duration>| o.map_or("0".to_string(), d);
    let dcs = match &c.dcs {
        pgkeel_config::DcsConfig::Local { path } => format!("local {}", path.display()),
        pgkeel_config::DcsConfig::Etcd { endpoints } => format!("etcd {}", endpoints.join(",")),
    };
    vec![
        ("cluster", c.cluster.clone()),
        ("dcs", dcs),
        ("listen", c.listen.clone()),
        ("listen_primary", c.listen_primary.clone().unwrap_or_default()),
        ("listen_replica", c.listen_replica.clone().unwrap_or_default()),
        ("metrics_listen", c.metrics_listen.clone().unwrap_or_default()),
        ("connect_address", c.connect_address.clone().unwrap_or_default()),
        ("pool_mode", c.pool_mode.as_str().to_string()),
        ("pool_size", c.pool_size.to_string()),
        ("max_db_connections", c.max_db_connections.to_string()),
        ("max_user_connections", c.max_user_connections.to_string()),
        ("min_pool_size", c.min_pool_size.to_string()),
        ("reserve_pool_size", c.reserve_pool_size.to_string()),
        ("reserve_pool_timeout", d(c.reserve_pool_timeout)),
        (
            "databases",
            overrides(c.databases.iter().map(|(name, s)| {
                let n = |v: Option<u32>| v.map(|v| v.to_string());
                let keys = vec![
                    ("dbname", s.dbname.clone()),
                    ("pool_mode", s.pool_mode.map(|m| m.as_str().to_string())),
                    ("pool_size", n(s.pool_size)),
                    ("min_pool_size", n(s.min_pool_size)),
                    ("reserve_pool_size", n(s.reserve_pool_size)),
                    ("max_db_connections", n(s.max_db_connections)),
                ];
                (name, keys)
            })),
        ),
        (
            "users",
            overrides(c.users.iter().map(|(name, s)| {
                let n = |v: Option<u32>| v.map(|v| v.to_string());
                let keys = vec![
                    ("pool_mode", s.pool_mode.map(|m| m.as_str().to_string())),
                    ("pool_size", n(s.pool_size)),
                    ("max_user_connections", n(s.max_user_connections)),
                ];
                (name, keys)
            })),
        ),
        ("max_client_conn", c.max_client_conn.to_string()),
        ("max_prepared_statements", c.max_prepared_statements.to_string()),
        ("load_balance", c.load_balance.as_str().to_string()),
        ("max_replica_lag", replica_lag(c)),
        ("weights", c.weights.iter().map(|(m, w)| format!("{m}={w}")).collect::<Vec<_>>().join(",")),
        ("no_replica", c.no_replica.as_str().to_string()),
        ("read_your_writes", c.read_your_writes.as_str().to_string()),
        ("primary_functions", c.primary_functions.join(",")),
        ("replica_functions", c.replica_functions.join(",")),
        ("query_wait_timeout", d(c.query_wait_timeout)),
        ("failover_hold_timeout", d(c.failover_hold_timeout)),
        ("server_connect_timeout", d(c.server_connect_timeout)),
        ("server_idle_timeout", or_off(c.server_idle_timeout)),
        ("server_lifetime", or_off(c.server_lifetime)),
        ("tcp_keepalive", c.tcp.keepalive.to_string()),
        ("tcp_keepidle", d(c.tcp.keepidle)),
        ("tcp_keepintvl", d(c.tcp.keepintvl)),
        ("tcp_keepcnt", c.tcp.keepcnt.to_string()),
        ("tcp_user_timeout", or_off(c.tcp.user_timeout)),
        ("client_idle_timeout", or_off(c.client_idle_timeout)),
        ("shutdown_timeout", d(c.shutdown_timeout)),
        ("admin_users", c.admin_users.join(",")),
        ("tls.cert", path_or_empty(c.tls.cert.as_deref())),
        ("tls.key", path_or_empty(c.tls.key.as_deref())),
        ("tls.client_tls", c.tls.client_tls.as_str().to_string()),
        ("tls.server_tls", c.tls.server_tls.as_str().to_string()),
        ("tls.server_ca", path_or_empty(c.tls.server_ca.as_deref())),
        ("tls.server_crl", path_or_empty(c.tls.server_crl.as_deref())),
        ("tls.client_ca", path_or_empty(c.tls.client_ca.as_deref())),
        ("tls.client_crl", path_or_empty(c.tls.client_crl.as_deref())),
        ("tls.server_cert", path_or_empty(c.tls.server_cert.as_deref())),
        ("tls.server_key", path_or_empty(c.tls.server_key.as_deref())),
        ("auth.userlist", c.userlist.display().to_string()),
        ("auth.auth_type", c.auth_type.as_str().to_string()),
    ]
}

fn path_or_empty(p: Option<&std::path::Path>) -> String {
    p.map(|p| p.display().to_string()).unwrap_or_default()
}

/// `max_replica_lag` as configured: bytes, a replay delay, or both (empty: no limit).
fn replica_lag(c: &ProxyConfig) -> String {
    let mut parts = Vec::new();
    if c.max_replica_lag != u64::MAX {
        parts.push(c.max_replica_lag.to_string());
    }
    if let Some(t) = c.max_replica_lag_time {
        parts.push(pgkeel_config::format_duration(t));
    }
    parts.join(", ")
}

/// `SHOW CONFIG`.
pub fn show_config(shared: &Shared) -> Table {
    let mut t = Table::new(&["key", "value", "changeable"]);
    for (k, v) in config_rows(&shared.config()) {
        let changeable = if RESTART_KEYS.contains(&k) { "no" } else { "yes" };
        t.rows.push(vec![k.to_string(), v, changeable.to_string()]);
    }
    t
}

/// Gives the sections of `new` the value of `field` they have in `old` (a section dropped or
/// added keeps its old one, or none): for the keys that need a restart. Whether one differed.
fn keep_old<T: Default + Clone + PartialEq, V: Clone + PartialEq>(
    old: &std::collections::BTreeMap<String, T>,
    new: &mut std::collections::BTreeMap<String, T>,
    field: impl Fn(&mut T) -> &mut Option<V>,
) -> bool {
    let mut changed = false;
    let names: std::collections::BTreeSet<String> = old.keys().chain(new.keys()).cloned().collect();
    for name in names {
        let was = old.get(&name).cloned().and_then(|mut o| field(&mut o).clone());
        let entry = new.entry(name).or_default();
        let now = field(entry);
        changed |= *now != was;
        *now = was;
    }
    // A section added above with nothing set is no section.
    new.retain(|_, v| *v != T::default());
    changed
}

/// What a reload did.
#[derive(Debug, Default, PartialEq)]
pub struct Reloaded {
    /// Keys whose new value is in force.
    pub applied: Vec<&'static str>,
    /// Keys whose new value needs a restart (the old one stays).
    pub needs_restart: Vec<&'static str>,
}

/// Merges a freshly loaded configuration into the one in force: keys of [`RESTART_KEYS`]
/// keep their old values. Returns the configuration to put in force and what changed.
pub fn merge(old: &ProxyConfig, mut new: ProxyConfig) -> (ProxyConfig, Reloaded) {
    let mut r = Reloaded::default();
    // A database's or a user's pool_mode needs a restart too: its pools would otherwise mix
    // clients of both modes.
    if keep_old(&old.databases, &mut new.databases, |d| &mut d.pool_mode)
        | keep_old(&old.users, &mut new.users, |u| &mut u.pool_mode)
    {
        r.needs_restart.push("pool_mode");
    }
    // And its dbname: the pooled connections are to the old database.
    if keep_old(&old.databases, &mut new.databases, |d| &mut d.dbname) {
        r.needs_restart.push("dbname");
    }
    let before = config_rows(&new);
    let now = config_rows(old);
    for ((key, new_value), (_, old_value)) in before.iter().zip(&now) {
        if new_value != old_value {
            if RESTART_KEYS.contains(key) {
                r.needs_restart.push(key);
            } else {
                r.applied.push(key);
            }
        }
    }
    new.cluster = old.cluster.clone();
    new.dcs = old.dcs.clone();
    new.listen = old.listen.clone();
    new.listen_primary = old.listen_primary.clone();
    new.listen_replica = old.listen_replica.clone();
    new.metrics_listen = old.metrics_listen.clone();
    new.connect_address = old.connect_address.clone();
    new.pool_mode = old.pool_mode;
    new.max_prepared_statements = old.max_prepared_statements;
    (new, r)
}

/// Re-reads `proxy.toml` and the userlist and puts them in force (see [`merge`]). A bad file
/// changes nothing: the error is returned (and logged) and the old configuration stays.
pub fn reload(shared: &Shared) -> Result<Reloaded, String> {
    let _one = shared.admin.reloading.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(path) = shared.admin.source.get() else {
        return Err("the proxy was started without a configuration file; nothing to reload".into());
    };
    let (new, userlist) = match crate::load(path) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "reload refused; the configuration in force is kept");
            return Err(format!("reload refused, the configuration in force is kept: {e}"));
        }
    };
    let old = shared.config();
    let (new, r) = merge(&old, new);
    // The certificate files are read again even when no key changed: a rotated certificate
    // under the same name takes effect.
    let tls = match crate::tls::Tls::load(&new) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "reload refused; the configuration in force is kept");
            return Err(format!("reload refused, the configuration in force is kept: {e}"));
        }
    };
    for key in &r.needs_restart {
        tracing::warn!(key, "reload: {key} changed; this needs a restart, the old value stays in force");
    }
    if old.max_client_conn != new.max_client_conn {
        if let Some(l) = shared.admin.clients.get() {
            l.resize(new.max_client_conn);
        }
    }
    let users = userlist.len();
    let server_side_changed = shared.tls().server_source != tls.server_source;
    shared.replace_tls(tls);
    shared.replace(new, userlist);
    tracing::info!(file = %path.display(), applied = ?r.applied, needs_restart = ?r.needs_restart, users, "configuration reloaded");
    if server_side_changed {
        // A connection keeps what its handshake checked: a revoked certificate, a new CA or
        // the proxy's own new certificate apply only to connections opened from now on.
        let said = reconnect(shared, None);
        tracing::info!(
            "reload: the TLS towards servers changed (server_tls, a server_* file or a user's server_cert); {said}"
        );
    }
    Ok(r)
}

/// `PAUSE [db]`: holds new transactions (of `database`'s clients), then waits (at most
/// `shutdown_timeout`) until no server connection (of its pools) is attached to a client.
/// `Some` warning when some still are.
async fn pause(shared: &Shared, database: Option<&str>) -> Option<String> {
    match database {
        None if !shared.admin.paused.swap(true, Ordering::AcqRel) => {
            shared.hold.close();
            tracing::info!("paused: new transactions are held");
        }
        Some(db) if shared.hold.pause_database(db) => {
            tracing::info!(database = db, "paused: the database's new transactions are held");
        }
        _ => {}
    }
    let (busy, waited) = wait_for_none(shared, || shared.pools.busy(database)).await?;
    Some(format!(
        "{busy} server connections are still in use after {waited} (shutdown_timeout); new transactions are held \
         all the same"
    ))
}

/// Waits until `count` is 0, at most `shutdown_timeout`: `None` then, else the last count
/// and the timeout, written as in proxy.toml.
async fn wait_for_none(shared: &Shared, count: impl Fn() -> usize) -> Option<(usize, String)> {
    let timeout = shared.config().shutdown_timeout;
    let deadline = Instant::now() + timeout;
    loop {
        let n = count();
        if n == 0 {
            return None;
        }
        if Instant::now() >= deadline {
            return Some((n, pgkeel_config::format_duration(timeout)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `WAIT_CLOSE [db]` (PgBouncer's): waits until no server connection (of `database`'s
/// pools) is marked to close after its client's transaction (`close_needed` in `SHOW
/// SERVERS`: `RECONNECT`, `KILL`, `server_lifetime`), at most `shutdown_timeout`, as
/// `PAUSE` waits.
async fn wait_close(shared: &Shared, database: Option<&str>) -> Result<(), String> {
    let pools = shared.pools.of_database(database);
    let Some((n, waited)) = wait_for_none(shared, || pools.iter().map(|p| p.close_needed()).sum()).await else {
        return Ok(());
    };
    let which = database.map_or(String::new(), |d| format!(" of database {d:?}"));
    Err(format!(
        "{n} server connections{which} marked to close (RECONNECT, KILL or server_lifetime) are still in use after \
         {waited} (shutdown_timeout): they close when their clients' transactions (or, in session mode, sessions) \
         end; SHOW SERVERS lists them (close_needed = 1)"
    ))
}

/// `RESUME [db]`: lets new transactions through again; without a name, every pause (the
/// proxy's and each database's). `Some` notice when nothing was paused.
fn resume(shared: &Shared, database: Option<&str>) -> Option<String> {
    if let Some(db) = database {
        if !shared.hold.resume_database(db) {
            return Some(format!("database {db:?} was not paused"));
        }
        tracing::info!(database = db, "resumed the database");
        return None;
    }
    let mut resumed = false;
    if shared.admin.paused.swap(false, Ordering::AcqRel) {
        shared.hold.open();
        resumed = true;
    }
    for db in shared.hold.paused_databases() {
        resumed |= shared.hold.resume_database(&db);
    }
    if !resumed {
        return Some("the proxy was not paused".to_string());
    }
    tracing::info!("resumed");
    None
}

fn error(out: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    BackendMessage::error(severity, code, message).encode(out);
}

/// Runs the console for an authenticated client until it leaves. The `Err` is the FATAL
/// error that ends the connection (sent by the caller).
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    stream: &mut S,
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    user: &str,
    peer: SocketAddr,
) -> Result<(), (&'static str, String)> {
    if !shared.config().admin_users.iter().any(|u| u == user) {
        return Err((
            INSUFFICIENT_PRIVILEGE,
            format!(
                "user {user:?} may not use the admin console (database {ADMIN_DATABASE:?}): list it in admin_users in \
                 proxy.toml and RELOAD"
            ),
        ));
    }
    tracing::info!(client = %peer, user, "admin console session");
    for (name, value) in [
        ("server_version", "16.0 (pgkeel proxy)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        BackendMessage::ParameterStatus { name: Text::lossy(name), value: Text::lossy(value) }.encode(wbuf);
    }
    BackendMessage::BackendKeyData { pid: 0, secret_key: Bytes::from_static(&[0; 4]) }.encode(wbuf);
    BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(wbuf);
    let decoder = FrontendDecoder::new(Limits::default());
    let mut drain = shared.draining_rx();
    loop {
        if !wbuf.is_empty() {
            stream.write_all(wbuf).await.map_err(|e| (sqlstate::CONNECTION_FAILURE, e.to_string()))?;
            wbuf.clear();
        }
        let message = loop {
            match decoder.decode(rbuf) {
                Ok(Some(m)) => break m,
                Ok(None) => {}
                Err(e) => return Err((sqlstate::PROTOCOL_VIOLATION, e.to_string())),
            }
            rbuf.reserve(1024);
            tokio::select! {
                r = stream.read_buf(rbuf) => match r {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {}
                },
                _ = drain.wait_for(|d| *d) => {
                    return Err((sqlstate::ADMIN_SHUTDOWN, "the proxy is shutting down".into()));
                }
            }
        };
        let text = match message {
            FrontendMessage::Terminate => return Ok(()),
            FrontendMessage::Query(q) => q.to_string_lossy().into_owned(),
            _ => {
                return Err((
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "the admin console speaks the simple query protocol only (psql, or simple_query in a \
                         driver); send one of {COMMANDS}"
                    ),
                ))
            }
        };
        match parse(&text) {
            Ok(None) => BackendMessage::EmptyQueryResponse.encode(wbuf),
            Err(e) => error(wbuf, Severity::Error, SYNTAX_ERROR, &e),
            Ok(Some(c)) => {
                tracing::info!(client = %peer, user, command = ?c, "admin command");
                let tag = |name: &str, out: &mut BytesMut| {
                    BackendMessage::CommandComplete { tag: Text::lossy(name) }.encode(out);
                };
                match c {
                    Command::ShowTotals => show_totals(shared).encode(wbuf),
                    Command::ShowDatabases => show_databases(shared).encode(wbuf),
                    Command::ShowVersion => {
                        let mut t = Table::new(&["version"]);
                        t.rows.push(vec![format!("pgkeel proxy {}", env!("CARGO_PKG_VERSION"))]);
                        t.encode(wbuf);
                    }
                    Command::Disable(db) => {
                        if !shared.disabled.insert(&db) {
                            error(wbuf, Severity::Notice, "00000", &format!("database {db:?} was disabled already"));
                        }
                        tracing::info!(database = %db, "disabled: new logins to the database are refused");
                        tag("DISABLE", wbuf);
                    }
                    Command::Enable(db) => {
                        if !shared.disabled.remove(&db) {
                            error(wbuf, Severity::Notice, "00000", &format!("database {db:?} was not disabled"));
                        }
                        tracing::info!(database = %db, "enabled: new logins to the database are accepted");
                        tag("ENABLE", wbuf);
                    }
                    Command::Kill(db) => {
                        // As PgBouncer's KILL: the database is paused first, so that nobody
                        // starts a transaction on it between the kill and RESUME.
                        let paused = shared.hold.pause_database(&db);
                        let (clients, servers) = shared.kill(&db);
                        let then = if shared.disabled.contains(&db) {
                            format!(
                                "it stays disabled (ENABLE {db} lets clients in again) and paused (RESUME {db} lets \
                                 their transactions run)"
                            )
                        } else {
                            format!(
                                "new clients may log in, and their transactions are held until RESUME {db} \
                                 (DISABLE {db} keeps them out)"
                            )
                        };
                        let msg = format!(
                            "closed {clients} clients of database {db:?} and {servers} idle server connections (the \
                             ones clients held close with them); {then}"
                        );
                        if paused {
                            tracing::info!(database = %db, "paused: the database's new transactions are held");
                        }
                        tracing::info!(database = %db, clients, servers, "killed the database's clients");
                        error(wbuf, Severity::Notice, "00000", &msg);
                        tag("KILL", wbuf);
                    }
                    Command::Reconnect(db) => {
                        let msg = reconnect(shared, db.as_deref());
                        tracing::info!("{msg}");
                        error(wbuf, Severity::Notice, "00000", &msg);
                        tag("RECONNECT", wbuf);
                    }
                    Command::Shutdown => {
                        // A permit is kept if the proxy is not waiting yet: never lost.
                        shared.admin.shutdown.notify_one();
                        let msg = format!(
                            "the proxy is shutting down, as on SIGTERM: no new clients; transactions in flight get \
                             up to {} (shutdown_timeout), then every connection closes",
                            pgkeel_config::format_duration(shared.config().shutdown_timeout)
                        );
                        error(wbuf, Severity::Notice, "00000", &msg);
                        tag("SHUTDOWN", wbuf);
                    }
                    Command::WaitClose(db) => match wait_close(shared, db.as_deref()).await {
                        Ok(()) => tag("WAIT_CLOSE", wbuf),
                        Err(e) => error(wbuf, Severity::Error, sqlstate::OBJECT_IN_USE, &e),
                    },
                    Command::ShowPools => show_pools(shared).encode(wbuf),
                    Command::ShowClients => show_clients(shared).encode(wbuf),
                    Command::ShowServers => show_servers(shared).encode(wbuf),
                    Command::ShowStats => show_stats(shared).encode(wbuf),
                    Command::ShowConfig => show_config(shared).encode(wbuf),
                    Command::Pause(db) => {
                        if let Some(warning) = pause(shared, db.as_deref()).await {
                            error(wbuf, Severity::Warning, "01000", &warning);
                        }
                        tag("PAUSE", wbuf);
                    }
                    Command::Resume(db) => {
                        if let Some(notice) = resume(shared, db.as_deref()) {
                            error(wbuf, Severity::Notice, "00000", &notice);
                        }
                        tag("RESUME", wbuf);
                    }
                    Command::Reload => match reload(shared) {
                        Ok(r) => {
                            if !r.needs_restart.is_empty() {
                                let msg = format!(
                                    "changed but not applied, they need a restart: {}",
                                    r.needs_restart.join(", ")
                                );
                                error(wbuf, Severity::Warning, "01000", &msg);
                            }
                            BackendMessage::CommandComplete { tag: Text::lossy("RELOAD") }.encode(wbuf);
                        }
                        Err(e) => error(wbuf, Severity::Error, sqlstate::INVALID_PARAMETER_VALUE, &e),
                    },
                }
            }
        }
        BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(wbuf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_parsed() {
        for (text, want) in [
            ("SHOW POOLS", Command::ShowPools),
            ("show pools;", Command::ShowPools),
            ("  Show   Clients ; ", Command::ShowClients),
            ("SHOW SERVERS", Command::ShowServers),
            ("show stats", Command::ShowStats),
            ("SHOW CONFIG;", Command::ShowConfig),
            ("pause", Command::Pause(None)),
            ("RESUME;", Command::Resume(None)),
            ("PAUSE appdb", Command::Pause(Some("appdb".into()))),
            ("resume appdb;", Command::Resume(Some("appdb".into()))),
            ("reload", Command::Reload),
            ("shutdown;", Command::Shutdown),
            ("SHOW TOTALS", Command::ShowTotals),
            ("show databases;", Command::ShowDatabases),
            ("SHOW VERSION", Command::ShowVersion),
            ("DISABLE appdb", Command::Disable("appdb".into())),
            ("disable AppDB ;", Command::Disable("AppDB".into())),
            ("ENABLE appdb", Command::Enable("appdb".into())),
            ("KILL appdb", Command::Kill("appdb".into())),
            ("kill \"my \"\"db\"\"\"", Command::Kill("my \"db\"".into())),
            ("RECONNECT", Command::Reconnect(None)),
            ("reconnect appdb;", Command::Reconnect(Some("appdb".into()))),
            ("WAIT_CLOSE", Command::WaitClose(None)),
            ("wait_close appdb;", Command::WaitClose(Some("appdb".into()))),
        ] {
            assert_eq!(parse(text), Ok(Some(want)), "{text}");
        }
        assert_eq!(parse(" ; "), Ok(None));
        assert_eq!(parse(""), Ok(None));
        for bad in ["SHOW", "SHOW POOL", "SELECT 1", "show pools extra"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("unknown admin console command") && e.contains(COMMANDS), "{bad}: {e}");
        }
        for (bad, says) in [
            ("KILL", "KILL takes one database name"),
            ("disable a b", "DISABLE takes one database name"),
            ("ENABLE \"open", "has no closing quote"),
            ("KILL \"a\" b", "KILL takes one database name"),
            ("KILL \"\"", "KILL takes one database name"),
            ("KILL pgkeel", "the admin console's own database"),
            ("reconnect pgkeel", "the admin console's own database"),
            ("WAIT_CLOSE a b", "WAIT_CLOSE takes one database name"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn tables_encode_as_text_columns() {
        let t = Table { columns: vec!["key", "value"], rows: vec![vec!["a".into(), "1".into()]] };
        let mut out = BytesMut::new();
        t.encode(&mut out);
        let decoder = crate::protocol::BackendDecoder::default();
        let mut got = Vec::new();
        while let Some(m) = decoder.decode(&mut out).expect("valid") {
            got.push(m);
        }
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], BackendMessage::RowDescription(f) if f.len() == 2 && f[0].type_oid == 25));
        assert!(matches!(&got[1], BackendMessage::DataRow(v) if v[1].as_deref() == Some(b"1".as_slice())));
        assert!(matches!(&got[2], BackendMessage::CommandComplete { .. }));
    }

    #[test]
    fn timestamps_are_utc() {
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56
        assert_eq!(timestamp(t), "2024-02-29 12:34:56");
    }

    #[test]
    fn a_reload_keeps_restart_keys() {
        let text = crate::config::example();
        let old = crate::config::check(text, std::path::Path::new("/etc/pgkeel")).expect("example");
        let changed = text
            .replace("pool_size = 20", "pool_size = 7")
            .replace("listen = \"127.0.0.1:6432\"", "listen = \"127.0.0.1:7432\"")
            .replace("load_balance = \"round_robin\"", "load_balance = \"random\"");
        let new = crate::config::check(&changed, std::path::Path::new("/etc/pgkeel")).expect("changed");
        let (merged, r) = merge(&old, new);
        assert_eq!(merged.pool_size, 7);
        assert_eq!(merged.listen, old.listen, "listen needs a restart");
        assert_eq!(r.applied, vec!["pool_size", "load_balance"]);
        assert_eq!(r.needs_restart, vec!["listen"]);
        assert_eq!(merge(&old, old.clone()).1, Reloaded::default());
    }

    #[test]
    fn a_reload_keeps_the_pool_mode_of_a_database_or_a_user() {
        let base = std::path::Path::new("/etc/pgkeel");
        let with = |sections: &str| {
            crate::config::check(&format!("{}\n{sections}", crate::config::example()), base).expect("valid")
        };
        let old = with("[databases.legacy]\npool_mode = \"session\"\npool_size = 4\n[users.batch]\npool_size = 2\n");
        let get = |c: &ProxyConfig, k: &str| config_rows(c).into_iter().find(|(key, _)| *key == k).map(|(_, v)| v);
        assert_eq!(get(&old, "databases").as_deref(), Some("legacy: pool_mode=session pool_size=4"));
        // pool_mode dropped from legacy, added for batch and for a new database: all need a
        // restart, and the old modes stay; the sizes apply.
        let new = with(
            "[databases.legacy]\npool_size = 6\n[databases.fresh]\npool_mode = \"session\"\n\
             [users.batch]\npool_mode = \"session\"\npool_size = 3\n",
        );
        let (merged, r) = merge(&old, new);
        assert_eq!(r.needs_restart, vec!["pool_mode"]);
        assert_eq!(r.applied, vec!["databases", "users"]);
        assert_eq!(get(&merged, "databases").as_deref(), Some("legacy: pool_mode=session pool_size=6"));
        assert_eq!(get(&merged, "users").as_deref(), Some("batch: pool_size=3"));
        assert_eq!(merged.pool_mode_for("legacy", "app"), crate::config::PoolMode::Session);
        assert_eq!(merged.pool_mode_for("fresh", "batch"), crate::config::PoolMode::Transaction);
        // A section removed whole keeps its pool_mode (and nothing else) until a restart.
        let (merged, r) = merge(&old, with(""));
        assert_eq!(r.needs_restart, vec!["pool_mode"]);
        assert_eq!(get(&merged, "databases").as_deref(), Some("legacy: pool_mode=session"));
        assert_eq!(get(&merged, "users").as_deref(), Some(""));
        assert_eq!(merge(&old, old.clone()).1, Reloaded::default());
        // So does a database's dbname.
        let aliased = with("[databases.shop]\ndbname = \"shop_2026\"\n");
        let (merged, r) = merge(&aliased, with("[databases.shop]\ndbname = \"shop_2027\"\npool_size = 3\n"));
        assert_eq!((r.needs_restart, r.applied), (vec!["dbname"], vec!["databases"]));
        assert_eq!(merged.dbname_for("shop"), "shop_2026");
        assert_eq!(get(&merged, "databases").as_deref(), Some("shop: dbname=shop_2026 pool_size=3"));
    }

    #[test]
    fn routing_keys_show_and_reload() {
        let text = crate::config::example();
        let base = std::path::Path::new("/etc/pgkeel");
        let old = crate::config::check(text, base).expect("example");
        let rows = config_rows(&old);
        let get = |rows: &[(&'static str, String)], k: &str| {
            rows.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no {k} row"))
        };
        assert_eq!(get(&rows, "max_replica_lag"), "16777216");
        assert_eq!(get(&rows, "no_replica"), "primary");
        assert_eq!(get(&rows, "weights"), "");
        let changed = text
            .replace("max_replica_lag = \"16MB\"", "max_replica_lag = [\"1MB\", \"5s\"]")
            .replace("no_replica = \"primary\"", "no_replica = \"error\"")
            .replace("# [weights]\n# n2 = 3\n# n3 = 1", "[weights]\nn2 = 3\nn3 = 0");
        let new = crate::config::check(&changed, base).expect("changed");
        let rows = config_rows(&new);
        assert_eq!(get(&rows, "max_replica_lag"), "1048576, 5s");
        assert_eq!(get(&rows, "no_replica"), "error");
        assert_eq!(get(&rows, "weights"), "n2=3,n3=0");
        let (_, r) = merge(&old, new);
        assert_eq!(r.applied, vec!["max_replica_lag", "weights", "no_replica"]);
        let time_only = crate::config::check(&text.replace("\"16MB\"", "\"250ms\""), base).expect("time only");
        assert_eq!(get(&config_rows(&time_only), "max_replica_lag"), "250ms");
    }
}
