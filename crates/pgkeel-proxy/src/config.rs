//! `proxy.toml`: the proxy's configuration.
//!
//! Checked like `node.toml` (see `pgkeel-config`): TOML syntax, then unknown keys (naming the
//! closest valid key), then value types and ranges. Every error names the key, the bad value
//! and how to fix it; `pgkeel proxy` exits with [`EXIT_BAD_CONFIG`] (64) on one.
//! [`example`] is the annotated reference.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgkeel_config::{format_duration, parse_duration, DcsConfig};
use serde::Deserialize;

/// Exit code for a bad configuration (EX_CONFIG), as for `node.toml`.
pub const EXIT_BAD_CONFIG: i32 = pgkeel_config::EXIT_BAD_CONFIG;

/// How long a client keeps a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// For one transaction: the server connection goes back to the pool when the server
    /// reports ReadyForQuery with status idle. The default.
    Transaction,
    /// For the client's whole session; `DISCARD ALL` runs when the client leaves.
    Session,
}

impl PoolMode {
    /// `"transaction"` or `"session"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }
}

/// How a replica is chosen for a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBalance {
    /// Each eligible replica in turn. The default.
    RoundRobin,
    /// A random eligible replica.
    Random,
    /// The eligible replica with the fewest server connections in use for the client's
    /// (database, user).
    LeastConnections,
    /// Eligible replicas in proportion to their `[weights]` (default 1; 0: never).
    Weighted,
}

/// What a read does when no replica is eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReplica {
    /// It runs on the primary. The default.
    Primary,
    /// The client gets an error (`57P03`) and is disconnected.
    Error,
}

impl NoReplica {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NoReplica::Primary => "primary",
            NoReplica::Error => "error",
        }
    }
}

/// Whose writes a read must see (`read_your_writes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadYourWrites {
    /// None: reads go to any eligible replica (`false`).
    Off,
    /// The client connection's own (`true`, the default).
    Connection,
    /// Those of every connection of the same database and user through this proxy: for an
    /// application that writes on one connection of its pool and reads on another.
    User,
}

impl ReadYourWrites {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadYourWrites::Off => "off",
            ReadYourWrites::Connection => "connection",
            ReadYourWrites::User => "user",
        }
    }

    /// Whether the proxy tracks writes at all.
    pub fn on(self) -> bool {
        self != ReadYourWrites::Off
    }
}

impl LoadBalance {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalance::RoundRobin => "round_robin",
            LoadBalance::Random => "random",
            LoadBalance::LeastConnections => "least_connections",
            LoadBalance::Weighted => "weighted",
        }
    }
}

/// `[tls] client_tls`: TLS between clients and the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTlsMode {
    /// SSLRequest is answered `N`. The default without `cert`.
    Disable,
    /// Clients choose: SSLRequest is answered `S`. The default with `cert`.
    Allow,
    /// A plaintext startup is refused (`FATAL 28000`).
    Require,
    /// As `Require`, and the client must present a certificate signed by `client_ca`
    /// (PgBouncer's `client_tls_sslmode = verify-ca`, postgres' `clientcert=verify-ca`).
    VerifyCa,
    /// As `VerifyCa`, and the certificate's common name (CN) must be the user name of the
    /// startup packet (`clientcert=verify-full`).
    VerifyFull,
}

impl ClientTlsMode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientTlsMode::Disable => "disable",
            ClientTlsMode::Allow => "allow",
            ClientTlsMode::Require => "require",
            ClientTlsMode::VerifyCa => "verify-ca",
            ClientTlsMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a plaintext startup is refused.
    pub fn requires_tls(self) -> bool {
        matches!(self, ClientTlsMode::Require | ClientTlsMode::VerifyCa | ClientTlsMode::VerifyFull)
    }

    /// Whether a client must present a certificate signed by `client_ca`.
    pub fn verifies_client(self) -> bool {
        matches!(self, ClientTlsMode::VerifyCa | ClientTlsMode::VerifyFull)
    }
}

/// `[tls] server_tls`: TLS between the proxy and postgres (libpq's `sslmode` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerTlsMode {
    /// Plaintext.
    Disable,
    /// TLS when the server offers it (it answers the SSLRequest `S`), else plaintext. The
    /// default.
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS, with the certificate checked against `server_ca` and the member's host name or
    /// IP address.
    VerifyFull,
}

impl ServerTlsMode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyFull => "verify-full",
        }
    }
}

/// The `[tls]` section. The files are read when the proxy starts (and by `--check`), see
/// [`crate::tls::Tls::load`].
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    /// PEM certificate (chain) offered to clients.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// TLS to clients.
    pub client_tls: ClientTlsMode,
    /// TLS to servers.
    pub server_tls: ServerTlsMode,
    /// PEM CA certificate(s) for `server_tls = "verify-full"`.
    pub server_ca: Option<PathBuf>,
    /// PEM certificate revocation list(s) of `server_ca`'s CAs: a server certificate listed
    /// in one is refused.
    pub server_crl: Option<PathBuf>,
    /// PEM CA certificate(s) that sign client certificates, for `client_tls = "verify-ca"`
    /// and `"verify-full"`.
    pub client_ca: Option<PathBuf>,
    /// PEM certificate revocation list(s) of `client_ca`'s CAs: a client certificate listed
    /// in one is refused.
    pub client_crl: Option<PathBuf>,
    /// PEM certificate (chain) and key the proxy presents to postgres when it asks for one
    /// (`cert` or `clientcert` in `pg_hba.conf`).
    pub server_cert: Option<PathBuf>,
    /// PEM private key of `server_cert`.
    pub server_key: Option<PathBuf>,
}

impl Default for TlsSettings {
    fn default() -> TlsSettings {
        TlsSettings {
            cert: None,
            key: None,
            client_tls: ClientTlsMode::Disable,
            server_tls: ServerTlsMode::Prefer,
            server_ca: None,
            server_crl: None,
            client_ca: None,
            client_crl: None,
            server_cert: None,
            server_key: None,
        }
    }
}

/// `[auth] auth_type`: how clients prove their password (PgBouncer's `auth_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    /// SCRAM-SHA-256 for every user, except users `auth_query` finds with an MD5 hash (MD5).
    /// The default.
    ScramSha256,
    /// MD5 for users with a plaintext password (in the userlist or from `auth_query`) and
    /// with an MD5 hash; SCRAM-SHA-256 still for users whose entry is a SCRAM secret, which
    /// MD5 cannot be checked against. For clients too old for SCRAM (libpq before 10, JDBC
    /// before 42.2).
    Md5,
    /// The client's TLS certificate, and no password: its common name (CN) must be the user
    /// name (postgres' `cert` method, PgBouncer's `auth_type = cert`). Needs `[tls] client_tls
    /// = "verify-ca"` or `"verify-full"`. The proxy logs in to servers with the user's
    /// plaintext password or MD5 hash from the userlist (or `auth_query`) when it has one, else
    /// without one (the server must then trust the proxy, e.g. `cert` or `trust` in
    /// pg_hba.conf).
    Cert,
}

impl AuthType {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Md5 => "md5",
            AuthType::Cert => "cert",
        }
    }
}

/// `[auth] query` and `auth_user`: PgBouncer's `auth_query`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthQuery {
    /// The query, with `$1` for the user name; returns (user name, password or secret).
    pub query: String,
    /// The userlist user the proxy runs the query as, on the primary.
    pub user: String,
}

/// The proxy's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Cluster name, as in the agents' node.toml.
    pub cluster: String,
    /// Where the cluster state lives: the same `[dcs]` as the agents'.
    pub dcs: DcsConfig,
    /// `host:port` of the auto listener: reads to replicas, the rest to the primary.
    pub listen: String,
    /// `host:port` of an optional listener whose clients always use the primary.
    pub listen_primary: Option<String>,
    /// `host:port` of an optional listener whose clients always use replicas (the primary
    /// when no replica is eligible).
    pub listen_replica: Option<String>,
    /// How a replica is chosen.
    pub load_balance: LoadBalance,
    /// A replica more than this many bytes of WAL behind the primary gets no reads
    /// (`u64::MAX`: no byte limit, when `max_replica_lag` gives only a time).
    pub max_replica_lag: u64,
    /// A replica whose replay is further behind than this gets no reads (`max_replica_lag`
    /// given as a duration).
    pub max_replica_lag_time: Option<Duration>,
    /// `load_balance = "weighted"`: weight per member name (`[weights]`); absent members
    /// weigh 1, and 0 means no reads.
    pub weights: std::collections::BTreeMap<String, u32>,
    /// What a read does when no replica is eligible.
    pub no_replica: NoReplica,
    /// After a write commits, the reads of its connection (or of every connection of its
    /// database and user) go only to replicas that have replayed it.
    pub read_your_writes: ReadYourWrites,
    /// Functions whose calls send a statement to the primary, besides the built-in ones.
    pub primary_functions: Vec<String>,
    /// Volatile functions that only read: their calls do not send a statement to the primary
    /// (by default every volatile function in the catalog does).
    pub replica_functions: Vec<String>,
    /// Protocol-level prepared statements kept per server connection (least recently used
    /// ones are closed beyond it); 0 passes statement names through unchanged.
    pub max_prepared_statements: u32,
    /// Transaction (default) or session pooling.
    pub pool_mode: PoolMode,
    /// Server connections per (database, user).
    pub pool_size: u32,
    /// Server connections of one database on one server, over its users' pools; 0: no cap.
    pub max_db_connections: u32,
    /// Server connections of one user on one server, over its databases' pools; 0: no cap.
    pub max_user_connections: u32,
    /// Server connections each pool keeps open (at most `pool_size`), opened in the
    /// background once a client logged in to it (a replica's pool: once a read went there);
    /// 0: none.
    pub min_pool_size: u32,
    /// Server connections a pool may open beyond `pool_size` for clients that waited
    /// `reserve_pool_timeout`; 0: none.
    pub reserve_pool_size: u32,
    /// See `reserve_pool_size`.
    pub reserve_pool_timeout: Duration,
    /// `[databases.NAME]`: settings of one database's pools over the ones above.
    pub databases: std::collections::BTreeMap<String, DatabaseSettings>,
    /// `[users.NAME]`: settings of one user's pools over the ones above (and a database's).
    pub users: std::collections::BTreeMap<String, UserSettings>,
    /// Client connections accepted at once; more are refused with SQLSTATE 53300.
    pub max_client_conn: u32,
    /// How long a client waits for a server connection of a full pool before it gets an
    /// error (SQLSTATE 53300) and is disconnected.
    pub query_wait_timeout: Duration,
    /// How long new transactions wait for a running primary (after a failover, or while
    /// there is none) before they fail with SQLSTATE 08006.
    pub failover_hold_timeout: Duration,
    /// Bound on opening one server connection (TCP connect plus login).
    pub server_connect_timeout: Duration,
    /// A pooled server connection unused this long is closed (between once and twice this);
    /// `None`: never.
    pub server_idle_timeout: Option<Duration>,
    /// A server connection older than this is closed when its client gives it back (an idle
    /// one at once); `None`: never.
    pub server_lifetime: Option<Duration>,
    /// TCP keepalive and user timeout of client and server sockets.
    pub tcp: TcpOptions,
    /// A client that sends nothing this long between transactions is disconnected (between
    /// once and twice this); `None`: never. Transaction mode only.
    pub client_idle_timeout: Option<Duration>,
    /// The userlist file (see [`crate::userlist`]).
    pub userlist: PathBuf,
    /// `[auth] query`: clients missing from the userlist are looked up on the primary.
    pub auth_query: Option<AuthQuery>,
    /// `[auth] auth_type`: SCRAM-SHA-256 or MD5 for clients.
    pub auth_type: AuthType,
    /// `[tls]`: TLS to clients and to servers.
    pub tls: TlsSettings,
    /// Userlist users who may use the admin console (the database `pgkeel`); empty: nobody.
    pub admin_users: Vec<String>,
    /// `host:port` of the HTTP `/metrics` endpoint (Prometheus text format); none: not served.
    pub metrics_listen: Option<String>,
    /// `host:port` at which the other proxies of the cluster reach this one's `listen`, to
    /// pass on cancel requests for its clients; none: `listen` (see
    /// [`ProxyConfig::connect_address_or_listen`]).
    pub connect_address: Option<String>,
    /// On SIGTERM/SIGINT (or `SHUTDOWN`), how long clients get to finish their transactions
    /// before every connection is closed; also how long `PAUSE` and `WAIT_CLOSE` wait.
    pub shutdown_timeout: Duration,
}

/// `[databases.NAME]`: one database's pool settings; `None` keeps the top-level value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseSettings {
    /// The database's name on the servers, when clients use another (an alias).
    pub dbname: Option<String>,
    /// `pool_mode` of its pools (a user's own wins).
    pub pool_mode: Option<PoolMode>,
    /// `pool_size` of its pools (a user's own `pool_size` wins).
    pub pool_size: Option<u32>,
    /// `min_pool_size` of its pools.
    pub min_pool_size: Option<u32>,
    /// `reserve_pool_size` of its pools.
    pub reserve_pool_size: Option<u32>,
    /// `max_db_connections` of the database.
    pub max_db_connections: Option<u32>,
}

/// `[users.NAME]`: one user's pool settings; `None` keeps the database's or top-level value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSettings {
    /// `pool_mode` of its pools, over the database's.
    pub pool_mode: Option<PoolMode>,
    /// `pool_size` of its pools, over the database's.
    pub pool_size: Option<u32>,
    /// `max_user_connections` of the user.
    pub max_user_connections: Option<u32>,
    /// The certificate (chain) and key the proxy presents to postgres when it logs in as the
    /// user, over `[tls] server_cert`.
    pub server_cert: Option<(PathBuf, PathBuf)>,
}

impl ProxyConfig {
    /// `pool_mode` of the pools of `database` and `user`: the user's, else the database's,
    /// else the top-level one.
    pub fn pool_mode_for(&self, database: &str, user: &str) -> PoolMode {
        self.users
            .get(user)
            .and_then(|u| u.pool_mode)
            .or_else(|| self.databases.get(database).and_then(|d| d.pool_mode))
            .unwrap_or(self.pool_mode)
    }

    /// `pool_size` of the pools of `database` and `user`: the user's, else the database's,
    /// else the top-level one.
    pub fn pool_size_for(&self, database: &str, user: &str) -> u32 {
        self.users
            .get(user)
            .and_then(|u| u.pool_size)
            .or_else(|| self.databases.get(database).and_then(|d| d.pool_size))
            .unwrap_or(self.pool_size)
    }

    /// The name on the servers of the database clients call `database`: its `dbname`, else
    /// the same.
    pub fn dbname_for<'a>(&'a self, database: &'a str) -> &'a str {
        self.databases.get(database).and_then(|d| d.dbname.as_deref()).unwrap_or(database)
    }

    /// `min_pool_size` of `database`'s pools.
    pub fn min_pool_size_for(&self, database: &str) -> u32 {
        self.databases.get(database).and_then(|d| d.min_pool_size).unwrap_or(self.min_pool_size)
    }

    /// `reserve_pool_size` of `database`'s pools.
    pub fn reserve_pool_size_for(&self, database: &str) -> u32 {
        self.databases.get(database).and_then(|d| d.reserve_pool_size).unwrap_or(self.reserve_pool_size)
    }

    /// `max_db_connections` of `database`.
    pub fn max_db_connections_for(&self, database: &str) -> u32 {
        self.databases.get(database).and_then(|d| d.max_db_connections).unwrap_or(self.max_db_connections)
    }

    /// `max_user_connections` of `user`.
    pub fn max_user_connections_for(&self, user: &str) -> u32 {
        self.users.get(user).and_then(|u| u.max_user_connections).unwrap_or(self.max_user_connections)
    }

    /// Where the other proxies reach this one (published in its DCS record): `connect_address`,
    /// else `listen`, where an address for every interface (`0.0.0.0`, `::`) becomes the
    /// loopback with the local DCS (every proxy is on this host) and stays as it is with etcd
    /// (the others then pass nothing on to this proxy; `false` says so).
    pub fn connect_address_or_listen(&self) -> (String, bool) {
        if let Some(a) = &self.connect_address {
            return (a.clone(), true);
        }
        match self.listen.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => match self.dcs {
                DcsConfig::Local { .. } => {
                    let ip: std::net::IpAddr = if a.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    };
                    (std::net::SocketAddr::new(ip, a.port()).to_string(), true)
                }
                DcsConfig::Etcd { .. } => (self.listen.clone(), false),
            },
            _ => (self.listen.clone(), true),
        }
    }

    /// Some pool keeps `min_pool_size` connections.
    pub fn any_min_pool_size(&self) -> bool {
        self.min_pool_size > 0 || self.databases.values().any(|d| d.min_pool_size.is_some_and(|m| m > 0))
    }
}

/// TCP keepalive and user timeout for the proxy's sockets, to clients and to servers
/// (PgBouncer's `tcp_*` settings): a peer that vanished without a word (a host powered off, a
/// cable pulled, a partition) is noticed within `keepidle + keepintvl * keepcnt` of silence,
/// and its session ends, giving back a server connection it may hold inside a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// Keepalive probes at all.
    pub keepalive: bool,
    /// Silence before the first probe.
    pub keepidle: Duration,
    /// Between probes.
    pub keepintvl: Duration,
    /// Unanswered probes before the connection is dropped.
    pub keepcnt: u32,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged; `None`: the kernel's
    /// (about 15 minutes of retransmissions).
    pub user_timeout: Option<Duration>,
}

impl Default for TcpOptions {
    fn default() -> TcpOptions {
        TcpOptions {
            keepalive: true,
            keepidle: Duration::from_secs(60),
            keepintvl: Duration::from_secs(10),
            keepcnt: 6,
            user_timeout: None,
        }
    }
}

impl ProxyConfig {
    /// Default listen address.
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:6432";
    /// Default pool size.
    pub const DEFAULT_POOL_SIZE: u32 = 20;
    /// Default client limit.
    pub const DEFAULT_MAX_CLIENT_CONN: u32 = 1000;
    /// Default wait for a pooled connection.
    pub const DEFAULT_QUERY_WAIT_TIMEOUT: Duration = Duration::from_secs(120);
    /// Default wait for a primary.
    pub const DEFAULT_FAILOVER_HOLD_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default server connect bound.
    pub const DEFAULT_SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default idle time before a pooled connection is closed (PgBouncer's).
    pub const DEFAULT_SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    /// Default age at which a server connection is replaced (PgBouncer's).
    pub const DEFAULT_SERVER_LIFETIME: Duration = Duration::from_secs(3600);
    /// `reserve_pool_timeout`, as PgBouncer's.
    pub const DEFAULT_RESERVE_POOL_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default replica lag limit: 16 MiB of WAL.
    pub const DEFAULT_MAX_REPLICA_LAG: u64 = 16 << 20;
    /// Default prepared statements per server connection (PgBouncer's default).
    pub const DEFAULT_MAX_PREPARED_STATEMENTS: u32 = 200;
    /// Default drain deadline on shutdown.
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

    /// Every listener: (address, what it is for).
    pub fn listeners(&self) -> Vec<(&str, crate::router::RouteMode)> {
        use crate::router::RouteMode;
        let mut v = vec![(self.listen.as_str(), RouteMode::Auto)];
        v.extend(self.listen_primary.as_deref().map(|l| (l, RouteMode::Primary)));
        v.extend(self.listen_replica.as_deref().map(|l| (l, RouteMode::Replica)));
        v
    }
}

/// Why a `proxy.toml` was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Not valid TOML; the message has the line and column.
    #[error("{0}")]
    Syntax(String),
    /// Anything else: an unknown key (with the closest valid one), a missing key, a bad value.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

const TOP: &[&str] = &[
    "cluster",
    "listen",
    "listen_primary",
    "listen_replica",
    "load_balance",
    "max_replica_lag",
    "no_replica",
    "weights",
    "read_your_writes",
    "primary_functions",
    "replica_functions",
    "max_prepared_statements",
    "pool_mode",
    "pool_size",
    "max_db_connections",
    "max_user_connections",
    "min_pool_size",
    "reserve_pool_size",
    "reserve_pool_timeout",
    "max_client_conn",
    "query_wait_timeout",
    "failover_hold_timeout",
    "server_connect_timeout",
    "server_idle_timeout",
    "server_lifetime",
    "tcp_keepalive",
    "tcp_keepidle",
    "tcp_keepintvl",
    "tcp_keepcnt",
    "tcp_user_timeout",
    "client_idle_timeout",
    "admin_users",
    "metrics_listen",
    "connect_address",
    "shutdown_timeout",
    "dcs",
    "auth",
    "tls",
    "databases",
    "users",
];
const DATABASE: &[&str] =
    &["dbname", "pool_mode", "pool_size", "min_pool_size", "reserve_pool_size", "max_db_connections"];
const USER: &[&str] = &["pool_mode", "pool_size", "max_user_connections", "server_cert", "server_key"];
const AUTH: &[&str] = &["userlist", "auth_type", "query", "auth_user"];
const TLS: &[&str] = &[
    "cert",
    "key",
    "client_tls",
    "server_tls",
    "server_ca",
    "server_crl",
    "client_ca",
    "client_crl",
    "server_cert",
    "server_key",
];
const DCS_LOCAL: &[&str] = &["kind", "path"];
const DCS_ETCD: &[&str] = &["kind", "endpoints"];
const DCS_KINDS_HELP: &str = r#"supported kinds: "local" (the embedded single-host store) and "etcd""#;

/// Edit distance in characters.
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn join(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    }
}

/// Every dotted key the file accepts, for suggestions across tables.
fn all_paths() -> Vec<String> {
    let mut v: Vec<String> = TOP
        .iter()
        .filter(|k| !matches!(**k, "dcs" | "auth" | "tls" | "databases" | "users"))
        .map(|k| k.to_string())
        .collect();
    v.extend(AUTH.iter().map(|k| join("auth", k)));
    v.extend(TLS.iter().map(|k| join("tls", k)));
    v.extend(["dcs.kind", "dcs.path", "dcs.endpoints"].map(String::from));
    v
}

fn check_keys(table: &toml::Table, valid: &[&str], path: &str) -> Result<(), ConfigError> {
    for key in table.keys() {
        if valid.contains(&key.as_str()) {
            continue;
        }
        let lower = key.to_lowercase();
        let limit = (key.chars().count() / 3).max(2);
        let full = join(path, key);
        let suggestion = valid
            .iter()
            .map(|v| (levenshtein(&lower, v), *v))
            .filter(|(d, _)| *d <= limit)
            .min_by_key(|(d, _)| *d)
            .map(|(_, v)| join(path, v))
            .or_else(|| {
                // The right key in the wrong table (`userlist` at the top instead of in [auth]).
                let mut elsewhere =
                    all_paths().into_iter().filter(|p| p.rsplit('.').next() == Some(lower.as_str()) && *p != full);
                match (elsewhere.next(), elsewhere.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            });
        return Err(invalid(match suggestion {
            Some(s) => format!("unknown key {full:?}; did you mean {s:?}?"),
            None if path.is_empty() => format!("unknown key {full:?}; valid top-level keys: {}", valid.join(", ")),
            None => format!("unknown key {full:?}; valid keys in [{path}]: {}", valid.join(", ")),
        }));
    }
    Ok(())
}

fn a_type(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

fn string(table: &toml::Table, path: &str, key: &str) -> Result<Option<String>, ConfigError> {
    match table.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!("{} must be a string, not {}", join(path, key), a_type(other)))),
    }
}

fn count(table: &toml::Table, key: &str, default: u32, min: u32, max: u32) -> Result<u32, ConfigError> {
    Ok(count_in(table, "", key, (min, max), default)?.unwrap_or(default))
}

/// An integer `key` of the table at `path` (for messages), from `min` to `max`; `example`
/// for the message when it is not an integer.
fn count_in(
    table: &toml::Table,
    path: &str,
    key: &str,
    (min, max): (u32, u32),
    example: u32,
) -> Result<Option<u32>, ConfigError> {
    let full = join(path, key);
    match table.get(key) {
        None => Ok(None),
        Some(toml::Value::Integer(i)) => u32::try_from(*i)
            .ok()
            .filter(|v| (min..=max).contains(v))
            .map(Some)
            .ok_or_else(|| invalid(format!("{full} = {i} is out of range: use {min} to {max}"))),
        Some(other) => {
            Err(invalid(format!("{full} must be an integer, not {}; e.g. {full} = {example}", a_type(other))))
        }
    }
}

/// `pool_mode` of the table at `path`.
fn pool_mode(table: &toml::Table, path: &str) -> Result<Option<PoolMode>, ConfigError> {
    let key = join(path, "pool_mode");
    match string(table, path, "pool_mode")?.as_deref() {
        None => Ok(None),
        Some("transaction") => Ok(Some(PoolMode::Transaction)),
        Some("session") => Ok(Some(PoolMode::Session)),
        Some("statement") => {
            Err(invalid(format!("{key} = \"statement\" is not supported; use \"transaction\" or \"session\"")))
        }
        Some(other) => {
            Err(invalid(format!("{key} = {other:?} is not a pool mode; use \"transaction\" or \"session\"")))
        }
    }
}

/// `[databases.NAME]` or `[users.NAME]` (`section`): a table of tables, each checked
/// against `valid`; (name, its table, its path for messages).
fn sections<'a>(
    table: &'a toml::Table,
    section: &str,
    valid: &[&str],
) -> Result<Vec<(&'a String, &'a toml::Table, String)>, ConfigError> {
    let example = if section == "databases" { "databases.reporting" } else { "users.batch" };
    let help = format!("e.g. [{example}] with pool_size = 5 (keys: {})", valid.join(", "));
    let t = match table.get(section) {
        None => return Ok(Vec::new()),
        Some(toml::Value::Table(t)) => t,
        Some(other) => {
            return Err(invalid(format!("{section} must be a table of tables, not {}; {help}", a_type(other))))
        }
    };
    let mut out = Vec::new();
    for (name, v) in t {
        let path = format!("{section}.{name}");
        let toml::Value::Table(settings) = v else {
            return Err(invalid(format!("{path} must be a table, not {}; {help}", a_type(v))));
        };
        if name.is_empty() || name.len() > 63 {
            return Err(invalid(format!("{section}: {name:?} is not a name postgres allows (1 to 63 bytes)")));
        }
        // A key of the other kind of section (`max_user_connections` for a database).
        let (other, other_valid) = if section == "databases" { ("users", USER) } else { ("databases", DATABASE) };
        if let Some(key) = settings.keys().find(|k| !valid.contains(&k.as_str()) && other_valid.contains(&k.as_str())) {
            return Err(invalid(format!(
                "{path}.{key}: {key} cannot be set for one {}; set it in [{other}.NAME], or at the top for all",
                if section == "databases" { "database" } else { "user" }
            )));
        }
        check_keys(settings, valid, &path)?;
        out.push((name, settings, path));
    }
    Ok(out)
}

/// `[databases.NAME]`.
fn databases(table: &toml::Table) -> Result<std::collections::BTreeMap<String, DatabaseSettings>, ConfigError> {
    let mut out = std::collections::BTreeMap::new();
    for (name, t, path) in sections(table, "databases", DATABASE)? {
        let dbname = string(t, &path, "dbname")?;
        if let Some(d) = &dbname {
            if d.is_empty() || d.len() > 63 {
                return Err(invalid(format!(
                    "{path}.dbname = {d:?} is not a database name postgres allows (1 to 63 bytes)"
                )));
            }
        }
        let settings = DatabaseSettings {
            dbname,
            pool_mode: pool_mode(t, &path)?,
            pool_size: count_in(t, &path, "pool_size", (1, 10_000), 40)?,
            min_pool_size: count_in(t, &path, "min_pool_size", (0, 10_000), 5)?,
            reserve_pool_size: count_in(t, &path, "reserve_pool_size", (0, 10_000), 5)?,
            max_db_connections: count_in(t, &path, "max_db_connections", (0, 100_000), 100)?,
        };
        out.insert(name.clone(), settings);
    }
    Ok(out)
}

/// `[users.NAME]`; relative certificate paths are relative to `base`, and a certificate needs
/// TLS towards servers (`server_tls`).
fn users(
    table: &toml::Table,
    base: &Path,
    server_tls: ServerTlsMode,
) -> Result<std::collections::BTreeMap<String, UserSettings>, ConfigError> {
    let mut out = std::collections::BTreeMap::new();
    for (name, t, path) in sections(table, "users", USER)? {
        let file =
            |key: &str| -> Result<Option<PathBuf>, ConfigError> { Ok(string(t, &path, key)?.map(|p| base.join(p))) };
        let server_cert = match (file("server_cert")?, file("server_key")?) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(format!(
                    "{path}.server_cert is set without {path}.server_key: add server_key = \"/etc/pgkeel/{name}.key\""
                )))
            }
            (None, Some(_)) => {
                return Err(invalid(format!(
                    "{path}.server_key is set without {path}.server_cert: add server_cert = \"/etc/pgkeel/{name}.crt\""
                )))
            }
            (Some(_), Some(_)) if server_tls == ServerTlsMode::Disable => {
                return Err(invalid(format!(
                    "{path}.server_cert is set, and tls.server_tls = \"disable\" sends it nowhere: set server_tls = \
                     \"require\" or \"verify-full\", or remove {path}.server_cert and server_key"
                )))
            }
            (Some(cert), Some(key)) => Some((cert, key)),
        };
        let settings = UserSettings {
            pool_mode: pool_mode(t, &path)?,
            pool_size: count_in(t, &path, "pool_size", (1, 10_000), 40)?,
            max_user_connections: count_in(t, &path, "max_user_connections", (0, 100_000), 100)?,
            server_cert,
        };
        out.insert(name.clone(), settings);
    }
    Ok(out)
}

/// A duration where `0` turns the feature off (`None`); `default` when the key is absent.
fn duration_or_off(table: &toml::Table, key: &str, default: Option<Duration>) -> Result<Option<Duration>, ConfigError> {
    let d = duration(table, key, default.unwrap_or(Duration::ZERO), Duration::ZERO)?;
    Ok((!d.is_zero()).then_some(d))
}

fn duration(table: &toml::Table, key: &str, default: Duration, min: Duration) -> Result<Duration, ConfigError> {
    let d = match table.get(key) {
        None => return Ok(default),
        Some(toml::Value::String(s)) => parse_duration(s).map_err(|e| invalid(format!("{key}: {e}")))?,
        Some(toml::Value::Integer(i)) => u64::try_from(*i)
            .map(Duration::from_secs)
            .map_err(|_| invalid(format!("{key} = {i}: a duration cannot be negative")))?,
        Some(toml::Value::Float(f)) => Duration::try_from_secs_f64(*f)
            .map_err(|_| invalid(format!("{key} = {f}: not a valid number of seconds")))?,
        Some(other) => {
            return Err(invalid(format!(
                "{key} must be a duration such as \"{}\", not {}",
                format_duration(default),
                a_type(other)
            )))
        }
    };
    if d < min || d > Duration::from_secs(24 * 3600) {
        return Err(invalid(format!(
            "{key} = {:?} is out of range: use {} to 24h",
            format_duration(d),
            format_duration(min)
        )));
    }
    Ok(d)
}

fn check_listen(key: &str, listen: &str) -> Result<(), ConfigError> {
    let ok = listen.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{key} = {listen:?} is not host:port; e.g. {key} = \"{}\" or \"0.0.0.0:6432\"",
            ProxyConfig::DEFAULT_LISTEN
        )))
    }
}

fn boolean(table: &toml::Table, key: &str, default: bool) -> Result<bool, ConfigError> {
    match table.get(key) {
        None => Ok(default),
        Some(toml::Value::Boolean(b)) => Ok(*b),
        Some(other) => Err(invalid(format!("{key} must be true or false, not {}", a_type(other)))),
    }
}

/// A size in bytes: an integer, or a string with a unit (`"512kB"`, `"16MB"`, `"1GB"`; powers
/// of 1024, as in postgresql.conf).
fn bytes(table: &toml::Table, key: &str, default: u64) -> Result<u64, ConfigError> {
    let help = format!("{key} takes a number of bytes or a size such as \"16MB\" (units B, kB, MB, GB)");
    match table.get(key) {
        None => Ok(default),
        Some(toml::Value::Integer(i)) => {
            u64::try_from(*i).map_err(|_| invalid(format!("{key} = {i}: a size cannot be negative; {help}")))
        }
        Some(toml::Value::String(s)) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let mult: u64 = match unit.trim() {
                "" | "B" => 1,
                "kB" | "KB" | "k" => 1 << 10,
                "MB" | "M" => 1 << 20,
                "GB" | "G" => 1 << 30,
                _ => return Err(invalid(format!("{key} = {s:?}: unknown unit; {help}"))),
            };
            num.parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(mult))
                .ok_or_else(|| invalid(format!("{key} = {s:?} is not a size; {help}")))
        }
        Some(other) => Err(invalid(format!("{key} must be a size, not {}; {help}", a_type(other)))),
    }
}

/// `max_replica_lag`: a size (bytes of WAL), a duration (replay lag), or an array with one
/// of each. Returns (bytes, time); `u64::MAX` bytes when only a time is given.
fn replica_lag(table: &toml::Table) -> Result<(u64, Option<Duration>), ConfigError> {
    let help = "max_replica_lag takes a size of WAL (1048576, \"16MB\"), a replay delay (\"5s\", \"500ms\"), or \
                both: [\"16MB\", \"5s\"]";
    let one = |v: &toml::Value| -> Result<(Option<u64>, Option<Duration>), ConfigError> {
        match v {
            toml::Value::String(s) if is_duration(s) => {
                let d = parse_duration(s).map_err(|e| invalid(format!("max_replica_lag = {s:?}: {e}; {help}")))?;
                if d.is_zero() {
                    return Err(invalid(format!("max_replica_lag = {s:?}: must be more than 0; {help}")));
                }
                Ok((None, Some(d)))
            }
            toml::Value::String(_) | toml::Value::Integer(_) => {
                let mut t = toml::Table::new();
                t.insert("max_replica_lag".into(), v.clone());
                Ok((Some(bytes(&t, "max_replica_lag", 0)?), None))
            }
            other => {
                Err(invalid(format!("max_replica_lag must be a size or a duration, not {}; {help}", a_type(other))))
            }
        }
    };
    match table.get("max_replica_lag") {
        None => Ok((ProxyConfig::DEFAULT_MAX_REPLICA_LAG, None)),
        Some(toml::Value::Array(items)) => {
            let (mut b, mut t) = (None, None);
            for item in items {
                let (ib, it) = one(item)?;
                if (ib.is_some() && b.is_some()) || (it.is_some() && t.is_some()) || items.len() > 2 {
                    return Err(invalid(format!("max_replica_lag: give at most one size and one duration; {help}")));
                }
                b = b.or(ib);
                t = t.or(it);
            }
            if b.is_none() && t.is_none() {
                return Err(invalid(format!("max_replica_lag = []: give a limit; {help}")));
            }
            Ok((b.unwrap_or(u64::MAX), t))
        }
        Some(v) => {
            let (b, t) = one(v)?;
            Ok((b.unwrap_or(u64::MAX), t))
        }
    }
}

/// Whether a `max_replica_lag` string is a duration (its unit is one of time), not a size.
fn is_duration(s: &str) -> bool {
    let unit = s.trim().trim_start_matches(|c: char| c.is_ascii_digit() || c == '.' || c == ' ');
    matches!(unit, "ms" | "s" | "sec" | "secs" | "min" | "mins" | "h")
}

/// `[weights]`: member name = weight (0 to 1000).
fn weights(table: &toml::Table) -> Result<std::collections::BTreeMap<String, u32>, ConfigError> {
    let help = "e.g. [weights] n1 = 2, n2 = 1 (member names; 0 sends a member no reads)";
    let mut out = std::collections::BTreeMap::new();
    match table.get("weights") {
        None => {}
        Some(toml::Value::Table(t)) => {
            for (name, v) in t {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                    return Err(invalid(format!(
                        "weights: {name:?} is not a member name (letters, digits, \"-\" and \"_\"); {help}"
                    )));
                }
                match v {
                    toml::Value::Integer(i) if (0..=1000).contains(i) => {
                        out.insert(name.clone(), *i as u32);
                    }
                    other => {
                        return Err(invalid(format!(
                            "weights.{name} = {other}: must be a whole number from 0 to 1000; {help}"
                        )))
                    }
                }
            }
        }
        Some(other) => return Err(invalid(format!("weights must be a table, not {}; {help}", a_type(other)))),
    }
    Ok(out)
}

/// `primary_functions` or `replica_functions`: function names or `schema.name`s.
fn functions(table: &toml::Table, key: &str) -> Result<Vec<String>, ConfigError> {
    let help = format!("e.g. {key} = [\"app.next_id\", \"audit_log\"]");
    let list = match table.get(key) {
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(a)) => a,
        Some(other) => {
            return Err(invalid(format!("{key} must be an array of function names, not {}; {help}", a_type(other))))
        }
    };
    let mut out = Vec::new();
    for v in list {
        let toml::Value::String(name) = v else {
            return Err(invalid(format!("{key}: {v} is not a string; {help}")));
        };
        let ok = !name.is_empty()
            && name.split('.').count() <= 2
            && name.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '$'));
        if !ok {
            return Err(invalid(format!(
                "{key}: {name:?} is not a function name (name or schema.name, without arguments); {help}"
            )));
        }
        out.push(name.clone());
    }
    Ok(out)
}

fn check_name(name: &str) -> Result<(), ConfigError> {
    let ok =
        !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "cluster = {name:?}: use the cluster name of the agents' node.toml (letters, digits, \"-\" and \"_\", \
             at most 63 characters)"
        )))
    }
}

fn dcs(table: &toml::Table) -> Result<DcsConfig, ConfigError> {
    let value = match table.get("dcs") {
        Some(toml::Value::Table(t)) => t,
        Some(other) => return Err(invalid(format!("dcs must be a table (a [dcs] section), not {}", a_type(other)))),
        None => {
            return Err(invalid(
                "missing required key \"dcs\": add a [dcs] section copied from the agents' node.toml, e.g. \
                 [dcs] with kind = \"local\" and path = \"/var/lib/pgkeel/dcs\"",
            ))
        }
    };
    let kind = match value.get("kind") {
        Some(toml::Value::String(k)) => k.as_str(),
        Some(other) => {
            return Err(invalid(format!("dcs.kind must be a string such as \"local\", not {}", a_type(other))))
        }
        None => {
            return Err(invalid(format!(
                "missing required key \"dcs.kind\": add kind = \"local\" in [dcs]; {DCS_KINDS_HELP}"
            )))
        }
    };
    let (keys, required, example) = match kind {
        "local" => (DCS_LOCAL, "path", r#"path = "/var/lib/pgkeel/dcs""#),
        "etcd" => (DCS_ETCD, "endpoints", r#"endpoints = ["http://10.0.0.1:2379"]"#),
        other => return Err(invalid(format!("dcs.kind = {other:?} is not supported; {DCS_KINDS_HELP}"))),
    };
    check_keys(value, keys, "dcs")?;
    if !value.contains_key(required) {
        return Err(invalid(format!("missing required key \"dcs.{required}\": add {example} in [dcs]")));
    }
    let dcs = DcsConfig::deserialize(toml::Value::Table(value.clone()))
        .map_err(|e| invalid(format!("[dcs]: {}", e.message().trim_end())))?;
    match &dcs {
        DcsConfig::Local { path } if !path.is_absolute() => {
            Err(invalid(format!("dcs.path = {:?} must be an absolute path", path.display().to_string())))
        }
        DcsConfig::Etcd { endpoints } if endpoints.is_empty() => {
            Err(invalid("dcs.endpoints is empty: list the client URLs of the etcd members"))
        }
        _ => Ok(dcs),
    }
}

/// Checks the text of a `proxy.toml`. `base` resolves a relative `auth.userlist` (the
/// directory of the file).
pub fn check(text: &str, base: &Path) -> Result<ProxyConfig, ConfigError> {
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax(e.to_string().trim_end().to_string()))?;
    check_keys(&table, TOP, "")?;
    if let Some(toml::Value::Table(auth)) = table.get("auth") {
        check_keys(auth, AUTH, "auth")?;
    }
    if let Some(toml::Value::Table(tls)) = table.get("tls") {
        check_keys(tls, TLS, "tls")?;
    }
    let cluster = string(&table, "", "cluster")?
        .ok_or_else(|| invalid("missing required key \"cluster\": add cluster = \"main\" (the agents' cluster name) at the top of the file"))?;
    check_name(&cluster)?;
    let dcs = dcs(&table)?;
    let listen = string(&table, "", "listen")?.unwrap_or_else(|| ProxyConfig::DEFAULT_LISTEN.to_string());
    check_listen("listen", &listen)?;
    let listen_primary = string(&table, "", "listen_primary")?;
    let listen_replica = string(&table, "", "listen_replica")?;
    let mut seen = vec![("listen", listen.as_str())];
    for (key, value) in [("listen_primary", &listen_primary), ("listen_replica", &listen_replica)] {
        if let Some(l) = value {
            check_listen(key, l)?;
            if let Some((other, _)) = seen.iter().find(|(_, a)| a == l) {
                return Err(invalid(format!(
                    "{key} = {l:?} is the address of {other} too; give each listener its own port"
                )));
            }
            seen.push((key, l));
        }
    }
    let load_balance = match string(&table, "", "load_balance")?.as_deref() {
        None | Some("round_robin") => LoadBalance::RoundRobin,
        Some("random") => LoadBalance::Random,
        Some("least_connections") => LoadBalance::LeastConnections,
        Some("weighted") => LoadBalance::Weighted,
        Some(other) => {
            return Err(invalid(format!(
                "load_balance = {other:?} is not a strategy; use \"round_robin\", \"random\", \"least_connections\" \
                 or \"weighted\""
            )))
        }
    };
    let (max_replica_lag, max_replica_lag_time) = replica_lag(&table)?;
    let weights = weights(&table)?;
    let no_replica = match string(&table, "", "no_replica")?.as_deref() {
        None | Some("primary") => NoReplica::Primary,
        Some("error") => NoReplica::Error,
        Some(other) => {
            return Err(invalid(format!(
                "no_replica = {other:?}: use \"primary\" (reads run on the primary when no replica is eligible) \
                 or \"error\" (they fail with 57P03)"
            )))
        }
    };
    let read_your_writes = match table.get("read_your_writes") {
        None | Some(toml::Value::Boolean(true)) => ReadYourWrites::Connection,
        Some(toml::Value::Boolean(false)) => ReadYourWrites::Off,
        Some(toml::Value::String(v)) if v == "connection" => ReadYourWrites::Connection,
        Some(toml::Value::String(v)) if v == "user" => ReadYourWrites::User,
        Some(toml::Value::String(v)) if v == "off" => ReadYourWrites::Off,
        Some(other) => {
            return Err(invalid(format!(
                "read_your_writes = {other}: use \"connection\" (or true: a connection's reads see its own \
                 writes), \"user\" (they see the writes of every connection of the same database and user) or \
                 \"off\" (or false)"
            )))
        }
    };
    let primary_functions = functions(&table, "primary_functions")?;
    let replica_functions = functions(&table, "replica_functions")?;
    let max_prepared_statements =
        count(&table, "max_prepared_statements", ProxyConfig::DEFAULT_MAX_PREPARED_STATEMENTS, 0, 100_000)?;
    let pool_mode = pool_mode(&table, "")?.unwrap_or(PoolMode::Transaction);
    let pool_size = count(&table, "pool_size", ProxyConfig::DEFAULT_POOL_SIZE, 1, 10_000)?;
    let max_db_connections = count(&table, "max_db_connections", 0, 0, 100_000)?;
    let max_user_connections = count(&table, "max_user_connections", 0, 0, 100_000)?;
    let min_pool_size = count(&table, "min_pool_size", 0, 0, 10_000)?;
    let reserve_pool_size = count(&table, "reserve_pool_size", 0, 0, 10_000)?;
    let max_client_conn = count(&table, "max_client_conn", ProxyConfig::DEFAULT_MAX_CLIENT_CONN, 1, 1_000_000)?;
    let ms = Duration::from_millis;
    let query_wait_timeout = duration(&table, "query_wait_timeout", ProxyConfig::DEFAULT_QUERY_WAIT_TIMEOUT, ms(10))?;
    let reserve_pool_timeout =
        duration(&table, "reserve_pool_timeout", ProxyConfig::DEFAULT_RESERVE_POOL_TIMEOUT, ms(0))?;
    let failover_hold_timeout =
        duration(&table, "failover_hold_timeout", ProxyConfig::DEFAULT_FAILOVER_HOLD_TIMEOUT, ms(0))?;
    let server_connect_timeout =
        duration(&table, "server_connect_timeout", ProxyConfig::DEFAULT_SERVER_CONNECT_TIMEOUT, ms(100))?;
    let server_idle_timeout =
        duration_or_off(&table, "server_idle_timeout", Some(ProxyConfig::DEFAULT_SERVER_IDLE_TIMEOUT))?;
    let server_lifetime = duration_or_off(&table, "server_lifetime", Some(ProxyConfig::DEFAULT_SERVER_LIFETIME))?;
    let client_idle_timeout = duration_or_off(&table, "client_idle_timeout", None)?;
    let t = TcpOptions::default();
    let tcp = TcpOptions {
        keepalive: boolean(&table, "tcp_keepalive", t.keepalive)?,
        keepidle: duration(&table, "tcp_keepidle", t.keepidle, ms(1000))?,
        keepintvl: duration(&table, "tcp_keepintvl", t.keepintvl, ms(1000))?,
        keepcnt: count(&table, "tcp_keepcnt", t.keepcnt, 1, 127)?,
        user_timeout: duration_or_off(&table, "tcp_user_timeout", t.user_timeout)?,
    };
    let auth = match table.get("auth") {
        Some(toml::Value::Table(t)) => t,
        Some(other) => return Err(invalid(format!("auth must be a table (an [auth] section), not {}", a_type(other)))),
        None => {
            return Err(invalid(
                "missing required key \"auth.userlist\": add an [auth] section with userlist = \"/etc/pgkeel/userlist.txt\" \
                 (lines of \"user\" \"password\")",
            ))
        }
    };
    let userlist = string(auth, "auth", "userlist")?.ok_or_else(|| {
        invalid("missing required key \"auth.userlist\": add userlist = \"/etc/pgkeel/userlist.txt\" in [auth]")
    })?;
    let userlist = base.join(userlist);
    let auth_query = auth_query(auth)?;
    let auth_type = match string(auth, "auth", "auth_type")?.as_deref() {
        None | Some("scram-sha-256") => AuthType::ScramSha256,
        Some("md5") => AuthType::Md5,
        Some("cert") => AuthType::Cert,
        Some(other) => {
            let fix = "use \"scram-sha-256\" (the default), \"md5\" (for clients too old for SCRAM) or \"cert\" \
                       (TLS client certificates)";
            return Err(invalid(format!(
                "auth.auth_type = {other:?} is not a client authentication method the proxy offers; {fix}"
            )));
        }
    };
    let tls = tls(&table, base)?;
    if auth_type == AuthType::Cert && !tls.client_tls.verifies_client() {
        return Err(invalid(format!(
            "auth.auth_type = \"cert\" takes the user from the client's certificate, and tls.client_tls = \"{}\" asks \
             for none: set client_tls = \"verify-ca\" or \"verify-full\" and client_ca (the PEM file of the CA that \
             signs the clients' certificates) in [tls]",
            tls.client_tls.as_str()
        )));
    }
    let admin_users = admin_users(&table)?;
    let connect_address = string(&table, "", "connect_address")?;
    if let Some(a) = &connect_address {
        check_listen("connect_address", a)?;
        if a.parse::<std::net::SocketAddr>().is_ok_and(|s| s.ip().is_unspecified()) {
            return Err(invalid(format!(
                "connect_address = {a:?} is every interface, not one the other proxies can connect to; give this \
                 host's address, e.g. \"10.0.0.5:6432\""
            )));
        }
    }
    let metrics_listen = string(&table, "", "metrics_listen")?;
    if let Some(m) = &metrics_listen {
        check_listen("metrics_listen", m)?;
        if let Some((other, _)) = seen.iter().find(|(_, a)| a == m) {
            return Err(invalid(format!(
                "metrics_listen = {m:?} is the address of {other} too; give /metrics its own port, e.g. \"127.0.0.1:9187\""
            )));
        }
    }
    let shutdown_timeout = duration(&table, "shutdown_timeout", ProxyConfig::DEFAULT_SHUTDOWN_TIMEOUT, ms(0))?;
    Ok(ProxyConfig {
        cluster,
        dcs,
        listen,
        listen_primary,
        listen_replica,
        load_balance,
        max_replica_lag,
        max_replica_lag_time,
        weights,
        no_replica,
        read_your_writes,
        primary_functions,
        replica_functions,
        max_prepared_statements,
        pool_mode,
        pool_size,
        max_db_connections,
        max_user_connections,
        min_pool_size,
        reserve_pool_size,
        reserve_pool_timeout,
        databases: databases(&table)?,
        users: users(&table, base, tls.server_tls)?,
        max_client_conn,
        query_wait_timeout,
        failover_hold_timeout,
        server_connect_timeout,
        server_idle_timeout,
        server_lifetime,
        tcp,
        client_idle_timeout,
        userlist,
        auth_query,
        auth_type,
        tls,
        admin_users,
        metrics_listen,
        connect_address,
        shutdown_timeout,
    })
}

fn admin_users(table: &toml::Table) -> Result<Vec<String>, ConfigError> {
    let help = "e.g. admin_users = [\"postgres\"] (users of the userlist)";
    let list = match table.get("admin_users") {
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(a)) => a,
        Some(other) => {
            return Err(invalid(format!("admin_users must be an array of user names, not {}; {help}", a_type(other))))
        }
    };
    let mut out = Vec::new();
    for v in list {
        match v {
            toml::Value::String(name) if !name.is_empty() => out.push(name.clone()),
            other => return Err(invalid(format!("admin_users: {other} is not a user name; {help}"))),
        }
    }
    Ok(out)
}

fn auth_query(auth: &toml::Table) -> Result<Option<AuthQuery>, ConfigError> {
    let query = string(auth, "auth", "query")?;
    let user = string(auth, "auth", "auth_user")?;
    match (query, user) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid(
            "auth.query needs auth.auth_user: the userlist user the proxy runs the query as, e.g. auth_user = \"pgkeel_auth\"",
        )),
        (None, Some(_)) => Err(invalid(
            "auth.auth_user is set without auth.query; add query = \"SELECT usename, passwd FROM pg_shadow WHERE usename = $1\"",
        )),
        (Some(q), Some(u)) => {
            if !q.contains("$1") {
                return Err(invalid(format!(
                    "auth.query = {q:?} has no $1 (the user name); e.g. \"SELECT usename, passwd FROM pg_shadow WHERE usename = $1\""
                )));
            }
            if u.is_empty() {
                return Err(invalid("auth.auth_user is empty: name a user of the userlist"));
            }
            Ok(Some(AuthQuery { query: q, user: u }))
        }
    }
}

fn tls(table: &toml::Table, base: &Path) -> Result<TlsSettings, ConfigError> {
    let t = match table.get("tls") {
        None => return Ok(TlsSettings::default()),
        Some(toml::Value::Table(t)) => t,
        Some(other) => return Err(invalid(format!("tls must be a table (a [tls] section), not {}", a_type(other)))),
    };
    let path = |key: &str| -> Result<Option<PathBuf>, ConfigError> { Ok(string(t, "tls", key)?.map(|p| base.join(p))) };
    let (cert, key, server_ca, client_ca) = (path("cert")?, path("key")?, path("server_ca")?, path("client_ca")?);
    let (client_crl, server_cert, server_key) = (path("client_crl")?, path("server_cert")?, path("server_key")?);
    let server_crl = path("server_crl")?;
    match (&cert, &key) {
        (Some(_), None) => return Err(invalid("tls.cert is set without tls.key: add key = \"/etc/pgkeel/proxy.key\"")),
        (None, Some(_)) => {
            return Err(invalid("tls.key is set without tls.cert: add cert = \"/etc/pgkeel/proxy.crt\""))
        }
        _ => {}
    }
    let client_tls = match string(t, "tls", "client_tls")?.as_deref() {
        None if cert.is_some() => ClientTlsMode::Allow,
        None | Some("disable") => ClientTlsMode::Disable,
        Some("allow") => ClientTlsMode::Allow,
        Some("require") => ClientTlsMode::Require,
        Some("verify-ca") => ClientTlsMode::VerifyCa,
        Some("verify-full") => ClientTlsMode::VerifyFull,
        Some(other) => {
            return Err(invalid(format!(
                "tls.client_tls = {other:?} is not a mode; use \"disable\", \"allow\", \"require\", \"verify-ca\" or \
                 \"verify-full\""
            )))
        }
    };
    if client_tls != ClientTlsMode::Disable && cert.is_none() {
        return Err(invalid(format!(
            "tls.client_tls = \"{}\" needs tls.cert and tls.key (PEM files of the proxy's certificate and key)",
            client_tls.as_str()
        )));
    }
    match (client_tls.verifies_client(), &client_ca) {
        (true, None) => {
            return Err(invalid(format!(
                "tls.client_tls = \"{}\" needs tls.client_ca: the PEM file of the CA that signs the clients' \
                 certificates",
                client_tls.as_str()
            )))
        }
        (false, Some(_)) => {
            return Err(invalid(format!(
                "tls.client_ca is set, and tls.client_tls = \"{}\" asks clients for no certificate: set client_tls = \
                 \"verify-ca\" (a certificate signed by client_ca) or \"verify-full\" (and its CN is the user name), \
                 or remove client_ca",
                client_tls.as_str()
            )))
        }
        _ => {}
    }
    if client_crl.is_some() && client_ca.is_none() {
        return Err(invalid(
            "tls.client_crl is set without tls.client_ca: revocation lists apply to client certificates, which the \
             proxy asks for with client_tls = \"verify-ca\" or \"verify-full\" and client_ca; set those, or remove \
             client_crl",
        ));
    }
    let server_tls = match string(t, "tls", "server_tls")?.as_deref() {
        None | Some("prefer") => ServerTlsMode::Prefer,
        Some("disable") => ServerTlsMode::Disable,
        Some("require") => ServerTlsMode::Require,
        Some("verify-full") => ServerTlsMode::VerifyFull,
        Some(other) => {
            return Err(invalid(format!(
                "tls.server_tls = {other:?} is not a mode; use \"disable\", \"prefer\", \"require\" or \"verify-full\""
            )))
        }
    };
    if server_tls == ServerTlsMode::VerifyFull && server_ca.is_none() {
        return Err(invalid(
            "tls.server_tls = \"verify-full\" needs tls.server_ca: the PEM file of the CA that signed the servers' certificates",
        ));
    }
    if server_crl.is_some() && server_tls != ServerTlsMode::VerifyFull {
        return Err(invalid(format!(
            "tls.server_crl is set, and tls.server_tls = \"{}\" does not check the servers' certificates: \
             revocation lists apply with server_tls = \"verify-full\" (and server_ca); set it, or remove server_crl",
            server_tls.as_str()
        )));
    }
    match (&server_cert, &server_key) {
        (Some(_), None) => {
            return Err(invalid(
                "tls.server_cert is set without tls.server_key: add server_key = \"/etc/pgkeel/proxy-client.key\"",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "tls.server_key is set without tls.server_cert: add server_cert = \"/etc/pgkeel/proxy-client.crt\"",
            ))
        }
        (Some(_), Some(_)) if server_tls == ServerTlsMode::Disable => {
            return Err(invalid(
                "tls.server_cert is set, and tls.server_tls = \"disable\" sends it nowhere: set server_tls = \
                 \"require\" or \"verify-full\" (a certificate for postgres needs TLS), or remove server_cert and \
                 server_key",
            ))
        }
        _ => {}
    }
    Ok(TlsSettings {
        cert,
        key,
        client_tls,
        server_tls,
        server_ca,
        server_crl,
        client_ca,
        client_crl,
        server_cert,
        server_key,
    })
}

/// Whether `text` is a `proxy.toml` rather than a `node.toml`: no `[postgres]` section (nor
/// `[postgresql]`), and an `[auth]` section or a top-level `listen` (which only a proxy.toml
/// has). `None` when it is not valid TOML.
pub fn is_proxy_toml(text: &str) -> Option<bool> {
    let t: toml::Table = text.parse().ok()?;
    let node = t.contains_key("postgres") || t.contains_key("postgresql");
    Some(!node && (t.contains_key("auth") || t.contains_key("listen")))
}

/// Reads and [`check`]s a `proxy.toml`. Errors other than [`ConfigError::Io`] do not repeat
/// the path; print it alongside them.
pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
    check(&text, path.parent().unwrap_or(Path::new(".")))
}

/// The annotated example `proxy.toml`, every key with its default.
pub fn example() -> &'static str {
    EXAMPLE
}

const EXAMPLE: &str = r##"# pgkeel proxy configuration (proxy.toml).
#
# Durations take a number of seconds (4, 1.5) or a string with a unit ("1500ms", "2s", "1m").

# The cluster's name, as in the agents' node.toml. Required.
cluster = "main"
# host:port of the auto listener: each transaction's first statement is classified with
# PostgreSQL's grammar; reads go to a replica, everything else to the primary.
listen = "127.0.0.1:6432"
# Optional listeners whose clients always use the primary, or always replicas (the primary
# when no replica is eligible).
# listen_primary = "127.0.0.1:6433"
# listen_replica = "127.0.0.1:6434"
# How a replica is chosen for a read: "round_robin", "random", "least_connections" or
# "weighted" (in proportion to [weights] below).
load_balance = "round_robin"
# A replica further behind than this gets no reads: a size of WAL behind the primary's
# position (bytes, "512kB", "16MB"), a replay delay ("5s", "500ms": 0 when it has replayed
# everything it received, else the age of the last transaction it replayed), or both:
# ["16MB", "5s"]. Both come from what the agents publish every loop_wait.
max_replica_lag = "16MB"
# When no replica is eligible for a read: "primary" (it runs there) or "error" (the client
# gets FATAL 57P03 and is disconnected).
no_replica = "primary"
# After a write commits, reads go only to replicas that have replayed it (or to the
# primary): "connection" (or true) for the reads of the connection that wrote, "user" for
# those of every connection of the same database and user (an application that writes on one
# connection of its pool and reads on another), "off" (or false) for none.
read_your_writes = "connection"
# Functions whose calls send a statement to the primary, besides the built-in ones (nextval,
# setval, advisory locks, ...) and the volatile functions the proxy finds in each database's
# catalog: name or schema.name.
primary_functions = []
# Volatile functions that only read (e.g. ones that use random() or clock_timestamp()): their
# calls may go to replicas.
replica_functions = []
# Protocol-level prepared statements kept per server connection; beyond it the least recently
# used one is closed. 0 passes statement names through unchanged (then named statements only
# work in session mode).
max_prepared_statements = 200
# "transaction" (a server connection per transaction; the default) or "session" (per client).
pool_mode = "transaction"
# Server connections per (database, user).
pool_size = 20
# Caps over pools, per server: the connections of one database (all its users), and of one user
# (all its databases). When a cap is reached, a pool needing a new connection closes another
# pool's idle one, or waits (at most query_wait_timeout) for one to come back. Keep
# max_db_connections times the databases below postgres's max_connections. 0: no cap.
max_db_connections = 0
max_user_connections = 0
# Server connections each pool keeps open (at most pool_size), opened in the background once
# a client logged in to it (a replica's pool: once a read went there): load after a quiet
# spell or a failover finds them ready. 0: none.
min_pool_size = 0
# Connections a pool may open beyond pool_size when a client waited reserve_pool_timeout for a
# full pool (a burst, a few slow transactions); they close as they come back once nobody waits
# that long. 0: none.
reserve_pool_size = 0
reserve_pool_timeout = "5s"
# Client connections accepted at once; more are refused (SQLSTATE 53300).
max_client_conn = 1000
# How long a client waits for a connection of a full pool before it gets SQLSTATE 53300 and is
# disconnected.
query_wait_timeout = "120s"
# How long new transactions wait for a running primary (during a failover, or while there is
# none) before they fail with SQLSTATE 08006.
failover_hold_timeout = "30s"
# Bound on opening one server connection (TCP connect and login).
server_connect_timeout = "5s"
# A pooled server connection nobody used for this long is closed (checked every this long, so
# it goes after once to twice this). 0: never.
server_idle_timeout = "600s"
# A server connection older than this is closed and replaced when its client gives it back (one
# in a transaction is never cut). 0: never.
server_lifetime = "3600s"
# TCP keepalive on client and server sockets: a peer that vanished without closing (a host
# powered off, a partition) is noticed after tcp_keepidle + tcp_keepintvl * tcp_keepcnt of
# silence (2 minutes here), and a server connection its transaction held is given back.
tcp_keepalive = true
tcp_keepidle = "60s"
tcp_keepintvl = "10s"
tcp_keepcnt = 6
# How long sent data may stay unacknowledged before the connection is dropped. 0: the kernel's
# (about 15 minutes).
tcp_user_timeout = 0
# A client that sends nothing this long between transactions is disconnected (checked every
# this long, so after once to twice this). Transaction mode only. 0: never.
client_idle_timeout = 0
# Users of the userlist who may connect to the admin console: the database "pgkeel" on any
# listener (SHOW POOLS/CLIENTS/SERVERS/STATS/TOTALS/DATABASES/CONFIG/VERSION, PAUSE [db],
# RESUME [db], RELOAD, DISABLE db, ENABLE db, KILL db, RECONNECT [db]). Empty: nobody.
admin_users = []
# host:port of the HTTP /metrics endpoint (Prometheus text format). Not served when unset.
# metrics_listen = "127.0.0.1:9187"
# host:port at which the cluster's other proxies reach this one's listen address: behind one
# load balancer a client's cancel request may reach another proxy, which passes it on to every
# proxy registered in the DCS, as server connections go out ([tls] server_tls and server_ca;
# with verify-full the other proxies' certificates must come from server_ca). Default: listen
# (with 0.0.0.0 and the local DCS: 127.0.0.1).
# connect_address = "10.0.0.5:6432"
# On SIGTERM, SIGINT or the console's SHUTDOWN: stop accepting, let clients finish their
# transactions, close every connection after this long. PAUSE waits this long for
# transactions in flight, WAIT_CLOSE for the connections it waits for.
shutdown_timeout = "10s"

# load_balance = "weighted": each member's share of the reads, by member name; a member not
# listed weighs 1, and 0 sends it no reads (also on the replica listener). Default: empty.
# [weights]
# n2 = 3
# n3 = 1

# One database's pools (all its users'), or one user's pools (all its databases'), with their
# own settings. Keys for a database: dbname (its name on the servers, when clients use another),
# pool_mode, pool_size, min_pool_size, reserve_pool_size, max_db_connections; for a user:
# pool_mode and pool_size (over the database's), max_user_connections, and server_cert and
# server_key (the certificate the proxy presents to postgres when it logs in as the user,
# over [tls] server_cert). dbname and pool_mode need a restart; the others reload live.
# [databases.reporting]
# pool_size = 40
# max_db_connections = 60
# [users.batch]
# pool_size = 5
# server_cert = "/etc/pgkeel/batch.crt"
# server_key = "/etc/pgkeel/batch.key"

# Where the cluster state lives: the same [dcs] section as the agents' node.toml. Required.
[dcs]
kind = "local"
path = "/var/lib/pgkeel/dcs"
# kind = "etcd"
# endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]

[auth]
# Lines of "user" "password": a plaintext password, or the SCRAM-SHA-256 secret copied from
# pg_authid.rolpassword. A relative path is relative to this file. Required.
userlist = "/etc/pgkeel/userlist.txt"
# How clients prove who they are: "scram-sha-256", "md5" for clients too old for SCRAM
# (users whose entry is a SCRAM secret still use SCRAM, which is all it can check), or "cert":
# a TLS client certificate whose common name (CN) is the user name, and no password (needs
# client_tls = "verify-ca" or "verify-full" below; the proxy logs in to postgres with the
# user's plaintext password or MD5 hash from the userlist, else without a password).
auth_type = "scram-sha-256"
# Clients missing from the userlist are looked up on the primary with this query (PgBouncer's
# auth_query), run as auth_user, who must be in the userlist. It returns the user name and its
# SCRAM-SHA-256 secret or MD5 hash; answers are cached for 30 s.
# query = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"
# auth_user = "pgkeel_auth"

[tls]
# PEM certificate (chain) and key offered to clients that ask for TLS. Relative paths are
# relative to this file.
# cert = "/etc/pgkeel/proxy.crt"
# key = "/etc/pgkeel/proxy.key"
# "disable" (SSLRequest answered N), "allow" (clients choose; the default with cert),
# "require" (a plaintext client is refused), "verify-ca" (as require, and the client must
# present a certificate signed by client_ca) or "verify-full" (as verify-ca, and the
# certificate's common name must be the user name).
# client_tls = "allow"
# client_ca = "/etc/pgkeel/client-ca.crt"
# PEM revocation list(s) (X509 CRL) of client_ca's CAs: a client certificate listed is
# refused. Read again on reload (SIGHUP, RELOAD), so a revocation takes effect without a restart.
# client_crl = "/etc/pgkeel/client-ca.crl"
# To postgres: "disable", "prefer" (TLS when the server offers it), "require" (TLS, the
# certificate is not checked) or "verify-full" (checked against server_ca and the host name).
server_tls = "prefer"
# server_ca = "/etc/pgkeel/ca.crt"
# PEM revocation list(s) (X509 CRL) of server_ca's CAs, with verify-full: a server whose
# certificate is listed is refused. Read again on reload, as client_crl.
# server_crl = "/etc/pgkeel/ca.crl"
# A certificate (chain) and key the proxy presents when postgres asks for one: for "cert"
# (or clientcert=verify-ca/verify-full) in pg_hba.conf, e.g. through postgresql.pg_hba in the
# cluster config or postgres.pg_hba in a node's node.toml. Its CN must be the user name for
# "cert", or map to it (pg_ident.conf).
# server_cert = "/etc/pgkeel/proxy-client.crt"
# server_key = "/etc/pgkeel/proxy-client.key"
"##;

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> ProxyConfig {
        check(text, Path::new("/etc/pgkeel")).unwrap_or_else(|e| panic!("{text}\n=> {e}"))
    }

    fn err(text: &str) -> String {
        check(text, Path::new("/etc/pgkeel")).unwrap_err().to_string()
    }

    const MINIMAL: &str = "cluster = \"main\"\n[dcs]\nkind = \"local\"\npath = \"/var/lib/pgkeel/dcs\"\n\
                           [auth]\nuserlist = \"users.txt\"\n";

    #[test]
    fn routing_keys() {
        let with = |line: &str| ok(&MINIMAL.replace("cluster = \"main\"\n", &format!("cluster = \"main\"\n{line}\n")));
        let d = ok(MINIMAL);
        assert_eq!((d.max_replica_lag, d.max_replica_lag_time), (16 << 20, None));
        assert_eq!((d.no_replica, d.load_balance), (NoReplica::Primary, LoadBalance::RoundRobin));
        assert!(d.weights.is_empty());
        let c = with("max_replica_lag = \"5s\"");
        assert_eq!((c.max_replica_lag, c.max_replica_lag_time), (u64::MAX, Some(Duration::from_secs(5))));
        let c = with("max_replica_lag = \"500ms\"");
        assert_eq!(c.max_replica_lag_time, Some(Duration::from_millis(500)));
        let c = with("max_replica_lag = [\"1MB\", \"2s\"]");
        assert_eq!((c.max_replica_lag, c.max_replica_lag_time), (1 << 20, Some(Duration::from_secs(2))));
        let c = with("max_replica_lag = [\"3s\", 4096]");
        assert_eq!((c.max_replica_lag, c.max_replica_lag_time), (4096, Some(Duration::from_secs(3))));
        assert_eq!(with("no_replica = \"error\"").no_replica, NoReplica::Error);
        let c = ok(&format!("load_balance = \"weighted\"\n{MINIMAL}[weights]\nn1 = 3\n\"n-2\" = 0\n"));
        assert_eq!(c.load_balance, LoadBalance::Weighted);
        assert_eq!(c.weights.get("n1"), Some(&3));
        assert_eq!(c.weights.get("n-2"), Some(&0));
        let bad = |line: &str| err(&MINIMAL.replace("cluster = \"main\"\n", &format!("cluster = \"main\"\n{line}\n")));
        for (line, want) in [
            ("max_replica_lag = \"0s\"", "must be more than 0"),
            ("max_replica_lag = \"5 fortnights\"", "unknown unit"),
            ("max_replica_lag = [\"1s\", \"2s\"]", "at most one size and one duration"),
            ("max_replica_lag = []", "give a limit"),
            ("max_replica_lag = true", "must be a size or a duration, not a boolean"),
            ("no_replica = \"replica\"", "no_replica = \"replica\": use \"primary\""),
            ("weights = 3", "weights must be a table"),
        ] {
            let e = bad(line);
            assert!(e.contains(want), "{line}: {e:?} should contain {want:?}");
        }
        let e = err(&format!("{MINIMAL}[weights]\nn1 = -1\n"));
        assert!(e.contains("weights.n1 = -1: must be a whole number from 0 to 1000"), "{e}");
        let e = err(&format!("{MINIMAL}[weights]\n\"a b\" = 1\n"));
        assert!(e.contains("is not a member name"), "{e}");
    }

    #[test]
    fn proxy_toml_is_told_from_node_toml() {
        assert_eq!(is_proxy_toml(example()), Some(true));
        assert_eq!(is_proxy_toml(MINIMAL), Some(true));
        assert_eq!(is_proxy_toml(pgkeel_config::example()), Some(false));
        assert_eq!(is_proxy_toml("listen = \"x\"\n[postgres]\nlisten = \"x\"\n"), Some(false));
        assert_eq!(is_proxy_toml("cluster = "), None);
    }

    #[test]
    fn example_is_valid_and_shows_the_defaults() {
        let c = ok(example());
        let d = ok(MINIMAL);
        assert_eq!(c.cluster, "main");
        assert_eq!(c.dcs, DcsConfig::Local { path: "/var/lib/pgkeel/dcs".into() });
        assert_eq!(c.userlist, PathBuf::from("/etc/pgkeel/userlist.txt"));
        assert_eq!((c.listen.as_str(), c.pool_mode, c.pool_size), (d.listen.as_str(), d.pool_mode, d.pool_size));
        assert_eq!(c.max_client_conn, d.max_client_conn);
        assert_eq!((c.max_db_connections, c.max_user_connections), (0, 0));
        assert_eq!((d.max_db_connections, d.max_user_connections), (0, 0));
        assert_eq!((c.reserve_pool_size, c.reserve_pool_timeout), (d.reserve_pool_size, d.reserve_pool_timeout));
        assert_eq!((d.reserve_pool_size, d.reserve_pool_timeout), (0, Duration::from_secs(5)));
        assert_eq!((c.min_pool_size, d.min_pool_size), (0, 0));
        assert_eq!(c.query_wait_timeout, d.query_wait_timeout);
        assert_eq!(c.failover_hold_timeout, d.failover_hold_timeout);
        assert_eq!(c.server_connect_timeout, d.server_connect_timeout);
        assert_eq!(d.pool_mode, PoolMode::Transaction);
        assert_eq!((c.listen_primary.clone(), c.listen_replica.clone()), (None, None));
        assert_eq!((c.load_balance, d.load_balance), (LoadBalance::RoundRobin, LoadBalance::RoundRobin));
        assert_eq!((c.max_replica_lag, d.max_replica_lag), (16 << 20, 16 << 20));
        assert_eq!((c.read_your_writes, d.read_your_writes), (ReadYourWrites::Connection, ReadYourWrites::Connection));
        assert_eq!((c.primary_functions.len(), d.primary_functions.len()), (0, 0));
        assert_eq!((c.max_prepared_statements, d.max_prepared_statements), (200, 200));
        assert_eq!(d.userlist, PathBuf::from("/etc/pgkeel/users.txt"), "relative to the file's directory");
        assert_eq!((c.admin_users.len(), d.admin_users.len()), (0, 0));
        assert_eq!((c.metrics_listen.clone(), d.metrics_listen.clone()), (None, None));
        assert_eq!((c.shutdown_timeout, d.shutdown_timeout), (Duration::from_secs(10), Duration::from_secs(10)));
        let (idle, life) = (Some(Duration::from_secs(600)), Some(Duration::from_secs(3600)));
        assert_eq!((c.server_idle_timeout, c.server_lifetime), (idle, life));
        assert_eq!((d.server_idle_timeout, d.server_lifetime), (idle, life));
        assert_eq!((c.tcp, d.tcp), (TcpOptions::default(), TcpOptions::default()));
        assert_eq!((c.client_idle_timeout, d.client_idle_timeout), (None, None));
    }

    #[test]
    fn values_are_parsed() {
        let c = ok(&format!("{MINIMAL}\n").replace(
            "cluster = \"main\"\n",
            "cluster = \"main\"\nlisten = \"0.0.0.0:7000\"\npool_mode = \"session\"\npool_size = 3\n\
             max_client_conn = 10\nquery_wait_timeout = \"1500ms\"\nfailover_hold_timeout = 12\n\
             server_connect_timeout = 0.5\nserver_idle_timeout = \"1m\"\nserver_lifetime = 0\n\
             tcp_keepidle = \"5s\"\ntcp_keepintvl = 2\ntcp_keepcnt = 3\ntcp_user_timeout = \"30s\"\n\
             client_idle_timeout = \"10m\"\nmax_db_connections = 40\nmax_user_connections = 25\n\
             reserve_pool_size = 3\nmin_pool_size = 2\nreserve_pool_timeout = \"250ms\"\n",
        ));
        assert_eq!(c.client_idle_timeout, Some(Duration::from_secs(600)));
        let tcp = TcpOptions {
            keepalive: true,
            keepidle: Duration::from_secs(5),
            keepintvl: Duration::from_secs(2),
            keepcnt: 3,
            user_timeout: Some(Duration::from_secs(30)),
        };
        assert_eq!(c.tcp, tcp);
        assert_eq!((c.server_idle_timeout, c.server_lifetime), (Some(Duration::from_secs(60)), None));
        assert_eq!(c.listen, "0.0.0.0:7000");
        assert_eq!(c.pool_mode, PoolMode::Session);
        assert_eq!((c.pool_size, c.max_client_conn), (3, 10));
        assert_eq!((c.max_db_connections, c.max_user_connections), (40, 25));
        assert_eq!((c.reserve_pool_size, c.reserve_pool_timeout), (3, Duration::from_millis(250)));
        assert_eq!(c.min_pool_size, 2);
        assert_eq!(c.query_wait_timeout, Duration::from_millis(1500));
        assert_eq!(c.failover_hold_timeout, Duration::from_secs(12));
        assert_eq!(c.server_connect_timeout, Duration::from_millis(500));
        let c = ok(&MINIMAL.replace(
            "cluster = \"main\"\n",
            "cluster = \"main\"\nlisten_primary = \"127.0.0.1:7001\"\nlisten_replica = \"127.0.0.1:7002\"\n\
             load_balance = \"least_connections\"\nmax_replica_lag = \"512kB\"\nread_your_writes = false\n\
             primary_functions = [\"app.next_id\", \"audit\"]\nmax_prepared_statements = 0\n\
             replica_functions = [\"app.pick\"]\n",
        ));
        assert_eq!(c.listen_primary.as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(c.listen_replica.as_deref(), Some("127.0.0.1:7002"));
        assert_eq!(c.load_balance, LoadBalance::LeastConnections);
        assert_eq!(c.max_replica_lag, 512 << 10);
        assert_eq!(c.read_your_writes, ReadYourWrites::Off);
        for (value, want) in [
            ("true", ReadYourWrites::Connection),
            ("\"connection\"", ReadYourWrites::Connection),
            ("\"user\"", ReadYourWrites::User),
            ("\"off\"", ReadYourWrites::Off),
        ] {
            let c =
                ok(&MINIMAL
                    .replace("cluster = \"main\"\n", &format!("cluster = \"main\"\nread_your_writes = {value}\n")));
            assert_eq!(c.read_your_writes, want, "{value}");
            assert_eq!(want.on(), want != ReadYourWrites::Off);
        }
        assert_eq!(c.primary_functions, vec!["app.next_id".to_string(), "audit".to_string()]);
        assert_eq!(c.replica_functions, vec!["app.pick".to_string()]);
        assert_eq!(c.max_prepared_statements, 0);
        assert_eq!(c.listeners().len(), 3);
        let c = ok(&MINIMAL.replace(
            "cluster = \"main\"\n",
            "cluster = \"main\"\nadmin_users = [\"ops\", \"postgres\"]\nmetrics_listen = \"127.0.0.1:9187\"\n\
             shutdown_timeout = \"2500ms\"\n",
        ));
        assert_eq!(c.admin_users, vec!["ops".to_string(), "postgres".to_string()]);
        assert_eq!(c.metrics_listen.as_deref(), Some("127.0.0.1:9187"));
        assert_eq!(c.shutdown_timeout, Duration::from_millis(2500));
        assert_eq!(
            ok(&MINIMAL.replace("cluster = \"main\"\n", "cluster = \"main\"\nmax_replica_lag = 1000\n"))
                .max_replica_lag,
            1000
        );
        let etcd =
            ok("cluster = \"c\"\n[dcs]\nkind = \"etcd\"\nendpoints = [\"http://h:2379\"]\n[auth]\nuserlist = \"/u\"\n");
        assert_eq!(etcd.dcs, DcsConfig::Etcd { endpoints: vec!["http://h:2379".into()] });
    }

    #[test]
    fn tls_and_auth_query_keys() {
        let d = ok(MINIMAL);
        assert_eq!(d.tls, TlsSettings::default());
        assert_eq!((d.tls.client_tls, d.tls.server_tls), (ClientTlsMode::Disable, ServerTlsMode::Prefer));
        assert_eq!(d.auth_query, None);
        let e = ok(example());
        assert_eq!((e.tls.client_tls, e.tls.server_tls), (ClientTlsMode::Disable, ServerTlsMode::Prefer));
        let c = ok(&format!("{MINIMAL}[tls]\ncert = \"proxy.crt\"\nkey = \"/k/proxy.key\"\n"));
        assert_eq!(c.tls.cert, Some(PathBuf::from("/etc/pgkeel/proxy.crt")), "relative to the file");
        assert_eq!(c.tls.key, Some(PathBuf::from("/k/proxy.key")));
        assert_eq!(c.tls.client_tls, ClientTlsMode::Allow, "allow is the default with a certificate");
        let c = ok(&format!(
            "{MINIMAL}[tls]\ncert = \"c\"\nkey = \"k\"\nclient_tls = \"require\"\nserver_tls = \"verify-full\"\n\
             server_ca = \"ca.crt\"\nserver_crl = \"/crl/ca.crl\"\n"
        ));
        assert_eq!((c.tls.client_tls, c.tls.server_tls), (ClientTlsMode::Require, ServerTlsMode::VerifyFull));
        assert_eq!(c.tls.server_ca, Some(PathBuf::from("/etc/pgkeel/ca.crt")));
        assert_eq!(c.tls.server_crl, Some(PathBuf::from("/crl/ca.crl")));
        for (mode, want) in [("disable", ServerTlsMode::Disable), ("require", ServerTlsMode::Require)] {
            assert_eq!(ok(&format!("{MINIMAL}[tls]\nserver_tls = \"{mode}\"\n")).tls.server_tls, want);
        }
        let c = ok(&MINIMAL.replace(
            "userlist = \"users.txt\"\n",
            "userlist = \"users.txt\"\nquery = \"SELECT usename, passwd FROM pg_shadow WHERE usename = $1\"\n\
             auth_user = \"pgkeel_auth\"\n",
        ));
        let aq = c.auth_query.expect("auth_query");
        assert_eq!(
            (aq.query.as_str(), aq.user.as_str()),
            ("SELECT usename, passwd FROM pg_shadow WHERE usename = $1", "pgkeel_auth")
        );
        let auth = |lines: &str| {
            MINIMAL.replace("userlist = \"users.txt\"\n", &format!("userlist = \"users.txt\"\n{lines}\n"))
        };
        assert_eq!((d.auth_type, e.auth_type), (AuthType::ScramSha256, AuthType::ScramSha256));
        assert_eq!(ok(&auth("auth_type = \"md5\"")).auth_type, AuthType::Md5);
        assert_eq!(ok(&auth("auth_type = \"scram-sha-256\"")).auth_type, AuthType::ScramSha256);
        // Client certificates: a CA for them, and the modes that ask for one.
        let certs = |mode: &str, ca: bool| {
            format!(
                "[tls]\ncert = \"c\"\nkey = \"k\"\nclient_tls = \"{mode}\"\n{}",
                if ca { "client_ca = \"clients.crt\"\n" } else { "" }
            )
        };
        for (mode, want) in [("verify-ca", ClientTlsMode::VerifyCa), ("verify-full", ClientTlsMode::VerifyFull)] {
            let c = ok(&format!("{MINIMAL}{}", certs(mode, true)));
            assert_eq!(c.tls.client_tls, want);
            assert!(want.requires_tls() && want.verifies_client());
            assert_eq!(c.tls.client_ca, Some(PathBuf::from("/etc/pgkeel/clients.crt")));
            assert_eq!(c.tls.client_crl, None);
            let c = ok(&format!("{MINIMAL}{}client_crl = \"clients.crl\"\n", certs(mode, true)));
            assert_eq!(c.tls.client_crl, Some(PathBuf::from("/etc/pgkeel/clients.crl")), "relative to the file");
            let c = ok(&format!("{MINIMAL}[tls]\nserver_cert = \"p.crt\"\nserver_key = \"/k/p.key\"\n"));
            assert_eq!(
                (c.tls.server_cert, c.tls.server_key),
                (Some(PathBuf::from("/etc/pgkeel/p.crt")), Some(PathBuf::from("/k/p.key")))
            );
            let c = ok(&format!("{}{}", auth("auth_type = \"cert\""), certs(mode, true)));
            assert_eq!(c.auth_type, AuthType::Cert);
        }
        assert!(ClientTlsMode::Require.requires_tls() && !ClientTlsMode::Require.verifies_client());
        for (text, want) in [
            (format!("{MINIMAL}{}", certs("verify-ca", false)), "tls.client_tls = \"verify-ca\" needs tls.client_ca"),
            (format!("{MINIMAL}{}", certs("require", true)), "tls.client_ca is set, and tls.client_tls = \"require\""),
            (
                format!("{MINIMAL}{}client_crl = \"clients.crl\"\n", certs("require", false)),
                "tls.client_crl is set without tls.client_ca",
            ),
            (format!("{MINIMAL}[tls]\nserver_cert = \"p.crt\"\n"), "tls.server_cert is set without tls.server_key"),
            (format!("{MINIMAL}[tls]\nserver_key = \"p.key\"\n"), "tls.server_key is set without tls.server_cert"),
            (
                format!("{MINIMAL}[tls]\nserver_tls = \"disable\"\nserver_cert = \"p.crt\"\nserver_key = \"p.key\"\n"),
                "tls.server_tls = \"disable\" sends it nowhere",
            ),
            (auth("auth_type = \"cert\""), "auth.auth_type = \"cert\" takes the user from the client's certificate"),
            (
                format!("{}{}", auth("auth_type = \"cert\""), certs("require", false)),
                "tls.client_tls = \"require\" asks for none",
            ),
            (format!("{MINIMAL}[tls]\ncert = \"c\"\n"), "tls.cert is set without tls.key"),
            (format!("{MINIMAL}[tls]\nkey = \"k\"\n"), "tls.key is set without tls.cert"),
            (format!("{MINIMAL}[tls]\nclient_tls = \"require\"\n"), "tls.client_tls = \"require\" needs tls.cert"),
            (format!("{MINIMAL}[tls]\nclient_tls = \"on\"\n"), "tls.client_tls = \"on\" is not a mode"),
            (format!("{MINIMAL}[tls]\nserver_tls = \"verify-ca\"\n"), "tls.server_tls = \"verify-ca\" is not a mode"),
            (format!("{MINIMAL}[tls]\nserver_tls = \"verify-full\"\n"), "needs tls.server_ca"),
            (
                format!("{MINIMAL}[tls]\nserver_tls = \"require\"\nserver_crl = \"ca.crl\"\n"),
                "tls.server_crl is set, and tls.server_tls = \"require\" does not check the servers' certificates",
            ),
            (format!("{MINIMAL}[tls]\nserver_crl = \"ca.crl\"\n"), "tls.server_tls = \"prefer\" does not check"),
            (format!("{MINIMAL}[tls]\ncrt = \"c\"\n"), "unknown key \"tls.crt\"; did you mean \"tls.cert\"?"),
            (format!("tls = 1\n{MINIMAL}"), "tls must be a table"),
            (auth("query = \"select 1\"\nauth_user = \"a\""), "auth.query = \"select 1\" has no $1"),
            (auth("query = \"select $1\""), "auth.query needs auth.auth_user"),
            (auth("auth_user = \"a\""), "auth.auth_user is set without auth.query"),
            (auth("auth_usr = \"a\""), "did you mean \"auth.auth_user\"?"),
            (auth("auth_type = \"trust\""), "auth.auth_type = \"trust\" is not a client authentication method"),
            (auth("auth_type = \"scram\""), "use \"scram-sha-256\" (the default), \"md5\""),
        ] {
            let e = err(&text);
            assert!(e.contains(want), "{text}\n=> {e}\nwanted: {want}");
        }
    }

    #[test]
    fn where_the_other_proxies_reach_this_one() {
        let with = |lines: &str, dcs: &str| {
            ok(&format!("{lines}\n{MINIMAL}").replace("kind = \"local\"\npath = \"/var/lib/pgkeel/dcs\"", dcs))
        };
        let local = "kind = \"local\"\npath = \"/var/lib/pgkeel/dcs\"";
        let etcd = "kind = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]";
        let cases = [
            ("listen = \"10.0.0.5:6432\"", etcd, ("10.0.0.5:6432", true)),
            ("listen = \"0.0.0.0:6432\"", local, ("127.0.0.1:6432", true)),
            ("listen = \"[::]:6432\"", local, ("[::1]:6432", true)),
            ("listen = \"0.0.0.0:6432\"", etcd, ("0.0.0.0:6432", false)),
            ("listen = \"0.0.0.0:6432\"\nconnect_address = \"db-proxy-1:6432\"", etcd, ("db-proxy-1:6432", true)),
        ];
        for (lines, dcs, (address, reachable)) in cases {
            let (a, r) = with(lines, dcs).connect_address_or_listen();
            assert_eq!((a.as_str(), r), (address, reachable), "{lines}");
        }
        assert!(err(&format!("connect_address = \"0.0.0.0:6432\"\n{MINIMAL}")).contains("is every interface"));
        assert!(err(&format!("connect_address = \"nohost\"\n{MINIMAL}")).contains("is not host:port"));
    }

    #[test]
    fn a_database_or_a_user_has_sizes_of_its_own() {
        let c = ok(&format!(
            "pool_size = 10\nmax_db_connections = 50\nmin_pool_size = 1\n{MINIMAL}\
             [databases.reporting]\npool_size = 40\nmax_db_connections = 60\nreserve_pool_size = 4\n\
             [databases.\"odd db\"]\nmin_pool_size = 3\n[users.batch]\npool_size = 5\nmax_user_connections = 8\n"
        ));
        assert_eq!(c.pool_size_for("app", "web"), 10);
        assert_eq!(c.pool_size_for("reporting", "web"), 40);
        assert_eq!(c.pool_size_for("reporting", "batch"), 5, "the user's pool_size wins");
        assert_eq!(c.pool_size_for("app", "batch"), 5);
        assert_eq!((c.max_db_connections_for("reporting"), c.max_db_connections_for("app")), (60, 50));
        assert_eq!((c.max_user_connections_for("batch"), c.max_user_connections_for("web")), (8, 0));
        assert_eq!((c.reserve_pool_size_for("reporting"), c.reserve_pool_size_for("app")), (4, 0));
        assert_eq!((c.min_pool_size_for("odd db"), c.min_pool_size_for("reporting")), (3, 1));
        assert!(c.any_min_pool_size());
        let modes = ok(&format!(
            "{MINIMAL}[databases.legacy]\npool_mode = \"session\"\n[users.batch]\npool_mode = \"transaction\"\n"
        ));
        assert_eq!(modes.pool_mode_for("legacy", "web"), PoolMode::Session);
        assert_eq!(modes.pool_mode_for("legacy", "batch"), PoolMode::Transaction, "the user's pool_mode wins");
        assert_eq!(modes.pool_mode_for("app", "web"), PoolMode::Transaction);
        let certs = ok(&format!("{MINIMAL}[users.app]\nserver_cert = \"app.crt\"\nserver_key = \"/k/app.key\"\n"));
        assert_eq!(
            certs.users["app"].server_cert,
            Some((PathBuf::from("/etc/pgkeel/app.crt"), PathBuf::from("/k/app.key"))),
            "relative to the file"
        );
        let alias = ok(&format!("{MINIMAL}[databases.shop]\ndbname = \"shop_2026\"\n"));
        assert_eq!((alias.dbname_for("shop"), alias.dbname_for("other")), ("shop_2026", "other"));
        assert!(err(&format!("{MINIMAL}[databases.shop]\ndbname = \"\"\n"))
            .contains("databases.shop.dbname = \"\" is not a database name postgres allows"));
        assert!(err(&format!("{MINIMAL}[databases.x]\npool_mode = \"statement\"\n"))
            .contains("databases.x.pool_mode = \"statement\" is not supported"));
        assert!(!ok(MINIMAL).any_min_pool_size());
        assert!(ok(&format!("{MINIMAL}[databases.x]\nmin_pool_size = 2\n")).any_min_pool_size());
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let with = |line: &str| format!("{line}\n{MINIMAL}");
        for (text, want) in [
            (with("pool_sise = 3"), "unknown key \"pool_sise\"; did you mean \"pool_size\"?"),
            (with("pool_mod = \"session\""), "did you mean \"pool_mode\"?"),
            (with("userlist = \"/x\""), "unknown key \"userlist\"; did you mean \"auth.userlist\"?"),
            (with("frobnicate = 1"), "unknown key \"frobnicate\"; valid top-level keys: cluster, listen"),
            (
                MINIMAL.replace("userlist =", "userlst ="),
                "unknown key \"auth.userlst\"; did you mean \"auth.userlist\"?",
            ),
            (MINIMAL.replace("path =", "pth ="), "unknown key \"dcs.pth\"; did you mean \"dcs.path\"?"),
            (MINIMAL.replace("cluster = \"main\"\n", ""), "missing required key \"cluster\""),
            (MINIMAL.replace("kind = \"local\"", "kind = \"zk\""), "dcs.kind = \"zk\" is not supported"),
            (MINIMAL.replace("[auth]\nuserlist = \"users.txt\"\n", ""), "missing required key \"auth.userlist\""),
            (with("pool_mode = \"statement\""), "pool_mode = \"statement\" is not supported"),
            (with("pool_mode = \"tx\""), "pool_mode = \"tx\" is not a pool mode"),
            (with("pool_size = 0"), "pool_size = 0 is out of range: use 1 to 10000"),
            (
                format!("{MINIMAL}[databases.app]\npool_sise = 3\n"),
                "unknown key \"databases.app.pool_sise\"; did you mean \"databases.app.pool_size\"?",
            ),
            (
                format!("{MINIMAL}[databases.app]\nmax_user_connections = 3\n"),
                "databases.app.max_user_connections: max_user_connections cannot be set for one database; set it in [users.NAME]",
            ),
            (
                format!("{MINIMAL}[databases.app]\npool_size = 0\n"),
                "databases.app.pool_size = 0 is out of range: use 1 to 10000",
            ),
            (
                format!("{MINIMAL}[users.batch]\nmax_user_connections = \"5\"\n"),
                "users.batch.max_user_connections must be an integer, not a string; e.g. users.batch.max_user_connections = 100",
            ),
            (format!("{MINIMAL}[databases]\napp = 3\n"), "databases.app must be a table, not an integer"),
            (with("users = 3"), "users must be a table of tables, not an integer"),
            (
                format!("{MINIMAL}[users.batch]\nmin_pool_size = 3\n"),
                "users.batch.min_pool_size: min_pool_size cannot be set for one user; set it in [databases.NAME]",
            ),
            (
                format!("{MINIMAL}[users.batch]\nfrob = 3\n"),
                "unknown key \"users.batch.frob\"; valid keys in [users.batch]: pool_mode, pool_size, max_user_connections, \
                 server_cert, server_key",
            ),
            (format!("{MINIMAL}[users.app]\nserver_cert = \"a.crt\"\n"), "users.app.server_cert is set without users.app.server_key"),
            (format!("{MINIMAL}[users.app]\nserver_key = \"a.key\"\n"), "users.app.server_key is set without users.app.server_cert"),
            (
                format!("{MINIMAL}[tls]\nserver_tls = \"disable\"\n[users.app]\nserver_cert = \"a.crt\"\nserver_key = \"a.key\"\n"),
                "users.app.server_cert is set, and tls.server_tls = \"disable\" sends it nowhere",
            ),
            (with("max_db_connections = -1"), "max_db_connections = -1 is out of range: use 0 to 100000"),
            (with("max_user_connections = 1.5"), "max_user_connections must be an integer"),
            (with("tcp_keepcnt = 0"), "tcp_keepcnt = 0 is out of range: use 1 to 127"),
            (with("tcp_keepidle = \"100ms\""), "tcp_keepidle = \"100ms\" is out of range: use 1s to 24h"),
            (with("tcp_keepalive = \"yes\""), "tcp_keepalive must be true or false"),
            (with("tcp_keepintval = 5"), "did you mean \"tcp_keepintvl\"?"),
            (with("pool_size = \"5\""), "pool_size must be an integer, not a string"),
            (with("query_wait_timeout = \"5 parsecs\""), "query_wait_timeout: invalid duration"),
            (with("query_wait_timeout = -1"), "a duration cannot be negative"),
            (with("listen = \"6432\""), "listen = \"6432\" is not host:port"),
            (with("cluster2 = 1"), "unknown key \"cluster2\"; did you mean \"cluster\"?"),
            ("cluster = ".to_string(), "TOML parse error at line 1"),
            (
                with("listen_replica = \"127.0.0.1:6432\""),
                "listen_replica = \"127.0.0.1:6432\" is the address of listen too",
            ),
            (with("listen_primary = \"x\""), "listen_primary = \"x\" is not host:port"),
            (with("load_balance = \"fastest\""), "load_balance = \"fastest\" is not a strategy"),
            (with("max_replica_lag = \"16 parsecs\""), "max_replica_lag = \"16 parsecs\": unknown unit"),
            (with("max_replica_lag = -1"), "a size cannot be negative"),
            (with("read_your_writes = \"yes\""), "read_your_writes = \"yes\": use \"connection\" (or true"),
            (with("read_your_writes = 1"), "read_your_writes = 1: use"),
            (with("primary_functions = \"f\""), "primary_functions must be an array of function names"),
            (with("primary_functions = [\"f(int)\"]"), "\"f(int)\" is not a function name"),
            (with("replica_functions = [\"a.b.c\"]"), "replica_functions: \"a.b.c\" is not a function name"),
            (with("replica_functions = [1]"), "replica_functions: 1 is not a string"),
            (with("max_prepared_statements = -1"), "max_prepared_statements = -1 is out of range"),
            (with("max_replica_lags = 1"), "did you mean \"max_replica_lag\"?"),
            (with("admin_user = []"), "did you mean \"admin_users\"?"),
            (with("admin_users = \"postgres\""), "admin_users must be an array of user names, not a string"),
            (with("admin_users = [1]"), "admin_users: 1 is not a user name"),
            (with("metrics_listen = \"9187\""), "metrics_listen = \"9187\" is not host:port"),
            (
                with("metrics_listen = \"127.0.0.1:6432\""),
                "metrics_listen = \"127.0.0.1:6432\" is the address of listen too",
            ),
            (with("shutdown_timeout = \"soon\""), "shutdown_timeout: invalid duration"),
        ] {
            let e = err(&text);
            assert!(e.contains(want), "{text}\n=> {e}\nwanted: {want}");
        }
    }
}
