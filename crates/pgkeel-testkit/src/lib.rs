//! Test clusters for behaviour tests: a real `pgkeel up --detach` cluster in its own temp
//! directory on free ports, with real postgres processes, torn down on drop (agents and
//! postgres included) even when the test panics.
//!
//! Waiting is always on a condition with a deadline ([`wait_for`]), never on a fixed sleep.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeel_agent::http::{request, Auth, Response};
use serde_json::Value;

pub mod ipc;
pub mod netns;
mod reaper;

/// Poll `f` every 100 ms until it returns `Some`, or panic after `timeout` naming `what` and
/// the line of the test that waited (a plain function returning the wait, so that
/// `#[track_caller]` sees the caller: the panic itself is raised here).
#[track_caller]
pub fn wait_for<'a, T, F, Fut>(what: &'a str, timeout: Duration, mut f: F) -> impl Future<Output = T> + 'a
where
    F: FnMut() -> Fut + 'a,
    Fut: Future<Output = Option<T>> + 'a,
    T: 'a,
{
    let caller = std::panic::Location::caller();
    async move {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what} (the wait at {caller})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub use pgkeel_pg::process::alive;

/// Send a signal.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: sending a signal has no memory-safety implications.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The pid on the first line of a pid file (`agent.pid`, `postmaster.pid`, ...).
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.lines().next()?.trim().parse().ok()
}

/// SIGKILLs the processes of the cluster in `dir` that are still alive, from their pid files:
/// each node's agent, postmaster and guard, and the proxy `pgkeel up` started. Then releases
/// the shared memory of the postmasters that were killed (by the test or here), which postgres
/// would otherwise leave in the kernel ([`ipc`]).
fn kill_cluster_processes(dir: &Path) {
    let mut pids = Vec::new();
    let nodes: Vec<PathBuf> =
        std::fs::read_dir(dir.join("nodes")).into_iter().flatten().flatten().map(|n| n.path()).collect();
    for n in &nodes {
        pids.extend(read_pid(&n.join("agent.pid")));
        pids.extend(pgkeel_pg::process::postmaster_pid(&n.join("data")));
        pids.extend(read_pid(&n.join("guard.pid")));
    }
    pids.extend(read_pid(&dir.join("proxy.pid")));
    for p in pids.into_iter().filter(|p| *p > 1 && alive(*p)) {
        signal(p, libc::SIGKILL);
    }
    // `data`, and any directory a node moved aside (`data.old` before a fresh clone).
    let dirs: Vec<PathBuf> = nodes
        .iter()
        .flat_map(|n| std::fs::read_dir(n).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    ipc::release_leftovers(&dirs);
}

/// What to do for a cluster in `dir` when the test process is ended by a signal (see
/// [`reaper`]): kill its processes and remove the directory.
fn reap_cluster(dir: &Path) -> reaper::Registration {
    let dir = dir.to_path_buf();
    reaper::register(move || {
        kill_cluster_processes(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    })
}

/// A cluster started with `pgkeel up --detach`.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Parsed `up.json`.
    pub info: Value,
    extra: Vec<Child>,
    foreground: Option<Child>,
    /// The etcd cluster holding this cluster's state, when it runs on etcd; stopped after
    /// the agents (fields drop after `Drop::drop` ran the teardown).
    pub etcd: Option<pgkeel_dcs::testing::EtcdCluster>,
    /// Network namespace of each node, when the nodes run on [`netns`] hosts.
    netns: std::collections::HashMap<String, String>,
    /// The last `/cluster` answer seen, printed last when a test fails.
    last_seen: std::sync::Mutex<Option<(Instant, String)>>,
    /// Kills the processes if the test process is ended by a signal (no `Drop` then).
    _reaper: reaper::Registration,
}

impl Cluster {
    /// Start a real etcd cluster of `etcd_members` and an `nodes`-member pgkeel cluster on it.
    pub async fn up_on_etcd(bin: &Path, nodes: u16, etcd_members: usize) -> Cluster {
        let etcd =
            pgkeel_dcs::testing::EtcdCluster::start(etcd_members).await.unwrap_or_else(|e| panic!("start etcd: {e}"));
        let urls = etcd.client_urls().join(",");
        let mut c = Cluster::up_with(bin, nodes, &["--etcd", &urls]).await;
        c.etcd = Some(etcd);
        c
    }

    /// Start an `nodes`-member cluster with the `pgkeel` binary at `bin` and wait until every
    /// member streams.
    pub async fn up(bin: &Path, nodes: u16) -> Cluster {
        Cluster::up_with(bin, nodes, &[]).await
    }

    /// [`Cluster::up`] with extra `pgkeel up` arguments.
    pub async fn up_with(bin: &Path, nodes: u16, extra: &[&str]) -> Cluster {
        record_panics();
        let dir = tempfile::Builder::new().prefix("pgkeel-test-").tempdir().expect("create a temp dir");
        // postgres runs as the `postgres` OS user when tests run as root: it must enter the dir.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod the temp dir");
        let reaper = reap_cluster(dir.path());
        let mut c = Cluster {
            dir,
            bin: bin.to_path_buf(),
            info: Value::Null,
            extra: Vec::new(),
            foreground: None,
            etcd: None,
            netns: Default::default(),
            last_seen: Default::default(),
            _reaper: reaper,
        };
        let mut args = vec!["up", "--detach", "--dir"];
        let dir = c.dir_str();
        let n = nodes.to_string();
        args.extend([dir.as_str(), "--nodes", n.as_str()]);
        args.extend(extra);
        let out = c.cli(&args);
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            c.dump_logs();
            panic!("pgkeel up failed ({}):\n{text}", out.status);
        }
        let up = std::fs::read_to_string(c.dir.path().join("up.json")).expect("up.json written");
        c.info = serde_json::from_str(&up).expect("up.json parses");
        c
    }

    /// Start `pgkeel up` in the foreground (as a user would, status line on stdout) and wait
    /// until every member streams.
    pub async fn up_foreground(bin: &Path, nodes: u16) -> Cluster {
        record_panics();
        let dir = tempfile::Builder::new().prefix("pgkeel-test-").tempdir().expect("create a temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod the temp dir");
        let out = std::fs::File::create(dir.path().join("up.out")).expect("create up.out");
        let child = Command::new(bin)
            .args(["up", "--nodes", &nodes.to_string(), "--dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone"))
            .stderr(out)
            .spawn()
            .expect("start pgkeel up");
        let reaper = reap_cluster(dir.path());
        let mut c = Cluster {
            dir,
            bin: bin.to_path_buf(),
            info: Value::Null,
            extra: Vec::new(),
            foreground: Some(child),
            etcd: None,
            netns: Default::default(),
            last_seen: Default::default(),
            _reaper: reaper,
        };
        let path = c.dir().join("up.json");
        c.info = wait_for("up.json", Duration::from_secs(30), || {
            let path = path.clone();
            async move { serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok() }
        })
        .await;
        wait_for("every member streaming", Duration::from_secs(60), || async {
            let v = c.cluster_json().await?;
            let ms = v["members"].as_array()?;
            (ms.len() == nodes as usize && ms.iter().all(|m| m["state"] == "streaming" || m["role"] == "leader"))
                .then_some(())
        })
        .await;
        c
    }

    /// Send `sig` (SIGINT for Ctrl-C, SIGHUP for a closed terminal) to a foreground `up` and
    /// wait for it to exit; returns whether it exited successfully, and what it printed.
    pub async fn interrupt_foreground(&mut self, sig: i32) -> (bool, String) {
        let mut child = self.foreground.take().expect("started with up_foreground");
        signal(child.id() as i32, sig);
        let status = wait_for("pgkeel up to exit after the signal", Duration::from_secs(60), || {
            let r = child.try_wait().ok().flatten();
            async move { r }
        })
        .await;
        (status.success(), std::fs::read_to_string(self.dir().join("up.out")).unwrap_or_default())
    }

    /// A cluster whose `up.json`-style `info` and node directories were written by the
    /// caller (e.g. [`netns::NetCluster`]); agents start inside `netns[name]` when given.
    pub fn from_parts(
        dir: tempfile::TempDir,
        bin: &Path,
        info: Value,
        netns: std::collections::HashMap<String, String>,
    ) -> Cluster {
        record_panics();
        let reaper = reap_cluster(dir.path());
        Cluster {
            dir,
            bin: bin.to_path_buf(),
            info,
            extra: Vec::new(),
            foreground: None,
            etcd: None,
            netns,
            last_seen: Default::default(),
            _reaper: reaper,
        }
    }

    /// The cluster directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn dir_str(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Run the pgkeel binary with `args` (no `--dir` added).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin).args(args).stdin(Stdio::null()).output().expect("run pgkeel")
    }

    /// Run an operator command against this cluster (`--dir` appended).
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut a: Vec<&str> = args.to_vec();
        let d = self.dir_str();
        a.extend(["--dir", &d]);
        Command::new(&self.bin).args(&a).stdin(Stdio::null()).output().expect("run pgkeel")
    }

    /// Member names.
    pub fn nodes(&self) -> Vec<String> {
        self.info["nodes"]
            .as_array()
            .map(|ns| ns.iter().filter_map(|n| n["name"].as_str().map(String::from)).collect())
            .unwrap_or_default()
    }

    fn node(&self, name: &str) -> &Value {
        self.info["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == name))
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// DSN of one member's postgres.
    pub fn node_dsn(&self, name: &str) -> String {
        self.node(name)["dsn"].as_str().expect("dsn").to_string()
    }

    /// Multi-host read-write DSN.
    pub fn primary_dsn(&self) -> String {
        self.info["primary_dsn"].as_str().expect("primary_dsn").to_string()
    }

    /// REST URL of one member.
    pub fn api_url(&self, name: &str) -> String {
        self.node(name)["api_url"].as_str().expect("api_url").to_string()
    }

    /// REST credentials.
    pub fn auth(&self) -> Auth {
        Auth {
            username: self.info["api"]["username"].as_str().unwrap_or("pgkeel").into(),
            password: self.info["api"]["password"].as_str().unwrap_or("").into(),
        }
    }

    /// One REST call to a member.
    pub async fn api(&self, name: &str, method: &str, path: &str, body: Option<&Value>, auth: bool) -> Response {
        let a = self.auth();
        request(method, &format!("{}{path}", self.api_url(name)), body, auth.then_some(&a), Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{method} {path} on {name}: {e:#}"))
    }

    /// `/cluster` from the first member that answers.
    pub async fn cluster_json(&self) -> Option<Value> {
        for n in self.nodes() {
            if let Ok(r) =
                request("GET", &format!("{}/cluster", self.api_url(&n)), None, None, Duration::from_secs(2)).await
            {
                if r.status == 200 {
                    let v: Option<Value> = r.json().ok();
                    if let Some(v) = &v {
                        *self.last_seen.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some((Instant::now(), v.to_string()));
                    }
                    return v;
                }
            }
        }
        None
    }

    /// The leader, once it runs as primary.
    pub async fn leader(&self) -> Option<(String, u64)> {
        let v = self.cluster_json().await?;
        let name = v["leader"].as_str()?.to_string();
        let m = v["members"].as_array()?.iter().find(|m| m["name"] == name.as_str())?.clone();
        (m["role"] == "leader" && m["state"] == "running").then(|| (name, v["term"].as_u64().unwrap_or(0)))
    }

    /// Wait until every member in `names` streams from the current leader `leader`.
    pub async fn wait_streaming(&self, leader: &str, names: &[String], timeout: Duration) {
        let what = format!("{names:?} streaming from {leader}");
        wait_for(&what, timeout, || async {
            let v = self.cluster_json().await?;
            let ok = names.iter().all(|n| {
                v["members"].as_array().is_some_and(|ms| {
                    ms.iter().any(|m| m["name"] == n.as_str() && m["state"] == "streaming" && m["following"] == leader)
                })
            });
            ok.then_some(())
        })
        .await
    }

    /// The leader and the first other member, once that one streams from the leader (at most
    /// `timeout`): for tests of a two-node cluster.
    pub async fn leader_and_replica(&self, timeout: Duration) -> (String, String) {
        let (leader, _) = self.leader().await.expect("a leader");
        let replica = self.nodes().into_iter().find(|n| *n != leader).expect("a member besides the leader");
        self.wait_streaming(&leader, std::slice::from_ref(&replica), timeout).await;
        (leader, replica)
    }

    /// Pid of a member's agent.
    pub fn agent_pid(&self, name: &str) -> Option<i32> {
        read_pid(&self.dir().join("nodes").join(name).join("agent.pid")).filter(|p| alive(*p))
    }

    /// Pid of a member's postmaster.
    pub fn postmaster_pid(&self, name: &str) -> Option<i32> {
        pgkeel_pg::process::postmaster_pid(&self.dir().join("nodes").join(name).join("data"))
    }

    /// SIGKILL a member's agent.
    pub fn kill_agent(&self, name: &str) {
        let pid = self.agent_pid(name).unwrap_or_else(|| panic!("agent of {name} is not running"));
        signal(pid, libc::SIGKILL);
    }

    /// SIGKILL a member's postmaster.
    pub fn kill_postgres(&self, name: &str) {
        let pid = self.postmaster_pid(name).unwrap_or_else(|| panic!("postgres of {name} is not running"));
        signal(pid, libc::SIGKILL);
    }

    /// Lose a member's whole node: SIGKILL its agent and its postmaster together.
    pub fn kill_node(&self, name: &str) {
        self.kill_agent(name);
        self.kill_postgres(name);
    }

    /// Wait until a member other than `old` leads (running as primary); its name and term.
    pub async fn wait_new_leader(&self, old: &str, timeout: Duration) -> (String, u64) {
        wait_for(&format!("a new leader instead of {old}"), timeout, || async {
            self.leader().await.filter(|(n, _)| n != old)
        })
        .await
    }

    /// Start a member's agent again (after it was killed).
    pub fn start_agent(&mut self, name: &str) {
        let node_dir = self.dir().join("nodes").join(name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node_dir.join("agent.log"))
            .expect("open agent.log");
        let mut cmd = match self.netns.get(name) {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = cmd
            .arg("agent")
            .arg("--config")
            .arg(node_dir.join("node.toml"))
            .arg("--pid-file")
            .arg(node_dir.join("agent.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("start agent");
        self.extra.push(child);
    }

    /// Wait until `node` holds at least `n` rows of table `acked` written under `term`.
    pub async fn wait_writes_under_term(&self, node: &str, term: u64, n: i64) {
        let dsn = self.node_dsn(node);
        wait_for(&format!("{n} writes under term {term} on {node}"), Duration::from_secs(30), || {
            let dsn = dsn.clone();
            async move {
                (psql(&dsn, &format!("select count(*) from acked where term = {term}")).ok()?.parse::<i64>().ok()? >= n)
                    .then_some(())
            }
        })
        .await
    }

    /// How many of the writes `report` saw acknowledged are missing from `acked` on `node`.
    pub fn missing_acked(&self, node: &str, report: &WriterReport) -> i64 {
        let ids: Vec<String> = report.acked.iter().map(|a| a.id.to_string()).collect();
        let sql = format!(
            "select count(*) from unnest(array[{}]::bigint[]) a(id) where not exists (select 1 from acked where acked.id = a.id)",
            ids.join(",")
        );
        psql(&self.node_dsn(node), &sql).expect("count missing rows").parse().expect("a number")
    }

    /// Asynchronous replication may lose the commits the old primary acknowledged but had not
    /// streamed yet when it died: assert that only writes acknowledged within `window` before
    /// `killed_unix_ms` are missing from `node`, and return how many are.
    pub fn assert_only_in_flight_lost(
        &self,
        node: &str,
        report: &WriterReport,
        killed_unix_ms: u64,
        window: Duration,
    ) -> usize {
        let ids: Vec<String> = report.acked.iter().map(|a| a.id.to_string()).collect();
        let sql = format!(
            "select string_agg(a.id::text, ',') from unnest(array[{}]::bigint[]) a(id) where not exists (select 1 from acked where acked.id = a.id)",
            ids.join(",")
        );
        let out = psql(&self.node_dsn(node), &sql).expect("list missing rows");
        let missing: Vec<i64> = out.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        let cutoff = killed_unix_ms.saturating_sub(window.as_millis() as u64);
        let old: Vec<&Ack> = report.acked.iter().filter(|a| missing.contains(&a.id) && a.unix_ms < cutoff).collect();
        assert!(
            old.is_empty(),
            "acknowledged writes older than {window:?} before the kill were lost (asynchronous replication only loses what was in flight): {old:?}"
        );
        if !missing.is_empty() {
            eprintln!(
                "{} acknowledged writes in flight at the kill were lost (asynchronous replication)",
                missing.len()
            );
        }
        missing.len()
    }

    /// When `node` was promoted under `term` (unix ms), from the history.
    pub async fn promotion_time(&self, node: &str, term: u64) -> u64 {
        let hist = self.api(node, "GET", "/history", None, false).await.json().expect("history is JSON");
        let entry = hist.as_array().and_then(|h| h.iter().find(|e| e["term"] == term)).cloned();
        let entry = entry.unwrap_or_else(|| panic!("no history entry for term {term}: {hist}"));
        assert_eq!(entry["new_primary"], node);
        entry["time_ms"].as_u64().expect("time_ms")
    }

    /// Create table `acked` on the primary `old`, then start two writers: one through the
    /// multi-host DSN (it follows failovers) and one pinned to `old`; returns once both wrote.
    pub async fn start_writers(&self, old: &str) -> (Writer, Writer) {
        psql(&self.node_dsn(old), "create table acked(id bigint primary key, term bigint not null)")
            .expect("create acked");
        let multi = Writer::start(self.primary_dsn(), Duration::from_millis(50));
        let pinned_dsn = self.node_dsn(old);
        let sep = if pinned_dsn.contains('?') { '&' } else { '?' };
        let pinned =
            Writer::start_at(format!("{pinned_dsn}{sep}connect_timeout=1"), Duration::from_millis(50), PINNED_IDS);
        let dsn = self.node_dsn(old);
        wait_for("writes from both writers", Duration::from_secs(15), || {
            let dsn = dsn.clone();
            async move {
                let sql = format!("select count(*) filter (where id > {PINNED_IDS}) * count(*) filter (where id < {PINNED_IDS}) from acked");
                (psql(&dsn, &sql).ok()?.parse::<i64>().ok()? > 0).then_some(())
            }
        })
        .await;
        (multi, pinned)
    }

    /// Print the end of every agent, postgres and guard log (for failing tests).
    pub fn dump_logs(&self) {
        for n in std::fs::read_dir(self.dir().join("nodes")).into_iter().flatten().flatten() {
            for (file, lines) in [("agent.log", 40), ("postgres.log", 40), ("guard.log", 5)] {
                let p = n.path().join(file);
                if let Ok(text) = std::fs::read_to_string(&p) {
                    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
                    eprintln!("==== {} (last {lines} lines)", p.display());
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        // Last, so that they survive when only the end of the output is kept.
        if let Some((at, json)) = self.last_seen.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            eprintln!("==== last /cluster answer ({:?} before this dump): {json}", at.elapsed());
        }
        if let Some(p) = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            eprintln!("==== the test failed: {p}");
        }
    }

    /// With `PGKEEL_TEST_KEEP_LOGS=DIR`, copy every node's logs to `DIR/<cluster dir name>/`
    /// (for failures whose printed tail is not enough).
    fn keep_logs(&self) {
        let Some(keep) = std::env::var_os("PGKEEL_TEST_KEEP_LOGS") else { return };
        let Some(name) = self.dir().file_name() else { return };
        for n in std::fs::read_dir(self.dir().join("nodes")).into_iter().flatten().flatten() {
            let to = Path::new(&keep).join(name).join(n.file_name());
            if std::fs::create_dir_all(&to).is_err() {
                return;
            }
            for f in std::fs::read_dir(n.path()).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().ends_with(".log") {
                    let _ = std::fs::copy(f.path(), to.join(f.file_name()));
                }
            }
        }
        eprintln!("==== logs kept in {}", Path::new(&keep).join(name).display());
    }

    fn teardown(&mut self) {
        let d = self.dir_str();
        if let Ok(mut child) =
            Command::new(&self.bin).args(["down", "--dir", &d]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
        {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for c in self.extra.iter_mut().chain(self.foreground.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_cluster_processes(self.dir());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
            self.keep_logs();
        }
        self.teardown();
    }
}

/// The last panic's message and place, repeated at the end of a failing test's log dump:
/// CI keeps only the end of a failing test's output, and the panic is printed at its start
/// (2026-11-24: a failure whose cause could not be told from what CI kept).
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Install (once per process) a panic hook that records into [`LAST_PANIC`] and then prints
/// as before.
fn record_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{msg}{place}"));
            previous(info);
        }));
    });
}

/// Connect with tokio-postgres (no TLS); the connection task is spawned.
pub async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Run one statement through `psql` (real libpq), returning its unaligned output or stderr.
pub fn psql(dsn: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([dsn, "-X", "-v", "ON_ERROR_STOP=1", "-Atc", sql])
        .output()
        .map_err(|e| format!("run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Ids of the writer pinned to one member start here (see [`Cluster::start_writers`]).
const PINNED_IDS: i64 = 1_000_000_000;

/// At most one term accepts writes at any instant: the writer pinned to the old primary got
/// no acknowledgement after the new primary was promoted (`promoted_ms`), and the multi-host
/// writer never saw the old term again once it had seen a newer one.
pub fn assert_single_writer_term(old_term: u64, promoted_ms: u64, pinned: &WriterReport, multi: &WriterReport) {
    assert!(
        pinned.acked.iter().all(|a| a.term == old_term as i64),
        "the pinned writer only ever reached the old primary"
    );
    let last_old =
        pinned.acked.iter().map(|a| a.unix_ms).max().expect("the old primary acknowledged writes before the fault");
    assert!(
        last_old < promoted_ms,
        "the old primary acknowledged a write at {last_old}, after the promotion at {promoted_ms}"
    );
    if let Some(first_new) = multi.acked.iter().position(|a| a.term > old_term as i64) {
        assert!(
            multi.acked[first_new..].iter().all(|a| a.term > old_term as i64),
            "a write under the old term was acknowledged after one under the new term"
        );
    }
    eprintln!(
        "old primary's last ack {} ms before the promotion; multi-host writer: {} acked, {} failed, longest gap {:?}",
        promoted_ms - last_old,
        multi.acked.len(),
        multi.errors,
        multi.longest_gap
    );
}

/// A low-rate writer through the multi-host read-write DSN: every acknowledged insert is
/// recorded, so a test can check that none was lost.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<std::sync::atomic::AtomicUsize>,
    handle: tokio::task::JoinHandle<WriterReport>,
}

/// One acknowledged insert.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// Row id.
    pub id: i64,
    /// `pgkeel.term` of the server that acknowledged it.
    pub term: i64,
    /// When the acknowledgement arrived (unix ms; comparable with history times).
    pub unix_ms: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What a [`Writer`] saw.
#[derive(Debug, Default, Clone)]
pub struct WriterReport {
    /// Acknowledged inserts, in order.
    pub acked: Vec<Ack>,
    /// Failed attempts.
    pub errors: u64,
    /// Longest time without an acknowledged write.
    pub longest_gap: Duration,
}

impl Writer {
    /// Start writing into table `acked(id bigint primary key, term bigint)` every `interval`.
    pub fn start(dsn: String, interval: Duration) -> Writer {
        Writer::start_at(dsn, interval, 0)
    }

    /// Like [`Writer::start`], with ids starting after `id_base` (for several writers).
    pub fn start_at(dsn: String, interval: Duration, id_base: i64) -> Writer {
        Writer::start_with(dsn, interval, id_base, Duration::from_secs(3))
    }

    /// Like [`Writer::start_at`], giving up on a connection attempt or an insert (and then
    /// on the connection) after `timeout` instead of 3 s: with a long one, a write that hangs
    /// shows in the longest gap rather than being cut short by the writer.
    pub fn start_with(dsn: String, interval: Duration, id_base: i64, timeout: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = acked.clone();
        let handle = tokio::spawn(async move {
            let mut report = WriterReport::default();
            let mut client: Option<tokio_postgres::Client> = None;
            let mut id = id_base;
            let mut last_ok = Instant::now();
            while !s.load(Ordering::Relaxed) {
                id += 1;
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = tokio::time::timeout(timeout, connect(&dsn)).await.ok().and_then(Result::ok);
                }
                let ok = match &client {
                    Some(c) => {
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                        let q = c.query_one(
                            "insert into acked(id, term) values ($1, current_setting('pgkeel.term')::bigint) returning term",
                            &params,
                        );
                        match tokio::time::timeout(timeout, q).await {
                            Ok(Ok(row)) => Some(row.get::<_, i64>(0)),
                            _ => None,
                        }
                    }
                    None => None,
                };
                match ok {
                    Some(term) => {
                        report.acked.push(Ack { id, term, unix_ms: unix_ms() });
                        count.store(report.acked.len(), Ordering::Relaxed);
                        report.longest_gap = report.longest_gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    None => {
                        report.errors += 1;
                        client = None;
                    }
                }
                tokio::time::sleep(interval).await;
            }
            report
        });
        Writer { stop, acked, handle }
    }

    /// How many writes were acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stop and report.
    pub async fn stop(self) -> WriterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("writer task")
    }
}
