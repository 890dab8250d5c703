//! `pgkeel proxy`: argument parsing and startup; the proxy itself is the `pgkeel-proxy` crate.

use std::path::PathBuf;
use std::process::ExitCode;

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
    let bad = ExitCode::from(pgkeel_proxy::config::EXIT_BAD_CONFIG as u8);
    let config = match pgkeel_proxy::config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return bad;
        }
    };
    let userlist = match pgkeel_proxy::Userlist::load(&config.userlist) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: {}: auth.userlist: {e}", path.display());
            return bad;
        }
    };
    if userlist.is_empty() {
        eprintln!(
            "error: {}: the userlist {} has no users; add lines of \"user\" \"password\"",
            path.display(),
            config.userlist.display()
        );
        return bad;
    }
    if args.check {
        let listeners: Vec<String> =
            config.listeners().iter().map(|(address, mode)| format!("{address} ({})", mode.as_str())).collect();
        println!(
            "{}: OK (cluster {:?}, listen {}, {} pooling, {} users)",
            path.display(),
            config.cluster,
            listeners.join(", "),
            config.pool_mode.as_str(),
            userlist.len()
        );
        return ExitCode::SUCCESS;
    }
    let result = crate::runtime().block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            crate::wait_for_signal().await;
            tracing::info!("shutdown signal received");
            let _ = tx.send(true);
        });
        pgkeel_proxy::run(config, userlist, rx).await
    });
    crate::report(result)
}
