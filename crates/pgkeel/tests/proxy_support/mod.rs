//! A `pgkeel proxy` child process for tests (used by `proxy_switchover.rs` and
//! `proxy_routing.rs`).

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgkeel_testkit::{wait_for, Cluster};

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pgkeel"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// A `pgkeel proxy` child process, killed on drop (its log is printed when the test fails).
pub struct Proxy {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub password: String,
}

impl Proxy {
    pub async fn start(c: &Cluster, name: &str, extra: &str) -> Proxy {
        let dir = c.dir().join(name);
        std::fs::create_dir_all(&dir).expect("create the proxy dir");
        let password = c.info["superuser"]["password"].as_str().expect("superuser password").to_string();
        std::fs::write(dir.join("userlist.txt"), format!("\"postgres\" \"{password}\"\n")).expect("write the userlist");
        let node = pgkeel_config::load(&c.dir().join("nodes/n1/node.toml")).expect("n1's node.toml");
        let dcs = match node.dcs {
            pgkeel_config::DcsConfig::Local { path } => {
                format!("kind = \"local\"\npath = {}\n", serde_json::json!(path.display().to_string()))
            }
            pgkeel_config::DcsConfig::Etcd { endpoints } => {
                format!("kind = \"etcd\"\nendpoints = {}\n", serde_json::json!(endpoints))
            }
        };
        let port = free_port();
        let config = dir.join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "cluster = \"pgkeel\"\nlisten = \"127.0.0.1:{port}\"\n{extra}\n[dcs]\n{dcs}\n[auth]\nuserlist = \"userlist.txt\"\n"
            ),
        )
        .expect("write proxy.toml");
        let log = dir.join("proxy.log");
        let out = std::fs::File::create(&log).expect("create proxy.log");
        let mut cmd = Command::new(bin());
        cmd.args(["proxy", "--config"]).arg(&config).env("PGKEEL_LOG", "info");
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

    pub fn dsn(&self) -> String {
        format!("postgresql://postgres:{}@127.0.0.1:{}/postgres?connect_timeout=5", self.password, self.port)
    }

    pub fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} (last 60 lines) ---", self.log.display());
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}
