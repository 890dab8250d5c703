//! Base backups with the non-exclusive low-level API.
//!
//! 1. One session runs `pg_backup_start(label, fast => true)` and stays open (closing it
//!    aborts the backup).
//! 2. The data directory is copied file by file by `jobs` threads, each file compressed with
//!    zstd and hashed (SHA-256 of the content as read). What postgres recreates or what
//!    must not be restored is left out (see [`classify`]). `global/pg_control` is copied
//!    last, after every other file: for a backup taken on a standby, recovery ends at the
//!    minimum recovery point recorded in it, which must cover everything copied before.
//! 3. `pg_backup_stop()` returns the stop LSN and the `backup_label` (and `tablespace_map`)
//!    contents; on a primary it waits until the last WAL segment is archived.
//! 4. The WAL from the start to the stop LSN must be in the archive (a standby does not
//!    archive itself; its primary does): pgkeel waits for it up to `wal_wait`.
//! 5. The manifest is written last. Until then the backup is incomplete and is never listed
//!    as valid nor restored.
//!
//! Differential (`diff`, compared with the newest full backup) and incremental (`incr`,
//! compared with the newest backup of any kind) backups work per file: a file whose size and
//! modification time match the reference's entry (its size alone when the reference was
//! taken from another copy of the data, e.g. another replica, where times differ) is re-read
//! and hashed (not compressed nor stored); when its SHA-256 matches too, the new manifest points at the object the earlier
//! backup stored ([`FileEntry::stored_in`]). Reading it after `pg_backup_start`'s checkpoint
//! gives the same guarantee as copying it: the bytes are those the earlier backup stored, and
//! WAL replay from the new start LSN repairs anything written after the read. Any other file
//! is copied. With no usable reference (none of this system, or another major version) the
//! backup is a full one, with a warning.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tracing::{info, warn};

use crate::codec::compress_stream;
use crate::manifest::{parse_backup_label, BackupKind, DirEntry, FileEntry, Manifest, FORMAT};
use crate::parallel;
use crate::progress::{Progress, ProgressReader};
use crate::repo::{check_label, Repo};
use crate::storage::{WriteMode, WriteOutcome};
use crate::walname::{valid_segment_size, SegmentName};

/// How to reach the postgres server whose data directory is backed up.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Host name, address, or unix socket directory (an absolute path).
    pub host: String,
    /// Port.
    pub port: u16,
    /// A superuser (or a role allowed to run `pg_backup_start`/`pg_backup_stop` and read
    /// `data_directory`).
    pub user: String,
    /// Database to connect to.
    pub dbname: String,
    /// Password, if the server asks for one.
    pub password: Option<String>,
}

impl ConnectOptions {
    pub(crate) fn config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        if self.host.starts_with('/') {
            c.host_path(&self.host);
        } else {
            c.host(&self.host);
        }
        c.port(self.port).user(&self.user).dbname(&self.dbname).application_name("pgkeel_backup");
        c.connect_timeout(Duration::from_secs(10));
        if let Some(pw) = &self.password {
            c.password(pw);
        }
        c
    }

    /// Connect, with the connection driven by a spawned task (abort it to close the session).
    pub(crate) async fn connect(
        &self,
    ) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>)> {
        let (client, connection) = self.config().connect(tokio_postgres::NoTls).await.map_err(|e| {
            anyhow::anyhow!(
                "connecting to postgres at {}:{} as {}: {}",
                self.host,
                self.port,
                self.user,
                pgkeel_pg::describe_sql_error(&e)
            )
        })?;
        Ok((client, tokio::spawn(connection)))
    }
}

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The server's data directory (must be the server's `data_directory`).
    pub pgdata: PathBuf,
    /// Connection to that server (primary or standby).
    pub conn: ConnectOptions,
    /// Parallel copy threads (1 to 16).
    pub jobs: usize,
    /// How long to wait for `pg_backup_stop` and for the WAL the backup needs to be archived.
    pub wal_wait: Duration,
    /// Show progress while copying (a bar on a terminal, log lines otherwise).
    pub progress: bool,
    /// Full, differential or incremental.
    pub kind: BackupKind,
}

/// What happens to one entry of the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Copied (a file) or walked into (a directory).
    Copy,
    /// A directory that is recreated empty: its contents are left out.
    EmptyDir,
    /// Left out altogether.
    Skip,
}

/// Directories whose contents are never copied (the directory itself is kept), as
/// pg_basebackup does: WAL comes from the archive; the rest postgres recreates or resets at
/// startup.
pub const EMPTY_DIRS: &[&str] =
    &["pg_wal", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots", "pg_stat_tmp", "pg_subtrans"];

/// Top-level files never copied: the running server's, the non-exclusive backup's own
/// outputs (written by restore from what `pg_backup_stop` returned), and signal files
/// (restore writes `recovery.signal`; a standby's `standby.signal` must not turn a
/// point-in-time restore into a replica).
pub const SKIP_TOP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "standby.signal",
    "recovery.signal",
    "recovery.conf",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
];

/// Classifies an entry by its path relative to the data directory (`/`-separated).
pub fn classify(rel: &str, is_dir: bool) -> Class {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    let top = !rel.contains('/');
    if name.starts_with("pgsql_tmp") || name == "pg_internal.init" || (name.starts_with('.') && name.ends_with("-tmp"))
    {
        return Class::Skip;
    }
    if is_dir {
        if top && EMPTY_DIRS.contains(&name) {
            return Class::EmptyDir;
        }
        return Class::Copy;
    }
    if top && SKIP_TOP_FILES.contains(&name) {
        return Class::Skip;
    }
    Class::Copy
}

/// A file to copy.
#[derive(Debug, Clone)]
struct Job {
    rel: String,
    size: u64,
    mode: u32,
    mtime_ns: i64,
}

/// Walks the data directory: the directories to recreate and the files to copy.
fn walk(pgdata: &Path) -> anyhow::Result<(Vec<DirEntry>, Vec<Job>)> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut stack: Vec<String> = vec![String::new()];
    while let Some(rel_dir) = stack.pop() {
        let abs_dir = if rel_dir.is_empty() { pgdata.to_path_buf() } else { pgdata.join(&rel_dir) };
        let entries = match fs::read_dir(&abs_dir) {
            Ok(e) => e,
            // Dropped while we walk (a database being dropped): WAL replay handles it.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !rel_dir.is_empty() => continue,
            Err(e) => return Err(e).with_context(|| format!("reading directory {}", abs_dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading directory {}", abs_dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                warn!(dir = %abs_dir.display(), name = ?name, "skipping a file whose name is not UTF-8");
                continue;
            };
            let rel = if rel_dir.is_empty() { name.to_string() } else { format!("{rel_dir}/{name}") };
            let meta = match fs::symlink_metadata(entry.path()) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", entry.path().display())),
            };
            let ft = meta.file_type();
            if ft.is_symlink() {
                if rel_dir == "pg_tblspc" {
                    bail!(
                        "the cluster has a tablespace (pg_tblspc/{name}); tablespaces are not supported by pgkeel \
                         backups yet"
                    );
                }
                if rel == "pg_wal" {
                    // A symlinked WAL directory: recreated as a plain (empty) directory.
                    dirs.push(DirEntry { path: rel, mode: 0o700 });
                    dirs.push(DirEntry { path: "pg_wal/archive_status".into(), mode: 0o700 });
                    continue;
                }
                warn!(path = %entry.path().display(), "skipping a symbolic link");
                continue;
            }
            let mode = meta.permissions().mode() & 0o7777;
            if ft.is_dir() {
                match classify(&rel, true) {
                    Class::Skip => {}
                    Class::EmptyDir => {
                        dirs.push(DirEntry { path: rel.clone(), mode });
                        if rel == "pg_wal" {
                            dirs.push(DirEntry { path: "pg_wal/archive_status".into(), mode });
                        }
                    }
                    Class::Copy => {
                        dirs.push(DirEntry { path: rel.clone(), mode });
                        stack.push(rel);
                    }
                }
            } else if ft.is_file() {
                if classify(&rel, false) == Class::Copy {
                    let mtime_ns = meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec());
                    files.push(Job { rel, size: meta.size(), mode, mtime_ns });
                }
            } else {
                warn!(path = %entry.path().display(), "skipping a special file");
            }
        }
    }
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((dirs, files))
}

/// Copies one file into the backup, or points at an earlier backup's copy when `prior` (the
/// reference backup's entry, with its holder resolved) has the same size, time and content;
/// `None` when the file vanished before it could be opened (WAL replay recreates or drops it).
fn copy_file(
    repo: &Repo,
    label: &str,
    pgdata: &Path,
    job: &Job,
    prior: Option<&FileEntry>,
    progress: &Progress,
) -> anyhow::Result<Option<FileEntry>> {
    let src = pgdata.join(&job.rel);
    if let Some(p) = prior.filter(|p| p.size == job.size && (p.mtime_ns == Some(job.mtime_ns) || p.mtime_ns.is_none()))
    {
        match File::open(&src) {
            Ok(f) => {
                let mut f = ProgressReader::new(f, progress);
                let (size, sha256) = crate::codec::hash_stream(&mut f)
                    .with_context(|| format!("reading {} (to compare it with the reference)", src.display()))?;
                if size == p.size && sha256 == p.sha256 {
                    return Ok(Some(FileEntry { mode: job.mode, ..p.clone() }));
                }
                // Changed after all: copied below (progress counts it twice; harmless).
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("opening {} (run the backup as root or as the user postgres runs as)", src.display())
                })
            }
        }
    }
    let f = match File::open(&src) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| {
                format!("opening {} (run the backup as root or as the user postgres runs as)", src.display())
            })
        }
    };
    let key = repo.backup_file_key(label, &job.rel);
    let writer = repo.storage().create(&key).with_context(|| format!("creating {key}"))?;
    let mut counting = CountingWriter { inner: writer, count: 0 };
    let mut f = ProgressReader::new(f, progress);
    let (size, sha256) =
        compress_stream(&mut f, &mut counting).with_context(|| format!("copying {} to {key}", src.display()))?;
    let stored_size = counting.count;
    counting.inner.commit(WriteMode::Overwrite).with_context(|| format!("storing {key}"))?;
    Ok(Some(FileEntry {
        path: job.rel.clone(),
        size,
        stored_size,
        sha256,
        mode: job.mode,
        mtime_ns: Some(job.mtime_ns),
        stored_in: None,
    }))
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Facts about the server gathered before the backup starts.
struct ServerInfo {
    version_num: u32,
    in_recovery: bool,
    system_identifier: String,
    wal_segment_size: u64,
    data_directory: String,
    archive_mode: String,
}

async fn server_info(client: &tokio_postgres::Client) -> anyhow::Result<ServerInfo> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num'), pg_is_in_recovery(), \
             (SELECT system_identifier::text FROM pg_control_system()), \
             (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'), \
             current_setting('data_directory'), current_setting('archive_mode')",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading server settings: {}", pgkeel_pg::describe_sql_error(&e)))?;
    let version: String = row.get(0);
    let seg: String = row.get(3);
    Ok(ServerInfo {
        version_num: version.parse().with_context(|| format!("bad server_version_num {version:?}"))?,
        in_recovery: row.get(1),
        system_identifier: row.get(2),
        wal_segment_size: seg.parse().with_context(|| format!("bad wal_segment_size {seg:?}"))?,
        data_directory: row.get(4),
        archive_mode: row.get(5),
    })
}

fn sql_err(what: &str) -> impl Fn(tokio_postgres::Error) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{what}: {}", pgkeel_pg::describe_sql_error(&e))
}

/// Takes a base backup of a running server into `repo`; returns its manifest.
pub async fn create_backup(repo: &Repo, opts: &BackupOptions) -> anyhow::Result<Manifest> {
    repo.check()?;
    let jobs = opts.jobs.clamp(1, 16);
    let pgdata = fs::canonicalize(&opts.pgdata)
        .with_context(|| format!("data directory {}: cannot resolve it", opts.pgdata.display()))?;
    let (client, conn_task) = opts.conn.connect().await?;
    let result = run_backup(repo, opts, &client, &pgdata, jobs).await;
    // Not awaited: after a timeout a query is still pending and the connection would wait
    // for its answer forever. Closing the session aborts a backup still in progress.
    conn_task.abort();
    drop(client);
    result
}

async fn run_backup(
    repo: &Repo,
    opts: &BackupOptions,
    client: &tokio_postgres::Client,
    pgdata: &Path,
    jobs: usize,
) -> anyhow::Result<Manifest> {
    let info = server_info(client).await?;
    if info.version_num < 130000 {
        bail!("postgres {} is too old: pgkeel backups need PostgreSQL 13 or newer", info.version_num);
    }
    let server_dir = fs::canonicalize(&info.data_directory).unwrap_or_else(|_| PathBuf::from(&info.data_directory));
    if server_dir != pgdata {
        bail!(
            "the server's data_directory is {}, not {}: pass the data directory of the server you connect to",
            info.data_directory,
            pgdata.display()
        );
    }
    if !valid_segment_size(info.wal_segment_size) {
        bail!("unexpected wal_segment_size {}", info.wal_segment_size);
    }
    if !info.in_recovery && info.archive_mode == "off" {
        bail!(
            "archive_mode is off on this primary: the backup would be unrestorable without its WAL. Set \
             archive_mode = on and archive_command = '<pgkeel> wal push --repo ... --cluster ... %p', restart, then \
             back up"
        );
    }
    let v15 = info.version_num >= 150000;
    let reference = choose_reference(repo, opts.kind, &info)?;
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let source = format!("{}:{}", host.trim(), pgdata.display());
    let kind = if reference.is_some() { opts.kind } else { BackupKind::Full };

    let row = client
        .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8", &[])
        .await
        .map_err(sql_err("reading the server clock"))?;
    let label = repo.claim_label(row.get(0), |l| repo.backup_prefix(l))?;
    check_label(&label)?;
    info!(
        label = %label, kind = kind.as_str(), reference = reference.as_ref().map(|r| r.label.as_str()),
        standby = info.in_recovery, jobs, "starting backup"
    );

    let start_sql =
        if v15 { "SELECT pg_backup_start($1, true)::text" } else { "SELECT pg_start_backup($1, true, false)::text" };
    let pg_label = format!("pgkeel {label}");
    client.query_one(start_sql, &[&pg_label]).await.map_err(sql_err("pg_backup_start"))?;
    let row = client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8, \
             pg_snapshot_xmin(pg_current_snapshot())::text",
            &[],
        )
        .await
        .map_err(sql_err("reading the start time and snapshot"))?;
    let start_time_us: i64 = row.get(0);
    let xmin_text: String = row.get(1);
    let start_xmin: u64 = xmin_text.parse().with_context(|| format!("bad snapshot xmin {xmin_text:?}"))?;

    // Copy while the session holds the backup open.
    let (dirs, files) = {
        let repo = repo.clone();
        let pgdata = pgdata.to_path_buf();
        let label = label.clone();
        let progress = opts.progress;
        let reference = reference.clone();
        let source = source.clone();
        tokio::task::spawn_blocking(move || {
            copy_all(&repo, &label, &pgdata, jobs, progress, reference.as_ref(), &source)
        })
        .await
        .context("the copy task panicked")??
    };

    let stop_sql = if v15 {
        "SELECT lsn::text, labelfile, coalesce(spcmapfile, '') FROM pg_backup_stop(true)"
    } else {
        "SELECT lsn::text, labelfile, coalesce(spcmapfile, '') FROM pg_stop_backup(false, true)"
    };
    let row = tokio::time::timeout(opts.wal_wait, client.query_one(stop_sql, &[]))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "pg_backup_stop did not return within {:?}: it waits until the last WAL segment is archived. Check \
                 that archive_command works (the server log says why it fails)",
                opts.wal_wait
            )
        })?
        .map_err(sql_err("pg_backup_stop"))?;
    let stop_lsn: String = row.get(0);
    let backup_label: String = row.get(1);
    let tablespace_map: String = row.get(2);
    let row = client
        .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8", &[])
        .await
        .map_err(sql_err("reading the server clock"))?;
    let stop_time_us: i64 = row.get(0);
    let (start_lsn, start_timeline) = parse_backup_label(&backup_label).map_err(anyhow::Error::msg)?;

    let manifest = Manifest {
        format: FORMAT,
        label: label.clone(),
        cluster: repo.cluster().to_string(),
        system_identifier: info.system_identifier,
        server_version_num: info.version_num,
        from_standby: info.in_recovery,
        kind,
        reference: reference.as_ref().map(|r| r.label.clone()),
        source: Some(source),
        pgkeel_version: env!("CARGO_PKG_VERSION").to_string(),
        start_time_us,
        stop_time_us,
        start_lsn: pgkeel_pg::lsn::format_lsn(start_lsn),
        stop_lsn,
        start_timeline,
        wal_segment_size: info.wal_segment_size,
        start_xmin,
        backup_label,
        tablespace_map,
        directories: dirs,
        files,
    };
    wait_for_wal(repo, &manifest, opts.wal_wait).await?;
    // A backup expired meanwhile would leave this one pointing at removed files.
    for dep in manifest.depends_on() {
        if repo.read_manifest(&dep)?.is_none() {
            bail!("backup {dep}, which stores files this backup shares, was removed while it ran: take it again");
        }
    }

    let key = repo.manifest_key(&label);
    let text = serde_json::to_vec_pretty(&manifest).context("serializing the manifest")?;
    let outcome = repo.storage().write(&key, &text, WriteMode::NoClobber).with_context(|| format!("writing {key}"))?;
    if outcome == WriteOutcome::Exists {
        bail!("{key} already exists: another backup used the label {label}");
    }
    info!(label = %label, files = manifest.files.len(), bytes = manifest.total_size(), "backup complete");
    Ok(manifest)
}

/// The backup a differential or incremental one is compared with: the newest complete one
/// of the same system and major version (a full one for `diff`). `None` for a full backup,
/// or when there is none (the backup is then a full one).
fn choose_reference(repo: &Repo, kind: BackupKind, info: &ServerInfo) -> anyhow::Result<Option<Manifest>> {
    if kind == BackupKind::Full {
        return Ok(None);
    }
    let found = repo
        .complete_backups()?
        .into_iter()
        .filter(|m| m.system_identifier == info.system_identifier)
        .filter(|m| m.server_version_num / 10000 == info.version_num / 10000)
        .filter(|m| kind == BackupKind::Incr || m.kind == BackupKind::Full)
        .max_by_key(|m| (m.stop_time_us, m.label.clone()));
    if found.is_none() {
        let (what, instead) =
            if kind == BackupKind::Diff { ("full backup", "a differential") } else { ("backup", "an incremental") };
        warn!(
            "no complete {what} of this system in {} to compare with: taking a full backup instead of {instead} one",
            repo.describe()
        );
    }
    Ok(found)
}

fn copy_all(
    repo: &Repo,
    label: &str,
    pgdata: &Path,
    jobs: usize,
    show_progress: bool,
    reference: Option<&Manifest>,
    source: &str,
) -> anyhow::Result<(Vec<DirEntry>, Vec<FileEntry>)> {
    let (dirs, mut files) = walk(pgdata)?;
    // The reference's entries, each pointing at the backup that stores it.
    // The reference's entries, each pointing at the backup that stores it; without their
    // times when the reference comes from another copy of the data (compared by content).
    let same_source = reference.is_some_and(|m| m.source.as_deref() == Some(source));
    let prior: std::collections::HashMap<&str, FileEntry> = reference
        .map(|m| {
            m.files
                .iter()
                .map(|f| {
                    let mtime_ns = if same_source { f.mtime_ns } else { None };
                    (f.path.as_str(), FileEntry { stored_in: Some(f.holder(m).to_string()), mtime_ns, ..f.clone() })
                })
                .collect()
        })
        .unwrap_or_default();
    let control = "global/pg_control";
    let control_job = files.iter().position(|f| f.rel == control).map(|i| files.remove(i));
    let Some(control_job) = control_job else {
        bail!("{} has no {control}: is it a data directory?", pgdata.display());
    };
    // Largest first, so one big file does not finish last on a single thread.
    files.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.rel.cmp(&b.rel)));
    let started = Instant::now();
    let total = files.iter().map(|f| f.size).sum::<u64>() + control_job.size;
    let progress = Progress::new(format!("backup {label}"), total, show_progress);
    let copied = parallel::try_for_each(&files, jobs, |job| {
        copy_file(repo, label, pgdata, job, prior.get(job.rel.as_str()), &progress)
    })?;
    let mut entries: Vec<FileEntry> = copied.into_iter().flatten().collect();
    if reference.is_some() {
        let shared = entries.iter().filter(|e| e.stored_in.is_some()).count();
        info!(shared, copied = entries.len() - shared, "files unchanged since the reference are not stored again");
    }
    // pg_control last (see the module doc), and always copied.
    let control_entry = copy_file(repo, label, pgdata, &control_job, None, &progress)?
        .with_context(|| format!("{control} vanished during the backup"))?;
    progress.finish();
    entries.push(control_entry);
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    info!(files = entries.len(), secs = started.elapsed().as_secs_f64(), "data files copied");
    Ok((dirs, entries))
}

/// Waits until every WAL segment from the backup's start to its stop is archived.
async fn wait_for_wal(repo: &Repo, m: &Manifest, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let segnos = m.required_segnos().map_err(anyhow::Error::msg)?;
    for segno in segnos {
        loop {
            if repo.find_segment(segno, m.wal_segment_size, m.start_timeline)?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let name = SegmentName::from_segno(m.start_timeline, segno, m.wal_segment_size);
                let hint = if m.from_standby {
                    "the backup was taken on a standby, whose primary archives the WAL: run SELECT pg_switch_wal() on \
                     the primary, or wait for archive_timeout, then take the backup again"
                } else {
                    "check that archive_command works (the server log says why it fails)"
                };
                bail!(
                    "WAL segment {name} (needed to restore backup {}) did not reach the archive within {limit:?}; {hint}. \
                     The backup was not marked complete",
                    m.label
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify("pg_wal", true), Class::EmptyDir);
        assert_eq!(classify("pg_replslot", true), Class::EmptyDir);
        assert_eq!(classify("pg_stat_tmp", true), Class::EmptyDir);
        assert_eq!(classify("base", true), Class::Copy);
        assert_eq!(classify("base/1/pgsql_tmp", true), Class::Skip);
        assert_eq!(classify("base/pgsql_tmp", true), Class::Skip);
        assert_eq!(classify("base/16384/pgsql_tmp123.4", false), Class::Skip);
        assert_eq!(classify("global/pg_internal.init", false), Class::Skip);
        assert_eq!(classify("base/1/pg_internal.init", false), Class::Skip);
        for f in ["postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map", "standby.signal"] {
            assert_eq!(classify(f, false), Class::Skip, "{f}");
        }
        assert_eq!(classify(".pgkeel.conf.pgkeel-tmp", false), Class::Skip);
        assert_eq!(classify("base/1/postmaster.pid", false), Class::Copy, "only top-level names are special");
        assert_eq!(classify("pg_wal", false), Class::Copy);
        assert_eq!(classify("global/pg_control", false), Class::Copy);
        assert_eq!(classify("postgresql.auto.conf", false), Class::Copy);
        assert_eq!(classify("pgkeel.conf", false), Class::Copy);
    }

    #[test]
    fn walk_a_fake_data_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for dir in ["base/1", "global", "pg_wal/archive_status", "pg_replslot/s1", "pg_tblspc", "base/pgsql_tmp"] {
            fs::create_dir_all(d.join(dir)).unwrap();
        }
        for f in [
            "PG_VERSION",
            "base/1/1259",
            "global/pg_control",
            "pg_wal/000000010000000000000001",
            "pg_replslot/s1/state",
            "postmaster.pid",
            "base/pgsql_tmp/pgsql_tmp1.0",
        ] {
            fs::write(d.join(f), f).unwrap();
        }
        let (dirs, files) = walk(d).unwrap();
        let dirs: Vec<&str> = dirs.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(dirs, ["base", "base/1", "global", "pg_replslot", "pg_tblspc", "pg_wal", "pg_wal/archive_status"]);
        let mut files: Vec<&str> = files.iter().map(|x| x.rel.as_str()).collect();
        files.sort();
        assert_eq!(files, ["PG_VERSION", "base/1/1259", "global/pg_control"]);

        std::os::unix::fs::symlink(tmp.path(), d.join("pg_tblspc/16400")).unwrap();
        let err = walk(d).unwrap_err().to_string();
        assert!(err.contains("tablespace"), "{err}");
    }
}
