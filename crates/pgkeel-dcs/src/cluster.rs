//! The cluster's key layout under `/pgkeel/<cluster>/` and the typed values stored there.
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `leader` | [`LeaderValue`]: holder + term | TTL `ttl`, renewed by compare-and-set |
//! | `term` | last term handed out (number) | permanent, bumped by compare-and-set |
//! | `members/<name>` | [`MemberValue`] | TTL `ttl`, rewritten every loop |
//! | `config` | dynamic config (JSON object) | permanent, versioned by revision |
//! | `initialize` | [`InitializeValue`] | permanent: who bootstrapped, system identifier |
//! | `failover` | [`FailoverValue`] | short TTL: a pending switchover/failover request |
//! | `status` | [`StatusValue`] | leader's last LSN, rewritten every loop |
//! | `sync` | [`SyncValue`] | synchronous standbys the leader confirmed (sync modes) |
//! | `history/<term>` | [`HistoryEntry`] | permanent: one per promotion |
//! | `backup` | [`BackupRunValue`] | the last scheduled backup: who claimed which slot, how it ended |
//! | `switchover` | [`SwitchoverValue`] | short TTL: the leader is about to step down; proxies drain |
//! | `proxies/<id>` | [`ProxyValue`] | TTL: a running `pgkeel proxy`, and the switchover it drained for |

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Dcs, DcsError, DcsResult, KeyValue};

/// Role a member reports for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs a writable postgres and holds (or believes it holds) the leader key.
    Primary,
    /// Runs postgres in recovery.
    Replica,
    /// Has no usable data directory yet (bootstrapping or cloning).
    Uninitialized,
    /// Postgres is not running.
    Stopped,
}

impl Role {
    /// Lower-case name as shown in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Uninitialized => "uninitialized",
            Role::Stopped => "stopped",
        }
    }
}

/// Value of the `leader` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderValue {
    /// Member name holding the key.
    pub holder: String,
    /// Fencing token: strictly greater than every earlier leader's term.
    pub term: u64,
}

/// Tags a member advertises (from its node.toml).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberTags {
    /// Never promote this member automatically.
    #[serde(default)]
    pub nofailover: bool,
    /// Among members with equal LSN, the higher priority wins; 0 means never.
    #[serde(default)]
    pub failover_priority: i64,
}

/// Value of `members/<name>`: what a member reports about itself every loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberValue {
    /// Member name.
    pub name: String,
    /// Base URL of its REST API, e.g. `http://127.0.0.1:8008`.
    pub api_url: String,
    /// `host:port` clients and replicas use to reach its postgres.
    pub pg_address: String,
    /// Its current role.
    pub role: Role,
    /// Postgres state: `running`, `stopped`, `starting`, `crashed`, `cloning`, ...
    pub state: String,
    /// Current timeline, when postgres runs.
    #[serde(default)]
    pub timeline: Option<u32>,
    /// Primary: `pg_current_wal_lsn()`. Replica: last received (or replayed) LSN.
    #[serde(default)]
    pub lsn: Option<u64>,
    /// Replica: replay LSN.
    #[serde(default)]
    pub replayed_lsn: Option<u64>,
    /// Replica: how far its replay is behind, in ms: 0 when it has replayed everything it
    /// received, else the age of the last transaction it replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lag_ms: Option<u64>,
    /// Replica: whether its WAL receiver is streaming.
    #[serde(default)]
    pub streaming: bool,
    /// Replica: the member it follows.
    #[serde(default)]
    pub following: Option<String>,
    /// The term this member runs under (primary) or follows (replica).
    #[serde(default)]
    pub term: u64,
    /// Tags.
    #[serde(default)]
    pub tags: MemberTags,
    /// A parameter change needs a restart to apply.
    #[serde(default)]
    pub pending_restart: bool,
    /// pgkeel version of the agent.
    #[serde(default)]
    pub version: String,
}

/// Value of `initialize`: written once by the member that bootstraps the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitializeValue {
    /// Member that runs (or ran) initdb.
    pub bootstrapper: String,
    /// Postgres system identifier, once initdb has finished.
    #[serde(default)]
    pub sysid: Option<String>,
    /// Replication password generated at bootstrap, for members whose node.toml sets none.
    #[serde(default)]
    pub replication_password: Option<String>,
}

/// Value of `failover`: a pending manual switchover or failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverValue {
    /// `switchover` (leader steps down) or `failover` (candidate takes over).
    pub kind: String,
    /// The leader that must step down (switchover).
    #[serde(default)]
    pub leader: Option<String>,
    /// The member that must take over; `None` means the best candidate.
    #[serde(default)]
    pub candidate: Option<String>,
    /// When requested (unix ms).
    pub requested_at_ms: u64,
}

/// Value of `switchover`: the leader has taken up a switchover and waits (at most until
/// `deadline_ms`) for every registered proxy to drain before it stops postgres. The new leader
/// deletes it once promoted; the old one deletes it when it does not step down after all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverValue {
    /// Names this switchover, for the proxies' acknowledgements: `<term>-<requested_at_ms>`.
    pub id: String,
    /// The leader stepping down.
    pub leader: String,
    /// The term it leads under: a proxy reopens once a newer term leads.
    pub term: u64,
    /// The member named to take over, if any.
    #[serde(default)]
    pub candidate: Option<String>,
    /// When the leader stops waiting for the proxies (unix ms).
    pub deadline_ms: u64,
}

/// Value of `proxies/<id>`: a running proxy, rewritten with a TTL while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyValue {
    /// The proxy's id (unique per process: host, pid and start time).
    pub id: String,
    /// Its client listener, `host:port`.
    pub address: String,
    /// The switchover ([`SwitchoverValue::id`]) it has drained for: it holds new
    /// transactions and no client is inside a transaction on the old primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained: Option<String>,
    /// pgkeel version of the proxy.
    #[serde(default)]
    pub version: String,
}

/// Value of `status`: the leader's last known LSN, used for lag checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusValue {
    /// Leader's `pg_current_wal_lsn()` (or its final LSN when it stepped down).
    pub last_lsn: u64,
    /// Term of the leader that wrote it.
    pub term: u64,
    /// Timeline of the leader.
    pub timeline: u32,
    /// When written (unix ms).
    pub updated_ms: u64,
    /// When the leader's postgres last archived a WAL file (unix ms), when it archives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_ms: Option<u64>,
}

/// Value of `sync`: the standbys the leader has confirmed synchronous. Written after they are
/// in `synchronous_standby_names` and withdrawn before they leave it, so every member listed
/// here has every acknowledged commit; in a synchronous mode only they may be promoted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncValue {
    /// The leader that wrote it.
    pub leader: String,
    /// Confirmed synchronous standbys (`on`, `strict`).
    #[serde(default)]
    pub members: Vec<String>,
    /// Quorum mode: the `ANY k` configurations a candidate must satisfy (two while the
    /// primary moves from one to the next).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quorum: Vec<QuorumValue>,
}

/// One quorum configuration: `ANY k (voters)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumValue {
    /// How many voters confirm each commit.
    pub k: u32,
    /// The standbys that may confirm.
    pub voters: Vec<String>,
}

/// Value of `backup`: the scheduled backup of one slot, claimed by one member with a
/// compare-and-set, and the last one that succeeded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRunValue {
    /// The scheduled minute (unix seconds) this run is for.
    pub slot: u64,
    /// The member running it.
    pub runner: String,
    /// When it started (unix ms).
    pub started_ms: u64,
    /// When it ended (unix ms); absent while it runs.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Whether it succeeded; absent while it runs.
    #[serde(default)]
    pub ok: Option<bool>,
    /// What it said at the end: the backup's label, or the error.
    #[serde(default)]
    pub message: Option<String>,
    /// The last successful scheduled backup: (label, finished unix ms).
    #[serde(default)]
    pub last_ok: Option<(String, u64)>,
}

/// Value of `history/<term>`: one promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Term of the new primary.
    pub term: u64,
    /// Timeline of the new primary after promotion.
    pub timeline: u32,
    /// When promoted (unix ms).
    pub time_ms: u64,
    /// Why: `bootstrap`, `failover`, `switchover`, `manual failover`.
    pub reason: String,
    /// Previous primary, when known.
    #[serde(default)]
    pub old_primary: Option<String>,
    /// The new primary.
    pub new_primary: String,
    /// Last LSN the old primary reported (from `status`), when known.
    #[serde(default)]
    pub old_primary_lsn: Option<u64>,
    /// LSN where the new timeline begins (end of replayed WAL at promotion).
    pub lsn: u64,
    /// Contents of the new timeline's `.history` file, used by former primaries to decide
    /// whether they can follow without a fresh clone.
    #[serde(default)]
    pub timeline_history: Option<String>,
}

/// A decoded value with the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// `mod_revision` of the key.
    pub revision: u64,
    /// Time left before expiry, for TTL keys.
    pub ttl_left: Option<Duration>,
}

/// Everything under the cluster prefix, read in one consistent call.
#[derive(Debug, Clone, Default)]
pub struct ClusterSnapshot {
    /// The leader key.
    pub leader: Option<Versioned<LeaderValue>>,
    /// Last term handed out.
    pub term: Option<Versioned<u64>>,
    /// Live members, sorted by name.
    pub members: Vec<Versioned<MemberValue>>,
    /// Dynamic configuration (raw JSON; `pgkeel-config` parses it).
    pub config: Option<Versioned<serde_json::Value>>,
    /// Bootstrap record.
    pub initialize: Option<Versioned<InitializeValue>>,
    /// Pending switchover/failover.
    pub failover: Option<Versioned<FailoverValue>>,
    /// Leader's last LSN.
    pub status: Option<StatusValue>,
    /// Confirmed synchronous standbys.
    pub sync: Option<Versioned<SyncValue>>,
    /// The last scheduled backup.
    pub backup: Option<Versioned<BackupRunValue>>,
    /// A switchover whose leader waits for the proxies to drain.
    pub switchover: Option<Versioned<SwitchoverValue>>,
    /// Running proxies, sorted by id.
    pub proxies: Vec<Versioned<ProxyValue>>,
    /// Promotions, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// What a proxy routes by, from one read of the DCS: an agent serves it at `GET /routing`, so
/// a proxy that cannot reach the DCS itself can follow the cluster through the agents that can.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingView {
    /// The cluster's name.
    pub cluster: String,
    /// The leader key.
    pub leader: Option<LeaderValue>,
    /// The newest term a leader held: the leader key's or the promotion history's (not the
    /// term counter's, which a candidate that lost the race for the key may have raised).
    pub leader_term: u64,
    /// Live members, sorted by name.
    pub members: Vec<MemberValue>,
}

impl ClusterSnapshot {
    /// The snapshot's [`RoutingView`], for cluster `cluster`.
    pub fn routing_view(&self, cluster: &str) -> RoutingView {
        let leader = self.leader.as_ref().map(|l| l.value.clone());
        let leader_term = leader.as_ref().map_or(0, |l| l.term).max(self.history.last().map_or(0, |h| h.term));
        RoutingView {
            cluster: cluster.to_string(),
            leader,
            leader_term,
            members: self.members.iter().map(|m| m.value.clone()).collect(),
        }
    }

    /// The member record of `name`, if it is alive.
    pub fn member(&self, name: &str) -> Option<&MemberValue> {
        self.members.iter().map(|m| &m.value).find(|m| m.name == name)
    }

    /// Name of the leader key holder.
    pub fn leader_name(&self) -> Option<&str> {
        self.leader.as_ref().map(|l| l.value.holder.as_str())
    }

    /// The newest term known: the leader's, the term counter's, or history's.
    pub fn newest_term(&self) -> u64 {
        let l = self.leader.as_ref().map_or(0, |l| l.value.term);
        let t = self.term.as_ref().map_or(0, |t| t.value);
        let h = self.history.last().map_or(0, |h| h.term);
        l.max(t).max(h)
    }
}

/// Typed operations on one cluster's keys.
#[derive(Debug, Clone)]
pub struct ClusterStore {
    dcs: Arc<dyn Dcs>,
    prefix: String,
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> DcsResult<T> {
    serde_json::from_slice(&kv.value).map_err(|e| DcsError::Corrupt(format!("{}: {e}", kv.key)))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("pgkeel DCS values always serialize")
}

fn versioned<T>(kv: &KeyValue, value: T) -> Versioned<T> {
    Versioned { value, revision: kv.mod_revision, ttl_left: kv.ttl_left }
}

impl ClusterStore {
    /// Operations on cluster `cluster` in `dcs`.
    pub fn new(dcs: Arc<dyn Dcs>, cluster: &str) -> Self {
        ClusterStore { dcs, prefix: format!("/pgkeel/{cluster}/") }
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        self.prefix.trim_start_matches("/pgkeel/").trim_end_matches('/')
    }

    /// The underlying store.
    pub fn dcs(&self) -> &Arc<dyn Dcs> {
        &self.dcs
    }

    /// Full key for a path under the cluster prefix.
    pub fn key(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }

    /// Read the whole cluster in one call. Undecodable member or history records are skipped
    /// (a newer agent may write fields an older one does not know); an undecodable leader key
    /// is an error, because every decision depends on it.
    pub async fn load(&self) -> DcsResult<ClusterSnapshot> {
        let kvs = self.dcs.list(&self.prefix).await?;
        let mut snap = ClusterSnapshot::default();
        for kv in &kvs {
            // `list` only returns keys under the prefix; skip (rather than panic on) any other.
            let Some(path) = kv.key.strip_prefix(&self.prefix) else { continue };
            match path {
                "leader" => snap.leader = Some(versioned(kv, decode(kv)?)),
                "term" => snap.term = Some(versioned(kv, decode(kv)?)),
                "config" => snap.config = Some(versioned(kv, decode(kv)?)),
                "initialize" => snap.initialize = Some(versioned(kv, decode(kv)?)),
                "failover" => snap.failover = decode(kv).ok().map(|v| versioned(kv, v)),
                "status" => snap.status = decode(kv).ok(),
                "sync" => snap.sync = decode(kv).ok().map(|v| versioned(kv, v)),
                "backup" => snap.backup = decode(kv).ok().map(|v| versioned(kv, v)),
                "switchover" => snap.switchover = decode(kv).ok().map(|v| versioned(kv, v)),
                p if p.starts_with("proxies/") => {
                    if let Ok(v) = decode::<ProxyValue>(kv) {
                        snap.proxies.push(versioned(kv, v));
                    }
                }
                p if p.starts_with("members/") => {
                    if let Ok(m) = decode::<MemberValue>(kv) {
                        snap.members.push(versioned(kv, m));
                    }
                }
                p if p.starts_with("history/") => {
                    if let Ok(h) = decode::<HistoryEntry>(kv) {
                        snap.history.push(h);
                    }
                }
                _ => {}
            }
        }
        snap.members.sort_by(|a, b| a.value.name.cmp(&b.value.name));
        snap.history.sort_by_key(|h| h.term);
        snap.proxies.sort_by(|a, b| a.value.id.cmp(&b.value.id));
        Ok(snap)
    }

    /// Take the leader key for `holder` with a fresh term. Bumps the `term` counter first
    /// (compare-and-set), then creates the leader key atomically, so two racers can never hold
    /// the same term and terms only grow. Returns the leader value and the key's revision, or
    /// `None` when someone else holds the key (a term number may then be skipped).
    pub async fn acquire_leader(&self, holder: &str, ttl: Duration) -> DcsResult<Option<(LeaderValue, u64)>> {
        if self.dcs.get(&self.key("leader")).await?.is_some() {
            return Ok(None);
        }
        let term = self.next_term().await?;
        let value = LeaderValue { holder: holder.to_string(), term };
        Ok(self.dcs.create(&self.key("leader"), &encode(&value), Some(ttl)).await?.map(|rev| (value, rev)))
    }

    async fn next_term(&self) -> DcsResult<u64> {
        let key = self.key("term");
        loop {
            match self.dcs.get(&key).await? {
                None => {
                    if self.dcs.create(&key, b"1", None).await?.is_some() {
                        return Ok(1);
                    }
                }
                Some(kv) => {
                    let cur: u64 = decode(&kv)?;
                    if self
                        .dcs
                        .compare_and_set(&key, (cur + 1).to_string().as_bytes(), kv.mod_revision, None)
                        .await?
                        .is_some()
                    {
                        return Ok(cur + 1);
                    }
                }
            }
        }
    }

    /// Renew the leader key held at `revision`. Returns the new revision, or `None` when the
    /// key was lost (expired or taken).
    pub async fn renew_leader(&self, value: &LeaderValue, revision: u64, ttl: Duration) -> DcsResult<Option<u64>> {
        self.dcs.compare_and_set(&self.key("leader"), &encode(value), revision, Some(ttl)).await
    }

    /// Give up the leader key held at `revision`.
    pub async fn release_leader(&self, revision: u64) -> DcsResult<bool> {
        self.dcs.delete(&self.key("leader"), Some(revision)).await
    }

    /// Wait until the leader key changes from `known` (its revision, `None` = absent).
    pub async fn watch_leader(
        &self,
        known: Option<u64>,
        timeout: Duration,
    ) -> DcsResult<Option<Versioned<LeaderValue>>> {
        match self.dcs.watch(&self.key("leader"), known, timeout).await? {
            Some(kv) => Ok(Some(versioned(&kv, decode(&kv)?))),
            None => Ok(None),
        }
    }

    /// Publish this member's state.
    pub async fn put_member(&self, member: &MemberValue, ttl: Duration) -> DcsResult<()> {
        self.dcs.put(&self.key(&format!("members/{}", member.name)), &encode(member), Some(ttl)).await.map(|_| ())
    }

    /// Remove a member record (clean shutdown).
    pub async fn delete_member(&self, name: &str) -> DcsResult<bool> {
        self.dcs.delete(&self.key(&format!("members/{name}")), None).await
    }

    /// Claim the right to bootstrap. `true` for exactly one caller.
    pub async fn claim_initialize(&self, value: &InitializeValue) -> DcsResult<bool> {
        Ok(self.dcs.create(&self.key("initialize"), &encode(value), None).await?.is_some())
    }

    /// Overwrite the bootstrap record (to add the system identifier).
    pub async fn set_initialize(&self, value: &InitializeValue) -> DcsResult<()> {
        self.dcs.put(&self.key("initialize"), &encode(value), None).await.map(|_| ())
    }

    /// Remove the bootstrap record (bootstrap failed before initdb finished).
    pub async fn delete_initialize(&self) -> DcsResult<bool> {
        self.dcs.delete(&self.key("initialize"), None).await
    }

    /// Write the dynamic config: create when `expected` is `None`, else compare-and-set.
    /// Returns the new revision, or `None` on a version conflict.
    pub async fn write_config(&self, config: &serde_json::Value, expected: Option<u64>) -> DcsResult<Option<u64>> {
        let key = self.key("config");
        match expected {
            None => self.dcs.create(&key, &encode(config), None).await,
            Some(rev) => self.dcs.compare_and_set(&key, &encode(config), rev, None).await,
        }
    }

    /// Read the dynamic config alone (raw JSON; `pgkeel-config` parses it).
    pub async fn get_config(&self) -> DcsResult<Option<Versioned<serde_json::Value>>> {
        match self.dcs.get(&self.key("config")).await? {
            Some(kv) => Ok(Some(versioned(&kv, decode(&kv)?))),
            None => Ok(None),
        }
    }

    /// Record a switchover/failover request; it expires after `ttl` if nobody acts on it.
    pub async fn set_failover(&self, value: &FailoverValue, ttl: Duration) -> DcsResult<()> {
        self.dcs.put(&self.key("failover"), &encode(value), Some(ttl)).await.map(|_| ())
    }

    /// Remove the switchover/failover request.
    pub async fn clear_failover(&self) -> DcsResult<bool> {
        self.dcs.delete(&self.key("failover"), None).await
    }

    /// Announce a switchover to the proxies; it expires after `ttl` if nobody clears it.
    pub async fn set_switchover(&self, value: &SwitchoverValue, ttl: Duration) -> DcsResult<()> {
        self.dcs.put(&self.key("switchover"), &encode(value), Some(ttl)).await.map(|_| ())
    }

    /// Remove the switchover announcement.
    pub async fn clear_switchover(&self) -> DcsResult<bool> {
        self.dcs.delete(&self.key("switchover"), None).await
    }

    /// Read the switchover announcement.
    pub async fn get_switchover(&self) -> DcsResult<Option<Versioned<SwitchoverValue>>> {
        match self.dcs.get(&self.key("switchover")).await? {
            Some(kv) => Ok(decode(&kv).ok().map(|v| versioned(&kv, v))),
            None => Ok(None),
        }
    }

    /// Wait until the switchover announcement changes from `known` (its revision, `None` =
    /// absent), or `timeout` passes; returns it as it is then.
    pub async fn watch_switchover(
        &self,
        known: Option<u64>,
        timeout: Duration,
    ) -> DcsResult<Option<Versioned<SwitchoverValue>>> {
        match self.dcs.watch(&self.key("switchover"), known, timeout).await? {
            Some(kv) => Ok(decode(&kv).ok().map(|v| versioned(&kv, v))),
            None => Ok(None),
        }
    }

    /// The registered proxies (live keys only), sorted by id.
    pub async fn proxies(&self) -> DcsResult<Vec<Versioned<ProxyValue>>> {
        let mut out: Vec<Versioned<ProxyValue>> = Vec::new();
        for kv in self.dcs.list(&self.key("proxies/")).await? {
            if let Ok(v) = decode::<ProxyValue>(&kv) {
                out.push(versioned(&kv, v));
            }
        }
        out.sort_by(|a, b| a.value.id.cmp(&b.value.id));
        Ok(out)
    }

    /// Register (or refresh) a proxy; the key expires after `ttl` without a refresh.
    pub async fn put_proxy(&self, value: &ProxyValue, ttl: Duration) -> DcsResult<()> {
        self.dcs.put(&self.key(&format!("proxies/{}", value.id)), &encode(value), Some(ttl)).await.map(|_| ())
    }

    /// Remove a proxy's registration (clean shutdown).
    pub async fn delete_proxy(&self, id: &str) -> DcsResult<bool> {
        self.dcs.delete(&self.key(&format!("proxies/{id}")), None).await
    }

    /// Publish the leader's last LSN.
    pub async fn set_status(&self, value: &StatusValue) -> DcsResult<()> {
        self.dcs.put(&self.key("status"), &encode(value), None).await.map(|_| ())
    }

    /// Write the synchronous standby list: create when `expected` is `None`, else
    /// compare-and-set. Returns the new revision, or `None` on a conflict.
    pub async fn write_sync(&self, value: &SyncValue, expected: Option<u64>) -> DcsResult<Option<u64>> {
        let key = self.key("sync");
        match expected {
            None => self.dcs.create(&key, &encode(value), None).await,
            Some(rev) => self.dcs.compare_and_set(&key, &encode(value), rev, None).await,
        }
    }

    /// Write the `backup` key: create when `expected` is `None`, else compare-and-set.
    /// Returns the new revision, or `None` when another member wrote it first.
    pub async fn write_backup_run(&self, value: &BackupRunValue, expected: Option<u64>) -> DcsResult<Option<u64>> {
        let key = self.key("backup");
        match expected {
            None => self.dcs.create(&key, &encode(value), None).await,
            Some(rev) => self.dcs.compare_and_set(&key, &encode(value), rev, None).await,
        }
    }

    /// Append a promotion to the history.
    pub async fn append_history(&self, entry: &HistoryEntry) -> DcsResult<()> {
        self.dcs.put(&self.key(&format!("history/{:020}", entry.term)), &encode(entry), None).await.map(|_| ())
    }
}
