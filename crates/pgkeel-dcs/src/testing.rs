//! Test support, not part of the API: real etcd processes for the etcd conformance tests (and
//! for other crates' end-to-end tests).
//!
//! This module owns [`EtcdCluster`]: one or more `etcd` members started from the system's
//! binary, each on free loopback ports (client and peer) with its data in a private temporary
//! directory, and killed (SIGKILL) and cleaned up when the cluster is dropped, also when a test
//! panics. Nothing is shared between clusters: every cluster gets its own ports, directory and
//! cluster token, so tests can run in parallel.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
#[cfg(target_os = "linux")]
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::etcd::EtcdStore;

/// How long a new cluster may take until every member reports a leader.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(50);
/// Attempts to start a cluster when a free port was taken by someone else in the meantime.
const START_ATTEMPTS: usize = 3;

/// The `etcd` binary: the first one on `PATH`, else `/usr/bin/etcd`.
pub fn etcd_binary() -> Result<PathBuf, String> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join("etcd")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain([PathBuf::from("/usr/bin/etcd")]).find(|p| p.is_file()).ok_or_else(|| {
        "etcd is not installed (no etcd on PATH or at /usr/bin/etcd), and the etcd tests need it: \
         run scripts/install-deps.sh --test (it installs Debian's etcd-server package)"
            .to_string()
    })
}

/// A private temporary directory, removed when dropped. (The `tempfile` crate is only a
/// dev-dependency; this module is compiled into the library.)
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let name = format!("pgkeel-etcd-{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        // etcd wants its data directory private (0700).
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a leftover directory in /tmp is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One etcd member process.
#[derive(Debug)]
pub struct EtcdMember {
    /// Member name (`m0`, `m1`...).
    pub name: String,
    /// Client URL, `http://127.0.0.1:<port>`.
    pub client_url: String,
    /// Peer URL, `http://127.0.0.1:<port>`.
    pub peer_url: String,
    /// Where its output goes.
    log: PathBuf,
    /// `None` once killed.
    child: Option<Child>,
}

impl EtcdMember {
    /// The process id, while this handle owns the process (to freeze it with SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL the member and reap it. Does nothing if it is already dead.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running etcd cluster of one or more members, killed when dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    // Declared before `dir` so the processes die before their directory is removed.
    members: Vec<EtcdMember>,
    dir: TempDir,
}

/// A port that was free a moment ago. The listener is kept open until every port of a cluster
/// has been picked, so one cluster never gets the same port twice.
fn free_port() -> Result<(TcpListener, u16), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot bind a free port: {e}"))?;
    let port = listener.local_addr().map_err(|e| format!("cannot read a bound port: {e}"))?.port();
    Ok((listener, port))
}

impl EtcdCluster {
    /// Start an etcd cluster of `size` members and wait until every member knows a leader.
    /// Fails (with the members' log tails) when etcd is missing or does not come up in time.
    pub async fn start(size: usize) -> Result<EtcdCluster, String> {
        let binary = etcd_binary()?;
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&binary, size).await {
                Ok(cluster) => return Ok(cluster),
                // Another process took one of the ports between picking and binding: retry
                // with new ones.
                Err((e, true)) => last_error = e,
                Err((e, false)) => return Err(e),
            }
        }
        Err(last_error)
    }

    /// One start attempt. The error says whether a new attempt on other ports may help.
    async fn start_once(binary: &Path, size: usize) -> Result<EtcdCluster, (String, bool)> {
        let dir = TempDir::new().map_err(|e| (e, false))?;
        let mut held = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..size {
            let (l1, client) = free_port().map_err(|e| (e, false))?;
            let (l2, peer) = free_port().map_err(|e| (e, false))?;
            held.extend([l1, l2]);
            ports.push((client, peer));
        }
        let initial_cluster: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}")).collect();
        let token = dir.0.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        drop(held);

        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = dir.0.join(format!("{name}.log"));
            let out =
                std::fs::File::create(&log).map_err(|e| (format!("cannot create {}: {e}", log.display()), false))?;
            let err = out.try_clone().map_err(|e| (format!("cannot open {}: {e}", log.display()), false))?;
            let mut cmd = Command::new(binary);
            cmd.arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(dir.0.join(&name))
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(initial_cluster.join(","))
                .arg("--initial-cluster-token")
                .arg(&token)
                .arg("--initial-cluster-state")
                .arg("new")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            // etcd reads every ETCD_* variable as a flag; one set in the environment would clash
            // with ours or change the test cluster.
            for (var, _) in std::env::vars_os() {
                if var.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(var);
                }
            }
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // prctl, which is async-signal-safe.
            #[cfg(target_os = "linux")]
            unsafe {
                cmd.pre_exec(|| {
                    // If the test process dies without dropping the cluster (SIGKILL, abort),
                    // the kernel kills etcd too. The signal follows the spawning thread, which
                    // for a test is the thread running the test body.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().map_err(|e| (format!("cannot start {}: {e}", binary.display()), false))?;
            members.push(EtcdMember { name, client_url, peer_url, log, child: Some(child) });
        }
        let mut cluster = EtcdCluster { members, dir };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Wait until every member answers and knows a leader.
    async fn wait_ready(&mut self) -> Result<(), (String, bool)> {
        let deadline = Instant::now() + START_DEADLINE;
        for i in 0..self.members.len() {
            loop {
                if !self.members[i].is_running() {
                    let tail = self.members[i].log_tail();
                    let port_taken = tail.contains("address already in use");
                    return Err((
                        format!("etcd member {} exited during start-up:\n{tail}", self.members[i].name),
                        port_taken,
                    ));
                }
                let url = self.members[i].client_url.clone();
                let not_ready = match EtcdStore::connect(vec![url], Duration::from_millis(500)).await {
                    Ok(store) => match store.status().await {
                        Ok(status) if status.leader != 0 => break,
                        Ok(status) => format!("{} knows no leader yet", status.endpoint),
                        Err(e) => e.to_string(),
                    },
                    Err(e) => e.to_string(),
                };
                if Instant::now() > deadline {
                    let tails: Vec<String> =
                        self.members.iter().map(|m| format!("--- {} ---\n{}", m.name, m.log_tail())).collect();
                    return Err((
                        format!(
                            "etcd did not become ready within {START_DEADLINE:?} ({not_ready}):\n{}",
                            tails.join("\n")
                        ),
                        false,
                    ));
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// The members, in start order.
    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    /// Client URLs of every member, in start order (killed ones included).
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// The index of the member the cluster's running members agree is the leader, if they do.
    pub async fn leader(&mut self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for i in 0..self.members.len() {
            if !self.members[i].is_running() {
                ids.push(None);
                continue;
            }
            let url = self.members[i].client_url.clone();
            let status = match EtcdStore::connect(vec![url], Duration::from_millis(500)).await {
                Ok(store) => store.status().await.ok(),
                Err(_) => None,
            };
            ids.push(status.as_ref().map(|s| s.member_id));
            leaders.push(status.map_or(0, |s| s.leader));
        }
        let first = *leaders.first()?;
        if first == 0 || leaders.iter().any(|l| *l != first) {
            return None;
        }
        ids.iter().position(|id| *id == Some(first))
    }

    /// Wait until the running members agree on a running leader; returns its index.
    pub async fn wait_for_leader(&mut self, timeout: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader().await {
                return Ok(i);
            }
            if Instant::now() > deadline {
                return Err(format!("the etcd members did not agree on a leader within {timeout:?}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The temporary directory holding the members' data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
}
