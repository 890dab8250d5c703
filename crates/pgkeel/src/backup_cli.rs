//! `pgkeel wal push|fetch`, `pgkeel backup create|list|verify|expire`, `pgkeel restore` and
//! `pgkeel dump [list|fetch]`: argument parsing and output; the work is done by the
//! `pgkeel-backup` crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgGroup, Args, Subcommand};
use pgkeel_backup::expire::{parse_age, Retention};
use pgkeel_backup::restore::Target;
use pgkeel_backup::timefmt::format_utc;
use pgkeel_backup::{FetchOutcome, PushOutcome, Repo};
use serde_json::json;

/// The backup commands, flattened into the top-level command list.
#[derive(Subcommand, Debug)]
pub enum Commands {
    /// The WAL archive: archive_command and restore_command.
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
    /// Base backups: create, list, verify.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Restore a backup into a new data directory and configure point-in-time recovery.
    Restore(RestoreArgs),
    /// Logical dumps: `pgkeel dump` runs pg_dump (custom format) of every database (or those
    /// named with --database) into the repository; `dump list`; `dump fetch`.
    #[command(args_conflicts_with_subcommands = true)]
    Dump {
        #[command(subcommand)]
        command: Option<DumpCommand>,
        #[command(flatten)]
        create: Box<DumpArgs>,
    },
}

/// `pgkeel dump` (create).
#[derive(Args, Debug)]
pub struct DumpArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// A database to dump (repeat for several). Default: every database that accepts
    /// connections, templates excepted.
    #[arg(long = "database", value_name = "DB")]
    pub databases: Vec<String>,
    /// When run as root: the OS user to run pg_dump as.
    #[arg(long, default_value = "postgres")]
    pub os_user: String,
}

/// `pgkeel dump list|fetch`
#[derive(Subcommand, Debug)]
pub enum DumpCommand {
    /// List the logical dumps.
    List {
        #[command(flatten)]
        repo: RepoArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write one database's dump (custom format, for pg_restore) to standard output or a
    /// file, checked against its SHA-256. Without DB and with --globals: the roles and
    /// tablespaces (plain SQL, for psql).
    Fetch {
        #[command(flatten)]
        repo: RepoArgs,
        /// The dump's label (see `dump list`).
        label: String,
        /// The database.
        #[arg(required_unless_present = "globals")]
        database: Option<String>,
        /// Fetch the globals (roles, tablespaces) instead of a database.
        #[arg(long, conflicts_with = "database")]
        globals: bool,
        /// Write to this file (created; replaced only once complete and checked) instead of
        /// standard output.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// Runs a backup command; returns the process exit code.
pub fn run(cmd: Commands) -> ExitCode {
    match cmd {
        Commands::Wal { command } => wal(command),
        Commands::Backup { command } => crate::report(backup(command)),
        Commands::Restore(args) => crate::report(restore(args)),
        Commands::Dump { command: None, create } => crate::report(dump_create(*create)),
        Commands::Dump { command: Some(command), .. } => crate::report(dump(command)),
    }
}

/// Which repository and cluster.
#[derive(Args, Debug, Clone)]
pub struct RepoArgs {
    /// Repository: a directory, or an S3-compatible bucket as s3://BUCKET/PREFIX (endpoint,
    /// region and credentials from --s3-config, else node.toml's [backup.s3], else
    /// PGKEEL_S3_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY). Default:
    /// `backup.repo` from --config. A directory must exist and be writable by the OS user
    /// postgres runs as (archive_command runs as that user).
    #[arg(long, env = "PGKEEL_REPO", value_name = "DIR|URL")]
    pub repo: Option<String>,
    /// A TOML file with the keys of node.toml's [backup.s3] (endpoint, region,
    /// access_key_id, secret_access_key) for an s3:// repository. The agent writes one for
    /// archive_command.
    #[arg(long, value_name = "FILE")]
    pub s3_config: Option<PathBuf>,
    /// Cluster name in the repository (default: `cluster` from --config).
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// A node.toml: gives the cluster name (and, for `backup create`, the data directory and
    /// how to connect).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `pgkeel wal ...`
#[derive(Subcommand, Debug)]
pub enum WalCommand {
    /// Archive one WAL file; use as `archive_command = 'pgkeel wal push --repo DIR --cluster NAME %p'`.
    /// Already archived with the same content: success. With different content: failure, and
    /// the archived copy is kept.
    Push {
        #[command(flatten)]
        repo: RepoArgs,
        /// The file to archive (`%p`).
        path: PathBuf,
    },
    /// Restore one archived WAL file; use as
    /// `restore_command = 'pgkeel wal fetch --repo DIR --cluster NAME %f %p'`.
    /// Exit 1: not in the archive. Exit 200: in the archive but unusable (corrupt, I/O error),
    /// which makes postgres stop recovery instead of ending it early.
    Fetch {
        #[command(flatten)]
        repo: RepoArgs,
        /// The archived file's name (`%f`).
        name: String,
        /// Where to write it (`%p`).
        path: PathBuf,
    },
}

/// How `backup create` reaches postgres.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// The server's data directory (default: `data_dir` from --config).
    #[arg(long, value_name = "DIR")]
    pub pgdata: Option<PathBuf>,
    /// Host name or unix socket directory (default: from --config, else PGHOST, else
    /// /var/run/postgresql).
    #[arg(long)]
    pub host: Option<String>,
    /// Port (default: from --config, else PGPORT, else 5432).
    #[arg(long)]
    pub port: Option<u16>,
    /// Superuser to connect as (default: from --config, else PGUSER, else postgres).
    #[arg(long)]
    pub user: Option<String>,
    /// Database to connect to.
    #[arg(long, default_value = "postgres")]
    pub dbname: String,
}

/// `pgkeel backup ...`
#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Take a base backup of a running server (a primary or a standby; a standby spares
    /// the primary the reads). Password, if needed: PGPASSWORD.
    Create {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        conn: ConnArgs,
        /// full: every file. diff: only the files changed since the newest full backup. incr:
        /// only the files changed since the newest backup of any type. Unchanged files are
        /// shared with the earlier backup; with no earlier backup, a full one is taken.
        #[arg(long = "type", value_name = "TYPE", default_value = "full", value_parser = parse_kind)]
        kind: pgkeel_backup::manifest::BackupKind,
        /// Parallel copy threads.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
        jobs: u16,
        /// Seconds to wait for pg_backup_stop and for the backup's WAL to reach the archive.
        #[arg(long, default_value_t = 300)]
        wal_wait: u64,
    },
    /// List the backups (complete and incomplete).
    List {
        #[command(flatten)]
        repo: RepoArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-read every file of a backup and check it against the manifest, and check the WAL
    /// it needs is archived and intact. Exit 1 naming each damaged or missing file.
    Verify {
        #[command(flatten)]
        repo: RepoArgs,
        /// The backup's label (see `backup list`).
        label: String,
        /// Parallel threads.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
        jobs: u16,
    },
    /// Remove old backups and the WAL only they needed: keep the newest N complete backups
    /// (--keep) and/or a recovery window (--max-age: every backup that ended within it and the
    /// newest one before it). A kept diff or incr backup keeps the backups it shares files
    /// with. The newest complete backup is always kept; incomplete backups
    /// untouched for over an hour are removed; WAL before the oldest kept backup's start is
    /// removed (timeline history files are kept). With --dumps: the logical dumps instead.
    #[command(group(ArgGroup::new("rule").required(true).multiple(true).args(["keep", "max_age"])))]
    Expire {
        #[command(flatten)]
        repo: RepoArgs,
        /// Keep the newest N complete backups.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        keep: Option<u64>,
        /// Keep a recovery window this long, e.g. 14d, 36h, 2w.
        #[arg(long, value_name = "AGE")]
        max_age: Option<String>,
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Apply the rules to the logical dumps (`pgkeel dump`) instead of the base backups.
        #[arg(long)]
        dumps: bool,
    },
}

/// `pgkeel restore`
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("target").required(true).multiple(false)
    .args(["target_time", "target_lsn", "target_xid", "target_name", "latest"])))]
pub struct RestoreArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The new data directory (absent or empty).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// The backup to restore (default: the newest that ends before the target).
    #[arg(long, value_name = "LABEL")]
    pub backup: Option<String>,
    /// Recover up to this time, with a UTC offset, e.g. "2024-05-01 12:30:00+00".
    #[arg(long, value_name = "TIME")]
    pub target_time: Option<String>,
    /// Recover up to this LSN, e.g. 0/3000148.
    #[arg(long, value_name = "LSN")]
    pub target_lsn: Option<String>,
    /// Recover up to the commit of this transaction id.
    #[arg(long, value_name = "XID")]
    pub target_xid: Option<u64>,
    /// Recover up to this named restore point (pg_create_restore_point).
    #[arg(long, value_name = "NAME")]
    pub target_name: Option<String>,
    /// Recover all the archived WAL.
    #[arg(long)]
    pub latest: bool,
    /// When run as root: the OS user postgres will run as, who gets the restored files.
    #[arg(long, default_value = "postgres")]
    pub os_user: String,
    /// Parallel threads.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub jobs: u16,
}

/// The repository, its location (an absolute directory or an s3:// URL) and, when --config
/// was given, the node's configuration.
fn open_repo(args: &RepoArgs) -> anyhow::Result<(Repo, String, Option<pgkeel_config::NodeConfig>)> {
    let config = match &args.config {
        Some(path) => Some(pgkeel_config::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?),
        None => None,
    };
    let configured = config.as_ref().and_then(|c| c.backup.repo.as_ref()).map(|p| p.display().to_string());
    let Some(location) = args.repo.clone().or(configured) else {
        bail!(
            "say where the repository is: --repo DIR or --repo s3://BUCKET/PREFIX (or PGKEEL_REPO), or --config with \
             backup.repo set"
        );
    };
    let cluster = match (&args.cluster, &config) {
        (Some(c), _) => c.clone(),
        (None, Some(cfg)) => cfg.cluster.clone(),
        (None, None) => bail!("say which cluster: --cluster NAME, or --config node.toml"),
    };
    let location = if pgkeel_backup::s3::is_s3_url(&location) {
        location
    } else {
        let path = PathBuf::from(&location);
        std::path::absolute(&path).unwrap_or(path).display().to_string()
    };
    let s3 = match (&args.s3_config, &config) {
        (Some(path), _) => pgkeel_config::S3Settings::load(path)?,
        (None, Some(c)) => c.backup.s3.clone().unwrap_or_default(),
        (None, None) => Default::default(),
    };
    Ok((Repo::open_with(&location, &cluster, &s3)?, location, config))
}

/// Runs `pgkeel wal push|fetch` and returns the exit code postgres expects.
pub fn wal(cmd: WalCommand) -> ExitCode {
    match cmd {
        WalCommand::Push { repo, path } => {
            let result = open_repo(&repo).and_then(|(r, _, _)| r.push_wal(&path));
            match result {
                Ok(PushOutcome::Stored) => ExitCode::SUCCESS,
                Ok(PushOutcome::AlreadyArchived) => {
                    eprintln!("pgkeel: {} was already archived with identical content", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: wal push {}: {e:#}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
        WalCommand::Fetch { repo, name, path } => {
            let result = open_repo(&repo).and_then(|(r, _, _)| r.fetch_wal(&name, &path));
            match result {
                Ok(FetchOutcome::Restored) => ExitCode::SUCCESS,
                Ok(FetchOutcome::Missing) => {
                    eprintln!("pgkeel: {name} is not in the archive");
                    ExitCode::from(pgkeel_backup::EXIT_FETCH_MISSING)
                }
                Err(e) => {
                    eprintln!("error: wal fetch {name}: {e:#}");
                    ExitCode::from(pgkeel_backup::EXIT_FETCH_ABORT)
                }
            }
        }
    }
}

/// Runs `pgkeel backup ...`.
pub fn backup(cmd: BackupCommand) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Create { repo, conn, kind, jobs, wal_wait } => {
            let (repo, _, config) = open_repo(&repo)?;
            let mut opts = backup_options(&conn, config.as_ref(), jobs, wal_wait)?;
            opts.kind = kind;
            let m = crate::runtime().block_on(pgkeel_backup::create_backup(&repo, &opts))?;
            let shared = match &m.reference {
                Some(r) => format!(
                    ", {} of them unchanged since {r} and not stored again",
                    m.files.iter().filter(|f| f.stored_in.is_some()).count()
                ),
                None => String::new(),
            };
            println!(
                "backup {} complete ({}): {} files{shared}, {} ({} stored), WAL {} to {} on timeline {}{}",
                m.label,
                m.kind.as_str(),
                m.files.len(),
                human_bytes(m.total_size()),
                human_bytes(m.stored_size()),
                m.start_lsn,
                m.stop_lsn,
                m.start_timeline,
                if m.from_standby { ", taken on a standby" } else { "" }
            );
            Ok(())
        }
        BackupCommand::List { repo, json } => {
            let (repo, _, _) = open_repo(&repo)?;
            repo.check()?;
            list(&repo, json)
        }
        BackupCommand::Verify { repo, label, jobs } => {
            let (repo, _, _) = open_repo(&repo)?;
            let report = pgkeel_backup::verify_backup(&repo, &label, usize::from(jobs))?;
            if report.problems.is_empty() {
                println!(
                    "backup {label}: OK ({} files and {} WAL segments verified)",
                    report.files_checked, report.wal_checked
                );
                return Ok(());
            }
            for p in &report.problems {
                println!("{p}");
            }
            bail!("backup {label} is damaged: {} problem(s), listed above", report.problems.len())
        }
        BackupCommand::Expire { repo, keep, max_age, dry_run, dumps } => {
            let (repo, _, _) = open_repo(&repo)?;
            let max_age_us = max_age.as_deref().map(parse_age).transpose().map_err(anyhow::Error::msg)?;
            let rules = Retention { keep: keep.map(|k| usize::try_from(k).unwrap_or(usize::MAX)), max_age_us };
            let report = if dumps {
                pgkeel_backup::expire::expire_dumps(&repo, &rules, dry_run)?
            } else {
                pgkeel_backup::expire::expire_backups(&repo, &rules, dry_run)?
            };
            print_expire(&report, if dumps { "dump" } else { "backup" });
            Ok(())
        }
    }
}

fn print_expire(r: &pgkeel_backup::expire::ExpireReport, what: &str) {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    for x in &r.removed {
        println!("{verb} {what} {} ({}): {}", x.label, human_bytes(x.bytes), x.reason);
    }
    if r.removed.is_empty() {
        println!("no {what} to remove");
    }
    println!("kept {} {what}(s): {}", r.kept.len(), r.kept.join(", "));
    if let Some(first) = &r.wal_kept_from {
        println!("{verb} {} WAL file(s) ({}) before {first}", r.wal_files, human_bytes(r.wal_bytes));
    }
    if r.dry_run {
        println!("dry run: nothing was removed");
    }
}

/// Runs `pgkeel dump` (create).
fn dump_create(args: DumpArgs) -> anyhow::Result<()> {
    let (repo, _, config) = open_repo(&args.repo)?;
    let conn = conn_options(&args.conn, config.as_ref())?;
    let opts = pgkeel_backup::dump::DumpOptions {
        conn,
        databases: args.databases.clone(),
        bin_dir: config.as_ref().and_then(|c| c.postgres.bin_dir.clone()),
        run_as: pgkeel_pg::user::run_as_for(&args.os_user)?,
    };
    let m = crate::runtime().block_on(pgkeel_backup::dump::create_dump(&repo, &opts))?;
    let names: Vec<&str> = m.databases.iter().map(|d| d.database.as_str()).collect();
    println!(
        "dump {} complete: {} database(s) ({}) and the globals, {}",
        m.label,
        m.databases.len(),
        names.join(", "),
        human_bytes(m.size())
    );
    Ok(())
}

/// Runs `pgkeel dump list|fetch`.
fn dump(cmd: DumpCommand) -> anyhow::Result<()> {
    match cmd {
        DumpCommand::List { repo, json } => {
            let (repo, _, _) = open_repo(&repo)?;
            repo.check()?;
            let entries = pgkeel_backup::dump::list_dumps(&repo)?;
            if json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|e| match &e.manifest {
                        Some(m) => json!({
                            "label": e.label,
                            "status": "complete",
                            "start_time": format_utc(m.start_time_us),
                            "stop_time": format_utc(m.stop_time_us),
                            "server_version_num": m.server_version_num,
                            "databases": m.databases.iter().map(|d| json!({
                                "name": d.database, "size": d.size, "sha256": d.sha256,
                            })).collect::<Vec<_>>(),
                            "size": m.size(),
                        }),
                        None => json!({ "label": e.label, "status": "incomplete", "problem": e.problem }),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if entries.is_empty() {
                println!("no dumps of cluster {} in {}", repo.cluster(), repo.storage().describe());
                return Ok(());
            }
            let mut rows =
                vec![["Label".to_string(), "Status".into(), "Time (UTC)".into(), "Size".into(), "Databases".into()]];
            for e in &entries {
                rows.push(match &e.manifest {
                    Some(m) => [
                        e.label.clone(),
                        "complete".into(),
                        format_utc(m.start_time_us).chars().take(19).collect(),
                        human_bytes(m.size()),
                        m.databases.iter().map(|d| d.database.as_str()).collect::<Vec<_>>().join(", "),
                    ],
                    None => [e.label.clone(), "incomplete".into(), String::new(), String::new(), String::new()],
                });
            }
            print_table(&rows);
            Ok(())
        }
        DumpCommand::Fetch { repo, label, database, globals: _, output } => {
            let (repo, _, _) = open_repo(&repo)?;
            match output {
                Some(path) => {
                    let tmp = path.with_extension("partial");
                    let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                    let result = pgkeel_backup::dump::fetch_dump(&repo, &label, database.as_deref(), &mut f)
                        .and_then(|d| f.sync_all().map(|_| d).map_err(anyhow::Error::from));
                    match result {
                        Ok(_) => {
                            std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
                        }
                        Err(e) => {
                            let _ = std::fs::remove_file(&tmp);
                            Err(e)
                        }
                    }
                }
                None => {
                    use std::io::IsTerminal;
                    if std::io::stdout().is_terminal() {
                        bail!("the dump is binary: redirect standard output to a file, or use --output FILE");
                    }
                    let mut out = std::io::stdout().lock();
                    pgkeel_backup::dump::fetch_dump(&repo, &label, database.as_deref(), &mut out)?;
                    Ok(())
                }
            }
        }
    }
}

fn print_table<const N: usize>(rows: &[[String; N]]) {
    let widths: Vec<usize> = (0..N).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn backup_options(
    conn: &ConnArgs,
    config: Option<&pgkeel_config::NodeConfig>,
    jobs: u16,
    wal_wait: u64,
) -> anyhow::Result<pgkeel_backup::BackupOptions> {
    let pgdata = match (&conn.pgdata, config) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => c.data_dir.clone(),
        (None, None) => bail!("say which data directory to back up: --pgdata DIR (or --config node.toml)"),
    };
    Ok(pgkeel_backup::BackupOptions {
        pgdata,
        conn: conn_options(conn, config)?,
        jobs: usize::from(jobs),
        wal_wait: Duration::from_secs(wal_wait.max(1)),
        progress: true,
        kind: pgkeel_backup::manifest::BackupKind::Full,
    })
}

fn parse_kind(s: &str) -> Result<pgkeel_backup::manifest::BackupKind, String> {
    pgkeel_backup::manifest::BackupKind::parse(s)
}

/// How to connect, from the arguments, the node's configuration and the PG* variables.
fn conn_options(
    conn: &ConnArgs,
    config: Option<&pgkeel_config::NodeConfig>,
) -> anyhow::Result<pgkeel_backup::ConnectOptions> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    // The agent's socket directory is `run` next to the data directory.
    let config_socket = config.and_then(|c| c.data_dir.parent().map(|p| p.join("run").display().to_string()));
    let config_port = config.and_then(|c| c.postgres.listen.rsplit_once(':').and_then(|(_, p)| p.parse().ok()));
    let host = conn.host.clone().or(config_socket).or_else(|| env("PGHOST")).unwrap_or("/var/run/postgresql".into());
    let port = match conn.port.or(config_port) {
        Some(p) => p,
        None => match env("PGPORT") {
            Some(p) => p.parse().with_context(|| format!("PGPORT={p:?} is not a port"))?,
            None => 5432,
        },
    };
    let user = conn
        .user
        .clone()
        .or_else(|| config.map(|c| c.postgres.superuser.username.clone()))
        .or_else(|| env("PGUSER"))
        .unwrap_or("postgres".into());
    let password = env("PGPASSWORD").or_else(|| config.and_then(|c| c.postgres.superuser.password.clone()));
    let host = if host.starts_with('/') { host } else { host.trim().to_string() };
    Ok(pgkeel_backup::ConnectOptions { host, port, user, dbname: conn.dbname.clone(), password })
}

fn list(repo: &Repo, json: bool) -> anyhow::Result<()> {
    let entries = repo.list_backups()?;
    if json {
        let v: Vec<_> = entries
            .iter()
            .map(|e| match &e.manifest {
                Some(m) => json!({
                    "label": e.label,
                    "status": "complete",
                    "type": m.kind.as_str(),
                    "reference": m.reference,
                    "depends_on": m.depends_on(),
                    "start_time": format_utc(m.start_time_us),
                    "stop_time": format_utc(m.stop_time_us),
                    "start_lsn": m.start_lsn,
                    "stop_lsn": m.stop_lsn,
                    "timeline": m.start_timeline,
                    "from_standby": m.from_standby,
                    "system_identifier": m.system_identifier,
                    "server_version_num": m.server_version_num,
                    "files": m.files.len(),
                    "size": m.total_size(),
                    "stored_size": m.stored_size(),
                }),
                None => json!({ "label": e.label, "status": "incomplete", "problem": e.problem }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no backups of cluster {} in {}", repo.cluster(), repo.storage().describe());
        return Ok(());
    }
    let mut rows = vec![[
        "Label".to_string(),
        "Type".into(),
        "Status".into(),
        "Stop time (UTC)".into(),
        "Start LSN".into(),
        "Stop LSN".into(),
        "TL".into(),
        "From".into(),
        "Size".into(),
        "Stored".into(),
    ]];
    for e in &entries {
        rows.push(match &e.manifest {
            Some(m) => [
                e.label.clone(),
                match &m.reference {
                    Some(r) => format!("{} of {r}", m.kind.as_str()),
                    None => m.kind.as_str().into(),
                },
                "complete".into(),
                format_utc(m.stop_time_us).trim_end_matches("+00").chars().take(19).collect(),
                m.start_lsn.clone(),
                m.stop_lsn.clone(),
                m.start_timeline.to_string(),
                if m.from_standby { "standby" } else { "primary" }.into(),
                human_bytes(m.total_size()),
                human_bytes(m.stored_size()),
            ],
            None => [
                e.label.clone(),
                String::new(),
                "incomplete".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
        });
    }
    print_table(&rows);
    Ok(())
}

/// Runs `pgkeel restore`.
pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let (repo, root, _) = open_repo(&args.repo)?;
    let target = Target::from_options(
        ["--target-time", "--target-lsn", "--target-xid", "--target-name"],
        args.target_time.as_deref(),
        args.target_lsn.as_deref(),
        args.target_xid,
        args.target_name.as_deref(),
    )?;
    let exe = std::env::current_exe().context("finding the path of this pgkeel binary for restore_command")?;
    let run_as = pgkeel_pg::user::run_as_for(&args.os_user)?;
    let opts = pgkeel_backup::RestoreOptions {
        to: args.to.clone(),
        label: args.backup.clone(),
        target: target.clone(),
        restore_command: pgkeel_backup::restore_command_with(
            &exe,
            Path::new(&root),
            repo.cluster(),
            args.repo.s3_config.as_deref(),
        ),
        run_as,
        jobs: usize::from(args.jobs),
        progress: true,
        configure_recovery: true,
    };
    let m = pgkeel_backup::restore(&repo, &opts)?;
    let to = std::path::absolute(&args.to).unwrap_or(args.to.clone());
    let goal = match target.setting() {
        None => "replay all the archived WAL".to_string(),
        Some((name, value)) => format!("replay the archived WAL up to {name} = '{value}'"),
    };
    println!(
        "restored backup {} ({} files, ended {}) into {}\n\
         Start postgres on it (e.g. pg_ctl -D {} start, as the postgres OS user): it will {goal}, then promote.\n\
         Check its port and archive settings first if the original server still runs on this machine.",
        m.label,
        m.files.len(),
        format_utc(m.stop_time_us),
        to.display(),
        shell_path(&to),
    );
    Ok(())
}

fn shell_path(p: &Path) -> String {
    pgkeel_backup::shell_quote(&p.to_string_lossy())
}

use pgkeel_backup::progress::human_bytes;
