//! The cluster as the DCS sees it: who the primary is, under which term.
//!
//! One task watches the leader key ([`watch`]) and publishes a [`Topology`] on a
//! `tokio::sync::watch` channel. A leader change wakes the watch at once; while there is no
//! usable primary (no leader, or its member record does not yet say it runs as primary under
//! the leader's term) the task re-reads the cluster every 100 ms, so the new primary is picked
//! up as soon as its agent publishes it.

use std::sync::Arc;
use std::time::Duration;

use pgkeel_dcs::cluster::{ClusterSnapshot, ClusterStore, Role};
use pgkeel_dcs::Dcs;
use tokio::sync::watch;

/// The primary to route to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// Member name.
    pub name: String,
    /// `host:port` of its postgres.
    pub address: String,
    /// The term it leads under (its fencing token).
    pub term: u64,
}

/// A replica that may serve reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Member name.
    pub name: String,
    /// `host:port` of its postgres.
    pub address: String,
    /// Its replay LSN, as its agent last reported it.
    pub replayed_lsn: Option<u64>,
    /// Bytes of WAL it is behind the primary (the leader's reported LSN minus its replay
    /// LSN), when both are known.
    pub lag: Option<u64>,
    /// How far its replay is behind, in ms, as its agent last reported it (0 when it has
    /// replayed everything it received, else the age of the last transaction it replayed).
    pub lag_ms: Option<u64>,
}

/// What the proxy knows about the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// The newest term a leader held (leader key, promotion history). Server
    /// connections opened under an older term are never used again.
    pub newest_term: u64,
    /// The running primary, when there is one.
    pub primary: Option<Primary>,
    /// Why there is no usable primary, for error messages.
    pub why_none: Option<String>,
    /// Whether the DCS answered the last read.
    pub dcs_ok: bool,
    /// Running, streaming replicas that follow the leader's term, with their lag.
    pub replicas: Vec<Replica>,
    /// How many members the cluster has (any role or state).
    pub members: usize,
}

impl Topology {
    /// The oldest term an idle connection to the current primary may have been opened under
    /// to be used again (the newest term, or the primary's own if newer); `None` while no
    /// primary is known.
    pub fn reusable_term(&self) -> Option<u64> {
        self.primary.as_ref().map(|p| self.newest_term.max(p.term))
    }
}

/// The primary of a snapshot: the leader key's holder, once its member record says it runs as
/// primary under the leader's term.
pub fn from_snapshot(snap: &ClusterSnapshot) -> Topology {
    // Terms of leaders only (leader key, promotion history): the `term` counter can be ahead
    // of every leader when a candidate lost the race for the key, and no server will ever
    // run under that term.
    let newest_term = snap.leader.as_ref().map_or(0, |l| l.value.term).max(snap.history.last().map_or(0, |h| h.term));
    let members = snap.members.len();
    let Some(leader) = &snap.leader else {
        return Topology {
            newest_term,
            primary: None,
            why_none: Some("the cluster has no leader (a failover may be under way)".into()),
            dcs_ok: true,
            replicas: Vec::new(),
            members,
        };
    };
    let l = &leader.value;
    let (primary, why_none) = match snap.member(&l.holder) {
        Some(m) if m.role == Role::Primary && m.state == "running" && m.term >= l.term => {
            (Some(Primary { name: l.holder.clone(), address: m.pg_address.clone(), term: l.term }), None)
        }
        Some(m) => (
            None,
            Some(format!(
                "the leader {} (term {}) does not run as primary yet (role {}, state {}, term {})",
                l.holder,
                l.term,
                m.role.as_str(),
                m.state,
                m.term
            )),
        ),
        None => (None, Some(format!("the leader {} (term {}) has not published its member record", l.holder, l.term))),
    };
    let leader_lsn = snap.member(&l.holder).and_then(|m| m.lsn);
    let replicas = snap
        .members
        .iter()
        .map(|m| &m.value)
        .filter(|m| {
            m.name != l.holder && m.role == Role::Replica && m.state == "running" && m.streaming && m.term >= l.term
        })
        .map(|m| Replica {
            name: m.name.clone(),
            address: m.pg_address.clone(),
            replayed_lsn: m.replayed_lsn,
            lag: leader_lsn.zip(m.replayed_lsn).map(|(p, r)| p.saturating_sub(r)),
            lag_ms: m.replay_lag_ms,
        })
        .collect();
    Topology { newest_term, primary, why_none, dcs_ok: true, replicas, members }
}

/// Watches the cluster until `shutdown` turns true, publishing every change on `tx`.
pub async fn watch(store: ClusterStore, tx: watch::Sender<Topology>, mut shutdown: watch::Receiver<bool>) {
    let mut known_rev: Option<u64> = None;
    let mut last_error: Option<String> = None;
    loop {
        let wait = match store.load().await {
            Ok(snap) => {
                if last_error.take().is_some() {
                    tracing::info!("the DCS answers again");
                }
                known_rev = snap.leader.as_ref().map(|l| l.revision);
                let mut topo = from_snapshot(&snap);
                // Terms never go back, even if a read races a write.
                topo.newest_term = topo.newest_term.max(tx.borrow().newest_term);
                let usable = topo.primary.is_some();
                publish(&tx, topo);
                if usable {
                    Duration::from_secs(1)
                } else {
                    Duration::from_millis(100)
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "cannot read the cluster from the DCS; routing stays as it was");
                }
                last_error = Some(msg);
                tx.send_if_modified(|t| std::mem::replace(&mut t.dcs_ok, false));
                Duration::from_millis(500)
            }
        };
        let started = tokio::time::Instant::now();
        let watched = tokio::select! {
            _ = shutdown.changed() => return,
            r = store.watch_leader(known_rev, wait) => r,
        };
        // A watch that fails at once (etcd refusing connections, the local store's directory
        // gone) must not turn this loop into a busy one: wait out the interval.
        if watched.is_err() {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep_until(started + wait) => {}
            }
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

fn publish(tx: &watch::Sender<Topology>, topo: Topology) {
    tx.send_if_modified(|cur| {
        if *cur == topo {
            return false;
        }
        match (&cur.primary, &topo.primary) {
            (old, Some(p)) if old.as_ref() != Some(p) => {
                tracing::info!(primary = %p.name, address = %p.address, term = p.term, "routing to the primary")
            }
            (Some(old), None) => tracing::warn!(
                old = %old.name, term = old.term, why = topo.why_none.as_deref().unwrap_or(""),
                "no usable primary: new transactions wait for one"
            ),
            _ => {}
        }
        *cur = topo;
        true
    });
}

/// Opens the DCS described by `dcs`.
pub async fn open_dcs(dcs: &pgkeel_config::DcsConfig) -> anyhow::Result<Arc<dyn Dcs>> {
    use anyhow::Context as _;
    match dcs {
        pgkeel_config::DcsConfig::Local { path } => {
            let store = pgkeel_dcs::local::LocalStore::open(path)
                .with_context(|| format!("open the local store at {} (dcs.path)", path.display()))?;
            Ok(Arc::new(store))
        }
        pgkeel_config::DcsConfig::Etcd { endpoints } => {
            let store = pgkeel_dcs::etcd::EtcdStore::connect(endpoints.clone(), Duration::from_secs(2))
                .await
                .context("open the etcd DCS (dcs.endpoints)")?;
            Ok(Arc::new(store))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgkeel_dcs::cluster::{LeaderValue, MemberValue, Versioned};
    use pgkeel_dcs::{DcsError, DcsResult, KeyValue};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A DCS that refuses every call at once, as etcd with nothing listening does.
    #[derive(Debug, Default)]
    struct Refusing {
        calls: AtomicUsize,
        many: tokio::sync::Notify,
    }

    impl Refusing {
        async fn refuse<T>(&self) -> DcsResult<T> {
            if self.calls.fetch_add(1, Ordering::Relaxed) + 1 == 10 {
                self.many.notify_one();
            }
            tokio::task::yield_now().await;
            Err(DcsError::Unavailable("connection refused".into()))
        }
    }

    #[async_trait::async_trait]
    impl Dcs for Refusing {
        async fn get(&self, _: &str) -> DcsResult<Option<KeyValue>> {
            self.refuse().await
        }
        async fn list(&self, _: &str) -> DcsResult<Vec<KeyValue>> {
            self.refuse().await
        }
        async fn put(&self, _: &str, _: &[u8], _: Option<Duration>) -> DcsResult<u64> {
            self.refuse().await
        }
        async fn create(&self, _: &str, _: &[u8], _: Option<Duration>) -> DcsResult<Option<u64>> {
            self.refuse().await
        }
        async fn compare_and_set(&self, _: &str, _: &[u8], _: u64, _: Option<Duration>) -> DcsResult<Option<u64>> {
            self.refuse().await
        }
        async fn delete(&self, _: &str, _: Option<u64>) -> DcsResult<bool> {
            self.refuse().await
        }
        async fn watch(&self, _: &str, _: Option<u64>, _: Duration) -> DcsResult<Option<KeyValue>> {
            self.refuse().await
        }
        fn describe(&self) -> String {
            "refusing".into()
        }
    }

    /// A DCS that fails at once must not make the watcher a busy loop (it spun at 100 % CPU
    /// once the local store's directory was gone): its attempts are spaced by the retry
    /// interval (500 ms after an error), so 10 calls (two per attempt) take about 2 s, not
    /// microseconds.
    #[tokio::test]
    async fn an_unreachable_dcs_is_retried_without_spinning() {
        let dcs = Arc::new(Refusing::default());
        let (tx, rx) = watch::channel(Topology::default());
        let (stop, stopped) = watch::channel(false);
        let started = std::time::Instant::now();
        let task = tokio::spawn(super::watch(ClusterStore::new(dcs.clone(), "c"), tx, stopped));
        tokio::time::timeout(Duration::from_secs(20), dcs.many.notified()).await.expect("10 attempts within 20 s");
        let took = started.elapsed();
        stop.send_replace(true);
        task.await.expect("the watcher ends");
        assert!(took >= Duration::from_millis(1500), "10 DCS calls took {took:?}: the watcher spins");
        assert!(!rx.borrow().dcs_ok);
    }

    fn member(name: &str, role: Role, state: &str, term: u64) -> Versioned<MemberValue> {
        Versioned {
            value: MemberValue {
                name: name.into(),
                api_url: String::new(),
                pg_address: format!("{name}:5432"),
                role,
                state: state.into(),
                timeline: None,
                lsn: None,
                replayed_lsn: None,
                replay_lag_ms: None,
                streaming: false,
                following: None,
                term,
                tags: Default::default(),
                pending_restart: false,
                version: String::new(),
            },
            revision: 1,
            ttl_left: None,
        }
    }

    fn leader(holder: &str, term: u64) -> Option<Versioned<LeaderValue>> {
        Some(Versioned { value: LeaderValue { holder: holder.into(), term }, revision: 1, ttl_left: None })
    }

    #[test]
    fn the_primary_is_the_leader_once_it_runs_under_its_term() {
        let mut snap = ClusterSnapshot {
            leader: leader("n2", 3),
            members: vec![member("n1", Role::Replica, "running", 2), member("n2", Role::Replica, "running", 2)],
            ..Default::default()
        };
        let t = from_snapshot(&snap);
        assert_eq!(t.newest_term, 3);
        // A term handed out to a candidate that lost the race for the key is not a leader's.
        let mut lost_race = snap.clone();
        lost_race.term = Some(Versioned { value: 4, revision: 1, ttl_left: None });
        assert_eq!(from_snapshot(&lost_race).newest_term, 3);
        assert!(t.primary.is_none(), "still promoting");
        assert!(t.replicas.is_empty(), "n1 follows an older term");
        assert!(t.why_none.unwrap().contains("does not run as primary yet"));
        snap.members[1] = member("n2", Role::Primary, "running", 3);
        let t = from_snapshot(&snap);
        assert_eq!(t.primary, Some(Primary { name: "n2".into(), address: "n2:5432".into(), term: 3 }));
        // Replicas: running, streaming, under the leader's term; lag from the reported LSNs.
        snap.members[1].value.lsn = Some(1000);
        let mut r = member("n1", Role::Replica, "running", 3);
        r.value.streaming = true;
        r.value.replayed_lsn = Some(400);
        r.value.replay_lag_ms = Some(250);
        snap.members[0] = r.clone();
        let mut stopped = member("n3", Role::Replica, "stopped", 3);
        stopped.value.streaming = true;
        snap.members.push(stopped);
        let t = from_snapshot(&snap);
        assert_eq!(
            t.replicas,
            vec![Replica {
                name: "n1".into(),
                address: "n1:5432".into(),
                replayed_lsn: Some(400),
                lag: Some(600),
                lag_ms: Some(250)
            }]
        );
        assert_eq!(t.members, 3);
        r.value.streaming = false;
        snap.members[0] = r;
        assert!(from_snapshot(&snap).replicas.is_empty(), "not streaming");
        snap.leader = None;
        let t = from_snapshot(&snap);
        assert!(t.primary.is_none());
        assert!(t.why_none.unwrap().contains("no leader"));
    }
}
