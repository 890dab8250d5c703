//! Re-reading `node.toml` in a running agent (SIGHUP, `POST /reload`): which keys it takes
//! at once and which wait for a restart.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::NodeConfig;

/// The keys a running agent takes from a re-read `node.toml`. Every other key (the name, the
/// data directory, the DCS, the addresses, the credentials of the roles, the backup
/// repository...) shapes what the agent has already set up and waits for its restart, so a
/// key added later is restart-only until it is listed here.
pub const RELOADABLE: &[&str] = &["postgres.parameters", "postgres.pg_hba", "tags", "rest.username", "rest.password"];

/// The outcome of [`NodeConfig::reload`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reload {
    /// The configuration to run with: the running one with the reloadable keys of the file.
    pub config: NodeConfig,
    /// Keys whose new value is taken now, e.g. `postgres.parameters.work_mem`, `tags.nofailover`.
    pub applied: Vec<String>,
    /// Keys that changed in the file but keep their running value until the agent restarts.
    pub need_restart: Vec<String>,
    /// Keys under `[bootstrap]` that changed: they are read only when the cluster is created;
    /// the running cluster's settings change with `pgkeel config set`.
    pub bootstrap: Vec<String>,
}

impl Reload {
    /// True when the file differs from the running configuration in nothing.
    pub fn is_unchanged(&self) -> bool {
        self.applied.is_empty() && self.need_restart.is_empty() && self.bootstrap.is_empty()
    }
}

impl NodeConfig {
    /// Compare a re-read `file` (already validated) with this running configuration: take its
    /// [`RELOADABLE`] keys, list what else changed. Key names only, never values (passwords).
    pub fn reload(&self, file: &NodeConfig) -> Reload {
        let (old, new) = (flatten(self), flatten(file));
        let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut out = Reload { config: self.clone(), applied: vec![], need_restart: vec![], bootstrap: vec![] };
        for key in keys.into_iter().filter(|k| old.get(*k) != new.get(*k)) {
            let under = |prefix: &str| key == prefix || key.starts_with(&format!("{prefix}."));
            let list = if under("bootstrap") {
                &mut out.bootstrap
            } else if RELOADABLE.iter().any(|p| under(p)) {
                &mut out.applied
            } else {
                &mut out.need_restart
            };
            list.push(key.clone());
        }
        let c = &mut out.config;
        c.postgres.parameters = file.postgres.parameters.clone();
        c.postgres.pg_hba = file.postgres.pg_hba.clone();
        c.tags = file.tags.clone();
        c.rest.username = file.rest.username.clone();
        c.rest.password = file.rest.password.clone();
        out
    }
}

/// Every leaf of the configuration by its dotted key (`postgres.parameters.work_mem`); lists
/// are leaves. An unset optional key is absent or null: both read as "not set".
fn flatten(c: &NodeConfig) -> BTreeMap<String, Value> {
    fn walk(prefix: String, v: Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    walk(if prefix.is_empty() { k } else { format!("{prefix}.{k}") }, v, out);
                }
            }
            Value::Null => {}
            leaf => {
                out.insert(prefix, leaf);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(String::new(), serde_json::to_value(c).expect("a NodeConfig serializes"), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use crate::{check, example, ParamValue};

    #[test]
    fn reloadable_keys_are_taken_the_others_listed() {
        let running = check(example()).expect("valid");
        assert!(running.reload(&running).is_unchanged());

        let mut file = running.clone();
        file.postgres.parameters.insert("work_mem".into(), ParamValue::Text("64MB".into()));
        file.postgres.parameters.remove("shared_buffers");
        file.postgres.pg_hba = vec!["hostssl all app 10.0.0.0/8 cert".into()];
        file.tags.nofailover = true;
        file.rest.password = Some("secret".into());
        file.postgres.listen = "127.0.0.1:5433".into();
        file.data_dir = "/srv/other".into();
        file.postgres.replication.password = Some("new".into());
        file.bootstrap.ttl = std::time::Duration::from_secs(30);
        let r = running.reload(&file);
        assert_eq!(
            r.applied,
            [
                "postgres.parameters.shared_buffers",
                "postgres.parameters.work_mem",
                "postgres.pg_hba",
                "rest.password",
                "tags.nofailover"
            ]
        );
        assert_eq!(r.need_restart, ["data_dir", "postgres.listen", "postgres.replication.password"]);
        assert_eq!(r.bootstrap, ["bootstrap.ttl"]);
        // The reloadable keys come from the file, the others stay as they run.
        assert_eq!(r.config.postgres.parameters, file.postgres.parameters);
        assert_eq!(r.config.postgres.pg_hba, file.postgres.pg_hba);
        assert!(r.config.tags.nofailover);
        assert_eq!(r.config.rest.password.as_deref(), Some("secret"));
        assert_eq!(r.config.postgres.listen, running.postgres.listen);
        assert_eq!(r.config.data_dir, running.data_dir);
        assert_eq!(r.config.postgres.replication.password, running.postgres.replication.password);
        assert_eq!(r.config.bootstrap, running.bootstrap);
        // What was taken is what a second reload of the same file finds unchanged.
        let again = r.config.reload(&file);
        assert!(again.applied.is_empty(), "{again:?}");
    }
}
