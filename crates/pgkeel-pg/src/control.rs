//! Lifecycle of the local instance: initdb, managed files in the data directory, clone with
//! pg_basebackup, start/stop/promote/reload through `pg_ctl`, pg_controldata, and the
//! superuser connection over the private unix socket.
//!
//! Every program runs as [`Instance::run_as`] when the agent is root, with `PG*` variables
//! removed from its environment (so a stray `PGDATA`/`PGHOST`/`PGPASSWORD` in the agent's
//! environment cannot redirect it), `LC_ALL=C` (so output such as pg_controldata's is in
//! English and parseable), and `/` as working directory (always accessible to the user).
//! Every path handed to a program is made absolute first for the same reason.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::process::Command;
use tracing::{debug, info, warn};

use crate::binaries::PgBinaries;
use crate::conf::{self, ManagedConf, CONF_FILE, INCLUDE_LINE};
use crate::lsn::parse_lsn;
use crate::quote::{hba_token, libpq_value};
use crate::user::{chown_opt, prepare_dir, RunAs};
use crate::PgError;

/// How many lines of the server log a failed start reports.
const LOG_TAIL_LINES: usize = 20;

/// Extra time on top of the `-t` given to pg_ctl before the agent gives up on pg_ctl itself.
const PG_CTL_GRACE: Duration = Duration::from_secs(15);

/// `pg_ctl stop -m` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for every client to disconnect.
    Smart,
    /// Disconnect clients, then shut down cleanly (shutdown checkpoint).
    Fast,
    /// Quit at once; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    /// The `pg_ctl -m` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// One local postgres instance: where its binaries, data, socket and log are.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Server programs.
    pub bins: PgBinaries,
    /// Data directory (`PGDATA`).
    pub data_dir: PathBuf,
    /// OS user postgres runs as; `Some` only when the agent runs as root.
    pub run_as: Option<RunAs>,
    /// `pg_ctl -l` target: the server log, outside the data directory (so a clone or a move
    /// aside does not take it along).
    pub log_file: PathBuf,
    /// `unix_socket_directories`; created 0700 owned by `run_as` before each start.
    pub socket_dir: PathBuf,
    /// Server port (also names the unix socket).
    pub port: u16,
    /// Superuser the agent connects as over the unix socket.
    pub superuser: String,
}

/// The fields of `pg_controldata` the HA logic needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlData {
    /// `Database system identifier`: equal on a primary and all its replicas.
    pub system_identifier: String,
    /// `Database cluster state`, e.g. `shut down`, `in production`, `shut down in recovery`,
    /// `in archive recovery`.
    pub state: String,
    /// `Latest checkpoint's TimeLineID`.
    pub timeline: u32,
    /// `Latest checkpoint location`.
    pub checkpoint_lsn: u64,
    /// `Minimum recovery ending location` (0 when not in recovery).
    pub min_recovery_end_lsn: u64,
    /// The settings a hot standby must not set lower than its primary did, as last recorded
    /// in the WAL (`max_connections setting: 100`, ...), keyed by parameter name.
    pub hot_standby_minimums: std::collections::BTreeMap<String, u64>,
}

/// Parameters a hot standby refuses to start with when set lower than on its primary, with
/// their pg_controldata labels.
pub const HOT_STANDBY_PARAMETERS: [(&str, &str); 5] = [
    ("max_connections", "max_connections setting"),
    ("max_worker_processes", "max_worker_processes setting"),
    ("max_wal_senders", "max_wal_senders setting"),
    ("max_prepared_transactions", "max_prepared_xacts setting"),
    ("max_locks_per_transaction", "max_locks_per_xact setting"),
];

/// Where to clone from / stream from: a running member reachable over TCP.
#[derive(Debug, Clone)]
pub struct SourceConn {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Role with the REPLICATION attribute.
    pub user: String,
    /// Its password.
    pub password: Option<String>,
}

impl SourceConn {
    /// libpq keyword/value connection string for `primary_conninfo`:
    /// `host=.. port=.. user=.. password=.. application_name=.. sslmode=prefer connect_timeout=2`,
    /// values quoted per libpq rules where needed.
    pub fn conninfo(&self, application_name: &str) -> String {
        let mut parts = vec![
            format!("host={}", libpq_value(&self.host)),
            format!("port={}", self.port),
            format!("user={}", libpq_value(&self.user)),
        ];
        if let Some(pw) = &self.password {
            parts.push(format!("password={}", libpq_value(pw)));
        }
        parts.push(format!("application_name={}", libpq_value(application_name)));
        parts.push("sslmode=prefer".into());
        // Short, so a replica notices a dead primary quickly and retries with the new conninfo.
        parts.push("connect_timeout=2".into());
        parts.join(" ")
    }
}

/// Runs `sql` (simple protocol, several statements allowed) on `source`, database
/// `postgres`, within `timeout`; `what` names it in errors.
async fn run_on_source(source: &SourceConn, sql: &str, what: &str, timeout: Duration) -> Result<(), PgError> {
    let conninfo = format!("{} dbname=postgres", source.conninfo("pgkeel_rewind"));
    let work = async {
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .map_err(|e| PgError::sql(format!("connecting to the new primary for {what}"), e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client.batch_execute(sql).await.map_err(|e| PgError::sql(what, e))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| PgError::Timeout { what: what.into(), after: timeout })?
}

impl Instance {
    /// Whether the data directory holds a cluster (`PG_VERSION` exists).
    pub fn is_initialized(&self) -> bool {
        self.data().join("PG_VERSION").is_file()
    }

    /// Creates a new cluster with `initdb`: data checksums (pg_rewind and corruption
    /// detection), UTF8, locale `C.UTF-8` (or `C` where that locale is missing), the given
    /// superuser, trust on the private socket and SCRAM over TCP. Then appends
    /// `include_if_exists = 'pgkeel.conf'` to postgresql.conf.
    ///
    /// The data directory must be absent or empty. The password travels in a 0600 file owned
    /// by the postgres user, removed right after; an empty password sets none.
    pub async fn initdb(&self, superuser_password: &str) -> Result<(), PgError> {
        let data = self.data();
        if self.is_initialized() {
            return Err(self.bad_dir("already holds a cluster (PG_VERSION exists); refusing to initdb over it"));
        }
        self.require_absent_or_empty()?;
        if superuser_password.contains(['\n', '\r']) {
            return Err(PgError::InvalidInput { what: "superuser password: must not contain a line break".into() });
        }
        prepare_dir(&data, 0o700, self.run_as.as_ref())
            .map_err(|e| PgError::io(format!("creating data directory {}", data.display()), e))?;

        let locale = if locale_available("C.UTF-8") { "C.UTF-8" } else { "C" };
        let mut args: Vec<OsString> = vec![
            "-D".into(),
            data.clone().into(),
            "--data-checksums".into(),
            "--encoding=UTF8".into(),
            format!("--locale={locale}").into(),
            format!("--username={}", self.superuser).into(),
            "--auth-local=trust".into(),
            "--auth-host=scram-sha-256".into(),
            "--no-instructions".into(),
        ];
        let _pwfile = if superuser_password.is_empty() {
            None
        } else {
            let guard = self.password_file(superuser_password)?;
            let mut arg = OsString::from("--pwfile=");
            arg.push(&guard.0);
            args.push(arg);
            Some(guard)
        };

        info!(data_dir = %data.display(), locale, "initializing a new cluster (initdb)");
        let cmd = self.command("initdb", &args);
        let shown = display_command("initdb", &args);
        let out = run(cmd, &shown, Duration::from_secs(600), true).await?;
        check_status(&shown, out)?;
        self.ensure_include()?;
        Ok(())
    }

    /// Writes `DATA/pgkeel.conf` (see [`conf::render`]) atomically, owned by `run_as`, mode
    /// 0600, and makes sure postgresql.conf includes it. Returns whether the content changed
    /// (the caller then reloads or restarts).
    pub fn write_conf(&self, conf: &ManagedConf) -> Result<bool, PgError> {
        self.require_dir()?;
        let changed = self.write_managed(CONF_FILE, conf::render(conf).as_bytes())?;
        self.ensure_include()?;
        Ok(changed)
    }

    /// Writes `DATA/pg_hba.conf`: trust on the local socket (its directory is 0700, so only the
    /// postgres OS user and root reach it); over TCP, replication only for
    /// `replication_user` and everything else for any role, all with SCRAM. The operator's
    /// lines (checked by the configuration), first the node's (`postgres.pg_hba` in node.toml),
    /// then the cluster's (`postgresql.pg_hba` in the cluster config), go between the
    /// replication lines and the catch-all ones, so they can allow more (a `cert` line) or
    /// refuse what pgkeel's last lines would let in (a `reject` line). Returns whether the
    /// content changed (the caller then reloads).
    pub fn write_hba(&self, replication_user: &str, node: &[String], cluster: &[String]) -> Result<bool, PgError> {
        self.require_dir()?;
        let repl = hba_token(replication_user)?;
        let mut extra = String::new();
        for (lines, source) in
            [(node, "postgres.pg_hba in node.toml"), (cluster, "postgresql.pg_hba in the cluster config")]
        {
            if !lines.is_empty() {
                extra.push_str(&format!("\n# The operator's lines ({source}).\n{}\n", lines.join("\n")));
            }
        }
        let content = format!(
            "# Managed by pgkeel. Rewritten by the agent: edits here are lost.\n\
             # TYPE  DATABASE     USER  ADDRESS  METHOD\n\
             \n\
             # The socket directory is private (0700): only the postgres OS user and root reach it.\n\
             local   all          all            trust\n\
             \n\
             # Streaming replication and cloning: the replication role only.\n\
             host    replication  {repl}  0.0.0.0/0  scram-sha-256\n\
             host    replication  {repl}  ::/0       scram-sha-256\n\
             {extra}\
             \n\
             # Everything else over TCP needs a password.\n\
             host    all          all   0.0.0.0/0  scram-sha-256\n\
             host    all          all   ::/0       scram-sha-256\n"
        );
        self.write_managed("pg_hba.conf", content.as_bytes())
    }

    /// Creates (`true`) or removes (`false`) `DATA/standby.signal`, which makes the next start
    /// a replica.
    ///
    /// Removing it from a running replica is refused: postgres deletes the file itself when
    /// it leaves recovery and fails fatally if it is already gone. Use [`Instance::promote`],
    /// or stop the server first.
    pub fn set_standby(&self, standby: bool) -> Result<(), PgError> {
        self.require_dir()?;
        let path = self.data().join("standby.signal");
        if !standby && path.exists() {
            if let Some(pid) = self.postmaster_pid() {
                return Err(self.bad_dir(&format!(
                    "postgres (pid {pid}) is running as a replica; removing standby.signal now would make its \
                     promotion fail. Promote it, or stop it first"
                )));
            }
        }
        if standby {
            if !path.exists() {
                File::create(&path).map_err(|e| PgError::io(format!("creating {}", path.display()), e))?;
            }
            chown_opt(&path, self.run_as.as_ref()).map_err(|e| PgError::io(format!("chown {}", path.display()), e))?;
        } else {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(PgError::io(format!("removing {}", path.display()), e)),
            }
        }
        Ok(())
    }

    /// The postmaster's pid from `DATA/postmaster.pid`, if that process is alive
    /// (`kill(pid, 0)` succeeds or fails with EPERM). On Linux, a zombie or a process that is
    /// not a postgres program (pid reused after a crash) counts as not running.
    pub fn postmaster_pid(&self) -> Option<i32> {
        crate::process::postmaster_pid(&self.data())
    }

    /// Starts postgres with `pg_ctl start -w` and waits until it accepts connections (a
    /// replica: read-only connections). Everything comes from the data directory's
    /// configuration. Already running is success.
    ///
    /// The postmaster is detached from the agent (its own session, output to `log_file`), so
    /// it survives the agent. On failure the error carries the last lines of the log. If the
    /// time runs out the server may still be starting: check [`Instance::postmaster_pid`].
    pub async fn start(&self, timeout: Duration) -> Result<(), PgError> {
        if !self.is_initialized() {
            return Err(self.bad_dir("holds no cluster (no PG_VERSION): initdb or clone first"));
        }
        if let Some(pid) = self.postmaster_pid() {
            info!(pid, data_dir = %self.data().display(), "postgres is already running");
            return Ok(());
        }
        let socket_dir = abs(&self.socket_dir);
        prepare_dir(&socket_dir, 0o700, self.run_as.as_ref())
            .map_err(|e| PgError::io(format!("preparing socket directory {}", socket_dir.display()), e))?;
        let log = self.prepare_log_file()?;

        let args: Vec<OsString> = vec![
            "start".into(),
            "-D".into(),
            self.data().into(),
            "-l".into(),
            log.clone().into(),
            "-w".into(),
            "-t".into(),
            whole_secs(timeout).to_string().into(),
        ];
        info!(data_dir = %self.data().display(), port = self.port, "starting postgres");
        let shown = display_command("pg_ctl", &args);
        let mut cmd = self.command("pg_ctl", &args);
        // pg_ctl's own output goes to an unlinked scratch file rather than a pipe: nothing the
        // server might inherit can then keep a pipe open and hang the read.
        let mut scratch = scratch_file().map_err(|e| PgError::io("creating a scratch file for pg_ctl output", e))?;
        let clone = |f: &File| f.try_clone().map_err(|e| PgError::io("duplicating scratch file", e));
        cmd.stdout(Stdio::from(clone(&scratch)?)).stderr(Stdio::from(clone(&scratch)?));
        let status = run(cmd, &shown, timeout + PG_CTL_GRACE, false).await?.status;
        if status.success() {
            info!(pid = ?self.postmaster_pid(), "postgres started");
            return Ok(());
        }
        let mut output = String::new();
        let _ = scratch.seek(SeekFrom::Start(0)).and_then(|_| scratch.read_to_string(&mut output));
        let tail = log_tail(&log, LOG_TAIL_LINES);
        Err(PgError::CommandFailed {
            command: shown,
            status: status.to_string(),
            output: format!("{}\n--- last lines of {} ---\n{}", output.trim(), log.display(), tail),
        })
    }

    /// Stops postgres with `pg_ctl stop -m mode -w`. Not running is success.
    pub async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<(), PgError> {
        let Some(pid) = self.postmaster_pid() else {
            debug!(data_dir = %self.data().display(), "stop: postgres is not running");
            return Ok(());
        };
        info!(pid, mode = mode.as_str(), "stopping postgres");
        let args: Vec<OsString> = vec![
            "stop".into(),
            "-D".into(),
            self.data().into(),
            "-m".into(),
            mode.as_str().into(),
            "-w".into(),
            "-t".into(),
            whole_secs(timeout).to_string().into(),
        ];
        match self.pg_ctl(&args, timeout + PG_CTL_GRACE).await {
            // It may have gone away between the check and pg_ctl: that is still "stopped".
            Err(e) if self.postmaster_pid().is_none() => {
                debug!(error = %e, "pg_ctl stop failed but postgres is not running");
                Ok(())
            }
            other => other,
        }
    }

    /// Promotes a replica with `pg_ctl promote -w` and waits until it accepts writes.
    pub async fn promote(&self, timeout: Duration) -> Result<(), PgError> {
        info!(data_dir = %self.data().display(), "promoting postgres");
        let args: Vec<OsString> = vec![
            "promote".into(),
            "-D".into(),
            self.data().into(),
            "-w".into(),
            "-t".into(),
            whole_secs(timeout).to_string().into(),
        ];
        self.pg_ctl(&args, timeout + PG_CTL_GRACE).await
    }

    /// Makes the running server re-read its configuration (`pg_ctl reload`).
    pub async fn reload(&self) -> Result<(), PgError> {
        info!(data_dir = %self.data().display(), "reloading postgres configuration");
        let args: Vec<OsString> = vec!["reload".into(), "-D".into(), self.data().into()];
        self.pg_ctl(&args, PG_CTL_GRACE).await
    }

    /// Reads the control file with `pg_controldata` (works while stopped).
    pub async fn controldata(&self) -> Result<ControlData, PgError> {
        let args: Vec<OsString> = vec!["-D".into(), self.data().into()];
        let shown = display_command("pg_controldata", &args);
        let out = run(self.command("pg_controldata", &args), &shown, Duration::from_secs(60), true).await?;
        let out = check_status(&shown, out)?;
        parse_controldata(&String::from_utf8_lossy(&out.stdout))
    }

    /// Clones a running member into the data directory with `pg_basebackup` (WAL streamed
    /// alongside, fast checkpoint on the source, optionally through the existing physical
    /// slot `slot`). The data directory must be absent or empty; it is created 0700 owned by
    /// `run_as`. The password goes through `PGPASSWORD`, never the command line.
    ///
    /// On failure nothing partial is left behind (a directory this call created is removed, a
    /// pre-existing empty one is emptied) and the error carries pg_basebackup's output.
    pub async fn basebackup(&self, source: &SourceConn, slot: Option<&str>, timeout: Duration) -> Result<(), PgError> {
        let data = self.data();
        self.require_absent_or_empty()?;
        let existed = data.exists();
        prepare_dir(&data, 0o700, self.run_as.as_ref())
            .map_err(|e| PgError::io(format!("creating data directory {}", data.display()), e))?;
        let mut args: Vec<OsString> = vec![
            "-D".into(),
            data.clone().into(),
            "-h".into(),
            source.host.clone().into(),
            "-p".into(),
            source.port.to_string().into(),
            "-U".into(),
            source.user.clone().into(),
            "-X".into(),
            "stream".into(),
            "--checkpoint=fast".into(),
            "--no-password".into(),
        ];
        if let Some(slot) = slot {
            args.push(format!("--slot={slot}").into());
        }
        info!(host = %source.host, port = source.port, user = %source.user, slot = ?slot, data_dir = %data.display(),
              "cloning from a running member (pg_basebackup)");
        let shown = display_command("pg_basebackup", &args);
        let mut cmd = self.command("pg_basebackup", &args);
        cmd.env("PGAPPNAME", "pgkeel_basebackup").env("PGCONNECT_TIMEOUT", "10");
        if let Some(pw) = &source.password {
            cmd.env("PGPASSWORD", pw);
        }
        let result = match run(cmd, &shown, timeout, true).await {
            Ok(out) => check_status(&shown, out).map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            warn!(error = %e, "clone failed; removing the partial data directory");
            let cleanup = if existed { empty_dir(&data) } else { remove_path(&data) };
            if let Err(ce) = cleanup {
                warn!(error = %ce, data_dir = %data.display(), "could not remove the partial clone");
            }
            return Err(e);
        }
        info!(data_dir = %data.display(), "clone finished");
        Ok(())
    }

    /// Runs crash recovery in single-user mode and exits: pg_rewind refuses a data directory
    /// whose postgres did not shut down cleanly, and a fenced or crashed primary did not.
    pub async fn recover_single_user(&self, timeout: Duration) -> Result<(), PgError> {
        let args: Vec<OsString> = vec![
            "--single".into(),
            "-F".into(),
            "-D".into(),
            self.data().into(),
            "-c".into(),
            "archive_mode=off".into(),
            "postgres".into(),
        ];
        let shown = display_command("postgres", &args);
        info!(data_dir = %self.data().display(), "crash recovery in single-user mode before pg_rewind");
        // stdin is /dev/null: single-user mode finishes recovery, reads EOF and shuts down.
        let out = run(self.command("postgres", &args), &shown, timeout, true).await?;
        check_status(&shown, out).map(|_| ())
    }

    /// Runs `CHECKPOINT` on `source` (a superuser connection). Right after a promotion the
    /// new primary's control file still names the old timeline until its first checkpoint
    /// completes, and pg_rewind would then conclude "no rewind required" and leave the
    /// diverged WAL in place.
    pub async fn checkpoint_source(source: &SourceConn, timeout: Duration) -> Result<(), PgError> {
        run_on_source(source, "CHECKPOINT", "CHECKPOINT on the new primary", timeout).await
    }

    /// Writes a little WAL on `source` (any role that can log in will do), to run right after
    /// `pg_rewind` from it. pg_rewind sets the rewound directory's minimum recovery point to
    /// the source's WAL insert position, and when that position is at a page boundary it lies
    /// past the page header, beyond everything the source has flushed. The standby then
    /// cannot reach a consistent state (nor accept connections) until the source writes
    /// again, which on an idle primary may be never. The write is the commit record of a
    /// transaction that only took an xid: postgres commits it asynchronously (no wait for
    /// synchronous standbys) and the WAL writer flushes it within `wal_writer_delay`.
    pub async fn advance_source_wal(source: &SourceConn, timeout: Duration) -> Result<(), PgError> {
        let sql = "SELECT txid_current()";
        run_on_source(source, sql, "a WAL write on the new primary after pg_rewind", timeout).await
    }

    /// Rewinds this (stopped, cleanly shut down) data directory onto `source`'s timeline with
    /// `pg_rewind`; `source` must be a superuser connection to the new primary. The data
    /// directory then needs standby configuration before it starts.
    pub async fn rewind(&self, source: &SourceConn, timeout: Duration) -> Result<(), PgError> {
        // The password travels in the environment, never on the command line.
        let without_password = SourceConn { password: None, ..source.clone() };
        let args: Vec<OsString> = vec![
            "--target-pgdata".into(),
            self.data().into(),
            "--source-server".into(),
            without_password.conninfo("pgkeel_rewind").into(),
            "--no-sync".into(),
        ];
        let shown = display_command("pg_rewind", &args);
        info!(host = %source.host, port = source.port, data_dir = %self.data().display(), "rewinding onto the new primary's timeline (pg_rewind)");
        let mut cmd = self.command("pg_rewind", &args);
        cmd.env("PGCONNECT_TIMEOUT", "10");
        if let Some(pw) = &source.password {
            cmd.env("PGPASSWORD", pw);
        }
        let out = run(cmd, &shown, timeout, true).await?;
        check_status(&shown, out).map(|_| ())?;
        info!(data_dir = %self.data().display(), "rewind finished");
        Ok(())
    }

    /// Renames the data directory to `<data_dir>.old` (replacing an older `.old`) and returns
    /// the new path: done before a fresh clone so that nothing is silently lost. Refused
    /// while postgres runs from it.
    pub fn move_aside(&self) -> Result<PathBuf, PgError> {
        let data = self.data();
        if let Some(pid) = self.postmaster_pid() {
            return Err(
                self.bad_dir(&format!("postgres (pid {pid}) is running from it; stop it before moving it aside"))
            );
        }
        if fs::symlink_metadata(&data).is_err() {
            return Err(self.bad_dir("does not exist, nothing to move aside"));
        }
        let mut old = data.clone().into_os_string();
        old.push(".old");
        let old = PathBuf::from(old);
        if fs::symlink_metadata(&old).is_ok() {
            warn!(path = %old.display(), "removing the previous moved-aside data directory");
            remove_path(&old).map_err(|e| PgError::io(format!("removing {}", old.display()), e))?;
        }
        fs::rename(&data, &old)
            .map_err(|e| PgError::io(format!("renaming {} to {}", data.display(), old.display()), e))?;
        warn!(from = %data.display(), to = %old.display(), "moved the data directory aside");
        Ok(old)
    }

    /// Connects as the superuser over the unix socket (database `postgres`, application_name
    /// `pgkeel`). The connection runs on a spawned task; it ends when the client is dropped.
    pub async fn connect(&self, timeout: Duration) -> Result<tokio_postgres::Client, PgError> {
        let socket_dir = abs(&self.socket_dir);
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&socket_dir)
            .port(self.port)
            .user(&self.superuser)
            .dbname("postgres")
            .application_name("pgkeel")
            .connect_timeout(timeout);
        let what = format!("connecting to postgres over {}/.s.PGSQL.{}", socket_dir.display(), self.port);
        let (client, connection) = tokio::time::timeout(timeout, cfg.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| PgError::Timeout { what: what.clone(), after: timeout })?
            .map_err(|e| PgError::sql(what, e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %crate::describe_sql_error(&e), "postgres connection ended");
            }
        });
        Ok(client)
    }

    /// Content of `DATA/pg_wal/<timeline as %08X>.history`, if present.
    pub fn read_timeline_history(&self, timeline: u32) -> Option<String> {
        fs::read_to_string(self.data().join("pg_wal").join(format!("{timeline:08X}.history"))).ok()
    }

    // ---- internals -------------------------------------------------------------------

    fn data(&self) -> PathBuf {
        abs(&self.data_dir)
    }

    fn bad_dir(&self, problem: &str) -> PgError {
        PgError::BadDataDir { path: self.data(), problem: problem.to_string() }
    }

    fn require_dir(&self) -> Result<(), PgError> {
        if self.data().is_dir() {
            Ok(())
        } else {
            Err(self.bad_dir("does not exist: initdb or clone first"))
        }
    }

    fn require_absent_or_empty(&self) -> Result<(), PgError> {
        let data = self.data();
        match fs::read_dir(&data) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    Err(self.bad_dir("is not empty; move it aside first (the agent keeps it as <data_dir>.old)"))
                } else {
                    Ok(())
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PgError::io(format!("reading {}", data.display()), e)),
        }
    }

    /// A `Command` for one postgres program, run as `run_as` (see the module doc).
    fn command(&self, prog: &str, args: &[OsString]) -> Command {
        let mut cmd = Command::new(self.bins.path(prog));
        cmd.args(args);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("LC_ALL", "C").current_dir("/").stdin(Stdio::null()).kill_on_drop(true);
        if let Some(r) = &self.run_as {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if r.uid != unsafe { libc::geteuid() } {
                cmd.uid(r.uid).gid(r.gid);
            }
            let home = self.data().parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
            cmd.env("HOME", home).env("USER", &r.name).env("LOGNAME", &r.name);
        }
        cmd
    }

    /// Runs `pg_ctl` with `args` and fails with its output when it fails.
    async fn pg_ctl(&self, args: &[OsString], limit: Duration) -> Result<(), PgError> {
        let shown = display_command("pg_ctl", args);
        let out = run(self.command("pg_ctl", args), &shown, limit, true).await?;
        check_status(&shown, out).map(|_| ())
    }

    /// Writes a file the agent manages inside the data directory: atomically, 0600, owned
    /// by `run_as`. Returns whether the content changed.
    fn write_managed(&self, name: &str, content: &[u8]) -> Result<bool, PgError> {
        let path = self.data().join(name);
        if fs::read(&path).map(|old| old == content).unwrap_or(false) {
            return Ok(false);
        }
        let tmp = self.data().join(format!(".{name}.pgkeel-tmp"));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(content)?;
            f.sync_all()?;
            chown_opt(&tmp, self.run_as.as_ref())?;
            fs::rename(&tmp, &path)?;
            // Make the rename durable; failure here only weakens crash safety.
            if let Ok(dir) = File::open(self.data()) {
                let _ = dir.sync_all();
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            PgError::io(format!("writing {}", path.display()), e)
        })?;
        debug!(path = %path.display(), "wrote managed file");
        Ok(true)
    }

    /// Appends [`INCLUDE_LINE`] to postgresql.conf unless it is already there.
    fn ensure_include(&self) -> Result<(), PgError> {
        let path = self.data().join("postgresql.conf");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.bad_dir("has no postgresql.conf; it was not created by initdb or a clone of one"))
            }
            Err(e) => return Err(PgError::io(format!("reading {}", path.display()), e)),
        };
        if has_include(&text) {
            return Ok(());
        }
        let sep = if text.is_empty() || text.ends_with('\n') { "" } else { "\n" };
        let addition =
            format!("{sep}\n# Added by pgkeel: settings managed by the agent. Keep this line last.\n{INCLUDE_LINE}\n");
        // Appending keeps the file's owner (the postgres user) and mode.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(addition.as_bytes()))
            .map_err(|e| PgError::io(format!("appending the pgkeel.conf include to {}", path.display()), e))?;
        Ok(())
    }

    /// Creates the initdb password file next to the data directory: 0600, owned by `run_as`.
    fn password_file(&self, password: &str) -> Result<RemoveOnDrop, PgError> {
        let dir = self.data().parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        let path = dir.join(format!(".pgkeel-initdb-pw.{}", std::process::id()));
        let _ = fs::remove_file(&path);
        let guard = RemoveOnDrop(path.clone());
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{password}\n").as_bytes()))
            .and_then(|_| chown_opt(&path, self.run_as.as_ref()))
            .map_err(|e| PgError::io(format!("writing password file {}", path.display()), e))?;
        Ok(guard)
    }

    /// Makes sure the log file exists and the postgres user can append to it.
    fn prepare_log_file(&self) -> Result<PathBuf, PgError> {
        let log = abs(&self.log_file);
        let ctx = |e| PgError::io(format!("preparing log file {}", log.display()), e);
        if let Some(parent) = log.parent() {
            fs::create_dir_all(parent).map_err(ctx)?;
        }
        OpenOptions::new().create(true).append(true).mode(0o640).open(&log).map_err(ctx)?;
        chown_opt(&log, self.run_as.as_ref()).map_err(ctx)?;
        Ok(log)
    }
}

/// Parses `pg_controldata` output (run with `LC_ALL=C`).
pub fn parse_controldata(text: &str) -> Result<ControlData, PgError> {
    let field = |label: &str| -> Result<&str, PgError> {
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == label)
            .map(|(_, v)| v.trim())
            .ok_or_else(|| PgError::Unexpected {
                source_name: "pg_controldata".into(),
                problem: format!("no {label:?} line"),
            })
    };
    let lsn = |label: &str| -> Result<u64, PgError> {
        let v = field(label)?;
        parse_lsn(v).ok_or_else(|| PgError::Unexpected {
            source_name: "pg_controldata".into(),
            problem: format!("{label:?} is not an LSN: {v:?}"),
        })
    };
    let tli = field("Latest checkpoint's TimeLineID")?;
    Ok(ControlData {
        system_identifier: field("Database system identifier")?.to_string(),
        state: field("Database cluster state")?.to_string(),
        timeline: tli.parse().map_err(|_| PgError::Unexpected {
            source_name: "pg_controldata".into(),
            problem: format!("TimeLineID is not a number: {tli:?}"),
        })?,
        checkpoint_lsn: lsn("Latest checkpoint location")?,
        min_recovery_end_lsn: lsn("Minimum recovery ending location")?,
        hot_standby_minimums: HOT_STANDBY_PARAMETERS
            .iter()
            .filter_map(|(name, label)| Some((name.to_string(), field(label).ok()?.parse().ok()?)))
            .collect(),
    })
}

/// Whether postgresql.conf already has the include line (spacing ignored, comments not).
fn has_include(text: &str) -> bool {
    let wanted: String = INCLUDE_LINE.split_whitespace().collect();
    text.lines().any(|l| l.split_whitespace().collect::<String>() == wanted)
}

fn abs(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Whole seconds for `pg_ctl -t`, at least 1.
fn whole_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

fn display_command(prog: &str, args: &[OsString]) -> String {
    let mut s = prog.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion and returns its status and output. With `capture`, stdout
/// and stderr are piped and collected; otherwise they must already be redirected.
///
/// The command gets its own process group: a Ctrl-C meant for the agent does not reach it,
/// and at the time limit (or when the caller drops this future) the whole group is killed —
/// pg_basebackup forks a WAL streaming process that must not outlive it. A postmaster started
/// by `pg_ctl start` is in its own session and is not affected.
async fn run(mut cmd: Command, shown: &str, limit: Duration, capture: bool) -> Result<Output, PgError> {
    if capture {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    cmd.process_group(0);
    debug!(command = %shown, "running");
    let mut child = cmd.spawn().map_err(|e| PgError::io(format!("starting `{shown}`"), e))?;
    let killer = KillGroupOnDrop(child.id().and_then(|id| i32::try_from(id).ok()));
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let finished =
        tokio::time::timeout(limit, async { tokio::join!(read_all(stdout), read_all(stderr), child.wait()) }).await;
    match finished {
        Ok((stdout, stderr, status)) => {
            killer.disarm();
            let status = status.map_err(|e| PgError::io(format!("waiting for `{shown}`"), e))?;
            Ok(Output { status, stdout, stderr })
        }
        Err(_) => {
            drop(killer);
            // Reap it so no zombie is left behind.
            let _ = child.wait().await;
            Err(PgError::Timeout { what: format!("`{shown}`"), after: limit })
        }
    }
}

async fn read_all<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_end(&mut buf).await;
    }
    buf
}

/// Kills a process group when dropped, unless disarmed after the leader was waited for.
struct KillGroupOnDrop(Option<i32>);

impl KillGroupOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.filter(|p| *p > 0) {
            // SAFETY: kill(2) with a negative pid signals the process group we created.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

fn check_status(shown: &str, out: Output) -> Result<Output, PgError> {
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let output =
        [stderr.trim(), stdout.trim()].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join("\n");
    Err(PgError::CommandFailed { command: shown.to_string(), status: out.status.to_string(), output })
}

/// An anonymous read/write file (created then unlinked right away).
fn scratch_file() -> io::Result<File> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".pgkeel-scratch-{}-{n}", std::process::id()));
        match OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path) {
            Ok(f) => {
                let _ = fs::remove_file(&path);
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1_000_000 => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The last `n` lines of a (possibly large) log file.
fn log_tail(path: &Path, n: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(could not read the log: {e})"),
    }
}

/// Removes a file, symlink or directory tree.
fn remove_path(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes everything inside a directory, keeping the directory.
fn empty_dir(path: &Path) -> io::Result<()> {
    for entry in fs::read_dir(path)? {
        remove_path(&entry?.path())?;
    }
    Ok(())
}

/// Whether the C library knows a locale (checked without touching this process's locale).
fn locale_available(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else { return false };
    // SAFETY: newlocale takes a valid NUL-terminated name and a null base; a non-null result
    // is freed right away.
    unsafe {
        let loc = libc::newlocale(libc::LC_ALL_MASK, c.as_ptr(), std::ptr::null_mut());
        if loc.is_null() {
            return false;
        }
        libc::freelocale(loc);
    }
    true
}

/// Deletes a file when dropped (the initdb password file, whatever happens).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_quoting() {
        let src =
            SourceConn { host: "10.0.0.1".into(), port: 5432, user: "repl".into(), password: Some("p w'\\".into()) };
        assert_eq!(
            src.conninfo("node 2"),
            "host=10.0.0.1 port=5432 user=repl password='p w\\'\\\\' application_name='node 2' sslmode=prefer connect_timeout=2"
        );
        let src = SourceConn { password: None, ..src };
        assert_eq!(
            src.conninfo("n2"),
            "host=10.0.0.1 port=5432 user=repl application_name=n2 sslmode=prefer connect_timeout=2"
        );
    }

    #[test]
    fn controldata_parsing() {
        let text = "pg_control version number:            1300\n\
                    Database system identifier:           7312345678901234567\n\
                    Database cluster state:               shut down in recovery\n\
                    Latest checkpoint location:           0/3000148\n\
                    Latest checkpoint's REDO location:    0/3000110\n\
                    Latest checkpoint's TimeLineID:       2\n\
                    Latest checkpoint's PrevTimeLineID:   1\n\
                    Minimum recovery ending location:     0/4000000\n\
                    Min recovery ending loc's timeline:   2\n\
                    max_connections setting:              100\n\
                    max_wal_senders setting:              10\n";
        let cd = parse_controldata(text).unwrap();
        assert_eq!(
            cd,
            ControlData {
                system_identifier: "7312345678901234567".into(),
                state: "shut down in recovery".into(),
                timeline: 2,
                checkpoint_lsn: 0x3000148,
                min_recovery_end_lsn: 0x4000000,
                hot_standby_minimums: [("max_connections".to_string(), 100), ("max_wal_senders".to_string(), 10)]
                    .into_iter()
                    .collect(),
            }
        );
        assert!(parse_controldata("nothing").is_err());
    }

    #[test]
    fn include_detection() {
        assert!(has_include("a = 1\ninclude_if_exists = 'pgkeel.conf'\n"));
        assert!(has_include("include_if_exists='pgkeel.conf'"));
        assert!(!has_include("#include_if_exists = 'pgkeel.conf'\n"));
        assert!(!has_include(""));
    }

    #[test]
    fn seconds_for_pg_ctl() {
        assert_eq!(whole_secs(Duration::from_millis(10)), 1);
        assert_eq!(whole_secs(Duration::from_millis(2500)), 3);
        assert_eq!(whole_secs(Duration::from_secs(60)), 60);
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("bg.pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("sleep 30 & echo $! > {}; wait", pidfile.display()));
        let started = std::time::Instant::now();
        let err = run(cmd, "sh", Duration::from_millis(500), true).await.unwrap_err();
        assert!(matches!(err, PgError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid: i32 = fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // The background sleep is gone (or a zombie waiting for init to reap it).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let state = fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()));
            if matches!(state, None | Some('Z') | Some('X')) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "background process {pid} survived: {state:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[tokio::test]
    async fn run_captures_output_and_status() {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo out; echo err >&2; exit 3");
        let out = run(cmd, "sh", Duration::from_secs(10), true).await.unwrap();
        assert_eq!(out.status.code(), Some(3));
        let err = check_status("sh -c ...", out).unwrap_err().to_string();
        assert!(err.contains("err\nout") && err.contains("exit status: 3"), "{err}");
    }

    #[test]
    fn tail_of_log() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("log");
        fs::write(&p, (1..=30).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
        let t = log_tail(&p, 3);
        assert_eq!(t, "line 28\nline 29\nline 30");
        assert!(log_tail(&tmp.path().join("missing"), 3).contains("could not read"));
    }
}
