//! `pgkeel up` / `pgkeel down`: a whole cluster on this machine with the embedded store.
//!
//! Layout of DIR:
//! - `up.json`: endpoints (DSNs with the generated passwords, REST URLs) — written once;
//! - `dcs/`: the local store shared by the agents;
//! - `tls/`: a CA (`ca.crt`, `ca.key`) and the certificates it signed for postgres
//!   (`server.crt`, `server.key`) and the proxy (`proxy.crt`, `proxy.key`);
//! - `proxy.toml`, `userlist.txt`, `proxy.pid`, `proxy.log`: the proxy;
//! - `nodes/<name>/node.toml`, `agent.pid`, `agent.log`, `postgres.log`, `run/` (socket),
//!   `data/` (the postgres data directory), `guard.pid`, `guard.log`, `guard.lease` (the
//!   fencing guard).
//!
//! Each agent is a separate process in its own process group, so killing one is like losing a
//! node, and Ctrl-C on the terminal reaches only `up`, which then stops the agents in order.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgkeel_agent::http::request;
use pgkeel_config::{BackupConfig, Credentials, DcsConfig, NodeConfig, PostgresConfig, RestConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Credentials in `up.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpCredentials {
    /// User.
    pub username: String,
    /// Password.
    pub password: String,
}

/// One node in `up.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpNode {
    /// Member name.
    pub name: String,
    /// REST API URL.
    pub api_url: String,
    /// DSN of this node's postgres.
    pub dsn: String,
    /// Its node.toml.
    pub config: PathBuf,
    /// Its agent's pid file.
    pub pid_file: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
}

/// The proxy `up` runs in front of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpProxy {
    /// DSN through the proxy: pooled, reads split to replicas, following the primary.
    pub dsn: String,
    /// Its proxy.toml.
    pub config: PathBuf,
    /// Its pid file (written by `up`).
    pub pid_file: PathBuf,
}

/// The contents of `up.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpInfo {
    /// Cluster name.
    pub cluster: String,
    /// The cluster directory.
    pub dir: PathBuf,
    /// Multi-host DSN that reaches the primary (`target_session_attrs=read-write`).
    pub primary_dsn: String,
    /// Multi-host DSN that prefers a replica for reads.
    pub replica_dsn: String,
    /// Postgres superuser.
    pub superuser: UpCredentials,
    /// REST API credentials for actions.
    pub api: UpCredentials,
    /// Nodes.
    pub nodes: Vec<UpNode>,
    /// The backup repository every node archives WAL to (absent in clusters created before
    /// it existed).
    #[serde(default)]
    pub backup_repo: Option<PathBuf>,
    /// The proxy (absent in clusters created before it existed).
    #[serde(default)]
    pub proxy: Option<UpProxy>,
}

impl UpInfo {
    /// Read `DIR/up.json`.
    pub fn read(dir: &Path) -> anyhow::Result<UpInfo> {
        let path = dir.join("up.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read {} (is {} a `pgkeel up` directory?)", path.display(), dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }
}

fn pid_alive(pid_file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    pgkeel_pg::process::alive(pid).then_some(pid)
}

/// When running as root, postgres runs as `os_user`, which must be able to reach `dir`.
fn check_reachable(dir: &Path, os_user: &str) -> anyhow::Result<()> {
    let Some(run_as) = pgkeel_pg::user::run_as_for(os_user)? else { return Ok(()) };
    for anc in dir.ancestors() {
        let meta = std::fs::metadata(anc).with_context(|| format!("stat {}", anc.display()))?;
        let mode = meta.permissions().mode();
        use std::os::unix::fs::MetadataExt;
        let ok = mode & 0o001 != 0
            || (meta.uid() == run_as.uid && mode & 0o100 != 0)
            || (meta.gid() == run_as.gid && mode & 0o010 != 0);
        if !ok {
            bail!(
                "postgres runs as the OS user {os_user:?}, which cannot enter {} (mode {:o}); choose a directory it can reach, e.g. /var/lib/pgkeel/demo or /tmp/pgkeel-demo",
                anc.display(),
                mode & 0o777
            );
        }
    }
    Ok(())
}

fn create(
    dir: &Path,
    nodes: u16,
    cluster: &str,
    etcd: Option<Vec<String>>,
    from: Option<&pgkeel_config::BootstrapFrom>,
) -> anyhow::Result<UpInfo> {
    let dcs = match etcd {
        Some(endpoints) => DcsConfig::Etcd { endpoints },
        None => DcsConfig::Local { path: dir.join("dcs") },
    };
    let su_pw = pgkeel_agent::random_password();
    let repl_pw = pgkeel_agent::random_password();
    let api_pw = pgkeel_agent::random_password();
    let ports = pgkeel_pg::ports::free_ports(nodes as usize * 2 + 1).context("find free ports")?;
    let tls = write_certificates(dir)?;
    let mut infos = Vec::new();
    for i in 0..nodes as usize {
        let name = format!("n{}", i + 1);
        let node_dir = dir.join("nodes").join(&name);
        std::fs::create_dir_all(&node_dir).with_context(|| format!("create {}", node_dir.display()))?;
        std::fs::set_permissions(&node_dir, std::fs::Permissions::from_mode(0o755))?;
        let (pg_port, api_port) = (ports[2 * i], ports[2 * i + 1]);
        let cfg = NodeConfig {
            cluster: cluster.to_string(),
            name: name.clone(),
            data_dir: node_dir.join("data"),
            dcs: dcs.clone(),
            postgres: PostgresConfig {
                listen: format!("127.0.0.1:{pg_port}"),
                superuser: Credentials { username: "postgres".into(), password: Some(su_pw.clone()) },
                replication: Credentials { username: "pgkeel_replicator".into(), password: Some(repl_pw.clone()) },
                parameters: tls.postgres_parameters(),
                ..PostgresConfig::default()
            },
            rest: RestConfig {
                listen: format!("127.0.0.1:{api_port}"),
                password: Some(api_pw.clone()),
                ..RestConfig::default()
            },
            tags: Default::default(),
            backup: BackupConfig {
                repo: Some(dir.join("backups")),
                bootstrap_from: from.cloned(),
                ..BackupConfig::default()
            },
            bootstrap: Default::default(),
        };
        cfg.validate().map_err(|e| anyhow::anyhow!("generated config for {name} is invalid: {e}"))?;
        let config_path = node_dir.join("node.toml");
        let header = "# Written by `pgkeel up`. Edit with care: `pgkeel config check` validates it.\n";
        std::fs::write(&config_path, format!("{header}{}", cfg.to_toml()))
            .with_context(|| format!("write {}", config_path.display()))?;
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))?;
        infos.push(UpNode {
            name,
            api_url: cfg.rest_url(),
            dsn: format!("postgresql://postgres:{su_pw}@127.0.0.1:{pg_port}/postgres"),
            config: config_path,
            pid_file: node_dir.join("agent.pid"),
            data_dir: cfg.data_dir.clone(),
        });
    }
    let hosts: Vec<String> = (0..nodes as usize).map(|i| format!("127.0.0.1:{}", ports[2 * i])).collect();
    let base = format!("postgresql://postgres:{su_pw}@{}/postgres", hosts.join(","));
    let info = UpInfo {
        cluster: cluster.to_string(),
        dir: dir.to_path_buf(),
        primary_dsn: format!("{base}?target_session_attrs=read-write&connect_timeout=2"),
        replica_dsn: format!("{base}?target_session_attrs=prefer-standby&connect_timeout=2"),
        superuser: UpCredentials { username: "postgres".into(), password: su_pw.clone() },
        api: UpCredentials { username: "pgkeel".into(), password: api_pw },
        nodes: infos,
        backup_repo: Some(dir.join("backups")),
        proxy: Some(write_proxy_config(dir, cluster, &dcs, ports[nodes as usize * 2], &su_pw, &tls)?),
    };
    // Written aside and renamed, so a reader never sees it half-written.
    let path = dir.join("up.json");
    let tmp = dir.join("up.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&info)? + "\n")
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
    Ok(info)
}

/// `DIR/proxy.toml` and `DIR/userlist.txt` (the superuser, mode 0600) for a proxy on `port`.
fn write_proxy_config(
    dir: &Path,
    cluster: &str,
    dcs: &DcsConfig,
    port: u16,
    su_pw: &str,
    tls: &UpTls,
) -> anyhow::Result<UpProxy> {
    let dcs_toml = match dcs {
        DcsConfig::Local { path } => format!("kind = \"local\"\npath = {:?}\n", path.display().to_string()),
        DcsConfig::Etcd { endpoints } => format!("kind = \"etcd\"\nendpoints = {endpoints:?}\n"),
    };
    let config = dir.join("proxy.toml");
    let text = format!(
        "# Written by `pgkeel up`: the pooling proxy in front of this cluster (`pgkeel proxy --example`\n\
         # lists every setting).\ncluster = {cluster:?}\nlisten = \"127.0.0.1:{port}\"\n\n[dcs]\n{dcs_toml}\n\
         [auth]\nuserlist = \"userlist.txt\"\n\n\
         # TLS: clients must use it; postgres is checked against the cluster's CA.\n[tls]\ncert = {:?}\n\
         key = {:?}\nclient_tls = \"require\"\nserver_tls = \"verify-full\"\nserver_ca = {:?}\n",
        tls.proxy_cert.display().to_string(),
        tls.proxy_key.display().to_string(),
        tls.ca.display().to_string(),
    );
    std::fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
    let userlist = dir.join("userlist.txt");
    std::fs::write(&userlist, format!("\"postgres\" \"{su_pw}\"\n"))
        .with_context(|| format!("write {}", userlist.display()))?;
    std::fs::set_permissions(&userlist, std::fs::Permissions::from_mode(0o600))?;
    Ok(UpProxy {
        dsn: format!(
            "postgresql://postgres:{su_pw}@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={}",
            tls.ca.display()
        ),
        config,
        pid_file: dir.join("proxy.pid"),
    })
}

/// The certificates `up` makes in `DIR/tls` (see [`write_certificates`]).
struct UpTls {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    proxy_cert: PathBuf,
    proxy_key: PathBuf,
}

impl UpTls {
    /// `ssl = on` with the node certificate, for every node's `[postgres.parameters]`.
    fn postgres_parameters(&self) -> std::collections::BTreeMap<String, pgkeel_config::ParamValue> {
        use pgkeel_config::ParamValue;
        let path = |p: &Path| ParamValue::Text(p.display().to_string());
        [
            ("ssl".to_string(), ParamValue::Bool(true)),
            ("ssl_cert_file".to_string(), path(&self.server_cert)),
            ("ssl_key_file".to_string(), path(&self.server_key)),
        ]
        .into_iter()
        .collect()
    }
}

/// A CA and two certificates signed by it in `DIR/tls`, each valid for `127.0.0.1` and
/// `localhost` (so clients can use `sslmode=verify-full` with `sslrootcert=DIR/tls/ca.crt`):
/// `server.crt`/`server.key` for postgres (the key owned by the OS user postgres runs as,
/// mode 0600, as postgres demands) and `proxy.crt`/`proxy.key` for the proxy. The CA key is
/// kept in `ca.key` (0600) to sign more.
fn write_certificates(dir: &Path) -> anyhow::Result<UpTls> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let tls_dir = dir.join("tls");
    std::fs::create_dir_all(&tls_dir).with_context(|| format!("create {}", tls_dir.display()))?;
    std::fs::set_permissions(&tls_dir, std::fs::Permissions::from_mode(0o755))?;
    let write = |name: &str, text: &str, mode: u32| -> anyhow::Result<PathBuf> {
        let path = tls_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(path)
    };
    let ca_key = KeyPair::generate().context("generate the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA certificate parameters")?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "pgkeel up CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).context("sign the CA certificate")?;
    let ca = write("ca.crt", &ca_cert.pem(), 0o644)?;
    write("ca.key", &ca_key.serialize_pem(), 0o600)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate().context("generate a key")?;
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .context("certificate parameters")?;
        params.distinguished_name.push(DnType::CommonName, format!("pgkeel up {name}"));
        let cert = params.signed_by(&key, &issuer).with_context(|| format!("sign the {name} certificate"))?;
        Ok((
            write(&format!("{name}.crt"), &cert.pem(), 0o644)?,
            write(&format!("{name}.key"), &key.serialize_pem(), 0o600)?,
        ))
    };
    let (server_cert, server_key) = leaf("server")?;
    let (proxy_cert, proxy_key) = leaf("proxy")?;
    // Postgres refuses a key file that is not its own (or root's with mode 0640 or less).
    if let Some(run_as) = pgkeel_pg::user::run_as_for(&PostgresConfig::default().os_user)? {
        std::os::unix::fs::chown(&server_key, Some(run_as.uid), Some(run_as.gid))
            .with_context(|| format!("give {} to the OS user {}", server_key.display(), run_as.name))?;
    }
    Ok(UpTls { ca, server_cert, server_key, proxy_cert, proxy_key })
}

/// The proxy's pid, when it runs (the pid file is `up`'s, so check the process is a proxy:
/// a stale file may name a reused pid).
fn proxy_alive(p: &UpProxy) -> Option<i32> {
    let pid = pid_alive(&p.pid_file)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.iter().any(|a| *a == b"proxy").then_some(pid)
}

/// Start the proxy in the background (log in `DIR/proxy.log`).
fn spawn_proxy(p: &UpProxy) -> anyhow::Result<std::process::Child> {
    let config = p.config.as_os_str();
    let child = spawn_logged(&["proxy".as_ref(), "--config".as_ref(), config], &p.config.with_file_name("proxy.log"))
        .context("start the proxy")?;
    std::fs::write(&p.pid_file, format!("{}\n", child.id()))
        .with_context(|| format!("write {}", p.pid_file.display()))?;
    Ok(child)
}

/// Run `pgkeel ARGS` in a session of its own (so in its own process group: Ctrl-C on the
/// terminal reaches `up` only, which stops everything in order), appending its output to
/// `log_path`. A session of its own also makes it a scheduling group of its own where the
/// kernel groups by session (autogroup): the proxy then does not share one group's CPU share
/// with a benchmark or application started from the same terminal (docs/benchmarks.md,
/// "Proxy").
fn spawn_logged(args: &[&std::ffi::OsStr], log_path: &Path) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe().context("find the pgkeel executable")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args);
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

fn spawn_agent(node: &UpNode) -> anyhow::Result<std::process::Child> {
    let args = [
        "agent".as_ref(),
        "--config".as_ref(),
        node.config.as_os_str(),
        "--pid-file".as_ref(),
        node.pid_file.as_os_str(),
    ];
    spawn_logged(&args, &node.config.with_file_name("agent.log"))
        .with_context(|| format!("start the agent of {}", node.name))
}

/// `pgkeel up`.
pub async fn up(
    dir: &Path,
    nodes: u16,
    cluster: &str,
    detach: bool,
    etcd: Option<Vec<String>>,
    from: Option<pgkeel_config::BootstrapFrom>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    pgkeel_pg::binaries::PgBinaries::discover(None)?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    check_reachable(&dir, &PostgresConfig::default().os_user)?;

    let info = if dir.join("up.json").exists() {
        let info = UpInfo::read(&dir)?;
        if info.nodes.len() != nodes as usize && nodes != 3 {
            eprintln!(
                "note: {} already holds a {}-node cluster; --nodes is ignored when resuming",
                dir.display(),
                info.nodes.len()
            );
        }
        if etcd.is_some() {
            eprintln!(
                "note: --etcd only applies to a new cluster; {} keeps the DCS in its node.toml files",
                dir.display()
            );
        }
        eprintln!("resuming cluster {:?} in {}", info.cluster, dir.display());
        info
    } else {
        let info = create(&dir, nodes, cluster, etcd, from.as_ref())?;
        eprintln!("created cluster {:?} with {} nodes in {}", info.cluster, info.nodes.len(), dir.display());
        info
    };

    // In the foreground, a stop signal from here on stops what was started, also while it
    // starts (the children run in sessions of their own and would outlive this process).
    let stop = if detach { None } else { Some(stop_signals()?) };
    let mut children = Vec::new();
    for node in &info.nodes {
        if let Some(pid) = pid_alive(&node.pid_file) {
            eprintln!("agent of {} already runs (pid {pid})", node.name);
            continue;
        }
        children.push((node.name.clone(), spawn_agent(node)?));
    }
    if let Some(p) = &info.proxy {
        match proxy_alive(p) {
            Some(pid) => eprintln!("the proxy already runs (pid {pid})"),
            None => children.push(("proxy".into(), spawn_proxy(p)?)),
        }
    }
    print_endpoints(&info);

    let Some(stop) = stop else {
        let ready = wait_ready(&info, Duration::from_secs(120)).await;
        report_ready(&ready, started);
        eprintln!("agents run in the background; stop them with: pgkeel down --dir {}", dir.display());
        return ready;
    };
    tokio::pin!(stop);
    let stopped_early = tokio::select! {
        ready = wait_ready(&info, Duration::from_secs(120)) => {
            report_ready(&ready, started);
            false
        }
        _ = stop.as_mut() => true,
    };
    if stopped_early {
        eprintln!("stopping the cluster...");
    } else {
        eprintln!("Ctrl-C stops the cluster; `pgkeel up --dir {}` resumes it.", dir.display());
        status_until_signal(&info, &mut children, stop).await;
    }
    let result = down(&dir).await;
    // The agents are our children: reap them so none lingers as a zombie.
    for (_, child) in &mut children {
        let _ = child.wait();
    }
    result
}

fn report_ready(ready: &anyhow::Result<()>, started: Instant) {
    match ready {
        Ok(()) => eprintln!("cluster ready in {:.1}s: every member is streaming", started.elapsed().as_secs_f64()),
        Err(e) => eprintln!("warning: {e:#}"),
    }
}

fn print_endpoints(info: &UpInfo) {
    println!("cluster {:?} in {}", info.cluster, info.dir.display());
    println!("  primary (read-write): {}", info.primary_dsn);
    println!("  replicas (read-only): {}", info.replica_dsn);
    for n in &info.nodes {
        println!("  {}: {}  api {}", n.name, n.dsn, n.api_url);
    }
    if let Some(p) = &info.proxy {
        println!("  proxy (pooled, reads to replicas): {}", p.dsn);
    }
    println!("  REST actions: user {} password {}", info.api.username, info.api.password);
    if let (Some(repo), Some(n)) = (&info.backup_repo, info.nodes.first()) {
        println!(
            "  WAL archive and backups: {} (e.g. pgkeel backup create --config {})",
            repo.display(),
            n.config.display()
        );
    }
    println!("  endpoints saved in {}", info.dir.join("up.json").display());
    let _ = std::io::stdout().flush();
}

async fn cluster_json(info: &UpInfo) -> Option<Value> {
    for n in &info.nodes {
        if let Ok(r) = request("GET", &format!("{}/cluster", n.api_url), None, None, Duration::from_secs(2)).await {
            if r.status == 200 {
                return r.json().ok();
            }
        }
    }
    None
}

/// Every node is either the running leader or a streaming replica.
fn all_streaming(v: &Value, expected: usize) -> bool {
    let Some(ms) = v["members"].as_array() else { return false };
    ms.len() == expected
        && !v["leader"].is_null()
        && ms.iter().all(|m| {
            (m["role"] == "leader" && m["state"] == "running") || (m["role"] == "replica" && m["state"] == "streaming")
        })
}

async fn wait_ready(info: &UpInfo, bound: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if let Some(v) = cluster_json(info).await {
            if all_streaming(&v, info.nodes.len()) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the cluster was not fully up within {bound:?}; see {}/nodes/*/agent.log", info.dir.display())
}

fn status_line(v: Option<&Value>) -> String {
    let Some(v) = v else { return "no agent answers".into() };
    let mut parts = vec![format!("term {}", v["term"].as_u64().map_or("-".into(), |t| t.to_string()))];
    if v["paused"].as_bool() == Some(true) {
        parts.push("PAUSED".into());
    }
    for m in v["members"].as_array().into_iter().flatten() {
        let mut s = format!(
            "{} {} {}",
            m["name"].as_str().unwrap_or("?"),
            m["role"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?")
        );
        if let Some(l) = m["lag"].as_u64() {
            s.push_str(&format!(" lag {l}B"));
        }
        parts.push(s);
    }
    parts.join(" | ")
}

/// Resolves when a foreground `up` is told to stop: Ctrl-C, SIGTERM, or a hang-up (the
/// terminal or the ssh session closed: a foreground cluster lives as long as its terminal,
/// `--detach` is the other way). The handlers are installed by this call, so a signal during
/// the start-up is not lost either.
fn stop_signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let signal = crate::stop_signals(true)?;
    Ok(async move {
        if signal.await == "SIGHUP" {
            eprintln!("\nthe terminal hung up (SIGHUP)");
        }
    })
}

async fn status_until_signal(
    info: &UpInfo,
    children: &mut [(String, std::process::Child)],
    signal: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) {
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    let mut signal = signal;
    loop {
        let mut line = status_line(cluster_json(info).await.as_ref());
        for (name, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let what = if name == "proxy" { "the proxy".to_string() } else { format!("agent {name}") };
                line.push_str(&format!(" | {what} exited ({status})"));
            }
        }
        if tty {
            print!("\r\x1b[K{line}");
            let _ = std::io::stdout().flush();
        } else if line != last {
            println!("{line}");
        }
        last = line;
        tokio::select! {
            _ = signal.as_mut() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    if tty {
        println!();
    }
    eprintln!("stopping the cluster...");
}

fn signal_pid(pid: i32, sig: i32) {
    // SAFETY: sending a signal to a pid has no memory-safety implications.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// `pgkeel down`: stop every agent (they stop their postgres and release the leader key), then
/// any postgres whose agent was already gone.
pub async fn down(dir: &Path) -> anyhow::Result<()> {
    let info = UpInfo::read(dir)?;
    // The proxy first: clients see it go rather than queries failing against stopping nodes.
    if let Some(p) = &info.proxy {
        if let Some(pid) = proxy_alive(p) {
            signal_pid(pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && proxy_alive(p).is_some() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if let Some(pid) = proxy_alive(p) {
                signal_pid(pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(&p.pid_file);
    }
    // Replicas first, so that the leader releasing its key cannot start a race among replicas
    // that are still running; then the leader.
    let leader = cluster_json(&info).await.and_then(|v| v["leader"].as_str().map(String::from));
    let (last, first): (Vec<&UpNode>, Vec<&UpNode>) = info.nodes.iter().partition(|n| Some(&n.name) == leader.as_ref());
    for group in [first, last] {
        for n in &group {
            if let Some(pid) = pid_alive(&n.pid_file) {
                signal_pid(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && group.iter().any(|n| pid_alive(&n.pid_file).is_some()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for n in &info.nodes {
        if let Some(pid) = pid_alive(&n.pid_file) {
            eprintln!("agent of {} did not stop in time: killing it", n.name);
            signal_pid(pid, libc::SIGKILL);
            let _ = std::fs::remove_file(&n.pid_file);
        }
    }
    // Postgres left behind by an agent that was killed: fast shutdown (SIGINT), then immediate.
    let orphans: Vec<i32> = info.nodes.iter().filter_map(|n| pgkeel_pg::process::postmaster_pid(&n.data_dir)).collect();
    for &pid in &orphans {
        signal_pid(pid, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && info.nodes.iter().any(|n| pgkeel_pg::process::postmaster_pid(&n.data_dir).is_some())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in &info.nodes {
        if let Some(pid) = pgkeel_pg::process::postmaster_pid(&n.data_dir) {
            signal_pid(pid, libc::SIGQUIT);
        }
    }
    // Guards exit by themselves after a clean agent shutdown; stop any left by a killed agent.
    for n in &info.nodes {
        if let Some(pid) = pid_alive(&n.config.with_file_name(pgkeel_agent::guard::PID_FILE)) {
            signal_pid(pid, libc::SIGTERM);
        }
    }
    eprintln!("cluster {:?} stopped", info.cluster);
    Ok(())
}
