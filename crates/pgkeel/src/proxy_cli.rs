//! `pgkeel proxy`: argument parsing and startup; the proxy itself is the `pgkeel-proxy` crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

/// `pgkeel proxy --config proxy.toml`
#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// The proxy's configuration file (`pgkeel proxy --example` prints an annotated one).
    #[arg(long, short, required_unless_present = "example")]
    config: Option<PathBuf>,
    /// Check the configuration and the userlist, then exit (0 when valid, 64 when not).
    #[arg(long)]
    check: bool,
    /// Print an annotated example proxy.toml and exit.
    #[arg(long, conflicts_with_all = ["config", "check"])]
    example: bool,
}

/// Runs `pgkeel proxy`; returns the process exit code.
pub fn run(args: ProxyArgs) -> ExitCode {
    if args.example {
        print!("{}", pgkeel_proxy::config::example());
        return ExitCode::SUCCESS;
    }
    let Some(path) = args.config else { return ExitCode::from(2) };
    if args.check {
        return check(&path);
    }
    let (config, userlist) = match pgkeel_proxy::load(&path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(pgkeel_proxy::config::EXIT_BAD_CONFIG as u8);
        }
    };
    let source = std::path::absolute(&path).unwrap_or(path);
    let runtime = match proxy_runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(pgkeel_proxy::config::EXIT_BAD_CONFIG as u8);
        }
    };
    let result = runtime.block_on(async move {
        let (tx, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            crate::wait_for_signal().await;
            tracing::info!("shutdown signal received: draining");
            let _ = tx.send(true);
        });
        let (reload_tx, reload) = tokio::sync::watch::channel(0u64);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("install the SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP received: reloading proxy.toml and the userlist");
                reload_tx.send_modify(|n| *n += 1);
            }
        });
        pgkeel_proxy::run(config, userlist, pgkeel_proxy::Control { shutdown, reload, source: Some(source) }).await
    });
    crate::report(result)
}

/// The proxy's async runtime: one thread by default, as PgBouncer. On a machine whose cores also
/// run postgres and the clients, a second worker thread mostly adds wake-ups between threads:
/// on 2 cores `pgbench -S -c 32` through the proxy ran 30-65 % more transactions per second
/// with one thread than with two (docs/benchmarks.md, "Proxy"). `PGKEEL_PROXY_THREADS=N` runs
/// N worker threads, for a proxy with cores of its own.
fn proxy_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let threads = match std::env::var("PGKEEL_PROXY_THREADS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => n,
            _ => anyhow::bail!("PGKEEL_PROXY_THREADS={v:?}: expected a number of threads from 1 to 1024"),
        },
        Err(_) => 1,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build().context("start the async runtime")
}

/// Checks a `proxy.toml` and its userlist (`pgkeel proxy --check`, `pgkeel config check`):
/// 0 and a summary when valid, 64 and the error when not.
pub fn check(path: &Path) -> ExitCode {
    match pgkeel_proxy::load(path) {
        Ok((config, userlist)) => {
            let listeners: Vec<String> =
                config.listeners().iter().map(|(address, mode)| format!("{address} ({})", mode.as_str())).collect();
            println!(
                "{}: OK (proxy, cluster {:?}, listen {}, {} pooling, {} users)",
                path.display(),
                config.cluster,
                listeners.join(", "),
                config.pool_mode.as_str(),
                userlist.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(pgkeel_proxy::config::EXIT_BAD_CONFIG as u8)
        }
    }
}

/// Whether `pgkeel config check FILE` should check `FILE` as a `proxy.toml`: it has no
/// `[postgresql]` section and has `[auth]` or `listen` (keys only a proxy.toml has). A file
/// that is not valid TOML counts as a proxy.toml when its name contains "proxy".
pub fn looks_like_proxy_toml(path: &Path) -> bool {
    let by_name = path.file_name().is_some_and(|n| n.to_string_lossy().contains("proxy"));
    let Ok(text) = std::fs::read_to_string(path) else { return by_name };
    pgkeel_proxy::config::is_proxy_toml(&text).unwrap_or(by_name)
}
