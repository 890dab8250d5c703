//! `pgkeel`: the one binary. This file is wiring only: parse arguments, set up logging, hand
//! off to the agent, `up`, or an operator command.

mod backup_cli;
mod ctl;
mod proxy_cli;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// PostgreSQL high availability in one binary: agents with leader election and automatic
/// failover, a Patroni-compatible REST API, and operator commands.
#[derive(Parser, Debug)]
#[command(name = "pgkeel", version, about, propagate_version = true)]
struct Cli {
    /// Log level: error, warn, info, debug, trace (or set PGKEEL_LOG).
    #[arg(long, global = true, env = "PGKEEL_LOG", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: TopCommand,
}

/// The HA commands and the backup commands (`wal`, `backup`, `restore`; see backup_cli.rs).
#[derive(Subcommand, Debug)]
enum TopCommand {
    #[command(flatten)]
    Core(Command),
    #[command(flatten)]
    Backup(backup_cli::Commands),
    /// Run the pooling proxy in front of a cluster: clients connect to it and reach the
    /// current primary (see docs/proxy.md).
    Proxy(proxy_cli::ProxyArgs),
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent of one node: supervises its postgres, takes part in leader election,
    /// serves the REST API.
    Agent {
        /// The node's configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Write the agent's pid to this file.
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Create (or resume) a whole cluster on this machine with the embedded store, each agent a
    /// child process, and stay in the foreground; Ctrl-C stops it.
    Up {
        /// Directory holding the cluster (created if missing; reused if it exists).
        #[arg(long)]
        dir: PathBuf,
        /// Number of nodes of a new cluster (1 primary + N-1 replicas).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
        nodes: u16,
        /// Cluster name of a new cluster.
        #[arg(long, default_value = "pgkeel")]
        cluster: String,
        /// Print the endpoints and return once the cluster is up, leaving it running in the
        /// background (stop it with `pgkeel down --dir DIR`).
        #[arg(long)]
        detach: bool,
        /// Keep a new cluster's state in etcd instead of the embedded store: comma-separated
        /// client URLs, e.g. http://127.0.0.1:2379.
        #[arg(long, value_name = "URLS")]
        etcd: Option<String>,
        /// Start a new cluster from a backup instead of an empty database: the repository
        /// (a directory or s3://...) holding it. The first node restores the newest backup
        /// that reaches --target-time (default: replays the whole archive) and promotes; the
        /// others clone from it.
        #[arg(long, value_name = "DIR|URL")]
        from_backup: Option<PathBuf>,
        /// With --from-backup: the cluster name in that repository (default: --cluster).
        #[arg(long, value_name = "NAME", requires = "from_backup")]
        from_cluster: Option<String>,
        /// With --from-backup: recover up to this time, e.g. "2024-05-01 12:30:00+00".
        #[arg(long, value_name = "TIME", requires = "from_backup")]
        target_time: Option<String>,
    },
    /// The fencing guard of one node (started by its agent; not for direct use).
    #[command(hide = true)]
    Guard {
        /// The node directory holding guard.lease.
        #[arg(long)]
        node_dir: PathBuf,
        /// The postgres data directory to fence.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Stop a cluster started with `pgkeel up --detach`.
    Down {
        /// The cluster's directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Check or print configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Show the cluster's members.
    List {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover: the leader steps down and a replica takes over without losing data.
    Switchover {
        #[command(flatten)]
        target: Target,
        /// Member to switch over to (default: the best replica).
        #[arg(long)]
        to: Option<String>,
        /// Current leader (checked when given).
        #[arg(long)]
        leader: Option<String>,
    },
    /// Manual failover to a named replica (also when there is no healthy leader).
    Failover {
        #[command(flatten)]
        target: Target,
        /// Member to promote.
        #[arg(long)]
        to: String,
    },
    /// Restart postgres on one member, or on every member in turn (`--all`: replicas first,
    /// then a switchover, then the former primary), e.g. after a parameter change.
    Restart {
        #[command(flatten)]
        target: Target,
        /// The member to restart.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        node: Option<String>,
        /// Rolling restart of the whole cluster.
        #[arg(long)]
        all: bool,
        /// Only members with a pending restart (a parameter change waiting for it).
        #[arg(long)]
        pending: bool,
    },
    /// Make the agents read their node.toml again, as SIGHUP does: postgres parameters,
    /// pg_hba lines, tags and the REST credentials take effect; the rest waits for an agent
    /// restart (each member says which keys).
    Reload {
        #[command(flatten)]
        target: Target,
        /// Only this member (default: every member).
        node: Option<String>,
    },
    /// Replace a replica's data directory with a fresh clone of the leader (the old one is
    /// kept as data.old).
    Reinit {
        #[command(flatten)]
        target: Target,
        /// The member to reinitialize (not the leader).
        node: String,
    },
    /// Show every promotion: time, reason, old and new primary, LSNs.
    History {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause automatic actions (no failover, no restart, no demotion) cluster-wide.
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Resume automatic actions.
    Resume {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a node.toml or a proxy.toml (and its userlist) without starting anything
    /// (exit 64 when it is bad). The kind is told from the contents: a file with an [auth]
    /// section or a top-level `listen` and no [postgres] section is a proxy.toml.
    Check {
        /// The file to check.
        file: PathBuf,
        /// Check it as this kind instead of guessing: `node` or `proxy`.
        #[arg(long, value_parser = ["node", "proxy"])]
        kind: Option<String>,
    },
    /// Print an annotated example node.toml.
    Example,
    /// Print the cluster config stored in the DCS, with its version.
    Show {
        #[command(flatten)]
        target: Target,
    },
    /// Change cluster config keys, e.g. `ttl=6s` or `postgresql.parameters.work_mem=16MB`
    /// (`KEY=null` removes a key). Validated; refused if the config changed meanwhile.
    Set {
        #[command(flatten)]
        target: Target,
        /// KEY=VALUE pairs; VALUE is JSON when it parses as JSON, else a string.
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
    /// Edit the cluster config in $VISUAL / $EDITOR (as JSON); saved only if it is valid and
    /// nobody changed it meanwhile.
    Edit {
        #[command(flatten)]
        target: Target,
    },
}

/// How to reach a cluster's REST API: one of `--api`, `--config`, `--dir`.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// REST API URL of any member, e.g. http://127.0.0.1:8008 (comma-separated for several).
    #[arg(long, conflicts_with_all = ["config", "dir"])]
    pub api: Option<String>,
    /// A node.toml: its REST address and credentials are used.
    #[arg(long, conflicts_with = "dir")]
    pub config: Option<PathBuf>,
    /// The directory of a `pgkeel up` cluster.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// REST user for actions (default: from --config/--dir, else "pgkeel").
    #[arg(long, env = "PGKEEL_API_USER")]
    pub user: Option<String>,
    /// REST password for actions (default: from --config/--dir).
    #[arg(long, env = "PGKEEL_API_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

fn init_logging(level: &str) -> Result<(), String> {
    let level: tracing::Level =
        level.parse().map_err(|_| format!("bad log level {level:?}: use error, warn, info, debug or trace"))?;
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    // Two workers are plenty for an agent or the CLI and keep an idle agent's footprint small.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot start the async runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log_level) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let command = match cli.command {
        TopCommand::Backup(c) => return backup_cli::run(c),
        TopCommand::Proxy(args) => return proxy_cli::run(args),
        TopCommand::Core(c) => c,
    };
    match command {
        Command::Config { command: ConfigCommand::Show { target } } => {
            report(runtime().block_on(ctl::config_show(&target)))
        }
        Command::Config { command: ConfigCommand::Set { target, settings } } => {
            report(runtime().block_on(ctl::config_set(&target, &settings)))
        }
        Command::Config { command: ConfigCommand::Edit { target } } => {
            report(runtime().block_on(ctl::config_edit(&target)))
        }
        Command::Config { command: ConfigCommand::Example } => {
            print!("{}", pgkeel_config::example());
            ExitCode::SUCCESS
        }
        Command::Config { command: ConfigCommand::Check { file, kind } }
            if kind.as_deref() == Some("proxy") || (kind.is_none() && proxy_cli::looks_like_proxy_toml(&file)) =>
        {
            proxy_cli::check(&file)
        }
        Command::Config { command: ConfigCommand::Check { file, .. } } => match pgkeel_config::load(&file) {
            Ok(c) => {
                println!("{}: OK (cluster {:?}, node {:?})", file.display(), c.cluster, c.name);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}: {e}", file.display());
                ExitCode::from(pgkeel_config::EXIT_BAD_CONFIG as u8)
            }
        },
        Command::Agent { config, pid_file } => {
            let cfg = match pgkeel_config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {}: {e}", config.display());
                    return ExitCode::from(pgkeel_config::EXIT_BAD_CONFIG as u8);
                }
            };
            let rt = runtime();
            let result = rt.block_on(async move {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("shutdown signal received");
                    let _ = tx.send(true);
                });
                let config_path = Some(std::path::absolute(&config).unwrap_or(config));
                pgkeel_agent::run(cfg, pgkeel_agent::RunOptions { pid_file, config_path }, rx).await
            });
            report(result)
        }
        Command::Up { dir, nodes, cluster, detach, etcd, from_backup, from_cluster, target_time } => {
            let etcd: Option<Vec<String>> =
                etcd.map(|e| e.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect());
            let from = from_backup.map(|repo| pgkeel_config::BootstrapFrom {
                repo: Some(std::path::absolute(&repo).unwrap_or(repo)),
                cluster: from_cluster,
                target_time,
                ..Default::default()
            });
            report(runtime().block_on(up::up(&dir, nodes, &cluster, detach, etcd, from)))
        }
        Command::Down { dir } => report(runtime().block_on(up::down(&dir))),
        Command::Guard { node_dir, data_dir } => report(pgkeel_agent::guard::run(&node_dir, &data_dir)),
        other => report(runtime().block_on(ctl::run(other))),
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolve on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    stop_signals(false).expect("install the SIGINT and SIGTERM handlers").await;
}

/// Installs SIGINT and SIGTERM handlers (and SIGHUP's with `hangup`) now, before the future
/// is first polled, so a signal that comes before is not lost; the future resolves with the
/// name of the first that arrives.
pub fn stop_signals(hangup: bool) -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use anyhow::Context as _;
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let mut hup = if hangup { Some(signal(SignalKind::hangup()).context("install the SIGHUP handler")?) } else { None };
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            Some(_) = async { hup.as_mut()?.recv().await } => "SIGHUP",
        }
    })
}
