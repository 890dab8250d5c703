//! Configuration: the per-agent `node.toml` ([`NodeConfig`]) and the dynamic cluster config
//! stored in the DCS ([`DynamicConfig`]).
//!
//! Every key is documented where it is declared. Unknown keys are errors that name the
//! closest valid key ([`check`]). Durations accept a number of seconds (`4`, `1.5`) or a string
//! with a unit (`"1500ms"`, `"2s"`, `"1m"`); byte sizes accept a number of bytes or a string
//! with a unit (`"10MB"`, `"1MiB"`, `"512kB"`).

pub mod cron;
mod reload;
mod units;
mod validate;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use reload::{Reload, RELOADABLE};
pub use units::{format_duration, format_unix_utc, parse_age, parse_bytes, parse_duration};
pub use validate::{check, example, load, ConfigError};

/// Exit code for a bad configuration (EX_CONFIG from sysexits.h).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// One agent's configuration (`node.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Cluster name: every agent of one cluster uses the same one. Letters, digits, `-`, `_`.
    pub cluster: String,
    /// This member's name, unique in the cluster. Letters, digits, `-`, `_`.
    pub name: String,
    /// Postgres data directory of this node.
    pub data_dir: PathBuf,
    /// Where the cluster state lives.
    pub dcs: DcsConfig,
    /// Local postgres settings.
    #[serde(default)]
    pub postgres: PostgresConfig,
    /// REST API settings.
    #[serde(default)]
    pub rest: RestConfig,
    /// Tags advertised to the cluster.
    #[serde(default)]
    pub tags: TagsConfig,
    /// The backup repository this node archives WAL to while it is the primary.
    #[serde(default)]
    pub backup: BackupConfig,
    /// Dynamic config written to the DCS by the member that bootstraps the cluster. Ignored
    /// afterwards: change it with `PATCH /config` (`pgkeel pause` / `resume` use it).
    #[serde(default)]
    pub bootstrap: DynamicConfig,
}

impl NodeConfig {
    /// `host:port` other members and clients use to reach this postgres: `connect_address`,
    /// else `listen`.
    pub fn pg_connect_address(&self) -> &str {
        self.postgres.connect_address.as_deref().unwrap_or(&self.postgres.listen)
    }

    /// Base URL of this agent's REST API, without a trailing `/` so callers can append
    /// `/health` and the like: `rest.connect_url`, else `http://` + `rest.listen`.
    pub fn rest_url(&self) -> String {
        match &self.rest.connect_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.rest.listen),
        }
    }

    /// This configuration as `node.toml` text, which [`check`] reads back to an equal
    /// configuration. Durations are written as seconds (`ttl = 4.0`).
    ///
    /// # Panics
    ///
    /// If a path is not valid UTF-8, which TOML cannot hold. [`NodeConfig::validate`] refuses
    /// such paths, so a validated configuration never panics here.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("TOML holds every NodeConfig whose paths are UTF-8")
    }
}

/// Which DCS to use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DcsConfig {
    /// The embedded single-host store: a directory shared by the agents of one machine.
    Local {
        /// Directory holding the store; created if missing. Every agent of the cluster on this
        /// machine must use the same path; agents on other machines cannot share it.
        path: PathBuf,
    },
    /// An etcd v3 cluster (etcd 3.4 or newer), for clusters that span machines.
    Etcd {
        /// Client URLs of the etcd members, `http://host:port` (e.g. `http://10.0.0.1:2379`).
        /// List every member: a call that cannot reach one tries the next.
        endpoints: Vec<String>,
    },
}

/// Local postgres settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `host:port` postgres listens on.
    pub listen: String,
    /// `host:port` other members and clients use to reach this postgres (default: `listen`).
    pub connect_address: Option<String>,
    /// Directory with `postgres`, `initdb`, `pg_ctl`... (default: `pg_config --bindir`, else the
    /// newest `/usr/lib/postgresql/*/bin`).
    pub bin_dir: Option<PathBuf>,
    /// OS user that runs postgres when the agent runs as root.
    pub os_user: String,
    /// Superuser the agent connects as, and its password (for TCP clients; the agent itself
    /// uses the local socket).
    pub superuser: Credentials,
    /// Replication user. Without a password, the bootstrapping member generates one and keeps
    /// it in the DCS `initialize` record.
    pub replication: Credentials,
    /// Postgres parameters for this node, applied on top of the cluster's.
    #[serde(deserialize_with = "params_serde::deserialize")]
    pub parameters: BTreeMap<String, ParamValue>,
    /// Lines of the operator's for `pg_hba.conf`, placed after pgkeel's local and replication
    /// lines and before its catch-all SCRAM lines (first match wins).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pg_hba: Vec<String>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            listen: "127.0.0.1:5432".into(),
            connect_address: None,
            bin_dir: None,
            os_user: "postgres".into(),
            superuser: Credentials { username: "postgres".into(), password: None },
            replication: Credentials { username: "pgkeel_replicator".into(), password: None },
            parameters: BTreeMap::new(),
            pg_hba: Vec::new(),
        }
    }
}

/// A user name and an optional password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Role name.
    pub username: String,
    /// Password (generated when absent, where the description says so).
    #[serde(default)]
    pub password: Option<String>,
}

/// A postgres parameter value as written in TOML: string, integer, float or boolean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// `on`, `'1GB'`, ...
    Text(String),
    /// `100`
    Int(i64),
    /// `0.9`
    Float(f64),
    /// `true` / `false` (written as `on` / `off`).
    Bool(bool),
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Text(s) => f.write_str(s),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Bool(b) => f.write_str(if *b { "on" } else { "off" }),
        }
    }
}

/// REST API settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestConfig {
    /// `host:port` the REST API listens on.
    pub listen: String,
    /// URL other members and the CLI use (default: `http://` + `listen`).
    pub connect_url: Option<String>,
    /// User name for actions (POST/PATCH); health endpoints need none.
    pub username: String,
    /// Password for actions. Without one, every action is refused with 401.
    pub password: Option<String>,
}

impl Default for RestConfig {
    fn default() -> Self {
        RestConfig { listen: "127.0.0.1:8008".into(), connect_url: None, username: "pgkeel".into(), password: None }
    }
}

/// Backups: where this node's WAL archive and base backups live.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Repository: an absolute directory (writable by the postgres OS user) or an
    /// S3-compatible bucket, `s3://BUCKET/PREFIX` (settings in `[backup.s3]`). When set, the
    /// agent runs postgres with `archive_mode = on` and `archive_command = 'pgkeel wal push
    /// ...'` (only the primary archives) and `restore_command = 'pgkeel wal fetch ...'`, and
    /// `pgkeel wal|backup|restore --config node.toml` use it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<PathBuf>,
    /// Where and how to reach an `s3://` repository. Keys not given come from the
    /// environment (`PGKEEL_S3_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Settings>,
    /// Bootstrap a new cluster from a backup instead of `initdb`: the member that bootstraps
    /// restores it (to a target, else to the end of the archive) and promotes; the others
    /// clone from it. Ignored once the cluster exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_from: Option<BootstrapFrom>,
}

/// `[backup.bootstrap_from]`: the backup a new cluster starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootstrapFrom {
    /// Repository holding the backup (a directory or `s3://...`, with `[backup.s3]`).
    /// Default: `backup.repo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<PathBuf>,
    /// Cluster name in that repository. Default: this cluster's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The backup's label. Default: the newest one that can reach the target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Recover up to this time, with a UTC offset, e.g. "2024-05-01 12:30:00+00".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_time: Option<String>,
    /// Recover up to this LSN, e.g. "0/3000148".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_lsn: Option<String>,
    /// Recover up to the commit of this transaction id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_xid: Option<u64>,
    /// Recover up to this named restore point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_name: Option<String>,
}

impl BackupConfig {
    /// Whether the repository is an S3 bucket (`s3://...`).
    pub fn is_s3(&self) -> bool {
        self.repo.as_ref().is_some_and(|r| r.to_string_lossy().starts_with("s3://"))
    }
}

/// `[backup.s3]`: an S3-compatible service. The same keys make the file the agent hands to
/// `archive_command` (`pgkeel wal push --s3-config FILE`), so the secret never appears in
/// postgres's settings or process list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    /// Service URL, `http://HOST:PORT` or `https://HOST[:PORT]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Signing region (default `us-east-1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Access key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// Secret access key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<String>,
    /// CA certificates (PEM) to check an `https://` endpoint with. Default: the system's
    /// bundle (`/etc/ssl/certs/ca-certificates.crt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl S3Settings {
    /// Reads a file holding these keys (TOML), naming the file and key on error.
    pub fn load(path: &std::path::Path) -> Result<S3Settings, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        let s: S3Settings =
            toml::from_str(&text).map_err(|e| ConfigError::Invalid(format!("{}: {}", path.display(), e.message())))?;
        s.check("")?;
        Ok(s)
    }

    /// The file's text (TOML).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    pub(crate) fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "{prefix}endpoint = {e:?}: write the service URL, e.g. \"https://s3.eu-west-1.amazonaws.com\" or \
                     \"http://127.0.0.1:9000\""
                )));
            }
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(ConfigError::Invalid(format!(
                "{prefix}access_key_id and {prefix}secret_access_key go together: give both or neither"
            )));
        }
        Ok(())
    }
}

/// Tags advertised to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TagsConfig {
    /// Never promote this member automatically.
    pub nofailover: bool,
    /// Among equally advanced candidates the higher priority wins; 0 means never promote
    /// (same as `nofailover`).
    pub failover_priority: i64,
}

impl Default for TagsConfig {
    fn default() -> Self {
        TagsConfig { nofailover: false, failover_priority: 1 }
    }
}

/// Cluster-wide settings kept in the DCS `config` key. Defaults are chosen for failover in a
/// few seconds: `loop_wait + 2 × retry_timeout ≤ ttl` must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicConfig {
    /// Leader lease: after this long without renewal the leader key expires and replicas race.
    #[serde(with = "units::duration_serde")]
    pub ttl: Duration,
    /// Pause between two runs of the HA loop.
    #[serde(with = "units::duration_serde")]
    pub loop_wait: Duration,
    /// How long one DCS or postgres call may take before it counts as failed.
    #[serde(with = "units::duration_serde")]
    pub retry_timeout: Duration,
    /// A replica further behind the leader's last known LSN than this (bytes) is not promoted.
    #[serde(with = "units::bytes_serde")]
    pub maximum_lag_on_failover: u64,
    /// How long a crashed primary may take to come back in place before the leader key is
    /// released for a failover.
    #[serde(with = "units::duration_serde")]
    pub primary_start_timeout: Duration,
    /// While true, nothing automatic happens (no failover, no restart, no demotion).
    pub pause: bool,
    /// Synchronous replication: `off` (asynchronous), `on` (commits wait for
    /// `synchronous_node_count` standbys while there are any), `strict` (no commit without
    /// them), `quorum` (commits wait for `synchronous_node_count` of all streaming standbys,
    /// `ANY k`). In these modes a failover goes only to a standby with every acknowledged
    /// commit.
    pub synchronous_mode: SyncMode,
    /// How many synchronous standbys commits wait for (`on`, `strict`; k of `ANY k` in
    /// `quorum`).
    pub synchronous_node_count: u32,
    /// While the DCS is unreachable, the primary stays writable as long as every member
    /// confirms it over the REST API (`POST /failsafe`); without it, it demotes when its lease
    /// runs out. Every member must accept the same REST credentials.
    pub failsafe_mode: bool,
    /// How long the leader, stepping down for a switchover, waits for the running proxies
    /// (`pgkeel proxy`) to hold new transactions and finish the ones in flight before it
    /// stops postgres. 0 does not wait. At most 1 minute.
    #[serde(with = "units::duration_serde")]
    pub switchover_drain_timeout: Duration,
    /// When to take a base backup into each member's `backup.repo`: a cron expression in
    /// UTC, e.g. `"30 2 * * *"`. One member runs each scheduled backup, a replica when one
    /// is streaming. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_schedule: Option<String>,
    /// When to take an incremental backup (only the files changed since the newest backup):
    /// a cron expression in UTC. A minute matching `backup_schedule` too takes a full one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_schedule_incremental: Option<String>,
    /// After each scheduled backup, keep the newest N backups (and those they share files
    /// with) and remove the rest and their WAL (`pgkeel backup expire --keep N`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_keep: Option<u32>,
    /// After each scheduled backup, keep a recovery window this long, e.g. `"14d"`
    /// (`pgkeel backup expire --max-age`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_max_age: Option<String>,
    /// When to take a logical dump of every database (`pgkeel dump`): cron, UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump_schedule: Option<String>,
    /// After each scheduled dump, keep the newest N dumps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump_keep: Option<u32>,
    /// After each scheduled dump, keep the dumps of this long a window, e.g. `"30d"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump_max_age: Option<String>,
    /// Postgres parameters for every member.
    pub postgresql: DynamicPostgres,
}

/// Synchronous replication mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Asynchronous replication.
    #[default]
    Off,
    /// Synchronous while standbys are available; asynchronous (and no automatic failover)
    /// while none is.
    On,
    /// Never acknowledge a commit without the synchronous standbys.
    Strict,
    /// `ANY k` of the streaming standbys confirm each commit; a failover goes to the voter
    /// with the most WAL among enough reachable voters.
    Quorum,
}

impl SyncMode {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Off => "off",
            SyncMode::On => "on",
            SyncMode::Strict => "strict",
            SyncMode::Quorum => "quorum",
        }
    }
}

/// Cluster-wide postgres settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicPostgres {
    /// Parameters for every member (a node's own `[postgres.parameters]` win).
    #[serde(deserialize_with = "params_serde::deserialize")]
    pub parameters: BTreeMap<String, ParamValue>,
    /// `pg_hba.conf` lines for every member, placed after a node's own `postgres.pg_hba`
    /// lines (first match wins, so a node's lines take precedence).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pg_hba: Vec<String>,
}

impl Default for DynamicConfig {
    fn default() -> Self {
        DynamicConfig {
            ttl: Duration::from_secs(4),
            loop_wait: Duration::from_secs(1),
            retry_timeout: Duration::from_millis(1500),
            maximum_lag_on_failover: 1024 * 1024,
            primary_start_timeout: Duration::from_secs(10),
            pause: false,
            synchronous_mode: SyncMode::Off,
            synchronous_node_count: 1,
            failsafe_mode: false,
            switchover_drain_timeout: Duration::from_secs(5),
            backup_schedule: None,
            backup_schedule_incremental: None,
            backup_keep: None,
            backup_max_age: None,
            dump_schedule: None,
            dump_keep: None,
            dump_max_age: None,
            postgresql: DynamicPostgres::default(),
        }
    }
}

impl DynamicConfig {
    /// Parse the JSON stored in the DCS, validating it.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, ConfigError> {
        let c: DynamicConfig = serde_json::from_value(v.clone())
            .map_err(|e| ConfigError::Invalid(format!("cluster config in the DCS: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// As JSON for the DCS.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("dynamic config always serializes")
    }
}

/// Reading parameter maps. In TOML, `pg_stat_statements.max = 1000` is a dotted key, i.e. a
/// nested table; postgres knows it as the one parameter `pg_stat_statements.max`, so nested
/// tables are flattened back into dotted names.
mod params_serde {
    use std::collections::BTreeMap;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};

    use crate::ParamValue;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Value(ParamValue),
        Nested(BTreeMap<String, Raw>),
    }

    /// A map of parameters, nested tables flattened to dotted names.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, ParamValue>, D::Error> {
        let raw = BTreeMap::<String, Raw>::deserialize(d)?;
        let mut out = BTreeMap::new();
        flatten("", raw, &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }

    fn flatten(prefix: &str, raw: BTreeMap<String, Raw>, out: &mut BTreeMap<String, ParamValue>) -> Result<(), String> {
        for (name, value) in raw {
            let name = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
            match value {
                Raw::Value(v) => {
                    // `"a.b" = 1` and `a.b = 2` are different TOML keys but the same parameter.
                    if out.insert(name.clone(), v).is_some() {
                        return Err(format!("parameter {name:?} is given twice; keep one"));
                    }
                }
                Raw::Nested(map) => flatten(&name, map, out)?,
            }
        }
        Ok(())
    }
}
