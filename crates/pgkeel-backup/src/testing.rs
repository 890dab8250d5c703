//! Test support, not for production use: a local S3-compatible server (moto's `moto_server`,
//! from PyPI) for the S3 tests of this crate and of the `pgkeel` binary.
//!
//! `scripts/install-deps.sh --test` installs it into `/opt/pgkeel-test-venv`. It is looked
//! for at `$PGKEEL_MOTO_SERVER`, then `/opt/pgkeel-test-venv/bin/moto_server`, then on `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::s3::{S3Config, DEFAULT_PART_SIZE};
use crate::sigv4::Credentials;

/// Where `scripts/install-deps.sh --test` installs moto.
pub const VENV_MOTO: &str = "/opt/pgkeel-test-venv/bin/moto_server";

/// The credentials the tests use (moto accepts any).
pub const ACCESS_KEY: &str = "pgkeel-test";
/// See [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "pgkeel-test-secret";

/// A running `moto_server` on a free port of 127.0.0.1; stopped when dropped.
pub struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn find_moto() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PGKEEL_MOTO_SERVER").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if Path::new(VENV_MOTO).is_file() {
        return Ok(PathBuf::from(VENV_MOTO));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("moto_server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "moto_server (a local S3-compatible server, needed by the S3 tests) was not found at $PGKEEL_MOTO_SERVER, \
         {VENV_MOTO} or on PATH: run scripts/install-deps.sh --test (it installs moto[server] from PyPI into \
         /opt/pgkeel-test-venv)"
    ))
}

impl Moto {
    /// Starts moto and waits (up to 60 s) until it answers.
    pub fn start() -> Result<Moto, String> {
        let bin = find_moto()?;
        let dir = tempfile::Builder::new().prefix("pgkeel-moto-").tempdir().map_err(|e| e.to_string())?;
        let log = dir.path().join("moto.log");
        // Below the ephemeral range, so no test's outgoing connection takes it first.
        let port = pgkeel_pg::ports::free_ports(1).map_err(|e| format!("finding a free port: {e}"))?[0];
        let out = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e} (scripts/install-deps.sh --test installs moto)", bin.display()))?;
        let mut moto = Moto { child, port, log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = moto.child.try_wait() {
                return Err(format!("{} exited ({status}) at startup: {}", bin.display(), moto.log_text()));
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(moto);
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not listen on port {port} within 60s: {}", bin.display(), moto.log_text()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A repository URL for `bucket`/`prefix` on this server (credentials from the
    /// environment: see [`Moto::env`]).
    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!("s3://{bucket}/{prefix}?endpoint={}", self.endpoint())
    }

    /// A configuration for `bucket`/`prefix` on this server.
    pub fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        S3Config {
            bucket: bucket.into(),
            prefix: prefix.into(),
            authority: format!("127.0.0.1:{}", self.port),
            tls: None,
            region: "us-east-1".into(),
            credentials: Credentials {
                access_key: ACCESS_KEY.into(),
                secret_key: SECRET_KEY.into(),
                session_token: None,
            },
            part_size: DEFAULT_PART_SIZE,
            list_page: 1000,
        }
    }

    /// The environment `pgkeel` processes (and postgres, for archive_command) need to reach
    /// this server: credentials and region.
    pub fn env() -> [(&'static str, &'static str); 3] {
        [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY), ("AWS_REGION", "us-east-1")]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
