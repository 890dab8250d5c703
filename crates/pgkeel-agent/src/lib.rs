//! The per-node agent: it runs and supervises this node's postgres, drives the pure decisions of
//! `pgkeel-ha` with real I/O (DCS, postgres, peers), and serves the REST API and metrics.
//!
//! - [`run`] starts the agent in phases: open the DCS, find the postgres binaries, bind the REST
//!   listener, then run the HA loop until a shutdown signal, then stop postgres and release the
//!   leader key (never exit while holding it).
//! - `ha_loop` owns the loop: observe, decide, act, publish.
//! - `rest` owns the HTTP API (health, state, actions, metrics).
//! - [`http`] is the small client the CLI and the peer probe use.

pub mod guard;
mod ha_loop;
pub mod http;
pub use ha_loop::random_password;
mod rest;
mod schedule;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use pgkeel_config::{DynamicConfig, NodeConfig};
use pgkeel_dcs::cluster::{ClusterStore, MemberTags, Role};
use pgkeel_dcs::local::LocalStore;
use pgkeel_dcs::Dcs;
use serde::Serialize;
use tokio::sync::{watch, Notify};

/// What this agent reports about itself (REST `/node`, peer probes, metrics).
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Member name.
    pub name: String,
    /// Cluster name.
    pub cluster: String,
    /// REST base URL.
    pub api_url: String,
    /// Postgres `host:port`.
    pub pg_address: String,
    /// Role.
    pub role: Role,
    /// Postgres state: `running`, `starting`, `stopped`, `crashed`, `uninitialized`.
    pub state: String,
    /// Timeline.
    pub timeline: Option<u32>,
    /// Primary: current LSN; replica: max(received, replayed).
    pub lsn: Option<u64>,
    /// Replica: received LSN.
    pub received_lsn: Option<u64>,
    /// Replica: replayed LSN.
    pub replayed_lsn: Option<u64>,
    /// Replica: WAL receiver streaming.
    pub streaming: bool,
    /// Replica: upstream member.
    pub following: Option<String>,
    /// Term this node runs under (primary) or follows (replica).
    pub term: u64,
    /// Current leader key holder.
    pub leader: Option<String>,
    /// This node holds the leader key with a valid lease.
    pub holds_lease: bool,
    /// Milliseconds left on this node's lease.
    pub lease_left_ms: Option<u64>,
    /// Replica: bytes behind the leader's last reported LSN.
    pub lag_bytes: Option<u64>,
    /// Replica: a confirmed synchronous standby (in the `sync` key).
    pub sync_standby: bool,
    /// Cluster is paused.
    pub paused: bool,
    /// Failsafe mode is on (as this agent last applied the cluster config).
    pub failsafe_mode: bool,
    /// Last DCS read succeeded.
    pub dcs_ok: bool,
    /// When the HA loop last finished (unix ms).
    pub last_loop_ms: u64,
    /// Last decision's reason.
    pub last_decision: String,
    /// Tags.
    pub tags: MemberTags,
    /// Parameters waiting for a restart.
    pub pending_restart: Vec<String>,
    /// When the running postmaster started (unix seconds), to tell a restart happened.
    pub postmaster_start: Option<f64>,
    /// Primary: connected replicas (`pg_stat_replication`).
    pub replication: Vec<pgkeel_pg::probe::ReplicationRow>,
    /// pgkeel version.
    pub version: String,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Promotions done by this node (failover or switchover).
    pub promotions: std::sync::atomic::AtomicU64,
    /// Demotions done by this node.
    pub demotions: std::sync::atomic::AtomicU64,
    /// HA loops run.
    pub loops: std::sync::atomic::AtomicU64,
    /// DCS errors.
    pub dcs_errors: std::sync::atomic::AtomicU64,
    /// Duration of the last DCS read, microseconds.
    pub dcs_latency_us: std::sync::atomic::AtomicU64,
}

/// State shared by the loop and the REST API.
pub(crate) struct Shared {
    /// node.toml as the agent runs it, read with [`Shared::config`]: the file read at start,
    /// with the reloadable keys of the last reload ([`Shared::reload`]).
    config: RwLock<Arc<NodeConfig>>,
    /// Where node.toml is read again on a reload; `None` when the configuration was built in
    /// code (reloads are refused).
    config_path: Option<PathBuf>,
    /// Each reload is one read-compare-swap.
    reloading: tokio::sync::Mutex<()>,
    pub store: ClusterStore,
    pub status: RwLock<NodeStatus>,
    pub dynamic: RwLock<DynamicConfig>,
    /// Wakes the loop early (REST actions).
    pub wake: Notify,
    pub counters: Counters,
    /// An operator request for this node's postgres, carried out by the loop.
    pub request: std::sync::Mutex<Option<NodeRequest>>,
    /// Failsafe bookkeeping shared by the loop (racing) and `POST /failsafe` (confirming):
    /// one lock, so a confirmation and a race can never interleave.
    pub failsafe: std::sync::Mutex<FailsafeState>,
}

/// See [`Shared::failsafe`].
#[derive(Debug, Default)]
pub(crate) struct FailsafeState {
    /// This member confirmed a failsafe primary: it must not race before this instant.
    pub confirmed_until: Option<std::time::Instant>,
    /// This member holds, or is about to take, the leader key: it must not confirm another.
    pub racing: bool,
}

/// Operator requests the REST API hands to the loop (it owns postgres).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeRequest {
    /// Restart postgres in place (the primary keeps the leader key).
    Restart,
    /// Replace the data directory with a fresh clone of the leader (old one kept aside).
    Reinitialize,
}

impl Shared {
    pub fn status(&self) -> NodeStatus {
        self.status.read().expect("status lock poisoned").clone()
    }
    pub fn dynamic(&self) -> DynamicConfig {
        self.dynamic.read().expect("dynamic lock poisoned").clone()
    }
    pub fn config(&self) -> Arc<NodeConfig> {
        self.config.read().expect("config lock poisoned").clone()
    }

    /// Read node.toml again and take its reloadable keys ([`pgkeel_config::RELOADABLE`]);
    /// the loop is woken to apply them (postgres parameters and `pg_hba.conf` with a reload of
    /// postgres, tags in this member's record). A file that does not pass `pgkeel config
    /// check` changes nothing and is the error.
    pub async fn reload(&self) -> Result<pgkeel_config::Reload, pgkeel_config::ConfigError> {
        let Some(path) = &self.config_path else {
            return Err(pgkeel_config::ConfigError::Invalid(
                "this agent was not started from a node.toml file: nothing to reload".into(),
            ));
        };
        let _one = self.reloading.lock().await;
        let file = pgkeel_config::load(path)?;
        let reload = self.config().reload(&file);
        if !reload.applied.is_empty() {
            *self.config.write().expect("config lock poisoned") = Arc::new(reload.config.clone());
            self.status.write().expect("status lock poisoned").tags = MemberTags {
                nofailover: reload.config.tags.nofailover,
                failover_priority: reload.config.tags.failover_priority,
            };
            self.wake.notify_one();
        }
        Ok(reload)
    }
}

/// Log what a reload of node.toml (`via`: `SIGHUP`, `POST /reload`) did, and say it in one
/// line for the caller.
pub(crate) fn report_reload(result: &Result<pgkeel_config::Reload, pgkeel_config::ConfigError>, via: &str) -> String {
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("node.toml not reloaded: {e}; the agent keeps running with its configuration");
            tracing::error!("{via}: {msg}");
            return msg;
        }
    };
    if r.is_unchanged() {
        tracing::info!("{via}: node.toml reloaded, nothing changed");
        return "node.toml reloaded: nothing changed".into();
    }
    let mut parts = Vec::new();
    if !r.applied.is_empty() {
        let keys = r.applied.join(", ");
        tracing::info!("{via}: node.toml reloaded, applying {keys}");
        parts.push(format!("applied {keys}"));
    }
    if !r.need_restart.is_empty() {
        let keys = r.need_restart.join(", ");
        tracing::warn!("{via}: node.toml changes {keys}: the agent keeps the running values until it restarts");
        parts.push(format!("{keys} changed but take effect when the agent restarts"));
    }
    if !r.bootstrap.is_empty() {
        let keys = r.bootstrap.join(", ");
        tracing::warn!(
            "{via}: node.toml changes {keys}: [bootstrap] is read only when the cluster is created; change the \
             running cluster with `pgkeel config set`"
        );
        parts.push(format!(
            "{keys} changed but [bootstrap] is read only when the cluster is created (use pgkeel config set)"
        ));
    }
    format!("node.toml reloaded: {}", parts.join("; "))
}

/// Options that do not belong in node.toml.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Write the agent's pid here (removed on exit).
    pub pid_file: Option<PathBuf>,
    /// The node.toml the configuration came from: read again on SIGHUP and `POST /reload`.
    pub config_path: Option<PathBuf>,
}

/// Unix time in ms.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Open the DCS the config names. For etcd this checks that one of the endpoints answers, so
/// an agent pointed at the wrong place stops at once with the endpoints it tried.
pub async fn open_dcs(config: &NodeConfig) -> anyhow::Result<Arc<dyn Dcs>> {
    match &config.dcs {
        pgkeel_config::DcsConfig::Local { path } => {
            let store =
                LocalStore::open(path).with_context(|| format!("open the local store at {}", path.display()))?;
            Ok(Arc::new(store))
        }
        pgkeel_config::DcsConfig::Etcd { endpoints } => {
            // Per attempt on one member; each DCS call of the HA loop is bounded by
            // retry_timeout on top of this.
            const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
            let store = pgkeel_dcs::etcd::EtcdStore::connect(endpoints.clone(), ETCD_REQUEST_TIMEOUT)
                .await
                .context("open the etcd DCS (dcs.endpoints)")?;
            Ok(Arc::new(store))
        }
    }
}

/// Run the agent until `shutdown` turns true. Returns after postgres has been stopped and the
/// leader key released.
pub async fn run(config: NodeConfig, options: RunOptions, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    // Phase 1: everything that can fail on bad config or a bad machine, before binding.
    // SIGHUP first: its default action would end the agent (and the leader's lease with it).
    let mut hangup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("install the SIGHUP handler")?;
    let dcs = open_dcs(&config).await?;
    let store = ClusterStore::new(dcs, &config.cluster);
    let bins = pgkeel_pg::binaries::PgBinaries::discover(config.postgres.bin_dir.as_deref())?;
    let run_as = pgkeel_pg::user::run_as_for(&config.postgres.os_user)?;
    if let Some(repo) = config.backup.repo.as_ref().filter(|_| !config.backup.is_s3()) {
        // archive_command runs as the postgres OS user: the repository must be its.
        pgkeel_pg::user::prepare_dir(repo, 0o700, run_as.as_ref())
            .with_context(|| format!("prepare the backup repository {} (backup.repo)", repo.display()))?;
    }
    tracing::info!(
        node = %config.name, cluster = %config.cluster, dcs = %store.dcs().describe(),
        postgres = %bins.dir.display(), version = bins.major_version, "starting agent"
    );

    // Phase 2: bind.
    let listener = tokio::net::TcpListener::bind(&config.rest.listen)
        .await
        .with_context(|| format!("bind the REST API on {} (rest.listen)", config.rest.listen))?;
    if let Some(p) = &options.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("write pid file {}", p.display()))?;
    }

    let status = NodeStatus {
        name: config.name.clone(),
        cluster: config.cluster.clone(),
        api_url: config.rest_url(),
        pg_address: config.pg_connect_address().to_string(),
        role: Role::Stopped,
        state: "starting".into(),
        timeline: None,
        lsn: None,
        received_lsn: None,
        replayed_lsn: None,
        streaming: false,
        following: None,
        term: 0,
        leader: None,
        holds_lease: false,
        lease_left_ms: None,
        lag_bytes: None,
        sync_standby: false,
        paused: false,
        failsafe_mode: false,
        dcs_ok: false,
        last_loop_ms: 0,
        last_decision: "agent starting".into(),
        tags: MemberTags { nofailover: config.tags.nofailover, failover_priority: config.tags.failover_priority },
        pending_restart: vec![],
        postmaster_start: None,
        replication: vec![],
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let shared = Arc::new(Shared {
        dynamic: RwLock::new(config.bootstrap.clone()),
        config: RwLock::new(Arc::new(config)),
        config_path: options.config_path.clone(),
        reloading: tokio::sync::Mutex::new(()),
        store,
        status: RwLock::new(status),
        wake: Notify::new(),
        request: std::sync::Mutex::new(None),
        failsafe: std::sync::Mutex::new(FailsafeState::default()),
        counters: Counters::default(),
    });

    let on_hangup = shared.clone();
    let reloads = tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            report_reload(&on_hangup.reload().await, "SIGHUP");
        }
    });

    // Phase 3: spawn the API apart from the loop, so health checks answer while the loop works.
    let api = tokio::spawn(rest::serve(listener, shared.clone(), shutdown.clone()));

    // Phase 4: the loop, until shutdown; it stops postgres and releases the key on its way out.
    let result = ha_loop::HaLoop::new(shared.clone(), bins, run_as).run(shutdown).await;

    api.abort();
    reloads.abort();
    if let Some(p) = &options.pid_file {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// A generous bound for operations that must not hang forever.
pub(crate) const LONG_OP: Duration = Duration::from_secs(120);
