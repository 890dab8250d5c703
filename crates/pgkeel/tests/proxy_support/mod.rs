//! A `pgkeel proxy` child process for the proxy tests (`proxy.rs`, `proxy_ops.rs`,
//! `proxy_tls.rs`, `proxy_routing.rs`, `proxy_switchover.rs`).

#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgkeel_testkit::{wait_for, Cluster};

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

pub use pgkeel_pg::testing::free_port;

/// The cluster's superuser password (from `up.json`).
pub fn superuser_password(c: &Cluster) -> String {
    c.info["superuser"]["password"].as_str().expect("superuser password").to_string()
}

/// The body of a `[dcs]` table: the same DCS as the cluster's agents.
pub fn dcs_toml(c: &Cluster) -> String {
    let node = pgkeel_config::load(&c.dir().join("nodes/n1/node.toml")).expect("n1's node.toml");
    match node.dcs {
        pgkeel_config::DcsConfig::Local { path } => {
            format!("kind = \"local\"\npath = {}\n", serde_json::json!(path.display().to_string()))
        }
        pgkeel_config::DcsConfig::Etcd { endpoints } => {
            format!("kind = \"etcd\"\nendpoints = {}\n", serde_json::json!(endpoints))
        }
    }
}

/// Creates `c.dir()/name` with a userlist holding `entries` (user, secret); returns the dir.
pub fn proxy_dir(c: &Cluster, name: &str, entries: &[(&str, &str)]) -> PathBuf {
    let dir = c.dir().join(name);
    std::fs::create_dir_all(&dir).expect("create the proxy dir");
    let text: String = entries.iter().map(|(u, s)| format!("\"{u}\" \"{s}\"\n")).collect();
    std::fs::write(dir.join("userlist.txt"), format!("# test users\n{text}")).expect("write the userlist");
    dir
}

/// A `pgkeel proxy` child process, killed on drop (its log is printed when the test fails).
pub struct Proxy {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    /// The superuser's password.
    pub password: String,
}

impl Proxy {
    /// Starts a proxy for cluster `c` with `extra` lines of proxy.toml (top-level keys, or
    /// tables after the top-level keys), and waits until it accepts connections.
    pub async fn start(c: &Cluster, name: &str, extra: &str) -> Proxy {
        Proxy::start_with_secret(c, name, extra, &superuser_password(c)).await
    }

    /// [`Proxy::start`] with `secret` as postgres' entry in the userlist (the plaintext
    /// password or a SCRAM secret).
    pub async fn start_with_secret(c: &Cluster, name: &str, extra: &str, secret: &str) -> Proxy {
        let dir = proxy_dir(c, name, &[("postgres", secret)]);
        let port = free_port();
        let config = dir.join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "cluster = {}\nlisten = \"127.0.0.1:{port}\"\n{extra}\n[dcs]\n{}\n[auth]\nuserlist = \
                 \"userlist.txt\"\n",
                c.info["cluster"],
                dcs_toml(c)
            ),
        )
        .expect("write proxy.toml");
        Proxy::launch(&config, port, superuser_password(c)).await
    }

    /// Checks `config` (`pgkeel proxy --check`), starts `pgkeel proxy` on it (log
    /// `proxy.log` beside it) and waits until it listens on `port`.
    pub async fn launch(config: &Path, port: u16, password: String) -> Proxy {
        let check =
            Command::new(bin()).args(["proxy", "--check", "--config"]).arg(config).output().expect("run pgkeel");
        assert!(check.status.success(), "proxy.toml is valid: {}", String::from_utf8_lossy(&check.stderr));
        let log = config.with_file_name("proxy.log");
        let out = std::fs::File::create(&log).expect("create proxy.log");
        let mut cmd = Command::new(bin());
        cmd.args(["proxy", "--config"]).arg(config).env("PGKEEL_LOG", "debug");
        cmd.stdin(Stdio::null()).stdout(out.try_clone().expect("clone")).stderr(out);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the proxy when
        // the test thread dies, so a test killed hard leaves no proxy behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start pgkeel proxy");
        let p = Proxy { child, port, log, password };
        wait_for("the proxy to listen", Duration::from_secs(20), || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        })
        .await;
        p
    }

    /// URL for psql and tokio-postgres, as the superuser.
    pub fn dsn(&self) -> String {
        self.dsn_with("postgres", &self.password, "")
    }

    /// URL for `user` with `password` and extra `&key=value` parameters, database postgres.
    pub fn dsn_with(&self, user: &str, password: &str, params: &str) -> String {
        self.url(user, password, "postgres", params)
    }

    /// URL for `user` with `password` to `database`, with extra `&key=value` parameters.
    pub fn url(&self, user: &str, password: &str, database: &str, params: &str) -> String {
        format!("postgresql://{user}:{password}@127.0.0.1:{}/{database}?connect_timeout=5{params}", self.port)
    }

    /// Key/value conninfo for pgbench (password in PGPASSWORD).
    pub fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// `pgbench` with `args`, against this proxy as the superuser (conninfo last, password in
    /// the environment, no stdin).
    pub fn pgbench<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new("pgbench");
        cmd.args(args).arg(self.conninfo()).env("PGPASSWORD", &self.password).stdin(Stdio::null());
        cmd
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` to the proxy.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0, "signal the proxy");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} (last 80 lines) ---", self.log.display());
            for l in &lines[lines.len().saturating_sub(80)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// `GET path` on `127.0.0.1:port` (the proxy's `metrics_listen`): the status line and the body.
pub fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// The value of the first sample of the exposition `body` whose line starts with `prefix`
/// (`name{labels`), checked to be a number.
pub fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.parse::<f64>().expect("a number"))
}
