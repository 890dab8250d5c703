//! Synchronous replication on the primary: which standbys to name in
//! `synchronous_standby_names` (the GUC) and in the DCS `sync` key (the failover candidates),
//! one safe step per loop.
//!
//! The invariant: every member in the key has every acknowledged commit. So a standby enters
//! the GUC first and the key only once postgres reports it `sync`; it leaves the key first and
//! the GUC afterwards. The GUC names exactly the chosen standbys (`FIRST n` with n = their
//! number), so each of them must confirm every commit.
//!
//! Quorum mode (`ANY k (voters)`) is planned by [`plan_quorum`]: every acknowledged commit is
//! on at least k voters, so any `n - k + 1` voters include one that has it, and the voter with
//! the most WAL among them has every acknowledged commit. The key holds the quorum
//! configurations a candidate must satisfy: while the GUC moves from one configuration to
//! another the key holds both (joint), and the old one is dropped only once k voters of the
//! new one have flushed past the position the primary had when the new GUC took effect, so
//! every earlier commit is covered by the new configuration too.

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
    /// `ANY k` of the streaming standbys (k = `synchronous_node_count`) confirm each commit.
    Quorum,
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
        SyncMode::Off | SyncMode::Quorum => vec![],
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

/// One quorum configuration: `ANY k (voters)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct QuorumSet {
    /// How many voters confirm each commit.
    pub k: u32,
    /// The standbys that may confirm, sorted.
    pub voters: Vec<String>,
}

impl QuorumSet {
    /// How many of its voters a candidate must reach to be sure one of them has every commit
    /// acknowledged under this configuration.
    pub fn needed(&self) -> usize {
        (self.voters.len() + 1).saturating_sub(self.k as usize).max(1)
    }

    /// The GUC value.
    pub fn render(&self) -> String {
        let names: Vec<String> = self.voters.iter().map(|n| format!("\"{}\"", n.replace('"', ""))).collect();
        format!("ANY {} ({})", self.k, names.join(", "))
    }
}

/// One loop's step in quorum mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumStep {
    /// The configuration the GUC names after this step (`None`: asynchronous).
    pub guc: Option<QuorumSet>,
    /// New content for the key, when it changes.
    pub key: Option<Vec<QuorumSet>>,
    /// Write the key before applying the GUC; otherwise after.
    pub key_first: bool,
}

/// Plan this loop's quorum step.
///
/// - `candidates`: streaming standbys that may vote (all of them vote: k of them must confirm);
/// - `guc`: the configuration the running GUC names (`None`: asynchronous);
/// - `established`: k voters of `guc` have flushed past the primary's position at the moment
///   that GUC took effect (so the configuration covers every commit acknowledged before it);
/// - `key`: the configurations in the DCS key now.
pub fn plan_quorum(
    count: u32,
    candidates: &[SyncCandidate],
    guc: Option<&QuorumSet>,
    established: bool,
    key: &[QuorumSet],
) -> QuorumStep {
    let voters = sorted(candidates.iter().map(|c| c.name.clone()).collect());
    let wanted = (!voters.is_empty() && count > 0).then(|| QuorumSet { k: count.min(voters.len() as u32), voters });
    let guc = guc.cloned();
    let same = |key: Vec<QuorumSet>| QuorumStep { guc: guc.clone(), key: Some(key), key_first: true };
    match (&wanted, key.last()) {
        // Going asynchronous: nobody may be promoted (empty key) before the GUC stops waiting.
        (None, Some(_)) => same(Vec::new()),
        (None, None) => QuorumStep { guc: None, key: None, key_first: false },
        // From no configuration: the GUC first; the key once the configuration is established.
        (Some(w), None) => {
            let key = (guc.as_ref() == Some(w) && established).then(|| vec![w.clone()]);
            QuorumStep { guc: Some(w.clone()), key, key_first: false }
        }
        (Some(w), Some(last)) if last != w => {
            // A target the GUC never named had no commit acknowledged under it: replace it.
            let mut joint: Vec<QuorumSet> = key.to_vec();
            if key.len() > 1 && guc.as_ref() != Some(last) {
                joint.pop();
            }
            if !joint.contains(w) {
                joint.push(w.clone());
            } else {
                joint.retain(|c| c != w);
                joint.push(w.clone());
            }
            same(joint)
        }
        // The key ends with the wanted configuration: the GUC follows, then the joint key
        // shrinks to it once it is established.
        (Some(w), Some(_)) => {
            if guc.as_ref() != Some(w) {
                QuorumStep { guc: Some(w.clone()), key: None, key_first: false }
            } else if key.len() > 1 && established {
                QuorumStep { guc: Some(w.clone()), key: Some(vec![w.clone()]), key_first: false }
            } else {
                QuorumStep { guc: Some(w.clone()), key: None, key_first: false }
            }
        }
    }
}

/// Whether a candidate may be promoted under the quorum configurations of the key, given the
/// positions of the voters it reached (itself included when it is one): for every
/// configuration it reached enough voters, it is a voter of one of them, and no reached voter
/// has more WAL. `Err` says why not.
pub fn quorum_allows(
    key: &[QuorumSet],
    candidate: &str,
    candidate_lsn: u64,
    reached: &[(String, u64)],
) -> Result<(), String> {
    if key.is_empty() {
        return Err("the sync key names no quorum (the primary ran asynchronously)".into());
    }
    if !key.iter().any(|c| c.voters.iter().any(|v| v == candidate)) {
        return Err(format!("{candidate} is not a voter of the synchronous quorum"));
    }
    for c in key {
        let got: Vec<&(String, u64)> = reached.iter().filter(|(n, _)| c.voters.contains(n)).collect();
        if got.len() < c.needed() {
            return Err(format!(
                "reached {} of the voters of {} but {} are needed to know who has every acknowledged commit",
                got.len(),
                c.render(),
                c.needed()
            ));
        }
        if let Some((n, lsn)) = got.iter().find(|(_, lsn)| *lsn > candidate_lsn) {
            return Err(format!("voter {n} has more WAL ({lsn} > {candidate_lsn})"));
        }
    }
    Ok(())
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

    fn qs(k: u32, voters: &[&str]) -> QuorumSet {
        QuorumSet { k, voters: v(voters) }
    }

    fn qstep(guc: Option<QuorumSet>, key: Option<Vec<QuorumSet>>, key_first: bool) -> QuorumStep {
        QuorumStep { guc, key, key_first }
    }

    /// name, synchronous_node_count, candidates, GUC now, established, key now, expected step
    type QRow = (&'static str, u32, Vec<SyncCandidate>, Option<QuorumSet>, bool, Vec<QuorumSet>, QuorumStep);

    #[test]
    fn quorum_steps_table() {
        let a = || qs(1, &["n2", "n3"]);
        let b = || qs(1, &["n2", "n3", "n4"]);
        let two = vec![c("n2", 5, false), c("n3", 9, false)];
        let three = vec![c("n2", 5, false), c("n3", 9, false), c("n4", 1, false)];
        #[rustfmt::skip]
        let rows: Vec<QRow> = vec![
            ("no standbys, nothing named: asynchronous",
                1, vec![], None, false, vec![], qstep(None, None, false)),
            ("standbys appear: the GUC names them first, the key stays empty",
                1, two.clone(), None, false, vec![], qstep(Some(a()), None, false)),
            ("the GUC is live but not established yet: wait",
                1, two.clone(), Some(a()), false, vec![], qstep(Some(a()), None, false)),
            ("established: the key gets the configuration",
                1, two.clone(), Some(a()), true, vec![], qstep(Some(a()), Some(vec![a()]), false)),
            ("steady state",
                1, two.clone(), Some(a()), true, vec![a()], qstep(Some(a()), None, false)),
            ("a standby joins: the joint key is written before the GUC changes",
                1, three.clone(), Some(a()), true, vec![a()], qstep(Some(a()), Some(vec![a(), b()]), true)),
            ("joint key written: the GUC moves to the new configuration",
                1, three.clone(), Some(a()), true, vec![a(), b()], qstep(Some(b()), None, false)),
            ("new GUC live but not established: the joint key stays",
                1, three.clone(), Some(b()), false, vec![a(), b()], qstep(Some(b()), None, false)),
            ("new configuration established: the old one leaves the key",
                1, three.clone(), Some(b()), true, vec![a(), b()], qstep(Some(b()), Some(vec![b()]), false)),
            ("k follows synchronous_node_count, capped by the voters",
                5, two.clone(), None, false, vec![], qstep(Some(qs(2, &["n2", "n3"])), None, false)),
            ("a target the GUC never named is replaced, not stacked",
                1, vec![c("n2", 5, false)], Some(a()), true, vec![a(), b()], qstep(Some(a()), Some(vec![a(), qs(1, &["n2"])]), true)),
            ("a target the GUC named but not yet established is kept in the joint key",
                1, vec![c("n2", 5, false)], Some(b()), false, vec![a(), b()], qstep(Some(b()), Some(vec![a(), b(), qs(1, &["n2"])]), true)),
            ("every standby gone: the key is emptied before the GUC goes asynchronous",
                1, vec![], Some(a()), true, vec![a()], qstep(Some(a()), Some(vec![]), true)),
            ("... then the GUC goes asynchronous",
                1, vec![], Some(a()), true, vec![], qstep(None, None, false)),
        ];
        let mut failures = vec![];
        for (name, count, cands, guc, established, key, want) in &rows {
            let got = plan_quorum(*count, cands, guc.as_ref(), *established, key);
            if got != *want {
                failures.push(format!("{name}: want {want:?}, got {got:?}"));
            }
            // The invariant: a configuration the GUC names (before or after the step) is in the
            // key unless the key is empty (nobody may be promoted) or not yet written because
            // that configuration is not established.
            let key_after = got.key.clone().unwrap_or_else(|| key.clone());
            if let Some(g) = guc {
                if !key.is_empty() && key.contains(g) {
                    assert!(
                        key_after.is_empty() || key_after.contains(g) || *established,
                        "{name}: the running GUC {g:?} left the key {key_after:?} before a successor was established"
                    );
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn quorum_safety_rule() {
        let k = vec![qs(2, &["n2", "n3", "n4"])];
        let reach = |xs: &[(&str, u64)]| xs.iter().map(|(n, l)| (n.to_string(), *l)).collect::<Vec<_>>();
        assert_eq!(qs(2, &["n2", "n3", "n4"]).needed(), 2);
        assert_eq!(qs(1, &["n2", "n3"]).needed(), 2);
        assert_eq!(qs(3, &["n2", "n3", "n4"]).needed(), 1);
        assert!(quorum_allows(&k, "n2", 10, &reach(&[("n2", 10), ("n3", 9)])).is_ok());
        let e = quorum_allows(&k, "n2", 10, &reach(&[("n2", 10)])).unwrap_err();
        assert!(e.contains("reached 1 of the voters of ANY 2 (\"n2\", \"n3\", \"n4\") but 2 are needed"), "{e}");
        let e = quorum_allows(&k, "n2", 10, &reach(&[("n2", 10), ("n4", 11)])).unwrap_err();
        assert!(e.contains("voter n4 has more WAL"), "{e}");
        assert!(quorum_allows(&k, "n5", 10, &reach(&[("n2", 1), ("n3", 1)])).unwrap_err().contains("not a voter"));
        assert!(quorum_allows(&[], "n2", 10, &[]).unwrap_err().contains("asynchronously"));
    }

    #[test]
    fn rendering() {
        assert_eq!(render(SyncMode::On, &v(&[])), "");
        assert_eq!(render(SyncMode::Off, &v(&[])), "");
        assert_eq!(render(SyncMode::Strict, &v(&[])), "FIRST 1 (\"pgkeel_no_sync_standby\")");
        assert_eq!(render(SyncMode::On, &v(&["n2", "n3"])), "FIRST 2 (\"n2\", \"n3\")");
        assert_eq!(qs(1, &["n2", "n3"]).render(), "ANY 1 (\"n2\", \"n3\")");
    }
}
