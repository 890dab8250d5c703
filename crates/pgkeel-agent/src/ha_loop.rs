//! The HA loop: observe (DCS snapshot, local postgres, peers when racing), call
//! [`pgkeel_ha::decide`], carry out the decision, publish this member's state, sleep until the
//! next loop, a leader-key change, an API wake-up or the lease deadline — whichever is first.
//!
//! The decision is pure; everything here is I/O and bookkeeping. Errors from one action are
//! logged here (where they are handled) and the next loop observes the outcome afresh.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgkeel_config::DynamicConfig;
use pgkeel_dcs::cluster::{
    ClusterSnapshot, HistoryEntry, InitializeValue, LeaderValue, MemberTags, MemberValue, QuorumValue, Role,
    StatusValue, SwitchoverValue, SyncValue,
};
use pgkeel_ha::{decide, Action, ClusterView, Decision, Observation, Peer, PgRole, PgState, PromoteReason};
use pgkeel_pg::binaries::PgBinaries;
use pgkeel_pg::conf::ManagedConf;
use pgkeel_pg::control::{ControlData, Instance, SourceConn, StopMode};
use pgkeel_pg::probe::Probe;
use pgkeel_pg::user::RunAs;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::guard::{monotonic_ms, GuardHandle, Order};
use crate::{unix_ms, NodeRequest, Shared, LONG_OP};

/// How long a member that left the DCS still counts for failsafe confirmations (at least
/// 3 × ttl).
const MEMBER_MEMORY: Duration = Duration::from_secs(30);

/// The lease this agent holds on the leader key.
#[derive(Debug, Clone)]
struct Lease {
    value: LeaderValue,
    revision: u64,
    /// Monotonic ms: the start of the request that last wrote the key + ttl. The store's own
    /// expiry is later than this, so demoting by this deadline is always early enough.
    deadline_ms: u64,
}

/// What the last observation of postgres found.
struct PgObservation {
    state: PgState,
    probe: Option<Probe>,
}

pub(crate) struct HaLoop {
    shared: Arc<Shared>,
    /// This member's name (`name` in node.toml, fixed while the agent runs).
    name: String,
    inst: Instance,
    run_as: Option<RunAs>,
    origin: Instant,
    client: Option<tokio_postgres::Client>,
    lease: Option<Lease>,
    /// The agent started postgres and has not stopped it: seeing it down means a crash.
    expect_running: bool,
    down_since_ms: Option<u64>,
    /// A background start of postgres (restart in place) and when it began.
    starting: Option<(u64, JoinHandle<Result<(), pgkeel_pg::PgError>>)>,
    /// When a running postmaster first failed to answer (starting up or crash recovery).
    unresponsive_since_ms: Option<u64>,
    /// The last probe that found all received WAL replayed (bounds the published replay delay).
    caught_up: Option<pgkeel_pg::probe::CaughtUp>,
    /// Upstream member our `primary_conninfo` points at.
    following: Option<String>,
    /// Term written in pgkeel.conf.
    conf_term: u64,
    /// Revision of the leader key as last seen, for the watch.
    leader_rev: Option<u64>,
    /// System identifier of the local data directory; it only changes with a new data
    /// directory, so it is read once instead of running pg_controldata every loop.
    sysid: Option<String>,
    /// The fencing guard of this node.
    guard: GuardHandle,
    /// Postgres may be running as a primary: the guard must stay armed until this is false.
    maybe_primary: bool,
    /// The primary's hot-standby-sensitive settings as this replica last replayed them (from
    /// pg_controldata before starting); a replica never asks for less, or it would not start.
    standby_minimums: std::collections::BTreeMap<String, u64>,
    /// `on`/`strict`: standbys this primary names in synchronous_standby_names.
    sync_guc: Vec<String>,
    /// `quorum`: the configuration this primary names in synchronous_standby_names.
    quorum_guc: Option<pgkeel_ha::QuorumSet>,
    /// synchronous_standby_names as last applied by the sync planner (what pgkeel.conf says).
    guc_value: String,
    /// Since when that value is known to be in force.
    guc_in_force: GucInForce,
    /// Other members (name, REST URL) read from the DCS recently: whom to ask in failsafe.
    /// A member stays for [`MEMBER_MEMORY`] after it was last seen, so a snapshot taken just
    /// after a DCS outage (when every member key had expired and not been re-published yet)
    /// cannot shrink the set a failsafe primary needs confirmations from.
    last_members: Vec<(String, String)>,
    /// When each other member was last seen in a snapshot, and its REST URL.
    members_seen: std::collections::HashMap<String, (String, Instant)>,
    /// Replica: since when its WAL receiver has not streamed from the running leader, and the
    /// replay position then (replay that moves on, e.g. from the archive, is no stall).
    stalled_since: Option<(Instant, Option<u64>)>,
    /// When this replica last restarted postgres to get its WAL receiver going again.
    last_unstall: Option<Instant>,
    /// Scheduled backups.
    scheduler: crate::schedule::Scheduler,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Generate a random password (URL-safe base64 of 18 random bytes).
pub fn random_password() -> String {
    use std::io::Read;
    let mut buf = [0u8; 18];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)) {
        // No /dev/urandom means a broken machine; fall back to time-based noise rather than panic.
        tracing::warn!("cannot read /dev/urandom ({e}); using a weaker password source");
        let t = unix_ms() ^ (std::process::id() as u64).rotate_left(32);
        buf[..8].copy_from_slice(&t.to_le_bytes());
    }
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

fn split_host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr.rsplit_once(':').with_context(|| format!("{addr:?} is not host:port"))?;
    let port = port.parse().with_context(|| format!("bad port in {addr:?}"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

impl HaLoop {
    pub(crate) fn new(shared: Arc<Shared>, bins: PgBinaries, run_as: Option<RunAs>) -> Self {
        let cfg = shared.config();
        let node_dir = cfg.data_dir.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| cfg.data_dir.clone());
        let port = split_host_port(&cfg.postgres.listen).map(|(_, p)| p).unwrap_or(5432);
        let guard = GuardHandle::new(&node_dir, &cfg.data_dir);
        let inst = Instance {
            bins,
            data_dir: cfg.data_dir.clone(),
            run_as: run_as.clone(),
            log_file: node_dir.join("postgres.log"),
            socket_dir: node_dir.join("run"),
            port,
            superuser: cfg.postgres.superuser.username.clone(),
        };
        HaLoop {
            name: cfg.name.clone(),
            shared,
            inst,
            run_as,
            origin: Instant::now(),
            client: None,
            lease: None,
            expect_running: false,
            down_since_ms: None,
            starting: None,
            unresponsive_since_ms: None,
            caught_up: None,
            following: None,
            conf_term: 0,
            leader_rev: None,
            sysid: None,
            guard,
            maybe_primary: true,
            standby_minimums: Default::default(),
            sync_guc: Vec::new(),
            quorum_guc: None,
            guc_value: String::new(),
            guc_in_force: GucInForce::default(),
            last_members: Vec::new(),
            members_seen: Default::default(),
            stalled_since: None,
            last_unstall: None,
            scheduler: Default::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        ms(self.origin.elapsed())
    }

    fn me(&self) -> &str {
        &self.name
    }

    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        self.prepare_dirs()?;
        self.guard.ensure_running()?;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let loop_start = Instant::now();
            let again = self.once().await;
            self.shared.counters.loops.fetch_add(1, Ordering::Relaxed);
            if again {
                continue;
            }
            let dynamic = self.shared.dynamic();
            let mut wait = dynamic.loop_wait.saturating_sub(loop_start.elapsed());
            if let Some(l) = &self.lease {
                let margin = self.settings(&dynamic).demote_margin_ms();
                let until_deadline = l.deadline_ms.saturating_sub(margin).saturating_sub(self.now_ms());
                wait = wait.min(Duration::from_millis(until_deadline.max(10)));
            }
            let store = self.shared.store.clone();
            let watching = self.lease.is_none();
            let known = self.leader_rev;
            tokio::select! {
                _ = shutdown.changed() => {}
                _ = self.shared.wake.notified() => {}
                _ = async {
                    if watching {
                        // Replicas wake the moment the leader key changes or expires, so the race
                        // starts at once instead of at the next loop.
                        let _ = store.watch_leader(known, wait).await;
                    } else {
                        tokio::time::sleep(wait).await;
                    }
                } => {}
            }
        }
        self.stop_for_shutdown().await;
        Ok(())
    }

    fn prepare_dirs(&self) -> anyhow::Result<()> {
        let node_dir = self.inst.log_file.parent().context("data_dir has no parent directory")?;
        pgkeel_pg::user::prepare_dir(node_dir, 0o755, self.run_as.as_ref())
            .with_context(|| format!("prepare node directory {}", node_dir.display()))?;
        pgkeel_pg::user::prepare_dir(&self.inst.socket_dir, 0o700, self.run_as.as_ref())
            .with_context(|| format!("prepare socket directory {}", self.inst.socket_dir.display()))?;
        if let Some(path) = self.s3_config_path() {
            let settings = self.shared.config().backup.s3.clone().unwrap_or_default();
            write_private(&path, settings.to_toml().as_bytes(), self.run_as.as_ref())
                .with_context(|| format!("write the S3 settings for archive_command to {}", path.display()))?;
        }
        Ok(())
    }

    /// For an `s3://` repository, the file holding `[backup.s3]` for `pgkeel wal push|fetch`
    /// (in the socket directory, readable by the postgres OS user only).
    pub(crate) fn s3_config_path(&self) -> Option<std::path::PathBuf> {
        self.shared.config().backup.is_s3().then(|| self.inst.socket_dir.join("s3.toml"))
    }

    fn settings(&self, d: &DynamicConfig) -> pgkeel_ha::Settings {
        pgkeel_ha::Settings {
            ttl_ms: ms(d.ttl),
            loop_wait_ms: ms(d.loop_wait),
            retry_timeout_ms: ms(d.retry_timeout),
            maximum_lag_on_failover: d.maximum_lag_on_failover,
            primary_start_timeout_ms: ms(d.primary_start_timeout),
            pause: d.pause,
            sync_mode: sync_mode(d),
            failsafe_mode: d.failsafe_mode,
        }
    }

    /// One loop. Returns true when the next loop should run at once.
    async fn once(&mut self) -> bool {
        let request = self.shared.request.lock().expect("request lock poisoned").take();
        if let Some(r) = request {
            if let Err(e) = self.handle_request(r).await {
                tracing::error!("failed to carry out {r:?}: {e:#}");
            }
        }
        let dynamic = self.shared.dynamic();
        let t0 = Instant::now();
        let snapshot = match tokio::time::timeout(dynamic.retry_timeout, self.shared.store.load()).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::warn!("failed to read the DCS: {e}");
                None
            }
            Err(_) => {
                tracing::warn!("failed to read the DCS within retry_timeout ({:?})", dynamic.retry_timeout);
                None
            }
        };
        self.shared.counters.dcs_latency_us.store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        if snapshot.is_none() {
            self.shared.counters.dcs_errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(snap) = &snapshot {
            let now = Instant::now();
            for m in snap.members.iter().filter(|m| m.value.name != self.name) {
                self.members_seen.insert(m.value.name.clone(), (m.value.api_url.clone(), now));
            }
            let memory = MEMBER_MEMORY.max(self.shared.dynamic().ttl * 3);
            self.members_seen.retain(|_, (_, seen)| now.duration_since(*seen) <= memory);
            let mut members: Vec<(String, String)> =
                self.members_seen.iter().map(|(n, (url, _))| (n.clone(), url.clone())).collect();
            members.sort();
            self.last_members = members;
            self.apply_dynamic_config(snap);
            self.leader_rev = snap.leader.as_ref().map(|l| l.revision);
            self.adopt_lease(snap).await;
        }
        let dynamic = self.shared.dynamic();
        let pg = self.observe_pg(snapshot.as_ref()).await;
        let tags = self.shared.config().tags.clone();

        let mut obs = Observation {
            now_ms: self.now_ms(),
            me: self.me().to_string(),
            tags: pgkeel_ha::Tags { nofailover: tags.nofailover, failover_priority: tags.failover_priority },
            settings: self.settings(&dynamic),
            cluster: snapshot.as_ref().map(cluster_view),
            pg: pg.state.clone(),
            local_sysid: self.sysid.clone(),
            lease_deadline_ms: self.lease.as_ref().map(|l| l.deadline_ms),
            peers: None,
            failsafe_until_ms: {
                let until = self.shared.failsafe.lock().expect("failsafe lock poisoned").confirmed_until;
                until.and_then(|u| u.checked_duration_since(Instant::now())).map(|left| self.now_ms() + ms(left))
            },
        };
        if snapshot.is_some() {
            self.publish_member(&pg).await;
        }
        let mut decision = decide(&obs);
        if decision.action == Action::ProbePeers {
            if let Some(snap) = &snapshot {
                obs.peers = Some(self.probe_peers(snap, &dynamic).await);
                decision = decide(&obs);
            }
        }
        self.update_status(&pg, snapshot.as_ref(), &decision, &dynamic);
        if decision.action != Action::Idle && decision.action != Action::Renew {
            tracing::info!(action = ?decision.action, "{}", decision.reason);
        } else {
            tracing::debug!(action = ?decision.action, "{}", decision.reason);
        }
        let Some(snap) = snapshot else {
            match decision.action {
                Action::Demote => self.demote().await,
                Action::Failsafe => self.failsafe(&dynamic).await,
                _ => {}
            }
            self.track_primary(&decision.action, &pg.state, true);
            self.sync_guard(&dynamic);
            return false;
        };
        let result = self.execute(&decision, &snap, &pg, &dynamic).await;
        self.watch_stall(&decision.action, &pg, &snap, &dynamic);
        if matches!(pg.state, PgState::Running { .. }) {
            let local = crate::schedule::Local {
                data_dir: self.inst.data_dir.clone(),
                socket_dir: self.inst.socket_dir.clone(),
                port: self.inst.port,
            };
            let i_lead = self.lease.is_some();
            self.scheduler.tick(&self.shared, &snap, &dynamic, i_lead, local).await;
        }
        self.track_primary(&decision.action, &pg.state, result.is_ok());
        self.sync_guard(&dynamic);
        match result {
            Ok(again) => {
                if matches!(decision.action, Action::Idle | Action::Renew) {
                    if let Err(e) = self.refresh_conf(&snap, &pg, &dynamic).await {
                        tracing::warn!("failed to apply configuration changes: {e:#}");
                    }
                }
                again
            }
            Err(e) => {
                tracing::error!("failed to {}: {e:#}", action_verb(&decision.action));
                false
            }
        }
    }

    /// A replica that follows a running primary but whose WAL receiver has not streamed for
    /// `max(3 × ttl, 10 s)` gets postgres restarted (at most once a minute), with a warning
    /// saying what the receiver reported: whatever wedged it (a failed attempt during the
    /// leader's promotion, a stuck timeline switch), a fresh start re-reads the timeline
    /// history and reconnects.
    fn watch_stall(&mut self, action: &Action, pg: &PgObservation, snap: &ClusterSnapshot, d: &DynamicConfig) {
        let PgState::Running { role: PgRole::Replica, following: Some(following), .. } = &pg.state else {
            self.stalled_since = None;
            return;
        };
        let leader_running = snap.leader_name() == Some(following.as_str())
            && snap.member(following).is_some_and(|m| m.role == Role::Primary && m.state == "running");
        let receiver = pg.probe.as_ref().and_then(|p| p.wal_receiver.as_ref());
        if *action != Action::Idle || !leader_running || receiver.is_some_and(|w| w.status == "streaming") || d.pause {
            self.stalled_since = None;
            return;
        }
        let replayed = pg.probe.as_ref().and_then(|p| p.replayed_lsn);
        let (since, at) = *self.stalled_since.get_or_insert((Instant::now(), replayed));
        if replayed > at {
            self.stalled_since = Some((Instant::now(), replayed));
            return;
        }
        let stall = (d.ttl * 3).max(Duration::from_secs(10));
        if since.elapsed() < stall || self.last_unstall.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return;
        }
        let p = pg.probe.as_ref();
        tracing::warn!(
            leader = %following,
            receiver = ?receiver.map(|w| (&w.status, w.received_tli, w.flushed_lsn.map(pgkeel_pg::lsn::format_lsn))),
            timeline = p.map(|p| p.timeline),
            replayed = ?p.and_then(|p| p.replayed_lsn).map(pgkeel_pg::lsn::format_lsn),
            "this replica has not streamed from the running leader for {:?}: restarting postgres",
            since.elapsed()
        );
        self.last_unstall = Some(Instant::now());
        self.stalled_since = None;
        self.shared.request.lock().expect("request lock poisoned").get_or_insert(NodeRequest::Restart);
    }

    /// Operator requests. A restart of the primary keeps the leader key: postgres is stopped
    /// cleanly and started again in the background while the loop keeps renewing the lease
    /// (the usual restart-in-place path, bounded by primary_start_timeout).
    async fn handle_request(&mut self, r: NodeRequest) -> anyhow::Result<()> {
        let d = self.shared.dynamic();
        match r {
            NodeRequest::Restart => {
                tracing::warn!("restarting postgres on request");
                self.client = None;
                self.inst.stop(StopMode::Fast, Duration::from_secs(60)).await.context("stop postgres")?;
                if self.lease.is_some() {
                    self.down_since_ms = None;
                    self.expect_running = true;
                    self.restart_primary(&d)
                } else {
                    let snap = self.shared.store.load().await?;
                    let following = self.following.clone();
                    self.start_replica(following.as_deref(), &snap).await
                }
            }
            NodeRequest::Reinitialize => {
                anyhow::ensure!(self.lease.is_none(), "the leader cannot be reinitialized: switch over first");
                tracing::warn!("reinitializing on request: a fresh clone of the leader replaces the data directory");
                self.client = None;
                self.expect_running = false;
                self.inst.stop(StopMode::Immediate, Duration::from_secs(30)).await.context("stop postgres")?;
                let old = self.inst.move_aside()?;
                tracing::warn!("moved the data directory aside to {}", old.display());
                self.sysid = None;
                self.following = None;
                Ok(())
            }
        }
    }

    /// Keep `maybe_primary` true from the moment postgres may accept writes until the agent
    /// has seen or made it a replica or stopped.
    fn track_primary(&mut self, action: &Action, observed: &PgState, done: bool) {
        self.maybe_primary = match (action, done) {
            (Action::Promote { .. } | Action::RestartPrimary | Action::Bootstrap, _) => true,
            (Action::Demote | Action::Release, _) => false,
            (Action::StepDown | Action::StartReplica { .. } | Action::Clone { .. } | Action::Rewind { .. }, true) => {
                false
            }
            _ => match observed {
                PgState::Running { role: PgRole::Primary, .. } => true,
                PgState::Running { role: PgRole::Replica, .. } | PgState::NoData => false,
                PgState::Stopped { .. } => self.inst.postmaster_pid().is_some(),
                PgState::Starting { .. } => self.maybe_primary,
            },
        };
    }

    /// Arm the guard with the current lease; disarm it only once postgres cannot be a primary.
    /// Also clears the racing mark once this member holds no lease.
    fn sync_guard(&mut self, d: &DynamicConfig) {
        if self.lease.is_none() {
            self.shared.failsafe.lock().expect("failsafe lock poisoned").racing = false;
        }
        if let Err(e) = self.guard.ensure_running() {
            tracing::error!("failed to start the fencing guard: {e:#}");
        }
        match &self.lease {
            Some(l) => {
                let margin = self.settings(d).demote_margin_ms() / 2;
                let left = l.deadline_ms.saturating_sub(self.now_ms()).saturating_sub(margin);
                self.guard.tell(Order::Armed { fence_at_ms: monotonic_ms() + left, term: l.value.term });
            }
            None if !self.maybe_primary => self.guard.tell(Order::Disarmed),
            // Lease gone but postgres may still be primary: the last armed order stands, so the
            // guard fences if this agent does not demote in time.
            None => {}
        }
    }

    /// Apply cluster config changes (e.g. `PATCH /config` parameters) to a running postgres:
    /// rewrite pgkeel.conf when it differs and reload. Parameters that need a restart show up
    /// as `pending_restart` in `/node` and `pgkeel list`.
    async fn refresh_conf(
        &mut self,
        snap: &ClusterSnapshot,
        pg: &PgObservation,
        d: &DynamicConfig,
    ) -> anyhow::Result<()> {
        let PgState::Running { role, .. } = &pg.state else { return Ok(()) };
        let (upstream, term) = match role {
            PgRole::Primary => match &self.lease {
                Some(l) => (None, l.value.term),
                None => return Ok(()),
            },
            // Only while the upstream is known: a missing leader record must never blank
            // primary_conninfo on a streaming replica.
            PgRole::Replica => match self.upstream(self.following.as_deref(), snap)? {
                Some(u) => (Some(u), self.conf_term),
                None => return Ok(()),
            },
        };
        let conf = self.managed_conf(upstream, term, d)?;
        if self.write_conf(&conf, d)? {
            tracing::info!("configuration changed: reloading postgres");
            self.inst.reload().await?;
        }
        Ok(())
    }

    fn apply_dynamic_config(&self, snap: &ClusterSnapshot) {
        if let Some(c) = &snap.config {
            match DynamicConfig::from_json(&c.value) {
                Ok(d) => *self.shared.dynamic.write().expect("dynamic lock poisoned") = d,
                Err(e) => tracing::warn!("ignoring the cluster config in the DCS: {e}"),
            }
        }
    }

    /// After an agent restart the leader key may still be ours: take it back by renewing it,
    /// so a quick agent restart does not cause a failover.
    async fn adopt_lease(&mut self, snap: &ClusterSnapshot) {
        // No key at all: keep our own lease as it is. If it still holds (the key expired
        // during a failsafe DCS outage), `decide` takes the key back; if not, it demotes.
        let Some(l) = &snap.leader else { return };
        if l.value.holder != self.me() {
            self.lease = None;
            return;
        }
        if self.lease.as_ref().is_some_and(|mine| mine.value == l.value) {
            return;
        }
        let ttl = self.shared.dynamic().ttl;
        let t0 = self.now_ms();
        if let Ok(Some(rev)) = self.shared.store.renew_leader(&l.value, l.revision, ttl).await {
            tracing::info!(term = l.value.term, "adopted the leader key this member already held");
            self.lease = Some(Lease { value: l.value.clone(), revision: rev, deadline_ms: t0 + ms(ttl) });
            self.conf_term = 0;
        }
    }

    async fn observe_pg(&mut self, snap: Option<&ClusterSnapshot>) -> PgObservation {
        if !self.inst.is_initialized() {
            self.client = None;
            self.sysid = None;
            return PgObservation { state: PgState::NoData, probe: None };
        }
        if let Some((_, handle)) = &self.starting {
            if handle.is_finished() {
                if let Some((_, handle)) = self.starting.take() {
                    match handle.await {
                        Ok(Ok(())) => tracing::info!("postgres restarted"),
                        Ok(Err(e)) => tracing::warn!("failed to restart postgres: {e}"),
                        Err(e) => tracing::warn!("restart task failed: {e}"),
                    }
                }
            }
        }
        let running = self.inst.postmaster_pid().is_some();
        // Controldata matters only while postgres is down (how it stopped, whether it can
        // follow the leader) and once for the system identifier.
        let control = if !running || self.sysid.is_none() { self.inst.controldata().await.ok() } else { None };
        if let Some(c) = &control {
            self.sysid = Some(c.system_identifier.clone());
        }
        if !running {
            self.client = None;
            self.unresponsive_since_ms = None;
            if let Some((since, _)) = &self.starting {
                // The restart clock runs from the crash, not from this attempt.
                let since_ms = self.down_since_ms.unwrap_or(*since);
                return PgObservation { state: PgState::Starting { since_ms }, probe: None };
            }
            if self.expect_running && self.down_since_ms.is_none() {
                tracing::warn!("postgres is not running although the agent started it: treating it as crashed");
                self.down_since_ms = Some(self.now_ms());
            }
            let was_primary = control.as_ref().is_some_and(|c| c.state == "in production" || c.state == "shut down");
            let diverged = match (&control, snap) {
                (Some(c), Some(s)) => diverged(c, s),
                _ => false,
            };
            return PgObservation {
                state: PgState::Stopped { was_primary, diverged, down_since_ms: self.down_since_ms },
                probe: None,
            };
        }
        match self.probe().await {
            Ok(mut p) => {
                let now = self.now_ms();
                pgkeel_pg::probe::bound_replay_delay(&mut p, &mut self.caught_up, now);
                self.down_since_ms = None;
                self.unresponsive_since_ms = None;
                self.expect_running = true;
                let (role, lsn) = if p.in_recovery {
                    (PgRole::Replica, p.received_lsn.unwrap_or(0).max(p.replayed_lsn.unwrap_or(0)))
                } else {
                    (PgRole::Primary, p.current_lsn.unwrap_or(0))
                };
                let following = if p.in_recovery { self.following.clone() } else { None };
                PgObservation { state: PgState::Running { role, lsn, following }, probe: Some(p) }
            }
            Err(e) => {
                tracing::debug!("postgres runs but does not answer yet: {e:#}");
                let now = self.now_ms();
                let since = *self.unresponsive_since_ms.get_or_insert(now);
                let since_ms = self.down_since_ms.or(self.starting.as_ref().map(|(s, _)| *s)).unwrap_or(since);
                PgObservation { state: PgState::Starting { since_ms }, probe: None }
            }
        }
    }

    async fn probe(&mut self) -> anyhow::Result<Probe> {
        let timeout = self.shared.dynamic().retry_timeout;
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(self.inst.connect(timeout).await?);
        }
        let client = self.client.as_ref().context("no connection")?;
        match tokio::time::timeout(timeout, pgkeel_pg::probe::probe(client)).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => {
                self.client = None;
                Err(e.into())
            }
            Err(_) => {
                self.client = None;
                bail!("probe timed out after {timeout:?}")
            }
        }
    }

    async fn probe_peers(&self, snap: &ClusterSnapshot, d: &DynamicConfig) -> Vec<Peer> {
        let timeout = d.retry_timeout.min(Duration::from_secs(1));
        let mut set = tokio::task::JoinSet::new();
        for m in snap.members.iter().map(|m| &m.value).filter(|m| m.name != self.me()) {
            let (name, url) = (m.name.clone(), format!("{}/node", m.api_url));
            set.spawn(async move {
                let r = crate::http::request("GET", &url, None, None, timeout).await;
                (name, r)
            });
        }
        let mut peers = Vec::new();
        while let Some(Ok((name, r))) = set.join_next().await {
            let peer = match r.and_then(|r| r.json()) {
                Ok(v) => {
                    let running = v["state"] == "running";
                    Peer {
                        name,
                        reachable: true,
                        running_primary: running && v["role"] == "primary",
                        running_replica: running && v["role"] == "replica",
                        lsn: v["lsn"].as_u64().unwrap_or(0),
                        tags: pgkeel_ha::Tags {
                            nofailover: v["tags"]["nofailover"].as_bool().unwrap_or(false),
                            failover_priority: v["tags"]["failover_priority"].as_i64().unwrap_or(1),
                        },
                    }
                }
                Err(e) => {
                    tracing::info!("peer {name} did not answer the pre-race probe: {e:#}");
                    Peer {
                        name,
                        reachable: false,
                        running_primary: false,
                        running_replica: false,
                        lsn: 0,
                        tags: pgkeel_ha::Tags { nofailover: true, failover_priority: 0 },
                    }
                }
            };
            peers.push(peer);
        }
        peers
    }

    fn member_value(&self, pg: &PgObservation) -> MemberValue {
        let cfg = self.shared.config();
        let (role, state) = role_state(&pg.state);
        let p = pg.probe.as_ref();
        MemberValue {
            name: cfg.name.clone(),
            api_url: cfg.rest_url(),
            pg_address: cfg.pg_connect_address().to_string(),
            role,
            state: state.to_string(),
            timeline: p.map(|p| p.timeline),
            lsn: match &pg.state {
                PgState::Running { lsn, .. } => Some(*lsn),
                _ => None,
            },
            replayed_lsn: p.and_then(|p| p.replayed_lsn),
            replay_lag_ms: p.and_then(|p| p.replay_lag_ms),
            streaming: p.is_some_and(|p| p.wal_receiver.as_ref().is_some_and(|w| w.status == "streaming")),
            following: if role == Role::Replica { self.following.clone() } else { None },
            term: self.lease.as_ref().map(|l| l.value.term).unwrap_or(self.conf_term),
            tags: MemberTags { nofailover: cfg.tags.nofailover, failover_priority: cfg.tags.failover_priority },
            pending_restart: p.is_some_and(|p| !p.pending_restart.is_empty()),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    async fn publish_member(&self, pg: &PgObservation) {
        let ttl = self.shared.dynamic().ttl;
        if let Err(e) = self.shared.store.put_member(&self.member_value(pg), ttl).await {
            tracing::warn!("failed to publish member state: {e}");
        }
    }

    fn update_status(
        &self,
        pg: &PgObservation,
        snap: Option<&ClusterSnapshot>,
        decision: &Decision,
        d: &DynamicConfig,
    ) {
        let m = self.member_value(pg);
        let p = pg.probe.as_ref();
        let now = self.now_ms();
        let mut st = self.shared.status.write().expect("status lock poisoned");
        st.role = m.role;
        st.state = m.state;
        st.timeline = m.timeline;
        st.lsn = m.lsn;
        st.received_lsn = p.and_then(|p| p.received_lsn);
        st.replayed_lsn = m.replayed_lsn;
        st.streaming = m.streaming;
        st.following = m.following;
        st.term = m.term;
        st.pending_restart = p.map(|p| p.pending_restart.clone()).unwrap_or_default();
        st.postmaster_start = p.map(|p| p.postmaster_start_unix);
        st.replication = p.map(|p| p.replication.clone()).unwrap_or_default();
        st.dcs_ok = snap.is_some();
        st.paused = d.pause;
        st.failsafe_mode = d.failsafe_mode;
        st.last_loop_ms = unix_ms();
        st.last_decision = decision.reason.clone();
        st.holds_lease = self.lease.as_ref().is_some_and(|l| l.deadline_ms > now);
        st.lease_left_ms = self.lease.as_ref().map(|l| l.deadline_ms.saturating_sub(now));
        if let Some(s) = snap {
            st.sync_standby = s.sync.as_ref().is_some_and(|x| {
                x.value.members.contains(&st.name) || x.value.quorum.last().is_some_and(|q| q.voters.contains(&st.name))
            });
            st.leader = s.leader_name().map(String::from);
            let last = s.status.as_ref().map(|x| x.last_lsn);
            st.lag_bytes = match (m.role, last, st.replayed_lsn.or(st.lsn)) {
                (Role::Replica, Some(last), Some(mine)) => Some(last.saturating_sub(mine)),
                (Role::Primary, _, _) => Some(0),
                _ => None,
            };
        }
    }

    async fn execute(
        &mut self,
        decision: &Decision,
        snap: &ClusterSnapshot,
        pg: &PgObservation,
        d: &DynamicConfig,
    ) -> anyhow::Result<bool> {
        match &decision.action {
            Action::Idle | Action::ProbePeers => Ok(false),
            Action::Bootstrap => self.bootstrap(snap, d).await.map(|_| true),
            Action::Clone { leader } => self.clone_from(leader, snap).await.map(|_| true),
            Action::Rewind { leader } => self.rewind_or_reclone(leader, snap).await.map(|_| true),
            Action::StartReplica { leader } => self.start_replica(leader.as_deref(), snap).await.map(|_| false),
            Action::Follow { leader } => self.follow(leader, snap).await.map(|_| false),
            Action::Renew => self.renew(snap, pg, d).await.map(|_| false),
            Action::RestartPrimary => {
                self.restart_primary(d)?;
                self.renew(snap, pg, d).await.map(|_| false)
            }
            Action::Promote { reason, acquire } => self.promote(snap, *reason, *acquire, d).await.map(|_| true),
            Action::Demote => {
                self.demote().await;
                Ok(true)
            }
            Action::StepDown => self.step_down(snap, pg, d).await.map(|_| true),
            Action::Release => self.release().await.map(|_| true),
            Action::Reacquire => self.reacquire(d).await.map(|_| false),
            // Only decided without a snapshot; handled in `once`.
            Action::Failsafe => Ok(false),
        }
    }

    fn replication_password(&self, snap: &ClusterSnapshot) -> Option<String> {
        self.shared
            .config()
            .postgres
            .replication
            .password
            .clone()
            .or_else(|| snap.initialize.as_ref().and_then(|i| i.value.replication_password.clone()))
    }

    fn managed_conf(
        &self,
        upstream: Option<(&MemberValue, String)>,
        term: u64,
        d: &DynamicConfig,
    ) -> anyhow::Result<ManagedConf> {
        let cfg = self.shared.config();
        let (host, port) = split_host_port(&cfg.postgres.listen)?;
        let mut parameters = std::collections::BTreeMap::new();
        // Re-point quickly after a failover: the default waits 5 s between WAL source retries.
        parameters.insert("wal_retrieve_retry_interval".to_string(), "500ms".to_string());
        // With a backup repository the primary archives every WAL file there (a standby with
        // archive_mode = on does not), and every member can fetch from it what streaming
        // cannot give (timeline history, WAL a slot did not keep).
        if let Some(repo) = &cfg.backup.repo {
            let exe = std::env::current_exe().context("find the pgkeel binary for archive_command")?;
            parameters.insert("archive_mode".to_string(), "on".to_string());
            let s3 = self.s3_config_path();
            parameters.insert(
                "archive_command".to_string(),
                pgkeel_backup::archive_command_with(&exe, repo, &cfg.cluster, s3.as_deref()),
            );
            // A member only uses the archive to fill gaps streaming leaves: any failure (a
            // damaged file, an unreachable repository, the binary being replaced during an
            // upgrade: exit codes above 125) must read as "not there" so it keeps streaming.
            // Left as they are, postgres would take them as fatal and stop the replica.
            parameters.insert(
                "restore_command".to_string(),
                format!("{} || exit 1", pgkeel_backup::restore_command_with(&exe, repo, &cfg.cluster, s3.as_deref())),
            );
        }
        for (k, v) in d.postgresql.parameters.iter().chain(cfg.postgres.parameters.iter()) {
            parameters.insert(k.clone(), v.to_string());
        }
        if upstream.is_some() {
            // A hot standby refuses to start with these set lower than its primary had them.
            for (name, min) in &self.standby_minimums {
                let wanted = parameters.get(name).and_then(|v| v.parse::<u64>().ok());
                if wanted.is_some_and(|w| w < *min) {
                    parameters.insert(name.clone(), min.to_string());
                }
            }
        }
        let (primary_conninfo, primary_slot_name) = match upstream {
            Some((m, password)) => {
                let (h, p) = split_host_port(&m.pg_address)?;
                let src = SourceConn {
                    host: h,
                    port: p,
                    user: cfg.postgres.replication.username.clone(),
                    password: Some(password),
                };
                (Some(src.conninfo(&cfg.name)), Some(pgkeel_pg::probe::slot_name_for(&cfg.name)))
            }
            None => (None, None),
        };
        // Only a lease holder waits for synchronous standbys: bootstrap's own commits (the
        // replication role) must not block in strict mode.
        // The value comes from the sync planner's last step only, so a mode change reaches the
        // GUC in the planner's order (key first when withdrawing), never through a re-render.
        let synchronous_standby_names =
            if primary_conninfo.is_none() && self.lease.is_some() { self.guc_value.clone() } else { String::new() };
        Ok(ManagedConf {
            synchronous_standby_names,
            listen_host: host,
            port,
            socket_dir: self.inst.socket_dir.clone(),
            cluster_name: cfg.cluster.clone(),
            term,
            primary_conninfo,
            primary_slot_name,
            parameters,
        })
    }

    fn upstream<'a>(
        &self,
        leader: Option<&str>,
        snap: &'a ClusterSnapshot,
    ) -> anyhow::Result<Option<(&'a MemberValue, String)>> {
        let Some(leader) = leader else { return Ok(None) };
        let Some(m) = snap.member(leader) else { return Ok(None) };
        let pw = self.replication_password(snap).context(
            "no replication password: set postgres.replication.password in node.toml (the bootstrap member did not publish one)",
        )?;
        Ok(Some((m, pw)))
    }

    /// Writes `pgkeel.conf` and `pg_hba.conf` (with the node's and the cluster's `pg_hba`
    /// lines of `d`); true when either changed.
    fn write_conf(&mut self, conf: &ManagedConf, d: &DynamicConfig) -> anyhow::Result<bool> {
        let changed = self.inst.write_conf(conf)?;
        let pg = &self.shared.config().postgres;
        let hba_changed = self.inst.write_hba(&pg.replication.username, &pg.pg_hba, &d.postgresql.pg_hba)?;
        self.conf_term = conf.term;
        Ok(changed || hba_changed)
    }

    async fn bootstrap(&mut self, snap: &ClusterSnapshot, d: &DynamicConfig) -> anyhow::Result<()> {
        let cfg = self.shared.config();
        let mut init = match &snap.initialize {
            Some(i) if i.value.bootstrapper == cfg.name => i.value.clone(),
            Some(i) => bail!("{} is bootstrapping the cluster", i.value.bootstrapper),
            None => {
                let v = InitializeValue {
                    bootstrapper: cfg.name.clone(),
                    sysid: None,
                    replication_password: if cfg.postgres.replication.password.is_some() {
                        None
                    } else {
                        Some(random_password())
                    },
                };
                if !self.shared.store.claim_initialize(&v).await? {
                    return Ok(()); // someone else won; the next loop waits for them
                }
                v
            }
        };
        let repl_pw = cfg
            .postgres
            .replication
            .password
            .clone()
            .or(init.replication_password.clone())
            .context("no replication password")?;
        let mut recovery = None;
        if !self.inst.is_initialized() {
            if let Some(from) = &cfg.backup.bootstrap_from {
                recovery = Some(self.restore_for_bootstrap(from).await?);
            } else {
                tracing::info!("initializing a new cluster in {}", cfg.data_dir.display());
                let su_pw = cfg.postgres.superuser.password.clone().unwrap_or_else(random_password);
                self.inst.initdb(&su_pw).await.context("initdb")?;
            }
        }
        let mut conf = self.managed_conf(None, 1, d)?;
        if let Some(settings) = &recovery {
            conf.parameters.extend(settings.clone());
        }
        self.write_conf(&conf, d)?;
        self.inst.set_standby(false)?;
        if self.inst.postmaster_pid().is_none() {
            self.inst.start(LONG_OP).await.context("start the new primary")?;
        }
        self.expect_running = true;
        let client = self.inst.connect(LONG_OP).await?;
        if recovery.is_some() {
            self.wait_restored_promotion(&client).await?;
            // The recovery settings must not outlive the restore (a standby would obey them).
            let conf = self.managed_conf(None, 1, d)?;
            self.write_conf(&conf, d)?;
            self.inst.reload().await?;
        }
        pgkeel_pg::probe::ensure_replication_user(&client, &cfg.postgres.replication.username, &repl_pw).await?;
        if let Some(pw) = &cfg.postgres.superuser.password {
            pgkeel_pg::probe::set_superuser_password(&client, &cfg.postgres.superuser.username, pw).await?;
        }
        let control = self.inst.controldata().await?;
        init.sysid = Some(control.system_identifier.clone());
        if snap.config.is_none() {
            self.shared.store.write_config(&cfg.bootstrap.to_json(), None).await?;
        }
        let ttl = d.ttl;
        let t0 = self.now_ms();
        let (value, revision) = self
            .shared
            .store
            .acquire_leader(&cfg.name, ttl)
            .await?
            .context("another member took the leader key during bootstrap")?;
        self.lease = Some(Lease { value: value.clone(), revision, deadline_ms: t0 + ms(ttl) });
        self.maybe_primary = true;
        self.sync_guard(d);
        if value.term != 1 {
            let conf = self.managed_conf(None, value.term, d)?;
            self.write_conf(&conf, d)?;
            self.inst.reload().await?;
        }
        let probe = pgkeel_pg::probe::probe(&client).await?;
        let lsn = probe.current_lsn.unwrap_or(0);
        self.shared
            .store
            .append_history(&HistoryEntry {
                term: value.term,
                timeline: probe.timeline,
                time_ms: unix_ms(),
                reason: "bootstrap".into(),
                old_primary: None,
                new_primary: cfg.name.clone(),
                old_primary_lsn: None,
                lsn,
                timeline_history: None,
            })
            .await?;
        self.shared
            .store
            .set_status(&StatusValue {
                last_lsn: lsn,
                term: value.term,
                timeline: probe.timeline,
                updated_ms: unix_ms(),
                last_archived_ms: None,
            })
            .await?;
        self.shared.store.set_initialize(&init).await?;
        tracing::info!(sysid = %control.system_identifier, term = value.term, "cluster bootstrapped; this member is the primary");
        Ok(())
    }

    /// Bootstrapping from a backup (`[backup.bootstrap_from]`): restores it into the empty
    /// data directory and returns the recovery settings for postgresql.conf (postgres then
    /// recovers from the backup's archive and promotes at the target or the end of it).
    async fn restore_for_bootstrap(
        &mut self,
        from: &pgkeel_config::BootstrapFrom,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let cfg = self.shared.config();
        let location = from.repo.as_ref().or(cfg.backup.repo.as_ref()).context("no repository to bootstrap from")?;
        let location = location.to_string_lossy().to_string();
        let cluster = from.cluster.clone().unwrap_or_else(|| cfg.cluster.clone());
        let repo = pgkeel_backup::Repo::open_with(&location, &cluster, &cfg.backup.s3.clone().unwrap_or_default())?;
        let target = pgkeel_backup::restore::Target::from_options(
            [
                "backup.bootstrap_from.target_time",
                "backup.bootstrap_from.target_lsn",
                "backup.bootstrap_from.target_xid",
                "backup.bootstrap_from.target_name",
            ],
            from.target_time.as_deref(),
            from.target_lsn.as_deref(),
            from.target_xid,
            from.target_name.as_deref(),
        )?;
        let exe = std::env::current_exe().context("find the pgkeel binary for restore_command")?;
        let s3 = if location.starts_with("s3://") { self.s3_config_path() } else { None };
        let restore_command =
            pgkeel_backup::restore_command_with(&exe, std::path::Path::new(&location), &cluster, s3.as_deref());
        tracing::info!(repo = %location, cluster = %cluster, backup = ?from.backup, target = ?target.setting(),
            "bootstrapping the cluster from a backup");
        let opts = pgkeel_backup::RestoreOptions {
            to: cfg.data_dir.clone(),
            label: from.backup.clone(),
            target: target.clone(),
            restore_command: restore_command.clone(),
            run_as: self.run_as.clone(),
            jobs: 2,
            progress: false,
            configure_recovery: false,
        };
        let m = tokio::task::spawn_blocking(move || pgkeel_backup::restore(&repo, &opts))
            .await
            .context("the restore task panicked")?
            .context("restore the backup to bootstrap from")?;
        tracing::info!(backup = %m.label, "backup restored; recovering from its archive");
        let mut settings = vec![
            ("restore_command".to_string(), restore_command),
            ("recovery_target_timeline".to_string(), "latest".to_string()),
        ];
        if let Some((name, value)) = target.setting() {
            settings.push((name.to_string(), value));
            settings.push(("recovery_target_action".to_string(), "promote".to_string()));
        }
        Ok(settings)
    }

    /// Waits (up to a day, logging every minute) until the restored server has recovered and
    /// promoted itself.
    async fn wait_restored_promotion(&self, client: &tokio_postgres::Client) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut logged = Instant::now();
        loop {
            let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await.context(
                "the restored server stopped during recovery (its log says why; empty the data directory to retry)",
            )?;
            if !row.get::<_, bool>(0) {
                tracing::info!(secs = started.elapsed().as_secs_f64(), "the restored server has promoted");
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(86_400) {
                bail!("the restored server is still recovering after a day");
            }
            if logged.elapsed() > Duration::from_secs(60) {
                tracing::info!(secs = started.elapsed().as_secs(), "the restored server is still recovering");
                logged = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn clone_from(&mut self, leader: &str, snap: &ClusterSnapshot) -> anyhow::Result<()> {
        let (m, pw) =
            self.upstream(Some(leader), snap)?.with_context(|| format!("leader {leader} has no member record"))?;
        let (host, port) = split_host_port(&m.pg_address)?;
        let src = SourceConn {
            host,
            port,
            user: self.shared.config().postgres.replication.username.clone(),
            password: Some(pw),
        };
        tracing::info!("cloning from {leader} ({})", m.pg_address);
        self.sysid = None;
        // The loop waits for the clone: keep this member's record alive meanwhile, or it
        // expires after ttl and the leader drops the member's replication slot.
        let own = snap.member(&self.name).cloned();
        let result = {
            let clone = self.inst.basebackup(&src, None, LONG_OP);
            tokio::pin!(clone);
            loop {
                let ttl = self.shared.dynamic().ttl;
                tokio::select! {
                    r = &mut clone => break r,
                    _ = tokio::time::sleep(ttl / 3) => {
                        if let Some(m) = &own {
                            if let Err(e) = self.shared.store.put_member(m, ttl).await {
                                tracing::warn!("failed to keep the member record alive during the clone: {e}");
                            }
                        }
                    }
                }
            }
        };
        result.context("clone the leader's data directory")?;
        self.start_replica(Some(leader), snap).await
    }

    /// A former primary whose timeline diverged: pg_rewind onto the leader's timeline (fast,
    /// copies only what changed), else move the data aside and clone afresh.
    async fn rewind_or_reclone(&mut self, leader: &str, snap: &ClusterSnapshot) -> anyhow::Result<()> {
        match self.rewind(leader, snap).await {
            Ok(()) => self.start_replica(Some(leader), snap).await,
            Err(e) => {
                tracing::warn!("pg_rewind did not work ({e:#}); re-cloning instead");
                let old = self.inst.move_aside()?;
                tracing::warn!("moved the diverged data directory aside to {}", old.display());
                self.clone_from(leader, snap).await
            }
        }
    }

    async fn rewind(&mut self, leader: &str, snap: &ClusterSnapshot) -> anyhow::Result<()> {
        let su = &self.shared.config().postgres.superuser;
        let password =
            su.password.clone().context("pg_rewind connects as the superuser: set postgres.superuser.password")?;
        let m = snap.member(leader).with_context(|| format!("leader {leader} has no member record"))?;
        let (host, port) = split_host_port(&m.pg_address)?;
        let src = SourceConn { host, port, user: su.username.clone(), password: Some(password) };
        let control = self.inst.controldata().await?;
        if control.state != "shut down" && control.state != "shut down in recovery" {
            // pg_rewind needs a clean shutdown; a killed or fenced primary had none.
            self.inst.set_standby(false)?;
            self.inst.recover_single_user(LONG_OP).await.context("crash recovery before pg_rewind")?;
        }
        Instance::checkpoint_source(&src, LONG_OP).await?;
        self.inst.rewind(&src, LONG_OP).await?;
        tracing::warn!("rewound onto {leader}'s timeline");
        // Without it, an idle leader can leave this member short of a consistent state (see
        // `advance_source_wal`). The rewind itself worked: a failure here is only reported.
        if let Err(e) = Instance::advance_source_wal(&src, LONG_OP).await {
            tracing::warn!("could not write WAL on {leader} after pg_rewind ({e}); this member becomes consistent (and readable) with the leader's next write");
        }
        Ok(())
    }

    async fn start_replica(&mut self, leader: Option<&str>, snap: &ClusterSnapshot) -> anyhow::Result<()> {
        let d = self.shared.dynamic();
        if let Ok(c) = self.inst.controldata().await {
            self.standby_minimums = c.hot_standby_minimums;
        }
        let upstream = self.upstream(leader, snap)?;
        let term = snap.leader.as_ref().map_or(self.conf_term, |l| l.value.term);
        let following = upstream.as_ref().map(|(m, _)| m.name.clone());
        let conf = self.managed_conf(upstream, term, &d)?;
        self.write_conf(&conf, &d)?;
        self.inst.set_standby(true)?;
        self.down_since_ms = None;
        self.expect_running = true;
        self.following = following;
        self.inst.start(Duration::from_secs(60)).await.context("start postgres as a replica")?;
        Ok(())
    }

    async fn follow(&mut self, leader: &str, snap: &ClusterSnapshot) -> anyhow::Result<()> {
        let d = self.shared.dynamic();
        let upstream =
            self.upstream(Some(leader), snap)?.with_context(|| format!("leader {leader} has no member record yet"))?;
        let term = snap.leader.as_ref().map_or(0, |l| l.value.term);
        let conf = self.managed_conf(Some(upstream), term, &d)?;
        self.write_conf(&conf, &d)?;
        // primary_conninfo is reloadable since PostgreSQL 13: the WAL receiver restarts on the
        // new upstream without restarting postgres.
        self.inst.reload().await?;
        self.following = Some(leader.to_string());
        Ok(())
    }

    async fn renew(&mut self, snap: &ClusterSnapshot, pg: &PgObservation, d: &DynamicConfig) -> anyhow::Result<()> {
        let Some(lease) = self.lease.clone() else { bail!("no lease to renew") };
        if !self.renew_leader_key(&lease, d).await? {
            // Expired (e.g. the DCS was away, failsafe kept us primary) rather than taken:
            // take it straight back while our own lease still holds; if another member has
            // it, drop the lease and demote next loop.
            let taken = self.shared.store.load().await.map(|s| s.leader.is_some()).unwrap_or(true);
            if !taken && self.lease.as_ref().is_some_and(|l| self.now_ms() < l.deadline_ms) {
                tracing::warn!("the leader key expired while this primary's lease held: taking it back");
                return self.reacquire(d).await;
            }
            tracing::warn!("lost the leader key (it expired or was taken)");
            self.lease = None;
            return Ok(());
        }
        let Some(p) = &pg.probe else { return Ok(()) };
        if p.in_recovery {
            return Ok(());
        }
        if self.conf_term != lease.value.term {
            let conf = self.managed_conf(None, lease.value.term, d)?;
            self.write_conf(&conf, d)?;
            self.inst.reload().await?;
        }
        let status = StatusValue {
            last_lsn: p.current_lsn.unwrap_or(0),
            term: lease.value.term,
            timeline: p.timeline,
            updated_ms: unix_ms(),
            last_archived_ms: p.last_archived_ms,
        };
        self.shared.store.set_status(&status).await?;
        self.ensure_slots(snap).await?;
        self.manage_sync(snap, p, d).await
    }

    /// One step of synchronous replication management (see `pgkeel_ha::sync`): the key is
    /// written before the GUC when standbys are withdrawn, after it when they are added.
    async fn manage_sync(&mut self, snap: &ClusterSnapshot, p: &Probe, d: &DynamicConfig) -> anyhow::Result<()> {
        let me = self.me().to_string();
        let mode = sync_mode(d);
        let quorum_mode = mode == pgkeel_ha::SyncMode::Quorum;
        let mut revision = snap.sync.as_ref().map(|s| s.revision);
        let (mut members, mut quorum) = match &snap.sync {
            Some(s) if s.value.leader == me => (s.value.members.clone(), s.value.quorum.clone()),
            Some(_) => {
                // A key from an earlier leader: claim it, empty, before planning.
                revision = self.write_sync(Vec::new(), Vec::new(), revision).await?;
                (Vec::new(), Vec::new())
            }
            None => (Vec::new(), Vec::new()),
        };
        // A key written under the other family of modes (the mode was changed): empty it
        // first, so nobody is promoted on the old terms while the GUC changes.
        if (quorum_mode && !members.is_empty()) || (!quorum_mode && !quorum.is_empty()) {
            tracing::info!(mode = ?mode, "synchronous mode changed: withdrawing the synchronous standbys first");
            revision = self.write_sync(Vec::new(), Vec::new(), revision).await?;
            members.clear();
            quorum.clear();
        }
        let since = self.guc_in_force.observe(&self.guc_value, p);
        let eligible =
            |name: &str| snap.member(name).is_some_and(|m| !m.tags.nofailover && m.tags.failover_priority > 0);
        let streaming: Vec<&pgkeel_pg::probe::ReplicationRow> =
            p.replication.iter().filter(|r| r.state == "streaming" && eligible(&r.application_name)).collect();
        // Flushed past the position the primary had once the current GUC was in force: it has
        // every commit acknowledged before, whatever configuration acknowledged it.
        let caught_up = |r: &pgkeel_pg::probe::ReplicationRow| since.is_some_and(|s| r.flush_lsn.unwrap_or(0) >= s);
        let candidates: Vec<pgkeel_ha::sync::SyncCandidate> = streaming
            .iter()
            .map(|r| pgkeel_ha::sync::SyncCandidate {
                name: r.application_name.clone(),
                flush_lsn: r.flush_lsn.unwrap_or(0),
                confirmed: r.sync_state == "sync" && caught_up(r),
            })
            .collect();
        if quorum_mode {
            let key: Vec<pgkeel_ha::QuorumSet> =
                quorum.iter().map(|q| pgkeel_ha::QuorumSet { k: q.k, voters: q.voters.clone() }).collect();
            let established = self.quorum_guc.as_ref().is_some_and(|g| {
                g.render() == self.guc_value
                    && streaming.iter().filter(|r| g.voters.contains(&r.application_name) && caught_up(r)).count()
                        >= g.k as usize
            });
            let step = pgkeel_ha::sync::plan_quorum(
                d.synchronous_node_count,
                &candidates,
                self.quorum_guc.as_ref(),
                established,
                &key,
            );
            let to_value = |k: &[pgkeel_ha::QuorumSet]| -> Vec<QuorumValue> {
                k.iter().map(|q| QuorumValue { k: q.k, voters: q.voters.clone() }).collect()
            };
            if step.key_first {
                if let Some(k) = &step.key {
                    tracing::info!(quorum = ?k, "synchronous quorum in the DCS (before the GUC)");
                    revision = self.write_sync(Vec::new(), to_value(k), revision).await?;
                }
            }
            self.quorum_guc = step.guc.clone();
            self.apply_guc(step.guc.as_ref().map(|g| g.render()).unwrap_or_default(), d).await?;
            if !step.key_first {
                if let Some(k) = step.key.filter(|k| *k != key) {
                    tracing::info!(quorum = ?k, "synchronous quorum established");
                    self.write_sync(Vec::new(), to_value(&k), revision).await?;
                }
            }
            return Ok(());
        }
        let step = pgkeel_ha::sync::plan(mode, d.synchronous_node_count, &candidates, &self.sync_guc, &members);
        if step.key_first {
            if let Some(k) = &step.key {
                revision = self.write_sync(k.clone(), Vec::new(), revision).await?;
                members = k.clone();
            }
        }
        if step.guc != self.sync_guc {
            tracing::info!(standbys = ?step.guc, "synchronous standbys in synchronous_standby_names");
            self.sync_guc = step.guc.clone();
        }
        self.apply_guc(pgkeel_ha::sync::render(mode, &step.guc), d).await?;
        if !step.key_first {
            if let Some(k) = step.key.filter(|k| *k != members) {
                tracing::info!(standbys = ?k, "confirmed synchronous standbys");
                self.write_sync(k, Vec::new(), revision).await?;
            }
        }
        Ok(())
    }

    /// Make synchronous_standby_names `value` (rewrite pgkeel.conf and reload when it changes).
    async fn apply_guc(&mut self, value: String, d: &DynamicConfig) -> anyhow::Result<()> {
        if value == self.guc_value {
            return Ok(());
        }
        tracing::info!(synchronous_standby_names = %value, "setting synchronous_standby_names");
        self.guc_value = value;
        let term = self.lease.as_ref().map_or(self.conf_term, |l| l.value.term);
        let conf = self.managed_conf(None, term, d)?;
        if self.write_conf(&conf, d)? {
            self.inst.reload().await?;
        }
        Ok(())
    }

    async fn write_sync(
        &self,
        members: Vec<String>,
        quorum: Vec<QuorumValue>,
        revision: Option<u64>,
    ) -> anyhow::Result<Option<u64>> {
        let value = SyncValue { leader: self.me().to_string(), members, quorum };
        match self.shared.store.write_sync(&value, revision).await? {
            Some(rev) => Ok(Some(rev)),
            None => bail!("the sync key changed concurrently"),
        }
    }

    async fn ensure_slots(&self, snap: &ClusterSnapshot) -> anyhow::Result<()> {
        let wanted: Vec<String> = snap
            .members
            .iter()
            .filter(|m| m.value.name != self.me())
            .map(|m| pgkeel_pg::probe::slot_name_for(&m.value.name))
            .collect();
        if let Some(c) = &self.client {
            pgkeel_pg::probe::ensure_slots(c, &wanted).await?;
        }
        Ok(())
    }

    fn restart_primary(&mut self, d: &DynamicConfig) -> anyhow::Result<()> {
        if self.starting.is_some() {
            return Ok(());
        }
        let term = self.lease.as_ref().map_or(self.conf_term, |l| l.value.term);
        let conf = self.managed_conf(None, term, d)?;
        self.write_conf(&conf, d)?;
        self.inst.set_standby(false)?;
        let inst = self.inst.clone();
        let timeout = d.primary_start_timeout.max(Duration::from_secs(1));
        tracing::warn!("restarting crashed postgres in place (primary_start_timeout {:?})", d.primary_start_timeout);
        self.starting = Some((self.now_ms(), tokio::spawn(async move { inst.start(timeout).await })));
        Ok(())
    }

    async fn wait_caught_up(&mut self, target: u64, bound: Duration) {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Ok(p) = self.probe().await {
                if p.received_lsn.unwrap_or(0).max(p.replayed_lsn.unwrap_or(0)) > target {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(
            "did not receive the old primary's final WAL ({}) in time; promoting anyway",
            pgkeel_pg::lsn::format_lsn(target)
        );
    }

    async fn promote(
        &mut self,
        snap: &ClusterSnapshot,
        reason: PromoteReason,
        acquire: bool,
        d: &DynamicConfig,
    ) -> anyhow::Result<()> {
        if acquire {
            if reason == PromoteReason::Switchover {
                if let Some(s) = &snap.status {
                    self.wait_caught_up(s.last_lsn, d.ttl).await;
                }
            }
            if !self.may_race() {
                tracing::info!("not racing: this member confirmed a failsafe primary");
                return Ok(());
            }
            let t0 = self.now_ms();
            match self.shared.store.acquire_leader(self.me(), d.ttl).await? {
                Some((value, revision)) => {
                    tracing::info!(term = value.term, "took the leader key");
                    self.lease = Some(Lease { value, revision, deadline_ms: t0 + ms(d.ttl) });
                    // Armed before postgres accepts its first write as primary.
                    self.maybe_primary = true;
                    self.sync_guard(d);
                }
                None => {
                    tracing::info!("another member took the leader key first");
                    return Ok(());
                }
            }
        }
        let lease = self.lease.clone().context("promotion without a lease")?;
        // The sync key is this leader's (and empty) before postgres accepts a write: nobody is
        // a synchronous standby of the new primary until it confirms them.
        self.sync_guc.clear();
        self.quorum_guc = None;
        self.guc_value = pgkeel_ha::sync::render(sync_mode(d), &[]);
        if sync_mode(d) != pgkeel_ha::SyncMode::Off || snap.sync.is_some() {
            self.write_sync(Vec::new(), Vec::new(), snap.sync.as_ref().map(|s| s.revision)).await?;
        }
        // The term is in place before postgres accepts its first write.
        let conf = self.managed_conf(None, lease.value.term, d)?;
        self.write_conf(&conf, d)?;
        self.inst.reload().await?;
        self.inst.promote(Duration::from_secs(60)).await.context("promote postgres")?;
        self.following = None;
        self.expect_running = true;
        self.shared.counters.promotions.fetch_add(1, Ordering::Relaxed);
        let p = self.probe().await?;
        let lsn = p.current_lsn.unwrap_or(0);
        tracing::warn!(term = lease.value.term, timeline = p.timeline, "promoted: this member is the primary");
        let entry = HistoryEntry {
            term: lease.value.term,
            timeline: p.timeline,
            time_ms: unix_ms(),
            reason: if reason == PromoteReason::Switchover
                && snap.failover.as_ref().is_some_and(|f| f.value.kind == "failover")
            {
                "manual failover".into()
            } else {
                reason.as_str().into()
            },
            old_primary: snap.history.last().map(|h| h.new_primary.clone()),
            new_primary: self.me().to_string(),
            old_primary_lsn: snap.status.as_ref().map(|s| s.last_lsn),
            lsn,
            timeline_history: self.inst.read_timeline_history(p.timeline),
        };
        self.shared.store.append_history(&entry).await?;
        self.shared
            .store
            .set_status(&StatusValue {
                last_lsn: lsn,
                term: lease.value.term,
                timeline: p.timeline,
                updated_ms: unix_ms(),
                last_archived_ms: None,
            })
            .await?;
        if snap.failover.is_some() {
            self.shared.store.clear_failover().await?;
        }
        if snap.switchover.is_some() {
            // The proxies reopen once they see this leader's term; the key only told them to
            // hold new transactions while the old leader stepped down.
            self.shared.store.clear_switchover().await?;
        }
        self.ensure_slots(snap).await?;
        let pg =
            PgObservation { state: PgState::Running { role: PgRole::Primary, lsn, following: None }, probe: Some(p) };
        self.publish_member(&pg).await;
        Ok(())
    }

    /// Failsafe: the DCS cannot be read. Ask every other member to confirm this primary; all
    /// must, or it demotes. The lease is extended from the moment the questions were sent.
    async fn failsafe(&mut self, d: &DynamicConfig) {
        let Some(lease) = self.lease.clone() else { return self.demote().await };
        let t0 = self.now_ms();
        let cfg = self.shared.config();
        let auth = cfg
            .rest
            .password
            .clone()
            .map(|password| crate::http::Auth { username: cfg.rest.username.clone(), password });
        let body = serde_json::json!({ "leader": cfg.name, "term": lease.value.term });
        let timeout = d.retry_timeout.min(Duration::from_secs(1));
        let mut set = tokio::task::JoinSet::new();
        for (name, url) in self.last_members.clone() {
            let (body, auth) = (body.clone(), auth.clone());
            set.spawn(async move {
                let r =
                    crate::http::request("POST", &format!("{url}/failsafe"), Some(&body), auth.as_ref(), timeout).await;
                (name, r.map(|r| r.status))
            });
        }
        let mut refused = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((_, Ok(200))) => {}
                Ok((name, Ok(status))) => refused.push(format!("{name} (HTTP {status})")),
                Ok((name, Err(e))) => refused.push(format!("{name} ({e:#})")),
                Err(e) => refused.push(format!("a probe task failed: {e}")),
            }
        }
        if refused.is_empty() {
            if let Some(l) = &mut self.lease {
                l.deadline_ms = t0 + ms(d.ttl);
            }
            tracing::warn!(
                members = self.last_members.len(),
                "DCS unreachable: every member confirmed this primary (failsafe)"
            );
        } else {
            tracing::error!(
                "DCS unreachable and not every member confirmed this primary ({}): demoting",
                refused.join(", ")
            );
            self.demote().await;
        }
    }

    /// Take the leader key back (it expired during a failsafe DCS outage) with a new term.
    async fn reacquire(&mut self, d: &DynamicConfig) -> anyhow::Result<()> {
        if !self.may_race() {
            bail!("confirmed another failsafe primary");
        }
        let t0 = self.now_ms();
        match self.shared.store.acquire_leader(self.me(), d.ttl).await? {
            Some((value, revision)) => {
                tracing::warn!(term = value.term, "took the leader key back after a DCS outage");
                self.lease = Some(Lease { value: value.clone(), revision, deadline_ms: t0 + ms(d.ttl) });
                self.sync_guard(d);
                let conf = self.managed_conf(None, value.term, d)?;
                self.write_conf(&conf, d)?;
                self.inst.reload().await?;
            }
            None => {
                tracing::warn!("another member took the leader key first: this primary will demote");
                self.lease = None;
            }
        }
        Ok(())
    }

    /// Before taking the leader key: refuse if this member confirmed a failsafe primary
    /// within a ttl; otherwise mark it as racing so it confirms nobody else meanwhile.
    fn may_race(&self) -> bool {
        let mut fs = self.shared.failsafe.lock().expect("failsafe lock poisoned");
        if fs.confirmed_until.is_some_and(|u| Instant::now() < u) {
            return false;
        }
        fs.racing = true;
        true
    }

    async fn demote(&mut self) {
        self.shared.counters.demotions.fetch_add(1, Ordering::Relaxed);
        if let Some((_, h)) = self.starting.take() {
            h.abort();
        }
        self.lease = None;
        self.client = None;
        self.expect_running = false;
        self.down_since_ms = None;
        if let Err(e) = self.inst.stop(StopMode::Immediate, Duration::from_secs(30)).await {
            tracing::error!("failed to stop postgres for demotion: {e}");
        }
    }

    async fn step_down(&mut self, snap: &ClusterSnapshot, pg: &PgObservation, d: &DynamicConfig) -> anyhow::Result<()> {
        self.drain_proxies(snap, pg, d).await?;
        let lease = self.lease.clone().context("step down without a lease")?;
        if let Some(c) = &self.client {
            let _ = tokio::time::timeout(d.retry_timeout, c.batch_execute("CHECKPOINT")).await;
        }
        self.client = None;
        self.expect_running = false;
        // A clean (fast) shutdown streams the shutdown checkpoint to the replicas, so the
        // candidate has every commit and this node can follow it without a fresh clone.
        self.inst.stop(StopMode::Fast, Duration::from_secs(60)).await.context("stop postgres for switchover")?;
        let control = self.inst.controldata().await?;
        self.shared
            .store
            .set_status(&StatusValue {
                last_lsn: control.checkpoint_lsn,
                term: lease.value.term,
                timeline: control.timeline,
                updated_ms: unix_ms(),
                last_archived_ms: None,
            })
            .await?;
        self.shared.store.release_leader(lease.revision).await?;
        self.lease = None;
        self.shared.counters.demotions.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("stepped down for a switchover at {}", pgkeel_pg::lsn::format_lsn(control.checkpoint_lsn));
        let snap = self.shared.store.load().await?;
        self.start_replica(None, &snap).await
    }

    /// Before a switchover stops postgres: announce it in the `switchover` key and wait, at
    /// most `switchover_drain_timeout`, until every registered proxy reports that it holds new
    /// transactions and none of its clients is inside one on this primary. Meanwhile the lease
    /// and the member record are kept fresh. A proxy whose key expires (it died) stops
    /// counting; when the wait runs out the switchover goes on regardless, and the clients of
    /// the proxies that did not drain may see an error, as without this step.
    async fn drain_proxies(
        &mut self,
        snap: &ClusterSnapshot,
        pg: &PgObservation,
        d: &DynamicConfig,
    ) -> anyhow::Result<()> {
        if d.switchover_drain_timeout.is_zero() || snap.proxies.is_empty() {
            return Ok(());
        }
        let lease = self.lease.clone().context("step down without a lease")?;
        let requested = snap.failover.as_ref().map_or(0, |f| f.value.requested_at_ms);
        let started = Instant::now();
        let value = SwitchoverValue {
            id: format!("{}-{requested}", lease.value.term),
            leader: self.me().to_string(),
            term: lease.value.term,
            candidate: snap.failover.as_ref().and_then(|f| f.value.candidate.clone()),
            deadline_ms: unix_ms() + ms(d.switchover_drain_timeout),
        };
        // Outlives the step-down itself; the new leader deletes it once promoted.
        let key_ttl = d.switchover_drain_timeout + (d.ttl * 4).max(Duration::from_secs(30));
        self.shared.store.set_switchover(&value, key_ttl).await.context("announce the switchover to the proxies")?;
        tracing::info!(id = %value.id, proxies = snap.proxies.len(), "switchover: waiting for the proxies to drain");
        let deadline = started + d.switchover_drain_timeout;
        let mut next_renewal = Instant::now() + d.loop_wait;
        let mut waiting: Vec<String> = snap.proxies.iter().map(|p| p.value.id.clone()).collect();
        loop {
            match tokio::time::timeout(d.retry_timeout, self.shared.store.proxies()).await {
                Ok(Ok(proxies)) => {
                    waiting = proxies
                        .into_iter()
                        .filter(|p| p.value.drained.as_deref() != Some(value.id.as_str()))
                        .map(|p| p.value.id)
                        .collect();
                }
                Ok(Err(e)) => tracing::warn!("switchover: cannot read the proxies: {e}"),
                Err(_) => tracing::warn!("switchover: cannot read the proxies within retry_timeout"),
            }
            if waiting.is_empty() {
                tracing::info!(
                    id = %value.id, waited_ms = ms(started.elapsed()),
                    "switchover: every proxy holds new transactions and has none in flight"
                );
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    id = %value.id, waiting = ?waiting,
                    "switchover: not every proxy drained within switchover_drain_timeout ({}); switching anyway, \
                     their clients inside a transaction get an error",
                    pgkeel_config::format_duration(d.switchover_drain_timeout)
                );
                return Ok(());
            }
            if now >= next_renewal {
                next_renewal = now + d.loop_wait;
                if let Err(e) = self.renew_lease_only(d).await {
                    // Without the lease this node must not stay primary: the next loop demotes.
                    let _ = self.shared.store.clear_switchover().await;
                    return Err(e.context("renew the lease while the proxies drain"));
                }
                self.publish_member(pg).await;
            }
            tokio::time::sleep(Duration::from_millis(20).min(deadline - now)).await;
        }
    }

    /// Renews the leader key (and re-arms the guard) without the rest of a loop's work.
    async fn renew_lease_only(&mut self, d: &DynamicConfig) -> anyhow::Result<()> {
        let lease = self.lease.clone().context("no lease to renew")?;
        if !self.renew_leader_key(&lease, d).await? {
            self.lease = None;
            bail!("lost the leader key (it expired or was taken)")
        }
        self.sync_guard(d);
        Ok(())
    }

    /// Renews the leader key of `lease` (within `retry_timeout`) and extends the lease by a
    /// ttl from before the call: `false` when the key is gone (expired or taken).
    async fn renew_leader_key(&mut self, lease: &Lease, d: &DynamicConfig) -> anyhow::Result<bool> {
        let t0 = self.now_ms();
        let r =
            tokio::time::timeout(d.retry_timeout, self.shared.store.renew_leader(&lease.value, lease.revision, d.ttl))
                .await;
        match r {
            Ok(Ok(Some(rev))) => {
                self.lease = Some(Lease { revision: rev, deadline_ms: t0 + ms(d.ttl), ..lease.clone() });
                Ok(true)
            }
            Ok(Ok(None)) => Ok(false),
            Ok(Err(e)) => bail!("renew the leader lease: {e}"),
            Err(_) => bail!("renew the leader lease: no answer within retry_timeout"),
        }
    }

    async fn release(&mut self) -> anyhow::Result<()> {
        self.demote().await;
        if let Some(l) = self.lease.take() {
            self.shared.store.release_leader(l.revision).await?;
        } else if let Ok(snap) = self.shared.store.load().await {
            if let Some(l) = snap.leader.filter(|l| l.value.holder == self.me()) {
                self.shared.store.release_leader(l.revision).await?;
            }
        }
        Ok(())
    }

    async fn stop_for_shutdown(&mut self) {
        tracing::info!("shutting down: stopping postgres");
        if let Some((_, h)) = self.starting.take() {
            h.abort();
        }
        self.client = None;
        if let Err(e) = self.inst.stop(StopMode::Fast, Duration::from_secs(60)).await {
            tracing::error!("failed to stop postgres cleanly: {e}; stopping it immediately");
            let _ = self.inst.stop(StopMode::Immediate, Duration::from_secs(30)).await;
        }
        // Release only after postgres is down, so no write is accepted without the key.
        if let Some(l) = self.lease.take() {
            match self.shared.store.release_leader(l.revision).await {
                Ok(_) => tracing::info!("released the leader key"),
                Err(e) => tracing::warn!("failed to release the leader key (it expires by itself): {e}"),
            }
        }
        let _ = self.shared.store.delete_member(self.me()).await;
        if self.inst.postmaster_pid().is_none() {
            self.guard.tell(Order::Exit);
        }
    }
}

fn sync_mode(d: &DynamicConfig) -> pgkeel_ha::SyncMode {
    match d.synchronous_mode {
        pgkeel_config::SyncMode::Off => pgkeel_ha::SyncMode::Off,
        pgkeel_config::SyncMode::On => pgkeel_ha::SyncMode::On,
        pgkeel_config::SyncMode::Strict => pgkeel_ha::SyncMode::Strict,
        pgkeel_config::SyncMode::Quorum => pgkeel_ha::SyncMode::Quorum,
    }
}

/// Since when the synchronous_standby_names value pgkeel.conf holds is in force: the probe
/// shows it applied, and one loop later (so every walsender has reloaded too) the primary's
/// WAL position is recorded. Standbys flushed past that position have every commit any earlier
/// value acknowledged.
#[derive(Debug, Default)]
struct GucInForce {
    value: String,
    seen: bool,
    since_lsn: Option<u64>,
}

impl GucInForce {
    fn observe(&mut self, value: &str, p: &Probe) -> Option<u64> {
        if self.value != value {
            *self = GucInForce { value: value.to_string(), ..GucInForce::default() };
        }
        if p.synchronous_standby_names != value {
            return None;
        }
        if self.since_lsn.is_none() {
            if self.seen {
                self.since_lsn = p.current_lsn;
            } else {
                self.seen = true;
            }
        }
        self.since_lsn
    }
}

fn action_verb(a: &Action) -> &'static str {
    match a {
        Action::Idle | Action::ProbePeers => "wait",
        Action::Bootstrap => "bootstrap the cluster",
        Action::Clone { .. } => "clone from the leader",
        Action::Rewind { .. } => "rewind onto the leader's timeline",
        Action::StartReplica { .. } => "start as a replica",
        Action::Follow { .. } => "follow the new leader",
        Action::Renew => "renew the leader lease",
        Action::RestartPrimary => "restart postgres in place",
        Action::Promote { .. } => "promote",
        Action::Demote => "demote",
        Action::StepDown => "step down for a switchover",
        Action::Release => "release the leader key",
        Action::Failsafe => "keep the primary in failsafe",
        Action::Reacquire => "take the leader key back",
    }
}

fn role_state(pg: &PgState) -> (Role, &'static str) {
    match pg {
        PgState::NoData => (Role::Uninitialized, "uninitialized"),
        PgState::Stopped { down_since_ms: Some(_), .. } => (Role::Stopped, "crashed"),
        PgState::Stopped { .. } => (Role::Stopped, "stopped"),
        PgState::Starting { .. } => (Role::Stopped, "starting"),
        PgState::Running { role: PgRole::Primary, .. } => (Role::Primary, "running"),
        PgState::Running { role: PgRole::Replica, .. } => (Role::Replica, "running"),
    }
}

/// Whether a stopped data directory can follow the current leader's timeline as it is.
fn diverged(c: &ControlData, snap: &ClusterSnapshot) -> bool {
    let Some(last) = snap.history.last() else { return false };
    if last.timeline == c.timeline {
        return false;
    }
    match c.state.as_str() {
        // A replica's WAL is a prefix of its upstream's; recovery_target_timeline=latest
        // follows the switch.
        "in archive recovery" | "shut down in recovery" => false,
        // A cleanly stopped primary can follow if the new timeline forked after its shutdown
        // checkpoint (it was streamed before the switch).
        "shut down" => match &last.timeline_history {
            Some(text) => !pgkeel_pg::timeline::can_follow(
                &pgkeel_pg::timeline::parse_history(text),
                c.timeline,
                c.checkpoint_lsn + 1,
            ),
            None => true,
        },
        // Crashed while primary: its WAL end is unknown and may hold unreplicated writes; a
        // rewind costs little when nothing diverged.
        _ => true,
    }
}

fn cluster_view(s: &ClusterSnapshot) -> ClusterView {
    use pgkeel_ha::{FailoverRequest, Init, LeaderKey, Member};
    ClusterView {
        leader: s.leader.as_ref().map(|l| LeaderKey { holder: l.value.holder.clone(), term: l.value.term }),
        members: s
            .members
            .iter()
            .map(|m| Member {
                name: m.value.name.clone(),
                running_primary: m.value.role == Role::Primary && m.value.state == "running",
                running_replica: m.value.role == Role::Replica && m.value.state == "running",
            })
            .collect(),
        init: match &s.initialize {
            None => Init::None,
            Some(i) => match &i.value.sysid {
                Some(sysid) => Init::Done { sysid: sysid.clone() },
                None => Init::InProgress { by: i.value.bootstrapper.clone() },
            },
        },
        failover: s
            .failover
            .as_ref()
            .map(|f| FailoverRequest { leader: f.value.leader.clone(), candidate: f.value.candidate.clone() }),
        last_leader_lsn: s.status.as_ref().map(|x| x.last_lsn),
        sync_members: s.sync.as_ref().map(|x| x.value.members.clone()).unwrap_or_default(),
        sync_quorum: s
            .sync
            .as_ref()
            .map(|x| x.value.quorum.iter().map(|q| pgkeel_ha::QuorumSet { k: q.k, voters: q.voters.clone() }).collect())
            .unwrap_or_default(),
    }
}

/// Writes `content` to `path` with mode 0600, owned by `run_as` when given (replaced
/// atomically, so a reader never sees half a file).
fn write_private(path: &std::path::Path, content: &[u8], run_as: Option<&RunAs>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(content)?;
    f.sync_all()?;
    if let Some(r) = run_as {
        std::os::unix::fs::chown(&tmp, Some(r.uid), Some(r.gid))?;
    }
    std::fs::rename(&tmp, path)
}
