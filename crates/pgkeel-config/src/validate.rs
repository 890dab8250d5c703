//! Checking `node.toml`: unknown keys (with the closest valid key), value types (serde), then
//! the rules serde cannot express ([`NodeConfig::validate`], [`DynamicConfig::validate`]).
//!
//! Unknown keys are found by walking the parsed TOML against [`NODE`], a static copy of the key
//! tree of [`NodeConfig`]. serde's own `deny_unknown_fields` stays on as a second line of
//! defence, but its message cannot suggest a key from another table. A unit test compares the
//! table with what serde writes so the two cannot drift apart.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::units::format_duration;
use crate::{DcsConfig, DynamicConfig, NodeConfig, ParamValue};

/// Why a configuration was refused. Every message names the key, the bad value and how to fix
/// it, so the agent can print it as is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file we tried to read.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The text is not valid TOML; the message has the line and column.
    #[error("{0}")]
    Syntax(String),
    /// A key that pgkeel does not know, most often a typo.
    #[error("{}", unknown_key_message(.key, .suggestion.as_deref(), .table, .valid_keys))]
    UnknownKey {
        /// Dotted path of the key, e.g. `postgres.lisen`.
        key: String,
        /// Dotted path of the valid key the operator most likely meant, e.g. `postgres.listen`.
        suggestion: Option<String>,
        /// Dotted path of the table holding the key; empty for the top level.
        table: String,
        /// The keys that table accepts.
        valid_keys: Vec<String>,
    },
    /// A value is wrong or a required key is missing; the message says which and how to fix it.
    #[error("{0}")]
    Invalid(String),
}

fn unknown_key_message(key: &str, suggestion: Option<&str>, table: &str, valid_keys: &[String]) -> String {
    match suggestion {
        Some(s) => format!("unknown key {key:?}; did you mean {s:?}?"),
        None if table.is_empty() => format!("unknown key {key:?}; valid top-level keys: {}", valid_keys.join(", ")),
        None => format!("unknown key {key:?}; valid keys in [{table}]: {}", valid_keys.join(", ")),
    }
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

// ---------------------------------------------------------------------------------------------
// Key tree

/// What a key holds, as far as the unknown-key walk cares.
#[derive(Clone, Copy)]
enum Kind {
    /// A scalar (or anything else serde will type-check).
    Value,
    /// A table with a fixed set of keys.
    Table(&'static [Field]),
    /// Postgres parameters: any name, scalar values.
    Params,
    /// The `dcs` table, whose keys depend on its `kind`.
    Dcs,
}

/// One key of the tree.
struct Field {
    name: &'static str,
    kind: Kind,
    /// For a key without a default: a line to show the operator what to add.
    required: Option<&'static str>,
}

const fn opt(name: &'static str, kind: Kind) -> Field {
    Field { name, kind, required: None }
}

const fn req(name: &'static str, kind: Kind, example: &'static str) -> Field {
    Field { name, kind, required: Some(example) }
}

/// The keys of [`NodeConfig`], in declaration order (the order they are listed to operators).
const NODE: &[Field] = &[
    req("cluster", Kind::Value, r#"cluster = "main""#),
    req("name", Kind::Value, r#"name = "n1""#),
    req("data_dir", Kind::Value, r#"data_dir = "/var/lib/pgkeel/n1/data""#),
    req("dcs", Kind::Dcs, r#"[dcs] with kind = "local" and path = "/var/lib/pgkeel/dcs""#),
    opt("postgres", Kind::Table(POSTGRES)),
    opt("rest", Kind::Table(REST)),
    opt("tags", Kind::Table(TAGS)),
    opt("backup", Kind::Table(BACKUP)),
    opt("bootstrap", Kind::Table(DYNAMIC)),
];

const BACKUP: &[Field] =
    &[opt("repo", Kind::Value), opt("s3", Kind::Table(S3)), opt("bootstrap_from", Kind::Table(BOOTSTRAP_FROM))];

const BOOTSTRAP_FROM: &[Field] = &[
    opt("repo", Kind::Value),
    opt("cluster", Kind::Value),
    opt("backup", Kind::Value),
    opt("target_time", Kind::Value),
    opt("target_lsn", Kind::Value),
    opt("target_xid", Kind::Value),
    opt("target_name", Kind::Value),
];

const S3: &[Field] = &[
    opt("endpoint", Kind::Value),
    opt("region", Kind::Value),
    opt("access_key_id", Kind::Value),
    opt("secret_access_key", Kind::Value),
    opt("ca_file", Kind::Value),
];

const POSTGRES: &[Field] = &[
    opt("listen", Kind::Value),
    opt("connect_address", Kind::Value),
    opt("bin_dir", Kind::Value),
    opt("os_user", Kind::Value),
    opt("superuser", Kind::Table(SUPERUSER)),
    opt("replication", Kind::Table(REPLICATION)),
    opt("parameters", Kind::Params),
    opt("pg_hba", Kind::Value),
];

// Credentials has no serde default for `username`, so it is required once the table exists.
const SUPERUSER: &[Field] = &[req("username", Kind::Value, r#"username = "postgres""#), opt("password", Kind::Value)];

const REPLICATION: &[Field] =
    &[req("username", Kind::Value, r#"username = "pgkeel_replicator""#), opt("password", Kind::Value)];

const REST: &[Field] = &[
    opt("listen", Kind::Value),
    opt("connect_url", Kind::Value),
    opt("username", Kind::Value),
    opt("password", Kind::Value),
];

const TAGS: &[Field] = &[opt("nofailover", Kind::Value), opt("failover_priority", Kind::Value)];

const DYNAMIC: &[Field] = &[
    opt("ttl", Kind::Value),
    opt("loop_wait", Kind::Value),
    opt("retry_timeout", Kind::Value),
    opt("maximum_lag_on_failover", Kind::Value),
    opt("primary_start_timeout", Kind::Value),
    opt("pause", Kind::Value),
    opt("synchronous_mode", Kind::Value),
    opt("synchronous_node_count", Kind::Value),
    opt("failsafe_mode", Kind::Value),
    opt("switchover_drain_timeout", Kind::Value),
    opt("backup_schedule", Kind::Value),
    opt("backup_schedule_incremental", Kind::Value),
    opt("backup_keep", Kind::Value),
    opt("backup_max_age", Kind::Value),
    opt("dump_schedule", Kind::Value),
    opt("dump_keep", Kind::Value),
    opt("dump_max_age", Kind::Value),
    opt("postgresql", Kind::Table(DYNAMIC_POSTGRES)),
];

const DYNAMIC_POSTGRES: &[Field] = &[opt("parameters", Kind::Params), opt("pg_hba", Kind::Value)];

/// The `dcs` kinds and the keys each accepts (`kind` included).
const DCS_KINDS: &[(&str, &[Field])] = &[
    (
        "local",
        &[req("kind", Kind::Value, r#"kind = "local""#), req("path", Kind::Value, r#"path = "/var/lib/pgkeel/dcs""#)],
    ),
    (
        "etcd",
        &[
            req("kind", Kind::Value, r#"kind = "etcd""#),
            req("endpoints", Kind::Value, r#"endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]"#),
        ],
    ),
];

const DCS_KINDS_HELP: &str = r#"supported kinds: "local" (the embedded single-host store) and "etcd" (an etcd cluster, for clusters that span machines)"#;

/// TOML writes a key bare when it can and quoted otherwise; paths in messages do the same so
/// the operator can search the file for them.
fn key_segment(key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

fn join(table: &str, key: &str) -> String {
    if table.is_empty() {
        key_segment(key)
    } else {
        format!("{table}.{}", key_segment(key))
    }
}

/// Every path the tree knows: scalar keys and parameter tables (whose contents are free).
/// A dcs key is listed once even if several kinds accept it.
fn schema_paths(fields: &[Field], table: &str, out: &mut Vec<String>) {
    for f in fields {
        let path = join(table, f.name);
        match f.kind {
            Kind::Value | Kind::Params => out.push(path),
            Kind::Table(sub) => schema_paths(sub, &path, out),
            Kind::Dcs => {
                for (_, sub) in DCS_KINDS {
                    let mut paths = Vec::new();
                    schema_paths(sub, &path, &mut paths);
                    for p in paths {
                        if !out.contains(&p) {
                            out.push(p);
                        }
                    }
                }
            }
        }
    }
}

/// Edit distance in characters (insert, delete, substitute).
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn unknown_key(key: &str, table: &str, fields: &[Field]) -> ConfigError {
    let lower = key.to_lowercase();
    let limit = (key.chars().count() / 3).max(2);
    let sibling = fields
        .iter()
        .map(|f| (levenshtein(&lower, f.name), f.name))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| join(table, name));
    // No typo of a sibling: maybe the key is right but in the wrong table (`ttl` at the top
    // level instead of under [bootstrap]). Only suggest that when it is unambiguous.
    let full = join(table, key);
    let suggestion = sibling.or_else(|| {
        let mut all = Vec::new();
        schema_paths(NODE, "", &mut all);
        // A key of another dcs kind (`dcs.path` with kind = "etcd") must not suggest itself.
        let mut elsewhere = all.into_iter().filter(|p| p.rsplit('.').next() == Some(lower.as_str()) && *p != full);
        match (elsewhere.next(), elsewhere.next()) {
            (Some(only), None) => Some(only),
            _ => None,
        }
    });
    ConfigError::UnknownKey {
        key: full,
        suggestion,
        table: table.to_string(),
        valid_keys: fields.iter().map(|f| f.name.to_string()).collect(),
    }
}

/// Report the first unknown key of `table` (or of a table below it), then the first missing
/// required key.
fn walk(table: &toml::Table, fields: &[Field], path: &str) -> Result<(), ConfigError> {
    for (key, value) in table {
        let Some(field) = fields.iter().find(|f| f.name == key) else {
            return Err(unknown_key(key, path, fields));
        };
        let full = join(path, key);
        match field.kind {
            Kind::Value => {}
            Kind::Table(sub) => walk(expect_table(value, &full)?, sub, &full)?,
            Kind::Params => walk_params(value, &full)?,
            Kind::Dcs => walk_dcs(expect_table(value, &full)?, &full)?,
        }
    }
    for f in fields {
        if let Some(example) = f.required {
            if !table.contains_key(f.name) {
                let key = join(path, f.name);
                let place = if path.is_empty() { "at the top of the file".to_string() } else { format!("in [{path}]") };
                return Err(invalid(format!("missing required key {key:?}: add {example} {place}")));
            }
        }
    }
    Ok(())
}

/// "an array", "a table"...: for messages that say what was found instead.
fn a_type(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

fn expect_table<'a>(value: &'a toml::Value, path: &str) -> Result<&'a toml::Table, ConfigError> {
    value
        .as_table()
        .ok_or_else(|| invalid(format!("{path} must be a table (a [{path}] section), not {}", a_type(value))))
}

fn walk_params(value: &toml::Value, path: &str) -> Result<(), ConfigError> {
    let table = value.as_table().ok_or_else(|| {
        invalid(format!(
            "{path} must be a table of postgres parameters, not {}; e.g. [{path}] with shared_buffers = \"128MB\"",
            a_type(value)
        ))
    })?;
    walk_param_values(table, path)
}

/// Parameter values must be scalars. A table is a dotted name (`pg_stat_statements.max = 1000`
/// is TOML for `[pg_stat_statements] max = 1000`), which the serde side flattens back.
fn walk_param_values(table: &toml::Table, path: &str) -> Result<(), ConfigError> {
    for (name, v) in table {
        match v {
            toml::Value::String(_) | toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {}
            toml::Value::Table(nested) => walk_param_values(nested, &join(path, name))?,
            other => {
                return Err(invalid(format!(
                    "{} is {}, but a postgres parameter must be a string, integer, float or boolean; \
                     write it as postgresql.conf would, e.g. shared_preload_libraries = \"pg_stat_statements,auto_explain\"",
                    join(path, name),
                    a_type(other)
                )))
            }
        }
    }
    Ok(())
}

fn walk_dcs(table: &toml::Table, path: &str) -> Result<(), ConfigError> {
    let kind_path = join(path, "kind");
    let kind = match table.get("kind") {
        None => {
            return Err(invalid(format!(
                "missing required key {kind_path:?}: add kind = \"local\" in [{path}]; {DCS_KINDS_HELP}"
            )))
        }
        Some(toml::Value::String(kind)) => kind,
        Some(other) => {
            return Err(invalid(format!("{kind_path} must be a string such as \"local\", not {}", a_type(other))))
        }
    };
    match DCS_KINDS.iter().find(|(name, _)| name == kind) {
        Some((_, fields)) => walk(table, fields, path),
        None => Err(invalid(format!("{kind_path} = {kind:?} is not supported; {DCS_KINDS_HELP}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points

/// Check the text of a `node.toml` and return the configuration it describes.
///
/// In order: TOML syntax ([`ConfigError::Syntax`]), unknown keys with the closest valid key
/// ([`ConfigError::UnknownKey`]), missing keys and value types ([`ConfigError::Invalid`]), then
/// [`NodeConfig::validate`].
pub fn check(text: &str) -> Result<NodeConfig, ConfigError> {
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax(e.to_string().trim_end().to_string()))?;
    walk(&table, NODE, "")?;
    let config: NodeConfig = toml::from_str(text).map_err(|e| invalid(serde_message(text, &e)))?;
    config.validate()?;
    Ok(config)
}

/// Read and [`check`] a `node.toml`. Errors other than [`ConfigError::Io`] do not repeat the
/// path, so print it alongside them.
pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
    check(&text)
}

/// toml's own rendering of a value error starts with "TOML parse error", which misleads an
/// operator whose file parsed fine; say where the value is and what is wrong with it instead.
fn serde_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end();
    let Some(span) = e.span() else { return msg.to_string() };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text[line_start..line_end].trim();
    // The same key (`listen`) exists in several tables; name the section the line is in. This
    // reads headers line by line, which is right for every file that passed the syntax check
    // unless a multi-line value has a line starting with '['; then the line number still is.
    let section = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|header| format!(" in {header}"))
        .unwrap_or_default();
    if line.is_empty() {
        format!("line {line_no}{section}: {msg}")
    } else {
        format!("line {line_no}{section} ({line}): {msg}")
    }
}

// ---------------------------------------------------------------------------------------------
// Value rules

/// Parameters pgkeel sets itself, and why; an operator's value would be overwritten or would
/// break replication.
const MANAGED_PARAMETERS: &[(&str, &str)] = &[
    ("port", "from the port of postgres.listen"),
    ("listen_addresses", "from the host of postgres.listen"),
    ("unix_socket_directories", "to the socket directory the agent connects through"),
    ("hba_file", "to the pg_hba.conf it writes"),
    ("primary_conninfo", "from the current leader's address and the replication user"),
    ("primary_slot_name", "from this member's name"),
    ("cluster_name", "from the cluster and member names"),
    ("data_directory", "from data_dir"),
    ("pgkeel.term", "to record the leader term"),
    ("synchronous_standby_names", "from synchronous_mode and synchronous_node_count"),
];

fn check_parameters(path: &str, params: &BTreeMap<String, ParamValue>) -> Result<(), ConfigError> {
    for (name, value) in params {
        let key = join(path, name);
        let lower = name.to_ascii_lowercase();
        if let Some((_, how)) = MANAGED_PARAMETERS.iter().find(|(managed, _)| *managed == lower) {
            return Err(invalid(format!("{key}: pgkeel sets {lower} itself ({how}); remove it from [{path}]")));
        }
        let mut chars = name.chars();
        let valid_name = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
        if !valid_name {
            let hint = if lower != *name { format!("; write it in lower case: {lower}") } else { String::new() };
            return Err(invalid(format!(
                "{key}: not a postgres parameter name; names are lower-case letters, digits, \
                 '_' and '.', starting with a letter or '_' (e.g. shared_buffers){hint}"
            )));
        }
        match value {
            ParamValue::Text(s) if s.contains(['\n', '\r', '\0']) => {
                return Err(invalid(format!(
                    "{key} = {s:?}: a parameter value cannot contain a line break or NUL; put it on one line"
                )))
            }
            ParamValue::Float(x) if !x.is_finite() => {
                return Err(invalid(format!("{key} = {x}: postgres accepts only finite numbers")))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Cluster and member names end up in DCS keys, replication slot names and
/// `application_name`, so they keep to characters safe everywhere and to postgres' 63-byte
/// identifier limit.
fn check_name(key: &str, value: &str, example: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(invalid(format!("{key} is empty; set it, e.g. {key} = {example:?}")));
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(invalid(format!(
            "{key} = {value:?}: {bad:?} is not allowed; use letters, digits, '-' and '_', e.g. {key} = {example:?}"
        )));
    }
    if value.len() > 63 {
        return Err(invalid(format!(
            "{key} = {value:?} is {} characters long; the maximum is 63 (postgres' identifier limit)",
            value.len()
        )));
    }
    Ok(())
}

/// Paths must be absolute because the agent, postgres and the CLI run from different working
/// directories, and valid UTF-8 so [`NodeConfig::to_toml`] can write them.
fn check_absolute(key: &str, path: &Path, example: &str) -> Result<(), ConfigError> {
    let Some(s) = path.to_str() else {
        return Err(invalid(format!("{key} = {:?} is not valid UTF-8; rename the directory", path.display())));
    };
    if !path.is_absolute() {
        return Err(invalid(format!(
            "{key} = {s:?} is a relative path; use an absolute path, e.g. {key} = {example:?}"
        )));
    }
    Ok(())
}

/// Addresses that mean "every interface": fine to listen on, useless to connect to.
fn is_wildcard(host: &str) -> bool {
    matches!(host, "*" | "0.0.0.0" | "::" | "[::]")
}

fn is_hostname(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Split `host:port`; the host is an IPv4 address, a hostname, `*` or a bracketed IPv6
/// address (`[::1]:5432`). Returns the host without brackets.
fn split_host_port(value: &str) -> Result<(&str, u16), String> {
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("missing ']' after the IPv6 address")?;
        let port = after.strip_prefix(':').ok_or("missing ':port' after the ']'")?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{host:?} inside [ ] is not an IPv6 address"));
        }
        (host, port)
    } else {
        let (host, port) = value.rsplit_once(':').ok_or("missing ':port'")?;
        if host.contains(':') {
            return Err("an IPv6 address must be written in brackets, e.g. [::1]:5432".into());
        }
        if host.is_empty() {
            return Err("missing host before ':'".into());
        }
        if host != "*" && host.parse::<IpAddr>().is_err() && !is_hostname(host) {
            return Err(format!("{host:?} is not an IP address or a hostname"));
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host, p)),
        _ => Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
}

fn check_host_port<'a>(key: &str, value: &'a str, example: &str) -> Result<(&'a str, u16), ConfigError> {
    split_host_port(value)
        .map_err(|why| invalid(format!("{key} = {value:?}: {why}; expected host:port, e.g. {key} = {example:?}")))
}

/// The authentication methods of postgres 15's `pg_hba.conf`.
const HBA_METHODS: &[&str] = &[
    "trust",
    "reject",
    "scram-sha-256",
    "md5",
    "password",
    "gss",
    "sspi",
    "ident",
    "peer",
    "ldap",
    "radius",
    "cert",
    "pam",
    "bsd",
];

/// `list[i]` (`postgres.pg_hba` of node.toml, `postgresql.pg_hba` of the cluster config): one
/// `pg_hba.conf` record, checked as far as a mistake would stop
/// postgres from starting (postgres refuses to start with a `pg_hba.conf` it cannot read, and
/// a reload keeps the old one): one line, a known connection type, enough fields, a known
/// method. Addresses and options are left to postgres.
fn check_hba_line(list: &str, i: usize, line: &str) -> Result<(), ConfigError> {
    let key = format!("{list}[{i}]");
    let example = "e.g. \"hostssl all app 10.0.0.0/8 scram-sha-256\"";
    if line.contains(['\n', '\r', '\0']) {
        return Err(invalid(format!("{key} = {line:?}: one pg_hba.conf line per entry, without line breaks")));
    }
    let fields = hba_fields(line);
    let Some(kind) = fields.first() else {
        return Err(invalid(format!("{key} is empty (or only a comment); write a pg_hba.conf line, {example}")));
    };
    // type, database, user, [address, [mask]], method, [options]; an address written as IP
    // and netmask takes two fields.
    let address_fields = match kind.as_str() {
        "local" => 0,
        "host" | "hostssl" | "hostnossl" | "hostgssenc" | "hostnogssenc" => {
            if fields.get(4).is_some_and(|f| f.parse::<std::net::IpAddr>().is_ok()) {
                2
            } else {
                1
            }
        }
        other => {
            return Err(invalid(format!(
                "{key} = {line:?}: {other:?} is not a connection type; use local, host, hostssl, hostnossl, \
                 hostgssenc or hostnogssenc, {example}"
            )))
        }
    };
    let Some(method) = fields.get(3 + address_fields) else {
        return Err(invalid(format!(
            "{key} = {line:?}: too few fields; a {kind} line is {kind} DATABASE USER{} METHOD [OPTIONS], {example}",
            if address_fields > 0 { " ADDRESS" } else { "" }
        )));
    };
    if !HBA_METHODS.contains(&method.as_str()) {
        return Err(invalid(format!(
            "{key} = {line:?}: {method:?} is not an authentication method postgres knows; use one of {}",
            HBA_METHODS.join(", ")
        )));
    }
    Ok(())
}

/// The fields of a `pg_hba.conf` line: split at blanks outside double quotes, up to a `#`
/// outside them (a comment).
fn hba_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                field.push(c);
            }
            '#' if !quoted => break,
            c if c.is_whitespace() && !quoted => {
                if !field.is_empty() {
                    fields.push(std::mem::take(&mut field));
                }
            }
            c => field.push(c),
        }
    }
    if !field.is_empty() {
        fields.push(field);
    }
    fields
}

/// Role names go into SQL and connection strings; postgres truncates names past 63 bytes.
fn check_role(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(invalid(format!("{key} is empty; set a role name, e.g. {key} = \"postgres\"")));
    }
    if let Some(bad) = value.chars().find(|c| c.is_whitespace() || c.is_control() || matches!(c, '\'' | '"' | '\\')) {
        return Err(invalid(format!(
            "{key} = {value:?}: {bad:?} is not allowed in a role name; use letters, digits and '_'"
        )));
    }
    if value.len() > 63 {
        return Err(invalid(format!("{key} = {value:?} is longer than postgres' 63-byte limit for role names")));
    }
    Ok(())
}

fn check_password(key: &str, value: Option<&str>) -> Result<(), ConfigError> {
    if value == Some("") {
        return Err(invalid(format!("{key} is empty; set a password or remove the key")));
    }
    Ok(())
}

/// etcd client URLs: at least one, each `http://host:port` (no path), none twice.
fn check_etcd_endpoints(endpoints: &[String]) -> Result<(), ConfigError> {
    const EXAMPLE: &str = r#"endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]"#;
    if endpoints.is_empty() {
        return Err(invalid(format!(
            "dcs.endpoints is empty; list the client URLs of the etcd members, e.g. {EXAMPLE}"
        )));
    }
    for (i, url) in endpoints.iter().enumerate() {
        let key = format!("dcs.endpoints[{i}] = {url:?}");
        if url.starts_with("https://") {
            return Err(invalid(format!(
                "{key}: https is not supported yet (TLS to etcd arrives with a later release); use an http:// URL"
            )));
        }
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(invalid(format!("{key} is not an http:// URL; e.g. {EXAMPLE}")));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(invalid(format!(
                "{key}: give the client URL without a path, as http://host:port; e.g. {EXAMPLE}"
            )));
        }
        let (host, _) = split_host_port(authority).map_err(|why| {
            invalid(format!("{key}: {why}; expected http://host:port (etcd's client port is usually 2379)"))
        })?;
        if is_wildcard(host) {
            return Err(invalid(format!(
                "{key}: {host} means every interface and cannot be connected to; use the address of an etcd member"
            )));
        }
        let same = |other: &String| other.trim_end_matches('/') == url.trim_end_matches('/');
        if endpoints[..i].iter().any(same) {
            return Err(invalid(format!("{key} is listed twice; list each etcd member once")));
        }
    }
    Ok(())
}

impl NodeConfig {
    /// Check the rules serde cannot express. [`check`] calls this; call it yourself for a
    /// configuration built in code. A configuration that passes always serializes with
    /// [`NodeConfig::to_toml`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name("cluster", &self.cluster, "main")?;
        check_name("name", &self.name, "n1")?;
        check_absolute("data_dir", &self.data_dir, "/var/lib/pgkeel/n1/data")?;
        match &self.dcs {
            DcsConfig::Local { path } => check_absolute("dcs.path", path, "/var/lib/pgkeel/dcs")?,
            DcsConfig::Etcd { endpoints } => check_etcd_endpoints(endpoints)?,
        }

        let pg = &self.postgres;
        let (host, _) = check_host_port("postgres.listen", &pg.listen, "127.0.0.1:5432")?;
        match &pg.connect_address {
            Some(addr) => {
                let (chost, _) = check_host_port("postgres.connect_address", addr, "10.0.0.11:5432")?;
                if is_wildcard(chost) {
                    return Err(invalid(format!(
                        "postgres.connect_address = {addr:?}: {chost} means every interface and cannot be connected \
                         to; use this machine's address, e.g. connect_address = \"10.0.0.11:5432\""
                    )));
                }
            }
            None if is_wildcard(host) => {
                return Err(invalid(format!(
                    "postgres.listen = {:?} listens on every interface, so other members need \
                     postgres.connect_address to reach this one; add e.g. connect_address = \"10.0.0.11:5432\" \
                     in [postgres]",
                    pg.listen
                )))
            }
            None => {}
        }
        if let Some(dir) = &pg.bin_dir {
            check_absolute("postgres.bin_dir", dir, "/usr/lib/postgresql/16/bin")?;
        }
        if pg.os_user.is_empty() || pg.os_user.contains(|c: char| c.is_whitespace() || c == ':' || c == '/') {
            return Err(invalid(format!(
                "postgres.os_user = {:?} is not an OS user name; set the user that owns the data directory, \
                 e.g. os_user = \"postgres\"",
                pg.os_user
            )));
        }
        check_role("postgres.superuser.username", &pg.superuser.username)?;
        check_password("postgres.superuser.password", pg.superuser.password.as_deref())?;
        check_role("postgres.replication.username", &pg.replication.username)?;
        check_password("postgres.replication.password", pg.replication.password.as_deref())?;
        check_parameters("postgres.parameters", &pg.parameters)?;
        for (i, line) in pg.pg_hba.iter().enumerate() {
            check_hba_line("postgres.pg_hba", i, line)?;
        }

        let rest = &self.rest;
        let (host, _) = check_host_port("rest.listen", &rest.listen, "127.0.0.1:8008")?;
        match &rest.connect_url {
            Some(url) => {
                if url.starts_with("https://") {
                    // The API and its client speak plain HTTP in this release; an https URL would
                    // make this member unreachable for the peer probe and the CLI.
                    return Err(invalid(format!(
                        "rest.connect_url = {url:?}: https is not supported yet (TLS for the REST API \
                         arrives with the production release); use an http:// URL"
                    )));
                }
                let after_scheme = url.strip_prefix("http://");
                if after_scheme.is_none_or(|rest| rest.is_empty()) || url.contains(char::is_whitespace) {
                    return Err(invalid(format!(
                        "rest.connect_url = {url:?} is not an http:// URL; e.g. connect_url = \
                         \"http://10.0.0.11:8008\""
                    )));
                }
            }
            None if is_wildcard(host) => {
                return Err(invalid(format!(
                    "rest.listen = {:?} listens on every interface, so other members and the CLI need \
                     rest.connect_url to reach this one; add e.g. connect_url = \"http://10.0.0.11:8008\" in [rest]",
                    rest.listen
                )))
            }
            None => {}
        }
        // HTTP basic auth separates user and password with ':'.
        if rest.username.is_empty() || rest.username.contains(|c: char| c.is_whitespace() || c.is_control() || c == ':')
        {
            return Err(invalid(format!(
                "rest.username = {:?}: must be non-empty without spaces or ':', e.g. username = \"pgkeel\"",
                rest.username
            )));
        }
        check_password("rest.password", rest.password.as_deref())?;

        if self.tags.failover_priority < 0 {
            return Err(invalid(format!(
                "tags.failover_priority = {}: must be 0 (never promote) or more",
                self.tags.failover_priority
            )));
        }
        if let Some(repo) = &self.backup.repo {
            if !repo.is_absolute() && !self.backup.is_s3() {
                return Err(invalid(format!(
                    "backup.repo = {:?}: must be an absolute path, e.g. repo = \"/var/lib/pgkeel/backups\", or an S3 \
                     bucket, e.g. repo = \"s3://my-bucket/pgkeel\"",
                    repo.display().to_string()
                )));
            }
        }
        if let Some(s3) = &self.backup.s3 {
            if !self.backup.is_s3() && *s3 != crate::S3Settings::default() {
                return Err(invalid(
                    "[backup.s3] is set but backup.repo is not an s3:// URL: set repo = \"s3://BUCKET/PREFIX\" or \
                     remove [backup.s3]"
                        .to_string(),
                ));
            }
            s3.check("backup.s3.")?;
        }
        if let Some(b) = &self.backup.bootstrap_from {
            let targets =
                [b.target_time.is_some(), b.target_lsn.is_some(), b.target_xid.is_some(), b.target_name.is_some()];
            if targets.iter().filter(|t| **t).count() > 1 {
                return Err(invalid(
                    "backup.bootstrap_from: give at most one of target_time, target_lsn, target_xid and target_name \
                     (none recovers to the end of the archive)"
                        .to_string(),
                ));
            }
            match &b.repo {
                Some(r) if !r.is_absolute() && !r.to_string_lossy().starts_with("s3://") => {
                    return Err(invalid(format!(
                        "backup.bootstrap_from.repo = {:?}: must be an absolute path or an s3:// URL",
                        r.display().to_string()
                    )))
                }
                None if self.backup.repo.is_none() => {
                    return Err(invalid(
                        "backup.bootstrap_from: say where the backup is: bootstrap_from.repo, or backup.repo"
                            .to_string(),
                    ))
                }
                _ => {}
            }
        }

        self.bootstrap.validate_at("bootstrap.")
    }
}

impl DynamicConfig {
    /// Check the timing rules and parameters. Keys in messages are relative to the dynamic
    /// config (`ttl`, `postgresql.parameters.port`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_at("")
    }

    /// `prefix` places the keys in messages: `"bootstrap."` for node.toml, `""` for the DCS.
    fn validate_at(&self, prefix: &str) -> Result<(), ConfigError> {
        let show = |d: Duration| format!("{:?}", format_duration(d));
        if self.ttl < Duration::from_secs(2) || self.ttl > Duration::from_secs(3600) {
            return Err(invalid(format!(
                "{prefix}ttl = {}: must be between \"2s\" and \"1h\"; a shorter lease cannot outlive one HA loop, \
                 a longer one delays failover; e.g. ttl = \"4s\"",
                show(self.ttl)
            )));
        }
        if self.loop_wait < Duration::from_millis(100) {
            return Err(invalid(format!(
                "{prefix}loop_wait = {}: must be at least \"100ms\" so the HA loop does not spin; e.g. loop_wait = \"1s\"",
                show(self.loop_wait)
            )));
        }
        if self.retry_timeout < Duration::from_millis(500) {
            return Err(invalid(format!(
                "{prefix}retry_timeout = {}: must be at least \"500ms\", or ordinary latency counts as a failure; \
                 e.g. retry_timeout = \"1500ms\"",
                show(self.retry_timeout)
            )));
        }
        let needed = self.loop_wait.saturating_add(self.retry_timeout.saturating_mul(2));
        if needed > self.ttl {
            return Err(invalid(format!(
                "{prefix}loop_wait + 2 × {prefix}retry_timeout must not exceed {prefix}ttl, so the leader can wait \
                 one loop and retry a failed DCS call before its lease expires: {} + 2 × {} = {} > {}; raise ttl to \
                 at least {} or lower loop_wait / retry_timeout",
                show(self.loop_wait),
                show(self.retry_timeout),
                show(needed),
                show(self.ttl),
                show(needed)
            )));
        }
        if self.maximum_lag_on_failover == 0 {
            return Err(invalid(format!(
                "{prefix}maximum_lag_on_failover = 0: must be more than 0 bytes, or no replica could ever be \
                 promoted; e.g. maximum_lag_on_failover = \"1MB\""
            )));
        }
        if self.primary_start_timeout > Duration::from_secs(3600) {
            return Err(invalid(format!(
                "{prefix}primary_start_timeout = {}: must be at most \"1h\" (0 fails over at once); \
                 e.g. primary_start_timeout = \"10s\"",
                show(self.primary_start_timeout)
            )));
        }
        if self.switchover_drain_timeout > Duration::from_secs(60) {
            return Err(invalid(format!(
                "{prefix}switchover_drain_timeout = {}: must be at most \"1m\" (0 does not wait for the proxies); \
                 the old primary keeps its lease and new transactions are held while it waits; \
                 e.g. switchover_drain_timeout = \"5s\"",
                show(self.switchover_drain_timeout)
            )));
        }
        if !(1..=16).contains(&self.synchronous_node_count) {
            return Err(invalid(format!(
                "{prefix}synchronous_node_count = {}: must be between 1 and 16; e.g. synchronous_node_count = 1",
                self.synchronous_node_count
            )));
        }
        for (key, value) in [
            ("backup_schedule", &self.backup_schedule),
            ("backup_schedule_incremental", &self.backup_schedule_incremental),
            ("dump_schedule", &self.dump_schedule),
        ] {
            if let Some(s) = value {
                crate::cron::Cron::parse(s).map_err(|e| invalid(format!("{prefix}{key}: {e}")))?;
            }
        }
        for (key, value) in [("backup_max_age", &self.backup_max_age), ("dump_max_age", &self.dump_max_age)] {
            if let Some(s) = value {
                crate::units::parse_age(s).map_err(|e| invalid(format!("{prefix}{key}: {e}")))?;
            }
        }
        for (key, value) in [("backup_keep", self.backup_keep), ("dump_keep", self.dump_keep)] {
            if value == Some(0) {
                return Err(invalid(format!("{prefix}{key} = 0 would remove everything: keep at least 1")));
            }
        }
        for (i, line) in self.postgresql.pg_hba.iter().enumerate() {
            check_hba_line(&format!("{prefix}postgresql.pg_hba"), i, line)?;
        }
        check_parameters(&format!("{prefix}postgresql.parameters"), &self.postgresql.parameters)
    }
}

/// An annotated `node.toml` with every key, its meaning and its default; optional keys that
/// have no sensible example value are shown commented out. It passes [`check`].
pub fn example() -> &'static str {
    EXAMPLE
}

const EXAMPLE: &str = r##"# pgkeel node configuration (node.toml): one file per agent.
#
# Durations take a number of seconds (4, 1.5) or a string with a unit ("1500ms", "2s", "1m").
# Byte sizes take a number of bytes or a string with a unit ("512kB", "10MB", "1GB"); as in
# PostgreSQL, kB means 1024 bytes and MB means 1024 kB.
# Lines such as "# password = ..." show optional keys left at their default.

# Cluster name, the same for every agent of one cluster: letters, digits, "-" and "_", at most
# 63 characters. Required, no default.
cluster = "main"
# This member's name, unique in the cluster; same rules as cluster. Required, no default.
name = "n1"
# Postgres data directory of this node, an absolute path. Required, no default.
data_dir = "/var/lib/pgkeel/n1/data"

# Where the cluster state lives. Required.
[dcs]
# "local" is the embedded single-host store: a directory shared by the agents of one machine.
# "etcd" is an etcd cluster (etcd 3.4 or newer), for clusters that span machines. Required.
kind = "local"
# With "local": directory holding the store, an absolute path; created if missing. Every
# agent of the cluster on this machine must use the same path. Required, no default.
path = "/var/lib/pgkeel/dcs"
# With "etcd", instead of path: the client URLs of the etcd members, http://host:port (https
# is not supported yet). List every member: a call that cannot reach one tries the next.
# Leases are whole seconds and at least etcd's minimum (2s by default). Required, no default.
# kind = "etcd"
# endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]

# Local postgres settings. Every key is optional.
[postgres]
# host:port postgres listens on; an IPv6 host goes in brackets ("[::1]:5432").
# Default: "127.0.0.1:5432".
listen = "127.0.0.1:5432"
# host:port other members and clients use to reach this postgres. Required when listen is a
# wildcard address such as 0.0.0.0. Default: the value of listen.
# connect_address = "10.0.0.11:5432"
# Directory with postgres, initdb, pg_ctl... Default: the output of `pg_config --bindir`,
# else the newest /usr/lib/postgresql/*/bin.
# bin_dir = "/usr/lib/postgresql/16/bin"
# OS user that runs postgres when the agent runs as root. Default: "postgres".
os_user = "postgres"
# Lines of your own for pg_hba.conf, one record each. pgkeel writes them after its own local
# and replication lines and before its catch-all "host all all ... scram-sha-256" lines; the
# first line that matches a connection decides. End with a reject line to refuse what yours
# do not allow. A change applies when the agent starts (it reloads postgres). Default: none.
# pg_hba = ["hostssl all app 10.0.0.0/8 scram-sha-256", "host all all 0.0.0.0/0 reject"]

# Superuser the agent connects as; the agent itself uses the local socket.
[postgres.superuser]
# Role name. Default: "postgres".
username = "postgres"
# Password, for TCP clients. Default: none.
# password = "change-me"

# Replication user.
[postgres.replication]
# Role name. Default: "pgkeel_replicator".
username = "pgkeel_replicator"
# Password. Default: none, and the member that bootstraps the cluster generates one and
# keeps it in the DCS "initialize" record.
# password = "change-me"

# Postgres parameters for this node, applied on top of the cluster's
# [bootstrap.postgresql.parameters]. Values are strings, integers, floats or booleans.
# pgkeel sets port, listen_addresses, unix_socket_directories, hba_file, primary_conninfo,
# primary_slot_name, cluster_name, data_directory and pgkeel.term itself and refuses them
# here. Default: empty.
[postgres.parameters]
shared_buffers = "128MB"

# REST API. Every key is optional.
[rest]
# host:port the REST API listens on. Default: "127.0.0.1:8008".
listen = "127.0.0.1:8008"
# URL other members and the CLI use (http:// only for now). Required when listen is a
# wildcard address such as 0.0.0.0. Default: "http://" followed by listen.
# connect_url = "http://10.0.0.11:8008"
# User name for actions (POST/PATCH); health endpoints need none. Default: "pgkeel".
username = "pgkeel"
# Password for actions. Default: none, and every action is refused with 401.
# password = "change-me"

# Tags advertised to the cluster. Every key is optional.
[tags]
# Never promote this member automatically. Default: false.
nofailover = false
# Among equally advanced candidates the higher priority wins; 0 means never promote, like
# nofailover. Default: 1.
failover_priority = 1

# Backups. Every key is optional.
[backup]
# Repository directory (absolute, writable by the postgres OS user). When set, postgres runs
# with archive_mode = on and archive_command = 'pgkeel wal push ...' (only the primary
# archives), and restore_command = 'pgkeel wal fetch ...'. Default: none (no archiving).
# Or an S3-compatible bucket: repo = "s3://BUCKET/PREFIX", with [backup.s3] below.
# repo = "/var/lib/pgkeel/backups"

# An S3-compatible service for repo = "s3://...". Keys not given come from the environment
# (PGKEEL_S3_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). The agent hands
# them to archive_command in a file only the postgres OS user can read.
[backup.s3]
# Service URL. Default: PGKEEL_S3_ENDPOINT.
# endpoint = "https://s3.eu-west-1.amazonaws.com"
# Signing region. Default: AWS_REGION, else "us-east-1".
# region = "eu-west-1"
# Credentials; both or neither. Default: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
# access_key_id = "AKIA..."
# secret_access_key = "..."
# CA certificates (PEM) for an https:// endpoint. Default: the system's bundle.
# ca_file = "/etc/pgkeel/s3-ca.pem"

# Bootstrap a new cluster from a backup instead of initdb: the member that bootstraps
# restores it and promotes, the others clone from it. Ignored once the cluster exists.
# Every key is optional (an empty table restores the newest backup of backup.repo); without a
# target, recovery runs to the end of the archive. Uncomment the table header to use it.
# [backup.bootstrap_from]
# Repository holding the backup (directory or s3://...). Default: backup.repo.
# repo = "/var/lib/pgkeel/old-backups"
# Cluster name in that repository. Default: this cluster's name.
# cluster = "main"
# The backup's label. Default: the newest one that can reach the target.
# backup = "20240501T023000Z"
# At most one target. Time with a UTC offset, LSN, transaction id or restore point name.
# target_time = "2024-05-01 12:30:00+00"
# target_lsn = "0/3000148"
# target_xid = 7421
# target_name = "before-migration"

# Cluster-wide settings the member that bootstraps the cluster writes to the DCS; ignored
# afterwards. Every key is optional. loop_wait + 2 × retry_timeout must not exceed ttl.
[bootstrap]
# Leader lease: after this long without renewal the leader key expires and replicas race.
# Between 2s and 1h. Default: "4s".
ttl = "4s"
# Pause between two runs of the HA loop; at least 100ms. Default: "1s".
loop_wait = "1s"
# How long one DCS or postgres call may take before it counts as failed; at least 500ms.
# Default: "1500ms".
retry_timeout = "1500ms"
# A replica further behind the leader's last known position than this is not promoted;
# more than 0. Default: "1MB".
maximum_lag_on_failover = "1MB"
# How long a crashed primary may take to come back in place before the leader key is
# released for a failover; at most 1h, and 0 fails over at once. Default: "10s".
primary_start_timeout = "10s"
# While true, nothing automatic happens: no failover, no restart, no demotion.
# Default: false.
pause = false
# Synchronous replication: "off" (asynchronous), "on" (commits wait for the synchronous
# standbys while there are any; without one the primary runs asynchronously and nobody is
# promoted automatically), "strict" (no commit without them), "quorum" (commits wait for
# synchronous_node_count of all streaming standbys: ANY k). In "on" and "strict" a failover
# goes only to a synchronous standby, in "quorum" to the voter with the most WAL among enough
# reachable voters, so no acknowledged commit is lost. Default: "off".
synchronous_mode = "off"
# How many synchronous standbys commits wait for (k of ANY k in "quorum"); 1 to 16.
# Default: 1.
synchronous_node_count = 1
# While the DCS is unreachable, keep the primary writable as long as every member confirms
# it over the REST API (POST /failsafe); otherwise it demotes when its lease runs out. Every
# member must accept the same REST credentials. Default: false.
failsafe_mode = false
# In a switchover, how long the old leader waits for the running proxies (pgkeel proxy) to
# hold new transactions and finish the ones in flight before it stops postgres, so their
# clients see a pause instead of an error; then it switches anyway. 0 does not wait; at
# most 1m. Default: "5s".
switchover_drain_timeout = "5s"
# When to take a base backup into the members' backup.repo: a cron expression in UTC
# (minute hour day-of-month month day-of-week), e.g. "30 2 * * *" for 02:30 every day. One
# member runs each scheduled backup, a replica when one is streaming. Default: none.
# backup_schedule = "30 2 * * *"
# When to take an incremental backup (only the files changed since the newest backup), cron
# in UTC; a minute matching backup_schedule too takes a full one. Default: none.
# backup_schedule_incremental = "30 */4 * * *"
# After each scheduled backup, keep the newest N backups (and those they share files with)
# and remove older ones and the WAL only they needed. Default: none (keep everything).
# backup_keep = 7
# After each scheduled backup, keep a recovery window this long (s, m, h, d or w); with
# backup_keep, a backup is removed only when neither keeps it. Default: none.
# backup_max_age = "14d"
# When to take a logical dump (pg_dump) of every database into the repository, cron in UTC,
# run by the member that runs the scheduled backups. Default: none.
# dump_schedule = "0 3 * * 0"
# After each scheduled dump, keep the newest N dumps. Default: none (keep everything).
# dump_keep = 4
# After each scheduled dump, keep the dumps of this long a window. Default: none.
# dump_max_age = "60d"

# Cluster-wide postgres settings.
[bootstrap.postgresql]
# pg_hba.conf lines for every member, written after a node's own postgres.pg_hba lines (the
# first line that matches a connection decides, so a node's lines win). Same rules as
# postgres.pg_hba; change them later with pgkeel config set. Default: empty.
# pg_hba = ["hostssl all all 0.0.0.0/0 scram-sha-256", "hostnossl all all 0.0.0.0/0 reject"]

# Postgres parameters for every member; a node's own [postgres.parameters] win. Same rules
# as [postgres.parameters]. Default: empty.
[bootstrap.postgresql.parameters]
max_connections = 100
wal_level = "replica"
hot_standby = true
wal_log_hints = "on"
"##;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    use crate::{Credentials, DynamicPostgres, PostgresConfig, RestConfig, TagsConfig};

    /// A config with every optional key set, so serializing it shows every key.
    fn full_config() -> NodeConfig {
        let params = |name: &str| BTreeMap::from([(name.to_string(), ParamValue::Text("on".into()))]);
        NodeConfig {
            cluster: "main".into(),
            name: "n1".into(),
            data_dir: "/var/lib/pgkeel/n1/data".into(),
            dcs: DcsConfig::Local { path: "/var/lib/pgkeel/dcs".into() },
            postgres: PostgresConfig {
                listen: "0.0.0.0:5433".into(),
                connect_address: Some("10.0.0.11:5433".into()),
                bin_dir: Some("/usr/lib/postgresql/16/bin".into()),
                os_user: "pg".into(),
                superuser: Credentials { username: "admin".into(), password: Some("s3cret".into()) },
                replication: Credentials { username: "repl".into(), password: Some("r3pl".into()) },
                parameters: params("wal_log_hints"),
                pg_hba: vec!["hostssl all app 10.0.0.0/8 cert".into()],
            },
            rest: RestConfig {
                listen: "[::]:8009".into(),
                connect_url: Some("http://n1.example.com:8009/".into()),
                username: "ops".into(),
                password: Some("pw".into()),
            },
            tags: TagsConfig { nofailover: true, failover_priority: 3 },
            backup: crate::BackupConfig {
                repo: Some("s3://backups/main".into()),
                s3: Some(crate::S3Settings {
                    endpoint: Some("https://s3.example.com".into()),
                    region: Some("eu-west-1".into()),
                    access_key_id: Some("AKIDEXAMPLE".into()),
                    secret_access_key: Some("secret".into()),
                    ca_file: Some("/etc/pgkeel/ca.pem".into()),
                }),
                bootstrap_from: Some(crate::BootstrapFrom {
                    repo: Some("/srv/old".into()),
                    cluster: Some("old".into()),
                    backup: Some("20240501T023000Z".into()),
                    target_time: None,
                    target_lsn: Some("0/3000148".into()),
                    target_xid: None,
                    target_name: None,
                }),
            },
            bootstrap: DynamicConfig {
                ttl: Duration::from_secs(30),
                loop_wait: Duration::from_secs(10),
                retry_timeout: Duration::from_secs(10),
                maximum_lag_on_failover: 10 << 20,
                primary_start_timeout: Duration::ZERO,
                pause: true,
                synchronous_mode: crate::SyncMode::Strict,
                synchronous_node_count: 2,
                failsafe_mode: true,
                switchover_drain_timeout: Duration::from_secs(9),
                backup_schedule: Some("*/30 * * * *".into()),
                backup_schedule_incremental: Some("*/5 * * * *".into()),
                backup_keep: Some(3),
                backup_max_age: Some("14d".into()),
                dump_schedule: Some("0 3 * * 0".into()),
                dump_keep: Some(2),
                dump_max_age: Some("8w".into()),
                postgresql: DynamicPostgres {
                    parameters: params("hot_standby"),
                    pg_hba: vec!["hostnossl all all 0.0.0.0/0 reject".into()],
                },
            },
        }
    }

    fn all_schema_paths() -> BTreeSet<String> {
        let mut out = Vec::new();
        schema_paths(NODE, "", &mut out);
        out.into_iter().collect()
    }

    fn params_paths() -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        fn collect(fields: &[Field], table: &str, out: &mut BTreeSet<String>) {
            for f in fields {
                match f.kind {
                    Kind::Params => {
                        out.insert(join(table, f.name));
                    }
                    Kind::Table(sub) => collect(sub, &join(table, f.name), out),
                    Kind::Value | Kind::Dcs => {}
                }
            }
        }
        collect(NODE, "", &mut out);
        out
    }

    fn serialized_paths(table: &toml::Table, prefix: &str, params: &BTreeSet<String>, out: &mut BTreeSet<String>) {
        for (k, v) in table {
            let path = join(prefix, k);
            match v {
                toml::Value::Table(t) if !params.contains(&path) => serialized_paths(t, &path, params, out),
                _ => {
                    out.insert(path);
                }
            }
        }
    }

    #[test]
    fn schema_matches_serde_structs() {
        // One config per dcs kind, so every kind's keys are serialized.
        let mut etcd =
            NodeConfig { dcs: DcsConfig::Etcd { endpoints: vec!["http://10.0.0.1:2379".into()] }, ..full_config() };
        // The targets are exclusive: the other config carries the others (serialization only).
        etcd.backup.bootstrap_from = Some(crate::BootstrapFrom {
            target_time: Some("2024-05-01 12:30:00+00".into()),
            target_xid: Some(7),
            target_name: Some("x".into()),
            ..Default::default()
        });
        let mut serialized = BTreeSet::new();
        for config in [full_config(), etcd] {
            let value = toml::Value::try_from(config).expect("serializes");
            let table = value.as_table().expect("a struct serializes to a table");
            serialized_paths(table, "", &params_paths(), &mut serialized);
        }
        assert_eq!(serialized, all_schema_paths());
    }

    #[test]
    fn schema_required_keys_match_serde_defaults() {
        let minimal = "cluster = \"c\"\nname = \"n\"\ndata_dir = \"/d\"\n[dcs]\nkind = \"local\"\npath = \"/s\"\n\
                       [postgres.superuser]\nusername = \"u\"\n[postgres.replication]\nusername = \"r\"\n";
        let table: toml::Table = minimal.parse().expect("valid TOML");
        toml::Value::Table(table.clone()).try_into::<NodeConfig>().expect("every required key present");
        walk(&table, NODE, "").expect("the walk agrees");
        // Removing any key the schema calls required must make serde fail, and removing any
        // other key must not.
        for (path, required) in [
            ("cluster", true),
            ("name", true),
            ("data_dir", true),
            ("dcs", true),
            ("dcs.path", true),
            ("postgres.superuser.username", true),
            ("postgres.replication.username", true),
            ("postgres.superuser", false),
            ("postgres", false),
        ] {
            let mut t = table.clone();
            let mut cur = &mut t;
            let mut segments: Vec<&str> = path.split('.').collect();
            let last = segments.pop().expect("non-empty path");
            for s in segments {
                cur = cur.get_mut(s).and_then(toml::Value::as_table_mut).expect("table exists");
            }
            cur.remove(last);
            assert_eq!(walk(&t, NODE, "").is_err(), required, "walk without {path}");
            assert_eq!(toml::Value::Table(t).try_into::<NodeConfig>().is_err(), required, "serde without {path}");
        }

        // The etcd kind: `endpoints` is required by both.
        let etcd =
            minimal.replace("kind = \"local\"\npath = \"/s\"", "kind = \"etcd\"\nendpoints = [\"http://e:2379\"]");
        let table: toml::Table = etcd.parse().expect("valid TOML");
        toml::Value::Table(table.clone()).try_into::<NodeConfig>().expect("every required key present");
        walk(&table, NODE, "").expect("the walk agrees");
        let mut t = table;
        t.get_mut("dcs").and_then(toml::Value::as_table_mut).expect("[dcs]").remove("endpoints");
        assert!(walk(&t, NODE, "").is_err(), "walk without dcs.endpoints");
        assert!(toml::Value::Table(t).try_into::<NodeConfig>().is_err(), "serde without dcs.endpoints");
    }

    #[test]
    fn example_passes_check() {
        let c = check(example()).expect("the example is valid");
        assert_eq!(c.cluster, "main");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/pgkeel/n1/data"));
        assert_eq!(c.dcs, DcsConfig::Local { path: "/var/lib/pgkeel/dcs".into() });
        assert_eq!(c.postgres.parameters["shared_buffers"], ParamValue::Text("128MB".into()));
        // The example shows the defaults, so it must describe the same config as leaving them out.
        assert_eq!(c.bootstrap.ttl, DynamicConfig::default().ttl);
        assert_eq!(c.bootstrap.maximum_lag_on_failover, DynamicConfig::default().maximum_lag_on_failover);
        assert_eq!(c.postgres.listen, PostgresConfig::default().listen);
        assert_eq!(c.rest, RestConfig::default());
        assert_eq!(c.tags, TagsConfig::default());
    }

    #[test]
    fn s3_repository_settings() {
        let base = "cluster = \"c\"\nname = \"n1\"\ndata_dir = \"/d\"\n[dcs]\nkind = \"local\"\npath = \"/p\"\n";
        let good = format!(
            "{base}[backup]\nrepo = \"s3://bucket/pre\"\n[backup.s3]\nendpoint = \"http://127.0.0.1:9000\"\n\
             access_key_id = \"a\"\nsecret_access_key = \"s\"\n"
        );
        let c = check(&good).expect("valid");
        assert!(c.backup.is_s3());
        assert_eq!(c.backup.s3.as_ref().unwrap().access_key_id.as_deref(), Some("a"));
        let round: crate::S3Settings = toml::from_str(&c.backup.s3.as_ref().unwrap().to_toml()).unwrap();
        assert_eq!(&round, c.backup.s3.as_ref().unwrap());
        let cases = [
            ("[backup]\nrepo = \"/r\"\n[backup.s3]\nregion = \"x\"\n", "not an s3:// URL"),
            ("[backup]\nrepo = \"s3://b/p\"\n[backup.s3]\nendpoint = \"127.0.0.1:9000\"\n", "backup.s3.endpoint"),
            ("[backup]\nrepo = \"s3://b/p\"\n[backup.s3]\naccess_key_id = \"a\"\n", "go together"),
            ("[backup]\nrepo = \"rel/dir\"\n", "s3://my-bucket"),
            ("[backup]\nrepo = \"s3://b/p\"\n[backup.s3]\nendpont = \"x\"\n", "backup.s3.endpoint"),
        ];
        for (tail, want) in cases {
            let err = check(&format!("{base}{tail}")).unwrap_err().to_string();
            assert!(err.contains(want), "{tail}: {err}");
        }
    }

    #[test]
    fn example_shows_every_key() {
        let params = params_paths();
        let mut seen = BTreeSet::new();
        let mut section = String::new();
        for line in example().lines() {
            let line = line.trim();
            // A commented-out table header ("# [table]") starts a section too.
            if let Some(header) = line.strip_prefix('[').or_else(|| line.strip_prefix("# [")) {
                section = header.trim_end_matches(']').to_string();
                if params.contains(&section) {
                    seen.insert(section.clone());
                }
                continue;
            }
            if params.contains(&section) {
                continue;
            }
            let line = line.strip_prefix("# ").unwrap_or(line);
            if let Some((key, _)) = line.split_once(" = ") {
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    seen.insert(join(&section, key));
                }
            }
        }
        assert_eq!(seen, all_schema_paths());
    }

    fn unknown(text: &str) -> (String, Option<String>, String) {
        match check(text) {
            Err(e @ ConfigError::UnknownKey { .. }) => {
                let msg = e.to_string();
                let ConfigError::UnknownKey { key, suggestion, .. } = e else { unreachable!() };
                (key, suggestion, msg)
            }
            other => panic!("expected an unknown key error, got {other:?}"),
        }
    }

    fn with(extra: &str) -> String {
        // Top-level keys must come before the first table, so `extra` goes first.
        format!("{extra}\n{}", example())
    }

    #[test]
    fn unknown_keys_suggest_the_closest() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("[bootstrap]\nttll = 4", "bootstrap.ttll", Some("bootstrap.ttl")),
            ("[postgres]\nlisen = \"127.0.0.1:5432\"", "postgres.lisen", Some("postgres.listen")),
            ("[rests]\nlisten = \"127.0.0.1:8008\"", "rests", Some("rest")),
            (
                "[postgres.superuser]\nusername = \"postgres\"\npasword = \"x\"",
                "postgres.superuser.pasword",
                Some("postgres.superuser.password"),
            ),
            ("[dcs]\nkind = \"local\"\npth = \"/x\"", "dcs.pth", Some("dcs.path")),
            ("[postgresql]\nlisten = \"x\"", "postgresql", Some("postgres")),
            (
                "[bootstrap.postgresql]\nparameter = {}",
                "bootstrap.postgresql.parameter",
                Some("bootstrap.postgresql.parameters"),
            ),
            ("Cluster = \"main\"", "Cluster", Some("cluster")),
            // Right key, wrong table: pointed to the one place it exists.
            ("ttl = 4", "ttl", Some("bootstrap.ttl")),
            ("nofailover = true", "nofailover", Some("tags.nofailover")),
            // Exists in two tables: no guess.
            ("listen = \"x\"", "listen", None),
            ("completely_unrelated = 1", "completely_unrelated", None),
            ("[bootstrap]\n\"a.b\" = 1", "bootstrap.\"a.b\"", None),
        ];
        for (text, key, suggestion) in cases {
            // Unknown tables are appended as a whole new document; loose keys go first.
            let doc = if text.starts_with('[') {
                format!("cluster = \"main\"\nname = \"n1\"\ndata_dir = \"/d\"\n{text}\n")
            } else {
                with(text)
            };
            let (k, s, msg) = unknown(&doc);
            assert_eq!(k, *key, "{text}");
            assert_eq!(s.as_deref(), *suggestion, "{text}: {msg}");
        }
    }

    #[test]
    fn unknown_key_messages() {
        let (_, _, msg) = unknown("cluster = \"c\"\n[postgres]\nlisen = \"x\"");
        assert_eq!(msg, r#"unknown key "postgres.lisen"; did you mean "postgres.listen"?"#);
        let (_, _, msg) = unknown("cluster = \"c\"\n[postgres]\nfrobnicate = 1");
        assert_eq!(
            msg,
            r#"unknown key "postgres.frobnicate"; valid keys in [postgres]: listen, connect_address, bin_dir, os_user, superuser, replication, parameters, pg_hba"#
        );
        let (_, _, msg) = unknown("frobnicate = 1");
        assert!(
            msg.starts_with(r#"unknown key "frobnicate"; valid top-level keys: cluster, name, data_dir, dcs"#),
            "{msg}"
        );
    }

    #[test]
    fn parameters_are_free_form_but_scalar() {
        // Dotted names need no quotes: TOML nests them, pgkeel flattens them back.
        let doc = example().replace(
            "shared_buffers = \"128MB\"",
            "shared_buffers = \"128MB\"\npg_stat_statements.max = 10000\n\"auto_explain.log_min_duration\" = \"1s\"",
        );
        let c = check(&doc).expect("any parameter name is accepted");
        assert_eq!(c.postgres.parameters["pg_stat_statements.max"], ParamValue::Int(10000));
        assert_eq!(c.postgres.parameters["auto_explain.log_min_duration"], ParamValue::Text("1s".into()));
        assert_eq!(check(&c.to_toml()).expect("round trip"), c);

        let doc = example().replace("shared_buffers = \"128MB\"", "shared_preload_libraries = [\"a\", \"b\"]");
        let err = check(&doc).expect_err("arrays are refused").to_string();
        assert!(err.contains("postgres.parameters.shared_preload_libraries is an array"), "{err}");
        let doc = example().replace("max_connections = 100", "ext.when = 2024-01-01");
        let err = check(&doc).expect_err("dates are refused").to_string();
        assert!(err.contains("bootstrap.postgresql.parameters.ext.when is a date-time"), "{err}");
        let doc = example().replace("max_connections = 100", "pgkeel.term = 3");
        let err = check(&doc).expect_err("managed").to_string();
        assert!(err.contains("pgkeel sets pgkeel.term itself"), "{err}");
        let doc = example().replace("max_connections = 100", "\"a.b\" = 1\na.b = 2");
        let err = check(&doc).expect_err("given twice").to_string();
        assert!(err.contains("\"a.b\" is given twice"), "{err}");
    }

    /// The example switched to its commented etcd alternative.
    fn etcd_example() -> String {
        let doc = example()
            .replacen("kind = \"local\"\n", "kind = \"etcd\"\n", 1)
            .replacen("path = \"/var/lib/pgkeel/dcs\"\n", "", 1)
            .replacen("# endpoints = ", "endpoints = ", 1);
        assert!(doc.contains("\nendpoints = [") && !doc.contains("\npath = "), "the example changed: {doc}");
        doc
    }

    #[test]
    fn etcd_dcs() {
        let c = check(&etcd_example()).expect("the etcd alternative of the example is valid");
        let endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"];
        assert_eq!(c.dcs, DcsConfig::Etcd { endpoints: endpoints.iter().map(|e| e.to_string()).collect() });
        assert_eq!(check(&c.to_toml()).expect("round trip"), c);
        let one = etcd_example().replace(
            r#"endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]"#,
            r#"endpoints = ["http://[fd00::1]:2379/", "http://etcd.example.com:2379"]"#,
        );
        let c = check(&one).expect("IPv6, hostnames and a trailing / are fine");
        assert_eq!(
            c.dcs,
            DcsConfig::Etcd { endpoints: vec!["http://[fd00::1]:2379/".into(), "http://etcd.example.com:2379".into()] }
        );

        let from = r#"endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]"#;
        let cases: &[(&str, &str)] = &[
            ("endpoints = []", "dcs.endpoints is empty"),
            (r#"endpoints = ["https://10.0.0.1:2379"]"#, "https is not supported yet"),
            (r#"endpoints = ["10.0.0.1:2379"]"#, "is not an http:// URL"),
            (r#"endpoints = ["http://10.0.0.1"]"#, "missing ':port'"),
            (r#"endpoints = ["http://10.0.0.1:0"]"#, "port \"0\" is not a number from 1 to 65535"),
            (r#"endpoints = ["http://10.0.0.1:2379/v3"]"#, "without a path"),
            (r#"endpoints = ["http://0.0.0.0:2379"]"#, "every interface"),
            (
                r#"endpoints = ["http://a:1", "http://b:1", "http://a:1/"]"#,
                "dcs.endpoints[2] = \"http://a:1/\" is listed twice",
            ),
        ];
        for (to, want) in cases {
            let msg = invalid_msg(&etcd_example().replace(from, to));
            assert!(msg.contains(want), "{to}: {msg:?} should contain {want:?}");
        }
        let msg = invalid_msg(&etcd_example().replace(from, r#"endpoints = "http://10.0.0.1:2379""#));
        assert!(msg.contains("[dcs]") && msg.contains("expected a sequence"), "{msg}");
    }

    #[test]
    fn dcs_kind_errors() {
        let err = check(&example().replace("kind = \"local\"", "kind = \"consul\"")).expect_err("consul").to_string();
        assert!(err.contains(r#"dcs.kind = "consul" is not supported"#), "{err}");
        assert!(err.contains("\"local\"") && err.contains("\"etcd\""), "the error must list every kind: {err}");
        let err = check(&etcd_example().replace("\nendpoints = ", "\n# endpoints = ")).expect_err("no endpoints");
        assert!(err.to_string().contains("missing required key \"dcs.endpoints\": add endpoints = ["), "{err}");
        // A key of the other kind: listed as unknown, without suggesting itself.
        let (key, suggestion, msg) = unknown(&example().replacen("kind = \"local\"\n", "kind = \"etcd\"\n", 1));
        assert_eq!((key.as_str(), suggestion), ("dcs.path", None), "{msg}");
        assert!(msg.ends_with("valid keys in [dcs]: kind, endpoints"), "{msg}");
        let (key, _, msg) = unknown(&etcd_example().replace("\nendpoints = ", "\npath = \"/x\"\nendpoints = "));
        assert_eq!(key, "dcs.path", "{msg}");
        let (key, suggestion, _) = unknown(&etcd_example().replace("\nendpoints = ", "\nendpoint = "));
        assert_eq!((key.as_str(), suggestion.as_deref()), ("dcs.endpoint", Some("dcs.endpoints")));
        let err = check(&example().replace("kind = \"local\"", "")).expect_err("no kind").to_string();
        assert!(err.contains("missing required key \"dcs.kind\""), "{err}");
        let err = check(&example().replace("path = \"/var/lib/pgkeel/dcs\"", "")).expect_err("no path").to_string();
        assert!(err.contains("missing required key \"dcs.path\""), "{err}");
    }

    #[test]
    fn syntax_and_type_errors() {
        let err = check("cluster = \"main\nname = 1").expect_err("unterminated string");
        assert!(matches!(err, ConfigError::Syntax(_)), "{err:?}");
        assert!(err.to_string().contains("line 1"), "{err}");

        let err = check(&example().replace("ttl = \"4s\"", "ttl = \"4 parsecs\"")).expect_err("bad unit");
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err:?}");
        assert!(msg.contains("ttl = \"4 parsecs\"") && msg.contains("unknown unit"), "{msg}");

        let err = check(&example().replace("nofailover = false", "nofailover = \"no\"")).expect_err("type");
        assert!(err.to_string().contains("in [tags] (nofailover = \"no\"): invalid type"), "{err}");

        let err = check(&example().replace("cluster = \"main\"\n", "")).expect_err("missing");
        assert_eq!(err.to_string(), "missing required key \"cluster\": add cluster = \"main\" at the top of the file");
    }

    fn invalid_msg(text: &str) -> String {
        match check(text) {
            Err(ConfigError::Invalid(msg)) => msg,
            other => panic!("expected Invalid for\n{text}\ngot {other:?}"),
        }
    }

    #[test]
    fn pg_hba_lines_postgres_reads() {
        for line in [
            "local all all peer",
            "host all all 10.0.0.0/8 scram-sha-256",
            "hostssl all app 10.0.0.1 255.255.255.255 cert clientname=DN",
            "hostnossl \"my db\" \"a user\" 0.0.0.0/0 reject # no plain text",
            "host all all ::1/128 trust",
            "hostgssenc all all all gss include_realm=0",
            "host replication all samenet md5",
        ] {
            check_hba_line("postgres.pg_hba", 0, line).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
        assert_eq!(hba_fields("a \"b c\"  d#e"), ["a", "\"b c\"", "d"]);
    }

    #[test]
    fn bad_values() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "listen = \"127.0.0.1:5432\"",
                "listen = \"127.0.0.1:99999\"",
                "port \"99999\" is not a number from 1 to 65535",
            ),
            ("listen = \"127.0.0.1:5432\"", "listen = \"127.0.0.1:0\"", "postgres.listen"),
            ("listen = \"127.0.0.1:5432\"", "listen = \"localhost\"", "missing ':port'"),
            ("listen = \"127.0.0.1:5432\"", "listen = \"::1:5432\"", "brackets"),
            ("listen = \"127.0.0.1:5432\"", "listen = \"0.0.0.0:5432\"", "postgres.connect_address"),
            ("listen = \"127.0.0.1:8008\"", "listen = \"bad host:8008\"", "rest.listen"),
            (
                "data_dir = \"/var/lib/pgkeel/n1/data\"",
                "data_dir = \"n1/data\"",
                "data_dir = \"n1/data\" is a relative path",
            ),
            ("path = \"/var/lib/pgkeel/dcs\"", "path = \"dcs\"", "dcs.path"),
            ("cluster = \"main\"", "cluster = \"my cluster\"", "' ' is not allowed"),
            ("name = \"n1\"", "name = \"\"", "name is empty"),
            ("# backup_max_age = \"14d\"", "backup_max_age = \"14 days\"", "bootstrap.backup_max_age: bad age"),
            ("# dump_keep = 4", "dump_keep = 0", "bootstrap.dump_keep = 0 would remove everything"),
            ("# dump_schedule = \"0 3 * * 0\"", "dump_schedule = \"0 3 * *\"", "bootstrap.dump_schedule"),
            ("os_user = \"postgres\"", "os_user = \"\"", "postgres.os_user"),
            ("username = \"postgres\"", "username = \"post gres\"", "postgres.superuser.username"),
            ("# connect_url = \"http://10.0.0.11:8008\"", "connect_url = \"10.0.0.11:8008\"", "rest.connect_url"),
            ("failover_priority = 1", "failover_priority = -1", "tags.failover_priority"),
            ("ttl = \"4s\"", "ttl = \"3s\"", "\"1s\" + 2 × \"1500ms\" = \"4s\" > \"3s\""),
            ("ttl = \"4s\"", "ttl = 1", "bootstrap.ttl = \"1s\": must be between"),
            ("loop_wait = \"1s\"", "loop_wait = \"10ms\"", "bootstrap.loop_wait"),
            ("retry_timeout = \"1500ms\"", "retry_timeout = 0.1", "bootstrap.retry_timeout"),
            ("maximum_lag_on_failover = \"1MB\"", "maximum_lag_on_failover = 0", "bootstrap.maximum_lag_on_failover"),
            ("primary_start_timeout = \"10s\"", "primary_start_timeout = \"2h\"", "bootstrap.primary_start_timeout"),
            (
                "switchover_drain_timeout = \"5s\"",
                "switchover_drain_timeout = \"2m\"",
                "bootstrap.switchover_drain_timeout = \"120s\": must be at most \"1m\"",
            ),
            ("shared_buffers = \"128MB\"", "port = 5433", "postgres.parameters.port: pgkeel sets port itself"),
            ("shared_buffers = \"128MB\"", "Port = 5433", "pgkeel sets port itself"),
            ("shared_buffers = \"128MB\"", "\"pgkeel.term\" = 1", "pgkeel sets pgkeel.term itself"),
            ("shared_buffers = \"128MB\"", "Shared_Buffers = 1", "write it in lower case: shared_buffers"),
            ("max_connections = 100", "primary_conninfo = \"x\"", "bootstrap.postgresql.parameters.primary_conninfo"),
            ("max_connections = 100", "\"1bad\" = 1", "not a postgres parameter name"),
            ("# pg_hba = [", "pg_hba = [\"\"]\n# ", "postgres.pg_hba[0] is empty"),
            ("# pg_hba = [", "pg_hba = [\"# a comment\"]\n# ", "postgres.pg_hba[0] is empty (or only a comment)"),
            ("# pg_hba = [", "pg_hba = [\"host all all 10.0.0.0/8 md5\", \"a\\nb\"]\n# ", "postgres.pg_hba[1]"),
            ("# pg_hba = [", "pg_hba = [\"hots all all 10.0.0.0/8 md5\"]\n# ", "\"hots\" is not a connection type"),
            ("# pg_hba = [", "pg_hba = [\"host all all md5\"]\n# ", "too few fields; a host line is host DATABASE"),
            ("# pg_hba = [", "pg_hba = [\"local all all\"]\n# ", "too few fields; a local line"),
            ("# pg_hba = [", "pg_hba = [\"host all all 10.0.0.0/8 scram\"]\n# ", "\"scram\" is not an authentication"),
            ("# pg_hba = [", "pg_hba = [\"host all all 10.0.0.0 255.0.0.0\"]\n# ", "too few fields"),
            (
                "# pg_hba = [\"hostssl all all 0.0.0.0/0",
                "pg_hba = [\"hots all all 0.0.0.0/0",
                "bootstrap.postgresql.pg_hba[0] = \"hots all all",
            ),
        ];
        for (from, to, want) in cases {
            assert!(example().contains(from), "example lacks {from}");
            let msg = invalid_msg(&example().replacen(from, to, 1));
            assert!(msg.contains(want), "{to}: {msg:?} should contain {want:?}");
        }
    }

    #[test]
    fn good_addresses() {
        for addr in ["127.0.0.1:5432", "[::1]:5432", "db-1.example.com:5432", "localhost:1", "*:65535", "[::]:5432"] {
            assert!(split_host_port(addr).is_ok(), "{addr}");
        }
        assert_eq!(split_host_port("[::1]:5432"), Ok(("::1", 5432)));
    }

    #[test]
    fn primary_start_timeout_zero_is_allowed() {
        let c =
            check(&example().replace("primary_start_timeout = \"10s\"", "primary_start_timeout = 0")).expect("valid");
        assert_eq!(c.bootstrap.primary_start_timeout, Duration::ZERO);
    }

    #[test]
    fn durations_as_strings_and_numbers() {
        let doc = example()
            .replace("ttl = \"4s\"", "ttl = 6")
            .replace("loop_wait = \"1s\"", "loop_wait = 0.5")
            .replace("retry_timeout = \"1500ms\"", "retry_timeout = \"2s\"")
            .replace("maximum_lag_on_failover = \"1MB\"", "maximum_lag_on_failover = 1048576")
            .replace("primary_start_timeout = \"10s\"", "primary_start_timeout = \"1m\"");
        let c = check(&doc).expect("valid");
        assert_eq!(c.bootstrap.ttl, Duration::from_secs(6));
        assert_eq!(c.bootstrap.loop_wait, Duration::from_millis(500));
        assert_eq!(c.bootstrap.retry_timeout, Duration::from_secs(2));
        assert_eq!(c.bootstrap.maximum_lag_on_failover, 1 << 20);
        assert_eq!(c.bootstrap.primary_start_timeout, Duration::from_secs(60));
    }

    #[test]
    fn default_dynamic_config_validates() {
        DynamicConfig::default().validate().expect("defaults are valid");
    }

    #[test]
    fn dynamic_config_json_round_trip() {
        let c = full_config().bootstrap;
        let json = c.to_json();
        assert_eq!(json["ttl"], serde_json::json!(30.0));
        assert_eq!(json["maximum_lag_on_failover"], serde_json::json!(10 << 20));
        assert_eq!(DynamicConfig::from_json(&json).expect("valid"), c);
        let d = DynamicConfig::default();
        assert_eq!(DynamicConfig::from_json(&d.to_json()).expect("valid"), d);
        // Strings are accepted in the DCS too, and the rules apply there as well.
        let v = serde_json::json!({ "ttl": "10s", "loop_wait": "9s" });
        let err = DynamicConfig::from_json(&v).expect_err("rule broken").to_string();
        assert!(err.starts_with("loop_wait + 2 × retry_timeout must not exceed ttl"), "{err}");
        assert!(DynamicConfig::from_json(&serde_json::json!({ "ttll": 4 })).is_err());
        // The cluster's pg_hba lines are checked as a node's are, named by their place.
        let hba = serde_json::json!({ "postgresql": { "pg_hba": ["hostssl all app 10.0.0.0/8 cert"] } });
        let d = DynamicConfig::from_json(&hba).expect("valid");
        assert_eq!(d.postgresql.pg_hba, ["hostssl all app 10.0.0.0/8 cert"]);
        assert_eq!(d.to_json()["postgresql"]["pg_hba"], hba["postgresql"]["pg_hba"]);
        assert!(DynamicConfig::default().to_json()["postgresql"].get("pg_hba").is_none());
        let bad = serde_json::json!({ "postgresql": { "pg_hba": ["local all all trust", "host all all md5"] } });
        let err = DynamicConfig::from_json(&bad).expect_err("too few fields").to_string();
        assert!(err.contains("postgresql.pg_hba[1] = \"host all all md5\": too few fields"), "{err}");
    }

    #[test]
    fn to_toml_round_trips() {
        for c in [full_config(), check(example()).expect("valid")] {
            let text = c.to_toml();
            assert_eq!(check(&text).expect("to_toml output is valid"), c, "{text}");
        }
    }

    #[test]
    fn connect_helpers() {
        let c = full_config();
        assert_eq!(c.pg_connect_address(), "10.0.0.11:5433");
        assert_eq!(c.rest_url(), "http://n1.example.com:8009");
        let d = check(example()).expect("valid");
        assert_eq!(d.pg_connect_address(), "127.0.0.1:5432");
        assert_eq!(d.rest_url(), "http://127.0.0.1:8008");
    }

    #[test]
    fn load_names_the_path() {
        let err = load(Path::new("/nonexistent/pgkeel/node.toml")).expect_err("missing file");
        assert!(matches!(err, ConfigError::Io { .. }));
        assert!(err.to_string().starts_with("cannot read /nonexistent/pgkeel/node.toml: "), "{err}");
    }

    #[test]
    fn levenshtein_distances() {
        for (a, b, d) in
            [("", "", 0), ("ttl", "ttll", 1), ("lisen", "listen", 1), ("kitten", "sitting", 3), ("abc", "", 3)]
        {
            assert_eq!(levenshtein(a, b), d, "{a} / {b}");
        }
    }
}
