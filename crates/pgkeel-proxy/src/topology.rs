//! The cluster as the DCS sees it: who the primary is, under which term.
//!
//! One task watches the leader key ([`watch`]) and publishes a [`Topology`] on a
//! `tokio::sync::watch` channel. A leader change wakes the watch at once; while there is no
//! usable primary (no leader, or its member record does not yet say it runs as primary under
//! the leader's term) the task re-reads the cluster every 100 ms, so the new primary is picked
//! up as soon as its agent publishes it.

use std::sync::Arc;
use std::time::Duration;

use pgkeel_dcs::cluster::{ClusterSnapshot, ClusterStore, Role, RoutingView};
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
    /// Their names, sorted: a member whose record expired (its agent stopped publishing:
    /// its machine is down or cut off) is missing.
    pub member_names: Vec<String>,
}

impl Topology {
    /// Whether member `name` has a record in the cluster.
    pub fn has_member(&self, name: &str) -> bool {
        self.member_names.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
    }
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
    from_view(&snap.routing_view(""))
}

/// [`from_snapshot`] of the view an agent serves (`GET /routing`).
pub fn from_view(view: &RoutingView) -> Topology {
    // Terms of leaders only (leader key, promotion history): the `term` counter can be ahead
    // of every leader when a candidate lost the race for the key, and no server will ever
    // run under that term.
    let newest_term = view.leader_term;
    let members = view.members.len();
    let mut member_names: Vec<String> = view.members.iter().map(|m| m.name.clone()).collect();
    member_names.sort_unstable();
    let member = |name: &str| view.members.iter().find(|m| m.name == name);
    let Some(l) = &view.leader else {
        return Topology {
            newest_term,
            primary: None,
            why_none: Some("the cluster has no leader (a failover may be under way)".into()),
            dcs_ok: true,
            replicas: Vec::new(),
            members,
            member_names,
        };
    };
    let (primary, why_none) = match member(&l.holder) {
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
    let leader_lsn = member(&l.holder).and_then(|m| m.lsn);
    let replicas = view
        .members
        .iter()
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
    Topology { newest_term, primary, why_none, dcs_ok: true, replicas, members, member_names }
}

/// How long a read of the DCS may take before the agents are asked instead: a DCS that
/// answers at all answers in milliseconds.
const RELAY_AFTER: Duration = Duration::from_millis(500);

/// How long one agent may take to answer `GET /routing` (it reads the DCS itself).
const AGENT_TIMEOUT: Duration = Duration::from_secs(1);

/// The largest `GET /routing` answer read (a cluster's member records are a few KB).
const AGENT_ANSWER_MAX: usize = 1 << 20;

/// The cluster through the agents, while the proxy cannot read the DCS itself (a partition
/// between the proxy and the DCS, not the database hosts): every agent that reaches the DCS
/// serves what it reads there at `GET /routing`, so a failover is followed as the DCS records
/// it. The agents are the members' `api_url`s from the last view.
struct Relay {
    cluster: String,
    agents: Vec<String>,
    /// While the DCS is silent: when the agents are asked next.
    due: Option<tokio::time::Instant>,
    /// The agent whose view was published last, while the DCS is silent (`None`: routing
    /// from the DCS).
    from: Option<String>,
    /// The last failure to get a view from any agent (logged once).
    failed: Option<String>,
}

impl Relay {
    /// Takes the members' `api_url`s as the agents to ask (unless there are none).
    fn learn<'a>(&mut self, members: impl Iterator<Item = &'a pgkeel_dcs::cluster::MemberValue>) {
        let agents: Vec<String> = members.map(|m| m.api_url.clone()).filter(|u| !u.is_empty()).collect();
        if !agents.is_empty() {
            self.agents = agents;
        }
    }

    /// The DCS answered: routing is its again.
    fn dcs_answered(&mut self) {
        self.due = None;
        self.failed = None;
        if self.from.take().is_some() {
            tracing::info!("routing from the DCS again");
        }
    }

    /// Runs `work` (a call to the DCS) to its end. When it has not ended by `start` (and
    /// whenever due after that), asks the agents and publishes the first view one gives.
    async fn alongside<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
        start: tokio::time::Instant,
        tx: &watch::Sender<Topology>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<T> {
        let mut work = std::pin::pin!(work);
        loop {
            let due = self.due.unwrap_or(start);
            tokio::select! {
                _ = shutdown.changed() => return None,
                r = &mut work => return Some(r),
                _ = tokio::time::sleep_until(due), if !self.agents.is_empty() => {
                    let usable = self.ask(tx).await;
                    let every = if usable { Duration::from_secs(1) } else { Duration::from_millis(100) };
                    self.due = Some(tokio::time::Instant::now() + every);
                }
            }
        }
    }

    /// Asks every agent at once; publishes the first view an agent of this cluster gives.
    /// Whether that view has a usable primary.
    async fn ask(&mut self, tx: &watch::Sender<Topology>) -> bool {
        let mut set = tokio::task::JoinSet::new();
        for url in &self.agents {
            let url = url.clone();
            set.spawn(async move {
                let r = tokio::time::timeout(AGENT_TIMEOUT, fetch_view(&url)).await;
                (url, r.unwrap_or_else(|_| Err(format!("no answer within {AGENT_TIMEOUT:?}"))))
            });
        }
        let mut errors = Vec::new();
        while let Some(done) = set.join_next().await {
            let Ok((url, r)) = done else { continue };
            match r {
                Ok(view) if view.cluster == self.cluster => {
                    let mut topo = from_view(&view);
                    topo.dcs_ok = false;
                    topo.newest_term = topo.newest_term.max(tx.borrow().newest_term);
                    let usable = topo.primary.is_some();
                    // Which agent answers first changes from round to round: said once.
                    if self.from.is_none() {
                        tracing::warn!(agent = %url, "the DCS does not answer: routing from what an agent reads there");
                    }
                    self.from = Some(url);
                    self.failed = None;
                    self.learn(view.members.iter());
                    publish(tx, topo);
                    return usable;
                }
                Ok(view) => errors.push(format!("{url}: serves cluster {:?}, not {:?}", view.cluster, self.cluster)),
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        errors.sort();
        let msg = errors.join("; ");
        if self.failed.as_deref() != Some(msg.as_str()) {
            tracing::warn!(errors = %msg, "the DCS does not answer, and no agent gave the cluster's view either; routing stays as it was");
        }
        self.failed = Some(msg);
        tx.borrow().primary.is_some()
    }
}

/// `GET {api_url}/routing`: an agent's [`RoutingView`] (plain HTTP, as the agents serve it).
async fn fetch_view(api_url: &str) -> Result<RoutingView, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let authority = api_url
        .strip_prefix("http://")
        .ok_or_else(|| format!("api_url {api_url:?} is not http://HOST:PORT"))?
        .trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(format!("api_url {api_url:?} is not http://HOST:PORT"));
    }
    let mut stream = tokio::net::TcpStream::connect(authority).await.map_err(|e| format!("cannot connect: {e}"))?;
    let request =
        format!("GET /routing HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: pgkeel-proxy\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    let read = (&mut stream).take(AGENT_ANSWER_MAX as u64 + 1).read_to_end(&mut answer).await;
    read.map_err(|e| format!("read: {e}"))?;
    if answer.len() > AGENT_ANSWER_MAX {
        return Err(format!("the answer is larger than {AGENT_ANSWER_MAX} bytes"));
    }
    parse_view(&answer)
}

/// The [`RoutingView`] in an HTTP/1.1 answer read to its end (`Connection: close`).
fn parse_view(answer: &[u8]) -> Result<RoutingView, String> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or("the answer has no end of headers")?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| "the answer's headers are not UTF-8")?;
    let mut body = &answer[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split(' ').nth(1).unwrap_or_default();
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        if name.eq_ignore_ascii_case("transfer-encoding") && !value.trim().eq_ignore_ascii_case("identity") {
            return Err(format!("unexpected transfer-encoding {:?}", value.trim()));
        }
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>().map_err(|_| format!("bad content-length {:?}", value.trim()))?);
        }
    }
    if let Some(n) = length {
        body = body.get(..n).ok_or("the answer ended before its content-length")?;
    }
    if code != "200" {
        let text = String::from_utf8_lossy(body);
        return Err(format!("{status}: {}", text.trim()));
    }
    serde_json::from_slice(body).map_err(|e| format!("not a routing view: {e}"))
}

/// Watches the cluster until `shutdown` turns true, publishing every change on `tx`. While
/// the DCS does not answer, the cluster is read through the agents ([`Relay`]).
pub async fn watch(store: ClusterStore, tx: watch::Sender<Topology>, mut shutdown: watch::Receiver<bool>) {
    let mut last_error: Option<String> = None;
    let mut relay =
        Relay { cluster: store.cluster().to_string(), agents: Vec::new(), due: None, from: None, failed: None };
    loop {
        let start = tokio::time::Instant::now() + RELAY_AFTER;
        let Some(loaded) = relay.alongside(store.load(), start, &tx, &mut shutdown).await else { return };
        let (wait, known_rev) = match loaded {
            Ok(snap) => {
                if last_error.take().is_some() {
                    tracing::info!("the DCS answers again");
                }
                relay.dcs_answered();
                relay.learn(snap.members.iter().map(|m| &m.value));
                let known_rev = snap.leader.as_ref().map(|l| l.revision);
                let mut topo = from_snapshot(&snap);
                // Terms never go back, even if a read races a write.
                topo.newest_term = topo.newest_term.max(tx.borrow().newest_term);
                let usable = topo.primary.is_some();
                publish(&tx, topo);
                (if usable { Duration::from_secs(1) } else { Duration::from_millis(100) }, known_rev)
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "cannot read the cluster from the DCS");
                }
                last_error = Some(msg);
                tx.send_if_modified(|t| std::mem::replace(&mut t.dcs_ok, false));
                // The agents at once (unless asked lately), then on their schedule.
                let now = tokio::time::Instant::now();
                relay.due.get_or_insert(now);
                let pause = tokio::time::sleep(Duration::from_millis(500));
                if relay.alongside(pause, now, &tx, &mut shutdown).await.is_none() {
                    return;
                }
                continue;
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

    /// A DCS that answers the first read of the cluster with `first`, then never again (a
    /// partition between the proxy and the DCS).
    #[derive(Debug)]
    struct GoesSilent {
        first: std::sync::Mutex<Option<Vec<KeyValue>>>,
    }

    #[async_trait::async_trait]
    impl Dcs for GoesSilent {
        async fn get(&self, _: &str) -> DcsResult<Option<KeyValue>> {
            std::future::pending().await
        }
        async fn list(&self, _: &str) -> DcsResult<Vec<KeyValue>> {
            let first = self.first.lock().unwrap().take();
            match first {
                Some(kvs) => Ok(kvs),
                None => std::future::pending().await,
            }
        }
        async fn put(&self, _: &str, _: &[u8], _: Option<Duration>) -> DcsResult<u64> {
            std::future::pending().await
        }
        async fn create(&self, _: &str, _: &[u8], _: Option<Duration>) -> DcsResult<Option<u64>> {
            std::future::pending().await
        }
        async fn compare_and_set(&self, _: &str, _: &[u8], _: u64, _: Option<Duration>) -> DcsResult<Option<u64>> {
            std::future::pending().await
        }
        async fn delete(&self, _: &str, _: Option<u64>) -> DcsResult<bool> {
            std::future::pending().await
        }
        async fn watch(&self, _: &str, _: Option<u64>, timeout: Duration) -> DcsResult<Option<KeyValue>> {
            tokio::time::sleep(timeout).await;
            Ok(None)
        }
        fn describe(&self) -> String {
            "goes silent".into()
        }
    }

    fn kv(key: &str, value: &impl serde::Serialize) -> KeyValue {
        KeyValue {
            key: format!("/pgkeel/c/{key}"),
            value: serde_json::to_vec(value).unwrap(),
            create_revision: 1,
            mod_revision: 1,
            ttl_left: None,
        }
    }

    /// Serves `GET /routing` with `views`' next entry (the last one over and over), as an
    /// agent does; the requests' first lines go to `seen`.
    async fn agent(views: Vec<String>) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut req = vec![0u8; 4096];
                let got = s.read(&mut req).await.unwrap();
                let line = String::from_utf8_lossy(&req[..got]).lines().next().unwrap_or_default().to_string();
                log.lock().unwrap().push(line);
                let body = &views[n.min(views.len() - 1)];
                n += 1;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        (url, seen)
    }

    fn view(cluster: &str, leader: &str, term: u64, api_url: &str) -> String {
        let members = ["n1", "n2"]
            .iter()
            .map(|n| {
                let role = if *n == leader { Role::Primary } else { Role::Replica };
                let mut m = member(n, role, "running", term).value;
                m.api_url = api_url.to_string();
                m
            })
            .collect();
        let v = RoutingView {
            cluster: cluster.into(),
            leader: Some(LeaderValue { holder: leader.into(), term }),
            leader_term: term,
            members,
        };
        serde_json::to_string(&v).unwrap()
    }

    /// The next topology `rx` sees with primary `name` under `term` (10 s at most).
    async fn until(rx: &mut watch::Receiver<Topology>, name: &str, term: u64) -> Option<Topology> {
        let found = rx.wait_for(|t| t.primary.as_ref().is_some_and(|p| p.name == name && p.term == term));
        tokio::time::timeout(Duration::from_secs(10), found).await.ok()?.ok().map(|t| t.clone())
    }

    /// The DCS goes silent after the first read; the agents still read it: the proxy follows
    /// a failover through them (`GET /routing`), marks the DCS as not answering, ignores an
    /// agent of another cluster, and never lets the newest term go back.
    #[tokio::test]
    async fn a_silent_dcs_is_read_through_the_agents() {
        let (url, seen) = agent(vec![
            view("other", "n1", 9, ""),
            view("c", "n1", 4, ""),
            view("c", "n2", 5, ""),
            view("c", "n1", 3, ""),
        ])
        .await;
        let mut n1 = member("n1", Role::Primary, "running", 4);
        n1.value.api_url = url.clone();
        let first = vec![kv("leader", &LeaderValue { holder: "n1".into(), term: 4 }), kv("members/n1", &n1.value)];
        let dcs = Arc::new(GoesSilent { first: std::sync::Mutex::new(Some(first)) });
        let (tx, mut rx) = watch::channel(Topology::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(super::watch(ClusterStore::new(dcs, "c"), tx, stopped));
        let t = until(&mut rx, "n1", 4).await.expect("the DCS's first answer");
        assert!(t.dcs_ok);
        let t = until(&mut rx, "n2", 5).await.expect("n2 through the agent within 10 s");
        assert!(!t.dcs_ok, "the DCS does not answer");
        assert_eq!(t.newest_term, 5);
        // The agent's next answers name n1 under the older term 3: published, but the newest
        // term stays 5, so connections to n1 under 3 are fenced.
        let t = until(&mut rx, "n1", 3).await.expect("the last view");
        assert_eq!(t.newest_term, 5, "terms never go back");
        assert_eq!(t.reusable_term(), Some(5));
        stop.send_replace(true);
        task.await.unwrap();
        let seen = seen.lock().unwrap();
        assert!(seen.iter().all(|l| l.starts_with("GET /routing HTTP/1.1")), "{seen:?}");
    }

    #[test]
    fn agent_answers_are_parsed_strictly() {
        let body = view("c", "n2", 5, "");
        let ok = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}trailing", body.len());
        let v = parse_view(ok.as_bytes()).unwrap();
        assert_eq!(v.leader.unwrap().holder, "n2");
        let e =
            parse_view(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 23\r\n\r\n{\"error\":\"cannot read\"}xx")
                .unwrap_err();
        assert!(e.contains("503") && e.contains("cannot read"), "{e}");
        let e = parse_view(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello").unwrap_err();
        assert!(e.contains("chunked"), "{e}");
        assert!(parse_view(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{}").unwrap_err().contains("ended before"));
        assert!(parse_view(b"HTTP/1.1 200 OK\r\n").unwrap_err().contains("no end of headers"));
        assert!(parse_view(b"HTTP/1.1 200 OK\r\n\r\n{\"x\":1}").unwrap_err().contains("not a routing view"));
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
        assert!(t.has_member("n1") && t.has_member("n3") && !t.has_member("n4"));
        r.value.streaming = false;
        snap.members[0] = r;
        assert!(from_snapshot(&snap).replicas.is_empty(), "not streaming");
        snap.leader = None;
        let t = from_snapshot(&snap);
        assert!(t.primary.is_none());
        assert!(t.why_none.unwrap().contains("no leader"));
    }
}
