//! The postgres configuration pgkeel manages: `DATA/pgkeel.conf`.
//!
//! initdb's `postgresql.conf` is left alone except for one `include_if_exists = 'pgkeel.conf'`
//! line at its end, so everything in `pgkeel.conf` overrides it. The file has three parts, in
//! this order (a later setting of the same name wins):
//!
//! 1. pgkeel's baseline for streaming replication and fast failover;
//! 2. the user's parameters (cluster-wide merged with per-node), overriding the baseline;
//! 3. the managed connection and role keys, last, so nothing overrides them.
//!
//! `postgresql.auto.conf` (ALTER SYSTEM) is still read after this file, as postgres always
//! does.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use tracing::warn;

use crate::quote::conf_value;

/// File name of the managed configuration inside the data directory.
pub const CONF_FILE: &str = "pgkeel.conf";

/// The line appended to `postgresql.conf` to pull in [`CONF_FILE`].
pub const INCLUDE_LINE: &str = "include_if_exists = 'pgkeel.conf'";

/// Baseline settings for replication and HA, in the order written.
pub const BASELINE: &[(&str, &str)] = &[
    ("wal_level", "replica"),
    ("hot_standby", "on"),
    ("max_wal_senders", "10"),
    ("max_replication_slots", "10"),
    // pg_rewind needs either data checksums or wal_log_hints; initdb enables checksums, this
    // covers clusters initialised elsewhere.
    ("wal_log_hints", "on"),
    ("wal_keep_size", "128MB"),
    ("hot_standby_feedback", "on"),
    ("wal_receiver_status_interval", "1s"),
    // Short timeouts so a dead peer is noticed within one HA loop or two.
    ("wal_sender_timeout", "10s"),
    ("wal_receiver_timeout", "10s"),
    ("password_encryption", "scram-sha-256"),
    // A replica follows the newest timeline, so it keeps streaming after a failover.
    ("recovery_target_timeline", "latest"),
    ("max_connections", "100"),
    ("shared_buffers", "128MB"),
    // Server output goes to stderr, which `pg_ctl -l` sends to the log file.
    ("log_destination", "stderr"),
    ("logging_collector", "off"),
    ("log_line_prefix", "%m [%p] "),
];

/// Keys pgkeel always sets itself; user parameters with these names are ignored.
pub const MANAGED_KEYS: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "cluster_name",
    "pgkeel.term",
    "primary_conninfo",
    "primary_slot_name",
    "synchronous_standby_names",
];

/// Everything needed to render `pgkeel.conf`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ManagedConf {
    /// `listen_addresses` (an address, `*`, or empty for sockets only).
    pub listen_host: String,
    /// `port`.
    pub port: u16,
    /// `unix_socket_directories` (a private 0700 directory: local connections are trusted).
    pub socket_dir: PathBuf,
    /// `cluster_name` (shows in `ps` and in the log).
    pub cluster_name: String,
    /// The leader term this configuration was written for, as `pgkeel.term = 'N'`; readable
    /// with `current_setting('pgkeel.term')`.
    pub term: u64,
    /// `primary_conninfo` (replicas only); see [`crate::SourceConn::conninfo`].
    pub primary_conninfo: Option<String>,
    /// `primary_slot_name` (replicas only).
    pub primary_slot_name: Option<String>,
    /// `synchronous_standby_names` (primary in a synchronous mode; empty otherwise), already
    /// in postgres syntax, e.g. `FIRST 1 ("n2")`.
    pub synchronous_standby_names: String,
    /// User parameters, already merged; they override the baseline.
    pub parameters: BTreeMap<String, String>,
}

/// Renders the content of `DATA/pgkeel.conf` (see the module doc for the layout).
///
/// Every value is single-quoted with embedded quotes doubled. Parameters with an invalid
/// name, include directives and the managed keys are left out of the user part (with a
/// warning and a comment), because they would break startup or undo what pgkeel manages.
pub fn render(conf: &ManagedConf) -> String {
    let mut out = String::new();
    out.push_str("# Managed by pgkeel. Rewritten by the agent: edits here are lost.\n");
    out.push_str("# Change parameters in the pgkeel configuration instead.\n\n");

    let user: BTreeMap<String, &str> =
        conf.parameters.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_str())).collect();

    out.push_str("# Baseline for replication and high availability\n");
    for (name, value) in BASELINE {
        if !user.contains_key(*name) {
            let _ = writeln!(out, "{name} = {}", conf_value(value));
        }
    }

    out.push_str("\n# User parameters\n");
    for (name, value) in &conf.parameters {
        let lower = name.to_ascii_lowercase();
        let skip_reason = if !valid_param_name(name) {
            Some("invalid parameter name")
        } else if MANAGED_KEYS.contains(&lower.as_str()) {
            Some("managed by pgkeel")
        } else if lower.starts_with("include") {
            Some("include directives are not allowed")
        } else {
            None
        };
        match skip_reason {
            Some(reason) => {
                warn!(parameter = %name, reason, "ignoring postgres parameter");
                let printable: String = name.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
                let _ = writeln!(out, "# ignored {printable:?}: {reason}");
            }
            None => {
                let _ = writeln!(out, "{name} = {}", conf_value(value));
            }
        }
    }

    out.push_str("\n# Managed by pgkeel (last, so nothing overrides them)\n");
    let _ = writeln!(out, "listen_addresses = {}", conf_value(&conf.listen_host));
    let _ = writeln!(out, "port = {}", conf_value(&conf.port.to_string()));
    let _ = writeln!(out, "unix_socket_directories = {}", conf_value(&conf.socket_dir.to_string_lossy()));
    let _ = writeln!(out, "cluster_name = {}", conf_value(&conf.cluster_name));
    let _ = writeln!(out, "pgkeel.term = {}", conf_value(&conf.term.to_string()));
    // Written even when empty so that removing them and reloading clears them.
    let _ = writeln!(out, "primary_conninfo = {}", conf_value(conf.primary_conninfo.as_deref().unwrap_or("")));
    let _ = writeln!(out, "primary_slot_name = {}", conf_value(conf.primary_slot_name.as_deref().unwrap_or("")));
    let _ = writeln!(out, "synchronous_standby_names = {}", conf_value(&conf.synchronous_standby_names));
    out
}

/// Postgres parameter names: letters, digits, `_`, and `.` for extension/custom settings.
fn valid_param_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ManagedConf {
        ManagedConf {
            listen_host: "127.0.0.1".into(),
            port: 5433,
            socket_dir: "/run/pgkeel/n1".into(),
            cluster_name: "demo".into(),
            term: 7,
            primary_conninfo: Some("host=10.0.0.1 password='it\\'s'".into()),
            primary_slot_name: Some("pgkeel_n1".into()),
            synchronous_standby_names: String::new(),
            parameters: BTreeMap::new(),
        }
    }

    fn position(text: &str, line: &str) -> usize {
        text.find(line).unwrap_or_else(|| panic!("{line:?} not in:\n{text}"))
    }

    #[test]
    fn render_baseline_and_managed_keys() {
        let text = render(&sample());
        for line in [
            "wal_level = 'replica'\n",
            "hot_standby = 'on'\n",
            "wal_keep_size = '128MB'\n",
            "recovery_target_timeline = 'latest'\n",
            "password_encryption = 'scram-sha-256'\n",
            "listen_addresses = '127.0.0.1'\n",
            "port = '5433'\n",
            "unix_socket_directories = '/run/pgkeel/n1'\n",
            "cluster_name = 'demo'\n",
            "pgkeel.term = '7'\n",
            "primary_slot_name = 'pgkeel_n1'\n",
        ] {
            position(&text, line);
        }
        // conninfo quoted for libpq, then again for the conf file: ' doubled, \ doubled.
        position(&text, "primary_conninfo = 'host=10.0.0.1 password=''it\\\\''s'''\n");
    }

    #[test]
    fn user_parameters_override_baseline_and_are_quoted() {
        let mut conf = sample();
        conf.primary_conninfo = None;
        conf.primary_slot_name = None;
        conf.parameters.insert("shared_buffers".into(), "32MB".into());
        conf.parameters.insert("Max_Connections".into(), "20".into());
        conf.parameters.insert("application_name".into(), "o'brien\\x".into());
        conf.parameters.insert("port".into(), "1".into());
        conf.parameters.insert("bad name".into(), "x".into());
        conf.parameters.insert("include_dir".into(), "/etc".into());
        let text = render(&conf);
        assert!(!text.contains("shared_buffers = '128MB'"), "{text}");
        assert!(!text.contains("max_connections = '100'"), "{text}");
        let user = position(&text, "shared_buffers = '32MB'\n");
        assert!(user > position(&text, "wal_level = 'replica'\n"));
        position(&text, "Max_Connections = '20'\n");
        position(&text, "application_name = 'o''brien\\\\x'\n");
        assert!(!text.contains("port = '1'"), "{text}");
        assert!(!text.contains("\nbad name"), "{text}");
        assert!(!text.contains("\ninclude_dir"), "{text}");
        assert!(position(&text, "port = '5433'\n") > user);
        position(&text, "primary_conninfo = ''\n");
        position(&text, "primary_slot_name = ''\n");
    }

    #[test]
    fn param_names() {
        assert!(valid_param_name("work_mem"));
        assert!(valid_param_name("auto_explain.log_min_duration"));
        assert!(!valid_param_name("1x"));
        assert!(!valid_param_name("a=b"));
        assert!(!valid_param_name(""));
    }
}
