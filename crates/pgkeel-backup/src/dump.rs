//! Logical dumps: `pg_dump -Fc` of each database (and `pg_dumpall --globals-only` for roles
//! and tablespaces) into the repository, with a manifest written last.
//!
//! ```text
//! REPO/<cluster>/dumps/<label>/globals.sql
//! REPO/<cluster>/dumps/<label>/db-<database>.dump       (custom format, compressed by pg_dump)
//! REPO/<cluster>/dumps/<label>/manifest.json             (written last)
//! ```
//!
//! Database names are written into keys with every byte but letters, digits, `_` and `-`
//! percent-encoded; the manifest maps each database to its file.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use pgkeel_pg::user::RunAs;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::backup::ConnectOptions;
use crate::codec::HashingWriter;
use crate::repo::{check_label, Repo};
use crate::storage::{WriteMode, WriteOutcome};

/// Current dump manifest format.
pub const FORMAT: u32 = 1;

/// One dumped file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpFile {
    /// The database (empty for the globals).
    pub database: String,
    /// Its name in the dump's directory.
    pub file: String,
    /// Size in bytes (as stored: pg_dump compresses custom-format dumps itself).
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// A logical dump's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpManifest {
    /// [`FORMAT`].
    pub format: u32,
    /// Label: the start time in UTC, `YYYYMMDDTHHMMSSZ` (`-2`... when taken).
    pub label: String,
    /// Cluster name.
    pub cluster: String,
    /// `server_version_num` of the source.
    pub server_version_num: u32,
    /// `pg_dump --version` of the pg_dump used.
    pub pg_dump_version: String,
    /// Start and end, by the database server's clock, microseconds since the epoch.
    pub start_time_us: i64,
    /// See [`DumpManifest::start_time_us`].
    pub stop_time_us: i64,
    /// Roles and tablespaces (`pg_dumpall --globals-only`, plain SQL).
    pub globals: DumpFile,
    /// One custom-format dump per database.
    pub databases: Vec<DumpFile>,
}

impl DumpManifest {
    /// Total stored size.
    pub fn size(&self) -> u64 {
        self.globals.size + self.databases.iter().map(|d| d.size).sum::<u64>()
    }
}

/// A dump found in the repository.
#[derive(Debug, Clone)]
pub struct DumpEntry {
    /// Its label.
    pub label: String,
    /// The manifest, when complete.
    pub manifest: Option<DumpManifest>,
    /// Why the manifest is missing or unreadable.
    pub problem: Option<String>,
}

fn manifest_key(repo: &Repo, label: &str) -> String {
    format!("{}/manifest.json", repo.dump_prefix(label))
}

/// `db-<name>.dump` with every byte but `[A-Za-z0-9_-]` percent-encoded.
pub fn dump_file_name(database: &str) -> String {
    let mut out = String::from("db-");
    for b in database.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str(".dump");
    out
}

/// Every dump of the cluster, complete or not, by label.
pub fn list_dumps(repo: &Repo) -> anyhow::Result<Vec<DumpEntry>> {
    let prefix = format!("{}/dumps", repo.cluster());
    let mut out = Vec::new();
    for label in repo.storage().list(&prefix)? {
        if check_label(&label).is_err() {
            continue;
        }
        let (manifest, problem) = match read_manifest(repo, &label) {
            Ok(Some(m)) => (Some(m), None),
            Ok(None) => (None, Some("incomplete: no manifest (interrupted or still running)".to_string())),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        out.push(DumpEntry { label, manifest, problem });
    }
    Ok(out)
}

/// A dump's manifest; `None` when it has none.
pub fn read_manifest(repo: &Repo, label: &str) -> anyhow::Result<Option<DumpManifest>> {
    check_label(label)?;
    let key = manifest_key(repo, label);
    let Some(bytes) = repo.storage().read(&key)? else { return Ok(None) };
    let m: DumpManifest = serde_json::from_slice(&bytes).with_context(|| format!("parsing {key}"))?;
    if m.label != label || m.cluster != repo.cluster() {
        bail!("{key} describes dump {:?} of cluster {:?}: it was moved or copied by hand", m.label, m.cluster);
    }
    Ok(Some(m))
}

/// What to dump.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// The server to dump (any member; a replica spares the primary).
    pub conn: ConnectOptions,
    /// Databases to dump; empty: every database that accepts connections (not templates).
    pub databases: Vec<String>,
    /// Where `pg_dump` and `pg_dumpall` are (default: the newest installed PostgreSQL).
    pub bin_dir: Option<PathBuf>,
    /// Run them as this OS user (when pgkeel runs as root).
    pub run_as: Option<RunAs>,
}

/// Dumps the databases into the repository; returns the manifest (written last).
pub async fn create_dump(repo: &Repo, opts: &DumpOptions) -> anyhow::Result<DumpManifest> {
    repo.check()?;
    let bins = pgkeel_pg::binaries::PgBinaries::discover(opts.bin_dir.as_deref())?;
    let (client, conn_task) = opts.conn.connect().await?;
    let result = async {
        let sql = |what: &'static str| {
            move |e: tokio_postgres::Error| anyhow::anyhow!("{what}: {}", pgkeel_pg::describe_sql_error(&e))
        };
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num'), (extract(epoch FROM clock_timestamp()) * 1000000)::int8",
                &[],
            )
            .await
            .map_err(sql("reading the server version"))?;
        let version: String = row.get(0);
        let version: u32 = version.parse().with_context(|| format!("bad server_version_num {version:?}"))?;
        let start_time_us: i64 = row.get(1);
        let rows = client
            .query("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1", &[])
            .await
            .map_err(sql("listing the databases"))?;
        let all: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let databases = if opts.databases.is_empty() {
            all.clone()
        } else {
            for d in &opts.databases {
                if !all.contains(d) {
                    bail!(
                        "no database {d:?} to dump (or it does not accept connections); there are: {}",
                        all.join(", ")
                    );
                }
            }
            opts.databases.clone()
        };
        Ok::<_, anyhow::Error>((version, start_time_us, databases))
    }
    .await;
    let (version, start_time_us, databases) = match result {
        Ok(r) => r,
        Err(e) => {
            conn_task.abort();
            return Err(e);
        }
    };

    let label = repo.claim_label(start_time_us, |l| repo.dump_prefix(l))?;
    info!(label = %label, databases = databases.len(), "starting logical dump");
    let pg_dump_version = {
        let out = Command::new(bins.path("pg_dump")).arg("--version").output();
        out.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
    };
    let globals = {
        let (repo, opts, bins, label) = (repo.clone(), opts.clone(), bins.clone(), label.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(bins.path("pg_dumpall"));
            cmd.args(["--globals-only", "--no-password", "-l", &opts.conn.dbname]);
            run_into(&repo, &label, "", "globals.sql", cmd, &opts)
        })
        .await
        .context("the dump task panicked")??
    };
    let mut files = Vec::new();
    for db in &databases {
        let (repo, opts, bins, label, db) = (repo.clone(), opts.clone(), bins.clone(), label.clone(), db.clone());
        let file = tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(bins.path("pg_dump"));
            cmd.args(["--format=custom", "--no-password"]).env("PGDATABASE", &db);
            run_into(&repo, &label, &db, &dump_file_name(&db), cmd, &opts)
        })
        .await
        .context("the dump task panicked")??;
        info!(database = %file.database, bytes = file.size, "database dumped");
        files.push(file);
    }
    let stop_time_us = client
        .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8", &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .map_err(|e| anyhow::anyhow!("reading the server clock: {}", pgkeel_pg::describe_sql_error(&e)));
    conn_task.abort();
    let manifest = DumpManifest {
        format: FORMAT,
        label: label.clone(),
        cluster: repo.cluster().to_string(),
        server_version_num: version,
        pg_dump_version,
        start_time_us,
        stop_time_us: stop_time_us?,
        globals,
        databases: files,
    };
    let key = manifest_key(repo, &label);
    let text = serde_json::to_vec_pretty(&manifest).context("serializing the dump manifest")?;
    if repo.storage().write(&key, &text, WriteMode::NoClobber).with_context(|| format!("writing {key}"))?
        == WriteOutcome::Exists
    {
        bail!("{key} already exists: another dump used the label {label}");
    }
    Ok(manifest)
}

/// Runs `cmd` (pg_dump or pg_dumpall) and streams its standard output into
/// `<dump>/<file>`, hashing it.
fn run_into(
    repo: &Repo,
    label: &str,
    database: &str,
    file: &str,
    mut cmd: Command,
    opts: &DumpOptions,
) -> anyhow::Result<DumpFile> {
    let c = &opts.conn;
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") && key != "PGDATABASE" {
            cmd.env_remove(&key);
        }
    }
    cmd.env("PGHOST", &c.host).env("PGPORT", c.port.to_string()).env("PGUSER", &c.user);
    cmd.env("PGAPPNAME", "pgkeel_dump").env("PGCONNECT_TIMEOUT", "10");
    if let Some(pw) = &c.password {
        cmd.env("PGPASSWORD", pw);
    }
    if let Some(r) = &opts.run_as {
        use std::os::unix::process::CommandExt;
        cmd.uid(r.uid).gid(r.gid).env("HOME", "/").env("USER", &r.name).env("LOGNAME", &r.name);
    }
    cmd.current_dir("/").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        bail!("{program}: no output pipes");
    };
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let key = format!("{}/{file}", repo.dump_prefix(label));
    let copied = (|| -> io::Result<_> {
        let writer = repo.storage().create(&key)?;
        let mut hashing = HashingWriter::new(writer);
        io::copy(&mut stdout, &mut hashing)?;
        hashing.flush()?;
        Ok(hashing.finish())
    })();
    let status = child.wait().with_context(|| format!("waiting for {program}"))?;
    let errors = errors.join().unwrap_or_default();
    let what = if database.is_empty() { "the globals".to_string() } else { format!("database {database:?}") };
    if !status.success() {
        bail!("{program} of {what} failed ({status}): {}", errors.trim());
    }
    let (writer, size, sha256) = copied.with_context(|| format!("storing the dump of {what} as {key}"))?;
    writer.commit(WriteMode::Overwrite).with_context(|| format!("storing {key}"))?;
    Ok(DumpFile { database: database.to_string(), file: file.to_string(), size, sha256 })
}

/// Writes the dump of `database` from dump `label` to `out` (the globals with
/// `database = None`), checking its size and SHA-256 at the end.
pub fn fetch_dump(repo: &Repo, label: &str, database: Option<&str>, out: &mut dyn Write) -> anyhow::Result<DumpFile> {
    repo.check()?;
    let m = read_manifest(repo, label)?
        .with_context(|| format!("no complete dump labelled {label:?}; `pgkeel dump list` shows the dumps"))?;
    let file = match database {
        None => m.globals.clone(),
        Some(db) => m.databases.iter().find(|d| d.database == db).cloned().with_context(|| {
            let names: Vec<&str> = m.databases.iter().map(|d| d.database.as_str()).collect();
            format!("dump {label} has no database {db:?}; it has: {}", names.join(", "))
        })?,
    };
    let key = format!("{}/{}", repo.dump_prefix(label), file.file);
    let mut src = repo.storage().open(&key)?.with_context(|| format!("dump {label}: {key} is missing"))?;
    let mut hashing = HashingWriter::new(out);
    io::copy(&mut src, &mut hashing).with_context(|| format!("copying {key}"))?;
    hashing.flush()?;
    let (_, size, sha) = hashing.finish();
    if size != file.size || sha != file.sha256 {
        bail!(
            "dump {label}: {key} is damaged: {size} bytes with sha256 {sha}, the manifest says {} bytes with sha256 {}; \
             do not use what was written",
            file.size,
            file.sha256
        );
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(dump_file_name("app"), "db-app.dump");
        assert_eq!(dump_file_name("my db/x.y"), "db-my%20db%2Fx%2Ey.dump");
        assert_eq!(dump_file_name("é"), "db-%C3%A9.dump");
        crate::storage::check_key(&dump_file_name("..")).unwrap();
    }
}
