//! The error type of this crate. Every message says what went wrong and, where there is one,
//! what the operator can do about it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while controlling the local postgres.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The PostgreSQL server programs were not found (or are unusable).
    #[error(
        "{problem}. Install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`) \
         or set postgres.bin_dir in the node config to the directory holding postgres, initdb, \
         pg_ctl, pg_basebackup and pg_controldata"
    )]
    MissingBinaries {
        /// Which directory or program is missing.
        problem: String,
    },

    /// The agent runs as root but the OS user meant to run postgres does not exist.
    #[error(
        "the agent runs as root, so postgres must run as the unprivileged OS user {name:?}, but that user \
         does not exist. Create it with `useradd --system --home-dir /var/lib/postgresql --shell /bin/bash \
         {name}` (installing the Debian package `postgresql` creates the user `postgres`), or set \
         postgres.os_user to an existing user"
    )]
    NoSuchUser {
        /// The configured OS user.
        name: String,
    },

    /// The OS user exists but cannot be used to run postgres.
    #[error("OS user {name:?} cannot run postgres: {problem}")]
    BadUser {
        /// The configured OS user.
        name: String,
        /// Why it cannot be used.
        problem: String,
    },

    /// A postgres program ran and failed.
    #[error("`{command}` failed ({status}){}", fmt_output(.output))]
    CommandFailed {
        /// The command line (never contains secrets: passwords go through the environment).
        command: String,
        /// Exit status as text, e.g. `exit status: 1`.
        status: String,
        /// The program's stderr/stdout and, for `pg_ctl start`, the tail of the server log.
        output: String,
    },

    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path involved.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A SQL statement or connection failed.
    #[error("{context}: {}", describe_sql_error(.source))]
    Sql {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// An operation did not finish in time.
    #[error("{what} did not finish within {}s", fmt_secs(.after))]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The time limit.
        after: Duration,
    },

    /// The data directory is not in the state the operation needs.
    #[error("data directory {}: {problem}", .path.display())]
    BadDataDir {
        /// The data directory.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },

    /// An argument cannot be used (e.g. a role name containing a NUL byte).
    #[error("invalid {what}")]
    InvalidInput {
        /// What is invalid and why.
        what: String,
    },

    /// A program or the server answered something this crate cannot interpret.
    #[error("unexpected output from {source_name}: {problem}")]
    Unexpected {
        /// The program or query.
        source_name: String,
        /// What could not be parsed.
        problem: String,
    },
}

impl PgError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> PgError {
        PgError::Io { context: context.into(), source }
    }

    /// Wraps a SQL error with what was being done.
    pub fn sql(context: impl Into<String>, source: tokio_postgres::Error) -> PgError {
        PgError::Sql { context: context.into(), source }
    }
}

fn fmt_output(output: &str) -> String {
    let output = output.trim();
    if output.is_empty() {
        String::new()
    } else {
        format!(":\n{output}")
    }
}

fn fmt_secs(d: &Duration) -> String {
    let secs = d.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{secs:.0}")
    } else {
        format!("{secs:.1}")
    }
}

/// Renders a `tokio_postgres::Error` with the server's message and SQLSTATE.
///
/// The error's own `Display` only says "db error"; the useful part (severity, message,
/// detail, hint, SQLSTATE) lives in its source, so this walks the chain.
pub fn describe_sql_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{db} (SQLSTATE {})", db.code().code());
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}
