//! Synchronous replication on the primary: which standbys to name in
//! `synchronous_standby_names` (the GUC) and in the DCS `sync` key (the failover candidates),
//! one safe step per loop.
//!
//! The invariant: every member in the key has every acknowledged commit. So a standby enters
//! the GUC first and the key only once postgres reports it `sync`; it leaves the key first and
//! the GUC afterwards. The GUC names exactly the chosen standbys (`FIRST n` with n = their
//! number), so each of them must confirm every commit.

/// Synchronous mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Asynchronous.
    #[default]
    Off,
    /// Synchronous while standbys are available.
    On,
    /// No commit without a synchronous standby.
    Strict,
}

/// A standby streaming from the primary that may become synchronous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncCandidate {
    /// Member name (its `application_name`).
    pub name: String,
    /// Flush LSN it reported.
    pub flush_lsn: u64,
    /// `pg_stat_replication.sync_state` is `sync`: postgres waits for it now.
    pub confirmed: bool,
}

/// One loop's step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStep {
    /// Standbys to name in the GUC after this step.
    pub guc: Vec<String>,
    /// New content for the `sync` key, when it changes.
    pub key: Option<Vec<String>>,
    /// Write the key before applying the GUC (withdrawing); otherwise after (adding).
    pub key_first: bool,
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// Plan this loop's step from the mode, the wanted count, the streaming candidates, the
/// standbys named in the running GUC and those in the key.
pub fn plan(mode: SyncMode, count: u32, candidates: &[SyncCandidate], guc: &[String], key: &[String]) -> SyncStep {
    let mut ranked: Vec<&SyncCandidate> = candidates.iter().collect();
    // Prefer standbys already synchronous (no churn), then the most advanced, then by name.
    ranked.sort_by(|a, b| {
        let in_key = |c: &SyncCandidate| key.contains(&c.name);
        in_key(b).cmp(&in_key(a)).then(b.flush_lsn.cmp(&a.flush_lsn)).then(a.name.cmp(&b.name))
    });
    let wanted: Vec<String> = match mode {
        SyncMode::Off => vec![],
        SyncMode::On | SyncMode::Strict => sorted(ranked.iter().take(count as usize).map(|c| c.name.clone()).collect()),
    };
    let key = sorted(key.to_vec());
    // Withdraw first: members that should no longer be synchronous leave the key before the
    // GUC stops waiting for them.
    if key.iter().any(|k| !wanted.contains(k)) {
        let kept: Vec<String> = key.iter().filter(|k| wanted.contains(k)).cloned().collect();
        return SyncStep { guc: sorted(guc.to_vec()), key: Some(kept), key_first: true };
    }
    // Then add: the GUC names the wanted set; the key lists those postgres already confirms.
    let confirmed: Vec<String> = sorted(
        candidates
            .iter()
            .filter(|c| c.confirmed && wanted.contains(&c.name) && guc.contains(&c.name))
            .map(|c| c.name.clone())
            .collect(),
    );
    let new_key = sorted(key.iter().cloned().chain(confirmed).collect());
    SyncStep { guc: wanted, key: (new_key != key).then_some(new_key), key_first: false }
}

/// The GUC value for `standbys`: every one of them must confirm each commit. In strict mode
/// without standbys a name nobody has blocks commits, as strict promises.
pub fn render(mode: SyncMode, standbys: &[String]) -> String {
    if standbys.is_empty() {
        return if mode == SyncMode::Strict { "FIRST 1 (\"pgkeel_no_sync_standby\")".into() } else { String::new() };
    }
    let names: Vec<String> = standbys.iter().map(|n| format!("\"{}\"", n.replace('"', ""))).collect();
    format!("FIRST {} ({})", standbys.len(), names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, lsn: u64, confirmed: bool) -> SyncCandidate {
        SyncCandidate { name: name.into(), flush_lsn: lsn, confirmed }
    }

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// name, mode, synchronous_node_count, candidates, GUC now, key now, expected step
    type Row = (&'static str, SyncMode, u32, Vec<SyncCandidate>, Vec<String>, Vec<String>, SyncStep);

    #[test]
    fn steps_table() {
        use SyncMode::*;
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("off, nothing named: nothing to do",
                Off, 1, vec![c("n2", 9, false)], v(&[]), v(&[]), SyncStep { guc: v(&[]), key: None, key_first: false }),
            ("on: the best candidate enters the GUC first, not the key",
                On, 1, vec![c("n2", 5, false), c("n3", 9, false)], v(&[]), v(&[]), SyncStep { guc: v(&["n3"]), key: None, key_first: false }),
            ("on: once postgres confirms it, it enters the key",
                On, 1, vec![c("n2", 5, false), c("n3", 9, true)], v(&["n3"]), v(&[]), SyncStep { guc: v(&["n3"]), key: Some(v(&["n3"])), key_first: false }),
            ("on: steady state",
                On, 1, vec![c("n2", 5, false), c("n3", 9, true)], v(&["n3"]), v(&["n3"]), SyncStep { guc: v(&["n3"]), key: None, key_first: false }),
            ("on: a synchronous standby is kept even when another is ahead",
                On, 1, vec![c("n2", 50, false), c("n3", 9, true)], v(&["n3"]), v(&["n3"]), SyncStep { guc: v(&["n3"]), key: None, key_first: false }),
            ("on: a standby that stopped streaming leaves the key before the GUC",
                On, 1, vec![c("n2", 5, false)], v(&["n3"]), v(&["n3"]), SyncStep { guc: v(&["n3"]), key: Some(v(&[])), key_first: true }),
            ("on: ... then the GUC names the replacement",
                On, 1, vec![c("n2", 5, false)], v(&["n3"]), v(&[]), SyncStep { guc: v(&["n2"]), key: None, key_first: false }),
            ("on: no candidate at all: asynchronous, empty key",
                On, 1, vec![], v(&[]), v(&[]), SyncStep { guc: v(&[]), key: None, key_first: false }),
            ("on, two wanted: both named, each enters the key when confirmed",
                On, 2, vec![c("n2", 5, true), c("n3", 9, false)], v(&["n2"]), v(&[]), SyncStep { guc: v(&["n2", "n3"]), key: Some(v(&["n2"])), key_first: false }),
            ("strict behaves like on for the sets",
                Strict, 1, vec![c("n2", 5, false)], v(&[]), v(&[]), SyncStep { guc: v(&["n2"]), key: None, key_first: false }),
            ("turned off: the key is emptied first",
                Off, 1, vec![c("n2", 5, true)], v(&["n2"]), v(&["n2"]), SyncStep { guc: v(&["n2"]), key: Some(v(&[])), key_first: true }),
            ("turned off: then the GUC",
                Off, 1, vec![c("n2", 5, true)], v(&["n2"]), v(&[]), SyncStep { guc: v(&[]), key: None, key_first: false }),
            ("a confirmed standby not in the running GUC is not trusted yet",
                On, 1, vec![c("n2", 5, true)], v(&[]), v(&[]), SyncStep { guc: v(&["n2"]), key: None, key_first: false }),
        ];
        let mut failures = vec![];
        for (name, mode, count, cands, guc, key, want) in &rows {
            let got = plan(*mode, *count, cands, guc, key);
            if got != *want {
                failures.push(format!("{name}: want {want:?}, got {got:?}"));
            }
            // The invariant, whatever the inputs: after the step every key member is in the GUC.
            let key_after = got.key.clone().unwrap_or_else(|| key.clone());
            let guc_during = if got.key_first { guc.clone() } else { got.guc.clone() };
            assert!(
                key_after.iter().all(|k| guc_during.contains(k)),
                "{name}: key {key_after:?} not within GUC {guc_during:?}"
            );
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn rendering() {
        assert_eq!(render(SyncMode::On, &v(&[])), "");
        assert_eq!(render(SyncMode::Off, &v(&[])), "");
        assert_eq!(render(SyncMode::Strict, &v(&[])), "FIRST 1 (\"pgkeel_no_sync_standby\")");
        assert_eq!(render(SyncMode::On, &v(&["n2", "n3"])), "FIRST 2 (\"n2\", \"n3\")");
    }
}
